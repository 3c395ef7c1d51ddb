// A small device for handler tests: every queue echoes each request's readable bytes into its
// writable buffers. It keeps a request counter and an 8-byte writable config field as state, so
// snapshot/restore and config access have something real to carry.
import { COMMON_FEATURES, type DeviceDefinition, type VhostUserDevice, type DeviceContext } from "../../src/device.ts";
import { readFromChain, writeToChain, type Virtqueue } from "../../src/virtqueue.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { watchKick, processQueue } from "../../src/kick.ts";
import { QueueThread, type QueueRunnerModule } from "../../src/queue_thread.ts";
import type { EventLoop } from "../../src/event_loop.ts";

/** Echoes every chain of `queue`; returns the function that stops it. */
function runEcho(loop: EventLoop, queue: Virtqueue, onRequest: () => void): () => void {
  const scratch = new Uint8Array(65536);
  return watchKick(loop, queue, () =>
    processQueue(queue, (chain) => {
      const n = readFromChain(chain, scratch.subarray(0, Math.min(chain.readableLen, scratch.length)));
      queue.add(chain.head, writeToChain(chain, scratch.subarray(0, n)));
      onRequest();
      return true;
    }));
}

/** The same echo, run in queue threads of its own when the device is created with `threaded`. */
const echoRunner: QueueRunnerModule = {
  runQueue: (queue, _mem, loop) => ({ stop: runEcho(loop, queue, () => {}) }),
};

export const ECHO_QUEUES = 2;
const CONFIG_SIZE = 16;
const MAGIC = [0x65, 0x63, 0x68, 0x6f, 0x64, 0x65, 0x76, 0x31]; // "echodev1", read-only

class EchoDevice implements VhostUserDevice {
  readonly name = "echo";
  readonly virtioId = 0x3f;
  private config = new Uint8Array(CONFIG_SIZE);
  processed = 0;
  acked = 0n;
  private stops = new Map<number, () => void>();

  private threads = new Map<number, QueueThread>();

  constructor(private readonly ctx: DeviceContext, private readonly threaded: boolean) {
    this.config.set(MAGIC, 0);
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
  startQueue(queue: Virtqueue, mem: GuestMemory) {
    if (this.threaded) {
      let t = this.threads.get(queue.index);
      if (t === undefined) {
        t = new QueueThread("echo", {}, "silent", new URL("./echo_device.ts", import.meta.url).href);
        this.threads.set(queue.index, t);
      }
      t.start(queue, mem);
      const thread = t;
      this.stops.set(queue.index, () => thread.stop(queue));
      return;
    }
    this.stops.set(queue.index, runEcho(this.ctx.loop, queue, () => this.processed++));
  }
  stopQueue(index: number) {
    this.stops.get(index)?.();
    this.stops.delete(index);
  }
  dispose() {
    for (const t of this.threads.values()) t.terminate();
  }
  reset() {
    this.config.fill(0, 8);
    this.processed = 0;
  }
  enterSuspendedState() {}
  snapshot() {
    return { processed: this.processed, config: this.config.slice(8) };
  }
  restore(state: unknown) {
    const s = state as { processed?: unknown; config?: unknown };
    if (typeof s !== "object" || s === null || typeof s.processed !== "number" || !(s.config instanceof Uint8Array) || s.config.length !== 8) {
      throw new Error("echo state is malformed");
    }
    this.processed = s.processed;
    this.config.set(s.config, 8);
  }
}

const definition: DeviceDefinition = {
  name: "echo",
  description: "test echo device",
  args: {},
  create: (opts, ctx) => new EchoDevice(ctx, opts.threaded === true),
  queueRunner: echoRunner,
};
export default definition;
