// A loopback device for core tests: queue 0 transmits, queue 1 receives, and both go through ONE
// host fd, a FIFO opened read-write (so the fd is its own peer) by the thread's runner at its
// first start. What the device writes from queue 0's chains comes back in queue 1's buffers.
//
// The runner reports through a SharedArrayBuffer given in the options (Int32 words, see PAIR_*),
// which the test holds too: how often the host fd was opened, how many runners were built, which
// thread built them, and the features and EVENT_IDX flag each queue's last start carried.
import { threadId } from "node:worker_threads";
import { COMMON_FEATURES, type DeviceDefinition, type VhostUserDevice, type DeviceContext, type QueueRunner } from "../../src/device.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { type VirtqueueConfig, type RingPosition } from "../../src/ring.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { WatchedQueue, processQueue, fillQueue } from "../../src/queue_serving.ts";
import type { QueueService } from "../../src/queue_thread.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import { IovecArray, open, read, writev, O_RDWR, O_NONBLOCK } from "../../ffi/io.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";

export interface PairOptions {
  /** A FIFO the runner opens read-write. */
  path: string;
  /** Int32 words, PAIR_WORDS of them. */
  sab: SharedArrayBuffer;
  /** Queue threads (default 1; 0 serves the queues in the device thread). */
  threads?: number;
}

/** Times the runner opened its host fd. */
export const PAIR_FD_OPENS = 0;
/** Runners built. */
export const PAIR_RUNNERS = 1;
/** threadId of the thread that built the (last) runner. */
export const PAIR_RUNNER_THREAD = 2;
/** threadId of the device thread. */
export const PAIR_DEVICE_THREAD = 3;
/** Starts seen by runners, all queues together. */
export const PAIR_STARTS = 4;
/** Per queue q (0, 1): features at its last start, low and high 32 bits, and ring.eventIdx. */
export const pairFeatLo = (q: number) => 8 + 4 * q;
export const pairFeatHi = (q: number) => 9 + 4 * q;
export const pairEventIdx = (q: number) => 10 + 4 * q;
/** Host fd closes (runner dispose). */
export const PAIR_FD_CLOSES = 5;
export const PAIR_WORDS = 16;

export const PAIR_TX = 0;
export const PAIR_RX = 1;

class PairRunner implements QueueRunner {
  private fd = -1;
  private readonly shared: Int32Array;
  private tx: { queue: Virtqueue; watched: WatchedQueue } | null = null;
  private rx: { queue: Virtqueue; watched: WatchedQueue } | null = null;
  private readonly iov = new IovecArray(64);
  private readonly buf = new Uint8Array(4096);
  /** Bytes read from the fd and not yet delivered: buf[pendingAt, pendingEnd). */
  private pendingAt = 0;
  private pendingEnd = 0;

  constructor(private readonly o: PairOptions, private readonly loop: EventLoop) {
    this.shared = new Int32Array(o.sab);
    Atomics.add(this.shared, PAIR_RUNNERS, 1);
    Atomics.store(this.shared, PAIR_RUNNER_THREAD, threadId);
  }

  start(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void {
    if (ring.index !== PAIR_TX && ring.index !== PAIR_RX) throw new Error(`pair: no queue ${ring.index}`);
    this.stop(ring.index);
    if (this.fd < 0) {
      this.fd = open(this.o.path, O_RDWR | O_NONBLOCK);
      Atomics.add(this.shared, PAIR_FD_OPENS, 1);
      this.loop.watch(this.fd, { readable: () => this.deliver() }, { readable: false, writable: false });
    }
    Atomics.store(this.shared, pairFeatLo(ring.index), Number(ackedFeatures & 0xffff_ffffn) | 0);
    Atomics.store(this.shared, pairFeatHi(ring.index), Number(ackedFeatures >> 32n) | 0);
    Atomics.store(this.shared, pairEventIdx(ring.index), ring.eventIdx ? 1 : 0);
    Atomics.add(this.shared, PAIR_STARTS, 1);
    const queue = openVirtqueue(mem, ring);
    if (ring.index === PAIR_TX) {
      const watched: WatchedQueue = new WatchedQueue(this.loop, () => this.send(queue, watched));
      this.tx = { queue, watched };
      watched.start(queue);
    } else {
      const watched: WatchedQueue = new WatchedQueue(this.loop, () => this.deliver());
      this.rx = { queue, watched };
      watched.start(queue);
      this.loop.setInterest(this.fd, { readable: true, writable: false });
    }
  }

  /** Queue 0: every chain's readable bytes go into the fd, straight from guest memory. */
  private send(queue: Virtqueue, watched: WatchedQueue): void {
    processQueue(queue, (chain) => {
      const r = new ChainReader(chain);
      this.iov.clear();
      if (!r.iovecs(this.iov, r.remaining)) {
        queue.add(chain.head, 0);
        return true;
      }
      const n = this.iov.count === 0 ? 0 : writev(this.fd, this.iov);
      if (n === -EAGAIN) {
        queue.undoPop(); // the FIFO is full: the test sends too little for that
        return false;
      }
      queue.add(chain.head, 0);
      return true;
    }, undefined, watched.budget);
  }

  private hasData(): boolean {
    if (this.pendingAt < this.pendingEnd) return true;
    const n = read(this.fd, this.buf, this.buf.length);
    if (n <= 0) return false;
    this.pendingAt = 0;
    this.pendingEnd = n;
    return true;
  }

  /** Queue 1: what the fd holds goes into the driver's receive buffers. */
  private deliver(): void {
    const rx = this.rx;
    if (rx === null) {
      this.loop.setInterest(this.fd, { readable: false, writable: false });
      return;
    }
    const starved = fillQueue(rx.queue, () => this.hasData(), (chain) => {
      const w = new ChainWriter(chain);
      this.pendingAt += w.write(this.buf.subarray(this.pendingAt, this.pendingEnd));
      rx.queue.add(chain.head, w.written);
      return true;
    }, rx.watched.budget);
    // Out of buffers with data left: stop listening to the fd until the driver adds some.
    this.loop.setInterest(this.fd, { readable: !starved, writable: false });
  }

  stop(index: number): RingPosition | null {
    const side = index === PAIR_TX ? this.tx : index === PAIR_RX ? this.rx : null;
    if (side === null) return null;
    if (index === PAIR_TX) this.tx = null;
    else {
      this.rx = null;
      this.loop.setInterest(this.fd, { readable: false, writable: false });
    }
    return side.watched.stop();
  }

  dispose(): void {
    if (this.fd < 0) return;
    this.loop.remove(this.fd);
    close(this.fd);
    this.fd = -1;
    Atomics.add(this.shared, PAIR_FD_CLOSES, 1);
  }
}

const PAIR_VIRTIO_ID = 0x3e; // not a real virtio device id

class PairDevice implements VhostUserDevice {
  private readonly queues: QueueService;

  constructor(o: PairOptions, ctx: DeviceContext) {
    Atomics.store(new Int32Array(o.sab), PAIR_DEVICE_THREAD, threadId);
    this.queues = ctx.queueService({ options: { path: o.path, sab: o.sab }, threads: o.threads ?? 1, threadOf: () => 0 });
  }

  maxQueues() { return 2; }
  features() { return COMMON_FEATURES; }
  ackFeatures() {}
  protocolFeatures() { return 0n; }
  readConfig() { return null; }
  writeConfig() { return false; }
  startQueue(ring: VirtqueueConfig, mem: GuestMemory, features: bigint) {
    this.queues.start(ring, mem, features);
  }
  stopQueue(index: number) {
    return this.queues.stop(index);
  }
  reset() {}
  enterSuspendedState() {}
  snapshot() { return {}; }
  restore() {} // no state, no features that change anything
  dispose() {
    this.queues.dispose();
  }
}

const definition: DeviceDefinition = {
  name: "pair",
  virtioId: PAIR_VIRTIO_ID,
  description: "test loopback device: queue 0 into a FIFO, queue 1 out of it",
  capabilities: { type: "pair", features: [] },
  example: ["--socket", "/tmp/pair.sock"],
  args: {},
  parse: (raw) => raw as unknown as PairOptions,
  create: (opts: PairOptions, _resources, ctx) => new PairDevice(opts, ctx),
  queueRunner: (options, loop) => new PairRunner(options as PairOptions, loop),
};
export default definition;
