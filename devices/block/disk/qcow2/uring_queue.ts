// A qcow2 disk queue with many requests in flight (--aio io_uring): a read or write whose whole
// range lies in one contiguous run of host clusters that hold data (writable in place, for a
// write) goes to the kernel as one READV/WRITEV through an io_uring of this queue, straight between
// the image file and guest memory; everything else (allocating writes, copy-on-write, zeroes,
// backing and compressed data, discard, FUA) runs synchronously inside its call, as in the
// synchronous queue. The mapping is resolved when the request starts; what keeps an in-flight
// transfer from landing in a cluster that has meanwhile been freed and reused is that frees wait
// for a flush while no transfer of the disk is in flight (Qcow2Disk.flush).
import type { IoUring } from "../../../../ffi/io_uring.ts";
import { IovecArray } from "../../../../ffi/io.ts";
import { close } from "../../../../ffi/libc.ts";
import { eventfd, drain } from "../../../../ffi/eventfd.ts";
import { EPOLLIN } from "../../../../ffi/epoll.ts";
import type { EventLoop } from "../../../../src/event_loop.ts";
import type { DiskQueue, DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "../disk.ts";
import type { Qcow2Disk } from "./disk.ts";

const FREE = 0;
const BUSY = 1;
/** Its `done` is running (it may start another operation on the same slot). */
const COMPLETING = 2;

class Slot implements DiskRequest {
  readonly iov: IovecArray;
  state = FREE;
  isWrite = false;
  /** Host offset of the transfer, its length, bytes done. */
  host = 0;
  len = 0;
  done = 0;
  constructor(readonly id: number, segMax: number) {
    this.iov = new IovecArray(segMax);
  }
}

export class Qcow2UringQueue implements DiskQueue {
  private readonly efd: number;
  private readonly slots: Slot[] = [];
  private readonly free: Slot[] = [];
  private busy = 0;
  /** Transfers in the kernel (a subset of busy). */
  private transfers = 0;
  /** Requests that went to the kernel as one transfer (for tests and stats). */
  transfersStarted = 0;
  private readonly depth: number;
  private attached = true;
  private readonly onCqe = (userData: number, res: number): void => this.progress(this.slots[userData]!, res);

  /** Takes ownership of `ring`. */
  constructor(
    private readonly disk: Qcow2Disk,
    private readonly ring: IoUring,
    private readonly loop: EventLoop,
    private readonly options: DiskQueueOptions,
    private readonly handlers: DiskQueueHandlers,
  ) {
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
      drain(efd);
      this.complete();
      handlers.batchDone();
    });
  }

  get inFlight(): number {
    return this.busy;
  }

  /** Transfers of this queue still in the kernel. */
  get transfersInFlight(): number {
    return this.transfers;
  }

  next(): DiskRequest | null {
    const n = this.free.length;
    if (n > 0) return this.free[n - 1]!;
    if (this.slots.length >= this.depth) return null;
    const slot = new Slot(this.slots.length, this.options.segMax);
    this.slots.push(slot);
    this.free.push(slot);
    return slot;
  }

  private take(req: DiskRequest): Slot {
    const slot = req as Slot;
    if (slot.state === FREE) {
      if (this.free[this.free.length - 1] !== slot) throw new Error("qcow2 disk queue: operation on a slot that next() did not give");
      this.free.pop();
      this.busy++;
    } else if (slot.state !== COMPLETING) {
      throw new Error("qcow2 disk queue: operation on a slot already in flight");
    }
    slot.state = BUSY;
    return slot;
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const slot = this.take(req);
    const host = this.disk.hostRun(offset, len, false);
    if (host >= 0) return this.start(slot, false, host, len);
    this.finish(slot, this.disk.run(len, (img) => img.readv(slot.iov, offset, len)));
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const slot = this.take(req);
    if (!fua) {
      const host = this.disk.hostRun(offset, len, true);
      if (host >= 0) return this.start(slot, true, host, len);
    }
    this.finish(slot, this.disk.run(len, (img) => {
      img.writev(slot.iov, offset, len);
      if (fua) this.disk.flushImage(img);
    }));
  }

  flush(req: DiskRequest): void {
    const slot = this.take(req);
    this.finish(slot, this.disk.run(0, (img) => this.disk.flushImage(img)));
  }

  discard(req: DiskRequest, offset: number, len: number): void {
    const slot = this.take(req);
    this.finish(slot, this.disk.run(0, (img) => img.discard(offset, len)));
  }

  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    const slot = this.take(req);
    this.finish(slot, this.disk.zeroes(offset, len, flags));
  }

  private start(slot: Slot, isWrite: boolean, host: number, len: number): void {
    slot.isWrite = isWrite;
    slot.host = host;
    slot.len = len;
    slot.done = 0;
    this.transfers++;
    this.transfersStarted++;
    this.queueTransfer(slot);
  }

  private queueTransfer(slot: Slot): void {
    const fd = this.disk.fd;
    const at = slot.host + slot.done;
    const ok = slot.isWrite ? this.ring.prepWritev(fd, slot.iov, at, slot.id) : this.ring.prepReadv(fd, slot.iov, at, slot.id);
    if (!ok) throw new Error("qcow2 disk queue: submission queue full"); // one SQE per slot at most
  }

  submit(): void {
    if (this.ring.unsubmitted > 0) this.ring.submit();
    this.complete();
  }

  private complete(): void {
    this.ring.reap(this.onCqe);
    if (this.ring.unsubmitted > 0) this.ring.submit();
  }

  private progress(slot: Slot, res: number): void {
    if (res < 0) {
      this.transfers--;
      this.finish(slot, res);
      return;
    }
    if (res === 0) {
      // End of the file inside an allocated cluster (a file QEMU left short): the rest reads as zeroes.
      this.transfers--;
      this.finish(slot, slot.isWrite ? -5 : this.disk.zeroRest(slot.iov, slot.len - slot.done));
      return;
    }
    slot.done += res;
    if (slot.done < slot.len) {
      this.disk.advance(slot.iov, res);
      this.queueTransfer(slot);
      return;
    }
    this.transfers--;
    this.finish(slot, slot.len);
  }

  private finish(slot: Slot, result: number): void {
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
    this.disk.detach(this);
  }
}
