// virtio-blk constants (virtio 1.2 §5.2) and the device's config space bytes.

// ---- feature bits ----
export const VIRTIO_BLK_F_SIZE_MAX = 1n << 1n;
export const VIRTIO_BLK_F_SEG_MAX = 1n << 2n;
export const VIRTIO_BLK_F_RO = 1n << 5n;
export const VIRTIO_BLK_F_BLK_SIZE = 1n << 6n;
export const VIRTIO_BLK_F_FLUSH = 1n << 9n;
export const VIRTIO_BLK_F_TOPOLOGY = 1n << 10n;
export const VIRTIO_BLK_F_CONFIG_WCE = 1n << 11n;
export const VIRTIO_BLK_F_MQ = 1n << 12n;
export const VIRTIO_BLK_F_DISCARD = 1n << 13n;
export const VIRTIO_BLK_F_WRITE_ZEROES = 1n << 14n;

// ---- request types and status values ----
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

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

// ---- config space layout (struct virtio_blk_config, little-endian) ----
export const CFG_CAPACITY = 0; // u64, in 512-byte sectors
export const CFG_SIZE_MAX = 8; // u32
export const CFG_SEG_MAX = 12; // u32
export const CFG_GEOMETRY = 16; // cylinders u16, heads u8, sectors u8
export const CFG_BLK_SIZE = 20; // u32
export const CFG_PHYSICAL_BLOCK_EXP = 24; // u8
export const CFG_ALIGNMENT_OFFSET = 25; // u8
export const CFG_MIN_IO_SIZE = 26; // u16, in blocks
export const CFG_OPT_IO_SIZE = 28; // u32, in blocks
export const CFG_WRITEBACK = 32; // u8
export const CFG_NUM_QUEUES = 34; // u16
export const CFG_MAX_DISCARD_SECTORS = 36; // u32
export const CFG_MAX_DISCARD_SEG = 40; // u32
export const CFG_DISCARD_SECTOR_ALIGNMENT = 44; // u32, in 512-byte sectors
export const CFG_MAX_WRITE_ZEROES_SECTORS = 48; // u32
export const CFG_MAX_WRITE_ZEROES_SEG = 52; // u32
export const CFG_WRITE_ZEROES_MAY_UNMAP = 56; // u8
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
  v.setUint32(CFG_CAPACITY, g.capacitySectors % 0x1_0000_0000, true);
  v.setUint32(CFG_CAPACITY + 4, Math.floor(g.capacitySectors / 0x1_0000_0000), true);
  v.setUint32(CFG_SEG_MAX, g.segMax, true);
  v.setUint32(CFG_BLK_SIZE, g.blkSize, true);
  v.setUint8(CFG_PHYSICAL_BLOCK_EXP, g.physicalBlockExp);
  v.setUint8(CFG_ALIGNMENT_OFFSET, 0);
  v.setUint16(CFG_MIN_IO_SIZE, g.minIoSize, true);
  v.setUint32(CFG_OPT_IO_SIZE, g.optIoSize, true);
  v.setUint8(CFG_WRITEBACK, writeback);
  v.setUint16(CFG_NUM_QUEUES, g.numQueues, true);
  const alignment = g.blkSize >> SECTOR_SHIFT;
  if (g.discard) {
    v.setUint32(CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
    v.setUint32(CFG_MAX_DISCARD_SEG, MAX_DISCARD_SEGMENTS, true);
    v.setUint32(CFG_DISCARD_SECTOR_ALIGNMENT, alignment, true);
  }
  if (g.writeZeroes) {
    v.setUint32(CFG_MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
    v.setUint32(CFG_MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEGMENTS, true);
    v.setUint8(CFG_WRITE_ZEROES_MAY_UNMAP, g.writeZeroesMayUnmap ? 1 : 0);
  }
  return b;
}
