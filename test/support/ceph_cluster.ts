// A real single-node Ceph cluster for the RBD tests, e2e and bench: one monitor and one OSD on the
// memory object store, pool size 1, no authentication (or cephx: CephClusterOptions), started
// from Debian's packages (ceph-mon, ceph-osd, ceph-common) under a temporary directory with its own
// ceph.conf, bound to 127.0.0.1 only (or to an address in a network namespace), and stopped (every
// daemon killed, the directory removed) by stop(). Steps after go-ceph's micro-osd.sh, with what a
// machine without IPv6 and with other clusters around needs: the monitor on free ports of our own,
// named in a monmap built with monmaptool (a monmap taken from `mon host` names the monitor
// "noname-a", and ceph-mon --id a then waits to join a cluster forever), IPv4 only, the OSD bound
// to the same address. No manager: Debian's ceph-mgr pulls in ~40 Python packages, and nothing
// RBD does needs one (pools and images are the monitor's and the OSD's); one is started when
// ceph-mgr is installed.
//
// Daemons run in the foreground (-f) as children of this process, so stop() kills exactly them.
import { spawn, spawnSync, type Subprocess } from "bun";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, existsSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer } from "node:net";
import type { NetNamespace } from "./netns.ts";

const TOOLS = ["ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool"] as const;

const which = (tool: string) => spawnSync(["sh", "-c", `command -v ${tool}`]).exitCode === 0;

/** Why a Ceph cluster cannot be started here (null when it can): the packages test/e2e/setup.sh installs. */
export function cephTestsUnavailable(): string | null {
  for (const tool of TOOLS) if (!which(tool)) return `${tool} is not installed (test/e2e/setup.sh installs ceph-mon, ceph-osd and ceph-common)`;
  return null;
}

/** A TCP port free on 127.0.0.1 now (the kernel's pick; released before it is used). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface CommandResult {
  code: number;
  out: string;
  err: string;
}

export interface CephClusterOptions {
  /** The address every daemon binds (default 127.0.0.1). */
  address?: string;
  /** Run the daemons and the CLIs inside this network namespace (`ip netns exec`); the monitor then
   * takes Ceph's default ports, all free in a namespace of its own. */
  netns?: NetNamespace;
  /** "cephx": keys for the monitor, the OSD and client.admin (the conf names client.admin's keyring,
   * `keyring` below); default "none". */
  auth?: "none" | "cephx";
}

const clusters = new Set<CephCluster>();
process.on("exit", () => {
  for (const c of clusters) c.kill();
});

export class CephCluster {
  /** The cluster's ceph.conf: give it to clients as conf=PATH (or CEPH_CONF). */
  readonly conf: string;
  private readonly daemons: { name: string; proc: Subprocess }[] = [];

  private constructor(
    readonly dir: string,
    /** The monitor's msgr2 and msgr1 ports on `address`. */
    readonly monPorts: { v2: number; v1: number },
    readonly address: string,
    private readonly netns: NetNamespace | undefined,
    readonly auth: "none" | "cephx",
  ) {
    this.conf = join(dir, "ceph.conf");
    this.keyring = join(dir, "client.admin.keyring");
  }

  /** client.admin's keyring (auth cephx; the conf names it for client.admin). */
  readonly keyring: string;

  /** The OSD's process id (a bench counts its CPU). */
  get osdPid(): number {
    return this.daemons.find((d) => d.name === "osd.0")?.proc.pid ?? 0;
  }

  /** The monitor's address as `mon_host` spells it. */
  get monHost(): string {
    return `[v2:${this.address}:${this.monPorts.v2},v1:${this.address}:${this.monPorts.v1}]`;
  }

  /** Starts a monitor and an OSD (and a manager when installed) and waits until the OSD is up. */
  static async start(o: CephClusterOptions = {}): Promise<CephCluster> {
    const why = cephTestsUnavailable();
    if (why !== null) throw new Error(why);
    const dir = mkdtempSync(join(tmpdir(), "ceph-test-"));
    const ports = o.netns !== undefined ? { v2: 3300, v1: 6789 } : { v2: await freePort(), v1: await freePort() };
    const c = new CephCluster(dir, ports, o.address ?? "127.0.0.1", o.netns, o.auth ?? "none");
    clusters.add(c);
    try {
      await c.boot();
      return c;
    } catch (e) {
      await c.stop();
      throw e;
    }
  }

  private async boot(): Promise<void> {
    const d = this.dir;
    for (const sub of ["mon", "osd", "log", "run"]) mkdirSync(join(d, sub));
    const fsid = crypto.randomUUID();
    writeFileSync(this.conf, [
      "[global]",
      `fsid = ${fsid}`,
      `mon host = ${this.monHost}`,
      "ms bind ipv4 = true",
      "ms bind ipv6 = false",
      `auth cluster required = ${this.auth}`,
      `auth service required = ${this.auth}`,
      `auth client required = ${this.auth}`,
      "osd pool default size = 1",
      "osd pool default min size = 1",
      "osd pool default pg autoscale mode = off",
      "osd crush chooseleaf type = 0",
      "mon allow pool delete = true",
      "mon data avail crit = 0",
      "mon data avail warn = 0",
      "mon warn on pool no redundancy = false",
      // A client that died holding an image's exclusive lock (a backend killed in a test) loses it
      // after this long instead of 30 s: the next client's writes wait that long. Not shorter: a
      // live client pings its watch every 5 s, and one whose ping comes late on a loaded machine
      // would lose its lock to another client and be blocklisted (every request then fails).
      "osd client watch timeout = 15",
      `run dir = ${d}/run`,
      "",
      // Logs and admin sockets for the daemons only: a client (the backend) keeps none.
      "[mon]",
      `admin socket = ${d}/run/$name.asok`,
      `log file = ${d}/log/$name.log`,
      "[osd]",
      `admin socket = ${d}/run/$name.asok`,
      `log file = ${d}/log/$name.log`,
      "[mgr]",
      `admin socket = ${d}/run/$name.asok`,
      `log file = ${d}/log/$name.log`,
      "",
      "[mon.a]",
      `mon data = ${d}/mon`,
      `public addr = ${this.address}`,
      "",
      "[osd.0]",
      `osd data = ${d}/osd`,
      "osd objectstore = memstore",
      "memstore device bytes = 2147483648",
      `public addr = ${this.address}`,
      `cluster addr = ${this.address}`,
      // Two cores shared with the tests: a few threads, not one per shard per core.
      "osd op num shards = 1",
      "osd op num threads per shard = 2",
      "",
      "[mgr.x]",
      `mgr data = ${d}/mgr`,
      "",
      ...(this.auth === "cephx" ? ["[client.admin]", `keyring = ${this.keyring}`, "[osd.0]", `keyring = ${d}/osd/keyring`, ""] : []),
    ].join("\n"));
    const monmap = join(d, "monmap");
    this.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", this.monHost, monmap]);
    if (this.auth === "cephx") {
      const monKeyring = join(d, "mon.keyring");
      this.run(["ceph-authtool", "--create-keyring", monKeyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]);
      this.run(["ceph-authtool", "--create-keyring", this.keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"]);
      this.run(["ceph-authtool", monKeyring, "--import-keyring", this.keyring]);
      this.run(["ceph-mon", "-c", this.conf, "--id", "a", "--mkfs", "--monmap", monmap, "--keyring", monKeyring]);
    } else {
      this.run(["ceph-mon", "-c", this.conf, "--id", "a", "--mkfs", "--monmap", monmap, "--keyring", "/dev/null"]);
      writeFileSync(join(d, "mon", "keyring"), "");
    }
    this.daemon(["ceph-mon", "-c", this.conf, "--id", "a", "-f", "--public-addrv", this.monHost], "mon.a");
    const id = this.ceph(["osd", "create"]).trim();
    if (id !== "0") throw new Error(`ceph osd create gave id '${id}', expected 0`);
    this.ceph(["osd", "crush", "add", "osd.0", "1", "root=default"]);
    if (this.auth === "cephx") this.ceph(["auth", "get-or-create", "osd.0", "mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *", "-o", join(d, "osd", "keyring")]);
    this.run(["ceph-osd", "-c", this.conf, "--id", "0", "--mkfs"]);
    this.daemon(["ceph-osd", "-c", this.conf, "--id", "0", "-f"], "osd.0");
    if (which("ceph-mgr")) {
      mkdirSync(join(d, "mgr"));
      this.daemon(["ceph-mgr", "-c", this.conf, "--id", "x", "-f"], "mgr.x");
    }
    const deadline = Date.now() + 30_000;
    for (;;) {
      const stat = JSON.parse(this.ceph(["osd", "stat", "--format", "json"])) as { num_up_osds?: number };
      if (stat.num_up_osds === 1) break;
      this.checkDaemons();
      if (Date.now() > deadline) throw new Error(`the OSD did not come up in 30 s:\n${this.logTail("osd.0")}`);
      await Bun.sleep(100);
    }
  }

  /** A pool for RBD images (8 placement groups, the rbd application enabled). */
  createPool(name: string): void {
    this.ceph(["osd", "pool", "create", name, "8"]);
    this.ceph(["osd", "pool", "application", "enable", name, "rbd"]);
  }

  /** A new image of `bytes` (rbd's default features: layering, exclusive-lock, object-map, fast-diff, deep-flatten). */
  createImage(pool: string, image: string, bytes: number, extra: string[] = []): void {
    this.rbd(["create", "--size", `${Math.ceil(bytes / 1024)}K`, ...extra, `${pool}/${image}`]);
  }

  /** Runs `ceph ARGS` against this cluster; throws with its stderr when it fails. */
  ceph(args: string[]): string {
    return this.run(["ceph", "-c", this.conf, "--connect-timeout", "15", ...args]);
  }

  /** Runs `rbd ARGS` against this cluster; throws with its stderr when it fails. */
  rbd(args: string[]): string {
    return this.run(["rbd", "-c", this.conf, ...args]);
  }

  /** Reads `bytes` of an image (or snapshot, `pool/image@snap`) from offset 0 through `rbd export`. */
  readImage(spec: string): Uint8Array {
    const out = join(this.dir, "export.bin");
    rmSync(out, { force: true });
    this.rbd(["export", "--no-progress", spec, out]);
    const data = new Uint8Array(readFileSync(out));
    rmSync(out, { force: true });
    return data;
  }

  /** Writes `data` as the content of an image from offset 0 (`rbd import` into a new image). */
  importImage(spec: string, data: Uint8Array): void {
    const src = join(this.dir, "import.bin");
    writeFileSync(src, data);
    this.rbd(["import", "--no-progress", src, spec]);
    rmSync(src, { force: true });
  }

  /** Runs a command, throwing with its output when it fails. */
  run(argv: string[]): string {
    const r = this.tryRun(argv);
    if (r.code !== 0) throw new Error(`${argv.join(" ")} failed (${r.code}): ${(r.err || r.out).trim()}`);
    return r.out;
  }

  tryRun(argv: string[]): CommandResult {
    const p = spawnSync(this.inNamespace(argv), { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: { ...process.env, CEPH_CONF: this.conf } });
    return { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
  }

  /** `argv` as run in the cluster's namespace (`ip netns exec` execs it: a daemon's pid is its own). */
  private inNamespace(argv: string[]): string[] {
    return this.netns === undefined ? argv : ["ip", "netns", "exec", this.netns.name, ...argv];
  }

  /** Starts a daemon in the foreground; `name` is its log's ($name.log). */
  private daemon(argv: string[], name: string): void {
    this.daemons.push({ name, proc: spawn(this.inNamespace(argv), { stdin: "ignore", stdout: "ignore", stderr: "ignore", env: { ...process.env, CEPH_CONF: this.conf } }) });
  }

  private checkDaemons(): void {
    for (const { name, proc } of this.daemons) {
      if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`${name} exited (${proc.exitCode ?? proc.signalCode}) while starting:\n${this.logTail(name)}`);
    }
  }

  private logTail(name: string): string {
    const f = join(this.dir, "log", `${name}.log`);
    return existsSync(f) ? readFileSync(f, "utf8").split("\n").slice(-30).join("\n") : "(no log)";
  }

  /** Kills the daemons now (SIGKILL: the store is in memory, nothing to shut down cleanly). */
  kill(): void {
    for (const { proc } of this.daemons) if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
  }

  /** Kills every daemon, waits for them to exit, and removes the directory. */
  async stop(): Promise<void> {
    this.kill();
    for (const { proc } of this.daemons.splice(0)) await proc.exited;
    clusters.delete(this);
    rmSync(this.dir, { recursive: true, force: true });
  }
}
