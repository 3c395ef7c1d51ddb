// The qcow2 header (QEMU docs/interop/qcow2.txt, "Header" and "Header extensions"): parsed and
// checked before anything else of the image is trusted. Everything here is untrusted input: every
// offset and size is checked against the file and against the limits QEMU itself enforces, and
// anything we do not implement is refused with a message that says what.

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

/** Header extension types (QEMU block/qcow2.c QCOW2_EXT_MAGIC_*). */
const EXT = {
  END: 0,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  CRYPTO: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

/** The header's compression_type (QEMU's QCOW2_COMPRESSION_TYPE_*). */
export const COMPRESSION = {
  ZLIB: 0,
  ZSTD: 1,
} as const;

/** QEMU's own limits (block/qcow2.h): beyond them QEMU refuses the image too. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
const MAX_BACKING_NAME = 1023;
const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21;

/** Byte offsets of the header fields we rewrite. */
export const HDR_REFTABLE_OFFSET = 48; // u64 refcount_table_offset, then u32 refcount_table_clusters
export const HDR_INCOMPAT = 72;
export const HDR_AUTOCLEAR = 88;

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** The backing file's name as stored (null: none). */
  backingFile: string | null;
  /** From the backing-format extension (null: absent, probe). */
  backingFormat: string | null;
  /** Bitmaps extension: the directory (null: none). */
  bitmaps: { count: number; directorySize: number; directoryOffset: number } | null;
  /** Feature names from the feature-name table, for error messages: "type:bit" -> name. */
  featureNames: Map<string, string>;
}

export class Qcow2FormatError extends Error {}

function u64(v: DataView, o: number): number {
  const hi = v.getUint32(o);
  if (hi >= 0x200000) throw new Qcow2FormatError(`header field at byte ${o} is too large (${hi.toString(16)}xxxxxxxx)`);
  return hi * 0x1_0000_0000 + v.getUint32(o + 4);
}

export function isQcow2(first: Uint8Array): boolean {
  return first.length >= 4 && new DataView(first.buffer, first.byteOffset, 4).getUint32(0) === QCOW2_MAGIC;
}

/**
 * Parses and validates the header from the image's first cluster (or more: `buf` holds at least
 * the first 64 KiB or the whole file when shorter). `fileLength` bounds every table.
 */
export function parseHeader(buf: Uint8Array, fileLength: number): Qcow2Header {
  if (buf.length < 72 || !isQcow2(buf)) throw new Qcow2FormatError("not a qcow2 image (bad magic)");
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) throw new Qcow2FormatError(`unsupported qcow2 version ${version}`);
  const clusterBits = v.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new Qcow2FormatError(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(v, 8),
    backingFileSize: v.getUint32(16),
    clusterBits,
    clusterSize,
    size: u64(v, 24),
    l1Size: v.getUint32(36),
    l1TableOffset: u64(v, 40),
    refcountTableOffset: u64(v, 48),
    refcountTableClusters: v.getUint32(56),
    nbSnapshots: v.getUint32(60),
    snapshotsOffset: u64(v, 64),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: COMPRESSION.ZLIB,
    backingFile: null,
    backingFormat: null,
    bitmaps: null,
    featureNames: new Map(),
  };
  const cryptMethod = v.getUint32(32);
  if (version === 3) {
    if (buf.length < 104) throw new Qcow2FormatError("truncated version 3 header");
    h.incompatible = v.getBigUint64(72);
    h.compatible = v.getBigUint64(80);
    h.autoclear = v.getBigUint64(88);
    h.refcountOrder = v.getUint32(96);
    h.headerLength = v.getUint32(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > clusterSize || h.headerLength > buf.length) {
      throw new Qcow2FormatError(`bad header_length ${h.headerLength}`);
    }
    if (h.headerLength > 104) h.compressionType = buf[104]!;
    if (h.refcountOrder > 6) throw new Qcow2FormatError(`refcount_order ${h.refcountOrder} is above 6`);
  }
  if (h.size % 512 !== 0) throw new Qcow2FormatError(`virtual size ${h.size} is not a multiple of 512`);
  // Header extensions: after the header, up to the end of the first cluster (or the backing name).
  const extEnd = Math.min(clusterSize, buf.length, h.backingFileOffset > 0 ? h.backingFileOffset : clusterSize);
  let o = h.headerLength;
  const seen = new Set<number>();
  while (o + 8 <= extEnd) {
    const type = v.getUint32(o);
    const len = v.getUint32(o + 4);
    if (type === EXT.END) break;
    const data = o + 8;
    if (len > extEnd - data) throw new Qcow2FormatError(`header extension 0x${type.toString(16)} runs past the first cluster`);
    if (seen.has(type) && type !== EXT.FEATURE_TABLE) throw new Qcow2FormatError(`header extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    const bytes = buf.subarray(data, data + len);
    switch (type) {
      case EXT.BACKING_FORMAT:
        h.backingFormat = new TextDecoder().decode(bytes).replace(/\0+$/, "");
        break;
      case EXT.FEATURE_TABLE:
        for (let e = 0; e + 48 <= len; e += 48) {
          const name = new TextDecoder().decode(bytes.subarray(e + 2, e + 48)).replace(/\0.*$/s, "");
          h.featureNames.set(`${bytes[e]}:${bytes[e + 1]}`, name);
        }
        break;
      case EXT.BITMAPS: {
        if (len < 24) throw new Qcow2FormatError("bitmaps extension is too short");
        const bv = new DataView(bytes.buffer, bytes.byteOffset, len);
        h.bitmaps = { count: bv.getUint32(0), directorySize: u64(bv, 8), directoryOffset: u64(bv, 16) };
        break;
      }
      case EXT.CRYPTO:
      case EXT.DATA_FILE:
      default:
        break; // refused below by their feature bits, or unknown and ignorable
    }
    o = data + Math.ceil(len / 8) * 8;
  }

  const unknown = h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2);
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let b = 0; b < 64; b++) if ((unknown >> BigInt(b)) & 1n) names.push(h.featureNames.get(`0:${b}`) ?? `bit ${b}`);
    throw new Qcow2FormatError(`unsupported incompatible feature(s): ${names.join(", ")}`);
  }
  if (h.incompatible & INCOMPAT_CORRUPT) throw new Qcow2FormatError("the image is marked corrupt (repair it with 'qemu-img check -r all')");
  if (h.incompatible & INCOMPAT_DATA_FILE) throw new Qcow2FormatError("external data files are not supported");
  if (h.incompatible & INCOMPAT_EXTL2) throw new Qcow2FormatError("extended L2 entries (subclusters) are not supported");
  if (h.incompatible & INCOMPAT_COMPRESSION) {
    if (h.compressionType !== COMPRESSION.ZSTD) throw new Qcow2FormatError(`unsupported compression type ${h.compressionType}`);
  } else if (h.compressionType !== COMPRESSION.ZLIB) {
    throw new Qcow2FormatError(`compression type ${h.compressionType} without the compression-type feature bit`);
  }
  if (cryptMethod !== 0) throw new Qcow2FormatError(`encrypted images are not supported (crypt_method ${cryptMethod})`);

  // Tables: aligned, inside the file, clear of the header cluster, sizes within QEMU's limits.
  const table = (what: string, offset: number, bytes: number, maxBytes: number) => {
    if (offset % clusterSize !== 0) throw new Qcow2FormatError(`${what} offset ${offset} is not cluster-aligned`);
    if (bytes > maxBytes) throw new Qcow2FormatError(`${what} of ${bytes} bytes is larger than ${maxBytes}`);
    if (bytes > 0 && offset === 0) throw new Qcow2FormatError(`${what} overlaps the header`);
    if (offset + bytes > fileLength) throw new Qcow2FormatError(`${what} (${bytes} bytes at ${offset}) runs past the end of the file (${fileLength} bytes)`);
  };
  const l2Entries = clusterSize / 8;
  const needL1 = Math.ceil(h.size / clusterSize / l2Entries);
  if (h.l1Size < needL1) throw new Qcow2FormatError(`L1 table of ${h.l1Size} entries is too small for ${h.size} bytes (needs ${needL1})`);
  table("L1 table", h.l1TableOffset, h.l1Size * 8, MAX_L1_BYTES);
  if (h.refcountTableClusters === 0) throw new Qcow2FormatError("empty refcount table");
  table("refcount table", h.refcountTableOffset, h.refcountTableClusters * clusterSize, MAX_REFTABLE_BYTES);
  if (overlaps(h.l1TableOffset, h.l1Size * 8, h.refcountTableOffset, h.refcountTableClusters * clusterSize)) {
    throw new Qcow2FormatError("the L1 table overlaps the refcount table");
  }
  if (h.nbSnapshots > 0) table("snapshot table", h.snapshotsOffset, 0, 0);

  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME || h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, buf.length)) {
      throw new Qcow2FormatError("backing file name is too long or lies outside the first cluster");
    }
    h.backingFile = new TextDecoder().decode(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
    if (h.backingFile === "") h.backingFile = null;
  }
  return h;
}

export function overlaps(a: number, alen: number, b: number, blen: number): boolean {
  return alen > 0 && blen > 0 && a < b + blen && b < a + alen;
}
