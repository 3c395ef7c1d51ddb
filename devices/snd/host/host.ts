// The one interface every host-audio backend (null, file, alsa) implements for the snd device.
// A backend knows what each stream can do (caps) and, per prepared stream, builds the engine that
// decides when each held guest buffer completes: the Pacer on the host clock for null and file
// (they consume instantly), ALSA's own clock for alsa. Moving bytes between guest buffers and the
// host, and the gain, stay in the device: engines only see HeldBuffers and call back.
import type { EventLoop } from "../../../src/event_loop.ts";
import type { DescriptorChain } from "../../../src/chain.ts";
import type { PcmCaps } from "../formats.ts";
import type { PcmParams } from "../stream.ts";
import type { SndStreamSpec } from "../options.ts";

/** A tx or rx chain the device holds until its period is played or captured. */
export interface HeldBuffer {
  chain: DescriptorChain;
  streamId: number;
  /** PCM bytes: what a tx chain carries after its header, or what an rx chain has room for. */
  bytes: number;
}

/** What an engine may ask of the device. */
export interface EngineContext {
  loop: EventLoop;
  /** A tx buffer's PCM, read from guest memory with the output gain applied. */
  pcmOf(b: HeldBuffer): Uint8Array;
  /** Completes `b`: tx with an OK status and `latencyBytes`; rx with `data` (null: none captured). */
  complete(b: HeldBuffer, latencyBytes: number, data: Uint8Array | null): void;
  /** The stream ran dry (the device sends EVT_PCM_XRUN if the stream negotiated it). */
  xrun(): void;
  /** Publishes what complete() added (once per batch). */
  flush(): void;
}

/** The timing and host side of one prepared stream, from PREPARE until RELEASE. */
export interface StreamEngine {
  /** A new buffer (pre-buffered before START, or while running or paused). */
  push(b: HeldBuffer): void;
  start(): void;
  /** PCM_STOP (pause): what is due completes, the rest stays held. */
  stop(): void;
  /** PCM_RELEASE: every held buffer completes now, unplayed (rx without data). */
  release(): void;
  /**
   * The ring stops (GET_VRING_BASE, suspend): hands back every held buffer, oldest first, without
   * completing them, and stops the clock; attach() resumes it when the ring runs again.
   */
  detach(): HeldBuffer[];
  attach(): void;
  /** RELEASE done or the device resets: host resources go (the file backend fixes the header). */
  close(): void;
}

/** A file-backend stream's state across a snapshot (where its output continues). */
export type HostStreamState = { path: string; part: number } | null;

export interface SndHost {
  readonly kind: "null" | "file" | "alsa";
  caps(s: SndStreamSpec): PcmCaps;
  /** PREPARE: the engine for `s` with `params` (opening or reusing host files and devices). */
  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine;
  /** All rings stopped: make host files consistent (WAV sizes written), nothing is closed. */
  suspend(): void;
  snapshot(): HostStreamState[];
  /** Checks and applies saved per-stream state; called before streams are reopened. */
  restore(s: unknown): void;
  dispose(): void;
}
