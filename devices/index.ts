// The device registry: every `backend device <name>` the binary serves.
import type { DeviceDefinition } from "../src/device.ts";

export const DEVICES: Record<string, DeviceDefinition<any>> = {};
