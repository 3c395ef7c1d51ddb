// virtio-blk constants (virtio 1.2 §5.2) and the device's config space bytes.
import { featureBit } from "../../src/device.ts";

// ---- feature bits ----
/** virtio 1.2 §5.2.3 (VIRTIO_BLK_F_*). */
export const VIRTIO_BLK_F = {
  SIZE_MAX: featureBit(1),
  SEG_MAX: featureBit(2),
  RO: featureBit(5),
  BLK_SIZE: featureBit(6),
  FLUSH: featureBit(9),
  TOPOLOGY: featureBit(10),
  CONFIG_WCE: featureBit(11),
  MQ: featureBit(12),
  DISCARD: featureBit(13),
  WRITE_ZEROES: featureBit(14),
} as const;

// ---- request types and status values ----
/** The request header's type (VIRTIO_BLK_T_*). */
export const VIRTIO_BLK_T = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  DISCARD: 11,
  WRITE_ZEROES: 13,
} as const;

/** The status byte the device writes last (VIRTIO_BLK_S_*). */
export const VIRTIO_BLK_S = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** struct virtio_blk_outhdr: type u32, reserved u32, sector u64. */
export const REQUEST_HEADER_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: sector u64, num_sectors u32, flags u32. */
export const DISCARD_SEGMENT_SIZE = 16;
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
export const VIRTIO_BLK_ID_BYTES = 20;
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 512;

// ---- limits this device offers ----
/** Linux's IOV_MAX: preadv/pwritev take at most this many iovecs. */
export const IOV_MAX = 1024;
/** Largest data transfer of one request; bigger ones fail with IOERR (guests default to 1.25 MiB). */
export const MAX_REQUEST_BYTES = 1 << 30;
/** max_discard_sectors / max_write_zeroes_sectors: 2 GiB per segment (punching holes is cheap). */
export const MAX_DISCARD_SECTORS = 1 << 22;
/** max_discard_seg / max_write_zeroes_seg. */
export const MAX_DISCARD_SEGMENTS = 32;

// ---- config space layout ----
/** Byte offsets of struct virtio_blk_config's fields (little-endian). */
export const CFG = {
  CAPACITY: 0, // u64, in 512-byte sectors
  SIZE_MAX: 8, // u32
  SEG_MAX: 12, // u32
  GEOMETRY: 16, // cylinders u16, heads u8, sectors u8
  BLK_SIZE: 20, // u32
  PHYSICAL_BLOCK_EXP: 24, // u8
  ALIGNMENT_OFFSET: 25, // u8
  MIN_IO_SIZE: 26, // u16, in blocks
  OPT_IO_SIZE: 28, // u32, in blocks
  WRITEBACK: 32, // u8
  NUM_QUEUES: 34, // u16
  MAX_DISCARD_SECTORS: 36, // u32
  MAX_DISCARD_SEG: 40, // u32
  DISCARD_SECTOR_ALIGNMENT: 44, // u32, in 512-byte sectors
  MAX_WRITE_ZEROES_SECTORS: 48, // u32
  MAX_WRITE_ZEROES_SEG: 52, // u32
  WRITE_ZEROES_MAY_UNMAP: 56, // u8
} as const;

/**
 * The whole struct as Linux defines it today (secure erase and zoned fields included, left zero
 * since those features are not offered), so a front-end reading sizeof(virtio_blk_config) is
 * answered. QEMU's vhost-user-blk reads up to write_zeroes_may_unmap (57 bytes).
 */
export const CONFIG_SIZE = 96;

/** What the config space describes; everything but `writeback` is fixed for the device's life. */
export interface BlockGeometry {
  capacitySectors: number;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  minIoSize: number;
  optIoSize: number;
  numQueues: number;
  discard: boolean;
  writeZeroes: boolean;
  writeZeroesMayUnmap: boolean;
}

/** Builds the config space bytes; `writeback` is the current cache mode (1 writeback, 0 writethrough). */
export function buildConfig(g: BlockGeometry, writeback: number): Uint8Array {
  const b = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(CFG.CAPACITY, g.capacitySectors % 0x1_0000_0000, true);
  v.setUint32(CFG.CAPACITY + 4, Math.floor(g.capacitySectors / 0x1_0000_0000), true);
  v.setUint32(CFG.SEG_MAX, g.segMax, true);
  v.setUint32(CFG.BLK_SIZE, g.blkSize, true);
  v.setUint8(CFG.PHYSICAL_BLOCK_EXP, g.physicalBlockExp);
  v.setUint8(CFG.ALIGNMENT_OFFSET, 0);
  v.setUint16(CFG.MIN_IO_SIZE, g.minIoSize, true);
  v.setUint32(CFG.OPT_IO_SIZE, g.optIoSize, true);
  v.setUint8(CFG.WRITEBACK, writeback);
  v.setUint16(CFG.NUM_QUEUES, g.numQueues, true);
  const alignment = g.blkSize >> SECTOR_SHIFT;
  if (g.discard) {
    v.setUint32(CFG.MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
    v.setUint32(CFG.MAX_DISCARD_SEG, MAX_DISCARD_SEGMENTS, true);
    v.setUint32(CFG.DISCARD_SECTOR_ALIGNMENT, alignment, true);
  }
  if (g.writeZeroes) {
    v.setUint32(CFG.MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
    v.setUint32(CFG.MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEGMENTS, true);
    v.setUint8(CFG.WRITE_ZEROES_MAY_UNMAP, g.writeZeroesMayUnmap ? 1 : 0);
  }
  return b;
}
