// A small device for handler tests: every queue echoes each request's readable bytes into its
// writable buffers. It keeps a request counter and an 8-byte writable config field as state, so
// snapshot/restore and config access have something real to carry.
import { COMMON_FEATURES, type DeviceDefinition, type VhostUserDevice, type DeviceContext, type QueueRunner } from "../../src/device.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { type VirtqueueConfig, type RingPosition } from "../../src/ring.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { WatchedQueue, processQueue } from "../../src/queue_serving.ts";
import type { QueueService } from "../../src/queue_thread.ts";
import type { EventLoop } from "../../src/event_loop.ts";

/**
 * The echo device's QueueRunner: echoes every chain of the queues its thread is given. One per
 * thread; the scratch buffer is state its queues share.
 */
class EchoRunner implements QueueRunner {
  private readonly queues = new Map<number, WatchedQueue>();
  private readonly scratch = new Uint8Array(65536);

  constructor(private readonly loop: EventLoop, private readonly counters: Int32Array) {}

  start(ring: VirtqueueConfig, mem: GuestMemory): void {
    this.stop(ring.index);
    Atomics.add(this.counters, COUNT_STARTS, 1);
    const queue = openVirtqueue(mem, ring);
    const watched: WatchedQueue = new WatchedQueue(this.loop, () => this.echo(queue, watched));
    this.queues.set(ring.index, watched);
    watched.start(queue);
  }

  private echo(queue: Virtqueue, watched: WatchedQueue): void {
    processQueue(queue, (chain) => {
      const n = new ChainReader(chain).read(this.scratch);
      const w = new ChainWriter(chain);
      w.write(this.scratch.subarray(0, n));
      queue.add(chain.head, w.written);
      Atomics.add(this.counters, COUNT_REQUESTS, 1);
      return true;
    }, undefined, watched.budget);
  }

  stop(index: number): RingPosition | null {
    const q = this.queues.get(index);
    this.queues.delete(index);
    return q?.stop() ?? null;
  }
}

export const ECHO_QUEUES = 2;
/** The shared counter words: ring starts, requests echoed. */
const COUNT_STARTS = 0;
const COUNT_REQUESTS = 1;
const CONFIG_SIZE = 16;
const MAGIC = [0x65, 0x63, 0x68, 0x6f, 0x64, 0x65, 0x76, 0x31]; // "echodev1", read-only

const ECHO_VIRTIO_ID = 0x3f; // not a real virtio device id

class EchoDevice implements VhostUserDevice {
  private config = new Uint8Array(CONFIG_SIZE);
  private readonly counters: Int32Array;
  acked = 0n;
  /** With `threaded`, queue i runs in queue thread i; otherwise all in the device thread. */
  private readonly queues: QueueService;

  constructor(private readonly ctx: DeviceContext, threaded: boolean, counters: SharedArrayBuffer) {
    this.config.set(MAGIC, 0);
    this.counters = new Int32Array(counters);
    // Queue i in queue thread i, or all in this thread; the runner is the definition's queueRunner.
    this.queues = ctx.queueService({ options: { counters } satisfies EchoRunnerOptions, threads: threaded ? ECHO_QUEUES : 0, threadOf: (i) => i });
  }

  maxQueues() { return ECHO_QUEUES; }
  features() { return COMMON_FEATURES; }
  ackFeatures(f: bigint) { this.acked = f; }
  protocolFeatures() { return 0n; }
  readConfig(offset: number, size: number) {
    return offset + size <= CONFIG_SIZE ? this.config.slice(offset, offset + size) : null;
  }
  writeConfig(offset: number, data: Uint8Array) {
    if (offset < 8 || offset + data.length > CONFIG_SIZE) return false;
    this.config.set(data, offset);
    this.ctx.configChanged();
    return true;
  }
  startQueue(ring: VirtqueueConfig, mem: GuestMemory, features: bigint) {
    this.queues.start(ring, mem, features);
  }
  stopQueue(index: number) {
    return this.queues.stop(index);
  }
  dispose() {
    this.queues.dispose();
  }
  reset() {
    this.config.fill(0, 8);
    Atomics.store(this.counters, COUNT_REQUESTS, 0);
  }
  enterSuspendedState() {}
  snapshot() {
    return { processed: Atomics.load(this.counters, COUNT_REQUESTS), config: this.config.slice(8) };
  }
  restore(state: unknown, ackedFeatures: bigint) {
    const s = state as { processed?: unknown; config?: unknown };
    if (typeof s !== "object" || s === null || typeof s.processed !== "number" || !(s.config instanceof Uint8Array) || s.config.length !== 8) {
      throw new Error("echo state is malformed");
    }
    this.acked = ackedFeatures;
    Atomics.store(this.counters, COUNT_REQUESTS, s.processed);
    this.config.set(s.config, 8);
  }
}

/** `threaded`: each queue in its own queue thread; `counters`: shared words [ring starts, requests] (tests read starts). */
interface EchoOptions {
  threaded: boolean;
  counters: SharedArrayBuffer;
}

/** What every runner gets, in whichever thread: the shared counters. */
interface EchoRunnerOptions {
  counters: SharedArrayBuffer;
}

const definition: DeviceDefinition<EchoOptions> = {
  name: "echo",
  virtioId: ECHO_VIRTIO_ID,
  description: "test echo device",
  capabilities: { type: "echo", features: [] },
  example: ["--socket", "/tmp/echo.sock"],
  args: {},
  parse: (raw) => ({
    threaded: raw.threaded === true,
    counters: raw.counters instanceof SharedArrayBuffer ? raw.counters : new SharedArrayBuffer(8),
  }),
  create: (opts, _resources, ctx) => new EchoDevice(ctx, opts.threaded, opts.counters),
  queueRunner: (options, loop) => new EchoRunner(loop, new Int32Array((options as EchoRunnerOptions).counters)),
};
export default definition;
