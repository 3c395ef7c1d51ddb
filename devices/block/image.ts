// The backing store of a block device: a raw image file or a host block device. One fd, positional
// vectored I/O straight between the file and guest memory (the iovecs point into the mapped guest
// regions), and the space operations (flush, discard, write zeroes) with fallbacks for file systems
// that lack some fallocate modes. Errors are thrown as SysError; the queue processor turns them
// into VIRTIO_BLK_S_IOERR.
import {
  open, preadv, pwritev, fallocate, fdatasync, fstat, ioctl, IovecArray,
  O_RDONLY, O_RDWR, O_DIRECT, S_IFMT, S_IFREG, S_IFBLK,
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
} from "../../ffi/io.ts";
import { close, SysError, EINVAL, EOPNOTSUPP, ENOTTY, ENODEV } from "../../ffi/libc.ts";
import { mmap, munmap, PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS } from "../../ffi/mem.ts";
import { IOV_MAX, SECTOR_SIZE } from "./config.ts";

// <linux/fs.h> block device ioctls.
const BLKSSZGET = 0x1268; // int: logical sector size
const BLKDISCARD = 0x1277; // u64[2]: start, length
const BLKPBSZGET = 0x127b; // unsigned int: physical sector size
const BLKGETSIZE64 = 0x80081272; // u64: size in bytes


/** Zero pages for writing zeroes where fallocate cannot: read-only anonymous memory, page-aligned (O_DIRECT-safe). */
const ZERO_CHUNK = 64 * 1024;

/** What identifies an image across save and restore, independent of its contents. */
export interface ImageIdentity {
  /** Size in bytes. */
  size: number;
  dev: number;
  ino: number;
}

export interface ImageOpenOptions {
  readOnly: boolean;
  direct: boolean;
}

function isUnsupported(e: unknown): boolean {
  return e instanceof SysError && (e.errno === EOPNOTSUPP || e.errno === ENOTTY || e.errno === ENODEV || e.errno === EINVAL);
}

export class BlockImage {
  readonly path: string;
  readonly fd: number;
  readonly readOnly: boolean;
  readonly direct: boolean;
  readonly isBlockDevice: boolean;
  /** Size in bytes (a trailing partial sector is not addressable). */
  readonly size: number;
  /** Logical block size: 512 for files, the device's for block devices. */
  readonly blkSize: number;
  /** Physical (or file system) block size, a hint for the guest's alignment. */
  readonly physicalBlockSize: number;
  readonly dev: number;
  readonly ino: number;

  /** Without O_DIRECT, for requests whose buffers O_DIRECT refuses (EINVAL: misaligned guest memory). */
  private bufferedFd = -1;
  private punchHole = true;
  private zeroRange = true;
  private blkDiscard = true;
  private zeroPage = 0;
  private zeroIov: IovecArray | null = null;
  private closed = false;

  private constructor(path: string, fd: number, opts: ImageOpenOptions) {
    this.path = path;
    this.fd = fd;
    this.readOnly = opts.readOnly;
    this.direct = opts.direct;
    const st = fstat(fd);
    const type = st.mode & S_IFMT;
    if (type !== S_IFREG && type !== S_IFBLK) throw new Error(`${path} is neither a regular file nor a block device`);
    this.isBlockDevice = type === S_IFBLK;
    this.dev = st.dev;
    this.ino = st.ino;
    if (this.isBlockDevice) {
      const u64 = new Uint8Array(8);
      ioctl(fd, BLKGETSIZE64, u64);
      const v = new DataView(u64.buffer);
      this.size = v.getUint32(0, true) + v.getUint32(4, true) * 0x1_0000_0000;
      const i32 = new Uint8Array(4);
      ioctl(fd, BLKSSZGET, i32);
      this.blkSize = new DataView(i32.buffer).getUint32(0, true);
      ioctl(fd, BLKPBSZGET, i32);
      this.physicalBlockSize = Math.max(this.blkSize, new DataView(i32.buffer).getUint32(0, true));
    } else {
      this.size = st.size;
      this.blkSize = SECTOR_SIZE;
      this.physicalBlockSize = Math.max(SECTOR_SIZE, st.blksize);
    }
    if (this.blkSize < SECTOR_SIZE || (this.blkSize & (this.blkSize - 1)) !== 0) {
      throw new Error(`${path}: logical block size ${this.blkSize} is not a power of 2 of at least 512`);
    }
    if ((this.physicalBlockSize & (this.physicalBlockSize - 1)) !== 0) this.physicalBlockSize = this.blkSize;
  }

  /** Opens `path` read-write (or read-only) and reads its geometry. */
  static open(path: string, opts: ImageOpenOptions): BlockImage {
    const fd = open(path, (opts.readOnly ? O_RDONLY : O_RDWR) | (opts.direct ? O_DIRECT : 0));
    try {
      return new BlockImage(path, fd, opts);
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** Number of addressable 512-byte sectors (a multiple of blkSize / 512). */
  get capacitySectors(): number {
    return Math.floor(this.size / this.blkSize) * (this.blkSize / SECTOR_SIZE);
  }

  identity(): ImageIdentity {
    return { size: this.size, dev: this.dev, ino: this.ino };
  }

  /** The image's current size as the host sees it now (to notice a resize under our feet). */
  currentSize(): number {
    if (!this.isBlockDevice) return fstat(this.fd).size;
    const u64 = new Uint8Array(8);
    ioctl(this.fd, BLKGETSIZE64, u64);
    const v = new DataView(u64.buffer);
    return v.getUint32(0, true) + v.getUint32(4, true) * 0x1_0000_0000;
  }

  // ---- data ----

  /** Reads `total` bytes at `offset` into the iovecs; throws on error or end of file. */
  read(iov: IovecArray, offset: number, total: number): void {
    this.transfer(false, iov, offset, total);
  }

  /** Writes `total` bytes from the iovecs at `offset`; throws on error. */
  write(iov: IovecArray, offset: number, total: number): void {
    this.transfer(true, iov, offset, total);
  }

  /**
   * Finishes a transfer O_DIRECT refused (EINVAL: misaligned guest memory) through the page cache,
   * for the asynchronous engine, which meets that EINVAL in a completion.
   */
  transferBuffered(isWrite: boolean, iov: IovecArray, offset: number, total: number): void {
    this.transfer(isWrite, iov, offset, total, this.buffered());
  }

  private transfer(isWrite: boolean, iov: IovecArray, offset: number, total: number, startFd = this.fd): void {
    let fd = startFd;
    let done = 0;
    while (done < total) {
      let n: number;
      try {
        n = isWrite ? pwritev(fd, iov, offset + done) : preadv(fd, iov, offset + done);
      } catch (e) {
        // O_DIRECT wants buffers, offsets and lengths aligned to the host device; guest memory need
        // not be. Such requests go through the page cache instead (the kernel keeps both coherent).
        if (this.direct && fd === this.fd && e instanceof SysError && e.errno === EINVAL) {
          fd = this.buffered();
          continue;
        }
        throw e;
      }
      if (n <= 0) throw new Error(`${isWrite ? "pwritev" : "preadv"} at ${offset + done}: ${n === 0 ? "end of file" : `returned ${n}`}`);
      done += n;
      if (done < total) advance(iov, n); // short transfer: go on from where it stopped
    }
  }

  private buffered(): number {
    if (this.bufferedFd < 0) this.bufferedFd = open(this.path, this.readOnly ? O_RDONLY : O_RDWR);
    return this.bufferedFd;
  }

  // ---- space operations ----

  /** Makes completed writes stable (fdatasync). */
  flush(): void {
    if (this.readOnly) return;
    fdatasync(this.fd);
  }

  /** Deallocates a byte range if the host can; otherwise does nothing (discard is advisory). */
  discard(offset: number, len: number): void {
    if (len === 0) return;
    if (this.isBlockDevice) {
      if (!this.blkDiscard) return;
      const range = new Uint8Array(16);
      const v = new DataView(range.buffer);
      setU64(v, 0, offset);
      setU64(v, 8, len);
      try {
        ioctl(this.fd, BLKDISCARD, range);
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        this.blkDiscard = false;
      }
      return;
    }
    if (!this.punchHole) return;
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.punchHole = false;
    }
  }

  /**
   * Makes a byte range read back as zeroes. With `unmap`, deallocating it is allowed (punch hole);
   * without, the range stays allocated (zero range). Falls back to writing zero pages.
   */
  writeZeroes(offset: number, len: number, unmap: boolean): void {
    if (len === 0) return;
    if (unmap && this.punchHole) {
      try {
        // Punching a hole zeroes on files; on block devices it is a zeroing discard (no fallback).
        fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
        return;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        this.punchHole = false;
      }
    }
    if (this.zeroRange) {
      try {
        fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
        return;
      } catch (e) {
        if (!isUnsupported(e)) throw e;
        this.zeroRange = false;
      }
    }
    this.writeZeroPages(offset, len);
  }

  private writeZeroPages(offset: number, len: number): void {
    if (this.zeroIov === null) {
      this.zeroPage = mmap(ZERO_CHUNK, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      this.zeroIov = new IovecArray(IOV_MAX);
    }
    const iov = this.zeroIov;
    let done = 0;
    while (done < len) {
      iov.clear();
      let chunk = 0;
      while (chunk < len - done && iov.count < IOV_MAX) {
        const n = Math.min(ZERO_CHUNK, len - done - chunk);
        iov.push(this.zeroPage, n);
        chunk += n;
      }
      this.write(iov, offset + done, chunk);
      done += chunk;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    close(this.fd);
    if (this.bufferedFd >= 0) close(this.bufferedFd);
    if (this.zeroPage !== 0) munmap(this.zeroPage, ZERO_CHUNK);
  }
}

function setU64(v: DataView, o: number, x: number): void {
  v.setUint32(o, x % 0x1_0000_0000, true);
  v.setUint32(o + 4, Math.floor(x / 0x1_0000_0000), true);
}

/** Drops the first `n` bytes from an iovec array (after a short preadv/pwritev). Rare path. */
export function advance(iov: IovecArray, n: number): void {
  const v = new DataView(iov.bytes.buffer, iov.bytes.byteOffset, iov.bytes.byteLength);
  const get = (o: number) => v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
  const entries: [number, number][] = [];
  for (let i = 0; i < iov.count; i++) entries.push([get(16 * i), get(16 * i + 8)]);
  iov.clear();
  for (const [base, len] of entries) {
    if (n >= len) {
      n -= len;
      continue;
    }
    iov.push(base + n, len - n);
    n = 0;
  }
}
