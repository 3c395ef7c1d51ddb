// The PCM data queues (txq, rxq) at the chain level: reading a tx chain's header and PCM, writing
// an rx chain's captured bytes, and the pcm_status that ends every chain (it is always the last 8
// writable bytes, after the data on rx). Used lengths follow Linux's reading of them: a tx chain
// reports its status, an rx chain its data plus status (status only when nothing was captured).
import { ChainReader, ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import * as P from "./protocol.ts";

/** The first readable bytes of a chain (the pcm_xfer header). */
export function xferHead(chain: DescriptorChain): Uint8Array {
  const head = new Uint8Array(Math.min(P.PCM_XFER_BYTES, chain.readableLen));
  new ChainReader(chain).read(head);
  return head;
}

/** A tx chain's PCM bytes (after its header), copied out of guest memory. */
export function readTxPcm(chain: DescriptorChain, bytes: number): Uint8Array {
  const r = new ChainReader(chain);
  r.skip(P.PCM_XFER_BYTES);
  const data = new Uint8Array(bytes);
  r.read(data);
  return data;
}

/**
 * Completes an I/O chain: `data` (rx only) first, then the status in the last 8 writable bytes.
 * A chain without room for a status is returned empty.
 */
export function completeIo(q: Virtqueue, chain: DescriptorChain, status: P.SndStatus, latencyBytes: number, data: Uint8Array | null): void {
  if (chain.writableLen < P.PCM_STATUS_BYTES) {
    q.add(chain.head, 0);
    return;
  }
  const w = new ChainWriter(chain);
  const room = chain.writableLen - P.PCM_STATUS_BYTES;
  let used = P.PCM_STATUS_BYTES;
  if (data !== null && room > 0) {
    used += w.write(data.subarray(0, room));
  }
  w.writeAt(room, P.encodePcmStatus(status, latencyBytes));
  q.add(chain.head, used);
}
