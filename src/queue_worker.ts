// Entry point of a queue thread (see queue_thread.ts): rebuilds the queue from its description
// over the shared guest mappings and runs the device's per-queue module on its own epoll loop.
import { EventLoop } from "./event_loop.ts";
import { GuestMemory, MemoryRegion } from "./memory.ts";
import { Virtqueue } from "./virtqueue.ts";
import { log, setLogLevel } from "./log.ts";
import { DEVICES } from "../devices/index.ts";
import type { DeviceDefinition } from "./device.ts";
import {
  type QueueRunner, type QueueRunnerModule, type ToQueueThread,
  SLOT_READY, SLOT_WAKE_FD, SLOT_STOP_SEQ, SLOT_NEXT_AVAIL, SLOT_NEXT_USED, SLOT_ERROR, ERROR_NOT_RUNNING,
} from "./queue_thread.ts";

declare const self: Worker;

let loop: EventLoop | null = null;
let mod: QueueRunnerModule | null = null;
let options: unknown = null;
let shared: Int32Array | null = null;
const running = new Map<number, { queue: Virtqueue; runner: QueueRunner }>();

self.onmessage = async (ev: MessageEvent<ToQueueThread>) => {
  const msg = ev.data;
  switch (msg.type) {
    case "init": {
      shared = new Int32Array(msg.sab);
      try {
        setLogLevel(msg.logLevel);
        const def = msg.module !== undefined ? ((await import(msg.module)).default as DeviceDefinition) : DEVICES[msg.device];
        if (def?.queueRunner === undefined) throw new Error(`device '${msg.device}' has no queue runner`);
        mod = def.queueRunner;
        options = msg.options;
        loop = new EventLoop();
        Atomics.store(shared, SLOT_WAKE_FD, loop.wakeFd);
        Atomics.store(shared, SLOT_READY, 1);
      } catch (e) {
        log.error("queue thread failed to start:", e);
        Atomics.store(shared, SLOT_READY, 2);
      }
      Atomics.notify(shared, SLOT_READY);
      if (loop !== null) loop.run();
      return;
    }
    case "start": {
      const mem = new GuestMemory();
      for (const r of msg.regions) mem.add(MemoryRegion.borrow(r.desc, r.host));
      try {
        const queue = new Virtqueue(mem, msg.config);
        running.set(queue.index, { queue, runner: mod!.runQueue(queue, mem, loop!, options) });
      } catch (e) {
        log.error(`queue ${msg.config.index}: could not start in its thread:`, e);
      }
      return;
    }
    case "stop": {
      const s = shared!;
      const r = running.get(msg.index);
      let failed = r === undefined ? ERROR_NOT_RUNNING : 0;
      if (r !== undefined) {
        try {
          r.runner.stop();
        } catch (e) {
          log.error(`queue ${msg.index}: stop failed:`, e);
          failed = 1;
        }
        running.delete(msg.index);
        Atomics.store(s, SLOT_NEXT_AVAIL, r.queue.nextAvail);
        Atomics.store(s, SLOT_NEXT_USED, r.queue.nextUsed);
      }
      Atomics.store(s, SLOT_ERROR, failed);
      Atomics.add(s, SLOT_STOP_SEQ, 1);
      Atomics.notify(s, SLOT_STOP_SEQ);
      return;
    }
    case "exit":
      loop?.stop();
      return;
  }
};
