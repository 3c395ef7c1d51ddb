// A qcow2 disk queue with many requests in flight (--aio io_uring or hybrid; the engine:
// ../uring_queue.ts): a read or write whose whole range lies in one contiguous run of host clusters
// that hold data (writable in place, for a write) goes to the kernel as one READV/WRITEV through an
// io_uring of this queue, straight between the image file and guest memory; everything else
// (allocating writes, copy-on-write, zeroes, backing and compressed data, discard, FUA) runs
// synchronously inside its call, as in the synchronous queue. With hybrid, only reads
// of at least ASYNC_READ_MIN go to the ring; smaller reads and all writes run inside their call
// too. The mapping is resolved when the request starts; what keeps an in-flight transfer from
// landing in a cluster that has meanwhile been freed and reused is that frees wait for a flush
// while no transfer of the disk is in flight (Qcow2Disk.flushImage). A request run in its call is
// never in flight, so that rule, drain and the in-flight counts hold whatever share goes to the ring.
import type { RingHandle } from "../../../../ffi/io_uring.ts";
import type { EventLoop } from "../../../../src/event_loop.ts";
import type { DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "../disk.ts";
import { UringDiskQueue, UringSlot, type RingMode } from "../uring_queue.ts";
import type { Qcow2Disk } from "./disk.ts";

export class Qcow2UringQueue extends UringDiskQueue<UringSlot> {
  /** Transfers in the kernel (a subset of the slots in use). */
  private transfers = 0;

  /** Serves through `ring` (one of the disk's acquired rings, not owned). */
  constructor(private readonly disk: Qcow2Disk, ring: RingHandle, mode: RingMode, loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers) {
    super("qcow2 disk queue", disk.fd, ring, loop, options, handlers, (id, segMax) => new UringSlot(id, segMax), true, mode);
  }

  /** Transfers of this queue still in the kernel. */
  get transfersInFlight(): number {
    return this.transfers;
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const slot = this.take(req);
    if (this.inRing(false, len)) {
      const host = this.disk.hostRun(offset, len, false);
      if (host >= 0) return this.start(slot, false, host, len);
    }
    this.finish(slot, this.disk.run(len, (img) => img.readv(slot.iov, offset, len)));
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const slot = this.take(req);
    if (!fua && this.inRing(true, len)) {
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

  private start(slot: UringSlot, isWrite: boolean, host: number, len: number): void {
    this.transfers++;
    this.startTransfer(slot, isWrite, host, len);
  }

  protected progress(slot: UringSlot, res: number): void {
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
    if (!this.transferred(slot, res)) return;
    this.transfers--;
    this.finish(slot, slot.len);
  }

  protected override closed(): void {
    this.disk.detach(this);
  }
}
