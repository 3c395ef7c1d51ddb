// Compressed clusters (qcow2.txt "Compressed Clusters Descriptor"): raw deflate (QEMU's zlib with
// windowBits -12) or one zstd frame. The stored data is rounded up to 512-byte sectors, so bytes
// after the stream are normal and ignored; a stream that yields anything but exactly one cluster is
// corrupt. The output is bounded while inflating: a hostile cluster cannot make us allocate more.
import { inflateRawSync, zstdDecompressSync, constants } from "node:zlib";
import { COMPRESSION } from "./header.ts";
import { Qcow2CorruptError } from "./refcounts.ts";

export function decompressCluster(input: Uint8Array, clusterSize: number, type: number): Uint8Array {
  let out: Uint8Array;
  try {
    if (type === COMPRESSION.ZSTD) {
      out = zstdDecompressSync(zstdFrame(input), { maxOutputLength: clusterSize });
    } else {
      out = inflateRawSync(input, { maxOutputLength: clusterSize, finishFlush: constants.Z_SYNC_FLUSH });
    }
  } catch (e) {
    throw new Qcow2CorruptError(`compressed cluster does not decompress to ${clusterSize} bytes: ${(e as Error).message}`);
  }
  if (out.length !== clusterSize) throw new Qcow2CorruptError(`compressed cluster decompresses to ${out.length} bytes, not ${clusterSize}`);
  return out;
}

/** The first zstd frame of `buf` (the sector padding after it would otherwise be read as a second frame). */
function zstdFrame(buf: Uint8Array): Uint8Array {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < 6 || v.getUint32(0, true) !== 0xfd2fb528) throw new Error("not a zstd frame");
  const fhd = buf[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictId = [0, 1, 2, 4][fhd & 3]!;
  const fcs = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  let o = 5 + (single ? 0 : 1) + dictId + fcs;
  for (;;) {
    if (o + 3 > buf.length) throw new Error("truncated zstd frame");
    const bh = buf[o]! | (buf[o + 1]! << 8) | (buf[o + 2]! << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new Error("reserved zstd block type");
    o += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  o += checksum ? 4 : 0;
  if (o > buf.length) throw new Error("truncated zstd frame");
  return buf.subarray(0, o);
}

/**
 * Where a compressed cluster's bytes are (L2 entry high and low words): offset in bits 0..x-1 and
 * additional 512-byte sectors in bits x..61, x = 62 - (cluster_bits - 8).
 */
export function compressedExtent(hi: number, lo: number, clusterBits: number): { offset: number; size: number } {
  const hiOffBits = 70 - clusterBits - 32;
  const offset = (hi & ((1 << hiOffBits) - 1)) * 0x1_0000_0000 + lo;
  const sectors = (hi >>> hiOffBits) & ((1 << (clusterBits - 8)) - 1);
  return { offset, size: (sectors + 1) * 512 - (offset % 512) };
}
