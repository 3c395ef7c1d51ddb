// A throwaway network namespace for net tests: taps, addresses and traffic stay inside it, so
// nothing reaches the host's interfaces or leaves the machine. Needs root (CI runs tests as root).
//
// Network namespaces are per thread. `enter()` moves the calling thread (Bun's JS thread) into the
// namespace with setns(2) for the length of one synchronous callback and always moves it back:
// fds opened inside (tun fds, packet sockets) stay bound to the namespace after we leave it, which
// is exactly what a backend started under `ip netns exec` would hold.
import { openSync, closeSync, readdirSync } from "node:fs";
import { libc, check } from "../../ffi/libc.ts";

const CLONE_NEWNET = 0x40000000;
const NETNS_DIR = "/var/run/netns";
const PREFIX = "vhu-net-";

export interface TapSpec {
  vnetHdr?: boolean;
  multiQueue?: boolean;
  /** Owning uid: others then need CAP_NET_ADMIN to attach (an ownerless tap is open to anyone who can open /dev/net/tun). */
  user?: number;
  /** CIDR address given to the tap inside the namespace, e.g. "10.77.0.1/24". */
  address?: string;
  /** Bring it up (default true): a tap that is down drops what is written to it. */
  up?: boolean;
}

/** Runs a command, throwing with its stderr when it fails. */
export function sh(argv: string[], allowFailure = false): { code: number; out: string; err: string } {
  const p = Bun.spawnSync(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore" });
  const r = { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
  if (r.code !== 0 && !allowFailure) throw new Error(`${argv.join(" ")} failed (${r.code}): ${r.err.trim()}`);
  return r;
}

/** Whether this process may create namespaces and taps (root, /dev/net/tun, iproute2). */
export function netnsAvailable(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    closeSync(openSync("/dev/net/tun", "r+"));
  } catch {
    return false;
  }
  return sh(["ip", "-V"], true).code === 0;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Deletes namespaces left behind by test processes that died before their cleanup ran. */
function removeStale(): void {
  let names: string[] = [];
  try {
    names = readdirSync(NETNS_DIR);
  } catch {
    return;
  }
  for (const n of names) {
    const m = new RegExp(`^${PREFIX}(\\d+)-`).exec(n);
    if (m && !pidAlive(Number(m[1]))) sh(["ip", "netns", "del", n], true);
  }
}

export class NetNamespace {
  private readonly taps: string[] = [];
  private destroyed = false;

  private constructor(readonly name: string) {}

  /** Creates `vhu-net-<pid>-<random>` with loopback up and IPv6 off (no router solicitations or MLD noise on taps). */
  static create(): NetNamespace {
    removeStale();
    const name = `${PREFIX}${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    sh(["ip", "netns", "add", name]);
    const ns = new NetNamespace(name);
    try {
      ns.exec(["ip", "link", "set", "lo", "up"]);
      ns.exec(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
    } catch (e) {
      ns.destroy();
      throw e;
    }
    return ns;
  }

  /** Runs `argv` inside the namespace (`ip netns exec`). */
  exec(argv: string[], allowFailure = false): { code: number; out: string; err: string } {
    return sh(["ip", "netns", "exec", this.name, ...argv], allowFailure);
  }

  /** A persistent tap in the namespace, as an administrator would make it with `ip tuntap add`. */
  addTap(name: string, spec: TapSpec = {}): string {
    const args = ["ip", "-n", this.name, "tuntap", "add", "mode", "tap", "name", name];
    if (spec.vnetHdr ?? true) args.push("vnet_hdr");
    if (spec.multiQueue) args.push("multi_queue");
    if (spec.user !== undefined) args.push("user", String(spec.user));
    sh(args);
    this.taps.push(name);
    if (spec.address !== undefined) sh(["ip", "-n", this.name, "addr", "add", spec.address, "dev", name]);
    if (spec.up ?? true) sh(["ip", "-n", this.name, "link", "set", name, "up"]);
    return name;
  }

  /**
   * Runs `fn` with the calling thread inside the namespace, then moves it back. `fn` must be
   * synchronous: an await would let unrelated work run in the namespace.
   */
  enter<T>(fn: () => T): T {
    const home = openSync("/proc/thread-self/ns/net", "r");
    const target = openSync(`${NETNS_DIR}/${this.name}`, "r");
    try {
      check(libc.setns(target, CLONE_NEWNET), `setns(${this.name})`);
      try {
        const r = fn();
        if (r instanceof Promise) throw new Error("NetNamespace.enter: the callback must be synchronous");
        return r;
      } finally {
        // Failing to get back would leave the test runner in the namespace: make that loud.
        check(libc.setns(home, CLONE_NEWNET), "setns(back to the original namespace)");
      }
    } finally {
      closeSync(target);
      closeSync(home);
    }
  }

  /** Deletes the taps and the namespace. Close every fd opened inside first, or the namespace lingers until they close. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const t of this.taps) sh(["ip", "-n", this.name, "link", "del", t], true);
    const r = sh(["ip", "netns", "del", this.name], true);
    if (r.code !== 0) throw new Error(`could not delete network namespace ${this.name} (the next run removes it): ${r.err.trim()}`);
  }
}
