// Sample formats and frame rates: what a virtio format or rate index means in bytes and Hz, and
// the capability sets (PCM_INFO) the host backends offer. The one place that knows S24 is 24 bits
// in a 4-byte container (ALSA S24_LE), so sizes and conversions elsewhere never guess.
import * as P from "./protocol.ts";

export type SampleKind = "unsigned" | "signed" | "float";

export interface SampleFormat {
  format: number;
  name: string;
  /** Bytes each sample occupies in a frame (the container). */
  bytes: number;
  /** Bits that carry the sample (24 for S24 and S24_3). */
  validBits: number;
  kind: SampleKind;
}

/** The formats the host side can move, convert and scale; the others are refused at SET_PARAMS. */
const FORMATS: Record<number, SampleFormat> = {
  [P.FMT_U8]: { format: P.FMT_U8, name: "U8", bytes: 1, validBits: 8, kind: "unsigned" },
  [P.FMT_S16]: { format: P.FMT_S16, name: "S16_LE", bytes: 2, validBits: 16, kind: "signed" },
  [P.FMT_S24_3]: { format: P.FMT_S24_3, name: "S24_3LE", bytes: 3, validBits: 24, kind: "signed" },
  [P.FMT_S24]: { format: P.FMT_S24, name: "S24_LE", bytes: 4, validBits: 24, kind: "signed" },
  [P.FMT_S32]: { format: P.FMT_S32, name: "S32_LE", bytes: 4, validBits: 32, kind: "signed" },
  [P.FMT_FLOAT]: { format: P.FMT_FLOAT, name: "FLOAT_LE", bytes: 4, validBits: 32, kind: "float" },
};

export function formatInfo(format: number): SampleFormat | null {
  return FORMATS[format] ?? null;
}

export function bytesPerSample(format: number): number {
  const f = FORMATS[format];
  if (!f) throw new Error(`sample format ${format} is not supported here`);
  return f.bytes;
}

export function frameBytes(format: number, channels: number): number {
  return bytesPerSample(format) * channels;
}

/** The byte that fills silence: 0x80 for unsigned 8-bit, 0 for every signed and float format. */
export function silenceByte(format: number): number {
  return format === P.FMT_U8 ? 0x80 : 0;
}

const RATE_HZ: readonly number[] = [5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000, 384000, 12000, 24000];

/** Frames per second of a RATE_* index, or null for an index the spec does not define. */
export function rateHz(rate: number): number | null {
  return Number.isInteger(rate) && rate >= 0 && rate < RATE_HZ.length ? RATE_HZ[rate]! : null;
}

/** The RATE_* index of a frequency, or null when virtio-snd has no such rate. */
export function rateIndex(hz: number): number | null {
  const i = RATE_HZ.indexOf(hz);
  return i < 0 ? null : i;
}

export function bytesPerSecond(format: number, channels: number, rate: number): number {
  const hz = rateHz(rate);
  if (hz === null) throw new Error(`rate index ${rate} is not defined`);
  return frameBytes(format, channels) * hz;
}

/** What one stream accepts; PCM_INFO reports it and SET_PARAMS is checked against it. */
export interface PcmCaps {
  /** Bit map of 1 << FMT_*. */
  formats: number;
  /** Bit map of 1 << RATE_*. */
  rates: number;
  channelsMin: number;
  channelsMax: number;
  /** Bit map of 1 << PCM_F_* the stream supports. */
  features: number;
}

export function bits(indexes: readonly number[]): number {
  return indexes.reduce((m, i) => m | (1 << i), 0) >>> 0;
}

/** The formats the null and file backends offer (S24_3 only appears for a packed 24-bit capture file). */
export const HOST_FORMATS: readonly number[] = [P.FMT_U8, P.FMT_S16, P.FMT_S24, P.FMT_S32, P.FMT_FLOAT];
/** 8 kHz to 192 kHz: every rate Linux's virtio-snd driver maps (it knows no 5512 Hz, 384 kHz, 12 or 24 kHz). */
export const HOST_RATES: readonly number[] = [
  P.RATE_8000, P.RATE_11025, P.RATE_16000, P.RATE_22050, P.RATE_32000, P.RATE_44100, P.RATE_48000,
  P.RATE_64000, P.RATE_88200, P.RATE_96000, P.RATE_176400, P.RATE_192000,
];
export const MAX_CHANNELS = 8;

/** The null and file backends take anything they can write or pace: U8..FLOAT, 8-192 kHz, 1-8 channels. */
export function hostCaps(): PcmCaps {
  return { formats: bits(HOST_FORMATS), rates: bits(HOST_RATES), channelsMin: 1, channelsMax: MAX_CHANNELS, features: 1 << P.PCM_F_EVT_XRUNS };
}

/** A capture stream fed from a file offers exactly the file's format, rate and channel count. */
export function fixedCaps(format: number, rate: number, channels: number): PcmCaps {
  return { formats: 1 << format, rates: 1 << rate, channelsMin: channels, channelsMax: channels, features: 1 << P.PCM_F_EVT_XRUNS };
}

export function capsToPcmInfo(caps: PcmCaps, nid: number, direction: P.Direction): P.PcmInfo {
  return { nid, features: caps.features, formats: caps.formats, rates: caps.rates, direction, channelsMin: caps.channelsMin, channelsMax: caps.channelsMax };
}

export function formatNames(mask: number): string[] {
  return Object.values(FORMATS).filter((f) => (mask >>> f.format) & 1).map((f) => f.name);
}
