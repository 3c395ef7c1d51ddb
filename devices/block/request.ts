// Reading one virtio-blk request out of a descriptor chain (virtio 1.2 §5.2.6), without trusting
// its framing: the 16-byte header is the first 16 readable bytes (however the driver split them),
// the status is the last writable byte, and data buffers are whatever lies between. Guest memory
// is read once per field. Nothing here allocates on the common path (header in one descriptor).
import { readFromChain, type DescriptorChain, type Segment } from "../../src/virtqueue.ts";
import type { IovecArray } from "../../ffi/io.ts";
import { REQUEST_HEADER_SIZE } from "./config.ts";

/** The parsed header and the status byte's location. */
export class RequestHeader {
  type = 0;
  /** Sector number; exact below 2^53 (larger values are out of range anyway). */
  sector = 0;
  private readonly scratch = new Uint8Array(REQUEST_HEADER_SIZE);
  private readonly scratchView = new DataView(this.scratch.buffer);

  /**
   * Reads the header from the chain's first 16 readable bytes. Returns false when the readable part
   * is shorter than a header.
   */
  read(chain: DescriptorChain): boolean {
    if (chain.readableLen < REQUEST_HEADER_SIZE) return false;
    const first = chain.readable[0]!;
    if (first.len >= REQUEST_HEADER_SIZE) {
      const win = first.region.window(first.offset, REQUEST_HEADER_SIZE);
      if (win !== null) {
        const o = first.offset - win.start;
        this.type = win.dv.getUint32(o, true);
        this.sector = win.dv.getUint32(o + 8, true) + win.dv.getUint32(o + 12, true) * 0x1_0000_0000;
        return true;
      }
    }
    // Header split across descriptors (allowed: drivers need not frame messages).
    if (readFromChain(chain, this.scratch) !== REQUEST_HEADER_SIZE) return false;
    const v = this.scratchView;
    this.type = v.getUint32(0, true);
    this.sector = v.getUint32(8, true) + v.getUint32(12, true) * 0x1_0000_0000;
    return true;
  }
}

/** Index of the writable segment holding the status byte (its last byte), or -1 if none. */
export function statusSegment(chain: DescriptorChain): number {
  const w = chain.writable;
  for (let i = w.length - 1; i >= 0; i--) if (w[i]!.len > 0) return i;
  return -1;
}

/** Writes the status byte (the last byte of writable segment `index`). */
export function writeStatus(chain: DescriptorChain, index: number, status: number): boolean {
  const seg = chain.writable[index]!;
  const at = seg.offset + seg.len - 1;
  const win = seg.region.window(at, 1);
  if (win === null) return false;
  win.u8[at - win.start] = status;
  return true;
}

/**
 * Fills `iov` with `len` bytes of `segs` starting `skip` bytes in (zero-length pieces dropped).
 * Returns false when that takes more iovecs than `iov` holds (the request has too many segments).
 */
export function buildIovecs(iov: IovecArray, segs: readonly Segment[], skip: number, len: number): boolean {
  iov.clear();
  let remaining = len;
  for (let i = 0; i < segs.length && remaining > 0; i++) {
    const seg = segs[i]!;
    if (skip >= seg.len) {
      skip -= seg.len;
      continue;
    }
    const n = Math.min(seg.len - skip, remaining);
    if (!iov.push(seg.addr + skip, n)) return false;
    remaining -= n;
    skip = 0;
  }
  return remaining === 0;
}
