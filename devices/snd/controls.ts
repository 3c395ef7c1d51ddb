// Control elements for `--controls` (virtio 1.3, VIRTIO_SND_F_CTLS): per direction with streams,
// a master volume (INTEGER with a dB-scale TLV, so alsamixer/amixer show dB) and a switch (mute).
// Names follow ALSA's mixer conventions so the guest's simple mixer finds "Master" and "Capture":
// "Master Playback Volume" + "Master Playback Switch", "Capture Volume" + "Capture Switch". As in
// ALSA, a switch value of 1 means sound passes (unmuted); its virtio role is MUTE.
// The gain is applied by the host side to the samples it moves; at the default (0 dB, switch on)
// samples pass bit-exact.
import * as P from "./protocol.ts";
import { formatInfo, silenceByte } from "./formats.ts";

/** Volume steps: 0..127 in 0.5 dB steps, 127 = 0 dB, 0 = muted (the TLV's mute flag). */
export const VOLUME_MAX = 127;
export const VOLUME_STEP_CENTIDB = 50;
export const VOLUME_MIN_CENTIDB = -VOLUME_MAX * VOLUME_STEP_CENTIDB;

/** ALSA TLV types (include/uapi/sound/tlv.h). */
export const TLV_DB_SCALE = 1;
const TLV_DB_SCALE_MUTE = 0x10000;

export type ControlKind = "volume" | "switch";

export interface Control {
  id: number;
  kind: ControlKind;
  direction: P.Direction;
  nid: number;
  name: string;
  value: number;
}

export interface Gain {
  mute: boolean;
  /** Linear factor (1 at 0 dB). */
  linear: number;
}

export const UNITY: Gain = Object.freeze({ mute: false, linear: 1 });

export interface CtlOutcome {
  /** The bytes to write into the request's device-writable part (status first). */
  reply: Uint8Array;
  status: P.SndStatus;
  error?: string;
  /** A CTL_NOTIFY to send: the value changed (other mixers in the guest should re-read). */
  event?: P.SndEvent;
}

export function volumeToLinear(v: number): number {
  if (v <= 0) return 0;
  return Math.pow(10, (VOLUME_MIN_CENTIDB + v * VOLUME_STEP_CENTIDB) / 2000);
}

function nameFor(kind: ControlKind, direction: P.Direction): string {
  if (direction === P.D_OUTPUT) return kind === "volume" ? "Master Playback Volume" : "Master Playback Switch";
  return kind === "volume" ? "Capture Volume" : "Capture Switch";
}

function statusReply(status: P.SndStatus, error?: string): CtlOutcome {
  return { reply: P.encodeHdr(status), status, error };
}

export class SndControls {
  readonly controls: Control[] = [];

  constructor(directions: readonly { direction: P.Direction; nid: number }[]) {
    for (const d of directions) {
      for (const kind of ["volume", "switch"] as const) {
        this.controls.push({ id: this.controls.length, kind, direction: d.direction, nid: d.nid, name: nameFor(kind, d.direction), value: kind === "volume" ? VOLUME_MAX : 1 });
      }
    }
  }

  get count(): number {
    return this.controls.length;
  }

  info(id: number): P.CtlInfo {
    const c = this.get(id);
    const rw = (1 << P.CTL_ACCESS_READ) | (1 << P.CTL_ACCESS_WRITE);
    if (c.kind === "volume") {
      return { nid: c.nid, role: P.ctlRole(P.CTL_ROLE_VOLUME, c.direction), type: P.CTL_TYPE_INTEGER, access: rw | (1 << P.CTL_ACCESS_TLV_READ), count: 1, index: 0, name: c.name, min: 0, max: VOLUME_MAX, step: 1 };
    }
    return { nid: c.nid, role: P.ctlRole(P.CTL_ROLE_MUTE, c.direction), type: P.CTL_TYPE_BOOLEAN, access: rw, count: 1, index: 0, name: c.name };
  }

  /** The dB-scale TLV ALSA's TLV_DB_SCALE_ITEM(min, step, mute) describes. */
  tlv(id: number): Uint8Array | null {
    const c = this.get(id);
    if (c.kind !== "volume") return null;
    return P.encodeTlv(TLV_DB_SCALE, [VOLUME_MIN_CENTIDB, VOLUME_STEP_CENTIDB | TLV_DB_SCALE_MUTE]);
  }

  /** Serves CTL_ENUM_ITEMS, CTL_READ, CTL_WRITE, CTL_TLV_* for a decoded request whose id is in range. */
  handle(r: P.CtlCommand | P.CtlWrite | P.CtlTlvWrite, writableBytes: number): CtlOutcome {
    const c = this.get(r.controlId);
    switch (r.code) {
      case P.R_CTL_ENUM_ITEMS:
        return statusReply(P.S_BAD_MSG, `control ${c.id} (${c.name}) is not enumerated`);
      case P.R_CTL_READ: {
        if (writableBytes < P.HDR_BYTES + P.CTL_VALUE_BYTES) return statusReply(P.S_BAD_MSG, `CTL_READ with ${writableBytes} writable bytes`);
        return { reply: P.encodeCtlReadReply(P.encodeCtlValue32([c.value])), status: P.S_OK };
      }
      case P.R_CTL_WRITE: {
        const [v] = P.decodeCtlValue32(r.value, 1) as [number];
        const max = c.kind === "volume" ? VOLUME_MAX : 1;
        if (v < 0 || v > max) return statusReply(P.S_BAD_MSG, `${c.name}: ${v} outside 0-${max}`);
        const changed = v !== c.value;
        c.value = v;
        const out = statusReply(P.S_OK);
        if (changed) out.event = P.ctlNotifyEvent(c.id, 1 << P.CTL_EVT_MASK_VALUE);
        return out;
      }
      case P.R_CTL_TLV_READ: {
        const tlv = this.tlv(c.id);
        if (!tlv) return statusReply(P.S_BAD_MSG, `${c.name} has no TLV`);
        // The spec: with too little room, write what fits and succeed.
        const room = Math.max(0, writableBytes - P.HDR_BYTES);
        const reply = new Uint8Array(P.HDR_BYTES + Math.min(room, tlv.length));
        reply.set(P.encodeHdr(P.S_OK));
        reply.set(tlv.subarray(0, reply.length - P.HDR_BYTES), P.HDR_BYTES);
        return { reply, status: P.S_OK };
      }
      case P.R_CTL_TLV_WRITE:
      case P.R_CTL_TLV_COMMAND:
        return statusReply(P.S_BAD_MSG, `${c.name}: its TLV is read-only`);
    }
  }

  /** The gain the host applies to `direction`'s samples. */
  gain(direction: P.Direction): Gain {
    let linear = 1;
    let mute = false;
    for (const c of this.controls) {
      if (c.direction !== direction) continue;
      if (c.kind === "switch" && c.value === 0) mute = true;
      if (c.kind === "volume") linear = c.value >= VOLUME_MAX ? 1 : volumeToLinear(c.value);
    }
    if (linear === 0) mute = true;
    return { mute, linear };
  }

  snapshot(): number[] {
    return this.controls.map((c) => c.value);
  }

  restore(s: unknown): void {
    if (!Array.isArray(s) || s.length !== this.controls.length) throw new Error(`controls: saved state has ${Array.isArray(s) ? s.length : "no"} values, this device ${this.controls.length}`);
    s.forEach((v, i) => {
      const max = this.controls[i]!.kind === "volume" ? VOLUME_MAX : 1;
      if (!Number.isInteger(v) || v < 0 || v > max) throw new Error(`controls: value ${String(v)} of control ${i} outside 0-${max}`);
    });
    s.forEach((v, i) => (this.controls[i]!.value = v as number));
  }

  private get(id: number): Control {
    const c = this.controls[id];
    if (!c) throw new Error(`control ${id} of ${this.controls.length}`);
    return c;
  }
}

/**
 * Scales the interleaved samples in `buf` (a host-side copy, changed in place) by `g`. Unity
 * returns at once, so 0 dB is bit-exact by construction; mute writes the format's silence. Only
 * attenuation exists, so integer samples never clip; a trailing partial sample is left alone.
 */
export function applyGain(buf: Uint8Array, format: number, g: Gain): void {
  if (!g.mute && g.linear === 1) return;
  const f = formatInfo(format);
  if (!f) throw new Error(`cannot scale sample format ${format}`);
  if (g.mute || g.linear === 0) {
    buf.fill(silenceByte(format));
    return;
  }
  const k = g.linear;
  const n = buf.length - (buf.length % f.bytes);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  switch (format) {
    case P.FMT_U8:
      for (let i = 0; i < n; i++) buf[i] = Math.round((buf[i]! - 128) * k) + 128;
      break;
    case P.FMT_S16:
      for (let i = 0; i < n; i += 2) dv.setInt16(i, Math.round(dv.getInt16(i, true) * k), true);
      break;
    case P.FMT_S24_3:
      for (let i = 0; i < n; i += 3) {
        const v = ((buf[i]! | (buf[i + 1]! << 8) | (buf[i + 2]! << 16)) << 8) >> 8;
        const s = Math.round(v * k);
        buf[i] = s & 0xff;
        buf[i + 1] = (s >> 8) & 0xff;
        buf[i + 2] = (s >> 16) & 0xff;
      }
      break;
    case P.FMT_S24:
      // ALSA S24_LE: the low 24 bits carry the sample; the result is written sign-extended.
      for (let i = 0; i < n; i += 4) dv.setInt32(i, Math.round(((dv.getInt32(i, true) << 8) >> 8) * k), true);
      break;
    case P.FMT_S32:
      for (let i = 0; i < n; i += 4) dv.setInt32(i, Math.round(dv.getInt32(i, true) * k), true);
      break;
    case P.FMT_FLOAT:
      for (let i = 0; i < n; i += 4) dv.setFloat32(i, dv.getFloat32(i, true) * k, true);
      break;
  }
}
