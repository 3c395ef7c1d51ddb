// The block queue processor against the Disk contract (devices/block/disk/disk.ts), with a
// recording Disk instead of a file: what a qcow2, NBD or RBD disk will see from it. Completions
// that come later from the loop (a network disk), a full disk stalling the queue until a
// completion frees a slot, a multi-segment discard as one slot re-used from inside `done`, errors
// as -errno, and the cache mode changed through the shared record while the queue runs.
import { describe, test, expect, afterEach } from "bun:test";
import { GuestRam, DriverQueue } from "../support/frontend.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { SharedRecord } from "../../src/shared_record.ts";
import { eventfd, signal, drain } from "../../ffi/eventfd.ts";
import { EPOLLIN } from "../../ffi/epoll.ts";
import { close } from "../../ffi/libc.ts";
import { IovecArray } from "../../ffi/io.ts";
import { setLogLevel } from "../../src/log.ts";
import { QueueProcessor, BLOCK_SHARED, type BlockPolicy, type BlockShared } from "../../devices/block/queue_processor.ts";
import type { Disk, DiskQueue, DiskQueueHandlers, DiskQueueOptions, DiskRequest } from "../../devices/block/disk/disk.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S,
} from "../../devices/block/config.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

interface Op {
  kind: "read" | "write" | "flush" | "discard" | "zero";
  id: number;
  offset: number;
  len: number;
  fua: boolean;
}

/** A Disk that records every operation and completes them when the test says (from the loop). */
class RecordingDisk implements Disk {
  readonly size = 1 << 20;
  readonly logicalBlockSize = 512;
  readonly physicalBlockSize = 4096;
  readonly readOnly = false;
  readonly multiThread = false;
  readonly description = "recording";
  readonly ops: Op[] = [];
  /** Operations started and not completed: [request, result to report]. */
  readonly pending: [DiskRequest, number][] = [];
  /** Result for the next completions (bytes are filled in from the operation). */
  failWith = 0;
  queue: RecordingQueue | null = null;
  /** Most operations in flight (a disk may allow fewer than the ring's size). */
  maxDepth = Infinity;
  identity() {
    return { location: "rec", size: this.size, dev: 0, ino: 1 };
  }
  currentSize(): number {
    return this.size;
  }
  attach(loop: EventLoop, o: DiskQueueOptions, h: DiskQueueHandlers): DiskQueue {
    this.queue = new RecordingQueue(this, loop, o, h);
    return this.queue;
  }
  flushNow(): void {}
  close(): void {}
}

class RecordingQueue implements DiskQueue {
  private readonly slots: { id: number; iov: IovecArray; busy: boolean }[] = [];
  private readonly efd = eventfd();
  constructor(private readonly disk: RecordingDisk, private readonly loop: EventLoop, o: DiskQueueOptions, private readonly h: DiskQueueHandlers) {
    for (let i = 0; i < Math.min(o.depth, disk.maxDepth); i++) this.slots.push({ id: i, iov: new IovecArray(o.segMax), busy: false });
    loop.add(this.efd, EPOLLIN, () => {
      drain(this.efd);
      const done = this.disk.pending.splice(0);
      for (const [req, result] of done) {
        this.slots[req.id]!.busy = false;
        this.h.done(req, result);
      }
      this.h.batchDone();
    });
  }
  get inFlight(): number {
    return this.slots.filter((s) => s.busy).length;
  }
  next(): DiskRequest | null {
    return this.slots.find((s) => !s.busy) ?? null;
  }
  private start(req: DiskRequest, kind: Op["kind"], offset: number, len: number, fua: boolean, result: number): void {
    this.slots[req.id]!.busy = true;
    this.disk.ops.push({ kind, id: req.id, offset, len, fua });
    this.disk.pending.push([req, this.disk.failWith !== 0 ? -this.disk.failWith : result]);
  }
  read(req: DiskRequest, offset: number, len: number): void {
    this.start(req, "read", offset, len, false, len);
  }
  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    this.start(req, "write", offset, len, fua, len);
  }
  flush(req: DiskRequest): void {
    this.start(req, "flush", 0, 0, false, 0);
  }
  discard(req: DiskRequest, offset: number, len: number): void {
    this.start(req, "discard", offset, len, false, 0);
  }
  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    this.start(req, "zero", offset, len, (flags & 4) !== 0, 0);
  }
  submit(): void {}
  /** The test's "the server answered": completions arrive through the loop. */
  completeAll(): void {
    signal(this.efd);
  }
  drain(): void {
    while (this.inFlight > 0) this.loop.runOnce(10);
  }
  close(): void {
    this.loop.remove(this.efd);
    close(this.efd);
  }
}

const POLICY: BlockPolicy = {
  readOnly: false, discard: true, writeZeroes: true, mayUnmap: true, serial: new Uint8Array(20),
  capacitySectors: 2048, blkSize: 512, segMax: 8, coalesceUs: 0,
};

class Rig {
  readonly ram = new GuestRam(1 << 22);
  readonly mem = new GuestMemory();
  readonly loop = new EventLoop();
  readonly dq: DriverQueue;
  readonly disk = new RecordingDisk();
  readonly shared: BlockShared = SharedRecord.create(BLOCK_SHARED);
  readonly processor: QueueProcessor;
  readonly stop: () => void;
  private readonly errFd = eventfd();

  constructor(size = 8, diskDepth = Infinity) {
    this.disk.maxDepth = diskDepth;
    this.mem.add(MemoryRegion.borrow({ gpa: 0, size: this.ram.size, uaddr: this.ram.uaddr, mmapOffset: 0 }, this.ram.host));
    this.dq = new DriverQueue(this.ram, 0, size);
    const vq = openVirtqueue(this.mem, {
      index: 0, size, descGpa: this.dq.desc, availGpa: this.dq.avail, usedGpa: this.dq.used, eventIdx: false, indirect: true,
      nextAvail: 0, kickFd: this.dq.kick, callFd: this.dq.call, errFd: this.errFd,
    });
    this.processor = new QueueProcessor(vq, this.disk, POLICY, this.shared, this.loop);
    this.stop = this.processor.serve();
  }

  /** Makes a request available (header, data, status) and returns its status byte's address. */
  add(type: number, sector: number, data = 0, payload?: Uint8Array): number {
    const hdr = this.ram.alloc(16, 16);
    this.ram.dv.setUint32(hdr, type, true);
    this.ram.dv.setUint32(hdr + 8, sector, true);
    const bufs = [{ gpa: hdr, len: 16 }];
    if (payload !== undefined) {
      const p = this.ram.alloc(payload.length, 16);
      this.ram.bytes(p, payload.length).set(payload);
      bufs.push({ gpa: p, len: payload.length });
    }
    if (data > 0) bufs.push({ gpa: this.ram.alloc(data, 4096), len: data, write: type === VIRTIO_BLK_T.IN } as never);
    const status = this.ram.alloc(1, 1);
    this.ram.bytes(status, 1)[0] = 0xff;
    bufs.push({ gpa: status, len: 1, write: true } as never);
    this.dq.addChain(bufs, { indirect: true, kick: true });
    return status;
  }

  /** Runs the loop a little, and gives completed chains' descriptors back to the driver. */
  turns(n = 5): void {
    for (let i = 0; i < n; i++) this.loop.runOnce(5);
    for (const u of this.dq.takeUsed()) this.dq.recycle(u.id);
  }

  status(gpa: number): number {
    return this.ram.bytes(gpa, 1)[0]!;
  }

  dispose(): void {
    this.disk.queue!.completeAll();
    this.stop();
    this.shared.dispose();
    this.loop.dispose();
    this.dq.dispose?.();
    close(this.errFd);
    this.ram.dispose();
  }
}

let rig: Rig | null = null;
afterEach(() => {
  rig?.dispose();
  rig = null;
});

describe("block queue processor over a Disk", () => {
  test("completions that arrive later from the loop are published together", () => {
    const g = (rig = new Rig(8));
    const statuses = [0, 1, 2, 3].map((i) => g.add(VIRTIO_BLK_T.IN, i * 8, 4096));
    g.turns();
    expect(g.disk.ops.map((o) => o.kind)).toEqual(["read", "read", "read", "read"]);
    expect(g.dq.usedIdx()).toBe(0); // nothing completes before the disk says so
    g.disk.queue!.completeAll();
    g.turns();
    expect(g.dq.usedIdx()).toBe(4);
    for (const s of statuses) expect(g.status(s)).toBe(VIRTIO_BLK_S.OK);
  });

  test("a disk shallower than the ring: popping stops while it is full, and resumes with its completions", () => {
    const g = (rig = new Rig(8, 2));
    const statuses = [0, 1, 2, 3, 4].map((i) => g.add(VIRTIO_BLK_T.OUT, i * 8, 4096));
    for (const started of [2, 4, 5]) {
      g.turns();
      expect(g.disk.ops.length).toBe(started);
      g.disk.queue!.completeAll();
    }
    g.turns();
    expect(g.dq.usedIdx()).toBe(5);
    for (const s of statuses) expect(g.status(s)).toBe(VIRTIO_BLK_S.OK);
  });

  test("a discard of three segments: three operations in turn on one slot, one completion", () => {
    const g = (rig = new Rig(8));
    const seg = new Uint8Array(48);
    const v = new DataView(seg.buffer);
    [[8, 8], [64, 16], [512, 8]].forEach(([sector, n], i) => {
      v.setUint32(16 * i, sector!, true);
      v.setUint32(16 * i + 8, n!, true);
    });
    const s = g.add(VIRTIO_BLK_T.DISCARD, 0, 0, seg);
    for (let step = 0; step < 3; step++) {
      g.turns();
      expect(g.disk.ops.length).toBe(step + 1);
      expect(g.dq.usedIdx()).toBe(0);
      g.disk.queue!.completeAll();
    }
    g.turns();
    expect(g.disk.ops.map((o) => [o.kind, o.id, o.offset, o.len])).toEqual([
      ["discard", 0, 8 * 512, 8 * 512], ["discard", 0, 64 * 512, 16 * 512], ["discard", 0, 512 * 512, 8 * 512],
    ]);
    expect(g.dq.usedIdx()).toBe(1);
    expect(g.status(s)).toBe(VIRTIO_BLK_S.OK);
  });

  test("a failed operation (-errno) is IOERR; a FLUSH goes to the disk", () => {
    const g = (rig = new Rig(8));
    g.disk.failWith = 5;
    const bad = g.add(VIRTIO_BLK_T.OUT, 0, 4096);
    g.turns();
    g.disk.queue!.completeAll();
    g.turns();
    expect(g.status(bad)).toBe(VIRTIO_BLK_S.IOERR);
    g.disk.failWith = 0;
    const f = g.add(VIRTIO_BLK_T.FLUSH, 0);
    g.turns();
    g.disk.queue!.completeAll();
    g.turns();
    expect(g.disk.ops.map((o) => o.kind)).toEqual(["write", "flush"]);
    expect(g.status(f)).toBe(VIRTIO_BLK_S.OK);
  });

  test("the cache mode changed through the shared record reaches the running queue: writes carry FUA from the next one on", () => {
    const g = (rig = new Rig(8));
    const write = () => {
      g.add(VIRTIO_BLK_T.OUT, 0, 4096);
      g.turns();
      g.disk.queue!.completeAll();
      g.turns();
      return g.disk.ops[g.disk.ops.length - 1]!.fua;
    };
    expect(write()).toBe(false);
    g.shared.set("writethrough", true);
    expect(write()).toBe(true);
    expect(write()).toBe(true);
    g.shared.set("writethrough", false);
    expect(write()).toBe(false);
  });
});
