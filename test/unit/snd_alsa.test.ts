// The snd device's ALSA backend for real: `backend device snd --backend alsa` runs as a child
// process (libasound reads ALSA_CONFIG_PATH from the C environment, which Bun's process.env does
// not reach), driven over its socket by the in-process front-end. No sound hardware is needed:
//  - ALSA's `file` PCM plugin over the `null` PCM: what the guest plays must land in the plugin's
//    file byte for byte, and what the plugin's `infile` holds must arrive in the rx buffers;
//  - a PulseAudio daemon started by the test with a null sink: a 1 kHz tone played through ALSA's
//    `pulse` PCM is recorded from the sink's monitor (parec) and its level, frequency and
//    continuity checked; a 440 Hz tone played into the sink (pacat) is captured through the
//    backend from the monitor.
// The null sink renders in blocks of up to 2 s while idle, so a stream that joins it may wait
// that long before its first period is taken: pacing is checked from the 20th completion on.
import { describe, test, expect, afterEach, afterAll } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { GuestRam, Vmm } from "../support/frontend.ts";
import { SndDriver, SndSubprocess } from "../support/snd_driver.ts";
import * as P from "../../devices/snd/protocol.ts";

const MiB = 1 << 20;
const FRAME = 4; // S16_LE stereo
const PERIOD = 480 * FRAME; // 10 ms at 48 kHz

const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "snd-alsa-"));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** The backend as a child process with `env`, and a driver connected to it with its rings running. */
async function alsaSession(dir: string, args: string[], env: Record<string, string>): Promise<{ drv: SndDriver; backend: SndSubprocess }> {
  const backend = new SndSubprocess(join(dir, "sock"), ["--backend", "alsa", "--log-level", "warn", ...args], env);
  cleanups.push(async () => {
    const r = await backend.stop();
    // The memfd this front-end shares cannot be sealed: the backend warns about it every time.
    const said = r.stderr.split("\n").filter((l) => l.trim() !== "" && !l.includes("cannot be sealed"));
    if (said.length > 0) console.log(`backend stderr:\n${said.join("\n")}`);
  });
  await backend.ready();
  const ram = new GuestRam(64 * MiB);
  cleanups.push(() => ram.dispose());
  const vmm = new Vmm(backend, ram);
  cleanups.push(() => vmm.dispose());
  const drv = new SndDriver(vmm, ram);
  drv.activate();
  return { drv, backend };
}

function randomPcm(bytes: number): Uint8Array {
  const b = new Uint8Array(bytes);
  for (let o = 0; o < bytes; o += 65536) crypto.getRandomValues(b.subarray(o, Math.min(bytes, o + 65536)));
  return b;
}

describe("snd alsa backend: ALSA's file plugin over the null PCM", () => {
  test("playback: the plugin's file holds exactly the PCM sent (2 s, S16_LE 48 kHz stereo), then S32 mono 44.1 kHz", async () => {
    const dir = tempDir();
    const out = join(dir, "out.raw");
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, [
      "pcm.null { type null }",
      `pcm.tofile { type file; slave.pcm "null"; file "${out}"; format "raw" }`,
      "pcm.default { type null }",
    ].join("\n"));
    const { drv, backend } = await alsaSession(dir, ["--streams", "out=1,in=0", "--alsa-playback", "tofile"], { ALSA_CONFIG_PATH: conf });
    const pcm = randomPcm(200 * PERIOD);
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const done = await drv.play(0, pcm, PERIOD);
    expect(done).toHaveLength(200);
    expect(done.every((d) => d.status === P.S_OK && d.len === P.PCM_STATUS_BYTES)).toBe(true);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    // The plugin writes its file in its own chunks; by RELEASE (drop, close) all of it is there.
    // Over `null` nothing is padded or lost: the file is the PCM, no more, no less.
    const played = readFileSync(out);
    expect(played.length).toBe(pcm.length);
    expect(Buffer.compare(played, Buffer.from(pcm))).toBe(0);

    // Other parameters reach ALSA as asked (`file` over `null` takes any format, so no plug layer
    // converts): 32-bit mono at 44.1 kHz, periods of 441 frames. PREPARE reopens the host PCM,
    // and the plugin starts its file afresh.
    const p2 = randomPcm(50 * 441 * 4);
    expect(await drv.setParams(0, { format: P.FMT_S32, channels: 1, rate: P.RATE_44100, periodBytes: 441 * 4, bufferBytes: 4 * 441 * 4 })).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    await drv.play(0, p2, 441 * 4);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    expect(Buffer.compare(readFileSync(out), Buffer.from(p2))).toBe(0);
    expect(backend.proc.exitCode).toBeNull();
  }, 20_000);

  test("capture: rx buffers get the plugin's infile byte for byte", async () => {
    const dir = tempDir();
    const inFile = join(dir, "in.raw");
    const input = randomPcm(100 * PERIOD);
    writeFileSync(inFile, input);
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, [
      "pcm.null { type null }",
      `pcm.fromfile { type file; slave.pcm "null"; file "/dev/null"; infile "${inFile}"; format "raw" }`,
      "pcm.default { type null }",
    ].join("\n"));
    const { drv } = await alsaSession(dir, ["--streams", "out=0,in=1", "--alsa-capture", "fromfile"], { ALSA_CONFIG_PATH: conf });
    expect(await drv.setParams(0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const got = await drv.record(0, 100, PERIOD);
    expect(got.every((d) => d.status === P.S_OK && d.len === PERIOD + P.PCM_STATUS_BYTES)).toBe(true);
    const captured = Buffer.concat(got.map((d) => d.data));
    expect(captured.length).toBe(input.length);
    expect(Buffer.compare(captured, Buffer.from(input))).toBe(0);
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
  }, 20_000);

  test("an unknown host PCM: the backend refuses to start and says which", async () => {
    const dir = tempDir();
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, "pcm.null { type null }\n");
    const b = new SndSubprocess(join(dir, "sock"), ["--backend", "alsa", "--streams", "out=1,in=0", "--alsa-playback", "no_such_pcm"], { ALSA_CONFIG_PATH: conf });
    const code = await Promise.race([b.proc.exited, Bun.sleep(10_000).then(() => "timeout")]);
    const r = await b.stop();
    expect(code).not.toBe(0);
    expect(code).not.toBe("timeout");
    expect(r.stderr).toMatch(/no_such_pcm/);
    expect(existsSync(join(dir, "sock"))).toBe(false);
  }, 20_000);
});

// ---- PulseAudio ----

interface Pulse {
  dir: string;
  server: string;
  proc: Subprocess<"ignore", "pipe", "pipe">;
  env: Record<string, string>;
}

/** pulseaudio with a null sink `t` on a private socket, or why not. */
async function startPulse(): Promise<Pulse | string> {
  if (!Bun.which("pulseaudio") || !Bun.which("parec") || !Bun.which("pactl")) return "pulseaudio, parec or pactl is not installed";
  if (!existsSync("/usr/lib/x86_64-linux-gnu/alsa-lib/libasound_module_pcm_pulse.so") && !Bun.which("dpkg")) return "ALSA's pulse plugin (libasound2-plugins) is missing";
  const dir = mkdtempSync(join(tmpdir(), "snd-pulse-"));
  const server = `unix:${join(dir, "native")}`;
  // A private HOME and runtime dir: no user session, no cookie, no autospawn; root runs it fine
  // without --system (it only warns).
  const env: Record<string, string> = { ...(process.env as Record<string, string>), HOME: dir, XDG_RUNTIME_DIR: dir, PULSE_RUNTIME_PATH: join(dir, "pulse"), PULSE_SERVER: server };
  delete env.DBUS_SESSION_BUS_ADDRESS;
  const proc = Bun.spawn(
    [
      "pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--use-pid-file=no", "--disable-shm=yes", "--log-target=stderr",
      "--load=module-null-sink sink_name=t rate=48000 channels=2 format=s16le",
      `--load=module-native-protocol-unix socket=${join(dir, "native")} auth-anonymous=1`,
    ],
    { env, stdin: "ignore", stdout: "pipe", stderr: "pipe" },
  );
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) break;
    if (existsSync(join(dir, "native")) && Bun.spawnSync(["pactl", "info"], { env, timeout: 3000 }).exitCode === 0) return { dir, server, proc, env };
    await Bun.sleep(50);
  }
  proc.kill("SIGKILL");
  await proc.exited;
  const err = await new Response(proc.stderr).text();
  rmSync(dir, { recursive: true, force: true });
  return `pulseaudio did not start: ${err.trim().split("\n").slice(-3).join(" / ")}`;
}

const pulse = await startPulse();
if (typeof pulse === "string") console.warn(`snd alsa: PulseAudio tests skipped: ${pulse}`);
afterAll(async () => {
  if (typeof pulse === "string") return;
  pulse.proc.kill("SIGTERM");
  const t = setTimeout(() => pulse.proc.kill("SIGKILL"), 3000);
  await pulse.proc.exited;
  clearTimeout(t);
  rmSync(pulse.dir, { recursive: true, force: true });
});

/** Interleaved S16 stereo → the left channel as numbers. */
function leftChannel(b: Uint8Array): Float64Array {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = Math.floor(b.length / 4);
  const x = new Float64Array(n);
  for (let i = 0; i < n; i++) x[i] = dv.getInt16(i * 4, true);
  return x;
}

function rms(x: Float64Array): number {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s / x.length);
}

/** Frequency from the rising zero crossings (interpolated between samples). */
function zeroCrossingHz(x: Float64Array, rate: number): number {
  const at: number[] = [];
  for (let i = 1; i < x.length; i++) if (x[i - 1]! < 0 && x[i]! >= 0) at.push(i - 1 + -x[i - 1]! / (x[i]! - x[i - 1]!));
  if (at.length < 2) return 0;
  return ((at.length - 1) * rate) / (at.at(-1)! - at[0]!);
}

/** The share of the signal's power at `hz` (Goertzel over the whole window). */
function powerShareAt(x: Float64Array, hz: number, rate: number): number {
  const w = (2 * Math.PI * hz) / rate;
  let re = 0;
  let im = 0;
  for (let i = 0; i < x.length; i++) {
    re += x[i]! * Math.cos(w * i);
    im -= x[i]! * Math.sin(w * i);
  }
  const tonePower = (2 * (re * re + im * im)) / (x.length * x.length);
  return tonePower / (rms(x) ** 2);
}

function db(r: number): number {
  return 20 * Math.log10(r);
}

/** A sine on both channels of S16 stereo. */
function tone(frames: number, hz: number, amp: number): Uint8Array {
  const pcm = new Uint8Array(frames * FRAME);
  const dv = new DataView(pcm.buffer);
  for (let i = 0; i < frames; i++) {
    const v = Math.round(amp * Math.sin((2 * Math.PI * hz * i) / 48000));
    dv.setInt16(i * 4, v, true);
    dv.setInt16(i * 4 + 2, v, true);
  }
  return pcm;
}

/** Spawns a pulse client tool, killed at the end of the test. */
function pulseTool(pa: Pulse, argv: string[]): Subprocess<"ignore" | "pipe", "pipe", "pipe"> {
  const p = Bun.spawn(argv, { env: pa.env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  cleanups.push(async () => {
    p.kill("SIGKILL");
    await p.exited;
  });
  return p;
}

/** Waits until the daemon lists a stream of `kind` (sink-inputs, source-outputs). */
async function waitStream(pa: Pulse, kind: string): Promise<void> {
  const until = Date.now() + 5000;
  while (Bun.spawnSync(["pactl", "list", "short", kind], { env: pa.env }).stdout.toString().trim() === "") {
    if (Date.now() > until) throw new Error(`no ${kind} after 5 s`);
    await Bun.sleep(20);
  }
}

// 20 ms periods, 5 of them in the buffer (100 ms): room for a loaded host's scheduling.
const PA_PERIOD = 960 * FRAME;
const PA_PARAMS = { periodBytes: PA_PERIOD, bufferBytes: 5 * PA_PERIOD };

describe("snd alsa backend: through PulseAudio (null sink)", () => {
  test.skipIf(typeof pulse === "string")("a 1 kHz tone played through ALSA's pulse PCM reaches the sink's monitor: level, frequency, no gaps", async () => {
    const pa = pulse as Pulse;
    const dir = tempDir();
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, `pcm.tosink { type pulse; server "${pa.server}"; device "t" }\n`);
    // Record the monitor first, and wait until its data flows (the idle null sink may take up to
    // 2 s to deliver the first block), so the recording holds the whole tone.
    const rec = pulseTool(pa, ["parec", "-d", "t.monitor", "--raw", "--format=s16le", "--rate=48000", "--channels=2", "--latency-msec=20"]);
    const chunks: Uint8Array[] = [];
    let recordedBytes = 0;
    const reading = (async () => {
      for await (const c of rec.stdout) {
        chunks.push(c);
        recordedBytes += c.length;
      }
    })();
    const until = Date.now() + 5000;
    while (recordedBytes < 4800 * FRAME) {
      if (Date.now() > until) throw new Error(`parec recorded ${recordedBytes} bytes in 5 s`);
      await Bun.sleep(10);
    }

    const { drv } = await alsaSession(dir, ["--streams", "out=1,in=0", "--alsa-playback", "tosink"], { ALSA_CONFIG_PATH: conf, HOME: pa.dir, XDG_RUNTIME_DIR: pa.dir });
    // 1.5 s of 1000 Hz at half scale (amplitude 16384: RMS -9.03 dBFS) on the left; on the right
    // each period carries its number (a constant 100 * i + 50), to tell which were heard.
    const AMP = 16384;
    const PERIODS = 75;
    const pcm = tone(PERIODS * 960, 1000, AMP);
    const pv = new DataView(pcm.buffer);
    for (let i = 0; i < pcm.length / 4; i++) pv.setInt16(i * 4 + 2, Math.floor(i / 960) * 100 + 50, true);
    expect(await drv.setParams(0, PA_PARAMS)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const done = await drv.play(0, pcm, PA_PERIOD, { inFlight: 5, timeoutMs: 5000 });
    expect(done.every((d) => d.status === P.S_OK && d.len === P.PCM_STATUS_BYTES)).toBe(true);
    // Pulse takes frames at its clock's pace: from the 20th completion on, one period per 20 ms.
    const steady = done.at(-1)!.at - done[19]!.at;
    console.log(`snd alsa→pulse: 20th→75th period completed in ${steady.toFixed(0)} ms (expected ${(PERIODS - 20) * 20})`);
    expect(steady).toBeGreaterThan((PERIODS - 20) * 20 * 0.8);
    expect(steady).toBeLessThan((PERIODS - 20) * 20 * 1.25);
    // STOP and RELEASE right away, as the guest does once its drain saw the last completion: a
    // tx buffer completes only once played, so nothing is cut off.
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    await Bun.sleep(150); // the monitor delivers what the sink rendered last
    rec.kill("SIGTERM");
    await rec.exited;
    await reading;
    const all = Buffer.concat(chunks);
    const x = leftChannel(all);
    // Every period heard once, in order, whole: the sequence of markers on the right channel.
    const runs: [number, number][] = [];
    for (let i = 0; i + 4 <= all.length; i += 4) {
      const m = all.readInt16LE(i + 2);
      if (m === 0) continue;
      if (runs.length > 0 && runs.at(-1)![0] === m) runs.at(-1)![1]++;
      else runs.push([m, 1]);
    }
    expect(runs.map((r) => (r[0] - 50) / 100)).toEqual(Array.from({ length: PERIODS }, (_, i) => i));
    // PulseAudio cuts the start of a stream that joins a running null sink (aplay's too: by a
    // few hundred frames); the other 74 periods are whole, the last one included.
    expect(runs[0]![1]).toBeGreaterThan(0);
    expect(runs.slice(1).every((r) => r[1] === 960), JSON.stringify(runs.filter((r) => r[1] !== 960))).toBe(true);

    // The tone: from the first to the last sample above a quarter of the amplitude.
    let first = -1;
    let last = -1;
    for (let i = 0; i < x.length; i++) {
      if (Math.abs(x[i]!) > AMP / 4) {
        if (first < 0) first = i;
        last = i;
      }
    }
    expect(first, `nothing above ${AMP / 4} in ${x.length} recorded frames`).toBeGreaterThanOrEqual(0);
    const heard = (last - first + 1) / 48000;
    console.log(`snd alsa→pulse: tone heard for ${(heard * 1000).toFixed(0)} ms of 1500`);
    // Analyse the middle (50 ms in from each end).
    const mid = x.subarray(first + 2400, last - 2400);
    const level = rms(mid);
    const expected = AMP / Math.SQRT2;
    const hz = zeroCrossingHz(mid, 48000);
    const share = powerShareAt(mid, 1000, 48000);
    console.log(`snd alsa→pulse: RMS ${level.toFixed(0)} (${db(level / 32768).toFixed(2)} dBFS, expected ${db(expected / 32768).toFixed(2)}), ${hz.toFixed(2)} Hz, ${(share * 100).toFixed(2)}% of the power at 1 kHz`);
    // No gaps: every 10 ms block is at the tone's level (an underrun leaves silence; the tone
    // would then also be heard for longer than it lasts).
    for (let o = 0; o + 480 <= mid.length; o += 480) {
      const b = rms(mid.subarray(o, o + 480));
      if (Math.abs(db(b / expected)) > 1) throw new Error(`block at ${((first + 2400 + o) / 48).toFixed(0)} ms of the recording: RMS ${b.toFixed(0)}, expected ${expected.toFixed(0)} (a gap: underrun?)`);
    }
    expect(heard).toBeGreaterThan(1.5 - 0.02);
    expect(heard).toBeLessThan(1.5 + 0.002);
    expect(Math.abs(db(level / expected))).toBeLessThan(0.5);
    expect(Math.abs(hz - 1000)).toBeLessThan(20);
    expect(share).toBeGreaterThan(0.99);
  }, 20_000);

  test.skipIf(typeof pulse === "string")("capture through ALSA's pulse PCM from the sink's monitor: rx buffers carry a 440 Hz tone played into the sink", async () => {
    const pa = pulse as Pulse;
    const dir = tempDir();
    const AMP = 8192; // RMS -15.05 dBFS
    const tonePath = join(dir, "tone.raw");
    writeFileSync(tonePath, tone(48000 * 5, 440, AMP));
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, `pcm.frommonitor { type pulse; server "${pa.server}"; device "t.monitor" }\n`);
    pulseTool(pa, ["pacat", "-d", "t", "--raw", "--format=s16le", "--rate=48000", "--channels=2", "--latency-msec=40", tonePath]);
    await waitStream(pa, "sink-inputs");
    const { drv } = await alsaSession(dir, ["--streams", "out=0,in=1", "--alsa-capture", "frommonitor"], { ALSA_CONFIG_PATH: conf, HOME: pa.dir, XDG_RUNTIME_DIR: pa.dir });
    expect(await drv.setParams(0, PA_PARAMS)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    const PERIODS = 60;
    const got = await drv.record(0, PERIODS, PA_PERIOD, { inFlight: 5, timeoutMs: 5000 });
    expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
    expect(got.every((d) => d.status === P.S_OK && d.len === PA_PERIOD + P.PCM_STATUS_BYTES)).toBe(true);
    // Captured at the sink's pace: from the 20th completion on, one period per 20 ms.
    const steady = got.at(-1)!.at - got[19]!.at;
    console.log(`snd pulse→alsa: 20th→${PERIODS}th period captured in ${steady.toFixed(0)} ms (expected ${(PERIODS - 20) * 20})`);
    expect(steady).toBeGreaterThan((PERIODS - 20) * 20 * 0.8);
    expect(steady).toBeLessThan((PERIODS - 20) * 20 * 1.25);
    // The last 30 periods (0.6 s): the tone, at its level.
    const x = leftChannel(Buffer.concat(got.slice(-30).map((d) => d.data)));
    const hz = zeroCrossingHz(x, 48000);
    const level = rms(x);
    const expected = AMP / Math.SQRT2;
    const share = powerShareAt(x, 440, 48000);
    console.log(`snd pulse→alsa: RMS ${level.toFixed(0)} (${db(level / 32768).toFixed(2)} dBFS, expected ${db(expected / 32768).toFixed(2)}), ${hz.toFixed(2)} Hz, ${(share * 100).toFixed(2)}% of the power at 440 Hz`);
    expect(Math.abs(db(level / expected))).toBeLessThan(0.5);
    expect(Math.abs(hz - 440)).toBeLessThan(440 * 0.02);
    expect(share).toBeGreaterThan(0.99);
  }, 20_000);
});
