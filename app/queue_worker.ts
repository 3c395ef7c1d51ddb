// Entry file of a queue thread (a Worker): the library's queue thread, finding a device's runner
// factory in the registry (or, for tests, in a module whose default export is a DeviceDefinition).
import { serveQueueThread } from "../src/queue_thread_main.ts";
import type { DeviceDefinition } from "../src/device.ts";
import { DEVICES } from "./registry.ts";

serveQueueThread(async (device, module) => {
  const def = module !== undefined ? ((await import(module)).default as DeviceDefinition<any, any>) : DEVICES[device];
  return def?.queueRunner;
});
