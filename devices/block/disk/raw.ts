// The raw disk: a raw image file or a host block device behind the Disk interface (disk.ts). One
// fd (opened once, by the acquire phase: acquireRawDisk), positional vectored I/O straight between
// the file and guest memory (the iovecs point into the mapped guest regions), and the space
// operations (flush, discard, write zeroes) with fallbacks for file systems that lack some
// fallocate modes. Each queue is served synchronously (one preadv/pwritev at a time, completed
// inside the call), through an io_uring of its own (many in flight: best with O_DIRECT on a real
// disk; raw_uring.ts), or hybrid (the same queue, but only large reads go to the ring, to run on
// its worker threads; the rest runs inside its call: best on page-cache images), as the
// resource's `aio` says. The rings are set up with the fds, one per queue (uring_queue.ts:
// acquireDiskRings).
import {
  open, preadv, pwritev, fallocate, fdatasync, fstat, ioctl, blockDeviceSize, IovecArray,
  O_RDONLY, O_RDWR, O_DIRECT, O_CLOEXEC, S_IFMT, S_IFREG, S_IFBLK,
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
} from "../../../ffi/io.ts";
import { close, SysError, EINVAL, EIO, EOPNOTSUPP, ENOTTY, ENODEV } from "../../../ffi/libc.ts";
import { mmap, munmap, PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS } from "../../../ffi/mem.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import { log } from "../../../src/log.ts";
import {
  ZERO_UNMAP, ZERO_MAY_FAIL_FAST, ZERO_FUA, SynchronousQueue,
  type Disk, type DiskIdentity, type DiskQueue, type DiskQueueHandlers, type DiskQueueOptions, type DiskRequest, type DiskResource,
} from "./disk.ts";
import { UringRawQueue } from "./raw_uring.ts";
import { acquireDiskRings, DEFAULT_RING_ENTRIES, type RingMode } from "./uring_queue.ts";
import { closeRingHandle, type RingHandle } from "../../../ffi/io_uring.ts";
import { ImageLock, imagePermissions, type ImageLockState } from "./lock.ts";

import { SECTOR_SIZE, IOV_MAX } from "../config.ts";

// <linux/fs.h> block device ioctls.
const BLKSSZGET = 0x1268; // int: logical sector size
const BLKDISCARD = 0x1277; // u64[2]: start, length
const BLKPBSZGET = 0x127b; // unsigned int: physical sector size

/** Zero pages for writing zeroes where fallocate cannot: read-only anonymous memory, page-aligned (O_DIRECT-safe). */
const ZERO_CHUNK = 64 * 1024;

/** How a disk's queues run reads, writes and flushes: sync (inside the call), io_uring (through
 * a ring per queue), or hybrid (large reads through the ring, the rest inside the call). */
export type AioMode = "sync" | RingMode;

/** The acquired raw image: plain data, fds process-wide. */
export interface RawDiskResource extends DiskResource {
  kind: "raw";
  /** The image, opened read-write or read-only, with O_DIRECT when `direct`. */
  fd: number;
  /** The same file without O_DIRECT, for requests whose buffers O_DIRECT refuses (EINVAL:
   * misaligned guest memory); -1 without `direct`. */
  bufferedFd: number;
  direct: boolean;
  aio: AioMode;
  /** With aio io_uring or hybrid: queue i's ring (restricted, enabled; attached by whichever
   * thread serves the queue). Empty for sync (also when io_uring was unavailable: `aio` then says sync). */
  rings: RingHandle[];
  /** The image lock on `fd`'s open file description (lock.ts) as acquire left it. */
  lock: ImageLockState;
}

export interface RawOpenOptions {
  readOnly: boolean;
  direct: boolean;
  aio: AioMode;
  /** Lock the image as QEMU does (false: --no-lock). */
  lock: boolean;
  /** With aio io_uring or hybrid: how many queues (one ring each; default 1) and their size (the rings' SQ entries). */
  queues?: number;
  queueSize?: number;
}

/** Opens `path` (and its buffered twin with `direct`) and locks it; the caller owns the fds
 * (closeRawDiskResource). Throws when another process uses the image (lock.ts). */
export function acquireRawDisk(path: string, o: RawOpenOptions): RawDiskResource {
  const mode = o.readOnly ? O_RDONLY : O_RDWR;
  const fd = open(path, mode | O_CLOEXEC | (o.direct ? O_DIRECT : 0));
  let bufferedFd = -1;
  let lock: ImageLockState = "off";
  try {
    if (o.lock) lock = ImageLock.acquire(fd, path, imagePermissions(o.readOnly)).current;
    if (o.direct) bufferedFd = open(path, mode | O_CLOEXEC);
  } catch (e) {
    close(fd);
    throw e;
  }
  if (lock === "waiting") {
    log.info(`${path}: another of our backends holds this image; this one serves it only once that one's device stopped (a migration destination)`);
  }
  const rings = o.aio !== "sync" ? acquireDiskRings(o.queues ?? 1, o.queueSize ?? DEFAULT_RING_ENTRIES, `block ${path}`) : null;
  const aio = rings === null ? "sync" : o.aio;
  return { kind: "raw", location: path, readOnly: o.readOnly, fd, bufferedFd, direct: o.direct, aio, rings: rings ?? [], lock };
}

export function closeRawDiskResource(r: RawDiskResource): void {
  close(r.fd);
  close(r.bufferedFd);
  r.rings.forEach(closeRingHandle);
}

function isUnsupported(e: unknown): boolean {
  return e instanceof SysError && (e.errno === EOPNOTSUPP || e.errno === ENOTTY || e.errno === ENODEV || e.errno === EINVAL);
}

/** -errno for a thrown error (a SysError's errno; EIO for anything else, such as end of file). */
export function errnoOf(e: unknown): number {
  return e instanceof SysError ? -e.errno : -EIO;
}

export class RawDisk implements Disk {
  readonly path: string;
  readonly fd: number;
  readonly readOnly: boolean;
  readonly direct: boolean;
  readonly aio: AioMode;
  readonly isBlockDevice: boolean;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly physicalBlockSize: number;
  /** Positional I/O on a shared fd: any number of threads at once. */
  readonly multiThread = true;
  readonly description: string;
  readonly dev: number;
  readonly ino: number;

  private readonly bufferedFd: number;
  private punchHoleWorks = true;
  private zeroRangeWorks = true;
  private blkDiscard = true;
  private zeroPage = 0;
  private zeroIov: IovecArray | null = null;
  private closed = false;
  /** The image lock (the owner's instance only: locks belong to the fd, which the owner holds). */
  private readonly lock: ImageLock | null;

  /** `owner`: close() closes the resource's fds (the device thread's instance). */
  constructor(private readonly resource: RawDiskResource, private readonly owner: boolean) {
    const path = resource.location;
    this.path = path;
    this.fd = resource.fd;
    this.bufferedFd = resource.bufferedFd;
    this.readOnly = resource.readOnly;
    this.direct = resource.direct;
    this.aio = resource.aio;
    const st = fstat(this.fd);
    const type = st.mode & S_IFMT;
    if (type !== S_IFREG && type !== S_IFBLK) throw new Error(`${path} is neither a regular file nor a block device`);
    this.isBlockDevice = type === S_IFBLK;
    this.dev = st.dev;
    this.ino = st.ino;
    let physical: number;
    if (this.isBlockDevice) {
      this.size = blockDeviceSize(this.fd);
      const i32 = new Uint8Array(4);
      const v = new DataView(i32.buffer);
      ioctl(this.fd, BLKSSZGET, i32);
      this.logicalBlockSize = v.getUint32(0, true);
      ioctl(this.fd, BLKPBSZGET, i32);
      physical = Math.max(this.logicalBlockSize, v.getUint32(0, true));
    } else {
      this.size = st.size;
      this.logicalBlockSize = SECTOR_SIZE;
      physical = Math.max(SECTOR_SIZE, st.blksize);
    }
    if (this.logicalBlockSize < SECTOR_SIZE || (this.logicalBlockSize & (this.logicalBlockSize - 1)) !== 0) {
      throw new Error(`${path}: logical block size ${this.logicalBlockSize} is not a power of 2 of at least 512`);
    }
    this.physicalBlockSize = (physical & (physical - 1)) === 0 ? physical : this.logicalBlockSize;
    this.lock = owner ? ImageLock.adopt(this.fd, path, imagePermissions(this.readOnly), resource.lock) : null;
    this.description = `${this.isBlockDevice ? "block device" : "file"}${this.direct ? ", O_DIRECT" : ""}, aio ${this.aio}`;
  }

  identity(): DiskIdentity {
    return { location: this.path, size: this.size, dev: this.dev, ino: this.ino };
  }

  currentSize(): number {
    if (!this.isBlockDevice) return fstat(this.fd).size;
    return blockDeviceSize(this.fd);
  }

  attach(loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers): DiskQueue {
    if (this.aio !== "sync") {
      try {
        return new UringRawQueue(this, ringOf(this.resource.rings, options), this.aio, loop, options, handlers);
      } catch (e) {
        log.warn(`${this.path}: io_uring unavailable (${(e as Error).message}); serving this queue synchronously`);
      }
    }
    return new SyncRawQueue(this, options, handlers);
  }

  flushNow(): void {
    if (!this.readOnly) fdatasync(this.fd);
  }

  activate(): void {
    this.lock?.activate();
  }

  suspend(): void {
    this.lock?.suspend();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.zeroPage !== 0) munmap(this.zeroPage, ZERO_CHUNK);
    if (this.owner) closeRawDiskResource(this.resource);
  }

  // ---- synchronous operations, shared by both queue kinds; they return bytes or -errno ----

  /** Moves `total` bytes between the iovecs and the file at `offset` (continuing short transfers). */
  transfer(isWrite: boolean, iov: IovecArray, offset: number, total: number, startFd = this.fd): number {
    let fd = startFd;
    let done = 0;
    while (done < total) {
      let n: number;
      try {
        n = isWrite ? pwritev(fd, iov, offset + done) : preadv(fd, iov, offset + done);
      } catch (e) {
        // O_DIRECT wants buffers, offsets and lengths aligned to the host device; guest memory need
        // not be. Such requests go through the page cache instead (the kernel keeps both coherent).
        if (fd === this.fd && this.bufferedFd >= 0 && e instanceof SysError && e.errno === EINVAL) {
          fd = this.bufferedFd;
          continue;
        }
        return errnoOf(e);
      }
      if (n <= 0) return -EIO; // end of file: never report partial I/O as success
      done += n;
      if (done < total) iov.advance(n); // short transfer: go on from where it stopped
    }
    return total;
  }

  /** Finishes a transfer O_DIRECT refused (EINVAL in an io_uring completion) through the page cache. */
  transferBuffered(isWrite: boolean, iov: IovecArray, offset: number, total: number): number {
    return this.bufferedFd < 0 ? -EINVAL : this.transfer(isWrite, iov, offset, total, this.bufferedFd);
  }

  syncData(): number {
    if (this.readOnly) return 0;
    try {
      fdatasync(this.fd);
      return 0;
    } catch (e) {
      return errnoOf(e);
    }
  }

  discardRange(offset: number, len: number): number {
    try {
      this.discardOrThrow(offset, len);
      return 0;
    } catch (e) {
      return errnoOf(e);
    }
  }

  zeroRange(offset: number, len: number, flags: number): number {
    let r: number;
    try {
      r = this.zeroOrThrow(offset, len, flags);
    } catch (e) {
      return errnoOf(e);
    }
    return r === 0 && (flags & ZERO_FUA) !== 0 ? this.syncData() : r;
  }

  private discardOrThrow(offset: number, len: number): void {
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
    if (this.punchHoleWorks && !this.fallocateIfSupported(FALLOC_FL_PUNCH_HOLE, offset, len)) this.punchHoleWorks = false;
  }

  /** fallocate(mode, keeping the size) over [offset, offset+len): true when done, false when the
   * file (its filesystem, or the device) does not support `mode`; other errors throw. */
  private fallocateIfSupported(mode: number, offset: number, len: number): boolean {
    try {
      fallocate(this.fd, mode | FALLOC_FL_KEEP_SIZE, offset, len);
      return true;
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      return false;
    }
  }

  /** With ZERO_UNMAP, deallocating is allowed (punch hole); without, the range stays allocated
   * (zero range). Falls back to writing zero pages, unless ZERO_MAY_FAIL_FAST. */
  private zeroOrThrow(offset: number, len: number, flags: number): number {
    if (len === 0) return 0;
    if ((flags & ZERO_UNMAP) !== 0 && this.punchHoleWorks) {
      // Punching a hole zeroes on files; on block devices it is a zeroing discard (no fallback).
      if (this.fallocateIfSupported(FALLOC_FL_PUNCH_HOLE, offset, len)) return 0;
      this.punchHoleWorks = false;
    }
    if (this.zeroRangeWorks) {
      if (this.fallocateIfSupported(FALLOC_FL_ZERO_RANGE, offset, len)) return 0;
      this.zeroRangeWorks = false;
    }
    if ((flags & ZERO_MAY_FAIL_FAST) !== 0) return -EOPNOTSUPP;
    return this.writeZeroPages(offset, len);
  }

  private writeZeroPages(offset: number, len: number): number {
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
      const r = this.transfer(true, iov, offset + done, chunk);
      if (r < 0) return r;
      done += chunk;
    }
    return 0;
  }
}

/** The acquired ring of the queue `options` names (queue 0 when it names none). */
export function ringOf(rings: readonly RingHandle[], options: DiskQueueOptions): RingHandle {
  const q = options.queue ?? 0;
  const ring = rings[q];
  if (ring === undefined) throw new Error(`no io_uring was set up for queue ${q} (${rings.length} acquired)`);
  return ring;
}

/** Builds a raw disk from its resource (DiskOpener). */
export function openRawDisk(resource: RawDiskResource, owner: boolean): RawDisk {
  return new RawDisk(resource, owner);
}


/**
 * A queue served synchronously: every operation runs and completes (through `done`) inside its
 * call, so one slot is enough and nothing is ever in flight between calls.
 */
export class SyncRawQueue extends SynchronousQueue {
  constructor(private readonly disk: RawDisk, options: DiskQueueOptions, handlers: DiskQueueHandlers) {
    super(options, handlers);
  }
  read(req: DiskRequest, offset: number, len: number): void {
    this.handlers.done(req, this.disk.transfer(false, req.iov, offset, len));
  }
  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    let r = this.disk.transfer(true, req.iov, offset, len);
    if (fua && r >= 0) {
      const s = this.disk.syncData();
      if (s < 0) r = s;
    }
    this.handlers.done(req, r);
  }
  flush(req: DiskRequest): void {
    this.handlers.done(req, this.disk.syncData());
  }
  discard(req: DiskRequest, offset: number, len: number): void {
    this.handlers.done(req, this.disk.discardRange(offset, len));
  }
  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    this.handlers.done(req, this.disk.zeroRange(offset, len, flags));
  }
}

function setU64(v: DataView, o: number, x: number): void {
  v.setUint32(o, x % 0x1_0000_0000, true);
  v.setUint32(o + 4, Math.floor(x / 0x1_0000_0000), true);
}
