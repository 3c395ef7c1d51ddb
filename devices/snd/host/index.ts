// Picks the host-audio backend the options name.
import type { SndOptions } from "../options.ts";
import { NullHost } from "./null.ts";
import { FileHost } from "./file.ts";
import { AlsaHost } from "./alsa.ts";
import type { SndHost } from "./host.ts";

export function openHost(o: SndOptions): SndHost {
  switch (o.backend) {
    case "null":
      return new NullHost(o.streams.length);
    case "file":
      return new FileHost(o);
    case "alsa":
      return new AlsaHost(o);
  }
}

export type { SndHost, StreamEngine, HeldBuffer, EngineContext } from "./host.ts";
