// The device registry: every `backend device <name>` the binary serves.
import type { DeviceDefinition } from "../src/device.ts";

export const DEVICES: Record<string, DeviceDefinition<any>> = {};
import { blockDevice } from "./block/index.ts";
DEVICES.block = blockDevice;
import { consoleDevice } from "./console/index.ts";
DEVICES.console = consoleDevice;
