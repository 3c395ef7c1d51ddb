// The disk layer of the block device: what a virtio-blk queue needs from whatever stores the data
// (a raw file or block device today; qcow2, NBD and RBD next). crosvm's `AsyncDisk` is the model:
// asynchronous operations on guest-memory iovecs at byte offsets, completed later, plus the
// geometry and identity the device shows the guest and stores in snapshots.
//
// Two levels:
// - `Disk`: one opened image in one thread (geometry, identity, close). Built from plain data
//   that the acquire phase produced (fd numbers, paths: see the implementations' resources), so a
//   queue thread builds its own `Disk` from the same resource without opening anything.
// - `DiskQueue`: the I/O channel of one virtqueue on one event loop (`Disk.attach`). Requests go
//   through reusable `DiskRequest` slots (at most `depth` in flight), so the hot path allocates
//   nothing: the caller fills the slot's iovecs, starts one operation on it, and gets the slot back
//   in `done(req, result)`. The caller keeps its own per-request state in arrays indexed by
//   `req.id`.
//
// Completions: `done` may run before the operation's method returns (a synchronous implementation,
// or an error found at once), from `submit()`, or later from the event loop (an io_uring's eventfd,
// a socket, an eventfd a library signals); after completions that came from the loop, `batchDone`
// runs once, so the caller publishes them together. Results are bytes transferred (the full length:
// a disk never reports partial I/O as success) or -errno.
//
// What fits behind it: a format with its own metadata (qcow2) runs several host I/Os per request
// and completes the request once; a network client (NBD, RBD) registers its socket or eventfd on
// the loop in `attach` and completes requests as replies arrive. Flush ordering: a flush covers at
// least every write that completed before the flush was started.
import { IovecArray } from "../../../ffi/io.ts";
import type { EventLoop } from "../../../src/event_loop.ts";

/** What identifies the backing store across save and restore, independent of its contents and of
 * the path it was reached by. Plain data (it goes into the snapshot). */
export interface DiskIdentity {
  /** Where it is, for messages: a path, a URI, pool/image. */
  location: string;
  /** Size in bytes when opened. */
  size: number;
  /** Two numbers naming the store: a file's st_dev and st_ino; a network disk picks a stable pair
   * (e.g. dev 0 and a hash of its canonical URI or pool/image name). */
  dev: number;
  ino: number;
}

/** FNV-1a, 48 bits (a safe integer): a network disk's identity `ino` from its canonical name. */
export function hash48(s: string): number {
  let h = 0xcbf29ce484222325n;
  for (const b of new TextEncoder().encode(s)) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return Number(h & 0xffffffffffffn);
}

/** writeZeroes flags. */
/** The range may be deallocated (punched, trimmed) as long as it reads back as zeroes. */
export const ZERO_UNMAP = 1;
/** Fail with -EOPNOTSUPP rather than fall back to writing zero buffers (QEMU's BDRV_REQ_NO_FALLBACK). */
export const ZERO_MAY_FAIL_FAST = 2;
/** The zeroes are durable once the request completes (as a write with FUA). */
export const ZERO_FUA = 4;

/** One in-flight operation's slot. Implementations extend it with their own progress fields. */
export interface DiskRequest {
  /** 0 .. depth-1, stable for the life of the DiskQueue: index the caller's own per-request state with it. */
  readonly id: number;
  /** The data segments of a read or write (guest memory): the caller clears and fills it before
   * starting the operation; the disk may consume it (advance past a short transfer). At most
   * `segMax` entries. */
  readonly iov: IovecArray;
}

export interface DiskQueueHandlers {
  /** One finished operation: `result` is the bytes transferred (reads and writes: the full
   * length), 0 for the others, or -errno. The slot is free again once this returns, unless this
   * started another operation on the same `req` (a request made of several steps, such as the
   * segments of a discard), which keeps it in flight. */
  done(req: DiskRequest, result: number): void;
  /** After one or more `done` calls that came from the event loop (not from inside an operation's
   * method or `submit`): publish them. */
  batchDone(): void;
}

export interface DiskQueueOptions {
  /** Most operations in flight at once (the virtqueue's size). */
  depth: number;
  /** Most iovecs per read or write. */
  segMax: number;
  /** The virtqueue's index: picks what the acquire phase set up for it (an io_uring). Default 0. */
  queue?: number;
}

/** The I/O channel of one queue on one loop. Operations take `next()`'s slot (or, from inside
 * `done`, the slot being completed) and complete through the handlers given to `attach`. */
export interface DiskQueue {
  /** The slot the next operation will use, or null while `depth` operations are in flight (the
   * caller stops taking requests until a completion frees one). */
  next(): DiskRequest | null;
  /** Reads `len` bytes at byte `offset` into `req.iov`. */
  read(req: DiskRequest, offset: number, len: number): void;
  /** Writes `len` bytes from `req.iov` at `offset`; `fua`: durable before it completes. */
  write(req: DiskRequest, offset: number, len: number, fua: boolean): void;
  /** Makes completed writes durable. */
  flush(req: DiskRequest): void;
  /** Deallocates a range if the store can (advisory: may do nothing and succeed). */
  discard(req: DiskRequest, offset: number, len: number): void;
  /** Makes a range read back as zeroes (flags: ZERO_UNMAP, ZERO_MAY_FAIL_FAST, ZERO_FUA). */
  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void;
  /** End of a batch: hand the operations started since the last submit to the host (one system
   * call for many, where the implementation batches). Completions ready at once may be reported
   * (through `done`) before it returns. */
  submit(): void;
  /** Operations started and not yet completed. */
  readonly inFlight: number;
  /** Blocks until every operation has completed (reported through `done`): stopping a queue needs
   * a final ring position. */
  drain(): void;
  /** Drains, then detaches from the loop and releases what the queue holds (not the disk). */
  close(): void;
}

/**
 * A queue that completes every operation (through `done`) inside the call that starts it (raw
 * files without io_uring, qcow2): one slot (depth 1, id 0) and nothing to submit, drain or
 * release. An implementation says only how each operation runs.
 */
export abstract class SynchronousQueue implements DiskQueue {
  readonly inFlight = 0;
  private readonly slot: DiskRequest;
  constructor(options: DiskQueueOptions, protected readonly handlers: DiskQueueHandlers) {
    this.slot = { id: 0, iov: new IovecArray(options.segMax) };
  }
  next(): DiskRequest {
    return this.slot;
  }
  abstract read(req: DiskRequest, offset: number, len: number): void;
  abstract write(req: DiskRequest, offset: number, len: number, fua: boolean): void;
  abstract flush(req: DiskRequest): void;
  abstract discard(req: DiskRequest, offset: number, len: number): void;
  abstract writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void;
  submit(): void {}
  drain(): void {}
  close(): void {}
}

/** A slot of a queue whose operations complete later (network disks): in flight or free. */
export interface PooledRequest extends DiskRequest {
  busy: boolean;
}

/**
 * The slots of a queue whose operations complete later: `next()` offers a free one (the one freed
 * last, warm in cache), `take` marks the slot an operation starts on as in flight, `finish` hands
 * its result to the device and frees it again — unless the device's `done` started another
 * operation on it (a request of several steps).
 */
export class RequestSlots<R extends PooledRequest> {
  /** Every slot, by id. */
  readonly all: R[] = [];
  private readonly free: R[] = [];
  inFlight = 0;

  constructor(depth: number, make: (id: number) => R, private readonly what: string) {
    for (let i = depth - 1; i >= 0; i--) {
      const r = make(i);
      this.all[i] = r;
      this.free.push(r);
    }
  }

  next(): R | null {
    return this.free.length > 0 ? this.free[this.free.length - 1]! : null;
  }

  take(req: DiskRequest): R {
    const r = req as R;
    if (r.busy) throw new Error(`${this.what}: request slot ${r.id} is already in flight`);
    const top = this.free.length - 1;
    if (top >= 0 && this.free[top] === r) this.free.pop();
    else {
      const i = this.free.indexOf(r);
      if (i >= 0) this.free.splice(i, 1);
    }
    r.busy = true;
    this.inFlight++;
    return r;
  }

  finish(r: R, result: number, handlers: DiskQueueHandlers): void {
    r.busy = false;
    this.inFlight--;
    handlers.done(r, result);
    if (!r.busy) this.free.push(r);
  }
}

export interface Disk {
  /** Size in bytes (a trailing partial logical block is not addressable). */
  readonly size: number;
  /** Offsets and lengths the guest may use are multiples of this (512 for files). */
  readonly logicalBlockSize: number;
  /** The store's preferred alignment, a hint for the guest (>= logicalBlockSize, power of 2). */
  readonly physicalBlockSize: number;
  readonly readOnly: boolean;
  /** Whether instances built from the same resource in several threads may serve at once (raw:
   * positional I/O on one shared fd). When false, the device serves every queue from one thread
   * through one instance (a format whose metadata lives in memory). */
  readonly multiThread: boolean;
  /** For the start-up log line: "file, O_DIRECT, aio io_uring"... */
  readonly description: string;
  identity(): DiskIdentity;
  /** The store's size as the host sees it now (to notice a resize under our feet). */
  currentSize(): number;
  /** A store that can be resized while served (an RBD image resized with `rbd resize`): calls
   * `onResize` on `loop` with the new size whenever it changes, until close(). Only on a disk
   * served from one thread (multiThread false), whose queues all see the device's new capacity.
   * Absent: the size is fixed while serving. */
  watchSize?(loop: EventLoop, onResize: (size: number) => void): void;
  /** Opens the I/O channel of one queue on `loop`. */
  attach(loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers): DiskQueue;
  /** Makes every completed write durable, blocking (the VM is being suspended or saved). */
  flushNow(): void;
  /** Called on the device thread's instance before a ring starts: makes sure no other process
   * writes the store while we serve it (taking it over if another of ours handed it over); throws
   * a message naming the conflict ("PATH is in use by another process (write lock held)").
   * Absent: nothing to do. */
  activate?(): void;
  /** Called on the device thread's instance when every ring stopped (VM stopped, migrating away):
   * the store stays ours, but another of our backends (a migration destination) may take it over. */
  suspend?(): void;
  /** Releases what this instance owns (its queues must be closed first). Fds a resource handed in
   * are closed only by the instance that owns the resource. */
  close(): void;
}

/**
 * What the acquire phase hands the device for its disk: plain, structured-cloneable data (fd
 * numbers are process-wide), so the device thread and every queue thread build a `Disk` from it
 * without opening anything. Each implementation extends it under its own `kind`.
 */
export interface DiskResource {
  /** "raw", "qcow2", "nbd", "rbd"... */
  kind: string;
  /** Path or URI, for messages. */
  location: string;
  readOnly: boolean;
}

/**
 * Builds a Disk from its resource. `owner`: this instance closes the resource's fds on close()
 * (the device thread's instance); the others (queue threads') only release what they made.
 */
export type DiskOpener<R extends DiskResource> = (resource: R, owner: boolean) => Disk;
