// Part 2 of the net bench: iperf3 TCP through a TCG guest (the e2e rig's kernel and initramfs) to an
// iperf3 server in the bench's network namespace, for three backends of the guest's virtio-net:
//   ours: -netdev vhost-user → `backend device net --tap-name nbg0` (under ip netns exec)
//   qemu: QEMU's own -netdev tap,vhost=off (QEMU opens the tap, so QEMU runs under ip netns exec)
//   dpdk: -netdev vhost-user → dpdk-testpmd net_vhost + net_tap (io forwarding)
// Each has its own tap and subnet in the namespace. The guest prints markers around each iperf3 run
// so the host samples the backend's (and QEMU's) CPU exactly over the transfer.
import { chmodSync, existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { bootGuest, ensureRig } from "../../test/e2e/rig.ts";
import type { NetNamespace } from "../../test/support/netns.ts";
import { CLK_TCK, cpuTicks, findPidByCmdline, hostBusyTicks, tail } from "./backends.ts";
import { startTestPmd, type TestPmd } from "./dpdk.ts";
import { fmt, median, spreadPct, table } from "./stats.ts";

type GKind = "ours" | "qemu" | "dpdk";
const KINDS: GKind[] = ["ours", "qemu", "dpdk"];
const SUBNET: Record<GKind, number> = { ours: 0, qemu: 1, dpdk: 2 };
const TAP: Record<GKind, string> = { ours: "nbg0", qemu: "nbq0", dpdk: "nbd0" };
const hostIp = (k: GKind) => `10.98.${SUBNET[k]}.1`;
const guestIp = (k: GKind) => `10.98.${SUBNET[k]}.2`;

export interface GuestSample {
  kind: GKind;
  pairs: number;
  round: number;
  /** up: guest → host (guest sends), down: host → guest (iperf3 -R). */
  dir: "up" | "down";
  gbps: number;
  wallS: number;
  backendCores: number;
  qemuCores: number;
  foreignCores: number;
}

interface Guestable {
  kind: GKind;
  devices: string[];
  qemu?: string;
  backendPid: number | null;
  stop(): Promise<void>;
  output(): string;
}

async function waitFor(path: string, alive: () => void, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!existsSync(path)) {
    alive();
    if (Date.now() > deadline) throw new Error(`${path} did not appear within ${ms} ms`);
    await Bun.sleep(20);
  }
}

function sh(argv: string[]): void {
  const r = Bun.spawnSync(argv, { stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) throw new Error(`${argv.join(" ")}: ${r.stderr.toString()}`);
}

async function setup(kind: GKind, o: { ns: NetNamespace; tmp: string; oursBin: string; pairs: number; round: number }): Promise<Guestable> {
  const tap = TAP[kind];
  const mq = o.pairs > 1;
  const nic = `virtio-net-pci,netdev=net0,romfile=,mac=52:54:00:12:34:5${SUBNET[kind]}${mq ? `,mq=on,vectors=${2 * o.pairs + 2}` : ""}`;
  const sock = join(o.tmp, `g-${kind}.sock`);
  rmSync(sock, { force: true });
  const vhostUser = ["-chardev", `socket,id=n0,path=${sock}`, "-netdev", `vhost-user,id=net0,chardev=n0,queues=${o.pairs}`, "-device", nic];
  const addr = () => sh(["ip", "-n", o.ns.name, "addr", "replace", `${hostIp(kind)}/24`, "dev", tap]);
  if (kind === "ours") {
    const argv = ["ip", "netns", "exec", o.ns.name, o.oursBin, "device", "net", "--socket", sock, "--tap-name", tap,
      "--queue-pairs", String(o.pairs), "--log-level", "warn"];
    const p: Subprocess<"ignore", "pipe", "pipe"> = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    let out = "";
    void (async () => { for await (const b of p.stderr) out += new TextDecoder().decode(b); })();
    await waitFor(sock, () => { if (p.exitCode !== null) throw new Error(`ours died: ${out}`); });
    return {
      kind, devices: vhostUser, backendPid: p.pid, output: () => out,
      async stop() { p.kill("SIGTERM"); const t = setTimeout(() => p.kill("SIGKILL"), 5000); await p.exited; clearTimeout(t); },
    };
  }
  if (kind === "dpdk") {
    const t: TestPmd = await startTestPmd({
      label: "dpdk peer", netns: o.ns.name, prefix: `nbg${process.pid}d${o.pairs}${o.round}`,
      vdevs: [`net_vhost0,iface=${sock},queues=${o.pairs}`, `net_tap0,iface=${tap}`],
      app: ["--forward-mode=io", `--rxq=${o.pairs}`, `--txq=${o.pairs}`],
    });
    await t.command("start");
    await waitFor(sock, () => t.assertAlive());
    addr();
    return { kind, devices: vhostUser, backendPid: t.pid, output: () => t.output(), stop: () => t.stop() };
  }
  // qemu: QEMU opens the (existing, addressed) tap itself, so it must run in the namespace.
  const wrapper = join(o.tmp, "qemu-in-ns.sh");
  const rig = await ensureRig();
  writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${o.ns.name} ${rig.qemu} "$@"\n`);
  chmodSync(wrapper, 0o755);
  return {
    kind,
    qemu: wrapper,
    devices: ["-netdev", `tap,id=net0,ifname=${tap},script=no,downscript=no,vhost=off${mq ? `,queues=${o.pairs}` : ""}`, "-device", nic],
    backendPid: null,
    output: () => "",
    async stop() {},
  };
}

function guestScript(kind: GKind, pairs: number, t: number): string {
  const h = hostIp(kind);
  const run = (tag: string, rev: boolean) => {
    const r = rev ? " -R" : "";
    if (pairs === 1) {
      return `echo NB-START ${tag}\niperf3 -c ${h} -p 5201 -t ${t} -f m${r} >/tmp/${tag}.txt || echo NB-FAIL ${tag}\necho NB-END ${tag}\n` +
        `grep receiver /tmp/${tag}.txt | tail -n 1 | sed -n 's|.* \\([0-9.]*\\) Mbits/sec.*|NB-IPERF ${tag} \\1|p'\n`;
    }
    // iperf3 3.12 is single-threaded: one client per guest CPU so that both tx queues carry traffic.
    let s = `echo NB-START ${tag}\n`;
    for (let i = 0; i < pairs; i++) s += `taskset ${1 << i} iperf3 -c ${h} -p ${5201 + i} -t ${t} -f m${r} >/tmp/${tag}${i}.txt &\np${i}=$!\n`;
    for (let i = 0; i < pairs; i++) s += `wait $p${i} || echo NB-FAIL ${tag}\n`;
    s += `echo NB-END ${tag}\n`;
    for (let i = 0; i < pairs; i++) s += `grep receiver /tmp/${tag}${i}.txt | tail -n 1 | sed -n 's|.* \\([0-9.]*\\) Mbits/sec.*|NB-IPERF ${tag} \\1|p'\n`;
    return s;
  };
  return `
set -e
ip link set eth0 up
${pairs > 1 ? `ethtool -L eth0 combined ${pairs}\n` : ""}ip addr add ${guestIp(kind)}/24 dev eth0
i=0; until ping -c 1 -W 1 ${h} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 30 ] || { echo "NB-FAIL host unreachable"; exit 9; }; done
set +e
${run("up", false)}
${run("down", true)}
echo NB-DONE
`;
}

async function oneBoot(kind: GKind, o: { ns: NetNamespace; tmp: string; oursBin: string; pairs: number; round: number; iperfTimeS: number }): Promise<GuestSample[]> {
  const g = await setup(kind, o);
  // Servers: one per client stream; -s without -1 serves the up and the down run in turn.
  const servers = Array.from({ length: o.pairs }, (_, i) =>
    Bun.spawn(["ip", "netns", "exec", o.ns.name, "iperf3", "-s", "-B", hostIp(kind), "-p", String(5201 + i)], { stdin: "ignore", stdout: "ignore", stderr: "pipe" }));
  const samples: GuestSample[] = [];
  try {
    await Bun.sleep(300);
    const qmp = join(o.tmp, `qmp-${kind}-${o.pairs}-${o.round}.sock`);
    let qemuPid: number | null = null;
    const snap = () => {
      qemuPid ??= findPidByCmdline(qmp);
      const u = process.cpuUsage();
      return {
        t: performance.now(),
        backend: g.backendPid !== null ? cpuTicks(g.backendPid) : 0,
        qemu: qemuPid !== null ? cpuTicks(qemuPid) : 0,
        host: hostBusyTicks(),
        self: (u.user + u.system) / 1e6,
      };
    };
    const starts = new Map<string, ReturnType<typeof snap>>();
    const windows = new Map<string, { a: ReturnType<typeof snap>; b: ReturnType<typeof snap> }>();
    let buf = "";
    const r = await bootGuest({
      command: guestScript(kind, o.pairs, o.iperfTimeS),
      devices: g.devices,
      qemu: g.qemu,
      memoryMiB: 512,
      timeoutMs: 120_000 + 4 * o.iperfTimeS * 1000,
      extraArgs: ["-smp", "2", "-qmp", `unix:${qmp},server=on,wait=off`],
      onSerial: (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i).trim();
          buf = buf.slice(i + 1);
          const m = /^NB-(START|END) (\w+)$/.exec(line);
          if (!m) continue;
          if (m[1] === "START") starts.set(m[2]!, snap());
          else if (starts.has(m[2]!)) windows.set(m[2]!, { a: starts.get(m[2]!)!, b: snap() });
        }
      },
    });
    if (!r.serial.includes("NB-DONE") || r.serial.includes("NB-FAIL")) {
      throw new Error(`guest (${kind}, ${o.pairs} pairs) failed: exit ${r.exitStatus}\nserial:\n${tail(r.serial, 30)}\nqemu stderr:\n${tail(r.stderr, 10)}\nbackend:\n${tail(g.output(), 15)}`);
    }
    for (const dir of ["up", "down"] as const) {
      const vals = [...r.serial.matchAll(new RegExp(`^NB-IPERF ${dir} ([0-9.]+)$`, "gm"))].map((m) => Number(m[1]));
      const w = windows.get(dir);
      if (vals.length !== o.pairs || !w) throw new Error(`no iperf3 result for ${dir} (${kind}):\n${tail(r.serial, 30)}`);
      const wallS = (w.b.t - w.a.t) / 1000;
      const backendS = (w.b.backend - w.a.backend) / CLK_TCK;
      const qemuS = (w.b.qemu - w.a.qemu) / CLK_TCK;
      const hostS = (w.b.host - w.a.host) / CLK_TCK;
      const s: GuestSample = {
        kind, pairs: o.pairs, round: o.round, dir,
        gbps: vals.reduce((x, y) => x + y, 0) / 1000,
        wallS,
        backendCores: backendS / wallS,
        qemuCores: qemuS / wallS,
        foreignCores: Math.max(0, hostS - backendS - qemuS - (w.b.self - w.a.self)) / wallS,
      };
      samples.push(s);
      console.log(`  [${o.pairs}p r${o.round} ${kind.padEnd(4)} ${dir.padEnd(4)}] ${fmt(s.gbps, 2).padStart(5)} Gbit/s  backend ${g.backendPid !== null ? fmt(s.backendCores, 2) : "(in qemu)"} cores  qemu ${fmt(s.qemuCores, 2)} cores  foreign ${fmt(s.foreignCores, 2)}`);
    }
  } finally {
    for (const s of servers) s.kill("SIGKILL");
    await g.stop();
  }
  return samples;
}

export async function guestPart(o: { ns: NetNamespace; tmp: string; oursBin: string; pairsList: number[]; iperfTimeS: number; rounds: number }): Promise<GuestSample[]> {
  console.log(`\npart 2: iperf3 TCP through a TCG guest (-smp 2, 512 MiB), ${o.rounds} rounds x ${o.iperfTimeS} s per direction, pairs ${o.pairsList.join(",")}`);
  console.log(`  ours: vhost-user → backend device net; qemu: -netdev tap,vhost=off (QEMU in the namespace); dpdk: vhost-user → testpmd net_vhost+net_tap io`);
  const samples: GuestSample[] = [];
  for (const pairs of o.pairsList) {
    // Taps for ours and QEMU made the administrator's way (the peer's net_tap makes its own). A
    // multi_queue tap only for several pairs: QEMU asks for IFF_MULTI_QUEUE only when queues > 1, and
    // the kernel refuses a persistent tap whose multi-queue flag differs.
    for (const k of ["ours", "qemu"] as const) {
      o.ns.exec(["ip", "link", "del", TAP[k]], true);
      o.ns.addTap(TAP[k], { vnetHdr: true, multiQueue: pairs > 1, address: `${hostIp(k)}/24` });
    }
    for (let round = 0; round < o.rounds; round++) {
      const order = KINDS.map((_, i) => KINDS[(i + round) % KINDS.length]!);
      for (const kind of order) samples.push(...(await oneBoot(kind, { ...o, pairs, round })));
    }
  }
  const rows: string[][] = [];
  for (const pairs of o.pairsList) {
    for (const dir of ["up", "down"] as const) {
      const of = (k: GKind) => samples.filter((s) => s.pairs === pairs && s.dir === dir && s.kind === k);
      const m = (k: GKind) => median(of(k).map((s) => s.gbps));
      rows.push([
        `${pairs}p ${dir === "up" ? "guest→host" : "host→guest"}`,
        fmt(m("ours"), 2), fmt(m("qemu"), 2), fmt(m("dpdk"), 2),
        fmt(m("ours") / m("qemu")), fmt(m("ours") / m("dpdk")),
        fmt(median(of("ours").map((s) => s.backendCores)), 2), fmt(median(of("dpdk").map((s) => s.backendCores)), 2),
        `${fmt(median(of("ours").map((s) => s.qemuCores)), 2)}/${fmt(median(of("qemu").map((s) => s.qemuCores)), 2)}/${fmt(median(of("dpdk").map((s) => s.qemuCores)), 2)}`,
        KINDS.map((k) => fmt(spreadPct(of(k).map((s) => s.gbps)), 0)).join("/"),
        fmt(median(samples.filter((s) => s.pairs === pairs && s.dir === dir).map((s) => s.foreignCores)), 2),
      ]);
    }
  }
  console.log(`\npart 2 medians over ${o.rounds} rounds:`);
  console.log(table(["iperf3 TCP", "Gbit/s ours", "Gbit/s qemu-tap", "Gbit/s dpdk", "ours/qemu", "ours/dpdk", "cores ours", "cores dpdk", "qemu cores o/q/d", "spread % o/q/d", "foreign cores"], rows));
  console.log("(qemu-tap's backend work happens inside QEMU's own threads: it is in its qemu cores; ours' and dpdk's is separate)");
  return samples;
}
