// What the sound device may still open after its acquire phase. Host PCMs cannot be opened ahead:
// a WAV file's format is known only at PCM_PREPARE (a format change starts a new file beside the
// first), and an ALSA PCM is opened at PREPARE with the guest's parameters and closed at RELEASE
// (holding a hardware PCM open while the guest is silent would lock other users out). So the
// device declares where those opens may go; the sandbox allows exactly that.
import { dirname, resolve } from "node:path";
import { homedir } from "node:os";
import type { DeclaredPath, HostAccess } from "../../src/host_access.ts";
import { capturePath, playbackPath, type SndOptions } from "./options.ts";
import * as P from "./protocol.ts";

/** ALSA's configuration, plugins and devices, and the sound servers its plugins talk to. */
function alsaAccess(): { paths: DeclaredPath[]; unixSockets: string[] } {
  const runtime = process.env.XDG_RUNTIME_DIR ?? `/run/user/${process.getuid?.() ?? 0}`;
  const paths: DeclaredPath[] = [
    { path: "/usr/share/alsa", rights: ["read"], directory: true },
    { path: "/etc/alsa", rights: ["read"], directory: true },
    { path: "/etc/asound.conf", rights: ["read"] },
    { path: resolve(homedir(), ".asoundrc"), rights: ["read"] },
    { path: "/usr/lib/x86_64-linux-gnu/alsa-lib", rights: ["read"], directory: true },
    { path: "/dev/snd", rights: ["read", "write"], directory: true },
    // The null plugin (and others' silent paths) open these at every PREPARE.
    { path: "/dev/null", rights: ["read", "write"] },
    { path: "/dev/full", rights: ["read"] },
    // The PulseAudio / PipeWire plugins: their client configuration and runtime directory.
    { path: "/etc/pulse", rights: ["read"], directory: true },
    { path: resolve(runtime, "pulse"), rights: ["read", "write"], directory: true },
  ];
  // ALSA_CONFIG_PATH replaces the configuration files ALSA reads (a colon-separated list).
  for (const file of (process.env.ALSA_CONFIG_PATH ?? "").split(":").filter((f) => f !== "")) paths.push({ path: resolve(file), rights: ["read"] });
  const unixSockets = [resolve(runtime, "pulse/native"), resolve(runtime, "pipewire-0")];
  if (process.env.PULSE_SERVER?.startsWith("unix:")) unixSockets.push(process.env.PULSE_SERVER.slice(5));
  return { paths, unixSockets };
}

export function sndHostAccess(o: SndOptions): HostAccess {
  const paths: DeclaredPath[] = [];
  const unixSockets: string[] = [];
  if (o.backend === "file") {
    for (const s of o.streams) {
      if (s.direction === P.D_OUTPUT) {
        // The file and its format-change siblings (OUT-1.wav...) are created in its directory,
        // and opened read-write (the WAV header is rewritten as data grows; an appended file's
        // header is read first).
        paths.push({ path: dirname(resolve(playbackPath(o, s.id))), rights: ["create", "read", "write"], directory: true });
      } else {
        const c = capturePath(o, s.id);
        if (c !== null) paths.push({ path: resolve(c), rights: ["read"] });
      }
    }
  } else if (o.backend === "alsa") {
    const a = alsaAccess();
    paths.push(...a.paths);
    unixSockets.push(...a.unixSockets);
  }
  return {
    paths: dedupe(paths),
    unixSockets,
    tcp: [],
    hostNetwork: false,
    // ALSA's plugins (pulse, pipewire) start their own client threads when a PCM opens.
    threadsAfterAcquire: o.backend === "alsa",
    syscallGroups: o.backend === "alsa" ? ["alsa"] : [],
  };
}

function dedupe(paths: DeclaredPath[]): DeclaredPath[] {
  const seen = new Set<string>();
  return paths.filter((p) => {
    const key = `${p.path}:${p.rights.join(",")}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}
