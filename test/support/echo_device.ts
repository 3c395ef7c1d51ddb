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
import { QueueService } from "../../src/queue_thread.ts";
import type { EventLoop } from "../../src/event_loop.ts";

/**
 * The echo device's QueueRunner: echoes every chain of the queues its thread is given. One per
 * thread; the scratch buffer is state its queues share.
 */
class EchoRunner implements QueueRunner {
  private readonly queues = new Map<number, WatchedQueue>();
  private readonly scratch = new Uint8Array(65536);

  constructor(private readonly loop: EventLoop, private readonly onRequest: () => void, private readonly starts?: Int32Array) {}

  start(ring: VirtqueueConfig, mem: GuestMemory): void {
    this.stop(ring.index);
    if (this.starts !== undefined) Atomics.add(this.starts, 0, 1);
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
      this.onRequest();
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
const CONFIG_SIZE = 16;
const MAGIC = [0x65, 0x63, 0x68, 0x6f, 0x64, 0x65, 0x76, 0x31]; // "echodev1", read-only

const ECHO_VIRTIO_ID = 0x3f; // not a real virtio device id

class EchoDevice implements VhostUserDevice {
  readonly name = "echo";
  readonly virtioId = ECHO_VIRTIO_ID;
  private config = new Uint8Array(CONFIG_SIZE);
  processed = 0;
  acked = 0n;
  /** With `threaded`, queue i runs in queue thread i; otherwise all in the device thread. */
  private readonly queues: QueueService;

  constructor(private readonly ctx: DeviceContext, threaded: boolean, starts?: SharedArrayBuffer) {
    this.config.set(MAGIC, 0);
    this.queues = new QueueService({
      entry: ctx.queueThreadEntry, device: "echo", module: new URL("./echo_device.ts", import.meta.url).href, options: { starts },
      threads: threaded ? ECHO_QUEUES : 0, threadOf: (i) => i, loop: ctx.loop,
      runner: (o, loop) => new EchoRunner(loop, () => this.processed++, startCounter(o)),
    });
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
    this.processed = 0;
  }
  enterSuspendedState() {}
  snapshot() {
    return { processed: this.processed, config: this.config.slice(8) };
  }
  restore(state: unknown, ackedFeatures: bigint) {
    const s = state as { processed?: unknown; config?: unknown };
    if (typeof s !== "object" || s === null || typeof s.processed !== "number" || !(s.config instanceof Uint8Array) || s.config.length !== 8) {
      throw new Error("echo state is malformed");
    }
    this.acked = ackedFeatures;
    this.processed = s.processed;
    this.config.set(s.config, 8);
  }
}

/** The runners' shared count of ring starts (tests that a change did not restart rings), if asked for. */
function startCounter(o: unknown): Int32Array | undefined {
  const sab = (o as { starts?: SharedArrayBuffer }).starts;
  return sab !== undefined ? new Int32Array(sab) : undefined;
}

/** `threaded`: each queue in its own queue thread; `starts`: a SharedArrayBuffer counting ring starts. */
interface EchoOptions {
  threaded: boolean;
  starts?: SharedArrayBuffer;
}

const definition: DeviceDefinition<EchoOptions> = {
  name: "echo",
  virtioId: ECHO_VIRTIO_ID,
  description: "test echo device",
  capabilities: { type: "echo", features: [] },
  example: ["--socket", "/tmp/echo.sock"],
  args: {},
  parse: (raw) => ({ threaded: raw.threaded === true, starts: raw.starts instanceof SharedArrayBuffer ? raw.starts : undefined }),
  create: (opts, _resources, ctx) => new EchoDevice(ctx, opts.threaded, opts.starts),
  queueRunner: (options, loop) => new EchoRunner(loop, () => {}, startCounter(options)),
};
export default definition;
