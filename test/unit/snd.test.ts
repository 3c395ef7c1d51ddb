// The snd device through the in-process front-end: a real worker behind a real socket, the test
// playing Linux's virtio-snd driver on guest rings in a shared memfd. Covers the control
// requests and their refusals, pacing on the host clock, the file backend's WAVs (playback and
// capture), controls applied to samples, XRUN and jack events, snapshot/restore mid-playback and
// hostile chains.
import { describe, test, expect, afterEach } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { BackendUnderTest, GuestRam, Vmm, Req, configPayload } from "../support/frontend.ts";
import { SndDriver, u32, type Done } from "../support/snd_driver.ts";
import { COMMON_FEATURES } from "../../src/device.ts";

import * as P from "../../devices/snd/protocol.ts";
import { WavWriter, readWavInfo } from "../../devices/snd/wav.ts";

const MiB = 1 << 20;
const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "snd-test-"));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

// 48 kHz S16 stereo, 10 ms periods, 4 periods of buffer: what aplay asks by default, shortened.
const FRAME = 4;
const PERIOD = 480 * FRAME;
const BUFFER = 4 * PERIOD;
const PERIOD_US = 10_000;

async function session(options: Record<string, unknown>, ram?: GuestRam): Promise<{ backend: BackendUnderTest; drv: SndDriver }> {
  const backend = new BackendUnderTest("snd", options);
  cleanups.push(() => backend.stop());
  await backend.ready;
  if (!ram) {
    ram = new GuestRam(64 * MiB);
    const r = ram;
    cleanups.push(() => r.dispose());
  }
  const vmm = new Vmm(backend, ram);
  cleanups.push(() => vmm.dispose());
  return { backend, drv: new SndDriver(vmm, ram) };
}

/** Plays `periods` periods of `pcm` on stream 0 as Linux does: a buffer's worth first, then one per completion. Returns completions. */
async function play(drv: SndDriver, pcm: Uint8Array, opts: { start?: boolean; inFlight?: number } = {}): Promise<{ done: Done[]; startedAt: number }> {
  const periods = pcm.length / PERIOD;
  let sent = 0;
  const done: Done[] = [];
  for (; sent < Math.min(opts.inFlight ?? 4, periods); sent++) drv.sendTx(0, pcm.subarray(sent * PERIOD, (sent + 1) * PERIOD));
  const startedAt = performance.now();
  if (opts.start ?? true) expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
  while (done.length < periods) {
    const got = await drv.waitIo(drv.tx, 1, 5000);
    done.push(...got);
    for (let i = 0; i < got.length && sent < periods; i++, sent++) drv.sendTx(0, pcm.subarray(sent * PERIOD, (sent + 1) * PERIOD));
  }
  return { done, startedAt };
}

describe("snd device: negotiation and control requests", () => {
  test("features, config space (12 bytes without CTLS, 16 with), info queries", async () => {
    const { drv } = await session({ jacks: true });
    const f = drv.activate();
    expect(f & COMMON_FEATURES).toBe(COMMON_FEATURES);
    expect(f & P.VIRTIO_SND_F_CTLS_BIT).toBe(0n);
    const cfg = drv.vmm.conn.request(Req.GET_CONFIG, configPayload(0, 12)).payload.subarray(12);
    expect(P.decodeConfig(cfg)).toEqual({ jacks: 2, streams: 2, chmaps: 16, controls: 0 });
    // Past the 12 bytes there is no config space.
    const beyond = drv.vmm.conn.request(Req.GET_CONFIG, configPayload(0, 16));
    expect(beyond.payload.length === 12 || beyond.payload.subarray(12).every((b) => b === 0)).toBe(true);

    const pcm = await drv.request(P.encodeQueryInfo(P.R_PCM_INFO, 0, 2, P.PCM_INFO_BYTES), 4 + 2 * P.PCM_INFO_BYTES);
    expect(u32(pcm)).toBe(P.S_OK);
    const out = P.decodePcmInfo(pcm.subarray(4, 36));
    const inp = P.decodePcmInfo(pcm.subarray(36, 68));
    expect(out.direction).toBe(P.D_OUTPUT);
    expect(inp.direction).toBe(P.D_INPUT);
    expect(out.formats & (1 << P.FMT_S16)).toBeTruthy();
    expect(out.rates & (1 << P.RATE_48000)).toBeTruthy();
    expect(out.features).toBe(1 << P.PCM_F_EVT_XRUNS);

    const jacks = await drv.request(P.encodeQueryInfo(P.R_JACK_INFO, 0, 2, P.JACK_INFO_BYTES), 4 + 2 * P.JACK_INFO_BYTES);
    expect(u32(jacks)).toBe(P.S_OK);
    expect(P.decodeJackInfo(jacks.subarray(4)).connected).toBe(true);
    expect(await drv.status(P.encodeJackRemap(0, 2, 1))).toBe(P.S_OK);
    expect(await drv.status(P.encodeJackRemap(5, 2, 1))).toBe(P.S_BAD_MSG);

    const chmap = await drv.request(P.encodeQueryInfo(P.R_CHMAP_INFO, 1, 1, P.CHMAP_INFO_BYTES), 4 + P.CHMAP_INFO_BYTES);
    expect(P.decodeChmapInfo(chmap.subarray(4)).positions).toEqual([P.CHMAP_FL, P.CHMAP_FR]);
    // Out of range, and a driver struct size of 0.
    expect(await drv.status(P.encodeQueryInfo(P.R_PCM_INFO, 1, 2, P.PCM_INFO_BYTES))).toBe(P.S_BAD_MSG);
    expect(await drv.status(P.encodeQueryInfo(P.R_PCM_INFO, 0, 1, 0))).toBe(P.S_BAD_MSG);
    // CTL requests without CTLS negotiated.
    expect(await drv.status(P.encodeQueryInfo(P.R_CTL_INFO, 0, 1, P.CTL_INFO_BYTES))).toBe(P.S_NOT_SUPP);
  });

  test("the PCM lifecycle and every bad-state answer", async () => {
    const { drv } = await session({});
    drv.activate();
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_BAD_MSG); // before SET_PARAMS
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_BAD_MSG); // no parameters
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_BAD_MSG); // START before PREPARE
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_BAD_MSG);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_BAD_MSG);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    expect(await drv.setParams(0)).toBe(P.S_BAD_MSG); // SET_PARAMS while running
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_BAD_MSG);
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_BAD_MSG);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK); // pause release
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    expect(await drv.setParams(0, { rate: P.RATE_44100 })).toBe(P.S_OK);
    // Unknown stream ids, parameters out of range.
    expect(await drv.pcm(P.R_PCM_PREPARE, 2)).toBe(P.S_BAD_MSG);
    expect(await drv.setParams(7)).toBe(P.S_BAD_MSG);
    expect(await drv.setParams(0, { periodBytes: 1000 })).toBe(P.S_BAD_MSG); // does not divide the buffer
    expect(await drv.setParams(0, { channels: 9 })).toBe(P.S_NOT_SUPP);
    expect(await drv.setParams(0, { format: P.FMT_MU_LAW })).toBe(P.S_NOT_SUPP);
    // Short header, wrong sizes, unknown code.
    expect(await drv.status(new Uint8Array(2))).toBe(P.S_BAD_MSG);
    expect(await drv.status(P.encodePcmHdr(P.R_PCM_PREPARE, 0).subarray(0, 6))).toBe(P.S_BAD_MSG);
    expect(await drv.status(new Uint8Array([...P.encodePcmHdr(P.R_PCM_PREPARE, 0), 0]))).toBe(P.S_BAD_MSG);
    expect(await drv.status(Uint8Array.of(0x99, 0x09, 0, 0))).toBe(P.S_NOT_SUPP);
  });
});

describe("snd device: playback", () => {
  test("null backend: N periods take N period times on the host clock; latency counts what is queued", async () => {
    const { drv } = await session({});
    drv.activate();
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    // All N periods queued up front (indirect chains: one descriptor each): the completions then
    // follow the device's clock alone, not how fast this thread refills (the host may be busy).
    const N = 50;
    for (let i = 0; i < N; i++) drv.sendTx(0, new Uint8Array(PERIOD), 8, true);
    const startedAt = performance.now();
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    const done = await drv.waitIo(drv.tx, N, 10_000);
    const elapsedUs = (done.at(-1)!.at - startedAt) * 1000;
    const expected = N * PERIOD_US;
    console.log(`snd pacing: ${N} periods of 10 ms in ${(elapsedUs / 1000).toFixed(1)} ms (${((elapsedUs / expected - 1) * 100).toFixed(2)}% off)`);
    expect(Math.abs(elapsedUs - expected)).toBeLessThan(0.05 * expected);
    expect(done.every((d) => d.status === P.S_OK && d.len === 8)).toBe(true);
    // Each completion reports what is still queued behind it.
    expect(done[0]!.latency).toBe((N - 1) * PERIOD);
    expect(done.at(-1)!.latency).toBe(0);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
  });

  test("file backend: the WAV holds exactly the PCM sent; a format change starts the next file", async () => {
    const dir = tempDir();
    const { drv } = await session({ backend: "file", "playback-file": join(dir, "out-{stream}.wav") });
    drv.activate();
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const pcm = new Uint8Array(randomBytes(20 * PERIOD));
    await play(drv, pcm);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    const path = join(dir, "out-0.wav");
    const info = readWavInfo(path);
    expect(info).toMatchObject({ format: P.FMT_S16, channels: 2, rateHz: 48000, dataOffset: 44, dataBytes: pcm.length, sizeWasStale: false });
    expect(Buffer.from(readFileSync(path).subarray(44)).equals(Buffer.from(pcm))).toBe(true);

    // Same format again: appended to the same file; another format: out-0-1.wav.
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    await play(drv, pcm.subarray(0, 4 * PERIOD));
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    expect(readWavInfo(path).dataBytes).toBe(24 * PERIOD);
    expect(await drv.setParams(0, { channels: 1, bufferBytes: BUFFER / 2, periodBytes: PERIOD / 2 })).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    drv.sendTx(0, pcm.subarray(0, PERIOD / 2));
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    await drv.waitIo(drv.tx, 1);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    expect(readWavInfo(join(dir, "out-0-1.wav"))).toMatchObject({ channels: 1, dataBytes: PERIOD / 2 });
  });

  test("RELEASE completes every held buffer before it answers", async () => {
    const { drv } = await session({});
    drv.activate();
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    for (let i = 0; i < 4; i++) drv.sendTx(0, new Uint8Array(PERIOD));
    await Bun.sleep(30);
    expect(drv.takeIo(drv.tx)).toHaveLength(0); // held: not started
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    const done = drv.takeIo(drv.tx);
    expect(done).toHaveLength(4);
    expect(done.every((d) => d.status === P.S_OK)).toBe(true);
  });

  test("XRUN on the event queue when the guest is late, only with EVT_XRUNS", async () => {
    const { drv } = await session({});
    drv.activate();
    drv.postEvents(4);
    expect(await drv.setParams(0, { features: 1 << P.PCM_F_EVT_XRUNS })).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    drv.sendTx(0, new Uint8Array(PERIOD));
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    await drv.waitIo(drv.tx, 1);
    const e = await drv.waitEvent((x) => x.code === P.EVT_PCM_XRUN);
    expect(e.data).toBe(0);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    // Without the feature: no event.
    drv.events = [];
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    drv.sendTx(0, new Uint8Array(PERIOD));
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    await drv.waitIo(drv.tx, 1);
    await Bun.sleep(50);
    expect(drv.collectEvents()).toHaveLength(0);
  });
});

describe("snd device: capture", () => {
  test("file backend: rx chains get the capture WAV's data from its start, paced; silence after its end", async () => {
    const dir = tempDir();
    const wavPath = join(dir, "in.wav");
    const pcm = new Uint8Array(randomBytes(10 * PERIOD));
    const w = WavWriter.open(wavPath, { format: P.FMT_S16, channels: 2, rateHz: 48000 });
    w.write(pcm);
    w.finalize();
    const { drv } = await session({ backend: "file", "capture-file": wavPath, "playback-file": join(dir, "out.wav") });
    drv.activate();
    // The capture stream offers exactly the file's format.
    const info = await drv.request(P.encodeQueryInfo(P.R_PCM_INFO, 1, 1, P.PCM_INFO_BYTES), 4 + P.PCM_INFO_BYTES);
    expect(P.decodePcmInfo(info.subarray(4))).toMatchObject({ formats: 1 << P.FMT_S16, rates: 1 << P.RATE_48000, channelsMin: 2, channelsMax: 2 });
    expect(await drv.setParams(1, { rate: P.RATE_44100 })).toBe(P.S_NOT_SUPP);
    expect(await drv.setParams(1)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 1)).toBe(P.S_OK);
    for (let i = 0; i < 4; i++) drv.postRx(1, PERIOD); // Linux queues the whole buffer before START
    const t0 = performance.now();
    expect(await drv.pcm(P.R_PCM_START, 1)).toBe(P.S_OK);
    const got: Done[] = [];
    while (got.length < 12) {
      const d = await drv.waitIo(drv.rx, 1);
      got.push(...d);
      for (let i = 0; i < d.length; i++) drv.postRx(1, PERIOD);
    }
    const elapsed = (got.at(-1)!.at - t0) * 1000;
    expect(Math.abs(elapsed - 12 * PERIOD_US)).toBeLessThan(0.1 * 12 * PERIOD_US);
    expect(got.every((d) => d.status === P.S_OK && d.len === PERIOD + 8)).toBe(true);
    const captured = Buffer.concat(got.map((d) => d.data));
    expect(captured.subarray(0, pcm.length).equals(Buffer.from(pcm))).toBe(true);
    expect(captured.subarray(pcm.length).every((b) => b === 0)).toBe(true);
    expect(await drv.pcm(P.R_PCM_STOP, 1)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 1)).toBe(P.S_OK);
    // The buffers still queued came back without data.
    const rest = drv.takeIo(drv.rx);
    expect(rest).toHaveLength(4);
    expect(rest.every((d) => d.len === 8)).toBe(true);
  });
});

describe("snd device: controls and jacks", () => {
  test("CTLS: info, read, write with CTL_NOTIFY; volume and mute applied to the samples, unity bit-exact", async () => {
    const dir = tempDir();
    const { drv } = await session({ backend: "file", "playback-file": join(dir, "out-{stream}.wav"), controls: true });
    const f = drv.activate();
    expect(f & P.VIRTIO_SND_F_CTLS_BIT).toBe(P.VIRTIO_SND_F_CTLS_BIT);
    const cfg = drv.vmm.conn.request(Req.GET_CONFIG, configPayload(0, 16)).payload.subarray(12);
    expect(P.decodeConfig(cfg).controls).toBe(4);
    drv.postEvents(8);

    const infos = await drv.request(P.encodeQueryInfo(P.R_CTL_INFO, 0, 4, P.CTL_INFO_BYTES), 4 + 4 * P.CTL_INFO_BYTES);
    expect(u32(infos)).toBe(P.S_OK);
    const names = [0, 1, 2, 3].map((i) => P.decodeCtlInfo(infos.subarray(4 + i * 96, 4 + (i + 1) * 96)));
    expect(names.map((c) => c.name)).toEqual(["Master Playback Volume", "Master Playback Switch", "Capture Volume", "Capture Switch"]);
    expect(names[0]).toMatchObject({ type: P.CTL_TYPE_INTEGER, min: 0, max: 127 });

    const read = async (id: number) => {
      const r = await drv.request(P.encodeCtlHdr(P.R_CTL_READ, id), 4 + P.CTL_VALUE_BYTES);
      expect(u32(r)).toBe(P.S_OK);
      return P.decodeCtlValue32(r.subarray(4), 1)[0];
    };
    const write = (id: number, v: number) => drv.status(P.encodeCtlWrite(id, P.encodeCtlValue32([v])));
    expect(await read(0)).toBe(127);
    expect(await read(1)).toBe(1);
    expect(await write(0, 200)).toBe(P.S_BAD_MSG);
    expect(await drv.status(P.encodeCtlHdr(P.R_CTL_READ, 9))).toBe(P.S_BAD_MSG);

    // Unity: bit-exact. Then -6 dB (volume 115), then muted.
    const ramp = new Uint8Array(4 * PERIOD);
    const dv = new DataView(ramp.buffer);
    for (let i = 0; i < ramp.length / 2; i++) dv.setInt16(i * 2, ((i * 97) % 20000) - 10000, true);
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    await play(drv, ramp);
    expect(await write(0, 115)).toBe(P.S_OK);
    const ev = await drv.waitEvent((e) => e.code === P.EVT_CTL_NOTIFY);
    expect(ev.data & 0xffff).toBe(0);
    expect(await read(0)).toBe(115);
    await play(drv, ramp, { start: false });
    expect(await write(1, 0)).toBe(P.S_OK);
    await play(drv, ramp, { start: false });
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    const data = readFileSync(join(dir, "out-0.wav")).subarray(44);
    expect(data.length).toBe(3 * ramp.length);
    expect(Buffer.from(data.subarray(0, ramp.length)).equals(Buffer.from(ramp))).toBe(true);
    const scaled = new DataView(data.buffer, data.byteOffset + ramp.length, ramp.length);
    const k = Math.pow(10, -6 / 20);
    for (const i of [3, 100, 777]) expect(Math.abs(scaled.getInt16(i * 2, true) - dv.getInt16(i * 2, true) * k)).toBeLessThanOrEqual(1);
    expect(data.subarray(2 * ramp.length).every((b) => b === 0)).toBe(true);
  });

  test("jack plug events from the host", async () => {
    const { backend, drv } = await session({ jacks: true });
    drv.activate();
    drv.postEvents(4);
    backend.hostEvent("jack-unplug:0");
    expect(await drv.waitEvent((e) => e.code === P.EVT_JACK_DISCONNECTED)).toEqual({ code: P.EVT_JACK_DISCONNECTED, data: 0 });
    const j = await drv.request(P.encodeQueryInfo(P.R_JACK_INFO, 0, 1, P.JACK_INFO_BYTES), 4 + P.JACK_INFO_BYTES);
    expect(P.decodeJackInfo(j.subarray(4)).connected).toBe(false);
    backend.hostEvent("jack-plug");
    expect(await drv.waitEvent((e) => e.code === P.EVT_JACK_CONNECTED)).toEqual({ code: P.EVT_JACK_CONNECTED, data: 0 });
  });
});

describe("snd device: snapshot and restore", () => {
  test("mid-playback: rings stop with held buffers rewound; a new backend continues the same WAV", async () => {
    const dir = tempDir();
    const opts = { backend: "file", "playback-file": join(dir, "out-{stream}.wav"), controls: true, jacks: true };
    const ram = new GuestRam(64 * MiB);
    cleanups.push(() => ram.dispose());
    const { drv } = await session(opts, ram);
    drv.activate();
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    expect(await drv.status(P.encodeCtlWrite(2, P.encodeCtlValue32([100])))).toBe(P.S_OK);
    const pcm = new Uint8Array(randomBytes(30 * PERIOD));
    // 10 periods played, 4 more queued when the VM stops.
    let sent = 0;
    for (; sent < 4; sent++) drv.sendTx(0, pcm.subarray(sent * PERIOD, (sent + 1) * PERIOD));
    expect(await drv.pcm(P.R_PCM_START, 0)).toBe(P.S_OK);
    let completed = 0;
    while (completed < 10) {
      const d = await drv.waitIo(drv.tx, 1);
      completed += d.length;
      for (let i = 0; i < d.length; i++, sent++) drv.sendTx(0, pcm.subarray(sent * PERIOD, (sent + 1) * PERIOD));
    }
    const bases = drv.vmm.stopAll();
    completed += drv.takeIo(drv.tx).length;
    // GET_VRING_BASE gave back what was not played: the next owner pops it again.
    expect(bases[2]).toBe(completed);
    const blob = await drv.vmm.saveState();
    drv.vmm.conn.close();

    const b2 = new BackendUnderTest("snd", opts);
    cleanups.push(() => b2.stop());
    await b2.ready;
    const vmm2 = new Vmm(b2, ram);
    const drv2 = new SndDriver(vmm2, ram);
    vmm2.handshake();
    vmm2.setMemTable();
    expect(await vmm2.loadState(blob)).toBe(0n);
    vmm2.queues = drv.vmm.queues;
    cleanups.push(() => vmm2.dispose());
    vmm2.queues.forEach((q, i) => vmm2.startQueue(q, bases[i]));
    drv2.bind();
    (drv2 as unknown as { inflight: unknown }).inflight = (drv as unknown as { inflight: unknown }).inflight;
    // The restored stream is running: the rewound buffers play, and the rest follows.
    while (completed < 30) {
      const d = await drv2.waitIo(drv2.tx, 1);
      completed += d.length;
      for (let i = 0; i < d.length && sent < 30; i++, sent++) drv2.sendTx(0, pcm.subarray(sent * PERIOD, (sent + 1) * PERIOD));
    }
    const r = await drv2.request(P.encodeCtlHdr(P.R_CTL_READ, 2), 4 + P.CTL_VALUE_BYTES);
    expect(P.decodeCtlValue32(r.subarray(4), 1)[0]).toBe(100);
    expect(await drv2.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv2.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    const path = join(dir, "out-0.wav");
    expect(readWavInfo(path)).toMatchObject({ dataBytes: pcm.length, sizeWasStale: false });
    expect(Buffer.from(readFileSync(path).subarray(44)).equals(Buffer.from(pcm))).toBe(true);
  });

  test("a state that does not fit is refused", async () => {
    const { drv } = await session({ controls: true });
    drv.vmm.handshake();
    const blob = await drv.vmm.saveState();
    const { drv: other } = await session({ streams: "out=2,in=1", controls: true });
    other.vmm.handshake();
    expect(await other.vmm.loadState(blob)).not.toBe(0n);
  });
});

describe("snd device: hostile chains", () => {
  test("short headers, wrong sizes, stream ids out of range, tx larger than the buffer: BAD_MSG, and the device goes on", async () => {
    const { drv } = await session({});
    drv.activate();
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const bad = async (head: number) => {
      const [d] = await drv.waitIo(drv.tx, 1);
      expect(d!.id).toBe(head);
      return d!;
    };
    // A header of 2 bytes.
    const st = drv.ram.alloc(8);
    const h1 = drv.tx.addChain([{ gpa: drv.put(new Uint8Array(2)), len: 2 }, { gpa: st, len: 8, write: true }]);
    (drv as unknown as { inflight: Map<string, unknown> }).inflight.set(`2/${h1}`, { status: st, data: 0, bytes: 0 });
    expect((await bad(h1)).status).toBe(P.S_BAD_MSG);
    // A 4-byte status, no status at all.
    expect((await bad(drv.sendTx(0, new Uint8Array(PERIOD), 4))).len).toBe(0);
    expect((await bad(drv.sendTx(0, new Uint8Array(PERIOD), 0))).len).toBe(0);
    // Stream out of range; the input stream on the tx queue.
    expect((await bad(drv.sendTx(9, new Uint8Array(PERIOD)))).status).toBe(P.S_BAD_MSG);
    expect((await bad(drv.sendTx(1, new Uint8Array(PERIOD)))).status).toBe(P.S_BAD_MSG);
    // Larger than the negotiated buffer.
    expect((await bad(drv.sendTx(0, new Uint8Array(BUFFER + 4)))).status).toBe(P.S_BAD_MSG);
    // rx: a stream that is not prepared, an output stream.
    drv.postRx(1, PERIOD);
    expect((await drv.waitIo(drv.rx, 1))[0]!.status).toBe(P.S_BAD_MSG);
    drv.postRx(0, PERIOD);
    expect((await drv.waitIo(drv.rx, 1))[0]!.status).toBe(P.S_BAD_MSG);
    // Control: no writable part, an oversized request.
    drv.ctrl.addChain([{ gpa: drv.put(P.encodePcmHdr(P.R_PCM_STOP, 0)), len: 8 }]);
    expect((await drv.ctrl.waitUsed(1))[0]!.len).toBe(0);
    expect(await drv.status(new Uint8Array(200_000))).toBe(P.S_BAD_MSG);
    // A reply buffer too small for the query.
    expect(await drv.status(P.encodeQueryInfo(P.R_PCM_INFO, 0, 2, P.PCM_INFO_BYTES))).toBe(P.S_BAD_MSG);
    // Still serving: a real period plays.
    const { done } = await play(drv, new Uint8Array(2 * PERIOD));
    expect(done.every((d) => d.status === P.S_OK)).toBe(true);
  });
});
