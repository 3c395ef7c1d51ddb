// `--backend null`: output is discarded and capture records silence, both at the stream's rate
// (the Pacer), so a guest sees a sound card that behaves like real hardware without any.
import { hostCaps, silenceByte, type PcmCaps } from "../formats.ts";
import * as P from "../protocol.ts";
import type { PcmParams } from "../stream.ts";
import type { SndStreamSpec } from "../options.ts";
import { PacedEngine } from "./paced_engine.ts";
import { bytesPerSecondOf } from "./params.ts";
import type { EngineContext, HostStreamState, SndHost, StreamEngine } from "./host.ts";

export class NullHost implements SndHost {
  readonly kind = "null";

  constructor(private readonly streamCount: number) {}

  caps(_s: SndStreamSpec): PcmCaps {
    return hostCaps();
  }

  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine {
    const silence = silenceByte(params.format);
    return new PacedEngine(ctx, s.direction, bytesPerSecondOf(params), params.periodBytes, s.direction === P.D_OUTPUT ? {} : { read: (dst) => dst.fill(silence) });
  }

  suspend(): void {}

  snapshot(): HostStreamState[] {
    return Array.from({ length: this.streamCount }, () => null);
  }

  restore(_s: unknown): void {}

  dispose(): void {}
}
