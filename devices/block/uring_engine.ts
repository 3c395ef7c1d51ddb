// Asynchronous reads, writes and flushes of one block queue through an io_uring of its own, so a
// queue has many requests in flight at once (what O_DIRECT on a real disk needs). The queue
// processor parses and checks requests; this engine only moves data and reports completions.
//
// Per batch of requests: SQEs are queued while the batch is parsed, then ONE io_uring_enter
// submits them all. The kernel signals a registered eventfd when CQEs arrive; the owner then calls
// complete(), which reaps every CQE and reports the finished requests (one used-ring flush per
// batch is the owner's job). Data still goes straight between the image and guest memory: the
// READV/WRITEV iovecs point into the mapped guest regions.
//
// Each in-flight request owns a slot: its own iovec array (requests outlive the parse, so the
// processor's single reusable array cannot be used) and its progress. A slot has at most one SQE
// in the ring at any time, and there are at most `depth` slots (<= the ring's SQ entries), so the
// SQ can never overflow. Slots are created on first use, so memory follows the real queue depth.
import { IoUring } from "../../ffi/io_uring.ts";
import { IovecArray } from "../../ffi/io.ts";
import { SysError, close, EINVAL } from "../../ffi/libc.ts";
import { eventfd, drain } from "../../ffi/eventfd.ts";
import { EPOLLIN } from "../../ffi/epoll.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import { ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import { advance, type BlockImage } from "./image.ts";

export const OP_READ = 0;
export const OP_WRITE = 1;
export const OP_FLUSH = 2;
export type IoOp = typeof OP_READ | typeof OP_WRITE | typeof OP_FLUSH;


/** Tests set this to see the synchronous fallback of a kernel without io_uring. */
const DISABLE_ENV = "BACKEND_NO_IO_URING";

/** One in-flight request: the request it completes, its own iovecs, and how far it got. */
export class IoSlot {
  readonly iov: IovecArray;
  op: IoOp = OP_READ;
  /** The request to complete (set while the slot is in use). */
  chain: DescriptorChain | null = null;
  /** Where the request's status byte goes once it completes. */
  status: ChainWriter | null = null;
  /** The slot's own cursor for the request it carries (reused: no allocation per request). */
  readonly writer = new ChainWriter();
  /** Byte offset in the image, bytes to transfer, bytes done. */
  offset = 0;
  len = 0;
  done = 0;
  /** Writethrough: fdatasync once the data is written, before completing. */
  stable = false;
  /** The data is done and the fdatasync is in flight. */
  syncing = false;
  /** Flush ordering: the write epoch this write belongs to, or the last epoch this flush covers. */
  epoch = 0;
  constructor(readonly id: number, segMax: number) {
    this.iov = new IovecArray(segMax);
  }
}

/** Called once per finished request; `error` is null on success. The slot is reused after it returns. */
export type SlotDone = (slot: IoSlot, error: Error | null) => void;

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

export class UringEngine {
  private readonly ring: IoUring;
  private readonly efd: number;
  private readonly slots: IoSlot[] = [];
  private readonly free: IoSlot[] = [];
  /** Slots in use (in the kernel, queued, or a flush waiting for writes). */
  private busy = 0;
  /** Most slots at once: the queue's size (a chain takes at least one descriptor) and the SQ's. */
  readonly depth: number;
  private loop: EventLoop | null = null;

  // Flush ordering. Writes belong to the epoch current when they start; a flush that arrives while
  // writes are in flight closes the epoch and waits until every write of it and earlier epochs is
  // done, so it covers every write that started before it, without stopping later reads or writes
  // (IOSQE_IO_DRAIN would stall the whole ring).
  private writeEpoch = 0;
  /** Writes in flight per epoch; insertion order is epoch order, so the first key is the oldest. */
  private readonly writesInEpoch = new Map<number, number>();
  private readonly waitingFlushes: IoSlot[] = [];

  private readonly onCqe = (userData: number, res: number): void => this.progress(this.slots[userData]!, res);

  constructor(private readonly image: BlockImage, queueSize: number, private readonly segMax: number, private readonly done: SlotDone) {
    this.ring = openRing(queueSize);
    try {
      this.depth = Math.min(queueSize, this.ring.entries);
      this.efd = eventfd();
      this.ring.registerEventfd(this.efd);
    } catch (e) {
      this.ring.close();
      throw e;
    }
  }

  /** Requests in flight. */
  get inFlight(): number {
    return this.busy;
  }

  /**
   * The slot the next read/write/flush will use (fill its iov first), or null when `depth`
   * requests are in flight already.
   */
  nextSlot(): IoSlot | null {
    const n = this.free.length;
    if (n > 0) return this.free[n - 1]!;
    if (this.slots.length >= this.depth) return null;
    const slot = new IoSlot(this.slots.length, this.segMax);
    this.slots.push(slot);
    this.free.push(slot);
    return slot;
  }

  private take(op: IoOp, chain: DescriptorChain, status: ChainWriter): IoSlot {
    const slot = this.free.pop();
    if (slot === undefined) throw new Error("block engine: no free slot (check nextSlot() first)");
    this.busy++;
    slot.op = op;
    slot.chain = chain;
    slot.status = status;
    slot.done = 0;
    slot.syncing = false;
    slot.stable = false;
    return slot;
  }

  /** Reads `len` bytes at `offset` into nextSlot()'s iovecs. */
  read(chain: DescriptorChain, status: ChainWriter, offset: number, len: number): void {
    const slot = this.take(OP_READ, chain, status);
    slot.offset = offset;
    slot.len = len;
    this.queueData(slot);
  }

  /** Writes `len` bytes from nextSlot()'s iovecs at `offset`; `stable`: fdatasync before completing. */
  write(chain: DescriptorChain, status: ChainWriter, offset: number, len: number, stable: boolean): void {
    const slot = this.take(OP_WRITE, chain, status);
    slot.offset = offset;
    slot.len = len;
    slot.stable = stable;
    slot.epoch = this.writeEpoch;
    this.writesInEpoch.set(slot.epoch, (this.writesInEpoch.get(slot.epoch) ?? 0) + 1);
    this.queueData(slot);
  }

  /** Makes every write started before it stable (fdatasync), then completes. */
  flush(chain: DescriptorChain, status: ChainWriter): void {
    const slot = this.take(OP_FLUSH, chain, status);
    if (this.writesInEpoch.size === 0) {
      this.queueSync(slot);
      return;
    }
    slot.epoch = this.writeEpoch++;
    this.waitingFlushes.push(slot);
  }

  private queueData(slot: IoSlot): void {
    const at = slot.offset + slot.done;
    const ok = slot.op === OP_READ
      ? this.ring.prepReadv(this.image.fd, slot.iov, at, slot.id)
      : this.ring.prepWritev(this.image.fd, slot.iov, at, slot.id);
    if (!ok) throw new Error("block engine: submission queue full"); // cannot happen: one SQE per slot
  }

  private queueSync(slot: IoSlot): void {
    slot.syncing = true;
    if (!this.ring.prepFsync(this.image.fd, true, slot.id)) throw new Error("block engine: submission queue full");
  }

  /** Hands the queued SQEs to the kernel (one io_uring_enter); nothing to do when none are queued. */
  submit(): void {
    if (this.ring.unsubmitted > 0) this.ring.submit();
  }

  /**
   * Reaps every available completion: finished requests are reported through `done`, partial ones
   * continue (their follow-up SQEs are submitted before this returns). No system call when the
   * ring has nothing and nothing is queued.
   */
  complete(): number {
    const n = this.ring.reap(this.onCqe);
    this.submit();
    return n;
  }

  /** One CQE for `slot`: finish the request, or queue its next step. */
  private progress(slot: IoSlot, res: number): void {
    if (slot.op === OP_FLUSH || slot.syncing) {
      this.finish(slot, res < 0 ? new SysError("fdatasync", -res) : null);
      return;
    }
    const isWrite = slot.op === OP_WRITE;
    if (res < 0) {
      // O_DIRECT refuses misaligned guest buffers: finish that request through the page cache.
      if (res !== -EINVAL || !this.image.direct) {
        this.finish(slot, new SysError(isWrite ? "pwritev" : "preadv", -res));
        return;
      }
      try {
        this.image.transferBuffered(isWrite, slot.iov, slot.offset + slot.done, slot.len - slot.done);
      } catch (e) {
        this.finish(slot, e as Error);
        return;
      }
      res = slot.len - slot.done;
    } else if (res === 0) {
      this.finish(slot, new Error(`${isWrite ? "pwritev" : "preadv"} at ${slot.offset + slot.done}: end of file`));
      return;
    }
    slot.done += res;
    if (slot.done < slot.len) {
      // Short transfer: go on from where it stopped (never report partial I/O as success).
      advance(slot.iov, res);
      this.queueData(slot);
      return;
    }
    if (slot.stable) {
      this.queueSync(slot);
      return;
    }
    this.finish(slot, null);
  }

  private finish(slot: IoSlot, error: Error | null): void {
    const wasWrite = slot.op === OP_WRITE;
    try {
      this.done(slot, error);
    } finally {
      slot.chain = null;
      slot.status = null;
      this.busy--;
      this.free.push(slot);
      if (wasWrite) this.writeDone(slot.epoch);
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

  /** Calls `onCompletions` (in `loop`) whenever completions are ready to reap. */
  attach(loop: EventLoop, onCompletions: () => void): void {
    this.loop = loop;
    const efd = this.efd;
    loop.add(efd, EPOLLIN, () => {
      drain(efd); // before reaping: a CQE posted after this read signals again
      onCompletions();
    });
  }

  /** Blocks until every request is complete (reported through `done`). For stopping a queue. */
  drain(): void {
    while (this.busy > 0) {
      this.ring.submit(1);
      this.ring.reap(this.onCqe);
    }
  }

  /** Drains, then releases the ring and the eventfd. */
  close(): void {
    this.drain();
    if (this.loop !== null) this.loop.remove(this.efd);
    this.loop = null;
    this.ring.close();
    close(this.efd);
  }
}
