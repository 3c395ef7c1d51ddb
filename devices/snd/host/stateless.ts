// What the null and ALSA hosts have in common: they offer every format the device can convert
// (hostCaps), and nothing of theirs outlives a stream (no files to finish on suspend, no state in a
// snapshot: one null per stream, nothing to restore or dispose). Each says only how to open a stream.
import { hostCaps, type PcmCaps } from "../formats.ts";
import type { PcmParams } from "../stream.ts";
import type { SndStreamSpec } from "../options.ts";
import type { EngineContext, HostStreamState, SndHost, StreamEngine } from "./host.ts";

export abstract class StatelessHost implements SndHost {
  abstract readonly kind: SndHost["kind"];

  constructor(private readonly streamCount: number) {}

  caps(_s: SndStreamSpec): PcmCaps {
    return hostCaps();
  }

  abstract open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine;

  suspend(): void {}

  snapshot(): HostStreamState[] {
    return Array.from({ length: this.streamCount }, () => null);
  }

  restore(_s: unknown): void {}

  dispose(): void {}
}
