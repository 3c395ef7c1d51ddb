#!/usr/bin/env bun
/**
 * Net bench: our vhost-user-net backend (`backend device net`, frames between the rings and a tap)
 * side by side with a C vhost-user backend, dpdk-testpmd's net_vhost + net_tap in io forwarding.
 *
 *   bun run bench:net [--rounds 3] [--runtime 5] [--warmup 2] [--sizes 64,1500] [--dirs tx,rx]
 *                     [--perf] [--strace] [--guest] [--guest-only] [--pairs 1,2] [--iperf-time 5]
 *                     [--packet-pairs 1,2] [--fe-devarg mrg_rxbuf=0]
 *
 * Part 1, guest-less packet rate, 1 queue pair (--packet-pairs: also more, each a thread of ours). The front-end is dpdk-testpmd with net_virtio_user
 * (a virtio-net driver in a process, no guest):
 *   tx: front-end txonly → backend → tap. Counted: packets the tap received (its rx_packets, read
 *       from /proc/<backend>/net/dev: the backend runs in the bench's network namespace).
 *   rx: testpmd net_af_packet txonly on the tap (in the namespace) → tap → backend → front-end
 *       rxonly. Counted: packets the front-end received (`show port stats 0`).
 * Every cell (direction, frame size, backend, round) starts fresh processes, warms up, then measures
 * one window; ours and the peer alternate in each round (the first one alternates per round), so
 * paired ratios cancel slow drift in the host's load. Host CPU per packet: the backend's
 * utime+stime (/proc/PID/stat, all threads) over the window / packets counted.
 *
 * Part 2 (--guest): iperf3 TCP through a TCG guest (the e2e rig) to iperf3 in the namespace: ours
 * vs QEMU's built-in `-netdev tap,vhost=off` (QEMU then runs inside the namespace) vs testpmd
 * net_vhost + net_tap. Needs iperf3 in the guest initramfs (test/e2e/setup.sh).
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { Subprocess } from "bun";
import { CLK_TCK, cpuTicks, hostBusyTicks, tail } from "./lib/backends.ts";
import { startTestPmd, type TestPmd } from "./lib/dpdk.ts";
import { jitDumpEnv, writePerfMaps } from "./lib/perf.ts";
import { fmt, fmtInt, max, median, spreadPct, table } from "./lib/stats.ts";
import { NetNamespace, netnsAvailable } from "../test/support/netns.ts";

const ROOT = resolve(import.meta.dir, "..");
const GUEST_MAC = "52:54:00:12:34:56";

const USAGE = `usage: bun run bench:net [options]
  --rounds N        measured rounds per cell (default 3)
  --runtime S       seconds per measured window (default 5)
  --warmup S        seconds of traffic before each window (default 2)
  --sizes LIST      frame sizes in bytes (default 64,1500)
  --dirs LIST       tx (front-end → tap), rx (tap → front-end); default tx,rx
  --skip-packet     skip part 1 (guest-less packet rate)
  --perf            perf record -g ours (all threads) in an extra window of the 64-byte tx cell
  --strace          strace -c -f ours in an extra window of the 64-byte tx cell (syscalls per packet)
  --profile-s S     length of the --perf / --strace windows (default 4)
  --guest           also part 2: iperf3 TCP through a TCG guest (needs iperf3 in the e2e initramfs)
  --pairs LIST      queue pairs for part 2 (default 1)
  --iperf-time S    iperf3 -t per run in part 2 (default 5)
  --guest-rounds N  rounds in part 2 (default 3)
  --ours-arg ARG    extra argument for our backend (repeatable; e.g. --ours-arg=--net-io=syscall for the writev path)
  --packet-pairs L  queue pairs in part 1 (default 1; e.g. 1,2: multiqueue scaling, the rx sender then varies
                    the flow per packet so the tap spreads frames over its queues)
  --fe-devarg ARG   extra net_virtio_user device argument for the front-end (repeatable; e.g. mrg_rxbuf=0:
                    receive without MRG_RXBUF, one chain per frame)
  --fe-arg ARG      extra testpmd application argument for the front-end (repeatable; e.g. --fe-arg=--enable-lro
                    makes it negotiate GUEST_TSO4/6, so the backend must be ready for 64 KiB receive frames)
  --only KIND       part 1 with one backend only: ours or dpdk (no ratios then)
  --ours-bin PATH   run this backend executable instead of dist/backend
  --out PATH        JSON result file (default bench/results/net-<date>.json)`;

type Kind = "ours" | "dpdk";
type Dir = "tx" | "rx";

interface Proc {
  pid: number;
  label: string;
  assertAlive(): void;
  output(): string;
  stop(): Promise<void>;
}

interface PacketSample {
  dir: Dir;
  size: number;
  pairs: number;
  kind: Kind;
  round: number;
  wallS: number;
  /** Packets counted in the window (tap rx for tx, front-end rx for rx). */
  packets: number;
  mpps: number;
  gbps: number;
  backendCpuS: number;
  nsPerPacket: number;
  frontendCpuS: number;
  senderCpuS: number;
  foreignCores: number;
  /** tx: packets the front-end sent; rx: packets the backend took from the tap. */
  offered: number;
  /** rx: packets the tap dropped (its queue was full: the backend did not read fast enough). */
  tapDropped: number;
}

// ---- processes ----

function spawnProc(label: string, argv: string[], env?: Record<string, string>): Proc {
  const proc: Subprocess<"ignore", "pipe", "pipe"> = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: env === undefined ? undefined : { ...process.env, ...env } });
  let out = "";
  const drain = async (s: ReadableStream<Uint8Array>) => {
    const d = new TextDecoder();
    for await (const b of s) out += d.decode(b, { stream: true });
  };
  void drain(proc.stdout);
  void drain(proc.stderr);
  const alive = () => proc.exitCode === null && proc.signalCode === null;
  return {
    pid: proc.pid,
    label,
    output: () => out,
    assertAlive() {
      if (!alive()) throw new Error(`${label} (pid ${proc.pid}) died: exit ${proc.exitCode} signal ${proc.signalCode}\nargv: ${argv.join(" ")}\n${tail(out, 30)}`);
    },
    async stop() {
      if (!alive()) return;
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await proc.exited;
      clearTimeout(t);
    },
  };
}

function tmProc(t: TestPmd): Proc {
  return { pid: t.pid, label: t.label, assertAlive: () => t.assertAlive(), output: () => t.output(), stop: () => t.stop() };
}

async function waitForSocket(path: string, p: Proc, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    p.assertAlive();
    if (Date.now() > deadline) throw new Error(`${p.label} did not create ${path} within ${timeoutMs} ms\n${tail(p.output(), 30)}`);
    await Bun.sleep(20);
  }
}

/** Interface counters as seen inside the namespace of `pid` (/proc/PID/net/dev). */
function ifStats(pid: number, ifname: string): { rxBytes: number; rxPackets: number; rxDrop: number; txBytes: number; txPackets: number; txDrop: number } {
  const text = readFileSync(`/proc/${pid}/net/dev`, "utf8");
  for (const line of text.split("\n")) {
    const m = /^\s*([^:]+):\s*(.*)$/.exec(line);
    if (!m || m[1] !== ifname) continue;
    const f = m[2]!.trim().split(/\s+/).map(Number);
    return { rxBytes: f[0]!, rxPackets: f[1]!, rxDrop: f[3]!, txBytes: f[8]!, txPackets: f[9]!, txDrop: f[11]! };
  }
  throw new Error(`no interface ${ifname} in /proc/${pid}/net/dev`);
}

/** The argv prefix that runs our backend; rebuilds dist/backend when a source file is newer. */
function prepareOurs(bin?: string): string {
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

// ---- part 1: guest-less packet rate ----

interface CellCtx {
  ns: NetNamespace;
  tmp: string;
  oursBin: string;
  warmupS: number;
  runtimeS: number;
  feArgs: string[];
  feDevargs: string[];
  oursArgs: string[];
  /** With --perf: where ours writes its JITDump files (JS frames named in the profile). */
  jitDumpDir?: string;
}

interface Running {
  backend: Proc;
  /** The interface whose counters tell what reached / left the tap (in the backend's namespace). */
  tap: string;
  frontend: TestPmd;
  sender: TestPmd | null;
  all: Proc[];
}

let prefixSeq = 0;
const prefix = (what: string) => `nb${process.pid}${what}${prefixSeq++}`;

async function startCell(c: CellCtx, kind: Kind, dir: Dir, size: number, pairs = 1): Promise<Running> {
  const sock = join(c.tmp, `${kind}.sock`);
  rmSync(sock, { force: true });
  const all: Proc[] = [];
  try {
    let backend: Proc;
    let tap: string;
    if (kind === "ours") {
      tap = "nbo0";
      backend = spawnProc("ours", [
        "ip", "netns", "exec", c.ns.name, c.oursBin, "device", "net",
        "--socket", sock, "--tap-name", tap, "--mac", GUEST_MAC, "--queue-pairs", String(pairs), "--log-level", "warn", ...c.oursArgs,
        // JSC writes its JITDump files as it compiles: a sandboxed backend may not (it aborts).
        ...(c.jitDumpDir === undefined ? [] : ["--sandbox", "none"]),
      ], c.jitDumpDir === undefined ? undefined : jitDumpEnv(c.jitDumpDir));
      all.push(backend);
      await waitForSocket(sock, backend);
    } else {
      tap = "nbp0";
      const t = await startTestPmd({
        label: "dpdk peer (net_vhost+net_tap)",
        netns: c.ns.name,
        prefix: prefix("peer"),
        vdevs: [`net_vhost0,iface=${sock},queues=${pairs}`, `net_tap0,iface=${tap}`],
        app: ["--forward-mode=io", `--rxq=${pairs}`, `--txq=${pairs}`],
      });
      backend = tmProc(t);
      all.push(backend);
      await t.command("start");
      await waitForSocket(sock, backend);
    }
    const frontend = await startTestPmd({
      label: "front-end (net_virtio_user)",
      prefix: prefix("fe"),
      vdevs: [[`net_virtio_user0,path=${sock},queues=${pairs},mac=${GUEST_MAC}`, ...c.feDevargs].join(",")],
      app: [
        ...(dir === "tx" ? ["--forward-mode=txonly", `--txpkts=${size}`] : ["--forward-mode=rxonly"]),
        ...(pairs > 1 ? [`--rxq=${pairs}`, `--txq=${pairs}`, "--txonly-multi-flow"] : []),
        ...c.feArgs,
      ],
    });
    all.push(tmProc(frontend));
    let sender: TestPmd | null = null;
    await frontend.command("start");
    if (dir === "rx") {
      sender = await startTestPmd({
        label: "sender (net_af_packet on the tap)",
        netns: c.ns.name,
        prefix: prefix("tx"),
        vdevs: [`net_af_packet0,iface=${tap}`],
        // Several pairs: a flow per packet (source address), which the tap spreads over its queues.
        app: ["--forward-mode=txonly", `--txpkts=${size}`, `--eth-peer=0,${GUEST_MAC}`, ...(pairs > 1 ? ["--txonly-multi-flow"] : [])],
      });
      all.push(tmProc(sender));
      await sender.command("start");
    }
    return { backend, tap, frontend, sender, all };
  } catch (e) {
    for (const p of all.reverse()) await p.stop();
    throw e;
  }
}

interface Snap {
  t: number;
  ticks: Map<number, number>;
  host: number;
  selfUs: number;
  tap: ReturnType<typeof ifStats>;
  fe: { rx: number; tx: number };
}

async function snap(r: Running): Promise<Snap> {
  for (const p of r.all) p.assertAlive();
  const t0 = performance.now();
  const fe = await r.frontend.portStats(0);
  const ticks = new Map<number, number>();
  for (const p of r.all) ticks.set(p.pid, cpuTicks(p.pid));
  const tap = ifStats(r.backend.pid, r.tap);
  const host = hostBusyTicks();
  const u = process.cpuUsage();
  const t1 = performance.now();
  return { t: (t0 + t1) / 2, ticks, host, selfUs: u.user + u.system, tap, fe: { rx: fe.rxPackets, tx: fe.txPackets } };
}

function sampleOf(r: Running, a: Snap, b: Snap, o: { dir: Dir; size: number; pairs: number; kind: Kind; round: number }): PacketSample {
  const d = (p: Proc | null) => (p === null ? 0 : (b.ticks.get(p.pid)! - a.ticks.get(p.pid)!) / CLK_TCK);
  const wallS = (b.t - a.t) / 1000;
  const backendCpuS = d(r.backend);
  const frontendCpuS = (b.ticks.get(r.frontend.pid)! - a.ticks.get(r.frontend.pid)!) / CLK_TCK;
  const senderCpuS = r.sender ? (b.ticks.get(r.sender.pid)! - a.ticks.get(r.sender.pid)!) / CLK_TCK : 0;
  const hostS = (b.host - a.host) / CLK_TCK;
  const selfS = (b.selfUs - a.selfUs) / 1e6;
  const foreignCores = Math.max(0, hostS - backendCpuS - frontendCpuS - senderCpuS - selfS) / wallS;
  const packets = o.dir === "tx" ? b.tap.rxPackets - a.tap.rxPackets : b.fe.rx - a.fe.rx;
  const bytes = o.dir === "tx" ? b.tap.rxBytes - a.tap.rxBytes : packets * o.size;
  return {
    ...o,
    wallS,
    packets,
    mpps: packets / wallS / 1e6,
    gbps: (bytes * 8) / wallS / 1e9,
    backendCpuS,
    nsPerPacket: packets > 0 ? (backendCpuS / packets) * 1e9 : NaN,
    frontendCpuS,
    senderCpuS,
    foreignCores,
    offered: o.dir === "tx" ? b.fe.tx - a.fe.tx : b.tap.txPackets - a.tap.txPackets,
    tapDropped: b.tap.txDrop - a.tap.txDrop,
  };
}

async function stopCell(r: Running): Promise<void> {
  // The traffic source first, then the backend (the front-end's quit talks to it), then the rest.
  if (r.sender) await r.sender.stop();
  await r.frontend.stop();
  await r.backend.stop();
}

/** perf record -g of `pid` (all threads) for `seconds`; returns the report's top lines. */
async function perfWindow(pid: number, seconds: number, out: string, jitDumpDir?: string): Promise<string[]> {
  const p = Bun.spawn(["perf", "record", "-F", "1999", "-g", "-p", String(pid), "-o", out, "--", "sleep", String(seconds)], {
    stdout: "pipe",
    stderr: "pipe",
  });
  const code = await p.exited;
  const err = await new Response(p.stderr).text();
  if (code !== 0) return [`perf record failed (${code}): ${tail(err, 5)}`];
  if (jitDumpDir !== undefined) writePerfMaps(jitDumpDir); // names the JIT-compiled JS ("JSC-<tier>: <function>")
  const rep = (sort: string, limit: string) => {
    const r = Bun.spawnSync(["perf", "report", "-i", out, "--stdio", "--no-children", "--sort", sort, "-g", "none", "--percent-limit", limit], {
      stdout: "pipe",
      stderr: "pipe",
    });
    return r.stdout.toString().split("\n").filter((l) => /%/.test(l) && !l.startsWith("#")).map((l) => "    " + l.trim());
  };
  return [
    "  by thread (comm):", ...rep("comm", "1").slice(0, 10),
    "  by dso (backend = Bun/JSC native code, stripped; [JIT] = compiled JS):", ...rep("dso", "0.5").slice(0, 10),
    "  by dso,sym:", ...rep("dso,sym", "0.8").slice(0, 30),
  ];
}

/** strace -c -f of `pid` for `seconds`: per-syscall counts. */
async function straceWindow(pid: number, seconds: number): Promise<{ text: string; calls: Map<string, number> }> {
  const p = Bun.spawn(["strace", "-c", "-f", "-p", String(pid)], { stdout: "pipe", stderr: "pipe" });
  await Bun.sleep(seconds * 1000);
  p.kill("SIGINT");
  await p.exited;
  const text = await new Response(p.stderr).text();
  const calls = new Map<string, number>();
  for (const line of text.split("\n")) {
    // % time  seconds  usecs/call  calls  errors  syscall
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?([a-z_0-9]+)\s*$/.exec(line);
    if (m && m[3] !== "total") calls.set(m[3]!, Number(m[1]));
  }
  return { text, calls };
}

async function packetPart(c: CellCtx, o: {
  rounds: number;
  sizes: number[];
  dirs: Dir[];
  pairsList: number[];
  perf: boolean;
  strace: boolean;
  profileS: number;
  resultsDir: string;
  date: string;
  only?: Kind;
}): Promise<{ samples: PacketSample[]; profile: Record<string, unknown> }> {
  const samples: PacketSample[] = [];
  const profile: Record<string, unknown> = {};
  for (const dir of o.dirs) {
    for (const size of o.sizes) {
      for (const pairs of o.pairsList) {
      for (let round = 0; round < o.rounds; round++) {
        const order: Kind[] = o.only ? [o.only] : round % 2 === 0 ? ["ours", "dpdk"] : ["dpdk", "ours"];
        for (const kind of order) {
          const r = await startCell(c, kind, dir, size, pairs);
          try {
            await Bun.sleep(c.warmupS * 1000);
            const a = await snap(r);
            await Bun.sleep(c.runtimeS * 1000);
            const b = await snap(r);
            const s = sampleOf(r, a, b, { dir, size, pairs, kind, round });
            samples.push(s);
            console.log(
              `  [${dir} ${String(size).padStart(4)}B${pairs > 1 ? ` ${pairs}p` : ""} r${round} ${kind.padEnd(4)}] ${fmt(s.mpps, 3).padStart(6)} Mpps ${fmt(s.gbps, 2).padStart(5)} Gbit/s  ` +
                `backend ${fmt(s.backendCpuS / s.wallS, 2)} cores ${fmt(s.nsPerPacket, 0).padStart(5)} ns/pkt  ` +
                `front-end ${fmt(s.frontendCpuS / s.wallS, 2)}${r.sender ? ` sender ${fmt(s.senderCpuS / s.wallS, 2)}` : ""} cores  ` +
                `${dir === "tx" ? `sent by front-end ${fmtInt(s.offered)}` : `read from tap ${fmtInt(s.offered)}, tap dropped ${fmtInt(s.tapDropped)}`}  ` +
                `foreign ${fmt(s.foreignCores, 2)}`,
            );
            const last = round === o.rounds - 1;
            if (last && kind === "ours" && size === o.sizes[0] && pairs === o.pairsList[0]) {
              // Packets moved in a profiling window: to the tap (tx) or to the front-end (rx).
              const moved = (x: Snap, y: Snap) => (dir === "tx" ? y.tap.rxPackets - x.tap.rxPackets : y.fe.rx - x.fe.rx);
              if (o.strace) {
                const a2 = await snap(r);
                const st = await straceWindow(r.backend.pid, o.profileS);
                const b2 = await snap(r);
                const pk = moved(a2, b2);
                const per = (name: string) => (st.calls.get(name) ?? 0) / pk;
                const interesting = ["writev", "readv", "write", "read", "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "madvise", "ioctl"];
                const lines = st.text.split("\n").filter((l) => /^\s*[\d.]+\s+[\d.]+/.test(l) || /^% time|^-----/.test(l.trim()));
                console.log(`\n  strace -c -f ours (${dir} ${size}B), ${o.profileS} s, ${fmtInt(pk)} packets ${dir === "tx" ? "to the tap" : "to the front-end"} meanwhile (strace slows it down):`);
                console.log(lines.slice(0, 16).map((l) => "    " + l).join("\n"));
                console.log("  per packet: " + interesting.filter((n) => st.calls.has(n)).map((n) => `${n} ${fmt(per(n), 3)}`).join(", ") +
                  `; all syscalls ${fmt([...st.calls.values()].reduce((x, y) => x + y, 0) / pk, 3)}\n`);
                profile[`strace-${dir}${size}`] = { packets: pk, calls: Object.fromEntries(st.calls), text: st.text };
              }
              if (o.perf) {
                const out = join(o.resultsDir, `net-${o.date}-${dir}${size}.perf.data`);
                const a2 = await snap(r);
                const lines = await perfWindow(r.backend.pid, o.profileS, out, c.jitDumpDir);
                const b2 = await snap(r);
                const pk = moved(a2, b2);
                console.log(`\n  perf record -g ours (${dir} ${size}B), ${o.profileS} s (${fmt(pk / ((b2.t - a2.t) / 1000) / 1e6, 3)} Mpps meanwhile) → ${out.replace(ROOT + "/", "")}:`);
                console.log(lines.join("\n") + "\n");
                profile[`perf-${dir}${size}`] = { file: out, packets: pk, lines };
              }
            }
          } finally {
            await stopCell(r);
          }
        }
      }
      }
    }
  }
  return { samples, profile };
}

function packetReport(samples: PacketSample[], dirs: Dir[], sizes: number[], pairsList: number[]): void {
  const rows: string[][] = [];
  const label = (dir: Dir, size: number, pairs: number) => `${dir} ${size}B${pairs > 1 ? ` ${pairs} pairs` : ""}`;
  for (const dir of dirs) {
    for (const size of sizes) {
      for (const pairs of pairsList) {
      const of = (k: Kind) => samples.filter((s) => s.dir === dir && s.size === size && s.pairs === pairs && s.kind === k);
      const o = of("ours");
      const p = of("dpdk");
      const mo = median(o.map((s) => s.mpps));
      const mp = median(p.map((s) => s.mpps));
      const co = median(o.map((s) => s.nsPerPacket));
      const cp = median(p.map((s) => s.nsPerPacket));
      const paired = o.flatMap((so) => {
        const sp = p.find((x) => x.round === so.round);
        return sp ? [so.mpps / sp.mpps] : [];
      });
      rows.push([
        label(dir, size, pairs),
        fmt(mo, 3),
        fmt(mp, 3),
        fmt(mo / mp),
        fmt(median(paired)),
        fmt(median(o.map((s) => s.gbps)), 2),
        fmt(median(p.map((s) => s.gbps)), 2),
        fmt(co, 0),
        fmt(cp, 0),
        fmt(co / cp),
        fmt(median(o.map((s) => s.backendCpuS / s.wallS)), 2),
        fmt(median(p.map((s) => s.backendCpuS / s.wallS)), 2),
        `${fmt(spreadPct(o.map((s) => s.mpps)), 0)}/${fmt(spreadPct(p.map((s) => s.mpps)), 0)}`,
        fmt(max([...o, ...p].map((s) => s.foreignCores)), 2),
      ]);
      }
    }
  }
  console.log(
    table(
      ["cell", "Mpps ours", "Mpps dpdk", "ratio", "paired", "Gbit/s ours", "Gbit/s dpdk", "ns CPU/pkt ours", "ns CPU/pkt dpdk", "ratio", "cores ours", "cores dpdk", "Mpps spread %", "max foreign cores"],
      rows,
    ),
  );
  console.log(
    "(tx: packets the tap received per second; rx: packets the front-end received per second. ratio = ours/dpdk of the\n" +
      " medians; paired = median of per-round ratios; ns CPU/pkt = backend utime+stime / packets; dpdk busy-polls a core,\n" +
      " so its CPU is ~1 core whatever the rate. 2 CPUs: front-end (busy-polling), backend and, for rx, the sender\n" +
      " (busy-polling) share them — the same for both backends. Gbit/s counts frame bytes, no virtio header)",
  );
  const rows2: string[][] = [];
  for (const dir of dirs) {
    for (const size of sizes) {
      for (const pairs of pairsList) {
      for (const k of ["ours", "dpdk"] as const) {
        const ss = samples.filter((s) => s.dir === dir && s.size === size && s.pairs === pairs && s.kind === k);
        rows2.push([
          `${label(dir, size, pairs)} ${k}`,
          fmt(median(ss.map((s) => s.frontendCpuS / s.wallS)), 2),
          dir === "rx" ? fmt(median(ss.map((s) => s.senderCpuS / s.wallS)), 2) : "-",
          fmt(median(ss.map((s) => s.offered / s.wallS / 1e6)), 3),
          dir === "rx" ? fmt(median(ss.map((s) => s.tapDropped / s.wallS / 1e6)), 3) : "-",
          fmt(median(ss.map((s) => s.foreignCores)), 2),
        ]);
      }
      }
    }
  }
  console.log(
    "\n" +
      table(["cell backend", "front-end cores", "sender cores", "offered Mpps", "tap dropped Mpps", "foreign cores"], rows2),
  );
  console.log(
    "(offered: tx = what the front-end sent (accepted into the ring), rx = what the backend read from the tap;\n" +
      " tap dropped: frames the tap's queue dropped because the backend did not read them in time;\n" +
      " foreign cores = host CPU used by processes outside this bench in the window)",
  );
}

// ---- main ----

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    args: process.argv.slice(2),
    options: {
      rounds: { type: "string", default: "3" },
      runtime: { type: "string", default: "5" },
      warmup: { type: "string", default: "2" },
      sizes: { type: "string", default: "64,1500" },
      dirs: { type: "string", default: "tx,rx" },
      "skip-packet": { type: "boolean", default: false },
      perf: { type: "boolean", default: false },
      strace: { type: "boolean", default: false },
      "profile-s": { type: "string", default: "4" },
      guest: { type: "boolean", default: false },
      pairs: { type: "string", default: "1" },
      "iperf-time": { type: "string", default: "5" },
      "guest-rounds": { type: "string", default: "3" },
      "ours-bin": { type: "string" },
      "fe-arg": { type: "string", multiple: true, default: [] },
      "fe-devarg": { type: "string", multiple: true, default: [] },
      "packet-pairs": { type: "string", default: "1" },
      "ours-arg": { type: "string", multiple: true, default: [] },
      only: { type: "string" },
      out: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  const posInt = (name: string, v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} ${v}: expected a positive integer`);
    return n;
  };
  const rounds = posInt("rounds", a.rounds!);
  const runtimeS = posInt("runtime", a.runtime!);
  const warmupS = Number(a.warmup);
  const profileS = posInt("profile-s", a["profile-s"]!);
  const sizes = a.sizes!.split(",").map((s) => posInt("sizes", s));
  const dirs = a.dirs!.split(",").map((d) => {
    if (d !== "tx" && d !== "rx") throw new Error(`--dirs: ${d} (tx or rx)`);
    return d as Dir;
  });
  const pairsList = a.pairs!.split(",").map((s) => posInt("pairs", s));
  const packetPairs = a["packet-pairs"]!.split(",").map((s) => posInt("packet-pairs", s));
  if (!netnsAvailable()) throw new Error("the net bench needs root, /dev/net/tun and iproute2");
  for (const tool of ["dpdk-testpmd", "stdbuf"]) {
    if (Bun.which(tool) === null) throw new Error(`${tool} not found (apt-get install dpdk coreutils)`);
  }

  const oursBin = prepareOurs(a["ours-bin"]);
  const date = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "");
  const resultsDir = join(ROOT, "bench", "results");
  mkdirSync(resultsDir, { recursive: true });
  const outPath = a.out ? resolve(a.out) : join(resultsDir, `net-${date}.json`);
  const tmp = mkdtempSync(join(tmpdir(), "bench-net-"));
  const ns = NetNamespace.create();
  const result: Record<string, unknown> = {
    date: new Date().toISOString(),
    git: {
      head: Bun.spawnSync(["git", "-C", ROOT, "rev-parse", "HEAD"]).stdout.toString().trim(),
      dirty: Bun.spawnSync(["git", "-C", ROOT, "status", "--porcelain"]).stdout.toString().trim() !== "",
    },
    host: { clkTck: CLK_TCK, nproc: navigator.hardwareConcurrency, kernel: Bun.spawnSync(["uname", "-r"]).stdout.toString().trim() },
    config: { rounds, runtimeS, warmupS, sizes, dirs, pairsList, packetPairs, feDevargs: a["fe-devarg"], oursBin, feArgs: a["fe-arg"], oursArgs: a["ours-arg"], only: a.only },
  };
  const started = Date.now();
  try {
    // ours attaches to a tap made the administrator's way; the peer's net_tap makes its own (nbp0).
    ns.addTap("nbo0", { vnetHdr: true, multiQueue: true });
    console.log(`net bench: ${navigator.hardwareConcurrency} CPUs shared by every process below; namespace ${ns.name}`);
    console.log(`  ours: ${oursBin.replace(ROOT + "/", "")} device net --tap-name nbo0 (vnet_hdr multi_queue tap, offloads on, MRG_RXBUF) under ip netns exec`);
    console.log(`  dpdk: dpdk-testpmd --vdev net_vhost0 --vdev net_tap0 --forward-mode=io (busy-polls; its net_tap makes tap nbp0 in the namespace)`);
    console.log(`  front-end: dpdk-testpmd --vdev net_virtio_user0,queues=1 (no guest; busy-polls); rx sender: dpdk-testpmd --vdev net_af_packet0 txonly in the namespace`);
    console.log(`  every testpmd: --no-huge -m 1024 --lcores=0@(0,1),1@(0,1) (lcores float over both CPUs), 1 forwarding core, 32768 mbufs`);
    if (!a["skip-packet"]) {
      console.log(`\npart 1: guest-less packet rate, ${packetPairs.join(", ")} queue pair(s), ${rounds} rounds x ${runtimeS} s after ${warmupS} s warm-up per cell`);
      const jitDumpDir = a.perf ? join(resultsDir, `net-${date}-jitdump`) : undefined;
      if (jitDumpDir !== undefined) mkdirSync(jitDumpDir, { recursive: true });
      const ctx: CellCtx = { ns, tmp, oursBin, warmupS, runtimeS, feArgs: a["fe-arg"]!, feDevargs: a["fe-devarg"]!, oursArgs: a["ours-arg"]!, jitDumpDir };
      if (ctx.oursArgs.length) console.log(`  ours extra arguments: ${ctx.oursArgs.join(" ")}`);
      if (ctx.feArgs.length) console.log(`  front-end extra arguments: ${ctx.feArgs.join(" ")}`);
      if (ctx.feDevargs.length) console.log(`  front-end device arguments: ${ctx.feDevargs.join(",")}`);
      const only = a.only as Kind | undefined;
      if (only !== undefined && only !== "ours" && only !== "dpdk") throw new Error(`--only ${only}: ours or dpdk`);
      const { samples, profile } = await packetPart(ctx, { rounds, sizes, dirs, pairsList: packetPairs, perf: a.perf!, strace: a.strace!, profileS, resultsDir, date, only });
      console.log(`\npart 1 medians over ${rounds} rounds:`);
      packetReport(samples, dirs, sizes, packetPairs);
      result.packet = { samples, profile };
    }
    if (a.guest) {
      const { guestPart } = await import("./lib/net_guest.ts");
      result.guest = await guestPart({
        ns,
        tmp,
        oursBin,
        pairsList,
        iperfTimeS: posInt("iperf-time", a["iperf-time"]!),
        rounds: posInt("guest-rounds", a["guest-rounds"]!),
      });
    }
  } finally {
    try {
      ns.destroy();
    } catch (e) {
      console.error((e as Error).message);
    }
    rmSync(tmp, { recursive: true, force: true });
  }
  result.elapsedS = (Date.now() - started) / 1000;
  writeFileSync(outPath, JSON.stringify(result, null, 2) + "\n");
  console.log(`\nelapsed ${fmt((Date.now() - started) / 60000, 1)} min; results: ${outPath.replace(ROOT + "/", "")}`);
}

await main();
