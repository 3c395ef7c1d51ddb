// The io_uring queue engine of block's disks (raw_uring.ts, qcow2/uring_queue.ts): what a disk
// queue with many requests in flight needs whatever the format. The rings themselves are set up in
// the acquire phase (acquireDiskRings: one per virtqueue, as plain data, with an opcode allow-list
// registered before they are enabled), so serving creates no ring; a queue maps its ring when it
// starts (IoUring.attach) and unmaps it when it stops, the ring fd staying with the resource.
//
// Per batch of requests: SQEs are queued while the batch is parsed, then ONE io_uring_enter
// submits them all (submit()). The kernel signals a registered eventfd when CQEs arrive; the loop
// then reaps every CQE, the format's `progress` finishes or continues each operation, finished
// ones are reported through `done`, and `batchDone` runs once (one used-ring flush per batch is
// the owner's job). Data goes straight between the file and guest memory: the READV/WRITEV
// iovecs point into the mapped guest regions.
//
// Each in-flight request owns a slot: its own iovec array and its progress. A slot has at most one
// SQE in the ring at any time, and there are at most `depth` slots (<= the ring's SQ entries), so
// the SQ can never overflow. Slots are created on first use, so memory follows the real depth.
//
// Hybrid (--aio hybrid, a choice for page-cache images): only reads of at least ASYNC_READ_MIN
// bytes go to the ring (to its worker threads, see ASYNC_READ_MIN); smaller reads and every write
// run synchronously inside their call on the same slots (take, then finish at once), as the
// synchronous queues run them. A page-cache copy of a few KiB costs less in the serving thread than
// the hand-off, and a write copies into the page cache without waiting for the disk. The format
// asks inRing() where a transfer goes; everything else (flush ordering, drain, in-flight counts)
// is the same for both modes, since an operation run in its call is never in flight between calls.
import {
  IoUring, RegisterOp, closeRingHandle, IORING_OP, IOSQE, type RingHandle, type RingRestrictions,
} from "../../../ffi/io_uring.ts";
import { IovecArray } from "../../../ffi/io.ts";
import { close } from "../../../ffi/libc.ts";
import { eventfd, drain } from "../../../ffi/eventfd.ts";
import { EPOLLIN } from "../../../ffi/epoll.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import { log } from "../../../src/log.ts";
import type { DiskQueue, DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "./disk.ts";

/** Slot states: free; in flight; its `done` is running (it may start another operation on it). */
export const FREE = 0;
export const BUSY = 1;
export const COMPLETING = 2;

/** Tests set this to see the synchronous fallback of a kernel without io_uring. */
const DISABLE_ENV = "BACKEND_NO_IO_URING";

/** SQ entries of a ring when the caller names no queue size (tests, tools). */
export const DEFAULT_RING_ENTRIES = 256;

/**
 * What a disk ring may do: exactly what the queues submit (READV, WRITEV, FSYNC) and the register
 * calls a queue makes when it starts and stops (its completion eventfd). Anything else — an OPENAT,
 * a SENDMSG, a registered file table — is refused by the kernel (EACCES).
 */
export const DISK_RING_RESTRICTIONS: RingRestrictions = {
  sqeOps: [IORING_OP.READV, IORING_OP.WRITEV, IORING_OP.FSYNC],
  registerOps: [RegisterOp.EVENTFD, RegisterOp.UNREGISTER_EVENTFD],
  sqeFlags: IOSQE.ASYNC,
};

/**
 * Buffered reads of at least this many bytes are handed to io_uring's worker threads (IOSQE_ASYNC).
 * A buffered read is a copy out of the page cache, which io_uring otherwise does inline in the
 * serving thread's io_uring_enter (or tries to, then hands to a worker anyway, on a filesystem
 * without non-blocking buffered reads such as tmpfs): large copies then run one after the other on
 * one core. From workers they run on the others, as QEMU's thread pool runs them. Smaller reads are
 * cheaper inline than the hand-off. O_DIRECT reads never wait in the serving thread: not handed off.
 * bench:block-ring read-128k-qd32 on qcow2, page cache: 1.20x the IOPS, CPU per I/O 0.73x of the
 * ring's inline read (against --aio sync, which stays cheaper here, see bench/README's qcow2 table).
 */
export const ASYNC_READ_MIN = 64 * 1024;

/**
 * Sets up `count` restricted rings of `entries` SQ entries (the acquire phase), or null with one
 * warning when this host refuses io_uring (kernel, sysctl io_uring_disabled, a container's seccomp):
 * the caller then serves synchronously.
 */
export function acquireDiskRings(count: number, entries: number, what: string): RingHandle[] | null {
  const rings: RingHandle[] = [];
  try {
    if (process.env[DISABLE_ENV] === "1") throw new Error("io_uring_setup: ENOSYS (simulated: BACKEND_NO_IO_URING=1)");
    for (let i = 0; i < count; i++) rings.push(IoUring.setupHandle(entries, DISK_RING_RESTRICTIONS));
    return rings;
  } catch (e) {
    rings.forEach(closeRingHandle);
    log.warn(`${what}: io_uring unavailable (${(e as Error).message}); serving requests synchronously (--aio sync)`);
    return null;
  }
}

/** Whether this process can set up a disk ring (restricted, as acquire does); returns why not, or null. */
export function ioUringUnavailable(): string | null {
  try {
    if (process.env[DISABLE_ENV] === "1") throw new Error("io_uring_setup: ENOSYS (simulated: BACKEND_NO_IO_URING=1)");
    closeRingHandle(IoUring.setupHandle(2, DISK_RING_RESTRICTIONS));
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** One in-flight operation: its own iovecs, and how far its transfer got. */
export class UringSlot implements DiskRequest {
  readonly iov: IovecArray;
  state = FREE;
  /** The transfer in the kernel: a write (else a read), its offset in the file, its length, bytes done. */
  isWrite = false;
  offset = 0;
  len = 0;
  done = 0;
  constructor(readonly id: number, segMax: number) {
    this.iov = new IovecArray(segMax);
  }
}

/** How a queue with a ring runs its transfers: all through the ring, or hybrid (see above). */
export type RingMode = "io_uring" | "hybrid";

/**
 * A DiskQueue over one ring, one file and a slot per request; the format says what each operation
 * does (its DiskQueue methods, using take/queueTransfer/queueSync/finish) and what a completion
 * means (`progress`).
 */
export abstract class UringDiskQueue<S extends UringSlot> implements DiskQueue {
  protected readonly ring: IoUring;
  private readonly efd: number;
  protected readonly slots: S[] = [];
  private readonly free: S[] = [];
  /** Slots in use (in the kernel, queued, waiting, or completing). */
  private busy = 0;
  /** Most slots at once: the queue's size or the SQ's, whichever is smaller. */
  readonly depth: number;
  private attached = true;
  /** Transfers handed to the ring since the queue started (for tests and stats). */
  transfersStarted = 0;
  private readonly onCqe = (userData: number, res: number): void => this.progress(this.slots[userData]!, res);

  /**
   * Maps `handle` (a ring of the disk's resource, not owned) on this thread and registers the
   * completion eventfd on `loop`. Throws (nothing left behind) when the kernel refuses.
   */
  constructor(
    /** For messages: "raw disk queue". */
    private readonly label: string,
    /** The file the transfers read and write. */
    private readonly fd: number,
    handle: RingHandle,
    private readonly loop: EventLoop,
    private readonly options: DiskQueueOptions,
    protected readonly handlers: DiskQueueHandlers,
    private readonly newSlot: (id: number, segMax: number) => S,
    /** The file is read through the page cache (not O_DIRECT): large reads go to workers. */
    private readonly buffered: boolean,
    /** hybrid: only large reads go to the ring (inRing). */
    private readonly mode: RingMode,
  ) {
    const ring = IoUring.attach(handle);
    let efd = -1;
    try {
      this.depth = Math.min(options.depth, ring.entries);
      efd = eventfd();
      ring.registerEventfd(efd);
    } catch (e) {
      if (efd >= 0) close(efd);
      ring.close();
      throw e;
    }
    this.ring = ring;
    this.efd = efd;
    loop.add(efd, EPOLLIN, () => {
      drain(efd); // before reaping: a CQE posted after this read signals again
      this.complete();
      handlers.batchDone();
    });
  }

  /** One CQE of `slot`: finish its operation (finish), or queue its next step. */
  protected abstract progress(slot: S, res: number): void;

  abstract read(req: DiskRequest, offset: number, len: number): void;
  abstract write(req: DiskRequest, offset: number, len: number, fua: boolean): void;
  abstract flush(req: DiskRequest): void;
  abstract discard(req: DiskRequest, offset: number, len: number): void;
  abstract writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void;

  get inFlight(): number {
    return this.busy;
  }

  next(): DiskRequest | null {
    const n = this.free.length;
    if (n > 0) return this.free[n - 1]!;
    if (this.slots.length >= this.depth) return null;
    const slot = this.newSlot(this.slots.length, this.options.segMax);
    this.slots.push(slot);
    this.free.push(slot);
    return slot;
  }

  /** Marks `req` in flight: next()'s slot, or the slot whose `done` is running. */
  protected take(req: DiskRequest): S {
    const slot = req as S;
    if (slot.state === FREE) {
      if (this.free[this.free.length - 1] !== slot) throw new Error(`${this.label}: operation on a slot that next() did not give`);
      this.free.pop();
      this.busy++;
    } else if (slot.state !== COMPLETING) {
      throw new Error(`${this.label}: operation on a slot already in flight`);
    }
    slot.state = BUSY;
    return slot;
  }

  /**
   * Whether a transfer of `len` bytes goes to the ring (then startTransfer) or runs inside its call
   * (then finish with its result): always the ring with io_uring; with hybrid, reads of at least
   * ASYNC_READ_MIN only.
   */
  protected inRing(isWrite: boolean, len: number): boolean {
    return this.mode === "io_uring" || (!isWrite && len >= ASYNC_READ_MIN);
  }

  /** Starts a transfer of `len` bytes at `offset` of the file, through the slot's iovecs. */
  protected startTransfer(slot: S, isWrite: boolean, offset: number, len: number): void {
    this.transfersStarted++;
    slot.isWrite = isWrite;
    slot.offset = offset;
    slot.len = len;
    slot.done = 0;
    this.queueTransfer(slot);
  }

  /** Queues the slot's transfer from where it got to (one SQE). */
  protected queueTransfer(slot: S): void {
    const at = slot.offset + slot.done;
    const ok = slot.isWrite
      ? this.ring.prepWritev(this.fd, slot.iov, at, slot.id)
      : this.ring.prepReadv(this.fd, slot.iov, at, slot.id, this.buffered && slot.len - slot.done >= ASYNC_READ_MIN ? IOSQE.ASYNC : 0);
    if (!ok) throw new Error(`${this.label}: submission queue full`); // cannot happen: one SQE per slot
  }

  /** Queues an fdatasync of the file for the slot (one SQE). */
  protected queueSync(slot: S): void {
    if (!this.ring.prepFsync(this.fd, true, slot.id)) throw new Error(`${this.label}: submission queue full`);
  }

  /**
   * A transfer's completion of `res` > 0 bytes: true when the transfer is whole; otherwise (a
   * short transfer) its rest is queued from where it stopped.
   */
  protected transferred(slot: S, res: number): boolean {
    slot.done += res;
    if (slot.done >= slot.len) return true;
    slot.iov.advance(res);
    this.queueTransfer(slot);
    return false;
  }

  /** Reports the slot's operation through `done`; the slot is free again unless `done` reused it. */
  protected finish(slot: S, result: number): void {
    slot.state = COMPLETING;
    try {
      this.handlers.done(slot, result);
    } finally {
      if (slot.state === COMPLETING) {
        slot.state = FREE;
        this.busy--;
        this.free.push(slot);
      }
    }
  }

  /** Hands the queued SQEs to the kernel (one io_uring_enter), then reaps what is ready already
   * (page-cache hits often complete inside the submit), so they share the batch's notification. */
  submit(): void {
    if (this.ring.unsubmitted > 0) this.ring.submit();
    this.complete();
  }

  /**
   * Reaps every available completion: finished operations are reported through `done`, partial
   * ones continue (their follow-up SQEs are submitted before this returns). No system call when
   * the ring has nothing and nothing is queued.
   */
  private complete(): void {
    this.ring.reap(this.onCqe);
    if (this.ring.unsubmitted > 0) this.ring.submit();
  }

  drain(): void {
    while (this.busy > 0) {
      this.ring.submit(1);
      this.ring.reap(this.onCqe);
    }
  }

  /** Drains, leaves the loop, and hands the ring back as it was given: no eventfd, not mapped here
   * (the next start of this queue attaches it again). */
  close(): void {
    if (!this.attached) return;
    this.drain();
    this.attached = false;
    this.loop.remove(this.efd);
    try {
      this.ring.unregisterEventfd();
    } finally {
      this.ring.close();
      close(this.efd);
      this.closed();
    }
  }

  /** After close(): what the format keeps about its open queues. */
  protected closed(): void {}
}
