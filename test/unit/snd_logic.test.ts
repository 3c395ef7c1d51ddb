// The snd device's queue-independent logic: wire codecs (including hostile messages), the PCM
// state machine and parameter checks, the pacing clock, controls and gain, jacks and channel
// maps, WAV files, options (ours and crosvm's --config), and the libasound binding against
// ALSA's null/file plugin PCMs (no sound hardware needed).
import { describe, test, expect } from "bun:test";
import { mkdtempSync, readFileSync, writeFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as P from "../../devices/snd/protocol.ts";
import { bytesPerSample, frameBytes, rateHz, rateIndex, hostCaps, fixedCaps, bits, silenceByte } from "../../devices/snd/formats.ts";
import { PcmStream, checkParams, type PcmParams, type PcmState } from "../../devices/snd/stream.ts";
import { Pacer } from "../../devices/snd/pacing.ts";
import { SndControls, applyGain, UNITY, VOLUME_MAX, TLV_DB_SCALE, volumeToLinear } from "../../devices/snd/controls.ts";
import { SndJacks, defconfDevice, DEFCONF } from "../../devices/snd/jacks.ts";
import { STANDARD_LAYOUTS, buildChmaps, waveChannelMask } from "../../devices/snd/chmap.ts";
import { WavWriter, WavReader, readWavInfo, wavHeader, wavCaps } from "../../devices/snd/wav.ts";
import { parseSndOptions, parseCrosvmConfig, checkSndPaths, playbackPath, capturePath } from "../../devices/snd/options.ts";

const LIMITS: P.SndLimits = { jacks: 2, streams: 2, chmaps: 16, controls: 4 };
const tmp = () => mkdtempSync(join(tmpdir(), "snd-test-"));

function decodeOk(b: Uint8Array, limits = LIMITS): P.SndRequest {
  const r = P.decodeRequest(b, limits);
  if (!r.ok) throw new Error(`expected ok, got ${r.error}`);
  return r.value;
}

function decodeStatus(b: Uint8Array, limits = LIMITS): number {
  const r = P.decodeRequest(b, limits);
  return r.ok ? P.S_OK : r.status;
}

function grow(b: Uint8Array, by: number): Uint8Array {
  const o = new Uint8Array(b.length + by);
  o.set(b);
  return o;
}

const S16_STEREO_48K: PcmParams = { bufferBytes: 4 * 1920, periodBytes: 1920, features: 0, channels: 2, format: P.FMT_S16, rate: P.RATE_48000 };

describe("snd protocol", () => {
  test("struct sizes match the C layouts", () => {
    expect(P.encodePcmInfo({ nid: 0, features: 0, formats: 0, rates: 0, direction: 0, channelsMin: 1, channelsMax: 2 }).length).toBe(32);
    expect(P.encodeJackInfo({ nid: 0, features: 0, defconf: 0, caps: 0, connected: true }).length).toBe(24);
    expect(P.encodeChmapInfo({ nid: 0, direction: 0, positions: [P.CHMAP_MONO] }).length).toBe(24);
    expect(P.encodeCtlInfo({ nid: 0, role: 0, type: P.CTL_TYPE_BOOLEAN, access: 1, count: 1, index: 0, name: "x" }).length).toBe(96);
    expect(P.encodePcmSetParams({ streamId: 0, ...S16_STEREO_48K }).length).toBe(24);
    expect(P.encodeEvent({ code: P.EVT_PCM_XRUN, data: 1 }).length).toBe(8);
  });

  test("config space is 12 bytes without CTLS, 16 with", () => {
    const c = { jacks: 2, streams: 3, chmaps: 4, controls: 5 };
    expect(P.encodeConfig(c, false).length).toBe(12);
    expect(P.decodeConfig(P.encodeConfig(c, true))).toEqual(c);
    expect(P.decodeConfig(P.encodeConfig(c, false))).toEqual({ ...c, controls: 0 });
  });

  test("query_info: round trip, ranges, exact length", () => {
    const q = P.encodeQueryInfo(P.R_PCM_INFO, 1, 1, 32);
    expect(decodeOk(q)).toEqual({ kind: "query", code: P.R_PCM_INFO, startId: 1, count: 1, size: 32 });
    expect(P.minResponseBytes(decodeOk(q))).toBe(4 + 32);
    expect(decodeStatus(P.encodeQueryInfo(P.R_PCM_INFO, 0, 3, 32))).toBe(P.S_BAD_MSG); // beyond streams
    expect(decodeStatus(P.encodeQueryInfo(P.R_PCM_INFO, 0xffffffff, 2, 32))).toBe(P.S_BAD_MSG); // overflowing sum
    expect(decodeStatus(P.encodeQueryInfo(P.R_JACK_INFO, 0, 2, 0))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(P.encodeQueryInfo(P.R_JACK_INFO, 0, 2, 1 << 20))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(q.subarray(0, 15))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(grow(q, 1))).toBe(P.S_BAD_MSG);
    expect(decodeOk(P.encodeQueryInfo(P.R_CHMAP_INFO, 16, 0, 24))).toMatchObject({ count: 0 });
  });

  test("a header shorter than 4 bytes is BAD_MSG, an unknown code NOT_SUPP", () => {
    expect(decodeStatus(new Uint8Array(0))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(new Uint8Array(3))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(P.encodeHdr(0x4242 as P.SndStatus))).toBe(P.S_NOT_SUPP);
  });

  test("PCM requests: set_params round trip, stream id range, lengths", () => {
    const sp = P.encodePcmSetParams({ streamId: 1, ...S16_STEREO_48K, features: 1 << P.PCM_F_EVT_XRUNS });
    expect(decodeOk(sp)).toEqual({ kind: "set_params", code: P.R_PCM_SET_PARAMS, streamId: 1, ...S16_STEREO_48K, features: 16 });
    expect(decodeStatus(P.encodePcmSetParams({ streamId: 2, ...S16_STEREO_48K }))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(sp.subarray(0, 23))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(grow(sp, 4))).toBe(P.S_BAD_MSG);
    for (const code of [P.R_PCM_PREPARE, P.R_PCM_START, P.R_PCM_STOP, P.R_PCM_RELEASE] as const) {
      expect(decodeOk(P.encodePcmHdr(code, 1))).toEqual({ kind: "pcm", code, streamId: 1 });
      expect(decodeStatus(P.encodePcmHdr(code, 2))).toBe(P.S_BAD_MSG);
      expect(decodeStatus(P.encodePcmHdr(code, 0xffffffff))).toBe(P.S_BAD_MSG);
      expect(decodeStatus(grow(P.encodePcmHdr(code, 0), 1))).toBe(P.S_BAD_MSG);
      expect(decodeStatus(P.encodePcmHdr(code, 0).subarray(0, 7))).toBe(P.S_BAD_MSG);
    }
  });

  test("jack_remap", () => {
    expect(decodeOk(P.encodeJackRemap(1, 3, 4))).toEqual({ kind: "jack_remap", code: P.R_JACK_REMAP, jackId: 1, association: 3, sequence: 4 });
    expect(decodeStatus(P.encodeJackRemap(2, 0, 0))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(P.encodeJackRemap(0, 0, 0).subarray(0, 12))).toBe(P.S_BAD_MSG);
  });

  test("control requests: NOT_SUPP without CTLS, ids and exact sizes with it", () => {
    const noCtls = { ...LIMITS, controls: null };
    expect(decodeStatus(P.encodeQueryInfo(P.R_CTL_INFO, 0, 1, 96), noCtls)).toBe(P.S_NOT_SUPP);
    expect(decodeStatus(P.encodeCtlHdr(P.R_CTL_READ, 0), noCtls)).toBe(P.S_NOT_SUPP);
    expect(decodeOk(P.encodeCtlHdr(P.R_CTL_READ, 3))).toEqual({ kind: "ctl", code: P.R_CTL_READ, controlId: 3 });
    expect(P.minResponseBytes(decodeOk(P.encodeCtlHdr(P.R_CTL_READ, 3)))).toBe(516);
    expect(decodeStatus(P.encodeCtlHdr(P.R_CTL_READ, 4))).toBe(P.S_BAD_MSG);
    const w = P.encodeCtlWrite(1, P.encodeCtlValue32([42]));
    expect(w.length).toBe(520);
    const dw = decodeOk(w) as P.CtlWrite;
    expect(P.decodeCtlValue32(dw.value, 1)).toEqual([42]);
    expect(decodeStatus(w.subarray(0, 519))).toBe(P.S_BAD_MSG);
    expect(decodeStatus(grow(w, 1))).toBe(P.S_BAD_MSG);
    const tlv = P.encodeTlv(1, [5, 6]);
    const tw = new Uint8Array(8 + tlv.length);
    tw.set(P.encodeCtlHdr(P.R_CTL_TLV_WRITE, 0));
    tw.set(tlv, 8);
    expect(decodeOk(tw)).toMatchObject({ kind: "ctl_tlv", controlId: 0 });
    expect(decodeStatus(tw.subarray(0, tw.length - 4))).toBe(P.S_BAD_MSG); // TLV length says 8, 4 came
    expect(decodeStatus(tw.subarray(0, 12))).toBe(P.S_BAD_MSG);
  });

  test("hostile input never throws: random codes and lengths give ok or a status", () => {
    const codes = [0, 1, 2, 3, 0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x200, 0x300, 0x301, 0x302, 0x303, 0x304, 0x305, 0x306, 0x307, 0x8000, 0xffffffff];
    let seed = 12345;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    for (let i = 0; i < 5000; i++) {
      const len = Math.floor(rnd() * 600);
      const b = new Uint8Array(len);
      for (let j = 0; j < len; j++) b[j] = Math.floor(rnd() * 256);
      if (len >= 4) new DataView(b.buffer).setUint32(0, codes[Math.floor(rnd() * codes.length)]!, true);
      const r = P.decodeRequest(b, rnd() < 0.5 ? LIMITS : { ...LIMITS, controls: null });
      if (!r.ok) expect([P.S_BAD_MSG, P.S_NOT_SUPP]).toContain(r.status);
      const head = b.subarray(0, 4);
      const tx = P.decodeTxXfer(head, len, Math.floor(rnd() * 20), [0, 1]);
      const rx = P.decodeRxXfer(head, len, Math.floor(rnd() * 20), [0, 1]);
      if (!tx.ok) expect(tx.status).toBe(P.S_BAD_MSG);
      if (!rx.ok) expect(rx.status).toBe(P.S_BAD_MSG);
    }
  });

  test("tx/rx xfer: stream range, direction, exact header and status sizes", () => {
    const dirs = [P.D_OUTPUT, P.D_INPUT];
    const x0 = P.encodePcmXfer(0);
    const x1 = P.encodePcmXfer(1);
    expect(P.decodeTxXfer(x0, 4 + 1920, 8, dirs)).toEqual({ ok: true, value: { streamId: 0, dataBytes: 1920 } });
    expect(P.decodeRxXfer(x1, 4, 1920 + 8, dirs)).toEqual({ ok: true, value: { streamId: 1, dataBytes: 1920 } });
    expect(P.decodeTxXfer(x1, 4 + 1920, 8, dirs).ok).toBe(false); // input stream on txq
    expect(P.decodeRxXfer(x0, 4, 16, dirs).ok).toBe(false); // output stream on rxq
    expect(P.decodeTxXfer(P.encodePcmXfer(2), 8, 8, dirs).ok).toBe(false);
    expect(P.decodeTxXfer(x0, 3, 8, dirs).ok).toBe(false);
    expect(P.decodeTxXfer(x0, 8, 7, dirs).ok).toBe(false);
    expect(P.decodeTxXfer(x0, 8, 9, dirs).ok).toBe(false);
    expect(P.decodeRxXfer(x1, 5, 16, dirs).ok).toBe(false);
    expect(P.decodeRxXfer(x1, 4, 7, dirs).ok).toBe(false);
    expect(P.decodeRxXfer(x1, 4, 8, dirs)).toEqual({ ok: true, value: { streamId: 1, dataBytes: 0 } });
  });

  test("item information round trips", () => {
    const pi: P.PcmInfo = { nid: 3, features: 16, formats: bits([P.FMT_U8, P.FMT_FLOAT]), rates: bits([P.RATE_8000, P.RATE_192000]), direction: P.D_INPUT, channelsMin: 1, channelsMax: 8 };
    expect(P.decodePcmInfo(P.encodePcmInfo(pi))).toEqual(pi);
    const ji: P.JackInfo = { nid: 1, features: 1, defconf: 0x01214010, caps: 0x1c, connected: true };
    expect(P.decodeJackInfo(P.encodeJackInfo(ji))).toEqual(ji);
    const ci: P.ChmapInfo = { nid: 0, direction: P.D_OUTPUT, positions: [P.CHMAP_FL, P.CHMAP_FR] };
    expect(P.decodeChmapInfo(P.encodeChmapInfo(ci))).toEqual(ci);
    const ctl: P.CtlInfo = { nid: 0, role: P.ctlRole(P.CTL_ROLE_VOLUME, P.D_INPUT), type: P.CTL_TYPE_INTEGER, access: 0x13, count: 1, index: 0, name: "Capture Volume", min: 0, max: 127, step: 1 };
    const enc = P.encodeCtlInfo(ctl);
    expect(new DataView(enc.buffer).getInt32(72 + 4, true)).toBe(127); // union at 72 (natural alignment)
    expect(P.decodeCtlInfo(enc)).toEqual(ctl);
    expect(ctl.role).toBe(3); // VOLUME << 1 | INPUT
    const packed = P.encodeCtlInfo(ctl, 92);
    expect(packed.length).toBe(92);
    expect(new DataView(packed.buffer).getInt32(68 + 4, true)).toBe(127);
    expect(P.decodeCtlInfo(packed, 92)).toEqual(ctl);
    expect(P.decodeCtlEnumItem(P.encodeCtlEnumItem("x".repeat(80)))).toBe("x".repeat(63));
    expect(() => P.encodeChmapInfo({ nid: 0, direction: 0, positions: new Array(19).fill(3) })).toThrow();
  });

  test("query replies fit each item into the driver's size", () => {
    const item = P.encodeJackInfo({ nid: 7, features: 1, defconf: 9, caps: 2, connected: true });
    const small = P.encodeQueryReply([item, item], 20);
    expect(small.length).toBe(4 + 40);
    expect(new DataView(small.buffer).getUint32(0, true)).toBe(P.S_OK);
    expect(new DataView(small.buffer).getUint32(4 + 20, true)).toBe(7);
    const big = P.encodeQueryReply([item], 32);
    expect(big.length).toBe(36);
    expect(Array.from(big.subarray(28))).toEqual(new Array(8).fill(0));
  });

  test("events, status and TLV", () => {
    expect(P.decodeEvent(P.encodeEvent({ code: P.EVT_JACK_CONNECTED, data: 1 }))).toEqual({ code: 0x1000, data: 1 });
    const ce = P.encodeEvent(P.ctlNotifyEvent(3, 1 << P.CTL_EVT_MASK_VALUE));
    expect(P.decodeCtlEvent(ce)).toEqual({ controlId: 3, mask: 1 });
    expect(P.decodePcmStatus(P.encodePcmStatus(P.S_OK, 1234.4))).toEqual({ status: P.S_OK, latencyBytes: 1234 });
    expect(P.decodePcmStatus(P.encodePcmStatus(P.S_OK, -5)).latencyBytes).toBe(0);
    expect(P.decodeTlv(P.encodeTlv(1, [-6350, 0x10032]))).toEqual({ type: 1, values: [-6350, 0x10032] });
  });
});

describe("snd formats", () => {
  test("sizes and rates", () => {
    expect(bytesPerSample(P.FMT_U8)).toBe(1);
    expect(bytesPerSample(P.FMT_S16)).toBe(2);
    expect(bytesPerSample(P.FMT_S24)).toBe(4); // 24 bits in a 32-bit container
    expect(bytesPerSample(P.FMT_S24_3)).toBe(3);
    expect(frameBytes(P.FMT_FLOAT, 6)).toBe(24);
    expect(rateHz(P.RATE_44100)).toBe(44100);
    expect(rateHz(P.RATE_24000)).toBe(24000);
    expect(rateHz(16)).toBeNull();
    expect(rateIndex(192000)).toBe(P.RATE_192000);
    expect(rateIndex(44000)).toBeNull();
    expect(silenceByte(P.FMT_U8)).toBe(0x80);
    expect(() => bytesPerSample(P.FMT_MU_LAW)).toThrow();
  });

  test("host capabilities: U8..FLOAT, 8-192 kHz, 1-8 channels", () => {
    const c = hostCaps();
    for (const f of [P.FMT_U8, P.FMT_S16, P.FMT_S24, P.FMT_S32, P.FMT_FLOAT]) expect((c.formats >>> f) & 1).toBe(1);
    expect((c.formats >>> P.FMT_S24_3) & 1).toBe(0);
    expect((c.rates >>> P.RATE_5512) & 1).toBe(0);
    expect((c.rates >>> P.RATE_8000) & 1).toBe(1);
    expect((c.rates >>> P.RATE_192000) & 1).toBe(1);
    expect((c.rates >>> P.RATE_384000) & 1).toBe(0);
    expect([c.channelsMin, c.channelsMax]).toEqual([1, 8]);
  });
});

describe("snd stream state machine", () => {
  const STATES: PcmState[] = ["idle", "params", "prepared", "running", "stopped", "released"];
  const CMDS = [P.R_PCM_SET_PARAMS, P.R_PCM_PREPARE, P.R_PCM_START, P.R_PCM_STOP, P.R_PCM_RELEASE] as const;
  // virtio 1.2 §5.14.6.6.1, with `idle` accepting only SET_PARAMS.
  const LEGAL: Record<PcmState, number[]> = {
    idle: [P.R_PCM_SET_PARAMS],
    params: [P.R_PCM_SET_PARAMS, P.R_PCM_PREPARE],
    prepared: [P.R_PCM_SET_PARAMS, P.R_PCM_PREPARE, P.R_PCM_START, P.R_PCM_RELEASE],
    running: [P.R_PCM_STOP],
    stopped: [P.R_PCM_START, P.R_PCM_RELEASE],
    released: [P.R_PCM_SET_PARAMS, P.R_PCM_PREPARE],
  };

  test("every command in every state: legal ones succeed, the rest are BAD_MSG and change nothing", () => {
    for (const state of STATES) {
      for (const code of CMDS) {
        const s = new PcmStream(0, P.D_OUTPUT, 0, hostCaps());
        s.state = state;
        if (state !== "idle") s.params = { ...S16_STEREO_48K };
        const r = code === P.R_PCM_SET_PARAMS ? s.setParams(S16_STEREO_48K) : s.command(code);
        if (LEGAL[state].includes(code)) {
          expect(r.status).toBe(P.S_OK);
        } else {
          expect(r.status).toBe(P.S_BAD_MSG);
          expect(r.error).toContain(state);
          expect(s.state).toBe(state);
        }
      }
    }
  });

  test("Linux's sequences: play, pause/resume, xrun recovery, suspend", () => {
    const s = new PcmStream(0, P.D_OUTPUT, 0, hostCaps());
    const seq = (ops: (number | "params")[]) => ops.map((op) => (op === "params" ? s.setParams(S16_STEREO_48K) : s.command(op as P.PcmCode)).status);
    expect(seq(["params", P.R_PCM_PREPARE, P.R_PCM_START, P.R_PCM_STOP, P.R_PCM_START, P.R_PCM_STOP, P.R_PCM_RELEASE])).toEqual(new Array(7).fill(P.S_OK));
    expect(s.acceptsIo()).toBe(false);
    // After an xrun ALSA stops, releases, and prepares again with the same parameters.
    expect(seq([P.R_PCM_PREPARE, P.R_PCM_START, P.R_PCM_STOP, P.R_PCM_RELEASE, "params", P.R_PCM_PREPARE])).toEqual(new Array(6).fill(P.S_OK));
    expect(s.acceptsIo()).toBe(true);
    expect(s.bytesPerSecond()).toBe(192000);
    expect(s.bytesPerFrame()).toBe(4);
    s.reset();
    expect(s.state).toBe("idle");
    expect(s.command(P.R_PCM_PREPARE).status).toBe(P.S_BAD_MSG);
  });

  test("parameters are checked against the capabilities", () => {
    const caps = hostCaps();
    const ok = (p: Partial<PcmParams>) => checkParams({ ...S16_STEREO_48K, ...p }, caps).status;
    expect(ok({})).toBe(P.S_OK);
    expect(ok({ format: P.FMT_MU_LAW })).toBe(P.S_NOT_SUPP);
    expect(ok({ format: 25 })).toBe(P.S_BAD_MSG);
    expect(ok({ rate: P.RATE_5512 })).toBe(P.S_NOT_SUPP);
    expect(ok({ rate: 200 })).toBe(P.S_BAD_MSG);
    expect(ok({ channels: 0 })).toBe(P.S_NOT_SUPP);
    expect(ok({ channels: 9 })).toBe(P.S_NOT_SUPP);
    expect(ok({ periodBytes: 0 })).toBe(P.S_BAD_MSG);
    expect(ok({ bufferBytes: 1920 * 3 + 4 })).toBe(P.S_BAD_MSG); // period does not divide the buffer
    expect(ok({ periodBytes: 1922, bufferBytes: 1922 * 2 })).toBe(P.S_BAD_MSG); // half a frame
    expect(ok({ features: 1 << P.PCM_F_EVT_XRUNS })).toBe(P.S_OK);
    expect(ok({ features: 1 << P.PCM_F_MSG_POLLING })).toBe(P.S_NOT_SUPP);
    expect(ok({ features: 3 })).toBe(P.S_BAD_MSG);
    expect(ok({ features: 1 << 7 })).toBe(P.S_BAD_MSG);
    expect(ok({ bufferBytes: 8 * 1024 * 1024, periodBytes: 1024 * 1024 })).toBe(P.S_NOT_SUPP);
    const fixed = fixedCaps(P.FMT_S16, P.RATE_44100, 1);
    expect(checkParams({ ...S16_STEREO_48K, rate: P.RATE_44100, channels: 1, periodBytes: 882, bufferBytes: 882 * 4 }, fixed).status).toBe(P.S_OK);
    expect(checkParams(S16_STEREO_48K, fixed).status).toBe(P.S_NOT_SUPP);
    const s = new PcmStream(0, P.D_OUTPUT, 0, caps);
    expect(s.setParams({ ...S16_STEREO_48K, channels: 9 }).status).toBe(P.S_NOT_SUPP);
    expect(s.state).toBe("idle");
  });

  test("snapshot and restore validate first", () => {
    const s = new PcmStream(0, P.D_OUTPUT, 0, hostCaps());
    s.setParams(S16_STEREO_48K);
    s.command(P.R_PCM_PREPARE);
    const t = new PcmStream(0, P.D_OUTPUT, 0, hostCaps());
    t.restore(structuredClone(s.snapshot()));
    expect(t.snapshot()).toEqual(s.snapshot());
    expect(() => t.restore({ state: "running", params: null })).toThrow();
    expect(() => t.restore({ state: "bogus", params: null })).toThrow();
    expect(() => t.restore({ state: "params", params: { ...S16_STEREO_48K, channels: 20 } })).toThrow();
    expect(t.state).toBe("prepared");
  });
});

describe("snd pacing", () => {
  // S16 stereo 48 kHz: 192000 bytes/s, a 1920-byte period is 10 ms.
  const mk = (direction: P.Direction = P.D_OUTPUT, grace?: number) => new Pacer<number>({ direction, bytesPerSecond: 192000, periodBytes: 1920, xrunGraceUs: grace });

  test("held buffers complete one period apart from START, latency counts what is still queued", () => {
    const p = mk();
    for (let i = 0; i < 4; i++) p.onBuffer(i, 1920, 0); // pre-buffered in PREPARE
    expect(p.nextDeadline()).toBeNull();
    expect(p.advance(1e9).completions).toEqual([]);
    p.start(1000);
    expect(p.nextDeadline()).toBe(11000);
    expect(p.advance(10999).completions).toEqual([]);
    const r = p.advance(11000);
    expect(r.completions).toEqual([{ token: 0, atUs: 11000, bytes: 1920, latencyBytes: 3 * 1920, played: true }]);
    expect(p.advance(31000).completions.map((c) => [c.token, c.atUs, c.latencyBytes])).toEqual([[1, 21000, 3840], [2, 31000, 1920]]);
    // The guest refills in time: its buffer plays right after the queued data, no gap.
    p.onBuffer(4, 1920, 32000);
    expect(p.nextDeadline()).toBe(41000);
    expect(p.advance(51000).completions.map((c) => c.atUs)).toEqual([41000, 51000]);
  });

  test("a guest late by more than the grace gets one XRUN, then its data plays from arrival", () => {
    const p = mk();
    p.onBuffer(0, 1920, 0);
    p.start(0);
    expect(p.advance(10000).xrun).toBe(false); // just ran dry: within the grace (one period)
    expect(p.nextDeadline()).toBe(20000);
    expect(p.advance(19999).xrun).toBe(false);
    expect(p.advance(20000).xrun).toBe(true);
    expect(p.xruns).toBe(1);
    expect(p.nextDeadline()).toBeNull();
    expect(p.advance(30000).xrun).toBe(false); // reported once per dry spell
    p.onBuffer(1, 1920, 35000);
    expect(p.nextDeadline()).toBe(45000);
    expect(p.advance(45000).completions[0]).toMatchObject({ token: 1, atUs: 45000, latencyBytes: 0 });
  });

  test("STOP keeps the unplayed part of a buffer for the next START", () => {
    const p = mk();
    p.onBuffer(0, 1920, 0);
    p.onBuffer(1, 1920, 0);
    p.start(0);
    const r = p.stop(5000); // halfway through buffer 0
    expect(r.completions).toEqual([]);
    expect(p.heldBytes()).toBe(960 + 1920);
    expect(p.nextDeadline()).toBeNull();
    p.start(100000);
    expect(p.nextDeadline()).toBe(105000);
    expect(p.advance(115000).completions.map((c) => c.atUs)).toEqual([105000, 115000]);
  });

  test("RELEASE completes everything at once, unplayed", () => {
    const p = mk();
    for (let i = 0; i < 3; i++) p.onBuffer(i, 1920, 0);
    p.start(0);
    p.advance(10000);
    const out = p.release(12000);
    expect(out.map((c) => [c.token, c.atUs, c.played])).toEqual([[1, 12000, false], [2, 12000, false]]);
    expect(p.pending).toBe(0);
    expect(p.nextDeadline()).toBeNull();
  });

  test("capture: empty buffers fill at the stream rate, latency 0, overrun when the guest gives none", () => {
    const p = mk(P.D_INPUT);
    p.onBuffer(0, 1920, 0);
    p.onBuffer(1, 1920, 0);
    p.start(500);
    expect(p.advance(20500).completions.map((c) => [c.atUs, c.latencyBytes])).toEqual([[10500, 0], [20500, 0]]);
    expect(p.advance(30500).xrun).toBe(true);
  });

  test("rates that do not divide a second: deadlines round up, completions stay exact", () => {
    const p = new Pacer<number>({ direction: P.D_OUTPUT, bytesPerSecond: 11025 * 2, periodBytes: 1000 });
    p.onBuffer(0, 1000, 0);
    p.onBuffer(1, 1000, 0);
    p.start(0);
    const d = p.nextDeadline()!;
    expect(d).toBe(Math.ceil(1e9 / 22050));
    expect(p.advance(d - 1).completions.length).toBe(0);
    expect(p.advance(d).completions.length).toBe(1);
    // Over many periods the schedule does not drift: 2205 periods of 1000 bytes = 100 s exactly.
    const q = new Pacer<number>({ direction: P.D_OUTPUT, bytesPerSecond: 22050, periodBytes: 1000 });
    for (let i = 0; i < 2205; i++) q.onBuffer(i, 1000, 0);
    q.start(0);
    const done = q.advance(100e6).completions;
    expect(done.length).toBe(2205);
    expect(done.at(-1)!.atUs).toBe(100e6);
  });
});

describe("snd controls", () => {
  const both = [{ direction: P.D_OUTPUT, nid: 0 }, { direction: P.D_INPUT, nid: 0 }] as const;

  test("volume and switch per direction, as Linux's virtio_kctl expects them", () => {
    const c = new SndControls(both);
    expect(c.count).toBe(4);
    const infos = [0, 1, 2, 3].map((i) => c.info(i));
    expect(infos.map((i) => i.name)).toEqual(["Master Playback Volume", "Master Playback Switch", "Capture Volume", "Capture Switch"]);
    expect(infos[0]).toMatchObject({ type: P.CTL_TYPE_INTEGER, count: 1, min: 0, max: VOLUME_MAX, step: 1, role: P.ctlRole(P.CTL_ROLE_VOLUME, P.D_OUTPUT) });
    expect(infos[0]!.access & (1 << P.CTL_ACCESS_TLV_READ)).not.toBe(0);
    expect(infos[1]).toMatchObject({ type: P.CTL_TYPE_BOOLEAN, count: 1, role: P.ctlRole(P.CTL_ROLE_MUTE, P.D_OUTPUT) });
    expect(infos[3]!.role).toBe((P.CTL_ROLE_MUTE << 1) | 1);
    // Every info survives the wire.
    for (const i of infos) expect(P.decodeCtlInfo(P.encodeCtlInfo(i))).toEqual(i);
  });

  test("READ, WRITE, TLV_READ, and the refusals", () => {
    const c = new SndControls(both);
    const read = (id: number) => {
      const o = c.handle({ kind: "ctl", code: P.R_CTL_READ, controlId: id }, 516);
      expect(o.status).toBe(P.S_OK);
      return P.decodeCtlValue32(o.reply.subarray(4), 1)[0];
    };
    expect(read(0)).toBe(VOLUME_MAX);
    expect(read(1)).toBe(1);
    const write = (id: number, v: number) => c.handle({ kind: "ctl_write", code: P.R_CTL_WRITE, controlId: id, value: P.encodeCtlValue32([v]) }, 4);
    const w = write(0, 100);
    expect(w.status).toBe(P.S_OK);
    expect(w.event).toEqual(P.ctlNotifyEvent(0, 1));
    expect(write(0, 100).event).toBeUndefined(); // unchanged: no notification
    expect(read(0)).toBe(100);
    expect(write(0, 128).status).toBe(P.S_BAD_MSG);
    expect(write(1, 2).status).toBe(P.S_BAD_MSG);
    expect(write(1, -1).status).toBe(P.S_BAD_MSG);
    expect(read(0)).toBe(100);
    expect(c.handle({ kind: "ctl", code: P.R_CTL_READ, controlId: 0 }, 100).status).toBe(P.S_BAD_MSG);
    const tlv = c.handle({ kind: "ctl", code: P.R_CTL_TLV_READ, controlId: 0 }, 4 + 4096);
    expect(tlv.reply.length).toBe(4 + 16);
    expect(P.decodeTlv(tlv.reply.subarray(4))).toEqual({ type: TLV_DB_SCALE, values: [-6350, 50 | 0x10000] });
    expect(c.handle({ kind: "ctl", code: P.R_CTL_TLV_READ, controlId: 0 }, 10).reply.length).toBe(10); // as much as fits
    expect(c.handle({ kind: "ctl", code: P.R_CTL_TLV_READ, controlId: 1 }, 100).status).toBe(P.S_BAD_MSG);
    expect(c.handle({ kind: "ctl", code: P.R_CTL_ENUM_ITEMS, controlId: 0 }, 100).status).toBe(P.S_BAD_MSG);
    expect(c.handle({ kind: "ctl_tlv", code: P.R_CTL_TLV_WRITE, controlId: 0, tlv: P.encodeTlv(1, [0, 0]) }, 4).status).toBe(P.S_BAD_MSG);
  });

  test("gain follows the controls; snapshot/restore", () => {
    const c = new SndControls(both);
    expect(c.gain(P.D_OUTPUT)).toEqual(UNITY);
    c.handle({ kind: "ctl_write", code: P.R_CTL_WRITE, controlId: 0, value: P.encodeCtlValue32([VOLUME_MAX - 12]) }, 4); // -6 dB
    expect(c.gain(P.D_OUTPUT).linear).toBeCloseTo(0.501187, 5);
    expect(c.gain(P.D_INPUT)).toEqual(UNITY);
    c.handle({ kind: "ctl_write", code: P.R_CTL_WRITE, controlId: 3, value: P.encodeCtlValue32([0]) }, 4);
    expect(c.gain(P.D_INPUT).mute).toBe(true);
    const d = new SndControls(both);
    d.restore(c.snapshot());
    expect(d.snapshot()).toEqual([VOLUME_MAX - 12, 1, VOLUME_MAX, 0]);
    expect(() => d.restore([1, 2, 3, 4])).toThrow();
    expect(volumeToLinear(0)).toBe(0);
  });

  test("unity gain leaves every format bit-exact; mute writes the format's silence", () => {
    for (const f of [P.FMT_U8, P.FMT_S16, P.FMT_S24_3, P.FMT_S24, P.FMT_S32, P.FMT_FLOAT]) {
      const data = new Uint8Array(4096 + 3);
      crypto.getRandomValues(data);
      const copy = data.slice();
      applyGain(data, f, UNITY);
      expect(Buffer.compare(Buffer.from(data), Buffer.from(copy))).toBe(0);
      applyGain(data, f, { mute: true, linear: 1 });
      expect(data.every((b) => b === silenceByte(f))).toBe(true);
    }
  });

  test("attenuation per format keeps sign and scale", () => {
    const half = { mute: false, linear: 0.5 };
    const u8 = Uint8Array.from([0, 128, 255, 64]);
    applyGain(u8, P.FMT_U8, half);
    expect(Array.from(u8)).toEqual([64, 128, 192, 96]);
    const s16 = new Uint8Array(new Int16Array([-32768, 1000, -1001, 32767]).buffer);
    applyGain(s16, P.FMT_S16, half);
    expect(Array.from(new Int16Array(s16.buffer))).toEqual([-16384, 500, -500, 16384]);
    const s24 = new Uint8Array(new Int32Array([0x00800000 /* -2^23 in the low bytes */, 0x007fffff, 0xff000010 | 0]).buffer);
    applyGain(s24, P.FMT_S24, half);
    expect(Array.from(new Int32Array(s24.buffer))).toEqual([-(1 << 22), 1 << 22, 8]);
    const s24p = Uint8Array.from([0x00, 0x00, 0x80, 0xff, 0xff, 0x7f]);
    applyGain(s24p, P.FMT_S24_3, half);
    expect(Array.from(s24p)).toEqual([0x00, 0x00, 0xc0, 0x00, 0x00, 0x40]);
    const fl = new Uint8Array(new Float32Array([1, -0.5]).buffer);
    applyGain(fl, P.FMT_FLOAT, half);
    expect(Array.from(new Float32Array(fl.buffer))).toEqual([0.5, -0.25]);
  });
});

describe("snd jacks and channel maps", () => {
  test("one jack per direction: headphone out, mic in, connected, REMAP, plug events", () => {
    const j = new SndJacks([{ direction: P.D_OUTPUT, nid: 0 }, { direction: P.D_INPUT, nid: 0 }]);
    expect(j.count).toBe(2);
    expect(defconfDevice(j.info(0).defconf)).toBe(DEFCONF.DEVICE_HP_OUT);
    expect(defconfDevice(j.info(1).defconf)).toBe(DEFCONF.DEVICE_MIC_IN);
    expect(j.info(0)).toMatchObject({ connected: true, features: 1 << P.JACK_F_REMAP });
    expect(j.remap(0, 2, 3).status).toBe(P.S_OK);
    expect(j.info(0).defconf & 0xff).toBe(0x23);
    expect(defconfDevice(j.info(0).defconf)).toBe(DEFCONF.DEVICE_HP_OUT);
    expect(j.remap(0, 16, 0).status).toBe(P.S_BAD_MSG);
    expect(j.remap(5, 0, 0).status).toBe(P.S_BAD_MSG);
    expect(j.setConnected(1, false)).toEqual({ code: P.EVT_JACK_DISCONNECTED, data: 1 });
    expect(j.setConnected(1, false)).toBeNull();
    expect(j.setConnected(1, true)).toEqual({ code: P.EVT_JACK_CONNECTED, data: 1 });
    const k = new SndJacks([{ direction: P.D_OUTPUT, nid: 0 }, { direction: P.D_INPUT, nid: 0 }]);
    k.restore(j.snapshot());
    expect(k.snapshot()).toEqual(j.snapshot());
    expect(() => k.restore([{ defconf: 0, connected: true }, { defconf: 0, connected: true }])).toThrow();
  });

  test("standard maps for 1-8 channels in WAVE order, one per channel count per PCM device and direction", () => {
    for (let ch = 1; ch <= 8; ch++) expect(STANDARD_LAYOUTS[ch]!.length).toBe(ch);
    expect(STANDARD_LAYOUTS[2]).toEqual([P.CHMAP_FL, P.CHMAP_FR]);
    expect(waveChannelMask(1)).toBe(0x4);
    expect(waveChannelMask(2)).toBe(0x3);
    expect(waveChannelMask(6)).toBe(0x3f);
    expect(waveChannelMask(8)).toBe(0x63f);
    const maps = buildChmaps([
      { nid: 0, direction: P.D_OUTPUT, channelsMin: 1, channelsMax: 8 },
      { nid: 0, direction: P.D_OUTPUT, channelsMin: 1, channelsMax: 2 },
      { nid: 0, direction: P.D_INPUT, channelsMin: 2, channelsMax: 2 },
    ]);
    expect(maps.length).toBe(8 + 1);
    expect(maps.at(-1)).toEqual({ nid: 0, direction: P.D_INPUT, positions: [P.CHMAP_FL, P.CHMAP_FR] });
    for (const m of maps) expect(P.decodeChmapInfo(P.encodeChmapInfo(m))).toEqual(m);
  });
});

describe("snd WAV files", () => {
  test("S16 stereo: a 44-byte PCM header, sizes fixed on finalize, Python's wave module agrees", () => {
    const dir = tmp();
    const path = join(dir, "a.wav");
    const w = WavWriter.open(path, { format: P.FMT_S16, channels: 2, rateHz: 48000 });
    const data = new Uint8Array(48000 * 4 / 10);
    crypto.getRandomValues(data);
    expect(w.write(data.subarray(0, 1000))).toBe(1000);
    expect(w.write(data.subarray(1000))).toBe(data.length - 1000);
    expect(statSync(path).size).toBe(44 + data.length);
    expect(new DataView(readFileSync(path).buffer).getUint32(40, true)).toBe(0); // not yet fixed up
    w.finalize();
    const file = readFileSync(path);
    expect(file.subarray(0, 4).toString()).toBe("RIFF");
    expect(file.readUInt32LE(4)).toBe(36 + data.length);
    expect(file.readUInt16LE(20)).toBe(1);
    expect(file.readUInt32LE(40)).toBe(data.length);
    expect(Buffer.compare(file.subarray(44), Buffer.from(data))).toBe(0);
    const py = Bun.spawnSync(["python3", "-c", "import wave,sys; w=wave.open(sys.argv[1]); print(w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())", path], { timeout: 20000 });
    if (py.exitCode === 0) expect(py.stdout.toString().trim()).toBe(`2 2 48000 ${data.length / 4}`);
    const r = WavReader.open(path);
    expect(r.format).toEqual({ format: P.FMT_S16, channels: 2, rateHz: 48000 });
    const back = new Uint8Array(data.length + 100);
    expect(r.read(back)).toBe(data.length);
    expect(Buffer.compare(Buffer.from(back.subarray(0, data.length)), Buffer.from(data))).toBe(0);
    expect(back.subarray(data.length).every((b) => b === 0)).toBe(true);
    expect(r.eof).toBe(true);
    expect(wavCaps(r.format)).toEqual(fixedCaps(P.FMT_S16, P.RATE_48000, 2));
    r.rewind();
    expect(r.read(new Uint8Array(4))).toBe(4);
    r.close();
  });

  test("S24 (low 24 of 32 bits) is stored MSB-aligned as WAVE_FORMAT_EXTENSIBLE and read back exactly", () => {
    const path = join(tmp(), "s24.wav");
    const samples = new Int32Array([0, 1, -1, 0x7fffff, -0x800000, 12345, -54321, 42]);
    const w = WavWriter.open(path, { format: P.FMT_S24, channels: 2, rateHz: 96000 });
    const bytes = new Uint8Array(samples.buffer);
    const before = bytes.slice();
    w.write(bytes);
    expect(Buffer.compare(Buffer.from(bytes), Buffer.from(before))).toBe(0); // the caller's data is untouched
    w.finalize();
    const file = readFileSync(path);
    expect(file.readUInt16LE(20)).toBe(0xfffe);
    expect(file.readUInt16LE(34)).toBe(32);
    expect(file.readUInt16LE(38)).toBe(24);
    expect(file.readUInt16LE(44)).toBe(1); // KSDATAFORMAT_SUBTYPE_PCM
    const info = readWavInfo(path);
    expect(info.dataOffset).toBe(68);
    expect(file.readInt32LE(68 + 4)).toBe(1 << 8);
    const r = WavReader.open(path);
    expect(r.format.format).toBe(P.FMT_S24);
    const back = new Uint8Array(bytes.length);
    r.read(back);
    expect(Array.from(new Int32Array(back.buffer))).toEqual(Array.from(samples));
  });

  test("FLOAT gets format 3 with a fact chunk; 6 channels get EXTENSIBLE with the 5.1 mask", () => {
    const dir = tmp();
    const f = join(dir, "f.wav");
    const w = WavWriter.open(f, { format: P.FMT_FLOAT, channels: 1, rateHz: 8000 });
    w.write(new Uint8Array(new Float32Array([0.25, -1, 1]).buffer));
    w.finalize();
    const file = readFileSync(f);
    expect(file.readUInt16LE(20)).toBe(3);
    expect(file.subarray(38, 42).toString()).toBe("fact");
    expect(file.readUInt32LE(46)).toBe(3);
    expect(readWavInfo(f)).toMatchObject({ format: P.FMT_FLOAT, channels: 1, rateHz: 8000, dataBytes: 12 });
    const six = join(dir, "six.wav");
    WavWriter.open(six, { format: P.FMT_S16, channels: 6, rateHz: 48000 }).finalize();
    const s = readFileSync(six);
    expect(s.readUInt16LE(20)).toBe(0xfffe);
    expect(s.readUInt32LE(40)).toBe(0x3f);
    expect(() => wavHeader({ format: P.FMT_S16, channels: 9, rateHz: 48000 }, 0)).toThrow();
    expect(() => wavHeader({ format: P.FMT_S16, channels: 2, rateHz: 44000 }, 0)).toThrow();
  });

  test("append continues a finished or unfinished file of the same format and refuses another format", () => {
    const dir = tmp();
    const path = join(dir, "app.wav");
    const fmt = { format: P.FMT_U8, channels: 1, rateHz: 8000 };
    const a = WavWriter.open(path, fmt, { append: true }); // missing: created
    a.write(Uint8Array.from([1, 2, 3])); // odd: a pad byte follows on finalize
    a.finalize();
    expect(statSync(path).size).toBe(44 + 3 + 1);
    const b = WavWriter.open(path, fmt, { append: true });
    expect(b.dataBytes).toBe(3);
    b.write(Uint8Array.from([4, 5]));
    b.finalize();
    const r = WavReader.open(path);
    const out = new Uint8Array(7);
    expect(r.read(out)).toBe(5);
    expect(Array.from(out)).toEqual([1, 2, 3, 4, 5, 0x80, 0x80]); // U8 silence after the end
    // An unfinished file (sizes never fixed, as after a crash) continues after its last frame.
    const c = WavWriter.open(path, fmt, { append: true });
    c.write(Uint8Array.from([6, 7]));
    // no finalize: simulate a kill, then append again
    const d = WavWriter.open(path, fmt, { append: true });
    expect(d.dataBytes).toBe(7);
    d.finalize();
    expect(readWavInfo(path).dataBytes).toBe(7);
    expect(() => WavWriter.open(path, { ...fmt, rateHz: 16000 }, { append: true })).toThrow(/holds U8, 1 ch, 8000 Hz/);
    // Without append the file starts over.
    WavWriter.open(path, fmt).finalize();
    expect(readWavInfo(path).dataBytes).toBe(0);
  });

  test("append refuses a file with chunks after its data", () => {
    const path = join(tmp(), "list.wav");
    const head = wavHeader({ format: P.FMT_S16, channels: 1, rateHz: 8000 }, 4);
    const list = Buffer.concat([Buffer.from("LIST"), Buffer.from([4, 0, 0, 0]), Buffer.from("INFO")]);
    writeFileSync(path, Buffer.concat([Buffer.from(head), Buffer.alloc(4), list]));
    expect(readWavInfo(path).dataBytes).toBe(4);
    expect(() => WavWriter.open(path, { format: P.FMT_S16, channels: 1, rateHz: 8000 }, { append: true })).toThrow(/chunks follow the data/);
  });

  test("maxDataBytes caps the file at whole frames", () => {
    const path = join(tmp(), "cap.wav");
    const w = WavWriter.open(path, { format: P.FMT_S16, channels: 2, rateHz: 48000 }, { maxDataBytes: 10 });
    expect(w.write(new Uint8Array(16))).toBe(8);
    expect(w.full).toBe(true);
    expect(w.dropped).toBe(8);
    w.finalize();
    expect(readWavInfo(path).dataBytes).toBe(8);
  });

  test("the reader explains what it cannot read", () => {
    const dir = tmp();
    const junk = join(dir, "junk.wav");
    writeFileSync(junk, "not a wav at all");
    expect(() => readWavInfo(junk)).toThrow(/not a RIFF\/WAVE file/);
    expect(() => readWavInfo(join(dir, "missing.wav"))).toThrow(/cannot open \(ENOENT\)/);
    const odd = join(dir, "odd.wav");
    const h = Buffer.from(wavHeader({ format: P.FMT_S16, channels: 1, rateHz: 44100 }, 0));
    h.writeUInt32LE(22050, 24); // a rate virtio-snd has, but a 20-bit sample size it does not
    h.writeUInt16LE(20, 34);
    writeFileSync(odd, h);
    expect(() => readWavInfo(odd)).toThrow(/PCM with 20 bits in 20 is not supported/);
    const rate = join(dir, "rate.wav");
    const h2 = Buffer.from(wavHeader({ format: P.FMT_S16, channels: 1, rateHz: 44100 }, 0));
    h2.writeUInt32LE(44000, 24);
    writeFileSync(rate, h2);
    expect(() => readWavInfo(rate)).toThrow(/44000 Hz is not a virtio-snd rate/);
  });
});

describe("snd options", () => {
  test("defaults: null backend, one stream each way on PCM device 0", () => {
    const o = parseSndOptions({});
    expect(o.backend).toBe("null");
    expect(o.streams).toEqual([{ id: 0, direction: P.D_OUTPUT, nid: 0 }, { id: 1, direction: P.D_INPUT, nid: 0 }]);
    expect(o).toMatchObject({ controls: false, jacks: false, alsaPlayback: "default", alsaCapture: "default", captureFile: null });
    expect(playbackPath(o, 0)).toBe("snd-out-0.wav");
  });

  test("--streams and the file options", () => {
    const o = parseSndOptions({ backend: "file", streams: "out=2,in=0", "playback-file": "/tmp/x-{stream}.wav", controls: true, jacks: "on" });
    expect(o.streams.map((s) => [s.id, s.direction, s.nid])).toEqual([[0, 0, 0], [1, 0, 1]]);
    expect(playbackPath(o, 1)).toBe("/tmp/x-1.wav");
    expect(o.controls && o.jacks).toBe(true);
    expect(parseSndOptions({ streams: "in=3" }).streams.length).toBe(4);
    const bad = (raw: Record<string, unknown>, msg: RegExp) => expect(() => parseSndOptions(raw)).toThrow(msg);
    bad({ backend: "pulse" }, /'pulse' is not a backend/);
    bad({ backend: "cras" }, /cras backend is not available/);
    bad({ streams: "out=0,in=0" }, /at least one stream/);
    bad({ streams: "out=9" }, /0\.\.8/);
    bad({ streams: "out=1,out=2" }, /given twice/);
    bad({ streams: "left=1" }, /unknown key 'left'/);
    bad({ streams: "out" }, /not KEY=N/);
    bad({ "playback-file": "a.wav" }, /needs --backend file/);
    bad({ "capture-file": "a.wav" }, /needs --backend file/);
    bad({ "alsa-playback": "hw:0" }, /needs --backend alsa/);
    bad({ backend: "file", streams: "out=2", "playback-file": "same.wav" }, /put \{stream\} in the name/);
    bad({ controls: "maybe" }, /not a boolean/);
  });

  test("crosvm's --config", () => {
    const c = parseCrosvmConfig("backend=file,capture=false,num_output_devices=2,num_input_devices=1,num_output_streams=2,num_input_streams=1,playback_path=/tmp/pb,playback_size=4096");
    expect(c.streams.map((s) => [s.id, s.direction, s.nid])).toEqual([[0, 0, 0], [1, 0, 0], [2, 0, 1], [3, 0, 1], [4, 1, 0]]);
    expect(c).toMatchObject({ backend: "file", captureEnabled: false, playbackFile: "/tmp/pb/stream-{stream}.wav", playbackMaxBytes: 4096 });
    const o = parseSndOptions({ config: "backend=file,playback_path=/tmp/pb", "capture-file": "/tmp/in.wav" });
    expect(playbackPath(o, 0)).toBe("/tmp/pb/stream-0.wav");
    expect(capturePath(o, 1)).toBe("/tmp/in.wav");
    expect(capturePath(parseSndOptions({ config: "backend=file,capture=false", "capture-file": "/tmp/in.wav" }), 1)).toBeNull();
    expect(parseSndOptions({ config: "capture=true" }).streams.length).toBe(2);
    expect(() => parseSndOptions({ config: "" })).toThrow(/--config needs a value/);
    const bad = (cfg: string, msg: RegExp) => expect(() => parseCrosvmConfig(cfg)).toThrow(msg);
    bad("backend=aaudio", /not available/);
    bad("client_type=crosvm", /not supported here/);
    bad("num_output_devices=x", /not an integer/);
    bad("num_output_devices=0,num_input_devices=0", /no streams/);
    bad("playback_path=/tmp", /need backend=file/);
    bad("capture=maybe", /not a boolean/);
    bad("colour=blue", /unknown key 'colour'/);
    bad("backend=null,backend=file", /given twice/);
    expect(() => parseSndOptions({ config: "backend=null", backend: "file" })).toThrow(/replaces --backend/);
  });

  test("checkSndPaths reads capture WAV headers and checks playback directories before the socket", () => {
    const dir = tmp();
    const good = join(dir, "in.wav");
    const w = WavWriter.open(good, { format: P.FMT_S16, channels: 1, rateHz: 16000 });
    w.write(new Uint8Array(320));
    w.finalize();
    checkSndPaths(parseSndOptions({ backend: "file", "capture-file": good, "playback-file": join(dir, "o-{stream}.wav") }));
    writeFileSync(join(dir, "bad.wav"), "RIFF....WAVEjunk");
    expect(() => checkSndPaths(parseSndOptions({ backend: "file", "capture-file": join(dir, "bad.wav"), "playback-file": join(dir, "o.wav") }))).toThrow(/--capture-file: .*bad\.wav/);
    expect(() => checkSndPaths(parseSndOptions({ backend: "file", "capture-file": join(dir, "none.wav"), "playback-file": join(dir, "o.wav") }))).toThrow(/ENOENT/);
    expect(() => checkSndPaths(parseSndOptions({ backend: "file", "playback-file": join(dir, "no/such/dir/o.wav") }))).toThrow(/cannot create files/);
    checkSndPaths(parseSndOptions({ "capture-file": undefined })); // null backend: nothing to check
  });
});

describe("snd ALSA binding", () => {
  test("plays into a file plugin PCM and records from one, over ALSA's null PCM", () => {
    const dir = tmp();
    const outFile = join(dir, "out.raw");
    const inFile = join(dir, "in.raw");
    const input = new Uint8Array(1200 * 4);
    crypto.getRandomValues(input);
    writeFileSync(inFile, input);
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, [
      "pcm.null { type null }",
      `pcm.tofile { type file; slave.pcm "null"; file "${outFile}"; format "raw" }`,
      `pcm.fromfile { type file; slave.pcm "null"; file "/dev/null"; infile "${inFile}"; format "raw" }`,
    ].join("\n"));
    const p = Bun.spawnSync([process.execPath, join(import.meta.dir, "snd_alsa_probe.ts")], { env: { ...process.env, ALSA_CONFIG_PATH: conf }, stdout: "pipe", stderr: "pipe", timeout: 30000, killSignal: "SIGKILL" });
    expect(p.exitCode, `probe: ${p.signalCode ?? ""} ${p.stderr.toString()}`).toBe(0);
    const r = JSON.parse(p.stdout.toString());
    expect(r.playConfig.tests).toEqual({ s16: 0, rate: 0, channels: 0 });
    expect(r.playConfig).toMatchObject({ gotRate: 48000, period: 480, periodAfter: 480 });
    expect(r.preparedState).toBe(2);
    expect(r.written).toBe(4800);
    expect(r.pollCount).toBeGreaterThanOrEqual(1);
    expect(r.pollFd).toBeGreaterThanOrEqual(0);
    const played = readFileSync(outFile);
    expect(played.length).toBe(4800 * 4);
    for (let i = 0; i < 10; i++) for (const j of [0, 1, 1919]) expect(played[i * 1920 + j]).toBe((i * 7 + j) & 0xff);
    expect(r.readFrames).toBe(1200);
    expect(Buffer.compare(Buffer.from(r.recorded, "base64"), Buffer.from(input))).toBe(0);
    expect(r.unknownPcmIsAlsaError).toBe(true);
    expect(r.unknownPcm).toMatch(/snd_pcm_open no_such_pcm: No such file or directory \(-2\)/);
    expect(r.strerrorEpipe).toBe("Broken pipe");
  });

  test("a missing library is a clear error, raised only when asked for", async () => {
    const { loadAlsa } = await import("../../ffi/alsa.ts");
    expect(() => loadAlsa("libasound-missing.so.9")).toThrow(/apt-get install libasound2/);
  });
});
