// Stream parameters as the host sides need them: bytes per second, and the WAV format.
import { bytesPerSecond, rateHz } from "../formats.ts";
import type { PcmParams } from "../stream.ts";
import type { WavFormat } from "../wav.ts";

export function bytesPerSecondOf(p: PcmParams): number {
  return bytesPerSecond(p.format, p.channels, p.rate);
}

export function wavFormatOf(p: PcmParams): WavFormat {
  return { format: p.format, channels: p.channels, rateHz: rateHz(p.rate)! };
}
