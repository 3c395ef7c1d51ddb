// Serving a device's queues: in the device thread, or in queue threads of their own so the queues
// of a multi-queue device run in parallel (rust-vmm's `queues_per_thread`). Either way through
// the device's QueueRunner (src/device.ts): one runner per thread, given start/stop for each
// queue that thread serves. The device says which thread serves which queue.
//
// A queue thread is a Worker with its own epoll loop. start() hands it plain ring data and the
// host addresses of the guest mappings (the device thread owns them and unmaps only after every
// ring using them stopped); stop() is synchronous (the thread completes what is in flight and
// reports the ring position through shared memory), which is what GET_VRING_BASE needs. The
// thread runs the program's queue-thread entry file (DeviceContext.queueThreadEntry), which finds
// the runner through the device registry (static imports, so the compiled binary has it).
//
// Threads are spawned when the service is created, in the device's create() — before the backend
// reports ready — not at the guest's first request: after startup a device starts no thread.
import { signal } from "../ffi/eventfd.ts";
import type { GuestMemory } from "./memory.ts";
import type { VirtqueueConfig, RingPosition } from "./ring.ts";
import type { EventLoop } from "./event_loop.ts";
import type { MemoryRegionDesc } from "./protocol/codec.ts";
import type { QueueRunner } from "./device.ts";
import { log, logLevelName } from "./log.ts";
import { threadSettings, type ThreadSettings } from "./thread_settings.ts";

export interface RegionShare {
  desc: MemoryRegionDesc;
  host: number;
}

export type ToQueueThread =
  | { type: "init"; device: string; module?: string; options: unknown; sab: SharedArrayBuffer; logLevel: string; settings: ThreadSettings }
  | { type: "start"; ring: VirtqueueConfig; regions: RegionShare[]; ackedFeatures: string }
  | { type: "add-region"; region: RegionShare }
  | { type: "stop"; index: number }
  | { type: "exit" };

/** The words shared with the thread (indexes in an Int32Array). */
export const SLOT = {
  /** 0 while starting, 1 running, 2 failed to start. */
  READY: 0,
  /** The thread's event loop wake fd. */
  WAKE_FD: 1,
  /** "stop" messages handled so far. */
  STOP_SEQ: 2,
  /** The stopped ring's position. */
  NEXT_AVAIL: 3,
  NEXT_USED: 4,
  /** Why a stop left no position (a STOP_ERROR). */
  ERROR: 5,
  /** Memory regions added: the thread counts each "add-region" it has applied. */
  MEM_SEQ: 6,
} as const;
/** What a stop found (SLOT.ERROR). */
export const STOP_ERROR = {
  NONE: 0,
  /** Stopping the ring threw (logged by the thread). */
  FAILED: 1,
  /** The ring was not running on this thread. */
  NOT_RUNNING: 2,
} as const;
const TIMEOUT_MS = 10_000;

/** One queue thread. */
export class QueueThread {
  private readonly worker: Worker;
  private readonly shared = new Int32Array(new SharedArrayBuffer(32));
  private stopSeq = 0;
  private memSeq = 0;

  /**
   * `entry` is the queue threads' entry file; `device` names a registered device with a
   * queueRunner; `module` (tests) overrides the registry.
   */
  constructor(entry: string, device: string, options: unknown, logLevel: string, module?: string) {
    this.worker = new Worker(entry);
    this.post({ type: "init", device, module, options, sab: this.shared.buffer as SharedArrayBuffer, logLevel, settings: threadSettings() });
  }

  private post(msg: ToQueueThread): void {
    this.worker.postMessage(msg);
    const wake = Atomics.load(this.shared, SLOT.WAKE_FD);
    if (Atomics.load(this.shared, SLOT.READY) === 1) signal(wake); // it may sit in epoll_wait
  }

  /** Blocks until the thread has built its runner (throws when it failed or did not start in time). */
  waitReady(): void {
    if (Atomics.wait(this.shared, SLOT.READY, 0, TIMEOUT_MS) === "timed-out") throw new Error("queue thread did not start");
    if (Atomics.load(this.shared, SLOT.READY) !== 1) throw new Error("queue thread failed to start");
  }

  /** Hands the ring to the thread; this thread must not touch it until stop(). */
  start(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void {
    this.waitReady();
    const regions = mem.list().map((r) => ({ desc: r.desc, host: r.host }));
    this.post({ type: "start", ring, regions, ackedFeatures: ackedFeatures.toString() });
  }

  /**
   * Takes the ring back, blocking until the thread has completed what it had in flight. Throws
   * when the thread does not answer in time (it is then beyond use: terminate it).
   */
  stop(index: number): RingPosition | null {
    const seq = ++this.stopSeq;
    this.post({ type: "stop", index });
    this.waitSeq(SLOT.STOP_SEQ, seq, `did not stop queue ${index}`);
    const error = Atomics.load(this.shared, SLOT.ERROR);
    if (error === STOP_ERROR.NOT_RUNNING) return null; // it never started there
    if (error !== STOP_ERROR.NONE) throw new Error(`queue ${index}: thread failed while stopping`);
    return { nextAvail: Atomics.load(this.shared, SLOT.NEXT_AVAIL), nextUsed: Atomics.load(this.shared, SLOT.NEXT_USED) };
  }

  /** Extends the memory table of every ring the thread serves, blocking until it has. */
  addRegion(region: RegionShare): void {
    const seq = ++this.memSeq;
    this.post({ type: "add-region", region });
    this.waitSeq(SLOT.MEM_SEQ, seq, "did not take a new memory region");
  }

  /** Waits until the thread has counted `seq` in `slot`; throws after TIMEOUT_MS. */
  private waitSeq(slot: number, seq: number, what: string): void {
    const deadline = Date.now() + TIMEOUT_MS;
    while (Atomics.load(this.shared, slot) !== seq) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`queue thread ${what} within ${TIMEOUT_MS} ms`);
      Atomics.wait(this.shared, slot, seq - 1, left);
    }
  }

  terminate(): void {
    this.post({ type: "exit" });
    this.worker.terminate();
  }
}

export interface QueueServiceOptions {
  /** The queue threads' entry file (DeviceContext.queueThreadEntry). */
  entry: string;
  /** Registry name of the device whose queueRunner serves the queues in queue threads. */
  device: string;
  /** Test hook: a module whose default export is that DeviceDefinition. */
  module?: string;
  /** Plain (structured-cloneable) data handed to every runner. */
  options: unknown;
  /** Queue threads to use; 0 serves every queue in the device thread, on `loop`. */
  threads: number;
  /** Which thread (0..threads-1) serves queue `index`; default index % threads. */
  threadOf?: (index: number) => number;
  /** The device thread's loop, for threads = 0. */
  loop: EventLoop;
  /** Builds the device-thread runner (threads = 0); the same factory the definition registers. */
  runner: (options: unknown, loop: EventLoop) => QueueRunner;
}

/**
 * Where a device's queues run: one runner in the device thread, or one per queue thread. Queue
 * threads start with the service and live as long as the device; one that stops answering is
 * terminated and replaced on the next start (the one thread started after startup, and only
 * after a thread hung).
 */
export class QueueService {
  private local: QueueRunner | null = null;
  private readonly threads: (QueueThread | undefined)[] = [];
  /** Queue index → the thread serving it (-1: the device thread). */
  private readonly servedBy = new Map<number, number>();
  /** The device thread's memory table the rings were started over, and our subscription to it. */
  private watchedMemory: GuestMemory | null = null;
  private unwatchMemory: (() => void) | null = null;

  constructor(private readonly o: QueueServiceOptions) {
    for (let t = 0; t < o.threads; t++) this.threads[t] = this.spawn();
    // Each thread loads its entry file and builds its runner now, not after the backend reported
    // ready: loading opens the program's modules (from the sources, or the binary's own pages).
    for (const t of this.threads) t!.waitReady();
  }

  private spawn(): QueueThread {
    return new QueueThread(this.o.entry, this.o.device, this.o.options, logLevelName(), this.o.module);
  }

  private threadFor(index: number): number {
    if (this.o.threads === 0) return -1;
    const t = this.o.threadOf?.(index) ?? index % this.o.threads;
    if (!Number.isInteger(t) || t < 0 || t >= this.o.threads) throw new Error(`queue ${index}: no thread ${t}`);
    return t;
  }

  start(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void {
    this.stop(ring.index);
    this.watchMemory(mem);
    const t = this.threadFor(ring.index);
    if (t < 0) {
      this.local ??= this.o.runner(this.o.options, this.o.loop);
      this.local.start(ring, mem, ackedFeatures);
    } else {
      let thread = this.threads[t];
      if (thread === undefined) {
        thread = this.spawn();
        this.threads[t] = thread;
      }
      thread.start(ring, mem, ackedFeatures);
    }
    this.servedBy.set(ring.index, t);
  }

  /**
   * Rings in queue threads run over copies of the device thread's memory table: a region added to
   * it (ADD_MEM_REG) is added to every copy before the addition returns, so the front-end's
   * acknowledgement means every ring can use it, and no ring stops for it (memory hot-plug sends
   * hundreds). Rings in the device thread share the table itself.
   */
  private watchMemory(mem: GuestMemory): void {
    if (this.watchedMemory === mem) return;
    this.unwatchMemory?.();
    this.watchedMemory = mem;
    this.unwatchMemory = mem.onAdd((region) => {
      const share: RegionShare = { desc: region.desc, host: region.host };
      for (const t of new Set(this.servedBy.values())) {
        if (t < 0) continue;
        try {
          this.threads[t]!.addRegion(share);
        } catch (e) {
          log.error(`${(e as Error).message}; replacing that queue thread`);
          this.replace(t);
        }
      }
    });
  }

  /** Ends thread `t` (it stopped answering); its queues are no longer served, the next start spawns another. */
  private replace(t: number): void {
    this.threads[t]?.terminate();
    this.threads[t] = undefined;
    for (const [i, tt] of this.servedBy) if (tt === t) this.servedBy.delete(i);
  }

  stop(index: number): RingPosition | null {
    const t = this.servedBy.get(index);
    if (t === undefined) return null;
    this.servedBy.delete(index);
    if (t < 0) return this.local!.stop(index);
    const thread = this.threads[t]!;
    try {
      return thread.stop(index);
    } catch (e) {
      log.error(`${(e as Error).message}; replacing that queue thread`);
      this.replace(t);
      return null;
    }
  }

  /** Indices of the queues being served. */
  running(): number[] {
    return [...this.servedBy.keys()];
  }

  dispose(): void {
    this.unwatchMemory?.();
    this.unwatchMemory = null;
    this.watchedMemory = null;
    for (const i of this.running()) this.stop(i);
    this.local?.dispose?.();
    this.local = null;
    for (const t of this.threads) t?.terminate();
    this.threads.length = 0;
  }
}
