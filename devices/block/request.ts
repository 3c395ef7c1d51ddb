// Reading one virtio-blk request header out of a descriptor chain (virtio 1.2 §5.2.6), without
// trusting its framing: the 16-byte header is the first 16 readable bytes (however the driver
// split them). Guest memory is read once per field. Nothing here allocates on the common path
// (header in one descriptor). Data and status go through the core's chain cursors (src/chain.ts).
import type { ChainReader } from "../../src/chain.ts";
import { REQUEST_HEADER_SIZE } from "./config.ts";

/** The parsed header. */
export class RequestHeader {
  type = 0;
  /** Sector number; exact below 2^53 (larger values are out of range anyway). */
  sector = 0;
  private readonly scratch = new Uint8Array(REQUEST_HEADER_SIZE);
  private readonly scratchView = new DataView(this.scratch.buffer);

  /**
   * Reads the header from the reader's next 16 bytes and moves past them. Returns false when the
   * readable part is shorter than a header.
   */
  read(reader: ChainReader): boolean {
    if (reader.remaining < REQUEST_HEADER_SIZE) return false;
    const first = reader.chain.readable[0]!;
    if (reader.pos === 0 && first.len >= REQUEST_HEADER_SIZE && first.offset % 4 === 0) {
      // In place, through the 32-bit view (not a DataView: see DescriptorTable in src/ring.ts).
      const win = first.region.window(first.offset, REQUEST_HEADER_SIZE);
      if (win !== null) {
        const w = (first.offset - win.start) / 4;
        this.type = win.u32[w]!;
        this.sector = win.u32[w + 2]! + win.u32[w + 3]! * 0x1_0000_0000;
        reader.skip(REQUEST_HEADER_SIZE);
        return true;
      }
    }
    // Header split across descriptors (allowed: drivers need not frame messages), or unaligned.
    if (reader.read(this.scratch) !== REQUEST_HEADER_SIZE) return false;
    const v = this.scratchView;
    this.type = v.getUint32(0, true);
    this.sector = v.getUint32(8, true) + v.getUint32(12, true) * 0x1_0000_0000;
    return true;
  }
}
