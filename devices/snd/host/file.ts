// `--backend file`: each output stream writes a WAV file, each input stream reads one (silence
// without --capture-file or after its end), paced on the host clock like null. A stream keeps its
// file across PREPARE/RELEASE cycles while the format stays the same; a SET_PARAMS with another
// format starts the next file (OUT.wav, then OUT-1.wav, OUT-2.wav...) so nothing is overwritten.
// Headers are written on RELEASE, on suspend (so a snapshot's file is consistent) and on dispose
// (SIGTERM); a restored backend continues the saved file in append mode.
import { statSync } from "node:fs";
import { hostCaps, silenceByte, type PcmCaps } from "../formats.ts";
import * as P from "../protocol.ts";
import type { PcmParams } from "../stream.ts";
import { capturePath, playbackPath, type SndOptions, type SndStreamSpec } from "../options.ts";
import { WavReader, WavWriter, wavCaps, describeWavFormat, type WavFormat } from "../wav.ts";
import { log } from "../../../src/log.ts";
import { PacedEngine } from "./paced_engine.ts";
import { bytesPerSecondOf, wavFormatOf } from "./params.ts";
import type { EngineContext, HostStreamState, SndHost, StreamEngine } from "./host.ts";

interface OutputFile {
  writer: WavWriter | null;
  /** 0: the template path; n: the n-th format change's file. */
  part: number;
  /** Set by restore: the next open continues this file. */
  resume: { path: string; part: number } | null;
}

/** OUT.wav → OUT-1.wav for part 1 (the suffix goes before the extension). */
export function partPath(base: string, part: number): string {
  if (part === 0) return base;
  const dot = base.lastIndexOf(".");
  const slash = base.lastIndexOf("/");
  return dot > slash ? `${base.slice(0, dot)}-${part}${base.slice(dot)}` : `${base}-${part}`;
}

function sameFormat(a: WavFormat, b: WavFormat): boolean {
  return a.format === b.format && a.channels === b.channels && a.rateHz === b.rateHz;
}

export class FileHost implements SndHost {
  readonly kind = "file";
  private readonly outputs = new Map<number, OutputFile>();
  private readonly readers = new Map<number, WavReader>();

  constructor(private readonly o: SndOptions) {
    try {
      for (const s of o.streams) {
        if (s.direction === P.D_OUTPUT) this.outputs.set(s.id, { writer: null, part: 0, resume: null });
        else {
          const path = capturePath(o, s.id);
          if (path !== null) this.readers.set(s.id, WavReader.open(path));
        }
      }
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  caps(s: SndStreamSpec): PcmCaps {
    const r = this.readers.get(s.id);
    return r ? wavCaps(r.format) : hostCaps();
  }

  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine {
    const bps = bytesPerSecondOf(params);
    if (s.direction === P.D_INPUT) {
      const reader = this.readers.get(s.id) ?? null;
      reader?.rewind();
      const silence = silenceByte(params.format);
      return new PacedEngine(ctx, s.direction, bps, params.periodBytes, { read: (dst) => (reader ? reader.read(dst) : dst.fill(silence)) });
    }
    const writer = this.writerFor(s.id, wavFormatOf(params));
    return new PacedEngine(ctx, s.direction, bps, params.periodBytes, {
      write: (pcm) => {
        writer.write(pcm);
      },
      close: () => writer.updateHeader(),
    });
  }

  private writerFor(id: number, fmt: WavFormat): WavWriter {
    const out = this.outputs.get(id)!;
    if (out.resume !== null) {
      const { path, part } = out.resume;
      out.resume = null;
      out.writer?.finalize();
      out.part = part;
      out.writer = WavWriter.open(path, fmt, { append: true, maxDataBytes: this.o.playbackMaxBytes ?? undefined });
      return out.writer;
    }
    if (out.writer !== null && sameFormat(out.writer.format, fmt)) return out.writer;
    if (out.writer !== null) {
      out.writer.finalize();
      out.part++;
      log.info(`snd stream ${id}: now ${describeWavFormat(fmt)}, writing ${partPath(playbackPath(this.o, id), out.part)}`);
    }
    out.writer = WavWriter.open(partPath(playbackPath(this.o, id), out.part), fmt, {
      append: this.o.playbackAppend,
      maxDataBytes: this.o.playbackMaxBytes ?? undefined,
    });
    return out.writer;
  }

  suspend(): void {
    for (const out of this.outputs.values()) out.writer?.updateHeader();
  }

  snapshot(): HostStreamState[] {
    return this.o.streams.map((s) => {
      const out = this.outputs.get(s.id);
      if (!out || out.writer === null) return null;
      return { path: out.writer.path, part: out.part };
    });
  }

  restore(state: unknown): void {
    if (!Array.isArray(state) || state.length !== this.o.streams.length) throw new Error("snd host state: one entry per stream expected");
    state.forEach((e, i) => {
      if (e === null) return;
      const o = e as { path?: unknown; part?: unknown };
      if (typeof o.path !== "string" || !Number.isInteger(o.part) || !this.outputs.has(i)) throw new Error(`snd host state: stream ${i}: malformed file entry`);
    });
    state.forEach((e, i) => {
      if (e !== null) this.outputs.get(i)!.resume = e as { path: string; part: number };
    });
  }

  dispose(): void {
    for (const out of this.outputs.values()) {
      const w = out.writer;
      out.writer = null;
      if (w === null) continue;
      // A restored backend may have continued this file: leave its header to it.
      let grown = false;
      try {
        grown = statSync(w.path).size > w.expectedFileSize;
      } catch {
        // gone: nothing to fix
      }
      if (grown) w.close();
      else w.finalize();
    }
    for (const r of this.readers.values()) r.close();
    this.readers.clear();
  }
}
