// `backend device snd`: a virtio-snd device over vhost-user (QEMU's vhost-user-snd-pci, crosvm's
// `device snd`), with null, file (WAV) and ALSA host backends, optional jacks and controls.
import type { DeviceDefinition } from "../../src/device.ts";
import * as P from "./protocol.ts";
import { sndHostAccess } from "./host_access.ts";
import { SND_ARGS, parseSndOptions, checkSndPaths, type SndOptions } from "./options.ts";
import { SndDevice, VIRTIO_ID_SOUND } from "./device.ts";
import { probeAlsa } from "./host/alsa.ts";

export const sndDevice: DeviceDefinition<SndOptions> = {
  name: "snd",
  virtioId: VIRTIO_ID_SOUND,
  description:
    "virtio-snd (controlq 0, eventq 1, txq 2, rxq 3): PCM streams paced at their rate, to WAV files, ALSA or nowhere. " +
    "QEMU: -device vhost-user-snd-pci,chardev=s0[,controls=on]",
  capabilities: { type: "sound" },
  example: ["--socket", "/run/vm/snd.sock", "--backend", "file", "--playback-file", "guest-audio.wav"],
  args: SND_ARGS,
  hostSignals: { SIGUSR1: "jack-unplug", SIGUSR2: "jack-plug" },
  parse(raw) {
    const o = parseSndOptions(raw);
    checkSndPaths(o);
    if (o.backend === "alsa") {
      for (const [dir, name] of [[P.D_OUTPUT, o.alsaPlayback], [P.D_INPUT, o.alsaCapture]] as const) {
        if (!o.streams.some((s) => s.direction === dir)) continue;
        try {
          probeAlsa(name, dir);
        } catch (e) {
          throw new Error(`--alsa-${dir === P.D_OUTPUT ? "playback" : "capture"} ${name}: ${(e as Error).message}`);
        }
      }
    }
    return o;
  },
  hostAccess: sndHostAccess,
  create(o, _resources, ctx) {
    return new SndDevice(o, ctx);
  },
};

export default sndDevice;
