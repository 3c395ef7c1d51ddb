/**
 * Startup and idle cost of every device, beside qemu-storage-daemon's vhost-user-blk export:
 *
 *   start → listening   from spawn to the first successful connect() on the socket (polled every
 *                       0.5 ms; the same probe for every backend), and for ours to READY=1 on a
 *                       NOTIFY_SOCKET (the device thread is up and accepting)
 *   idle RSS, threads   /proc/PID/status after the start, before any front-end
 *   idle CPU, wakeups   with a front-end connected and the device's rings started (memory table,
 *                       kick/call eventfds) but no guest activity, over --idle-seconds: CPU time of
 *                       all threads (schedstat, ns) and context switches per second
 *
 *   bun bench/startup.ts [--bin dist/backend] [--rounds 10] [--idle-seconds 5] [--devices block,console,snd,net] [--no-qsd]
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectUnix, bindUnixDatagram } from "../ffi/socket.ts";
import { read } from "../ffi/io.ts";
import { close, EAGAIN } from "../ffi/libc.ts";
import { GuestRam, Vmm } from "../test/support/frontend.ts";
import { NetNamespace, netnsAvailable } from "../test/support/netns.ts";

const args = process.argv.slice(2);
const opt = (name: string, dflt: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1]! : dflt;
};
if (args.includes("--help")) {
  console.log(readFileSync(import.meta.path, "utf8").split("*/")[0]!.replace(/^\/\*\*|^ \* ?/gm, ""));
  process.exit(0);
}
const ROOT = join(import.meta.dir, "..");
const BIN = opt("bin", join(ROOT, "dist/backend"));
const ROUNDS = Number(opt("rounds", "10"));
const IDLE_S = Number(opt("idle-seconds", "5"));
const DEVICES = opt("devices", "block,console,snd,net").split(",");
const QSD = args.includes("--no-qsd") ? null : ["/usr/bin/qemu-storage-daemon", "/usr/local/bin/qemu-storage-daemon"].find(existsSync) ?? null;

if (!existsSync(BIN)) {
  console.log(`building ${BIN}`);
  if (Bun.spawnSync([process.execPath, join(ROOT, "build.ts")], { cwd: ROOT, stdout: "inherit", stderr: "inherit" }).exitCode !== 0) process.exit(1);
}

const dir = mkdtempSync(join(tmpdir(), "bench-startup-"));
const image = join(dir, "disk.img");
writeFileSync(image, "");
Bun.spawnSync(["truncate", "-s", "64M", image]);
let ns: NetNamespace | null = null;
process.on("exit", () => {
  ns?.destroy();
  rmSync(dir, { recursive: true, force: true });
});

interface Target {
  name: string;
  /** argv for a backend listening on `sock`. */
  argv(sock: string): string[];
  /** Rings a driver starts for the idle measurement. */
  queues: number;
  notify: boolean;
}

function targets(): Target[] {
  const out: Target[] = [];
  const ours = (device: string, extra: string[], queues: number): Target => ({
    name: device, queues, notify: true,
    argv: (sock) => [BIN, "device", device, "--socket", sock, "--log-level", "warn", ...extra],
  });
  for (const d of DEVICES) {
    if (d === "block") out.push(ours("block", ["--file", image], 1));
    else if (d === "console") out.push(ours("console", ["--output-file", join(dir, "console.out"), "--input-file", "/dev/null"], 2));
    else if (d === "snd") out.push(ours("snd", ["--backend", "null"], 4));
    else if (d === "net") {
      if (!netnsAvailable()) {
        console.log("net: skipped (needs root and /dev/net/tun)");
        continue;
      }
      ns ??= NetNamespace.create();
      ns.addTap("benchtap0");
      const t = ours("net", ["--tap-name", "benchtap0"], 2);
      out.push({ ...t, argv: (sock) => ["ip", "netns", "exec", ns!.name, ...t.argv(sock)] });
    }
  }
  if (QSD !== null) {
    out.push({
      name: "qsd block", queues: 1, notify: false,
      argv: (sock) => [QSD, "--blockdev", `driver=file,node-name=f,filename=${image}`,
        "--export", `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock},writable=on`],
    });
  }
  return out;
}

function status(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, "utf8").split("\n")) {
    const i = line.indexOf(":");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

/** CPU ns and context switches of every thread of `pid` (the pid may be `ip netns exec`'s: it execs). */
function usage(pid: number): { ns: number; switches: number } {
  let ns = 0;
  let switches = 0;
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").split(" ")[0]);
      const s = readFileSync(`/proc/${pid}/task/${t}/status`, "utf8");
      switches += Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(s)?.[1] ?? 0) + Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(s)?.[1] ?? 0);
    } catch {
      // thread ended
    }
  }
  return { ns, switches };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function once(t: Target, round: number, idle: boolean) {
  const sock = join(dir, `${t.name.replace(/ /g, "-")}-${round}.sock`);
  const notifyPath = join(dir, `notify-${round}`);
  const nfd = t.notify ? bindUnixDatagram(notifyPath) : -1;
  const t0 = performance.now();
  const p = Bun.spawn(t.argv(sock), { stdout: "ignore", stderr: "pipe", env: { ...process.env, ...(t.notify ? { NOTIFY_SOCKET: notifyPath } : {}) } });
  let listening = NaN;
  let ready = NaN;
  const buf = new Uint8Array(512);
  for (;;) {
    const now = performance.now();
    if (now - t0 > 10_000) throw new Error(`${t.name}: not listening after 10 s: ${await new Response(p.stderr).text()}`);
    if (Number.isNaN(listening) && existsSync(sock)) {
      try {
        close(connectUnix(sock));
        listening = performance.now() - t0;
      } catch {
        // bound, not yet listening
      }
    }
    if (t.notify && Number.isNaN(ready) && read(nfd, buf, buf.length) !== -EAGAIN) ready = performance.now() - t0;
    if (!Number.isNaN(listening) && (!t.notify || !Number.isNaN(ready))) break;
    await Bun.sleep(0.5);
  }
  if (nfd >= 0) {
    close(nfd);
    rmSync(notifyPath, { force: true });
  }
  let rssMiB = NaN;
  let threads = NaN;
  let cpuPct = NaN;
  let wakeups = NaN;
  if (idle) {
    await Bun.sleep(1000); // let startup settle (JIT, GC)
    const st = status(p.pid);
    rssMiB = Number(st.VmRSS!.split(" ")[0]) / 1024;
    threads = Number(st.Threads);
    // The earlier probe connection is over; a VMM connects and starts the rings, then stays idle.
    const ram = new GuestRam(16 << 20);
    const vmm = new Vmm({ socketPath: sock }, ram);
    vmm.activate(t.queues, 64);
    await Bun.sleep(500);
    const a = usage(p.pid);
    await Bun.sleep(IDLE_S * 1000);
    const b = usage(p.pid);
    cpuPct = ((b.ns - a.ns) / (IDLE_S * 1e9)) * 100;
    wakeups = (b.switches - a.switches) / IDLE_S;
    vmm.conn.close();
    ram.dispose();
  }
  p.kill("SIGTERM");
  await p.exited;
  return { listening, ready, rssMiB, threads, cpuPct, wakeups };
}

const rows: string[][] = [["backend", "start→listening ms (median, min–max)", "start→READY ms", "idle RSS MiB", "threads", "idle CPU % (rings started)", "wakeups/s"]];
for (const t of targets()) {
  const listening: number[] = [];
  const ready: number[] = [];
  let idle: Awaited<ReturnType<typeof once>> | null = null;
  await once(t, -1, false); // warm the page cache
  for (let r = 0; r < ROUNDS; r++) {
    const x = await once(t, r, r === ROUNDS - 1);
    listening.push(x.listening);
    if (!Number.isNaN(x.ready)) ready.push(x.ready);
    if (r === ROUNDS - 1) idle = x;
  }
  const f = (v: number, d = 1) => (Number.isNaN(v) ? "—" : v.toFixed(d));
  rows.push([
    t.name, `${f(median(listening))} (${f(Math.min(...listening))}–${f(Math.max(...listening))})`, ready.length ? f(median(ready)) : "—",
    f(idle!.rssMiB), f(idle!.threads, 0), f(idle!.cpuPct, 3), f(idle!.wakeups),
  ]);
  console.log(`${t.name}: done`);
}
console.log(`\n${ROUNDS} starts each, idle over ${IDLE_S} s, binary ${BIN}\n`);
console.log(`| ${rows[0]!.join(" | ")} |\n|${rows[0]!.map(() => "---").join("|")}|`);
for (const r of rows.slice(1)) console.log(`| ${r.join(" | ")} |`);
