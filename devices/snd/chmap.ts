// Channel maps (CHMAP_INFO): which speaker each channel of an interleaved frame is. Linux turns
// them into each PCM's "Playback/Capture Channel Map" control. The layouts follow the WAVE channel
// order (FL FR FC LFE BL BR ... SL SR), so a file written by the file backend says in its channel
// mask exactly what the guest was told.
import * as P from "./protocol.ts";

const { CHMAP_MONO: MONO, CHMAP_FL: FL, CHMAP_FR: FR, CHMAP_FC: FC, CHMAP_LFE: LFE, CHMAP_RL: RL, CHMAP_RR: RR, CHMAP_SL: SL, CHMAP_SR: SR, CHMAP_RC: RC } = P;

/** The layout for 1-8 channels: mono, stereo, 3.0, quad, 5.0, 5.1, 6.1, 7.1. */
export const STANDARD_LAYOUTS: Readonly<Record<number, readonly number[]>> = {
  1: [MONO],
  2: [FL, FR],
  3: [FL, FR, FC],
  4: [FL, FR, RL, RR],
  5: [FL, FR, FC, RL, RR],
  6: [FL, FR, FC, LFE, RL, RR],
  7: [FL, FR, FC, LFE, RC, SL, SR],
  8: [FL, FR, FC, LFE, RL, RR, SL, SR],
};

/** WAVEFORMATEXTENSIBLE dwChannelMask bit of each position we use (MONO counts as front center). */
const WAVE_SPEAKER: Readonly<Record<number, number>> = {
  [MONO]: 0x4, [FL]: 0x1, [FR]: 0x2, [FC]: 0x4, [LFE]: 0x8, [RL]: 0x10, [RR]: 0x20, [RC]: 0x100, [SL]: 0x200, [SR]: 0x400,
};

/** The WAVE channel mask for `channels` in our standard layout. */
export function waveChannelMask(channels: number): number {
  const layout = STANDARD_LAYOUTS[channels];
  if (!layout) throw new Error(`no standard layout for ${channels} channels`);
  return layout.reduce((m, p) => m | WAVE_SPEAKER[p]!, 0);
}

export interface ChmapOwner {
  nid: number;
  direction: P.Direction;
  channelsMin: number;
  channelsMax: number;
}

/**
 * One map per channel count each PCM device and direction offers. The spec assigns maps to "all
 * streams with the same direction in the same function group", so streams sharing a nid and
 * direction share their maps (the widest range among them wins).
 */
export function buildChmaps(owners: readonly ChmapOwner[]): P.ChmapInfo[] {
  const groups = new Map<string, { nid: number; direction: P.Direction; min: number; max: number }>();
  for (const o of owners) {
    const key = `${o.nid}/${o.direction}`;
    const g = groups.get(key);
    if (g) {
      g.min = Math.min(g.min, o.channelsMin);
      g.max = Math.max(g.max, o.channelsMax);
    } else {
      groups.set(key, { nid: o.nid, direction: o.direction, min: o.channelsMin, max: o.channelsMax });
    }
  }
  const out: P.ChmapInfo[] = [];
  for (const g of groups.values()) {
    for (let ch = g.min; ch <= g.max; ch++) {
      const positions = STANDARD_LAYOUTS[ch];
      if (positions) out.push({ nid: g.nid, direction: g.direction, positions });
    }
  }
  return out;
}
