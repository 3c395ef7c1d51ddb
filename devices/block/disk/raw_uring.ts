// A raw disk queue served through an io_uring of its own (the engine: uring_queue.ts), so a queue
// has many requests in flight at once (what O_DIRECT on a real disk needs). The queue processor
// parses and checks requests; this queue only moves data and reports completions. Reads and
// writes are one READV/WRITEV each (continued after a short transfer), a flush or a FUA write's
// stability one FSYNC(DATASYNC); discard and write zeroes are rare and run synchronously
// (fallocate), completing inside their call. Hybrid (--aio hybrid, for page-cache images): reads
// under ASYNC_READ_MIN and every write's data run inside their call (preadv/pwritev, as the
// synchronous queue does); a FUA write's fdatasync and a flush still go to the ring, since they
// wait for the disk, which the serving thread should not.
import type { RingHandle } from "../../../ffi/io_uring.ts";
import { EINVAL } from "../../../ffi/libc.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import type { DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "./disk.ts";
import { UringDiskQueue, UringSlot, type RingMode } from "./uring_queue.ts";
import type { RawDisk } from "./raw.ts";

const OP_READ = 0;
const OP_WRITE = 1;
const OP_FLUSH = 2;
type IoOp = typeof OP_READ | typeof OP_WRITE | typeof OP_FLUSH;

/** A raw operation's slot: the engine's transfer, plus what a flush or a FUA write needs. */
class RawSlot extends UringSlot {
  op: IoOp = OP_READ;
  /** FUA: fdatasync once the data is written, before completing. */
  stable = false;
  /** The data is done and the fdatasync is in flight. */
  syncing = false;
  /** Flush ordering: the write epoch this write belongs to, or the last epoch this flush covers. */
  epoch = 0;
}

export class UringRawQueue extends UringDiskQueue<RawSlot> {
  // Flush ordering. Writes belong to the epoch current when they start; a flush that arrives while
  // writes are in flight closes the epoch and waits until every write of it and earlier epochs is
  // done, so it covers every write that started before it, without stopping later reads or writes
  // (IOSQE_IO_DRAIN would stall the whole ring).
  private writeEpoch = 0;
  /** Writes in flight per epoch; insertion order is epoch order, so the first key is the oldest. */
  private readonly writesInEpoch = new Map<number, number>();
  private readonly waitingFlushes: RawSlot[] = [];

  /** Serves through `ring` (one of the disk's acquired rings, not owned). */
  constructor(private readonly disk: RawDisk, ring: RingHandle, mode: RingMode, loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers) {
    super("raw disk queue", disk.fd, ring, loop, options, handlers, (id, segMax) => new RawSlot(id, segMax), !disk.direct, mode);
  }

  /** Marks `req` in flight for `op`. */
  private takeFor(req: DiskRequest, op: IoOp): RawSlot {
    const slot = this.take(req);
    slot.op = op;
    slot.done = 0;
    slot.syncing = false;
    slot.stable = false;
    return slot;
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const slot = this.takeFor(req, OP_READ);
    if (this.inRing(false, len)) this.startTransfer(slot, false, offset, len);
    else this.finish(slot, this.disk.transfer(false, slot.iov, offset, len));
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const slot = this.takeFor(req, OP_WRITE);
    slot.stable = fua;
    slot.epoch = this.writeEpoch;
    this.writesInEpoch.set(slot.epoch, (this.writesInEpoch.get(slot.epoch) ?? 0) + 1);
    if (this.inRing(true, len)) {
      this.startTransfer(slot, true, offset, len);
      return;
    }
    // In the call; then, for FUA, its fdatasync through the ring (a flush meanwhile waits for it).
    const r = this.disk.transfer(true, slot.iov, offset, len);
    slot.len = len;
    if (r >= 0 && fua) this.sync(slot);
    else this.finish(slot, r);
  }

  /** Makes every write started before it stable (fdatasync), then completes. */
  flush(req: DiskRequest): void {
    const slot = this.takeFor(req, OP_FLUSH);
    if (this.disk.readOnly) {
      this.finish(slot, 0);
      return;
    }
    if (this.writesInEpoch.size === 0) {
      this.sync(slot);
      return;
    }
    slot.epoch = this.writeEpoch++;
    this.waitingFlushes.push(slot);
  }

  discard(req: DiskRequest, offset: number, len: number): void {
    this.finish(this.takeFor(req, OP_FLUSH), this.disk.discardRange(offset, len));
  }

  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    this.finish(this.takeFor(req, OP_FLUSH), this.disk.zeroRange(offset, len, flags));
  }

  private sync(slot: RawSlot): void {
    slot.syncing = true;
    this.queueSync(slot);
  }

  protected progress(slot: RawSlot, res: number): void {
    if (slot.op === OP_FLUSH || slot.syncing) {
      // A flush, or a FUA write's fdatasync (the write's result is its length).
      this.finish(slot, res < 0 ? res : slot.op === OP_FLUSH ? 0 : slot.len);
      return;
    }
    if (res < 0) {
      // O_DIRECT refuses misaligned guest buffers: finish that operation through the page cache.
      if (res !== -EINVAL || !this.disk.direct) {
        this.finish(slot, res);
        return;
      }
      const r = this.disk.transferBuffered(slot.isWrite, slot.iov, slot.offset + slot.done, slot.len - slot.done);
      if (r < 0) {
        this.finish(slot, r);
        return;
      }
      res = r;
    } else if (res === 0) {
      this.finish(slot, -5 /* EIO: end of file; never report partial I/O as success */);
      return;
    }
    if (!this.transferred(slot, res)) return;
    if (slot.stable) {
      this.sync(slot);
      return;
    }
    this.finish(slot, slot.len);
  }

  protected override finish(slot: RawSlot, result: number): void {
    const wasWrite = slot.op === OP_WRITE;
    const epoch = slot.epoch;
    try {
      super.finish(slot, result);
    } finally {
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
      this.sync(this.waitingFlushes.shift()!);
    }
  }
}
