// A qcow2 image as a Disk (../disk.ts). The acquire phase opens the image and its whole backing
// chain (fds, as plain data) and locks them as QEMU does (the image as a guest disk, the backing
// files for reading); the device thread builds the image from them. The metadata (L1, the L2
// cache, refcounts) lives in this one instance, so the disk is not multi-thread: the device serves
// every queue from one thread. With --aio sync, requests run synchronously inside their call and
// complete through `done` before it returns (one slot per queue, nothing in flight between calls);
// with io_uring or hybrid, some data transfers go through an io_uring per queue (uring_queue.ts).
//
// Until activate() (the first ring starts) the image is only read, never written: a migration
// destination opens it while the source still serves it. activate() takes the locks and reads the
// metadata afresh (repairing a dirty image then); suspend() writes all metadata out and lets go,
// so another of our backends may take over, and the next activate() reads everything again.
import { IovecArray } from "../../../../ffi/io.ts";
import { close, SysError, EINVAL, EIO, EOPNOTSUPP } from "../../../../ffi/libc.ts";
import type { EventLoop } from "../../../../src/event_loop.ts";
import { log } from "../../../../src/log.ts";
import { RateLimitedLog } from "../../../../src/guest_errors.ts";
import {
  ZERO_UNMAP, ZERO_MAY_FAIL_FAST, ZERO_FUA, SynchronousQueue,
  type Disk, type DiskIdentity, type DiskQueue, type DiskQueueHandlers, type DiskQueueOptions, type DiskRequest, type DiskResource,
} from "../disk.ts";
import { ImageFile } from "./file.ts";
import { zeroIov } from "../iov_memory.ts";
import { Qcow2UringQueue } from "./uring_queue.ts";
import { ringOf, type AioMode } from "../raw.ts";
import { acquireDiskRings, DEFAULT_RING_ENTRIES } from "../uring_queue.ts";
import { closeRingHandle, type RingHandle } from "../../../../ffi/io_uring.ts";
import { openChain, buildImage, probeFormat, type DiskFormat, type ChainLink } from "./open.ts";
import { ImageLock, imagePermissions, type ImageLockState } from "../lock.ts";
import type { Qcow2Image } from "./qcow2.ts";

export interface Qcow2DiskResource extends DiskResource {
  kind: "qcow2";
  /** The image and its backing chain, top first (the top read-write unless readOnly, the rest read-only). */
  chain: { path: string; fd: number; format: DiskFormat; lock: ImageLockState }[];
  /** io_uring: reads and in-place writes of data clusters go through an io_uring per queue (many in
   * flight); hybrid: only large reads of data clusters do (uring_queue.ts); sync: none. */
  aio: AioMode;
  /** With aio io_uring or hybrid: queue i's ring (restricted, enabled), set up here; empty for sync. */
  rings: RingHandle[];
}

/** Whether the file at `path` holds a qcow2 image (for --format auto). */
export function isQcow2File(path: string): boolean {
  const f = ImageFile.open(path, true);
  try {
    return probeFormat(f) === "qcow2";
  } finally {
    f.close();
  }
}

/**
 * Opens the image and its backing chain, and reads all their headers now, so a bad image or a
 * missing backing file is an error at startup. Throws a message saying what is wrong.
 */
export function acquireQcow2Disk(path: string, o: { readOnly: boolean; lock: boolean; aio?: AioMode; queues?: number; queueSize?: number }): Qcow2DiskResource {
  const top = ImageFile.open(path, o.readOnly);
  let links: ChainLink[] = [{ file: top, format: "qcow2" }];
  const locks: ImageLockState[] = [];
  try {
    if (o.lock) locks.push(ImageLock.acquire(top.fd, path, imagePermissions(o.readOnly)).current);
    links = openChain(top);
    for (const l of links.slice(1)) locks.push(o.lock ? ImageLock.acquire(l.file.fd, l.file.path, imagePermissions(true)).current : "off");
  } catch (e) {
    for (const l of links) l.file.close();
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  const resource: Qcow2DiskResource = {
    kind: "qcow2",
    location: path,
    readOnly: o.readOnly,
    chain: links.map((l, i) => ({ path: l.file.path, fd: l.file.fd, format: l.format, lock: locks[i] ?? "off" })),
    aio: "sync",
    rings: [],
  };
  try {
    // Every header of the chain parsed and checked (read-only: nothing is written yet).
    buildImage(fromResource(resource, true), true);
  } catch (e) {
    closeQcow2DiskResource(resource);
    throw new Error(`${path}: ${(e as Error).message}`);
  }
  if (o.aio !== undefined && o.aio !== "sync") {
    const rings = acquireDiskRings(o.queues ?? 1, o.queueSize ?? DEFAULT_RING_ENTRIES, `block ${path}`);
    if (rings !== null) {
      resource.aio = o.aio;
      resource.rings = rings;
    }
  }
  if (resource.chain[0]!.lock === "waiting") {
    log.info(`${path}: another of our backends holds this image; this one serves it only once that one's device stopped (a migration destination)`);
  }
  return resource;
}

export function closeQcow2DiskResource(r: Qcow2DiskResource): void {
  for (const l of r.chain) close(l.fd);
  r.rings.forEach(closeRingHandle);
}

/** ImageFiles over the resource's fds, which they do not own. */
function fromResource(r: Qcow2DiskResource, readOnly: boolean): ChainLink[] {
  return r.chain.map((l, i) => ({ file: new ImageFile(l.path, l.fd, i === 0 ? readOnly : true, false), format: l.format }));
}

/** Errors of a request as -errno; image problems are logged (rate-limited), the guest sees EIO. */
function errnoOf(e: unknown): number {
  if (e instanceof SysError) return -e.errno;
  if (e instanceof RangeError) return -EINVAL;
  return -EIO;
}


export class Qcow2Disk implements Disk {
  /** Read-only until activate(); then the image as served. */
  private image: Qcow2Image;
  private active = false;
  private readonly locks: ImageLock[];
  private readonly uringQueues = new Set<Qcow2UringQueue>();
  readonly size: number;
  readonly logicalBlockSize = 512;
  readonly physicalBlockSize: number;
  readonly readOnly: boolean;
  readonly multiThread = false;
  readonly description: string;
  /** Image problems (a corrupt table, a failing file): logged, rate-limited. */
  private readonly imageErrors: RateLimitedLog;

  constructor(private readonly resource: Qcow2DiskResource, private readonly owner: boolean) {
    this.imageErrors = new RateLimitedLog(`qcow2 ${resource.location}`, "warn", "image errors");
    this.readOnly = resource.readOnly;
    this.image = buildImage(fromResource(resource, true), true);
    this.locks = resource.chain.map((l, i) => ImageLock.adopt(l.fd, l.path, imagePermissions(i === 0 ? resource.readOnly : true), l.lock));
    const h = this.image.header;
    this.size = Math.floor(this.image.size / 512) * 512;
    this.physicalBlockSize = Math.min(h.clusterSize, 4096);
    const depth = resource.chain.length - 1;
    this.description = `qcow2 v${h.version}, ${h.clusterSize / 1024} KiB clusters, ${1 << h.refcountOrder}-bit refcounts` +
      (depth > 0 ? `, backing chain of ${depth} (${resource.chain.slice(1).map((l) => l.path).join(" <- ")})` : "") +
      `, aio ${resource.aio}`;
  }

  identity(): DiskIdentity {
    const f = this.image.file;
    return { location: this.resource.location, size: this.size, dev: f.dev, ino: f.ino };
  }

  /** The virtual size the header says now (a resize by another program shows here). */
  currentSize(): number {
    const b = new Uint8Array(8);
    this.image.file.readAt(b, 24);
    return Number(new DataView(b.buffer).getBigUint64(0));
  }

  attach(loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers): DiskQueue {
    const aio = this.resource.aio;
    if (aio !== "sync") {
      try {
        const q = new Qcow2UringQueue(this, ringOf(this.resource.rings, options), aio, loop, options, handlers);
        this.uringQueues.add(q);
        return q;
      } catch (e) {
        log.warn(`qcow2 ${this.resource.location}: io_uring unavailable (${(e as Error).message}); serving the queue synchronously`);
      }
    }
    return new Qcow2Queue(this, options, handlers);
  }

  /** The image file's fd (data transfers of the io_uring queues). */
  get fd(): number {
    return this.resource.chain[0]!.fd;
  }

  /** Where [offset, offset + len) is one contiguous run of data clusters on the host, or -1
   * (then the request runs synchronously; an error shows there). */
  hostRun(offset: number, len: number, forWrite: boolean): number {
    try {
      if (!this.active) this.activate();
      return this.image.hostRun(offset, len, forWrite);
    } catch {
      return -1;
    }
  }

  /** A flush: frees clusters only when no transfer of any queue is in flight (one started before an
   * L2 update could otherwise land in a freed and reused cluster). */
  flushImage(img: Qcow2Image): void {
    let transfers = 0;
    for (const q of this.uringQueues) transfers += q.transfersInFlight;
    img.flush(transfers === 0);
  }

  zeroes(offset: number, len: number, flags: number): number {
    return this.run(0, (img) => {
      if ((flags & ZERO_MAY_FAIL_FAST) !== 0 && !img.zeroesAreFast(offset, len)) throw new SysError("write zeroes", EOPNOTSUPP);
      img.writeZeroes(offset, len, (flags & ZERO_UNMAP) !== 0);
      if (flags & ZERO_FUA) this.flushImage(img);
    });
  }

  /** After a short read at the end of the file: the rest of the request reads as zeroes. */
  zeroRest(iov: IovecArray, n: number): number {
    zeroIov(iov, 0, n);
    return 0;
  }

  detach(q: Qcow2UringQueue): void {
    this.uringQueues.delete(q);
  }

  flushNow(): void {
    if (this.active) this.flushImage(this.image);
  }

  /** Before serving: takes the locks (throws while another process has the image), then reads the
   * metadata afresh (another backend may have written the image since we last looked). */
  activate(): void {
    for (const l of this.locks) l.activate();
    if (this.active) return;
    const fresh = buildImage(fromResource(this.resource, this.readOnly), this.readOnly);
    this.image.close(); // our ImageFiles do not own the fds
    this.image = fresh;
    this.active = true;
  }

  /** Every ring stopped: all metadata goes to disk, then another backend may take the image over. */
  suspend(): void {
    if (this.active) {
      try {
        this.image.close(); // flushes, and gives back the clusters reserved ahead
      } catch (e) {
        // Table updates are in the file already; what failed is at worst a leak.
        log.warn(`qcow2 ${this.resource.location}: flush on suspend failed: ${(e as Error).message}`);
      }
      this.image = buildImage(fromResource(this.resource, true), true);
      this.active = false;
    }
    for (const l of this.locks) l.suspend();
  }

  /** Runs one operation: its result (bytes, or 0) or -errno. */
  run(len: number, fn: (image: Qcow2Image) => void): number {
    try {
      if (!this.active) this.activate();
      fn(this.image);
      return len;
    } catch (e) {
      const r = errnoOf(e);
      if (r === -EIO) this.imageErrors.report((e as Error).message);
      return r;
    }
  }

  close(): void {
    this.image.close();
    if (this.owner) closeQcow2DiskResource(this.resource);
  }
}

export function openQcow2Disk(resource: Qcow2DiskResource, owner: boolean): Qcow2Disk {
  return new Qcow2Disk(resource, owner);
}


/** A queue served synchronously: each operation completes (through `done`) inside its call. */
class Qcow2Queue extends SynchronousQueue {
  constructor(private readonly disk: Qcow2Disk, options: DiskQueueOptions, handlers: DiskQueueHandlers) {
    super(options, handlers);
  }
  read(req: DiskRequest, offset: number, len: number): void {
    this.handlers.done(req, this.disk.run(len, (img) => img.readv(req.iov, offset, len)));
  }
  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    this.handlers.done(req, this.disk.run(len, (img) => {
      img.writev(req.iov, offset, len);
      if (fua) this.disk.flushImage(img);
    }));
  }
  flush(req: DiskRequest): void {
    this.handlers.done(req, this.disk.run(0, (img) => this.disk.flushImage(img)));
  }
  discard(req: DiskRequest, offset: number, len: number): void {
    this.handlers.done(req, this.disk.run(0, (img) => img.discard(offset, len)));
  }
  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    this.handlers.done(req, this.disk.zeroes(offset, len, flags));
  }
}
