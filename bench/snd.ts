#!/usr/bin/env bun
/**
 * Sound bench: one TCG guest plays one WAV with `aplay -D hw:0,0`, once through our vhost-user snd
 * backend (`backend device snd --backend file`, QEMU's vhost-user-snd-pci) and once through QEMU's
 * built-in virtio-sound-pci with a wav audiodev, in the same run.
 *
 *   bun run bench:snd [--seconds 60] [--only ours|qemu] [--order ours,qemu] [--jitter strace|perf|none] [--serial]
 *
 * Measured per side: aplay's underruns ("underrun!!!" on its stderr) and what the guest's
 * /proc/asound status shows, aplay's wall time in the guest against the WAV's duration, whether the
 * output WAV is the input PCM byte for byte (plus how many trailing bytes, and whether they are
 * silence), and for ours the host-side jitter of the tx completions (from `strace -ttt` (or perf) on the
 * backend's writes to the tx queue's call eventfd) and the backend's CPU (utime+stime from
 * /proc/PID/stat) over the playback. See bench/README.md.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { Subprocess } from "bun";
import { createHash } from "node:crypto";
import { bootGuest, ensureRig } from "../test/e2e/rig.ts";
import { CLK_TCK, cpuTicks, findPidByCmdline, hostBusyTicks, tail } from "./lib/backends.ts";
import { fmt, table } from "./lib/stats.ts";
import { readWavInfo, wavHeader } from "../devices/snd/wav.ts";
import * as P from "../devices/snd/protocol.ts";

const ROOT = resolve(import.meta.dir, "..");
const RATE = 48_000;
const CHANNELS = 2;
const FRAME = 4; // S16_LE stereo
const BPS = RATE * FRAME;

const USAGE = `usage: bun run bench:snd [options]
  --seconds N       length of the WAV (48 kHz stereo S16_LE, seeded random PCM); default 60
  --only SIDE       ours or qemu (default: both)
  --order LIST      ours,qemu (default) or qemu,ours
  --smp N           guest vCPUs (default 1, as in the snd e2e test)
  --aplay-arg ARG   extra aplay argument (repeatable), e.g. --aplay-arg=--period-time=10000 --aplay-arg=--buffer-time=40000
  --jitter M        how ours' tx completion times are taken: strace (default: ours launched under strace -f
                    --seccomp-bpf -ttt -y -e trace=write; timestamps include strace's wakeup latency), perf (perf record
                    -e syscalls:sys_enter_write -p PID: kernel timestamps, but perf itself burnt ~55% of a core during
                    playback here, which disturbs a 2-CPU host) or none
  --ours-bin PATH   run this backend executable instead of dist/backend
  --serial          echo the guest's serial console to stderr
  --out PATH        JSON result file (default bench/results/snd-<date>.json)`;

type Side = "ours" | "qemu";
type JitterMode = "perf" | "strace" | "none";

interface Window {
  t: number;
  wall: number;
  backend: number;
  qemu: number;
  strace: number;
  host: number;
  self: number;
}

interface Result {
  side: Side;
  /** aplay's "underrun!!!" lines. */
  underruns: number;
  aplayRc: number;
  aplayStderr: string[];
  /** /proc/asound/card0/pcm0p/sub0/status samples taken every ~2 s during playback. */
  statusSamples: number;
  statusNotRunning: number;
  /** Largest avail_max seen (frames the device had consumed that aplay had not refilled yet). */
  availMaxFrames: number | null;
  hwParams: Record<string, string>;
  xrunDebug: string | null;
  guestWallS: number;
  hostWallS: number;
  /** Output WAV vs input PCM. */
  outBytes: number;
  exactPrefix: boolean;
  firstMismatch: number | null;
  trailingBytes: number;
  trailingSilent: boolean;
  outFormat: string;
  /** Ours only: tx completion gaps minus the period, µs. */
  jitter: null | { gapsUs: number[]; fd: number; completions: number; expected: number; p50: number; p99: number; p99abs: number; maxAbs: number; periodUs: number; method: string };
  backendCpuPct: number | null;
  straceCpuPct: number | null;
  qemuCpuPct: number;
  foreignCores: number;
  loadavgBefore: string;
  loadavgAfter: string;
  dmesg: string[];
}

function loadavg(): string {
  return readFileSync("/proc/loadavg", "utf8").trim().split(" ").slice(0, 3).join(" ");
}

/** Seeded xorshift32 PCM: reproducible, and any lost, doubled or reordered frame shows. */
function makePcm(bytes: number, seed = 0x5eed1234): Uint8Array {
  const words = new Uint32Array(Math.ceil(bytes / 4));
  let x = seed >>> 0;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  return new Uint8Array(words.buffer, 0, bytes);
}

function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

function guestScript(aplayArgs: string[], wavBytes: number): string {
  const st = "/proc/asound/card0/pcm0p/sub0";
  // The WAV comes on a read-only virtio-blk disk (QEMU's own; fw_cfg's sysfs reads are byte-wise port
  // I/O, far too slow under TCG for a minute of audio) and is copied to RAM before playing.
  return `
set -e
head -c ${wavBytes} /dev/vda >/tmp/play.wav
echo "SND-MD5 $(md5sum </tmp/play.wav | cut -d' ' -f1)"
cat /proc/asound/cards
set +e
(   while [ ! -e /tmp/done ]; do
    grep -q period_size /tmp/hw.txt 2>/dev/null || cat ${st}/hw_params >/tmp/hw.txt 2>/dev/null
    cat ${st}/status >>/tmp/st.txt 2>/dev/null
    sleep 2
  done ) &
mon=$!
echo SND-START
t0=$(cut -d' ' -f1 /proc/uptime)
aplay -D hw:0,0 ${aplayArgs.join(" ")} /tmp/play.wav 2>/tmp/aplay.err
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo SND-END
touch /tmp/done
# QEMU's wav audiodev writes on its audio timer: give it time before poweroff -f cuts it short.
sleep 1
wait $mon
echo "SND-APLAY $t0 $t1 $rc"
sed 's/^/SND-ERR /' /tmp/aplay.err
sed 's/^/SND-HW /' /tmp/hw.txt 2>/dev/null
grep -E '^(state|avail_max)' /tmp/st.txt 2>/dev/null | sed 's/^/SND-ST /'
if [ -e /proc/asound/card0/pcm0p/xrun_debug ]; then echo "SND-XRUNDBG $(cat /proc/asound/card0/pcm0p/xrun_debug)"; fi
dmesg | grep -iE 'snd|sound|xrun' | sed 's/^/SND-DMESG /'
echo SND-DONE
`;
}

async function waitFor(path: string, alive: () => void, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!existsSync(path)) {
    alive();
    if (Date.now() > deadline) throw new Error(`${path} did not appear within ${ms} ms`);
    await Bun.sleep(20);
  }
}

function childPid(pid: number): number | null {
  try {
    const c = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/)[0];
    return c ? Number(c) : null;
  } catch {
    return null;
  }
}

function ticksOr0(pid: number | null): number {
  if (pid === null) return 0;
  try {
    return cpuTicks(pid);
  } catch {
    return 0;
  }
}

/** Writes of 8 bytes to eventfds, per fd, with strace's -ttt timestamps (s). */
function parseStrace(path: string): Map<number, number[]> {
  const byFd = new Map<number, number[]>();
  if (!existsSync(path)) return byFd;
  const re = /^(?:\d+\s+)?(\d+\.\d+) write\((\d+)<anon_inode:\[?eventfd\]?>, .*, 8\) = 8$/;
  for (const line of readFileSync(path, "utf8").split("\n")) {
    const m = re.exec(line);
    if (!m) continue;
    const fd = Number(m[2]);
    let a = byFd.get(fd);
    if (!a) byFd.set(fd, (a = []));
    a.push(Number(m[1]));
  }
  return byFd;
}

/** perf script of sys_enter_write events with count 8: per fd, timestamps (s, kernel clock). */
function parsePerf(path: string): Map<number, number[]> {
  const byFd = new Map<number, number[]>();
  if (!existsSync(path)) return byFd;
  const r = Bun.spawnSync(["perf", "script", "-i", path], { stdout: "pipe", stderr: "pipe" });
  const re = /\s(\d+\.\d+): syscalls:sys_enter_write: fd: 0x([0-9a-f]+), buf: 0x[0-9a-f]+, count: 0x0*8$/;
  for (const line of r.stdout.toString().split("\n")) {
    const m = re.exec(line);
    if (!m) continue;
    const fd = parseInt(m[2]!, 16);
    let a = byFd.get(fd);
    if (!a) byFd.set(fd, (a = []));
    a.push(Number(m[1]));
  }
  return byFd;
}

async function runSide(side: Side, o: { tmp: string; wav: string; wavBytes: number; wavMd5: string; pcm: Uint8Array; seconds: number; oursBin: string; jitterMode: JitterMode; smp: number; aplayArgs: string[] }): Promise<Result> {
  const dir = join(o.tmp, side);
  mkdirSync(dir, { recursive: true });
  const sock = join(dir, "snd.sock");
  const outTemplate = join(dir, "out-{stream}.wav");
  const outPath = side === "ours" ? join(dir, "out-0.wav") : join(dir, "qemu-out.wav");
  const traceFile = join(dir, "strace.txt");
  let proc: Subprocess<"ignore", "pipe", "pipe"> | null = null;
  let backendOut = "";
  let backendPid: number | null = null;
  /** The tracer (strace or perf): its CPU is reported apart. */
  let stracePid: number | null = null;
  let perf: Subprocess<"ignore", "ignore", "pipe"> | null = null;
  const perfFile = join(dir, "perf.data");
  let devices: string[];
  if (side === "ours") {
    const argv = [o.oursBin, "device", "snd", "--socket", sock, "--log-level", "warn", "--backend", "file", "--playback-file", outTemplate];
    // --seccomp-bpf: only write() stops the tracee (strace -p would stop it at every syscall).
    const strace = o.jitterMode === "strace";
    const full = strace ? ["strace", "-f", "--seccomp-bpf", "-ttt", "-y", "-e", "trace=write", "-e", "signal=none", "-o", traceFile, ...argv] : argv;
    proc = Bun.spawn(full, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    const p = proc;
    void (async () => {
      for await (const b of p.stderr) backendOut += new TextDecoder().decode(b);
    })();
    await waitFor(sock, () => {
      if (p.exitCode !== null) throw new Error(`ours died: ${backendOut}`);
    });
    if (strace) {
      stracePid = proc.pid;
      backendPid = childPid(proc.pid);
      if (backendPid === null) throw new Error("cannot find the backend under strace");
    } else backendPid = proc.pid;
    if (o.jitterMode === "perf") {
      // Kernel timestamps at write()'s entry, in the backend's own context: no tracer in its way.
      perf = Bun.spawn(["perf", "record", "-q", "-e", "syscalls:sys_enter_write", "-p", String(backendPid), "-o", perfFile], { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
      await Bun.sleep(500);
      if (perf.exitCode !== null) throw new Error(`perf record failed: ${await new Response(perf.stderr).text()}`);
      stracePid = perf.pid;
    }
    devices = ["-chardev", `socket,id=s0,path=${sock}`, "-device", "vhost-user-snd-pci,chardev=s0"];
  } else {
    devices = [
      "-audiodev", `wav,id=a,path=${outPath},out.frequency=${RATE},out.channels=${CHANNELS},out.format=s16`,
      "-device", "virtio-sound-pci,audiodev=a",
    ];
  }

  const marker = join(dir, "marker"); // unique string in QEMU's command line
  writeFileSync(marker, "");
  let qemuPid: number | null = null;
  const snap = (): Window => {
    qemuPid ??= findPidByCmdline(marker);
    const u = process.cpuUsage();
    return { t: performance.now(), wall: Date.now() / 1000, backend: ticksOr0(backendPid), qemu: ticksOr0(qemuPid), strace: ticksOr0(stracePid), host: hostBusyTicks(), self: (u.user + u.system) / 1e6 };
  };
  let a: Window | null = null;
  let b: Window | null = null;
  let buf = "";
  const loadBefore = loadavg();
  let loadAfter = "";
  let r;
  try {
    r = await bootGuest({
      command: guestScript(o.aplayArgs, o.wavBytes),
      devices,
      memoryMiB: 512,
      timeoutMs: 180_000 + o.seconds * 3000,
      extraArgs: [
        "-smp", String(o.smp),
        "-drive", `file=${o.wav},if=none,id=wav,format=raw,readonly=on`, "-device", "virtio-blk-pci,drive=wav",
        "-fw_cfg", `name=opt/marker,file=${marker}`,
      ],
      onSerial: (chunk) => {
        if (process.env.BENCH_SERIAL === "1") process.stderr.write(chunk);
        buf += chunk;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i).trim();
          buf = buf.slice(i + 1);
          if (line === "SND-START") a = snap();
          else if (line === "SND-END") {
            b = snap();
            loadAfter = loadavg();
          }
        }
      },
    });
  } finally {
    if (perf) {
      perf.kill("SIGINT");
      await perf.exited;
    }
    if (proc) {
      const target = backendPid ?? proc.pid;
      try {
        process.kill(target, "SIGTERM");
      } catch {
        // gone
      }
      const t = setTimeout(() => proc!.kill("SIGKILL"), 5000);
      await proc.exited;
      clearTimeout(t);
    }
  }
  const serial = r.serial;
  if (!serial.includes("SND-DONE") || !a || !b) {
    throw new Error(`guest (${side}) failed: exit ${r.exitStatus}\nserial:\n${tail(serial, 40)}\nqemu stderr:\n${tail(r.stderr, 10)}\nbackend:\n${tail(backendOut, 15)}`);
  }
  const md5 = /^SND-MD5 ([0-9a-f]+)$/m.exec(serial)?.[1];
  if (md5 !== o.wavMd5) throw new Error(`guest (${side}): the WAV arrived as md5 ${md5}, expected ${o.wavMd5}`);
  const wa: Window = a;
  const wb: Window = b;
  const lines = (tag: string) => [...serial.matchAll(new RegExp(`^${tag} (.*)$`, "gm"))].map((m) => m[1]!.trim());
  const ap = /^SND-APLAY ([\d.]+) ([\d.]+) (\d+)$/m.exec(serial)!;
  const errs = lines("SND-ERR");
  const hw: Record<string, string> = {};
  for (const l of lines("SND-HW")) {
    const m = /^(\w+): (.*)$/.exec(l);
    if (m) hw[m[1]!] = m[2]!;
  }
  const st = lines("SND-ST");
  const states = st.filter((l) => l.startsWith("state:")).map((l) => l.slice(6).trim());
  const availMax = st.filter((l) => l.startsWith("avail_max")).map((l) => Number(l.split(":")[1]));

  // Output WAV.
  const info = readWavInfo(outPath);
  const data = readFileSync(outPath).subarray(info.dataOffset, info.dataOffset + info.dataBytes);
  const n = Math.min(data.length, o.pcm.length);
  let firstMismatch: number | null = null;
  if (Buffer.compare(Buffer.from(data.buffer, data.byteOffset, n), Buffer.from(o.pcm.buffer, o.pcm.byteOffset, n)) !== 0) {
    for (let i = 0; i < n; i++) if (data[i] !== o.pcm[i]) { firstMismatch = i; break; }
  }
  const trailing = data.subarray(o.pcm.length);

  // Jitter of ours' tx completions: the eventfd written most often in the playback window is the
  // tx queue's call fd (one write per completed period; checked against the expected count).
  const periodFrames = Number(hw.period_size);
  let jitter: Result["jitter"] = null;
  if (side === "ours" && o.jitterMode !== "none") {
    const byFd = o.jitterMode === "strace" ? parseStrace(traceFile) : parsePerf(perfFile);
    let best: { fd: number; ts: number[] } | null = null;
    for (const [fd, ts] of byFd) {
      // strace's clock is the wall clock (window = the playback); perf's is the kernel's local clock,
      // and the tx call fd is written during playback only anyway.
      const inWin = o.jitterMode === "strace" ? ts.filter((t) => t >= wa.wall - 1 && t <= wb.wall + 1) : ts;
      if (!best || inWin.length > best.ts.length) best = { fd, ts: inWin };
    }
    if (best && best.ts.length > 2) {
      const gaps = best.ts.slice(1).map((t, i) => (t - best!.ts[i]!) * 1e6);
      const periodUs = Number.isFinite(periodFrames) && periodFrames > 0 ? (periodFrames * 1e6) / RATE : percentile(gaps, 50);
      const j = gaps.map((g) => g - periodUs);
      const abs = j.map(Math.abs);
      const periodBytes = (periodUs * BPS) / 1e6;
      jitter = {
        gapsUs: gaps.map((g) => Math.round(g)),
        fd: best.fd,
        completions: best.ts.length,
        expected: Math.ceil(o.pcm.length / periodBytes),
        p50: percentile(j, 50),
        p99: percentile(j, 99),
        p99abs: percentile(abs, 99),
        maxAbs: Math.max(...abs),
        periodUs,
        method: o.jitterMode === "strace"
          ? "strace -f --seccomp-bpf -ttt -y -e trace=write (ours launched under strace): 8-byte writes to the tx call eventfd; timestamps include strace's wakeup latency"
          : "perf record -e syscalls:sys_enter_write -p PID (kernel timestamps at syscall entry): 8-byte writes to the most-written fd = the tx call eventfd",
      };
    }
  }

  const wallS = (wb.t - wa.t) / 1000;
  const backendS = (wb.backend - wa.backend) / CLK_TCK;
  const straceS = (wb.strace - wa.strace) / CLK_TCK;
  const qemuS = (wb.qemu - wa.qemu) / CLK_TCK;
  const hostS = (wb.host - wa.host) / CLK_TCK;
  return {
    side,
    underruns: errs.filter((l) => /underrun!!!/.test(l)).length,
    aplayRc: Number(ap[3]),
    aplayStderr: errs,
    statusSamples: states.length,
    statusNotRunning: states.filter((s) => s !== "RUNNING" && s !== "DRAINING").length,
    availMaxFrames: availMax.length ? Math.max(...availMax) : null,
    hwParams: hw,
    xrunDebug: lines("SND-XRUNDBG")[0] ?? null,
    guestWallS: Number(ap[2]) - Number(ap[1]),
    hostWallS: wallS,
    outBytes: data.length,
    exactPrefix: data.length >= o.pcm.length && firstMismatch === null,
    firstMismatch,
    trailingBytes: data.length - o.pcm.length,
    trailingSilent: trailing.every((x) => x === 0),
    outFormat: `${info.format === P.FMT_S16 ? "S16_LE" : `fmt ${info.format}`} ${info.channels} ch ${info.rateHz} Hz${info.sizeWasStale ? " (stale size)" : ""}`,
    jitter,
    backendCpuPct: side === "ours" ? (backendS / wallS) * 100 : null,
    straceCpuPct: side === "ours" && o.jitterMode !== "none" ? (straceS / wallS) * 100 : null,
    qemuCpuPct: (qemuS / wallS) * 100,
    foreignCores: Math.max(0, hostS - backendS - straceS - qemuS - (wb.self - wa.self)) / wallS,
    loadavgBefore: loadBefore,
    loadavgAfter: loadAfter,
    dmesg: lines("SND-DMESG"),
  };
}

async function prepareOurs(bin?: string): Promise<string> {
  if (bin) {
    if (!existsSync(bin)) throw new Error(`--ours-bin ${bin}: no such file`);
    return resolve(bin);
  }
  const out = join(ROOT, "dist/backend");
  let newest = 0;
  const walk = (p: string) => {
    if (!existsSync(p)) return;
    const st = statSync(p);
    if (st.isDirectory()) for (const e of readdirSync(p)) walk(join(p, e));
    else if (/\.(ts|json|c|h)$/.test(p)) newest = Math.max(newest, st.mtimeMs);
  };
  for (const p of ["src", "devices", "ffi", "build.ts", "package.json"]) walk(join(ROOT, p));
  if (!existsSync(out) || statSync(out).mtimeMs < newest) {
    console.log(`dist/backend is ${existsSync(out) ? "older than the sources" : "missing"}: bun run build`);
    const r = Bun.spawnSync([process.execPath, "run", "build"], { cwd: ROOT, stdout: "inherit", stderr: "inherit" });
    if (r.exitCode !== 0) throw new Error("bun run build failed");
  }
  return out;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    args: process.argv.slice(2),
    options: {
      seconds: { type: "string", default: "60" },
      only: { type: "string" },
      order: { type: "string", default: "ours,qemu" },
      smp: { type: "string", default: "1" },
      "aplay-arg": { type: "string", multiple: true, default: [] },
      jitter: { type: "string", default: "strace" },
      "ours-bin": { type: "string" },
      serial: { type: "boolean", default: false },
      out: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  const seconds = Number(a.seconds);
  if (!Number.isInteger(seconds) || seconds <= 0) throw new Error(`--seconds ${a.seconds}: expected a positive integer`);
  const smp = Number(a.smp);
  if (!Number.isInteger(smp) || smp <= 0) throw new Error(`--smp ${a.smp}`);
  let sides = a.order!.split(",").map((s) => s.trim()) as Side[];
  if (sides.length !== 2 || !sides.includes("ours") || !sides.includes("qemu")) throw new Error(`--order ${a.order}: expected ours,qemu or qemu,ours`);
  if (a.only) {
    if (a.only !== "ours" && a.only !== "qemu") throw new Error(`--only ${a.only}`);
    sides = [a.only];
  }
  if (a.serial) process.env.BENCH_SERIAL = "1";
  const jitterMode = a.jitter as JitterMode;
  if (!["perf", "strace", "none"].includes(jitterMode)) throw new Error(`--jitter ${a.jitter}: expected perf, strace or none`);
  if (jitterMode !== "none" && sides.includes("ours") && Bun.spawnSync([jitterMode, jitterMode === "perf" ? "version" : "-V"]).exitCode !== 0) throw new Error(`${jitterMode} not found (or use --jitter none)`);

  await ensureRig();
  const oursBin = sides.includes("ours") ? await prepareOurs(a["ours-bin"]) : "";
  const date = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "");
  const resultsDir = join(ROOT, "bench", "results");
  mkdirSync(resultsDir, { recursive: true });
  const outPath = a.out ? resolve(a.out) : join(resultsDir, `snd-${date}.json`);

  const tmp = mkdtempSync(join(tmpdir(), "bench-snd-"));
  const pcm = makePcm(seconds * BPS);
  const wav = join(tmp, "play.img");
  const wavFile = Buffer.concat([wavHeader({ format: P.FMT_S16, channels: CHANNELS, rateHz: RATE }, pcm.length), pcm]);
  const wavMd5 = createHash("md5").update(wavFile).digest("hex");
  // A disk image: the WAV padded to whole sectors.
  writeFileSync(wav, Buffer.concat([wavFile, Buffer.alloc((512 - (wavFile.length % 512)) % 512)]));

  console.log(`snd bench: ${seconds} s WAV (48 kHz stereo S16_LE, ${pcm.length} bytes, seeded random), aplay -D hw:0,0 ${a["aplay-arg"]!.join(" ")}`.trimEnd());
  console.log(`  ours: ${oursBin.replace(ROOT + "/", "")} device snd --backend file  (QEMU -device vhost-user-snd-pci)${sides.includes("ours") && jitterMode !== "none" ? `, completion times by ${jitterMode}` : ""}`);
  console.log(`  qemu: -audiodev wav,out.frequency=48000,out.channels=2,out.format=s16 -device virtio-sound-pci`);
  console.log(`  guest: TCG -smp ${smp}, 512 MiB, 6.12 virtio_snd; host: ${Bun.spawnSync(["nproc"]).stdout.toString().trim()} CPUs, loadavg ${loadavg()}\n`);

  const results: Result[] = [];
  const started = Date.now();
  try {
    for (const side of sides) {
      const t0 = Date.now();
      const res = await runSide(side, { tmp, wav, wavBytes: wavFile.length, wavMd5, pcm, seconds, oursBin, jitterMode, smp, aplayArgs: a["aplay-arg"]! });
      results.push(res);
      console.log(`  ${side} done in ${((Date.now() - t0) / 1000).toFixed(0)} s (loadavg ${res.loadavgBefore} -> ${res.loadavgAfter})`);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }

  const get = (s: Side) => results.find((r) => r.side === s);
  const cols = sides;
  const row = (name: string, f: (r: Result) => string) => [name, ...cols.map((s) => f(get(s)!))];
  const rows: string[][] = [
    row("aplay underruns (stderr)", (r) => String(r.underruns)),
    row("aplay exit status", (r) => String(r.aplayRc)),
    row("status samples not RUNNING", (r) => `${r.statusNotRunning}/${r.statusSamples}`),
    row("max avail_max (frames)", (r) => (r.availMaxFrames === null ? "-" : `${r.availMaxFrames}/${r.hwParams.buffer_size ?? "?"}`)),
    row("period / buffer (frames)", (r) => `${r.hwParams.period_size ?? "?"} / ${r.hwParams.buffer_size ?? "?"}`),
    row("aplay wall time, guest (s)", (r) => fmt(r.guestWallS, 3)),
    row("  / WAV duration", (r) => fmt(r.guestWallS / seconds, 4)),
    row("host wall START..END (s)", (r) => fmt(r.hostWallS, 3)),
    row("output WAV format", (r) => r.outFormat),
    row("PCM byte-exact", (r) => (r.exactPrefix ? "yes" : r.firstMismatch !== null ? `NO (first diff at ${r.firstMismatch})` : `NO (short by ${-r.trailingBytes})`)),
    row("trailing bytes (silent?)", (r) => `${r.trailingBytes} (${r.trailingBytes <= 0 ? "-" : r.trailingSilent ? "silence" : "NOT silence"})`),
    row("  in periods", (r) => (r.hwParams.period_size ? fmt(r.trailingBytes / (Number(r.hwParams.period_size) * FRAME), 2) : "-")),
    row("tx completions (seen/expected)", (r) => (r.jitter ? `${r.jitter.completions}/${r.jitter.expected}` : "-")),
    row("period time (µs)", (r) => (r.jitter ? fmt(r.jitter.periodUs, 0) : r.hwParams.period_size ? fmt((Number(r.hwParams.period_size) * 1e6) / RATE, 0) : "-")),
    row("jitter p50 (µs)", (r) => (r.jitter ? fmt(r.jitter.p50, 0) : "-")),
    row("jitter p99 (µs)", (r) => (r.jitter ? fmt(r.jitter.p99, 0) : "-")),
    row("jitter p99 |x| / max |x| (µs)", (r) => (r.jitter ? `${fmt(r.jitter.p99abs, 0)} / ${fmt(r.jitter.maxAbs, 0)}` : "-")),
    row("backend CPU (% of a core)", (r) => (r.backendCpuPct === null ? "(in QEMU)" : fmt(r.backendCpuPct, 2))),
    row(`${jitterMode} CPU (% of a core)`, (r) => (r.straceCpuPct === null ? "-" : fmt(r.straceCpuPct, 2))),
    row("QEMU CPU (% of a core)", (r) => fmt(r.qemuCpuPct, 1)),
    row("foreign load (cores)", (r) => fmt(r.foreignCores, 2)),
    row("loadavg before / after", (r) => `${r.loadavgBefore} / ${r.loadavgAfter}`),
  ];
  console.log(`\nelapsed ${fmt((Date.now() - started) / 60000, 1)} min`);
  console.log(table(["", ...cols], rows));

  const ours = get("ours");
  const qemu = get("qemu");
  if (ours) {
    const same = qemu ? ours.outBytes === qemu.outBytes && ours.exactPrefix === qemu.exactPrefix : null;
    const checks: [string, boolean | null][] = [
      ["0 xruns", ours.underruns === 0 && ours.statusNotRunning === 0],
      ["p99 jitter < 1 ms", ours.jitter ? ours.jitter.p99abs < 1000 : null],
      ["< 1% of a core", ours.backendCpuPct! < 1],
      ["output byte-exact (<= 1 trailing period of silence)", ours.exactPrefix && ours.trailingSilent && ours.trailingBytes <= Number(ours.hwParams.period_size) * FRAME],
      ["output identical to QEMU's (same PCM, same length)", same],
    ];
    console.log("\ntargets (ours): " + checks.map(([n, ok]) => `${n}: ${ok === null ? "n/a" : ok ? "yes" : "NO"}`).join("; "));
    if (ours.jitter) console.log(`jitter method: ${ours.jitter.method} (fd ${ours.jitter.fd})`);
  }
  for (const r of results) {
    const other = r.aplayStderr.filter((l) => !/^Playing WAVE/.test(l));
    if (other.length) console.log(`\n${r.side}: aplay stderr:\n  ${other.slice(0, 10).join("\n  ")}`);
    if (r.dmesg.length) console.log(`${r.side}: guest dmesg (snd):\n  ${r.dmesg.slice(0, 10).join("\n  ")}`);
  }
  const foreign = Math.max(...results.map((r) => r.foreignCores));
  if (foreign > 0.3) console.log(`\nWARNING: other processes used ${fmt(foreign, 2)} cores during playback: TCG guest timing (xruns, wall time) is then less reliable`);

  writeFileSync(outPath, JSON.stringify({ date, seconds, smp, aplayArgs: a["aplay-arg"], jitterMode, commit: Bun.spawnSync(["git", "rev-parse", "HEAD"], { cwd: ROOT }).stdout.toString().trim(), results }, null, 2));
  console.log(`\nresults: ${outPath.replace(ROOT + "/", "")}`);
}

await main();
