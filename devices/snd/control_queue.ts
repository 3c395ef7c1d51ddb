// The control queue (controlq): one request per chain, answered at once. The readable part is
// joined (bounded: the largest request is a TLV write), decoded strictly, and dispatched to the
// device's streams, jacks, channel maps and controls; anything malformed gets its status in the
// reply, never an exception, and a chain with no room for a status is returned empty.
import { ChainReader, ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import type { GuestErrorLog } from "../../src/guest_errors.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import * as P from "./protocol.ts";

/** A TLV write (header, TLV header, 64 KiB) is the largest request there is. */
export const MAX_REQUEST_BYTES = P.CTL_HDR_BYTES + 8 + P.CTL_TLV_MAX_BYTES;

/** What the control queue asks of the device for each decoded request. */
export interface ControlTarget {
  limits(): P.SndLimits;
  /** The reply bytes (status first) for a request whose ids are in range. */
  execute(r: P.SndRequest, writableBytes: number): Uint8Array;
}

export function handleControlChain(q: Virtqueue, chain: DescriptorChain, target: ControlTarget, errors: GuestErrorLog): void {
  const w = new ChainWriter(chain);
  const reply = replyFor(chain, target, errors);
  if (chain.writableLen < P.HDR_BYTES) {
    errors.report(`controlq: request with ${chain.writableLen} writable bytes, no room for a status; returned empty`);
  } else {
    w.write(reply);
  }
  q.add(chain.head, w.written);
}

function replyFor(chain: DescriptorChain, target: ControlTarget, errors: GuestErrorLog): Uint8Array {
  if (chain.readableLen > MAX_REQUEST_BYTES) {
    errors.report(`controlq: request of ${chain.readableLen} bytes (at most ${MAX_REQUEST_BYTES})`);
    return P.encodeHdr(P.S_BAD_MSG);
  }
  const buf = new Uint8Array(chain.readableLen);
  new ChainReader(chain).read(buf);
  const d = P.decodeRequest(buf, target.limits());
  if (!d.ok) {
    errors.report(`controlq: ${d.error}`);
    return P.encodeHdr(d.status);
  }
  const need = P.minResponseBytes(d.value);
  if (chain.writableLen < need) {
    errors.report(`controlq: request 0x${d.value.code.toString(16)} with ${chain.writableLen} writable bytes, needs ${need}`);
    return P.encodeHdr(P.S_BAD_MSG);
  }
  return target.execute(d.value, chain.writableLen);
}
