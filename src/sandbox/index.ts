// Locks a device process down after its acquire phase, in two stages around one execve (issue 17;
// the measurements behind the order are in the README's sandbox section):
//
//   enterSandbox (the process that acquired): on the main thread, new namespaces (root only),
//   capability bounding set emptied, no_new_privs, Landlock; the fds to keep lose close-on-exec;
//   then execve of our own binary with the acquired resources in an environment variable. The
//   execve ends every other thread, and the new image inherits the main thread's restrictions.
//
//   resumeSandbox (the new image, before it starts serving): reads the resources back, installs
//   the seccomp filter on every thread (TSYNC), and checks /proc/self/task/*/status.
//
// Landlock and namespaces restrict only the calling thread, and an already-threaded process
// cannot take a new user namespace: that is why the exec is needed. Workers started in the new
// image inherit everything.
import { readFileSync, readdirSync } from "node:fs";
import { fcntl } from "../../ffi/io.ts";
import {
  CAP_LAST_KNOWN, CLONE, PR, SECCOMP, SIG_BLOCK, SIG_UNBLOCK, capget, capset, execve, prctl, prctlRaw,
  seccompSetFilter, signalMask, unshare,
} from "../../ffi/seccomp.ts";
import type { HostAccess } from "../host_access.ts";
import { log } from "../log.ts";
import { applyLandlock, declaredGrants, removalGrants, runtimeGrants, tcpPorts } from "./landlock.ts";
import { enterEmptyRoot, keptFiles, rootPlan } from "./mount_ns.ts";
import { buildPolicy, keptCapabilities } from "./policy.ts";
import { compileFilter } from "./seccomp_filter.ts";

export type SandboxMode = "auto" | "strict" | "none";
export const SANDBOX_MODES: readonly SandboxMode[] = ["auto", "strict", "none"];

/** The environment variable that carries the second stage's input across the execve. */
export const SANDBOX_ENV = "VHOST_BACKEND_SANDBOX";

export function parseSandboxMode(v: unknown): SandboxMode {
  const s = String(v ?? "auto");
  if (!(SANDBOX_MODES as readonly string[]).includes(s)) throw new Error(`--sandbox ${s}: give auto, strict or none`);
  return s as SandboxMode;
}

export interface SandboxRequest {
  mode: SandboxMode;
  access: HostAccess;
  /** Descriptors the new image serves with (the listener, a disk, taps...): inherited across execve. */
  keepFds: readonly number[];
  /** The acquired resources, plain data (fd numbers among them): handed to the new image as JSON. */
  resources: unknown;
  /** The executable to re-exec (process.execPath) and its arguments (this process's argv). */
  execPath?: string;
  argv?: readonly string[];
  /** Variables set (or replaced) in the new image's environment, beyond this process's. */
  env?: Readonly<Record<string, string>>;
  /** Extra read-only paths for the runtime (sources when not compiled). */
  readPaths?: readonly string[];
  /**
   * Files the process removes at exit (the socket path it created). Landlock grants removal per
   * directory, so any file in their directories becomes removable (not readable or writable).
   */
  removable?: readonly string[];
}

/** What crossed the execve. */
interface Stage2 {
  mode: SandboxMode;
  access: HostAccess;
  keepFds: number[];
  resources: unknown;
  removable: string[];
  applied: string[];
  missing: string[];
}

export interface SandboxResult {
  resources: unknown;
  keepFds: number[];
  /** Layers in force, and those that could not be applied (auto mode). */
  applied: string[];
  missing: string[];
}

/** Fails in strict mode, logs in auto mode. */
function shortfall(mode: SandboxMode, missing: string[], what: string): void {
  missing.push(what);
  if (mode === "strict") throw new Error(`--sandbox strict: ${what}`);
}

/** This process's argv as the kernel has it (a compiled binary's process.argv is rewritten). */
export function ownArgv(): string[] {
  const raw = readFileSync("/proc/self/cmdline", "utf8");
  return raw.split("\0").slice(0, -1);
}

const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/**
 * Stage one. With mode "none" returns the resources unchanged; otherwise does not return (the
 * process becomes the new image) or throws (strict mode, or a failed execve).
 */
export function enterSandbox(req: SandboxRequest): SandboxResult | never {
  if (req.mode === "none") return { resources: req.resources, keepFds: [...req.keepFds], applied: [], missing: ["sandbox off (--sandbox none)"] };
  const applied: string[] = [];
  const missing: string[] = [];
  const root = process.getuid?.() === 0;
  const argv = req.argv ?? ownArgv();
  const execPath = req.execPath ?? process.execPath;

  // Namespaces first: they need CAP_SYS_ADMIN, which goes next. The mount namespace is this
  // thread's own (the other threads keep the host's until the execve ends them).
  let mountNs = false;
  if (root) {
    const flags = CLONE.NEWNS | CLONE.NEWIPC | CLONE.NEWUTS | (req.access.hostNetwork ? 0 : CLONE.NEWNET);
    try {
      unshare(flags);
      applied.push(req.access.hostNetwork ? "namespaces(mnt,ipc,uts)" : "namespaces(mnt,net,ipc,uts)");
      mountNs = true;
    } catch (e) {
      shortfall(req.mode, missing, `namespaces: ${(e as Error).message}`);
    }
  } else {
    shortfall(req.mode, missing, "namespaces: not root");
  }
  // The empty root, before Landlock: its rules are taken on the paths of the new root.
  if (mountNs) {
    try {
      const r = enterEmptyRoot(rootPlan({ execPath, access: req.access, readPaths: req.readPaths, removable: req.removable, kept: keptFiles(req.keepFds) }));
      applied.push(`empty root(${r.bound.length} binds, /proc ${r.proc})`);
      for (const s of r.skipped) log.debug(`sandbox: not in the new root (absent): ${s}`);
    } catch (e) {
      shortfall(req.mode, missing, `empty mount namespace: ${(e as Error).message}`);
    }
  } else {
    log.info("sandbox: no empty mount namespace (not root): Landlock alone confines the filesystem");
    missing.push("empty mount namespace (not root; Landlock confines the filesystem)");
  }

  // Capabilities: an empty bounding set means the execve grants none, even to root (but those a
  // declared group keeps: the net device's CAP_NET_ADMIN).
  const kept = keptCapabilities(req.access);
  try {
    for (let cap = 0; cap <= CAP_LAST_KNOWN; cap++) {
      if (kept.includes(cap)) continue;
      const r = prctlRaw(PR.CAPBSET_DROP, cap);
      if (r < 0 && r !== -22 /* EINVAL: a capability this kernel does not know */) throw new Error(`PR_CAPBSET_DROP ${cap}: errno ${-r}`);
    }
    prctlRaw(PR.CAP_AMBIENT, PR.CAP_AMBIENT_CLEAR_ALL);
    const caps = capget();
    capset({ effective: caps.effective, permitted: caps.permitted, inheritable: 0n });
    applied.push(kept.length === 0 ? "capabilities" : `capabilities(kept: ${kept.join(",")})`);
  } catch (e) {
    if (root) shortfall(req.mode, missing, `capabilities: ${(e as Error).message}`);
    else applied.push("capabilities"); // not root and no file capabilities: nothing to drop
  }

  prctl(PR.SET_NO_NEW_PRIVS, 1);
  applied.push("no_new_privs");

  const ll = applyLandlock(
    [...runtimeGrants({ execPath, pid: process.pid, readPaths: req.readPaths }), ...declaredGrants(req.access), ...removalGrants(req.removable ?? [])],
    tcpPorts(req.access),
  );
  if (ll.enforced.length > 0) applied.push(`landlock(abi ${ll.abi}: ${ll.enforced.join(",")})`);
  for (const m of ll.missing) shortfall(req.mode, missing, `landlock: ${m}`);
  for (const s of ll.skipped) log.debug(`sandbox: landlock rule skipped: ${s}`);

  for (const fd of req.keepFds) fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) & ~FD_CLOEXEC);
  const stage2: Stage2 = { mode: req.mode, access: req.access, keepFds: [...req.keepFds], resources: req.resources, removable: [...(req.removable ?? [])], applied, missing };
  const env = Object.entries({ ...process.env, ...req.env })
    .filter(([k, v]) => k !== SANDBOX_ENV && v !== undefined)
    .map(([k, v]) => `${k}=${v}`);
  env.push(`${SANDBOX_ENV}=${JSON.stringify(stage2)}`);
  // Signals that stop the process or that it handles stay pending across the execve (the mask
  // survives it) until the new image has its handlers (holdSignals, releaseHeldSignals).
  holdSignals();
  return execve(execPath, argv, env);
}

/** SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGTERM, SIGWINCH: held from just before the execve. */
const HELD_SIGNALS = [1, 2, 10, 12, 15, 28];

/**
 * Keeps those signals pending from now on. Called before the program installs its handlers and
 * binds its socket: a stop that arrives while the first image runs towards its execve would
 * otherwise be taken by that image's handler (and forgotten with it), or kill the new image
 * before it has handlers (leaving the socket file behind).
 */
export function holdSignals(): void {
  signalMask(SIG_BLOCK, HELD_SIGNALS);
}

/**
 * Once the handlers are installed and the program knows what to clean up on a stop (the first
 * image when it serves without the execve, the re-exec'd one otherwise): delivers what arrived
 * in between and lets those signals through again.
 */
export function releaseHeldSignals(): void {
  signalMask(SIG_UNBLOCK, HELD_SIGNALS);
}

/** True in the image enterSandbox exec'd (before resumeSandbox consumed the hand-over). */
export function inSandboxStage2(): boolean {
  return process.env[SANDBOX_ENV] !== undefined;
}

/**
 * Stage two: null when this process was not exec'd by enterSandbox. Otherwise installs the
 * seccomp filter on every thread, verifies the result, logs what is in force, and returns the
 * resources. Throws (strict) when a layer is missing.
 */
export function resumeSandbox(): SandboxResult | null {
  const raw = process.env[SANDBOX_ENV];
  if (raw === undefined) return null;
  delete process.env[SANDBOX_ENV];
  const s = JSON.parse(raw) as Stage2;
  for (const fd of s.keepFds) fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
  const policy = buildPolicy(s.access, { pid: process.pid, openAllowed: true, unlinkAllowed: s.removable.length > 0 });
  const r = seccompSetFilter(compileFilter(policy), SECCOMP.FILTER_FLAG_TSYNC);
  if (r !== 0) throw new Error(`seccomp: thread ${r} could not be synchronized`);
  s.applied.push("seccomp");
  const capMask = root() ? keptCapabilities(s.access).reduce((m, c) => m | (1n << BigInt(c)), 0n) : 0n;
  const bad = threadsNotConfined(capMask);
  if (bad.length > 0) shortfall(s.mode, s.missing, `threads not confined: ${bad.join("; ")}`);
  log.info(`sandbox: ${s.applied.join(", ")}`);
  for (const m of s.missing) log.warn(`sandbox: not applied: ${m}`);
  return { resources: s.resources, keepFds: s.keepFds, applied: s.applied, missing: s.missing };
}

export interface ThreadStatus {
  tid: number;
  noNewPrivs: number;
  seccomp: number;
  capEff: bigint;
}

/** NoNewPrivs, Seccomp and CapEff of every thread of process `pid` (/proc/PID/task/*\/status). */
export function threadStatuses(pid: number | "self" = "self"): ThreadStatus[] {
  const dir = `/proc/${pid}/task`;
  return readdirSync(dir).map((tid) => {
    const status = readFileSync(`${dir}/${tid}/status`, "utf8");
    const field = (name: string) => /^(\S+):\s*(\S+)/m.exec(status.split("\n").find((l) => l.startsWith(`${name}:`)) ?? "")?.[2] ?? "";
    return { tid: Number(tid), noNewPrivs: Number(field("NoNewPrivs")), seccomp: Number(field("Seccomp")), capEff: BigInt(`0x${field("CapEff") || "0"}`) };
  });
}

const root = () => process.getuid?.() === 0;

/** Threads without no_new_privs, the filter, or with capabilities beyond `capMask`. */
function threadsNotConfined(capMask: bigint): string[] {
  return threadStatuses()
    .filter((t) => t.noNewPrivs !== 1 || t.seccomp !== 2 || (t.capEff & ~capMask) !== 0n)
    .map((t) => `tid ${t.tid}: NoNewPrivs ${t.noNewPrivs}, Seccomp ${t.seccomp}, CapEff ${t.capEff.toString(16)}`);
}
