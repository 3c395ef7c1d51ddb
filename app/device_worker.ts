// Entry file of a device's thread (a Worker): the library's device thread, finding devices in the
// registry (or, for tests, in a module whose default export is a DeviceDefinition).
import { serveDeviceThread } from "../src/device_thread.ts";
import type { DeviceDefinition } from "../src/device.ts";
import { DEVICES } from "./registry.ts";

serveDeviceThread(async (device, module) =>
  module !== undefined ? ((await import(module)).default as DeviceDefinition<any, any>) : DEVICES[device],
);
