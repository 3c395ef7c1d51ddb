// The device registry: every `backend device <name>` the binary serves, keyed by the definition's
// name. A new device is one definition (see docs/adding-a-device.md) and one line here.
import type { DeviceDefinition } from "../src/device.ts";
import { blockDevice } from "../devices/block/index.ts";
import { consoleDevice } from "../devices/console/index.ts";
import { netDevice } from "../devices/net/index.ts";
import { sndDevice } from "../devices/snd/index.ts";

export const DEVICES: Readonly<Record<string, DeviceDefinition<any>>> = {
  block: blockDevice,
  console: consoleDevice,
  net: netDevice,
  snd: sndDevice,
};
