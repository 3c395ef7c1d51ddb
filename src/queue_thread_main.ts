// The body of a queue thread (see queue_thread.ts): builds the device's QueueRunner on its own
// epoll loop and hands it the rings it is given, over borrowed views of the device thread's guest
// mappings. The program's thread entry file (app/) calls serveQueueThread with the way to find a
// device's runner factory, so this library knows no device.
import { EventLoop } from "./event_loop.ts";
import { GuestMemory, MemoryRegion } from "./memory.ts";
import { log, setLogLevel } from "./log.ts";
import { applyThreadSettings } from "./thread_settings.ts";
import type { QueueRunner } from "./device.ts";
import type { EventLoop as Loop } from "./event_loop.ts";
import { type ToQueueThread, SLOT, STOP_ERROR } from "./queue_thread.ts";

declare const self: Worker;

/** This thread's state once "init" has run. */
interface ThreadState {
  loop: EventLoop;
  runner: QueueRunner;
  shared: Int32Array;
}

let state: ThreadState | null = null;
/** The memory table of each ring this thread serves (ring index → its copy), extended by "add-region". */
const memories = new Map<number, GuestMemory>();

/** How a queue thread finds the runner factory of `device` (or of the test module `module`). */
export type RunnerFactoryLookup = (device: string, module: string | undefined) => Promise<((options: unknown, loop: Loop) => QueueRunner) | undefined>;

/** Makes this Worker a queue thread. */
export function serveQueueThread(findRunner: RunnerFactoryLookup): void {
self.onmessage = async (ev: MessageEvent<ToQueueThread>) => {
  const msg = ev.data;
  switch (msg.type) {
    case "init": {
      const shared = new Int32Array(msg.sab);
      try {
        setLogLevel(msg.logLevel);
        applyThreadSettings(msg.settings);
        const factory = await findRunner(msg.device, msg.module);
        if (factory === undefined) throw new Error(`device '${msg.device}' has no queue runner`);
        const loop = new EventLoop();
        state = { loop, runner: factory(msg.options, loop), shared };
        Atomics.store(shared, SLOT.WAKE_FD, loop.wakeFd);
        Atomics.store(shared, SLOT.READY, 1);
      } catch (e) {
        log.error("queue thread failed to start:", e);
        Atomics.store(shared, SLOT.READY, 2);
      }
      Atomics.notify(shared, SLOT.READY);
      state?.loop.run();
      return;
    }
    case "start": {
      const mem = new GuestMemory();
      try {
        for (const r of msg.regions) mem.add(MemoryRegion.borrow(r.desc, r.host));
        memories.set(msg.ring.index, mem);
        state!.runner.start(msg.ring, mem, BigInt(msg.ackedFeatures));
      } catch (e) {
        log.error(`queue ${msg.ring.index}: could not start in its thread:`, e);
      }
      return;
    }
    case "add-region": {
      // The device thread waits for this before acknowledging ADD_MEM_REG: once it returns, every
      // ring here can use the region.
      for (const [index, mem] of memories) {
        try {
          mem.add(MemoryRegion.borrow(msg.region.desc, msg.region.host));
        } catch (e) {
          log.error(`queue ${index}: could not add a memory region:`, e);
        }
      }
      Atomics.add(state!.shared, SLOT.MEM_SEQ, 1);
      Atomics.notify(state!.shared, SLOT.MEM_SEQ);
      return;
    }
    case "stop": {
      memories.delete(msg.index);
      const s = state!.shared;
      let failed: number = STOP_ERROR.NONE;
      try {
        const pos = state!.runner.stop(msg.index);
        if (pos === null) failed = STOP_ERROR.NOT_RUNNING;
        else {
          Atomics.store(s, SLOT.NEXT_AVAIL, pos.nextAvail);
          Atomics.store(s, SLOT.NEXT_USED, pos.nextUsed);
        }
      } catch (e) {
        log.error(`queue ${msg.index}: stop failed:`, e);
        failed = STOP_ERROR.FAILED;
      }
      Atomics.store(s, SLOT.ERROR, failed);
      Atomics.add(s, SLOT.STOP_SEQ, 1);
      Atomics.notify(s, SLOT.STOP_SEQ);
      return;
    }
    case "exit":
      state?.runner.dispose?.();
      state?.loop.stop();
      return;
  }
};
}
