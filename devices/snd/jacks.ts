// Jacks for `--jacks`: one per direction that has streams (a headphone jack for output, a mic jack
// for input), described with HDA pin registers as the spec asks. Linux names and types the jack
// from the default-configuration "device" field and reports plug state to user space; a host-side
// plug/unplug becomes a JACK_CONNECTED/DISCONNECTED event. JACK_REMAP rewrites the association and
// sequence fields of the pin configuration, the only thing the spec lets it change.
import * as P from "./protocol.ts";

/**
 * The field values the jacks' pin configuration defaults use (HDA spec 7.3.3.31: [31:30]
 * connectivity, [29:24] location, [23:20] default device, [19:16] connection type, [15:12] color,
 * [11:8] misc, [7:4] default association, [3:0] sequence).
 */
export const DEFCONF = {
  CONN_JACK: 0,
  LOC_EXTERNAL_REAR: 0x01,
  LOC_EXTERNAL_FRONT: 0x02,
  DEVICE_HP_OUT: 0x2,
  DEVICE_MIC_IN: 0xa,
  CONN_EIGHTH_INCH: 0x1,
  COLOR_GREEN: 0x4,
  COLOR_PINK: 0x9,
} as const;

/** Pin capabilities (HDA spec 7.3.4.9). */
const PINCAP = {
  PRES_DETECT: 1 << 2,
  HP_DRV: 1 << 3,
  OUT: 1 << 4,
  IN: 1 << 5,
} as const;

export function defconf(f: { connectivity: number; location: number; device: number; connection: number; color: number; misc: number; association: number; sequence: number }): number {
  return (
    ((f.connectivity & 0x3) << 30) | ((f.location & 0x3f) << 24) | ((f.device & 0xf) << 20) | ((f.connection & 0xf) << 16) |
    ((f.color & 0xf) << 12) | ((f.misc & 0xf) << 8) | ((f.association & 0xf) << 4) | (f.sequence & 0xf)
  ) >>> 0;
}

export function defconfDevice(conf: number): number {
  return (conf >>> 20) & 0xf;
}

export interface Jack {
  id: number;
  direction: P.Direction;
  nid: number;
  defconf: number;
  caps: number;
  connected: boolean;
}

export interface JackResult {
  status: P.SndStatus;
  error?: string;
}

export class SndJacks {
  readonly jacks: Jack[] = [];

  /** `directions`: which directions have streams, each with the nid of its first stream. */
  constructor(directions: readonly { direction: P.Direction; nid: number }[]) {
    for (const d of directions) {
      const out = d.direction === P.D_OUTPUT;
      this.jacks.push({
        id: this.jacks.length,
        direction: d.direction,
        nid: d.nid,
        defconf: defconf({
          connectivity: DEFCONF.CONN_JACK,
          location: out ? DEFCONF.LOC_EXTERNAL_REAR : DEFCONF.LOC_EXTERNAL_FRONT,
          device: out ? DEFCONF.DEVICE_HP_OUT : DEFCONF.DEVICE_MIC_IN,
          connection: DEFCONF.CONN_EIGHTH_INCH,
          color: out ? DEFCONF.COLOR_GREEN : DEFCONF.COLOR_PINK,
          misc: 0,
          association: 1,
          sequence: 0,
        }),
        caps: out ? PINCAP.PRES_DETECT | PINCAP.HP_DRV | PINCAP.OUT : PINCAP.PRES_DETECT | PINCAP.IN,
        connected: true,
      });
    }
  }

  get count(): number {
    return this.jacks.length;
  }

  info(id: number): P.JackInfo {
    const j = this.get(id);
    return { nid: j.nid, features: 1 << P.JACK_F_REMAP, defconf: j.defconf, caps: j.caps, connected: j.connected };
  }

  /** JACK_REMAP: association and sequence are 4-bit fields of the pin configuration. */
  remap(id: number, association: number, sequence: number): JackResult {
    if (id >= this.jacks.length) return { status: P.S_BAD_MSG, error: `jack ${id} of ${this.jacks.length}` };
    if (association > 0xf || sequence > 0xf) return { status: P.S_BAD_MSG, error: `association ${association}/sequence ${sequence} do not fit 4 bits` };
    const j = this.jacks[id]!;
    j.defconf = ((j.defconf & ~0xff) | (association << 4) | sequence) >>> 0;
    return { status: P.S_OK };
  }

  /** A host-side plug change; the event to send, or null when nothing changed. */
  setConnected(id: number, connected: boolean): P.SndEvent | null {
    const j = this.get(id);
    if (j.connected === connected) return null;
    j.connected = connected;
    return { code: connected ? P.EVT_JACK_CONNECTED : P.EVT_JACK_DISCONNECTED, data: id };
  }

  snapshot(): { defconf: number; connected: boolean }[] {
    return this.jacks.map((j) => ({ defconf: j.defconf, connected: j.connected }));
  }

  restore(s: unknown): void {
    if (!Array.isArray(s) || s.length !== this.jacks.length) throw new Error(`jacks: saved state has ${Array.isArray(s) ? s.length : "no"} jacks, this device ${this.jacks.length}`);
    for (const [i, e] of s.entries()) {
      const o = e as { defconf?: unknown; connected?: unknown };
      if (!Number.isInteger(o.defconf) || typeof o.connected !== "boolean") throw new Error(`jacks: entry ${i} is malformed`);
      // Only association and sequence may differ (REMAP); anything else means another device.
      if (((o.defconf as number) & ~0xff) !== (this.jacks[i]!.defconf & ~0xff)) throw new Error(`jacks: jack ${i} has another pin configuration`);
    }
    s.forEach((e, i) => {
      this.jacks[i]!.defconf = (e as { defconf: number }).defconf >>> 0;
      this.jacks[i]!.connected = (e as { connected: boolean }).connected;
    });
  }

  private get(id: number): Jack {
    const j = this.jacks[id];
    if (!j) throw new Error(`jack ${id} of ${this.jacks.length}`);
    return j;
  }
}
