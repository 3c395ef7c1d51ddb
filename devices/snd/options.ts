// `backend device snd` options: the citty definitions and one parser shared by the main thread
// (validate, so mistakes fail before the socket exists) and the worker (create). crosvm's
// `--config k=v,...` is accepted with crosvm's meaning, as an alternative to our own options.
import { accessSync, constants, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { booleanOption, parseBoolean } from "../../src/cli_args.ts";
import * as P from "./protocol.ts";
import { readWavInfo } from "./wav.ts";

export type SndBackend = "null" | "file" | "alsa";

export const DEFAULT_PLAYBACK_FILE = "snd-out-{stream}.wav";
export const DEFAULT_ALSA_DEVICE = "default";
/** Linux gives a card at most 8 PCM devices with static minors; a nid becomes the PCM device number. */
export const MAX_DEVICES_PER_DIRECTION = 8;
export const MAX_STREAMS_PER_DEVICE = 8;

export const SND_ARGS = {
  backend: { type: "string", valueHint: "null|file|alsa", description: "Where PCM goes: null (paced, discarded; capture is silence), file (WAV files), alsa (a host ALSA PCM). Default: null" },
  streams: { type: "string", valueHint: "out=N,in=M", description: `PCM streams per direction (0-${MAX_DEVICES_PER_DIRECTION} each, one guest PCM device per index: output i and input i share hw:C,i). Default: out=1,in=1` },
  "playback-file": { type: "string", valueHint: "PATH", description: `file backend: the WAV file each output stream writes; {stream} becomes the stream id (needed with several output streams). Default: ${DEFAULT_PLAYBACK_FILE}` },
  "playback-append": { type: "boolean", description: "file backend: continue existing playback files of the same format instead of replacing them" },
  "capture-file": { type: "string", valueHint: "PATH", description: "file backend: the WAV file input streams read (silence after its end; {stream} for one per stream). The capture stream offers exactly the file's format, rate and channels. Default: silence" },
  "alsa-playback": { type: "string", valueHint: "DEV", description: `alsa backend: the host PCM output streams play to. Default: ${DEFAULT_ALSA_DEVICE}` },
  "alsa-capture": { type: "string", valueHint: "DEV", description: `alsa backend: the host PCM input streams record from. Default: ${DEFAULT_ALSA_DEVICE}` },
  controls: { type: "boolean", description: "Offer VIRTIO_SND_F_CTLS with a volume (dB) and a switch per direction: \"Master Playback Volume/Switch\", \"Capture Volume/Switch\"" },
  jacks: { type: "boolean", description: "Offer one jack per direction (headphone out, mic in), reported connected" },
  config: {
    type: "string",
    valueHint: "K=V,...",
    description:
      "crosvm's snd parameters instead of the options above: backend=null|file|alsa, capture=BOOL, num_output_devices, num_input_devices, " +
      "num_output_streams, num_input_streams (streams per device), playback_path=DIR (file backend: DIR/stream-ID.wav), playback_size=BYTES (per file)",
  },
} as const;

export interface SndStreamSpec {
  id: number;
  direction: P.Direction;
  /** HDA function group node: streams sharing it form one guest PCM device (its substreams). */
  nid: number;
}

export interface SndOptions {
  backend: SndBackend;
  /** Outputs first, then inputs; `id` is the virtio stream id. */
  streams: SndStreamSpec[];
  /** A path template: {stream} is replaced by the stream id. */
  playbackFile: string;
  playbackAppend: boolean;
  /** Data bytes at most per playback file (crosvm's playback_size); null: up to the WAV limit. */
  playbackMaxBytes: number | null;
  /** A path template like playbackFile; null: capture is silence. */
  captureFile: string | null;
  /** crosvm's capture=false: input streams exist but record silence. */
  captureEnabled: boolean;
  alsaPlayback: string;
  alsaCapture: string;
  controls: boolean;
  jacks: boolean;
}

function str(raw: Record<string, unknown>, name: string): string | null {
  const v = raw[name];
  if (v === undefined || v === null) return null;
  if (typeof v !== "string" || v === "") throw new Error(`--${name} needs a value`);
  return v;
}

function count(text: string, what: string, max: number): number {
  if (!/^[0-9]+$/.test(text) || Number(text) > max) throw new Error(`${what}: '${text}' is not an integer in 0..${max}`);
  return Number(text);
}

/** `out=N,in=M`: a key left out keeps its default of 1. */
export function parseStreamsSpec(spec: string): { outputs: number; inputs: number } {
  const r = { outputs: 1, inputs: 1 };
  const seen = new Set<string>();
  for (const item of spec.split(",")) {
    if (item === "") continue;
    const [key, value, extra] = item.split("=");
    if (value === undefined || extra !== undefined || value === "") throw new Error(`--streams ${JSON.stringify(spec)}: '${item}' is not KEY=N (e.g. --streams out=2,in=1)`);
    if (seen.has(key!)) throw new Error(`--streams: '${key}' given twice`);
    seen.add(key!);
    if (key === "out") r.outputs = count(value, "--streams out", MAX_DEVICES_PER_DIRECTION);
    else if (key === "in") r.inputs = count(value, "--streams in", MAX_DEVICES_PER_DIRECTION);
    else throw new Error(`--streams: unknown key '${key}' (known: out, in)`);
  }
  if (r.outputs + r.inputs === 0) throw new Error("--streams: at least one stream is needed (out=0,in=0 leaves none)");
  return r;
}

/** Stream ids and nids for `devices` PCM devices per direction with `perDevice` streams each (crosvm's layout). */
export function streamLayout(outDevices: number, outPerDevice: number, inDevices: number, inPerDevice: number): SndStreamSpec[] {
  const out: SndStreamSpec[] = [];
  for (let d = 0; d < outDevices; d++) for (let s = 0; s < outPerDevice; s++) out.push({ id: out.length, direction: P.D_OUTPUT, nid: d });
  for (let d = 0; d < inDevices; d++) for (let s = 0; s < inPerDevice; s++) out.push({ id: out.length, direction: P.D_INPUT, nid: d });
  return out;
}

const CONFIG_KEYS = ["backend", "capture", "num_output_devices", "num_input_devices", "num_output_streams", "num_input_streams", "playback_path", "playback_size"];
/** crosvm keys that only mean something for its CRAS/AAudio backends or its process model. */
const CROSVM_ONLY_KEYS = ["client_type", "socket_type", "card_index", "output_device_config", "input_device_config", "unmap_guest_memory_on_fork"];

function parseBackend(v: string, what: string): SndBackend {
  if (v === "null" || v === "file" || v === "alsa") return v;
  if (v === "cras" || v === "aaudio") throw new Error(`${what}: crosvm's ${v} backend is not available here (use null, file or alsa)`);
  throw new Error(`${what}: '${v}' is not a backend (null, file or alsa)`);
}

interface ConfigResult {
  backend: SndBackend;
  streams: SndStreamSpec[];
  captureEnabled: boolean;
  playbackFile: string | null;
  playbackMaxBytes: number | null;
}

/** crosvm's `--config` string (devices/src/virtio/snd/parameters.rs), with crosvm's defaults of 1 everywhere. */
export function parseCrosvmConfig(spec: string): ConfigResult {
  const what = "--config";
  let backend: SndBackend = "null";
  let captureEnabled = true;
  let playbackFile: string | null = null;
  let playbackMaxBytes: number | null = null;
  const n = { num_output_devices: 1, num_input_devices: 1, num_output_streams: 1, num_input_streams: 1 };
  const seen = new Set<string>();
  for (const item of spec.split(",")) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    const key = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? "" : item.slice(eq + 1);
    if (seen.has(key)) throw new Error(`${what}: '${key}' given twice`);
    seen.add(key);
    if (CROSVM_ONLY_KEYS.includes(key)) throw new Error(`${what}: crosvm's '${key}' is not supported here`);
    if (!CONFIG_KEYS.includes(key)) throw new Error(`${what}: unknown key '${key}' (known: ${CONFIG_KEYS.join(", ")})`);
    if (value === "") throw new Error(`${what}: '${key}' needs a value`);
    switch (key) {
      case "backend":
        backend = parseBackend(value, `${what} backend`);
        break;
      case "capture":
        captureEnabled = parseBoolean(value, `${what} capture`);
        break;
      case "num_output_devices":
      case "num_input_devices":
        n[key] = count(value, `${what} ${key}`, MAX_DEVICES_PER_DIRECTION);
        break;
      case "num_output_streams":
      case "num_input_streams":
        n[key] = count(value, `${what} ${key}`, MAX_STREAMS_PER_DEVICE);
        break;
      case "playback_path":
        playbackFile = join(value, "stream-{stream}.wav");
        break;
      case "playback_size":
        if (!/^[0-9]+$/.test(value) || Number(value) === 0) throw new Error(`${what} playback_size: '${value}' is not a positive number of bytes`);
        playbackMaxBytes = Number(value);
        break;
    }
  }
  const streams = streamLayout(n.num_output_devices, n.num_output_streams, n.num_input_devices, n.num_input_streams);
  if (streams.length === 0) throw new Error(`${what}: no streams (every device or stream count is 0)`);
  if ((playbackFile !== null || playbackMaxBytes !== null) && backend !== "file") throw new Error(`${what}: playback_path and playback_size need backend=file`);
  return { backend, streams, captureEnabled, playbackFile, playbackMaxBytes };
}

/** Parses and checks the options (no file system access); throws a message naming the option. */
export function parseSndOptions(raw: Record<string, unknown>): SndOptions {
  const config = str(raw, "config");
  const ours = ["backend", "streams", "playback-file"].filter((k) => raw[k] !== undefined && raw[k] !== null);
  if (config !== null && ours.length > 0) throw new Error(`--config replaces --${ours.join(", --")}: give one or the other`);
  let backend: SndBackend;
  let streams: SndStreamSpec[];
  let captureEnabled = true;
  let playbackFile = str(raw, "playback-file");
  let playbackMaxBytes: number | null = null;
  if (config !== null) {
    const c = parseCrosvmConfig(config);
    ({ backend, streams, captureEnabled, playbackMaxBytes } = c);
    playbackFile = c.playbackFile;
  } else {
    backend = parseBackend(str(raw, "backend") ?? "null", "--backend");
    const s = parseStreamsSpec(str(raw, "streams") ?? "out=1,in=1");
    streams = streamLayout(s.outputs, 1, s.inputs, 1);
  }
  const captureFile = str(raw, "capture-file");
  const playbackAppend = booleanOption(raw, "playback-append", false);
  const fileOnly = [["playback-file", playbackFile !== null && config === null], ["capture-file", captureFile !== null], ["playback-append", playbackAppend]] as const;
  for (const [name, given] of fileOnly) if (given && backend !== "file") throw new Error(`--${name} needs --backend file (the backend is ${backend})`);
  for (const name of ["alsa-playback", "alsa-capture"]) if (str(raw, name) !== null && backend !== "alsa") throw new Error(`--${name} needs --backend alsa (the backend is ${backend})`);
  const o: SndOptions = {
    backend,
    streams,
    playbackFile: playbackFile ?? DEFAULT_PLAYBACK_FILE,
    playbackAppend,
    playbackMaxBytes,
    captureFile,
    captureEnabled,
    alsaPlayback: str(raw, "alsa-playback") ?? DEFAULT_ALSA_DEVICE,
    alsaCapture: str(raw, "alsa-capture") ?? DEFAULT_ALSA_DEVICE,
    controls: booleanOption(raw, "controls", false),
    jacks: booleanOption(raw, "jacks", false),
  };
  const outputs = streams.filter((s) => s.direction === P.D_OUTPUT).length;
  if (backend === "file" && outputs > 1 && !o.playbackFile.includes("{stream}")) {
    throw new Error(`--playback-file ${o.playbackFile}: ${outputs} output streams would share one file; put {stream} in the name (e.g. out-{stream}.wav)`);
  }
  return o;
}

function fill(template: string, streamId: number): string {
  return template.replaceAll("{stream}", String(streamId));
}

export function playbackPath(o: SndOptions, streamId: number): string {
  return fill(o.playbackFile, streamId);
}

export function capturePath(o: SndOptions, streamId: number): string | null {
  return o.captureFile === null || !o.captureEnabled ? null : fill(o.captureFile, streamId);
}

/**
 * What can be checked before the worker opens anything: capture files are WAVs we can read,
 * playback files can be created. (ALSA devices are opened at PREPARE.)
 */
export function checkSndPaths(o: SndOptions): void {
  if (o.backend !== "file") return;
  for (const s of o.streams) {
    if (s.direction === P.D_INPUT) {
      const path = capturePath(o, s.id);
      if (path !== null) {
        try {
          readWavInfo(path);
        } catch (e) {
          throw new Error(`--capture-file: ${(e as Error).message}`);
        }
      }
    } else {
      const path = playbackPath(o, s.id);
      const dir = dirname(path);
      try {
        if (!statSync(dir).isDirectory()) throw new Error("not a directory");
        accessSync(dir, constants.W_OK);
      } catch {
        throw new Error(`--playback-file ${path}: cannot create files in ${dir} (missing or not writable)`);
      }
    }
  }
}
