// One PCM stream's control state: the command lifecycle of virtio 1.2 §5.14.6.6.1 and the
// parameters the driver set, checked against what the stream can do. Requests in the wrong state
// or with parameters outside the capabilities get a status, never an exception, so the control
// queue handler only has to turn the status into a reply. Timing lives in pacing.ts.
import * as P from "./protocol.ts";
import { bytesPerSample, formatInfo, frameBytes, rateHz, type PcmCaps } from "./formats.ts";

/**
 * `idle` is the state before the first SET_PARAMS (or after a device reset): the spec's lifecycle
 * starts at SET PARAMETERS, and Linux always sends it before PREPARE. The others are named after
 * the command that entered them.
 */
export type PcmState = "idle" | "params" | "prepared" | "running" | "stopped" | "released";

import type { PcmParams } from "./protocol.ts";
export type { PcmParams };

/** The largest hardware buffer accepted (Linux asks at most ~1 MB: 160 ms of 8 × 4 bytes at 192 kHz). */
export const MAX_BUFFER_BYTES = 4 * 1024 * 1024;

/** virtio 1.2 §5.14.6.6.1: from which states each command may be given. */
const LEGAL_FROM: Record<P.PcmCode | typeof P.R_PCM_SET_PARAMS, readonly PcmState[]> = {
  [P.R_PCM_SET_PARAMS]: ["idle", "params", "prepared", "released"],
  [P.R_PCM_PREPARE]: ["params", "prepared", "released"],
  [P.R_PCM_START]: ["prepared", "stopped"],
  [P.R_PCM_STOP]: ["running"],
  [P.R_PCM_RELEASE]: ["prepared", "stopped"],
};

const ENTERS: Record<P.PcmCode | typeof P.R_PCM_SET_PARAMS, PcmState> = {
  [P.R_PCM_SET_PARAMS]: "params",
  [P.R_PCM_PREPARE]: "prepared",
  [P.R_PCM_START]: "running",
  [P.R_PCM_STOP]: "stopped",
  [P.R_PCM_RELEASE]: "released",
};

const COMMAND_NAMES: Record<number, string> = {
  [P.R_PCM_SET_PARAMS]: "SET_PARAMS",
  [P.R_PCM_PREPARE]: "PREPARE",
  [P.R_PCM_START]: "START",
  [P.R_PCM_STOP]: "STOP",
  [P.R_PCM_RELEASE]: "RELEASE",
};

export interface StreamResult {
  status: P.SndStatus;
  /** Why a request was refused, for the log. */
  error?: string;
}

/**
 * Checks SET_PARAMS against the stream's capabilities. Values the spec does not define, or that
 * break its rules (period not dividing the buffer), are BAD_MSG; defined values this stream does
 * not offer are NOT_SUPP.
 */
export function checkParams(p: PcmParams, caps: PcmCaps): StreamResult {
  const fail = (status: P.SndStatus, error: string): StreamResult => ({ status, error });
  if (p.format >= P.FMT_COUNT) return fail(P.S_BAD_MSG, `format ${p.format} is not defined`);
  if (rateHz(p.rate) === null) return fail(P.S_BAD_MSG, `rate ${p.rate} is not defined`);
  if ((p.features & ~P.PCM_F_DEFINED_MASK) !== 0) return fail(P.S_BAD_MSG, `features 0x${p.features.toString(16)} include undefined bits`);
  const shmem = (1 << P.PCM_F_SHMEM_HOST) | (1 << P.PCM_F_SHMEM_GUEST);
  if ((p.features & shmem) === shmem) return fail(P.S_BAD_MSG, "SHMEM_HOST and SHMEM_GUEST together");
  if (((caps.formats >>> p.format) & 1) === 0 || formatInfo(p.format) === null) return fail(P.S_NOT_SUPP, `format ${p.format} is not offered`);
  if (((caps.rates >>> p.rate) & 1) === 0) return fail(P.S_NOT_SUPP, `rate ${rateHz(p.rate)} Hz is not offered`);
  if ((p.features & ~caps.features) !== 0) return fail(P.S_NOT_SUPP, `features 0x${p.features.toString(16)} are not all offered`);
  if (p.channels < caps.channelsMin || p.channels > caps.channelsMax) {
    return fail(P.S_NOT_SUPP, `${p.channels} channels outside ${caps.channelsMin}-${caps.channelsMax}`);
  }
  if (p.periodBytes === 0 || p.bufferBytes === 0) return fail(P.S_BAD_MSG, "empty buffer or period");
  if (p.bufferBytes % p.periodBytes !== 0) return fail(P.S_BAD_MSG, `period ${p.periodBytes} does not divide buffer ${p.bufferBytes}`);
  const frame = frameBytes(p.format, p.channels);
  if (p.periodBytes % frame !== 0) return fail(P.S_BAD_MSG, `period ${p.periodBytes} is not a whole number of ${frame}-byte frames`);
  if (p.bufferBytes > MAX_BUFFER_BYTES) return fail(P.S_NOT_SUPP, `buffer ${p.bufferBytes} bytes is larger than ${MAX_BUFFER_BYTES}`);
  return { status: P.S_OK };
}

export class PcmStream {
  state: PcmState = "idle";
  params: PcmParams | null = null;

  constructor(
    readonly id: number,
    readonly direction: P.Direction,
    /** The HDA function group node: streams with the same nid form one guest PCM device. */
    readonly nid: number,
    readonly caps: PcmCaps,
  ) {}

  info(): P.PcmInfo {
    return { nid: this.nid, features: this.caps.features, formats: this.caps.formats, rates: this.caps.rates, direction: this.direction, channelsMin: this.caps.channelsMin, channelsMax: this.caps.channelsMax };
  }

  /** Whether `code` may be given now. */
  allows(code: P.PcmCode | typeof P.R_PCM_SET_PARAMS): boolean {
    return LEGAL_FROM[code].includes(this.state);
  }

  setParams(p: PcmParams): StreamResult {
    if (!this.allows(P.R_PCM_SET_PARAMS)) return this.wrongState(P.R_PCM_SET_PARAMS);
    const r = checkParams(p, this.caps);
    if (r.status !== P.S_OK) return r;
    this.params = { ...p };
    this.state = "params";
    return r;
  }

  /** PREPARE, START, STOP or RELEASE; the caller acts on the new state (pacing, host device). */
  command(code: P.PcmCode): StreamResult {
    if (!this.allows(code)) return this.wrongState(code);
    this.state = ENTERS[code];
    return { status: P.S_OK };
  }

  /** Whether I/O buffers may be queued now: after PREPARE (output pre-buffering, capture's ring) until RELEASE. */
  acceptsIo(): boolean {
    return this.state === "prepared" || this.state === "running" || this.state === "stopped";
  }

  bytesPerFrame(): number {
    const p = this.requireParams();
    return frameBytes(p.format, p.channels);
  }

  bytesPerSecond(): number {
    const p = this.requireParams();
    return bytesPerSample(p.format) * p.channels * rateHz(p.rate)!;
  }

  /** Device reset: back to the power-on state. */
  reset(): void {
    this.state = "idle";
    this.params = null;
  }

  snapshot(): { state: PcmState; params: PcmParams | null } {
    return { state: this.state, params: this.params ? { ...this.params } : null };
  }

  /** Validates completely before changing anything. */
  restore(s: unknown): void {
    if (typeof s !== "object" || s === null) throw new Error(`stream ${this.id}: state is not an object`);
    const o = s as { state?: unknown; params?: unknown };
    const states: readonly PcmState[] = ["idle", "params", "prepared", "running", "stopped", "released"];
    if (!states.includes(o.state as PcmState)) throw new Error(`stream ${this.id}: unknown state ${String(o.state)}`);
    let params: PcmParams | null = null;
    if (o.params !== null && o.params !== undefined) {
      const q = o.params as Record<string, unknown>;
      const keys = ["bufferBytes", "periodBytes", "features", "channels", "format", "rate"] as const;
      for (const k of keys) if (!Number.isInteger(q[k])) throw new Error(`stream ${this.id}: params.${k} is not an integer`);
      params = { bufferBytes: q.bufferBytes as number, periodBytes: q.periodBytes as number, features: q.features as number, channels: q.channels as number, format: q.format as number, rate: q.rate as number };
      const r = checkParams(params, this.caps);
      if (r.status !== P.S_OK) throw new Error(`stream ${this.id}: saved params do not fit: ${r.error}`);
    }
    if (o.state !== "idle" && params === null) throw new Error(`stream ${this.id}: state ${String(o.state)} without params`);
    this.state = o.state as PcmState;
    this.params = params;
  }

  private requireParams(): PcmParams {
    if (!this.params) throw new Error(`stream ${this.id} has no parameters`);
    return this.params;
  }

  private wrongState(code: number): StreamResult {
    return { status: P.S_BAD_MSG, error: `stream ${this.id}: ${COMMAND_NAMES[code]} in state ${this.state}` };
  }
}
