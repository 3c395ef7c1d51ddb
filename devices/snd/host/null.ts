// `--backend null`: output is discarded and capture records silence, both at the stream's rate
// (the Pacer), so a guest sees a sound card that behaves like real hardware without any.
import { silenceByte } from "../formats.ts";
import * as P from "../protocol.ts";
import type { PcmParams } from "../stream.ts";
import type { SndStreamSpec } from "../options.ts";
import { PacedEngine } from "./paced_engine.ts";
import { bytesPerSecondOf } from "./params.ts";
import type { EngineContext, StreamEngine } from "./host.ts";
import { StatelessHost } from "./stateless.ts";

export class NullHost extends StatelessHost {
  readonly kind = "null";

  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine {
    const silence = silenceByte(params.format);
    return new PacedEngine(ctx, s.direction, bytesPerSecondOf(params), params.periodBytes, s.direction === P.D_OUTPUT ? {} : { read: (dst) => dst.fill(silence) });
  }
}
