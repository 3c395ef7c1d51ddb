// Runs virtqueues in threads of their own, so the queues of a multi-queue device are served in
// parallel. The device's worker keeps the vhost-user session and hands a queue over with
// start(); stop() is synchronous (the thread drains in-flight requests and reports the ring
// position through shared memory), which is what GET_VRING_BASE needs.
//
// The per-queue code is the device definition's `queueRunner` (see QueueRunnerModule); the queue
// thread finds it through the device registry (static imports, so the compiled binary has it),
// so it must depend only on its queue, memory and options.
import { signal } from "../ffi/eventfd.ts";
import type { GuestMemory } from "./memory.ts";
import type { Virtqueue, VirtqueueConfig } from "./virtqueue.ts";
import type { EventLoop } from "./event_loop.ts";
import type { MemoryRegionDesc } from "./protocol/codec.ts";

export interface QueueRunner {
  /** Stops processing; in-flight requests must be complete when it returns. */
  stop(): void;
}

export interface QueueRunnerModule {
  runQueue(queue: Virtqueue, mem: GuestMemory, loop: EventLoop, options: unknown): QueueRunner;
}

export interface RegionShare {
  desc: MemoryRegionDesc;
  host: number;
}

export type ToQueueThread =
  | { type: "init"; device: string; module?: string; options: unknown; sab: SharedArrayBuffer; logLevel: string }
  | { type: "start"; config: VirtqueueConfig; regions: RegionShare[] }
  | { type: "stop"; index: number }
  | { type: "exit" };

/** Shared words: READY flag, wake fd, STOP sequence, and the stopped ring position. */
export const SLOT_READY = 0;
export const SLOT_WAKE_FD = 1;
export const SLOT_STOP_SEQ = 2;
export const SLOT_NEXT_AVAIL = 3;
export const SLOT_NEXT_USED = 4;
export const SLOT_ERROR = 5;
export const ERROR_NOT_RUNNING = 2;
const TIMEOUT_MS = 10_000;

export class QueueThread {
  private readonly worker: Worker;
  private readonly shared = new Int32Array(new SharedArrayBuffer(32));
  private stopSeq = 0;

  /** `device` names a registered device with a queueRunner; `module` (tests) overrides the registry. */
  constructor(device: string, options: unknown, logLevel: string, module?: string) {
    this.worker = new Worker(new URL("./queue_worker.ts", import.meta.url).href);
    this.post({ type: "init", device, module, options, sab: this.shared.buffer as SharedArrayBuffer, logLevel });
  }

  private post(msg: ToQueueThread): void {
    this.worker.postMessage(msg);
    const wake = Atomics.load(this.shared, SLOT_WAKE_FD);
    if (Atomics.load(this.shared, SLOT_READY) === 1) signal(wake); // it may sit in epoll_wait
  }

  private waitReady(): void {
    if (Atomics.wait(this.shared, SLOT_READY, 0, TIMEOUT_MS) === "timed-out") throw new Error("queue thread did not start");
    if (Atomics.load(this.shared, SLOT_READY) !== 1) throw new Error("queue thread failed to start");
  }

  /** Hands `queue` to the thread; this thread must not touch the queue until stop(). */
  start(queue: Virtqueue, mem: GuestMemory): void {
    this.waitReady();
    const regions = mem.list().map((r) => ({ desc: r.desc, host: r.host }));
    this.post({ type: "start", config: { ...queue.config, nextAvail: queue.nextAvail, nextUsed: queue.nextUsed }, regions });
  }

  /** Takes the queue back, blocking until the thread has drained it; updates its ring position. */
  stop(queue: Virtqueue): void {
    const seq = ++this.stopSeq;
    this.post({ type: "stop", index: queue.index });
    const deadline = Date.now() + TIMEOUT_MS;
    while (Atomics.load(this.shared, SLOT_STOP_SEQ) !== seq) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`queue ${queue.index}: thread did not stop`);
      Atomics.wait(this.shared, SLOT_STOP_SEQ, seq - 1, left);
    }
    const error = Atomics.load(this.shared, SLOT_ERROR);
    if (error === ERROR_NOT_RUNNING) return; // it never started there: the position is unchanged
    if (error !== 0) throw new Error(`queue ${queue.index}: thread failed while stopping`);
    queue.nextAvail = Atomics.load(this.shared, SLOT_NEXT_AVAIL);
    queue.nextUsed = Atomics.load(this.shared, SLOT_NEXT_USED);
  }

  terminate(): void {
    this.post({ type: "exit" });
    this.worker.terminate();
  }
}
