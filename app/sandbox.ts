// The sandbox between a device's acquire phase and its serving (src/sandbox does the lockdown):
// the program decides what crosses the re-exec — the device's acquired resources, the socket
// fds, and every descriptor opened since startup (acquire returns fd numbers inside its plain
// data; the descriptors themselves must survive the execve).
import { readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";
import { SANDBOX_ENV, enterSandbox, ownArgv, resumeSandbox, threadStatuses, type SandboxMode } from "../src/sandbox/index.ts";
export { holdSignals, releaseHeldSignals } from "../src/sandbox/index.ts";
import { runProbe, type ProbeName } from "../src/sandbox/probe.ts";
import type { DeviceDefinition } from "../src/device.ts";
import { log } from "../src/log.ts";
import { libc } from "../ffi/libc.ts";
import { COMPILED } from "./bundle.ts";

/** What the first image hands the re-exec'd one. */
export interface Handover {
  resources: unknown;
  listenFd?: number;
  connectedFd?: number;
  /** Where it serves, for the log line. */
  where: string;
  /** The socket file this process created (removed at exit), if any: bound under a temporary name. */
  ownSocket?: string;
  /** The path it is renamed to by the re-exec'd image, once that image serves. */
  socketPath?: string;
}

const F_GETFD = 1;

/** The descriptors open in this process now (not the one that read the directory: closed since). */
export function openFds(): Set<number> {
  const listed = readdirSync("/proc/self/fd").map(Number).filter((n) => Number.isInteger(n));
  return new Set(listed.filter((fd) => libc.fcntl(fd, F_GETFD, 0) >= 0));
}

/**
 * In the re-exec'd image, stops are recorded from the moment this module is evaluated (before
 * Bun's event loop first turns and could deliver a stop held across the execve with no handler,
 * which would kill the process and leave its socket file): the program's own handlers take over
 * once installed, and takeEarlyStop() tells it about one that came first.
 */
const EARLY_STOP = Symbol.for("vhost-backend.sandbox.early-stop"); // app/sandbox_entry.ts records there too
const earlyStop = globalThis as unknown as Record<symbol, string | undefined>;
if (process.env[SANDBOX_ENV] !== undefined) {
  for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(sig, () => (earlyStop[EARLY_STOP] ??= sig));
}

/** The stop signal that arrived in the re-exec'd image before the program's handlers, if any. */
export function takeEarlyStop(): string | null {
  return earlyStop[EARLY_STOP] ?? null;
}

/** app/main.ts and the re-exec'd image's entry from sources (app/sandbox_entry.ts). */
const MAIN_SOURCE = fileURLToPath(new URL("./main.ts", import.meta.url));
const SANDBOX_ENTRY_SOURCE = fileURLToPath(new URL("./sandbox_entry.ts", import.meta.url));

/**
 * Run from sources, the re-exec'd image starts at app/sandbox_entry.ts (which records a stop held
 * across the execve before Bun's module loading can deliver it unhandled) instead of app/main.ts:
 * this process's argv with that one argument replaced (by its absolute path; the new image's
 * working directory may differ). Unchanged when app/main.ts is not among the arguments.
 */
export function sourcesArgv(argv: readonly string[]): string[] {
  const at = argv.findIndex((a, i) => i > 0 && resolve(a) === MAIN_SOURCE);
  return at < 0 ? [...argv] : argv.with(at, SANDBOX_ENTRY_SOURCE);
}

/**
 * Run from sources, the re-exec'd Bun transpiles the sources again; its runtime transpiler cache
 * (under ~/.bun/install/cache) is not in the sandbox (one failed open per module, and a cache
 * directory it cannot create): turned off in that image.
 */
export const SOURCES_ENV: Readonly<Record<string, string>> = { BUN_RUNTIME_TRANSPILER_CACHE_PATH: "0" };

/** In the re-exec'd image: the hand-over, with seccomp in force. null in the first image. */
export function resumeAfterSandbox(): Handover | null {
  const r = resumeSandbox();
  return r === null ? null : (r.resources as Handover);
}

/** What the program serves beside the device that the sandbox does not cover yet. */
export interface ProgramExtras {
  /** --metrics: an HTTP server the re-exec'd image would have to bind (a socket file or a TCP port). */
  metrics: boolean;
}

/** Why the sandbox cannot apply to this device and program, or null when it will (mode none: "off"). */
export function sandboxOff(def: DeviceDefinition, mode: SandboxMode, extras: ProgramExtras): string | null {
  if (mode === "none") return "--sandbox none";
  if (def.hostAccess === undefined) return `device '${def.name}' declares no host access (DeviceDefinition.hostAccess)`;
  if (extras.metrics) return "--metrics is not served from inside the sandbox yet (give --sandbox none with --metrics)";
  return null;
}

/**
 * Where JSC writes its JITDump file when asked to (BUN_JSC_useJITDump, for perf to name JIT-compiled
 * JavaScript), or null. The re-exec'd image opens it as it starts and aborts when it cannot: a
 * profiled backend declares that directory as one it writes.
 */
function jitDumpDirectory(): string | null {
  const on = process.env.BUN_JSC_useJITDump;
  if (on === undefined || on === "0" || on === "false") return null;
  return resolve(process.env.BUN_JSC_jitDumpDirectory || process.cwd());
}

/**
 * Locks down and re-execs (does not return) unless the mode is none, or in auto mode the device
 * declares nothing or the program serves something the sandbox does not cover yet (then it logs
 * why and returns; strict refuses instead). `before`: descriptors open before the acquire phase
 * (those opened since are kept across the execve, with the socket's).
 */
export function lockDown(def: DeviceDefinition, parsed: unknown, mode: SandboxMode, handover: Handover, before: ReadonlySet<number>, extras: ProgramExtras): void {
  if (mode === "none") return;
  const off = sandboxOff(def, mode, extras);
  if (off !== null) {
    if (mode === "strict") throw new Error(`--sandbox strict: ${off}`);
    log.warn(`sandbox: off: ${off}`);
    return;
  }
  const access = def.hostAccess!(parsed);
  // sd_notify: one datagram to the service manager's socket once ready (src/sd_notify.ts).
  const notify = process.env.NOTIFY_SOCKET;
  const withNotify = notify?.startsWith("/") ? { ...access, unixSockets: [...access.unixSockets, notify] } : access;
  const dumps = jitDumpDirectory();
  const declared = dumps === null ? withNotify : { ...withNotify, paths: [...withNotify.paths, { path: dumps, rights: ["read", "write", "create"] as const, directory: true }] };
  const keep = [...openFds()].filter((fd) => fd > 2 && !before.has(fd));
  for (const fd of [handover.listenFd, handover.connectedFd]) if (fd !== undefined && !keep.includes(fd)) keep.push(fd);
  // Run from sources (`bun app/main.ts`): the re-exec'd Bun reads them, and node_modules.
  const compiled = COMPILED;
  const readPaths = compiled ? [] : [fileURLToPath(new URL("..", import.meta.url))];
  // The socket's directory: the bound name is renamed into place there, and removed at exit.
  const removable = handover.ownSocket === undefined ? [] : [resolve(handover.ownSocket)];
  enterSandbox({
    mode, access: declared, keepFds: keep, resources: handover, readPaths, removable,
    ...(compiled ? {} : { argv: sourcesArgv(ownArgv()), env: SOURCES_ENV }),
  });
}

/**
 * Test-only probe entry (test/unit/sandbox_backend.test.ts): when VHOST_BACKEND_SANDBOX_PROBE
 * holds {probe, unixPath, abstractName, tmpDir}, the backend tries that escape once its device
 * thread is up, prints one `sandbox-probe: JSON` line (the result and every thread's
 * NoNewPrivs/Seccomp/CapEff) and exits. A probe the filter kills prints nothing: the process dies
 * of SIGSYS.
 */
export const PROBE_ENV = "VHOST_BACKEND_SANDBOX_PROBE";

export function runRequestedProbe(): void {
  const raw = process.env[PROBE_ENV];
  if (raw === undefined) return;
  const req = JSON.parse(raw) as { probe: ProbeName | "status"; unixPath: string; abstractName: string; tmpDir: string };
  const results = req.probe === "status" ? [] : [runProbe(req.probe, req)];
  const threads = threadStatuses().map((t) => ({ ...t, capEff: t.capEff.toString(16) }));
  process.stdout.write(`sandbox-probe: ${JSON.stringify({ results, threads })}\n`, () => process.exit(0));
}
