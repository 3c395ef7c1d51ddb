// The backend under `strace -f` (issue 15): a subprocess `bun app/main.ts device ...` whose every
// open, socket, io_uring and thread creation is logged with its time, thread and resolved path, and
// the check of that log against what the device declared (DeviceDefinition.hostAccess): after the
// backend reported ready, a device opens nothing, creates no socket, no io_uring and no thread
// beyond its declaration.
//
// "Ready" is a time the test takes: when it got the reply to its first request on the first
// connection (the device thread has then created the device and its queue threads). Every traced
// call that started after that time is checked; strace stamps a call when it starts (-ttt, wall
// clock, the same clock as Date.now()).
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { isAbsolute, join, resolve, sep } from "node:path";
import type { Subprocess } from "bun";
import { dlopen, FFIType } from "bun:ffi";
import type { HostAccess, DeclaredPath } from "../../src/host_access.ts";
import { DEVICES } from "../../app/registry.ts";
import { NO_HOST_ACCESS } from "../../src/host_access.ts";

const ROOT = join(import.meta.dir, "../..");
const MAIN = join(ROOT, "app/main.ts");

/** The calls the check is about: opening files, making sockets, io_urings, threads and processes. */
export const TRACED_CALLS = ["open", "openat", "openat2", "socket", "io_uring_setup", "clone", "clone3", "vfork", "fork", "execve"] as const;

export function straceAvailable(): boolean {
  return Bun.spawnSync(["strace", "-V"], { stdout: "ignore", stderr: "ignore" }).exitCode === 0;
}

export interface StracedOptions {
  /** The device's options after `--socket PATH` (`{dir}` becomes the test directory). */
  args: string[];
  /** Argv before strace (e.g. `ip netns exec NAME`): the backend then runs in that context. */
  prefix?: string[];
  /** Extra environment for the backend. */
  env?: Record<string, string>;
  /** The test directory (default: a new one, removed by dispose()). */
  dir?: string;
  /** Log each call's stack too (strace -k): slow, for finding out where a call comes from. */
  stacks?: boolean;
}

/** `strace -f ... bun app/main.ts device <device> --socket <dir>/sock <args>`. */
export class StracedBackend {
  readonly dir: string;
  readonly socketPath: string;
  readonly logPath: string;
  readonly proc: Subprocess<"ignore", "ignore", "pipe">;
  readonly args: string[];
  private readonly ownDir: boolean;
  private stderrText: Promise<string>;

  private constructor(readonly device: string, o: StracedOptions) {
    this.ownDir = o.dir === undefined;
    this.dir = o.dir ?? mkdtempSync(join(tmpdir(), `vhu-strace-${device}-`));
    this.socketPath = join(this.dir, "sock");
    this.logPath = join(this.dir, "strace.log");
    this.args = o.args.map((a) => a.replaceAll("{dir}", this.dir));
    const argv = [
      ...(o.prefix ?? []),
      "strace", "-f", "-ttt", "-y", "-Y", "-qq", ...(o.stacks ? ["-k"] : []), "-e", `trace=${[...TRACED_CALLS, "prctl"].join(",")}`, "-o", this.logPath, "--",
      // STRACE_BACKEND_BIN=dist/backend traces the compiled binary instead of the sources.
      ...(process.env.STRACE_BACKEND_BIN ? [resolve(process.env.STRACE_BACKEND_BIN)] : [process.execPath, MAIN]), "device", device, "--socket", this.socketPath, "--log-level", process.env.TEST_LOG_LEVEL ?? "warn", ...this.args,
    ];
    this.proc = Bun.spawn(argv, { stdin: "ignore", stdout: "ignore", stderr: "pipe", cwd: ROOT, env: { ...(process.env as Record<string, string>), ...o.env } });
    this.stderrText = new Response(this.proc.stderr).text();
  }

  /**
   * Starts the backend under strace and waits until it listens (the socket file appears only then).
   * A probe connection would be a session of its own.
   */
  static async start(device: string, o: StracedOptions): Promise<StracedBackend> {
    const b = new StracedBackend(device, o);
    const deadline = Date.now() + 30_000;
    while (!b.listening()) {
      if (b.proc.exitCode !== null || Date.now() > deadline) {
        b.dispose();
        await b.proc.exited;
        throw new Error(`${device} backend under strace did not listen (exit ${b.proc.exitCode}): ${await b.stderrText}`);
      }
      await Bun.sleep(10);
    }
    return b;
  }

  /**
   * Whether the backend listens: its socket file appears only once it listens (app/main.ts binds
   * and listens under a temporary name, then renames it into place).
   */
  private listening(): boolean {
    return existsSync(this.socketPath);
  }


  /** The traced program's pid: the first process in the log (strace's child, which exec'd bun); null before it exists. */
  backendPid(): number | null {
    let text = "";
    try {
      text = readFileSync(this.logPath, "utf8");
    } catch {
      return null;
    }
    const first = /^(\d+)/.exec(text);
    return first === null ? null : Number(first[1]);
  }

  /** Wall-clock seconds at which stop() sent SIGTERM (the end of the session proper). */
  stoppedAt = Infinity;

  /**
   * SIGTERM to the backend (strace then exits with it); SIGKILL after 5 s. Returns its exit code
   * and stderr. The log is complete afterwards.
   */
  async stop(): Promise<{ code: number | null; stderr: string }> {
    const pid = this.backendPid();
    this.stoppedAt = Date.now() / 1000;
    if (this.proc.exitCode === null && pid !== null) {
      try {
        process.kill(pid, "SIGTERM");
      } catch {
        /* gone already */
      }
      const t = setTimeout(() => this.dispose(), 5000);
      await this.proc.exited;
      clearTimeout(t);
    }
    return { code: this.proc.exitCode, stderr: await this.stderrText };
  }

  log(): TraceEvent[] {
    return parseStraceLog(readFileSync(this.logPath, "utf8"));
  }

  /** Kills the backend, then strace (killed first, strace would leave it running, detached). */
  dispose(): void {
    const pid = this.backendPid();
    if (this.proc.exitCode === null) {
      try {
        if (pid !== null) process.kill(pid, "SIGKILL");
      } catch {
        /* gone */
      }
      this.proc.kill("SIGKILL");
    }
    if (this.ownDir) rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---- the log ----

export interface TraceEvent {
  tid: number;
  /** The thread's name when strace printed the call (-Y). */
  comm: string;
  /** Wall-clock seconds when the call started. */
  time: number;
  call: string;
  /** The argument text as strace printed it (fds decorated with their paths, -y). */
  args: string;
  /** The result text ("3</tmp/x>", "-1 ENOENT (No such file or directory)", "1234<JIT Worklist>"). */
  result: string;
  /** The whole call as one line (resumed calls joined). */
  line: string;
  /** The call's stack (strace -k), innermost first, when traced with stacks. */
  stack: string[];
}

const LINE = /^(\d+)(?:<([^>]*)>)? (\d+\.\d+) (.*)$/;
const CALL = /^([a-z0-9_]+)\((.*)\) += (.*)$/s;
const UNFINISHED = / <unfinished \.\.\.>$/;
const RESUMED = /^<\.\.\. ([a-z0-9_]+) resumed>(.*)$/s;

/**
 * Parses `strace -f -ttt -y -Y` output. A call interrupted by another thread's (`<unfinished ...>`,
 * then `<... NAME resumed>`) becomes one event stamped with its start. Signals and exits are skipped.
 */
export function parseStraceLog(text: string): TraceEvent[] {
  const events: TraceEvent[] = [];
  const pending = new Map<number, { comm: string; time: number; head: string; stack: string[] }>();
  let stack: string[] = []; // where the frames (" > ...") after the last call line go
  for (const raw of text.split("\n")) {
    if (raw.startsWith(" > ")) {
      stack.push(raw.slice(3));
      continue;
    }
    const m = LINE.exec(raw);
    if (m === null) continue;
    stack = [];
    const tid = Number(m[1]);
    const comm = m[2] ?? "";
    const time = Number(m[3]);
    let rest = m[4]!;
    if (rest.startsWith("---") || rest.startsWith("+++")) continue;
    if (UNFINISHED.test(rest)) {
      pending.set(tid, { comm, time, head: rest.replace(UNFINISHED, ""), stack });
      continue;
    }
    let start = time;
    let startComm = comm;
    const r = RESUMED.exec(rest);
    if (r !== null) {
      const p = pending.get(tid);
      pending.delete(tid);
      if (p === undefined) continue;
      rest = p.head + r[2]!;
      start = p.time;
      startComm = p.comm;
      stack = p.stack;
    }
    const c = CALL.exec(rest);
    if (c === null) {
      // A call that never returned (the process exited in it): "NAME(args <unfinished ...>)" or "= ?".
      const name = /^([a-z0-9_]+)\(/.exec(rest);
      if (name) events.push({ tid, comm: startComm, time: start, call: name[1]!, args: rest.slice(name[0].length), result: "?", line: `${tid}<${startComm}> ${start.toFixed(6)} ${rest}`, stack });
      continue;
    }
    events.push({ tid, comm: startComm, time: start, call: c[1]!, args: c[2]!, result: c[3]!, line: `${tid}<${startComm}> ${start.toFixed(6)} ${rest}`, stack });
  }
  for (const [tid, p] of pending) {
    const name = /^([a-z0-9_]+)\(/.exec(p.head);
    if (name) events.push({ tid, comm: p.comm, time: p.time, call: name[1]!, args: p.head.slice(name[0].length), result: "?", line: `${tid}<${p.comm}> ${p.time.toFixed(6)} ${p.head} <unfinished>`, stack: p.stack });
  }
  return events.sort((a, b) => a.time - b.time);
}

/** The first quoted string of `s` (strace's escaping undone for \" and \\). */
function firstString(s: string): string | null {
  const m = /"((?:[^"\\]|\\.)*)"/.exec(s);
  return m === null ? null : m[1]!.replace(/\\(["\\])/g, "$1");
}

/** An fd argument decorated by -y: `3</some/path>` → "/some/path"; AT_FDCWD</cwd> → "/cwd". */
function decoratedPath(s: string): string | null {
  const m = /^(?:AT_FDCWD|-?\d+)<([^>]*)>/.exec(s.trim());
  return m === null ? null : m[1]!;
}

export interface OpenCall {
  /** The absolute path opened (as resolved by the kernel when it succeeded). */
  path: string;
  flags: string[];
  ok: boolean;
}

/** What an open/openat/openat2 event opened. */
export function openedPath(e: TraceEvent): OpenCall | null {
  if (!e.call.startsWith("open")) return null;
  const requested = firstString(e.args);
  if (requested === null) return null;
  const ok = /^\d+/.test(e.result);
  const resolved = ok ? decoratedPath(e.result) : null;
  let path = resolved;
  if (path === null) {
    if (isAbsolute(requested)) path = requested;
    else {
      const base = e.call === "open" ? null : decoratedPath(e.args);
      path = resolve(base ?? ROOT, requested);
    }
  }
  const flagText = e.call === "openat2" ? (/flags=([A-Z_|0-9]+)/.exec(e.args)?.[1] ?? "") : (e.args.split(", ")[e.call === "open" ? 1 : 2] ?? "");
  return { path, flags: flagText.split("|").map((f) => f.trim()), ok };
}

// ---- the check ----

/** A traced call after ready that nothing allowed, and why. */
export interface Offence {
  event: TraceEvent;
  why: string;
}

/**
 * A runtime behaviour (of Bun/JSC, not of our code) that the check tolerates, described precisely
 * enough that nothing else matches it.
 */
export interface RuntimeAllowance {
  kind: "file" | "thread";
  /** What it is and why it cannot be moved before ready. */
  reason: string;
  matches(e: TraceEvent, threadName: (tid: number) => string): boolean;
}

/** The new thread's id from a clone/clone3 result ("1234<name>"), or null (failed, or a fork's child). */
function cloneChild(e: TraceEvent): number | null {
  const m = /^(\d+)/.exec(e.result);
  return m === null || m[1] === "0" ? null : Number(m[1]);
}

/**
 * JSC's helper threads as Bun 1.4 names them (prctl(PR_SET_NAME); Linux keeps 15 bytes and WTF
 * keeps a long name's tail): the heap's collector thread ("JSC Heap Collector Thread"), the
 * parallel GC markers, the JIT compiler threads.
 */
export const JSC_HELPER_THREAD_NAMES = ["ollector Thread", "HeapHelper", "JITWorker"] as const;

/**
 * Environment that turns those helpers off (JSC options through Bun's BUN_JSC_ prefix): the
 * collector runs on the thread that allocates, one marker, compilation on the thread running the
 * code. Only for the test that shows the allowance below is the runtime's and nothing else: it
 * trades GC pauses and compile stalls on the serving thread for them.
 */
export const JSC_HELPER_THREADS_OFF: Record<string, string> = {
  BUN_JSC_useConcurrentGC: "0",
  BUN_JSC_numberOfGCMarkers: "1",
  BUN_JSC_useConcurrentJIT: "0",
};

/**
 * What Bun 1.4 (JavaScriptCore) does after ready in every device, whatever the device does, and
 * why it cannot be done before:
 * - JSC's helper threads are WTF AutomaticThreads: the OS thread is created on the first work
 *   (a GC, a function hot enough to compile), exits after 10 s without work, and is created again
 *   at the next; no JSC option keeps one alive or starts it at VM creation. A warm-up at startup
 *   would only move the first one (measured: a console idle 11 s between sessions re-created its
 *   collector and both JIT threads). JSC_HELPER_THREADS_OFF removes them, at a cost; the test
 *   that uses it allows no thread at all.
 * - Every collection's heap-growth step reads the process's resident size: WTF's
 *   currentProcessMemoryStatus() does fopen("/proc/self/statm", "r") each time (Bun 1.4.5's
 *   WebKit; newer oven-sh/WebKit opens it once and preads). Read-only, that one file.
 */
export const RUNTIME_ALLOWANCES: readonly RuntimeAllowance[] = [
  {
    kind: "file",
    reason: "JSC reads /proc/self/statm at each GC (WTF::currentProcessMemoryStatus, fopen per call)",
    matches: (e) => (e.call === "openat" || e.call === "open") && firstString(e.args) === "/proc/self/statm" && openedPath(e)!.flags.join("|") === "O_RDONLY",
  },
  {
    kind: "thread",
    reason: "JSC's AutomaticThreads (GC collector, GC markers, JIT compilers) start on demand and exit after 10 s idle",
    matches: (e, name) => {
      if (e.call !== "clone3" && e.call !== "clone") return false;
      if (!/CLONE_VM\|CLONE_FS\|CLONE_FILES\|CLONE_SIGHAND\|CLONE_THREAD/.test(e.args)) return false;
      const child = cloneChild(e);
      return child !== null && (JSC_HELPER_THREAD_NAMES as readonly string[]).includes(name(child));
    },
  },
];

function covers(decl: DeclaredPath, path: string): boolean {
  const d = resolve(decl.path);
  return decl.directory ? path === d || path.startsWith(d.endsWith(sep) ? d : d + sep) : path === d;
}

/** Whether `open` is within the declared paths, with the rights its flags need. */
export function openAllowed(open: OpenCall, paths: readonly DeclaredPath[]): string | null {
  const acc = open.flags.includes("O_RDWR") ? ["read", "write"] : open.flags.includes("O_WRONLY") ? ["write"] : ["read"];
  const need = [...acc, ...(open.flags.includes("O_CREAT") ? ["create"] : [])];
  const decls = paths.filter((d) => covers(d, open.path));
  if (decls.length === 0) return `${open.path} is not declared`;
  const have = new Set(decls.flatMap((d) => d.rights));
  // Creating a file that is itself declared (not only its directory) is a write to it.
  if (need.includes("create") && !have.has("create") && decls.some((d) => !d.directory && d.rights.includes("write"))) have.add("create");
  const missing = need.filter((r) => !have.has(r as never));
  return missing.length === 0 ? null : `${open.path} is declared without ${missing.join(", ")} (flags ${open.flags.join("|")})`;
}

const SOCKET_FAMILY = /^(AF_[A-Z0-9]+)/;

/**
 * Every traced call in [since, until) that `access` does not allow. `names` gives a thread's name
 * (for allowances and messages); `allow` lists tolerated runtime behaviours.
 */
export function offences(events: readonly TraceEvent[], window: { since: number; until?: number }, access: HostAccess, allow: readonly RuntimeAllowance[] = [], names: (tid: number) => string = () => "?"): Offence[] {
  const out: Offence[] = [];
  for (const e of events) {
    if (e.time < window.since || e.time >= (window.until ?? Infinity)) continue;
    if (allow.some((a) => a.matches(e, names))) continue;
    let why: string | null = null;
    switch (e.call) {
      case "open":
      case "openat":
      case "openat2": {
        const o = openedPath(e);
        why = o === null ? "an open whose path strace did not show" : openAllowed(o, access.paths);
        break;
      }
      case "socket": {
        const family = SOCKET_FAMILY.exec(e.args)?.[1] ?? "?";
        const inet = family === "AF_INET" || family === "AF_INET6";
        if (family === "AF_UNIX" && access.unixSockets.length > 0) why = null;
        else if (inet && /SOCK_STREAM/.test(e.args) && access.tcp.length > 0) why = null;
        else why = `socket(${family}), and the device declares ${family === "AF_UNIX" ? "no unix sockets" : inet ? (/SOCK_STREAM/.test(e.args) ? "no TCP endpoints" : "no such sockets (only TCP endpoints can be declared)") : "no such sockets"}`;
        break;
      }
      case "io_uring_setup":
        why = "an io_uring created after ready (io_urings are made in acquire)";
        break;
      case "clone":
      case "clone3":
      case "fork":
      case "vfork":
        // The sandbox's filter answers clone3 with ENOSYS so that glibc falls back to clone (whose
        // flags it can check): that attempt starts nothing; the clone that follows is judged.
        if (e.call === "clone3" && /^-1 ENOSYS/.test(e.result)) {
          why = null;
          break;
        }
        // A clone without CLONE_THREAD is a process; no device may fork after ready.
        if (/CLONE_THREAD/.test(e.args) && access.threadsAfterAcquire) why = null;
        else why = /CLONE_THREAD/.test(e.args) ? `a thread started after ready (new thread ${e.result.replace(/^(\d+).*/, "$1")}: ${names(Number.parseInt(e.result))})` : "a process started after ready";
        break;
      case "execve":
        why = "an exec after ready";
        break;
    }
    if (why !== null) out.push({ event: e, why });
  }
  return out;
}

/** The offences as lines for a failure message. */
export function describeOffences(list: readonly Offence[]): string {
  return list.map((o) => `  ${o.event.line}\n    -> ${o.why}`).join("\n");
}

/**
 * The device's declaration for `raw` command-line options, through its definition (the
 * registry's), made under the backend's extra environment `env` (a declaration may follow
 * variables such as XDG_RUNTIME_DIR, as the backend would see them).
 */
export function declaredAccess(device: string, raw: Record<string, unknown>, env: Record<string, string> = {}): HostAccess {
  const def = DEVICES[device];
  if (def === undefined) throw new Error(`unknown device ${device}`);
  // Both environments: Bun's process.env (JS code) and the C one (libasound's getenv, for snd's ALSA probe in parse).
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  const setC = (k: string, v: string | undefined) =>
    v === undefined ? cEnv.unsetenv(Buffer.from(`${k}\0`)) : cEnv.setenv(Buffer.from(`${k}\0`), Buffer.from(`${v}\0`), 1);
  for (const [k, v] of Object.entries(env)) {
    process.env[k] = v;
    setC(k, v);
  }
  try {
    return def.hostAccess?.(def.parse(raw)) ?? NO_HOST_ACCESS;
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
      setC(k, v);
    }
  }
}

const cEnv = dlopen("libc.so.6", {
  setenv: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
  unsetenv: { args: [FFIType.ptr], returns: FFIType.i32 },
}).symbols;

/**
 * Thread id → the name it gave itself (prctl(PR_SET_NAME), traced for this), or the last name
 * strace showed for it. Linux keeps 15 bytes of a name; WTF keeps their tail ("ollector Thread").
 */
export function threadNamesFromLog(events: readonly TraceEvent[]): (tid: number) => string {
  const names = new Map<number, string>();
  for (const e of events) {
    const set = e.call === "prctl" && e.args.startsWith("PR_SET_NAME") ? firstString(e.args) : null;
    if (set !== null) names.set(e.tid, set);
    else if (e.comm !== "" && !names.has(e.tid)) names.set(e.tid, e.comm);
  }
  return (tid) => names.get(tid) ?? "?";
}
