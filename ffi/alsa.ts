// Thin, typed bindings to libasound.so.2 (ALSA's PCM API) through bun:ffi, for the snd device's
// alsa backend. Opened lazily on first use, so the binary runs without libasound until someone
// asks for `--backend alsa`. Every function is one ALSA call; errors come back as negative errno
// values (ALSA's convention) and alsaCheck() turns them into AlsaError with snd_strerror's text.
import { dlopen, FFIType, JSCallback, ptr, type Pointer } from "bun:ffi";
import { libc } from "./libc.ts";

const SYMBOLS = {
  snd_strerror: { args: ["i32"], returns: "cstring" },
  // The calling thread's error handler (snd_local_error_handler_t: a va_list, not varargs).
  snd_lib_error_set_local: { args: ["ptr"], returns: "ptr" },
  snd_pcm_open: { args: ["ptr", "cstring", "i32", "i32"], returns: "i32" },
  snd_pcm_close: { args: ["ptr"], returns: "i32" },
  snd_pcm_name: { args: ["ptr"], returns: "cstring" },
  snd_pcm_state: { args: ["ptr"], returns: "i32" },
  snd_pcm_nonblock: { args: ["ptr", "i32"], returns: "i32" },
  snd_pcm_hw_params_sizeof: { args: [], returns: FFIType.u64_fast },
  snd_pcm_hw_params_any: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_set_access: { args: ["ptr", "ptr", "i32"], returns: "i32" },
  snd_pcm_hw_params_set_format: { args: ["ptr", "ptr", "i32"], returns: "i32" },
  snd_pcm_hw_params_set_channels: { args: ["ptr", "ptr", "u32"], returns: "i32" },
  snd_pcm_hw_params_set_rate: { args: ["ptr", "ptr", "u32", "i32"], returns: "i32" },
  snd_pcm_hw_params_set_rate_near: { args: ["ptr", "ptr", "ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_set_rate_resample: { args: ["ptr", "ptr", "u32"], returns: "i32" },
  snd_pcm_hw_params_set_period_size_near: { args: ["ptr", "ptr", "ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_set_buffer_size_near: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_get_period_size: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_get_buffer_size: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_get_channels_min: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_get_channels_max: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_hw_params_test_format: { args: ["ptr", "ptr", "i32"], returns: "i32" },
  snd_pcm_hw_params_test_rate: { args: ["ptr", "ptr", "u32", "i32"], returns: "i32" },
  snd_pcm_hw_params_test_channels: { args: ["ptr", "ptr", "u32"], returns: "i32" },
  snd_pcm_sw_params_sizeof: { args: [], returns: FFIType.u64_fast },
  snd_pcm_sw_params_current: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_sw_params: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_sw_params_set_start_threshold: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  snd_pcm_sw_params_set_avail_min: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  snd_pcm_prepare: { args: ["ptr"], returns: "i32" },
  snd_pcm_start: { args: ["ptr"], returns: "i32" },
  snd_pcm_drop: { args: ["ptr"], returns: "i32" },
  snd_pcm_drain: { args: ["ptr"], returns: "i32" },
  snd_pcm_pause: { args: ["ptr", "i32"], returns: "i32" },
  snd_pcm_recover: { args: ["ptr", "i32", "i32"], returns: "i32" },
  snd_pcm_writei: { args: ["ptr", "ptr", "u64"], returns: FFIType.i64_fast },
  snd_pcm_readi: { args: ["ptr", "ptr", "u64"], returns: FFIType.i64_fast },
  snd_pcm_avail_update: { args: ["ptr"], returns: FFIType.i64_fast },
  snd_pcm_delay: { args: ["ptr", "ptr"], returns: "i32" },
  snd_pcm_poll_descriptors_count: { args: ["ptr"], returns: "i32" },
  snd_pcm_poll_descriptors: { args: ["ptr", "ptr", "u32"], returns: "i32" },
  snd_pcm_poll_descriptors_revents: { args: ["ptr", "ptr", "u32", "ptr"], returns: "i32" },
} as const;

type AlsaSymbols = ReturnType<typeof dlopen<typeof SYMBOLS>>["symbols"];

let lib: AlsaSymbols | null = null;

/** dlopens `name` (not cached); throws a message saying what to install. */
export function loadAlsa(name = "libasound.so.2"): AlsaSymbols {
  try {
    return dlopen(name, SYMBOLS).symbols;
  } catch (e) {
    throw new Error(`the alsa backend needs ${name} (Debian: apt-get install libasound2): ${(e as Error).message}`);
  }
}

/** Where libasound's own error messages go (instead of its "ALSA lib ..." lines on stderr). */
let errorSink: ((message: string) => void) | null = null;
let errorHandler: JSCallback | null = null;
const errorText = new Uint8Array(1024);

/**
 * Sends libasound's error messages of the threads that use it to `sink`, one formatted message
 * each (file:line (function): text). The handler is ALSA's thread-local one, installed in each
 * thread on its first ALSA call and called synchronously there; threads of ALSA's plugins keep
 * the default (stderr).
 */
export function captureAlsaErrors(sink: (message: string) => void): void {
  errorSink = sink;
  if (lib !== null) installErrorHandler(lib);
}

function installErrorHandler(s: AlsaSymbols): void {
  if (errorSink === null || errorHandler !== null) return;
  try {
    errorHandler = makeErrorHandler(s);
  } catch {
    return; // no callback (a sandbox refusing its code page...): ALSA keeps writing to stderr
  }
  s.snd_lib_error_set_local(errorHandler.ptr);
}

function makeErrorHandler(s: AlsaSymbols): JSCallback {
  return new JSCallback(
    (file: string, line: number, func: string, err: number, fmt: number, args: number) => {
      const n = libc.vsnprintf(errorText, errorText.length, fmt, args);
      const text = new TextDecoder().decode(errorText.subarray(0, Math.max(0, Math.min(n, errorText.length - 1))));
      errorSink?.(`${file}:${line} (${func}): ${text}${err !== 0 ? ` (${String(s.snd_strerror(err < 0 ? err : -err))})` : ""}`);
    },
    { args: ["cstring", "i32", "cstring", "i32", "ptr", "ptr"], returns: "void" },
  );
}

/** The libasound symbols, opened on first call. */
export function alsa(): AlsaSymbols {
  if (lib === null) {
    lib = loadAlsa();
    installErrorHandler(lib);
  }
  return lib;
}

export const SND_PCM_STREAM_PLAYBACK = 0;
export const SND_PCM_STREAM_CAPTURE = 1;
export const SND_PCM_NONBLOCK = 0x1;
export const SND_PCM_ACCESS_RW_INTERLEAVED = 3;

export const SND_PCM_FORMAT_U8 = 1;
export const SND_PCM_FORMAT_S16_LE = 2;
export const SND_PCM_FORMAT_S24_LE = 6;
export const SND_PCM_FORMAT_S32_LE = 10;
export const SND_PCM_FORMAT_FLOAT_LE = 14;
export const SND_PCM_FORMAT_S24_3LE = 32;

export const SND_PCM_STATE_OPEN = 0;
export const SND_PCM_STATE_SETUP = 1;
export const SND_PCM_STATE_PREPARED = 2;
export const SND_PCM_STATE_RUNNING = 3;
export const SND_PCM_STATE_XRUN = 4;
export const SND_PCM_STATE_DRAINING = 5;
export const SND_PCM_STATE_PAUSED = 6;
export const SND_PCM_STATE_SUSPENDED = 7;
export const SND_PCM_STATE_DISCONNECTED = 8;

// The errno values ALSA's calls return negated (EAGAIN: libc's, re-exported).
export { EAGAIN } from "./libc.ts";
export const EPIPE = 32;
export const ESTRPIPE = 86;

/** A failed ALSA call: which call, the negative error code, snd_strerror's text. */
export class AlsaError extends Error {
  constructor(readonly call: string, readonly code: number) {
    super(`${call}: ${String(alsa().snd_strerror(code))} (${code})`);
    this.name = "AlsaError";
  }
}

/** Returns `ret` when >= 0, throws AlsaError naming `call` otherwise. */
export function alsaCheck(ret: number, call: string): number {
  if (ret < 0) throw new AlsaError(call, ret);
  return ret;
}

export function strerror(code: number): string {
  return String(alsa().snd_strerror(code));
}

/** An open snd_pcm_t*. */
export type PcmHandle = Pointer;

const handleOut = new BigUint64Array(1);

/** The pointer a call that allocates (`ret` its result) stored through handleOut; throws AlsaError naming `call` if it failed. */
function allocated(ret: number, call: string): Pointer {
  alsaCheck(ret, call);
  return Number(handleOut[0]) as Pointer;
}

/** snd_pcm_open(name, stream, mode); mode SND_PCM_NONBLOCK keeps writei/readi from sleeping. */
export function pcmOpen(name: string, stream: number, mode: number): PcmHandle {
  return allocated(alsa().snd_pcm_open(handleOut, Buffer.from(`${name}\0`), stream, mode), `snd_pcm_open ${name}`);
}

export function pcmClose(pcm: PcmHandle): void {
  alsa().snd_pcm_close(pcm);
}

/**
 * A zeroed snd_pcm_hw_params_t in memory of ours, as snd_pcm_hw_params_alloca makes one: ALSA
 * gives the size, nothing needs freeing, and ALSA keeps no pointer to it between calls.
 */
export function hwParams(): Uint8Array {
  return new Uint8Array(Number(alsa().snd_pcm_hw_params_sizeof()));
}

/** A zeroed snd_pcm_sw_params_t, as snd_pcm_sw_params_alloca makes one (see hwParams). */
export function swParams(): Uint8Array {
  return new Uint8Array(Number(alsa().snd_pcm_sw_params_sizeof()));
}

const u32Out = new Uint32Array(1);
const i32Dir = new Int32Array(1);
const ulongOut = new BigUint64Array(1);

/** snd_pcm_hw_params_set_rate_near: returns the rate ALSA chose. */
export function hwSetRateNear(pcm: PcmHandle, hw: Uint8Array, rate: number): number {
  u32Out[0] = rate;
  i32Dir[0] = 0;
  alsaCheck(alsa().snd_pcm_hw_params_set_rate_near(pcm, hw, u32Out, i32Dir), "snd_pcm_hw_params_set_rate_near");
  return u32Out[0]!;
}

/** snd_pcm_hw_params_set_period_size_near (frames): returns the size ALSA chose. */
export function hwSetPeriodSizeNear(pcm: PcmHandle, hw: Uint8Array, frames: number): number {
  ulongOut[0] = BigInt(frames);
  i32Dir[0] = 0;
  alsaCheck(alsa().snd_pcm_hw_params_set_period_size_near(pcm, hw, ulongOut, i32Dir), "snd_pcm_hw_params_set_period_size_near");
  return Number(ulongOut[0]);
}

/** snd_pcm_hw_params_set_buffer_size_near (frames): returns the size ALSA chose. */
export function hwSetBufferSizeNear(pcm: PcmHandle, hw: Uint8Array, frames: number): number {
  ulongOut[0] = BigInt(frames);
  alsaCheck(alsa().snd_pcm_hw_params_set_buffer_size_near(pcm, hw, ulongOut), "snd_pcm_hw_params_set_buffer_size_near");
  return Number(ulongOut[0]);
}

export function hwGetPeriodSize(hw: Uint8Array): number {
  alsaCheck(alsa().snd_pcm_hw_params_get_period_size(hw, ulongOut, i32Dir), "snd_pcm_hw_params_get_period_size");
  return Number(ulongOut[0]);
}

export function hwGetBufferSize(hw: Uint8Array): number {
  alsaCheck(alsa().snd_pcm_hw_params_get_buffer_size(hw, ulongOut), "snd_pcm_hw_params_get_buffer_size");
  return Number(ulongOut[0]);
}

export function hwGetChannelsRange(hw: Uint8Array): { min: number; max: number } {
  alsaCheck(alsa().snd_pcm_hw_params_get_channels_min(hw, u32Out), "snd_pcm_hw_params_get_channels_min");
  const min = u32Out[0]!;
  alsaCheck(alsa().snd_pcm_hw_params_get_channels_max(hw, u32Out), "snd_pcm_hw_params_get_channels_max");
  return { min, max: u32Out[0]! };
}

/** snd_pcm_writei: frames written, or a negative error (-EAGAIN when full in non-blocking mode, -EPIPE on underrun). */
export function writei(pcm: PcmHandle, buf: Uint8Array, frames: number): number {
  return Number(alsa().snd_pcm_writei(pcm, ptr(buf), BigInt(frames)));
}

/** snd_pcm_readi: frames read, or a negative error (-EAGAIN when empty, -EPIPE on overrun). */
export function readi(pcm: PcmHandle, buf: Uint8Array, frames: number): number {
  return Number(alsa().snd_pcm_readi(pcm, ptr(buf), BigInt(frames)));
}

/** snd_pcm_delay (frames), or throws. */
export function delay(pcm: PcmHandle): number {
  const out = new BigInt64Array(1);
  alsaCheck(alsa().snd_pcm_delay(pcm, out), "snd_pcm_delay");
  return Number(out[0]);
}

/** struct pollfd is { int fd; short events; short revents; }: 8 bytes each. */
export const POLLFD_BYTES = 8;

/** The pollfds to watch (epoll them; translate readiness with pollRevents). */
export function pollDescriptors(pcm: PcmHandle): { fds: Uint8Array; count: number } {
  const count = alsaCheck(alsa().snd_pcm_poll_descriptors_count(pcm), "snd_pcm_poll_descriptors_count");
  const fds = new Uint8Array(Math.max(1, count) * POLLFD_BYTES);
  const got = alsaCheck(alsa().snd_pcm_poll_descriptors(pcm, fds, count), "snd_pcm_poll_descriptors");
  return { fds, count: got };
}

/** snd_pcm_poll_descriptors_revents over pollfds whose revents the caller filled in. */
export function pollRevents(pcm: PcmHandle, fds: Uint8Array, count: number): number {
  const rev = new Uint16Array(1);
  alsaCheck(alsa().snd_pcm_poll_descriptors_revents(pcm, fds, count, rev), "snd_pcm_poll_descriptors_revents");
  return rev[0]!;
}
