// A raw disk queue served through an io_uring of its own, so a queue has many requests in flight at
// once (what O_DIRECT on a real disk needs). The queue processor parses and checks requests; this
// queue only moves data and reports completions.
//
// Per batch of requests: SQEs are queued while the batch is parsed, then ONE io_uring_enter
// submits them all (submit()). The kernel signals a registered eventfd when CQEs arrive; the loop
// then reaps every CQE, reports the finished requests through `done`, and calls `batchDone` once
// (one used-ring flush per batch is the owner's job). Data still goes straight between the image
// and guest memory: the READV/WRITEV iovecs point into the mapped guest regions. Discard and write
// zeroes are rare and run synchronously (fallocate), completing inside their call.
//
// Each in-flight request owns a slot: its own iovec array and its progress. A slot has at most one
// SQE in the ring at any time, and there are at most `depth` slots (<= the ring's SQ entries), so
// the SQ can never overflow. Slots are created on first use, so memory follows the real depth.
import { IoUring } from "../../../ffi/io_uring.ts";
import { IovecArray } from "../../../ffi/io.ts";
import { SysError, close, EINVAL } from "../../../ffi/libc.ts";
import { eventfd, drain } from "../../../ffi/eventfd.ts";
import { EPOLLIN } from "../../../ffi/epoll.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import type { DiskQueue, DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "./disk.ts";
import type { RawDisk } from "./raw.ts";

const OP_READ = 0;
const OP_WRITE = 1;
const OP_FLUSH = 2;
type IoOp = typeof OP_READ | typeof OP_WRITE | typeof OP_FLUSH;

/** Slot states: free; in flight; its `done` is running (it may start another operation on it). */
const FREE = 0;
const BUSY = 1;
const COMPLETING = 2;

/** Tests set this to see the synchronous fallback of a kernel without io_uring. */
const DISABLE_ENV = "BACKEND_NO_IO_URING";

/** Opens a ring of `entries`, or throws (SysError EPERM/ENOSYS/ENOMEM... when io_uring is unavailable). */
export function openRing(entries: number): IoUring {
  if (process.env[DISABLE_ENV] === "1") throw new SysError("io_uring_setup", 38 /* ENOSYS, simulated */);
  return IoUring.setup(entries);
}

/** Whether this process can use io_uring; returns why not, or null. */
export function ioUringUnavailable(): string | null {
  try {
    openRing(2).close();
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** One in-flight operation: its own iovecs, and how far it got. */
class UringSlot implements DiskRequest {
  readonly iov: IovecArray;
  state = FREE;
  op: IoOp = OP_READ;
  /** Byte offset in the image, bytes to transfer, bytes done. */
  offset = 0;
  len = 0;
  done = 0;
  /** FUA: fdatasync once the data is written, before completing. */
  stable = false;
  /** The data is done and the fdatasync is in flight. */
  syncing = false;
  /** Flush ordering: the write epoch this write belongs to, or the last epoch this flush covers. */
  epoch = 0;
  constructor(readonly id: number, segMax: number) {
    this.iov = new IovecArray(segMax);
  }
}

export class UringRawQueue implements DiskQueue {
  private readonly efd: number;
  private readonly slots: UringSlot[] = [];
  private readonly free: UringSlot[] = [];
  /** Slots in use (in the kernel, queued, a flush waiting for writes, or completing). */
  private busy = 0;
  /** Most slots at once: the queue's size and the SQ's. */
  readonly depth: number;
  private readonly segMax: number;
  private attached = true;

  // Flush ordering. Writes belong to the epoch current when they start; a flush that arrives while
  // writes are in flight closes the epoch and waits until every write of it and earlier epochs is
  // done, so it covers every write that started before it, without stopping later reads or writes
  // (IOSQE_IO_DRAIN would stall the whole ring).
  private writeEpoch = 0;
  /** Writes in flight per epoch; insertion order is epoch order, so the first key is the oldest. */
  private readonly writesInEpoch = new Map<number, number>();
  private readonly waitingFlushes: UringSlot[] = [];

  private readonly onCqe = (userData: number, res: number): void => this.progress(this.slots[userData]!, res);

  /** Takes ownership of `ring` (closed on failure and by close()). */
  constructor(
    private readonly disk: RawDisk,
    private readonly ring: IoUring,
    private readonly loop: EventLoop,
    options: DiskQueueOptions,
    private readonly handlers: DiskQueueHandlers,
  ) {
    this.segMax = options.segMax;
    try {
      this.depth = Math.min(options.depth, ring.entries);
      this.efd = eventfd();
      ring.registerEventfd(this.efd);
    } catch (e) {
      ring.close();
      throw e;
    }
    const efd = this.efd;
    loop.add(efd, EPOLLIN, () => {
      drain(efd); // before reaping: a CQE posted after this read signals again
      this.complete();
      handlers.batchDone();
    });
  }

  get inFlight(): number {
    return this.busy;
  }

  next(): DiskRequest | null {
    const n = this.free.length;
    if (n > 0) return this.free[n - 1]!;
    if (this.slots.length >= this.depth) return null;
    const slot = new UringSlot(this.slots.length, this.segMax);
    this.slots.push(slot);
    this.free.push(slot);
    return slot;
  }

  /** Marks `req` in flight for `op`: next()'s slot, or the slot whose `done` is running. */
  private take(req: DiskRequest, op: IoOp): UringSlot {
    const slot = req as UringSlot;
    if (slot.state === FREE) {
      if (this.free[this.free.length - 1] !== slot) throw new Error("raw disk queue: operation on a slot that next() did not give");
      this.free.pop();
      this.busy++;
    } else if (slot.state !== COMPLETING) {
      throw new Error("raw disk queue: operation on a slot already in flight");
    }
    slot.state = BUSY;
    slot.op = op;
    slot.done = 0;
    slot.syncing = false;
    slot.stable = false;
    return slot;
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const slot = this.take(req, OP_READ);
    slot.offset = offset;
    slot.len = len;
    this.queueData(slot);
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const slot = this.take(req, OP_WRITE);
    slot.offset = offset;
    slot.len = len;
    slot.stable = fua;
    slot.epoch = this.writeEpoch;
    this.writesInEpoch.set(slot.epoch, (this.writesInEpoch.get(slot.epoch) ?? 0) + 1);
    this.queueData(slot);
  }

  /** Makes every write started before it stable (fdatasync), then completes. */
  flush(req: DiskRequest): void {
    const slot = this.take(req, OP_FLUSH);
    if (this.disk.readOnly) {
      this.finish(slot, 0);
      return;
    }
    if (this.writesInEpoch.size === 0) {
      this.queueSync(slot);
      return;
    }
    slot.epoch = this.writeEpoch++;
    this.waitingFlushes.push(slot);
  }

  discard(req: DiskRequest, offset: number, len: number): void {
    this.finish(this.take(req, OP_FLUSH), this.disk.discardRange(offset, len));
  }

  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    this.finish(this.take(req, OP_FLUSH), this.disk.zeroRange(offset, len, flags));
  }

  private queueData(slot: UringSlot): void {
    const at = slot.offset + slot.done;
    const ok = slot.op === OP_READ
      ? this.ring.prepReadv(this.disk.fd, slot.iov, at, slot.id)
      : this.ring.prepWritev(this.disk.fd, slot.iov, at, slot.id);
    if (!ok) throw new Error("raw disk queue: submission queue full"); // cannot happen: one SQE per slot
  }

  private queueSync(slot: UringSlot): void {
    slot.syncing = true;
    if (!this.ring.prepFsync(this.disk.fd, true, slot.id)) throw new Error("raw disk queue: submission queue full");
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

  /** One CQE for `slot`: finish the operation, or queue its next step. */
  private progress(slot: UringSlot, res: number): void {
    if (slot.op === OP_FLUSH || slot.syncing) {
      // A flush, or a FUA write's fdatasync (the write's result is its length).
      this.finish(slot, res < 0 ? res : slot.op === OP_FLUSH ? 0 : slot.len);
      return;
    }
    const isWrite = slot.op === OP_WRITE;
    if (res < 0) {
      // O_DIRECT refuses misaligned guest buffers: finish that operation through the page cache.
      if (res !== -EINVAL || !this.disk.direct) {
        this.finish(slot, res);
        return;
      }
      const r = this.disk.transferBuffered(isWrite, slot.iov, slot.offset + slot.done, slot.len - slot.done);
      if (r < 0) {
        this.finish(slot, r);
        return;
      }
      res = r;
    } else if (res === 0) {
      this.finish(slot, -5 /* EIO: end of file; never report partial I/O as success */);
      return;
    }
    slot.done += res;
    if (slot.done < slot.len) {
      // Short transfer: go on from where it stopped.
      advance(slot.iov, res);
      this.queueData(slot);
      return;
    }
    if (slot.stable) {
      this.queueSync(slot);
      return;
    }
    this.finish(slot, slot.len);
  }

  private finish(slot: UringSlot, result: number): void {
    const wasWrite = slot.op === OP_WRITE;
    const epoch = slot.epoch;
    slot.state = COMPLETING;
    try {
      this.handlers.done(slot, result);
    } finally {
      if (slot.state === COMPLETING) {
        slot.state = FREE;
        this.busy--;
        this.free.push(slot);
      }
      if (wasWrite) this.writeDone(epoch);
    }
  }

  private writeDone(epoch: number): void {
    const left = this.writesInEpoch.get(epoch)! - 1;
    if (left > 0) {
      this.writesInEpoch.set(epoch, left);
      return;
    }
    this.writesInEpoch.delete(epoch);
    const oldest = this.writesInEpoch.keys().next();
    while (this.waitingFlushes.length > 0 && (oldest.done || oldest.value > this.waitingFlushes[0]!.epoch)) {
      this.queueSync(this.waitingFlushes.shift()!);
    }
  }

  drain(): void {
    while (this.busy > 0) {
      this.ring.submit(1);
      this.ring.reap(this.onCqe);
    }
  }

  close(): void {
    if (!this.attached) return;
    this.drain();
    this.attached = false;
    this.loop.remove(this.efd);
    this.ring.close();
    close(this.efd);
  }
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
