#!/usr/bin/env bun
// `backend`: serves virtio devices to VMMs over vhost-user. The main thread parses the command
// line, runs the device's acquire phase (everything it will ever open, opened here), creates the
// socket, handles signals and supervises the device's thread. This folder (app/) is the program:
// the only place that knows both the library (src/) and the devices (devices/).
import { defineCommand, runMain, type ArgsDef, type showUsage } from "citty";
import { basename, dirname, join } from "node:path";
import { chmodSync, chownSync, existsSync, lstatSync, renameSync } from "node:fs";
import { DEVICES } from "./registry.ts";
import type { DeviceDefinition, HostSignal } from "../src/device.ts";
import { listenUnix, isListening, unixListenerAlive, MAX_SOCKET_PATH } from "../ffi/socket.ts";
import { fcntl, unlink } from "../ffi/io.ts";
import { libc, errno, errnoName, close, groupId, userId } from "../ffi/libc.ts";
import { signal } from "../ffi/eventfd.ts";
import { log, setLogLevel, setLogFormat, LOG_LEVELS, LOG_FORMATS } from "../src/log.ts";
import { capabilitiesJson } from "../src/capabilities.ts";
import { metrics } from "../src/metrics.ts";
import { parseMetricsAddress, serveMetrics, type MetricsAddress, type MetricsServer } from "../src/metrics_server.ts";
import { notifyReady, notifyStopping } from "../src/sd_notify.ts";
import { threadSettings } from "../src/thread_settings.ts";
import { booleanFromArgv, optionError, repeatedOption, systemdListenFds, SD_LISTEN_FDS_START } from "../src/cli_args.ts";
import { usagePrinter, withUsage } from "./help.ts";
import { checkArgv, type OptionSpec } from "./argv_check.ts";
import type { FromWorker, ToWorker, WorkerStart } from "../src/device_thread.ts";
import { parseSandboxMode, type SandboxMode } from "../src/sandbox/index.ts";
import { holdSignals, lockDown, openFds, releaseHeldSignals, resumeAfterSandbox, sandboxOff, runRequestedProbe, takeEarlyStop, type Handover } from "./sandbox.ts";
import { threadEntry } from "./bundle.ts";
import pkg from "../package.json" with { type: "json" };

export const COMMON_ARGS = {
  socket: { type: "string", valueHint: "PATH", description: "Listen for the front-end on this unix socket path" },
  "socket-path": { type: "string", valueHint: "PATH", description: "Same as --socket (the vhost-user spec's name)" },
  fd: {
    type: "string",
    valueHint: "N",
    description: "Use this inherited socket fd (listening or connected) instead of a path. With no socket option, a socket passed by systemd socket activation (LISTEN_FDS, fd 3) is used",
  },
  "print-capabilities": { type: "boolean", description: "Print the backend's capabilities as JSON and exit" },
  "log-level": { type: "string", valueHint: "LEVEL", default: "info", description: `Log level: ${Object.keys(LOG_LEVELS).join(", ")}` },
  "log-format": {
    type: "string",
    valueHint: LOG_FORMATS.join("|"),
    default: "text",
    description: "Log lines when stderr is not a terminal: text (time level device[session]: message key=value) or json (one object per line); under journald, lines start with their syslog priority",
  },
  metrics: { type: "string", valueHint: "unix:PATH|HOST:PORT", description: "Serve metrics (Prometheus/OpenMetrics text over HTTP) on this unix socket or TCP address" },
  "socket-mode": { type: "string", valueHint: "MODE", description: "Permissions of the --socket file, in octal (as systemd's SocketMode=; default: 0777 less the umask)" },
  "socket-group": { type: "string", valueHint: "GROUP", description: "Group of the --socket file, a name or a number (as systemd's SocketGroup=)" },
  "allow-uid": { type: "string", valueHint: "UID[,UID...]", description: "Serve only front-ends running as these users (names or numbers; checked with SO_PEERCRED on accept)" },
  "allow-gid": { type: "string", valueHint: "GID[,GID...]", description: "Serve only front-ends running with these primary groups (names or numbers); with --allow-uid, either may match" },
  sandbox: {
    type: "string",
    valueHint: "auto|strict|none",
    default: "auto",
    description: "After setup, confine the process to what the device declared (seccomp, Landlock, namespaces when root, no capabilities): auto applies what the host allows and logs the rest, strict refuses to start without every layer, none turns it off",
  },
} as const satisfies ArgsDef;

const SOCKET_SOURCES = "give exactly one of --socket PATH, --socket-path PATH or --fd N, or start from a systemd .socket unit";

/**
 * Removes a stale socket left by a previous run; refuses to touch anything that is not a socket,
 * or a socket something still listens on (unlinking it would leave that backend running but
 * unreachable, and two backends serving one image).
 */
function prepareSocketPath(path: string): void {
  const bytes = Buffer.byteLength(path);
  if (bytes > MAX_SOCKET_PATH) {
    throw new Error(`--socket ${path}: ${bytes} bytes, longer than the ${MAX_SOCKET_PATH} a unix socket path may have: use a shorter (or relative) path, or pass a listening socket with --fd`);
  }
  if (!existsSync(path)) return;
  if (!lstatSync(path).isSocket()) throw new Error(`--socket ${path}: exists and is not a socket`);
  if (unixListenerAlive(path)) throw new Error(`${path} is in use by a running backend (something accepts connections on it); stop it first or choose another --socket`);
  unlink(path);
}

/** A list of users or groups (`--allow-uid qemu,1000`), as numbers; errors name the option. */
function idList(option: string, value: unknown, lookup: (name: string) => number | null): number[] | undefined {
  if (value === undefined) return undefined;
  return String(value).split(",").map((item) => {
    const name = item.trim();
    if (/^[0-9]+$/.test(name) && Number(name) <= 0xffffffff) return Number(name);
    const id = name === "" ? null : lookup(name);
    if (id === null) throw new Error(`--${option} ${String(value)}: no such ${option.endsWith("uid") ? "user" : "group"} '${name}'`);
    return id;
  });
}

/** Who may reach the socket file (--socket-mode, --socket-group): applied between bind and listen. */
function socketPermissions(options: Record<string, unknown>, socketPath: string | undefined): ((path: string) => void) | undefined {
  const mode = options["socket-mode"];
  const group = options["socket-group"];
  if (mode === undefined && group === undefined) return undefined;
  const which = mode !== undefined ? "--socket-mode" : "--socket-group";
  if (socketPath === undefined) throw new Error(`${which}: only for a socket the backend creates (--socket PATH); with --fd or systemd the socket's creator sets it`);
  let m: number | undefined;
  if (mode !== undefined) {
    if (!/^0?[0-7]{3}$/.test(String(mode))) throw new Error(`--socket-mode ${String(mode)}: not an octal mode like 0660`);
    m = parseInt(String(mode), 8);
  }
  const gid = group === undefined ? undefined : idList("socket-group", group, groupId)![0]!;
  return (path) => {
    if (gid !== undefined) chownSync(path, -1, gid);
    if (m !== undefined) chmodSync(path, m);
  };
}

const SOL_SOCKET = 1;
const SO_TYPE = 3;
const SO_ACCEPTCONN = 30;
const SO_DOMAIN = 39;
const AF_UNIX = 1;
const SOCK_STREAM = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/** An int socket option of `fd`, or -errno. */
function intSockOpt(fd: number, opt: number): number {
  const val = new Int32Array(1);
  const len = new Uint32Array([4]);
  return libc.getsockopt(fd, SOL_SOCKET, opt, val, len) < 0 ? -errno() : val[0]!;
}

/**
 * The socket systemd passed (sd_listen_fds): exactly one, at fd 3, a listening unix stream socket
 * (`ListenStream=PATH`, `Accept=no`). Throws a message saying what is wrong with it otherwise.
 */
function activatedSocket(): number {
  const n = systemdListenFds(process.env, process.pid);
  if (n === 0) throw new Error(SOCKET_SOURCES);
  if (n !== 1) throw new Error(`systemd passed ${n} sockets (LISTEN_FDS=${n}); the backend serves one: give its .socket unit a single ListenStream=`);
  const fd = SD_LISTEN_FDS_START;
  const what = `fd ${fd} from systemd (LISTEN_FDS)`;
  const domain = intSockOpt(fd, SO_DOMAIN);
  if (domain < 0) throw new Error(`${what} is not a socket (${errnoName(-domain)})`);
  if (domain !== AF_UNIX || intSockOpt(fd, SO_TYPE) !== SOCK_STREAM) {
    throw new Error(`${what} is not a unix stream socket: the .socket unit needs ListenStream=/path/to/socket`);
  }
  if (intSockOpt(fd, SO_ACCEPTCONN) !== 1) throw new Error(`${what} is a connected socket, not a listening one: the .socket unit needs Accept=no`);
  fcntl(fd, F_SETFD, FD_CLOEXEC); // as sd_listen_fds does: not inherited by anything we exec
  return fd;
}

/** The options the device gets: its own and the common ones, plain data (citty's parsed args are a Proxy). */
function deviceOptions(def: DeviceDefinition, args: Record<string, unknown>, rawArgs: readonly string[]): Record<string, unknown> {
  const defs = { ...COMMON_ARGS, ...(def.args as ArgsDef) } as ArgsDef;
  const options: Record<string, unknown> = {};
  for (const [name, a] of Object.entries(defs)) {
    // Booleans by the one rule for every device (citty reads `--x=off` as on).
    const v = a.type === "boolean" ? (booleanFromArgv(rawArgs, name) ?? args[name]) : args[name];
    if (a.type !== "boolean" && typeof v === "boolean") throw new Error(`--no-${name}: --${name} takes a value, it is not an on/off option`);
    if (v !== undefined) options[name] = v;
  }
  for (const name of def.repeatable ?? []) {
    if (options[name] !== undefined) options[name] = repeatedOption(rawArgs, name);
  }
  return JSON.parse(JSON.stringify(options)) as Record<string, unknown>;
}

async function runDevice(def: DeviceDefinition, args: Record<string, unknown>, rawArgs: readonly string[]): Promise<void> {
  setLogLevel(String(args["log-level"] ?? "info"));
  setLogFormat(String(args["log-format"] ?? "text"));
  log.device = def.name;
  checkArgv(rawArgs, { ...COMMON_ARGS, ...(def.args as ArgsDef) } as Record<string, OptionSpec>);
  const options = deviceOptions(def, args, rawArgs);
  if (options["print-capabilities"] === true) {
    console.log(capabilitiesJson(def.capabilities));
    return;
  }
  // From here a stop (SIGTERM, SIGINT, SIGHUP) must clean up: handlers first, then the socket.
  // Held until serving starts, in this image or in the sandbox's re-exec'd one (app/sandbox.ts).
  holdSignals();
  const life = startLifecycle(def.hostSignals ?? {});
  // A device's own options may name the socket too (crosvm's `--tap-name SOCK,NAME`): it counts
  // as --socket, and must agree with one given as well.
  const named = def.socketPath?.(options) ?? null;
  if (named !== null && options.socket === undefined && options["socket-path"] === undefined) options.socket = named;
  const socketPath = (options.socket ?? options["socket-path"]) as string | undefined;
  const sources = [options.socket, options["socket-path"], options.fd].filter((x) => x !== undefined).length;
  if (sources > 1) throw new Error(SOCKET_SOURCES);
  // The re-exec'd image of a sandboxed start (app/sandbox.ts): acquire and the socket are done.
  const resumed = resumeAfterSandbox() as (Handover & ResolvedPeers) | null;
  const activated = sources === 0 && resumed === null ? activatedSocket() : undefined;
  // User and group names are looked up (NSS: files, LDAP, nscd's socket...) before the sandbox:
  // the re-exec'd image gets the numbers, and its socket's permissions are already set.
  const permissions = resumed === null ? socketPermissions(options, socketPath) : undefined;
  const allowUids = resumed !== null ? resumed.allowUids : idList("allow-uid", options["allow-uid"], userId);
  const allowGids = resumed !== null ? resumed.allowGids : idList("allow-gid", options["allow-gid"], groupId);
  const metricsAddress = options.metrics === undefined ? undefined : parseMetricsAddress(String(options.metrics));
  const parsed = def.parse(options);
  const sandbox = parseSandboxMode(options.sandbox);
  const serving: Serving = { life, permissions, allowUids, allowGids, metricsAddress };
  if (resumed !== null) {
    life.socketPath = resumed.ownSocket;
    if (resumed.ownSocket !== undefined && resumed.socketPath !== undefined && resumed.socketPath !== resumed.ownSocket) {
      // The socket path appears only now, served by this image, its stop handlers in place.
      renameSync(resumed.ownSocket, resumed.socketPath);
      life.socketPath = resumed.socketPath;
    }
    releaseHeldSignals(); // a stop that came during the re-exec is handled from here
    const early = takeEarlyStop();
    if (early !== null) return life.shutdown(early);
    return run(def, startMessage(def, options, parsed, resumed.resources, serving, resumed), resumed.where, serving);
  }
  const before = openFds();
  // A socket another backend serves is refused before this one opens (and locks) anything.
  if (options.fd === undefined && socketPath !== undefined) prepareSocketPath(socketPath);
  const resources = def.acquire?.(parsed);
  try {
    await serve(def, options, parsed, resources, socketPath, activated, serving, sandbox, before);
  } catch (e) {
    if (resources !== undefined) def.release?.(resources);
    throw e;
  }
}

/** --allow-uid/--allow-gid as numbers, handed to the sandbox's re-exec'd image with the rest. */
interface ResolvedPeers {
  allowUids?: number[];
  allowGids?: number[];
}

/** How the process serves, beyond the device: its life, who may connect, where metrics go. */
interface Serving {
  life: Lifecycle;
  permissions: ((path: string) => void) | undefined;
  allowUids: number[] | undefined;
  allowGids: number[] | undefined;
  metricsAddress: MetricsAddress | undefined;
}

/** Past the acquire phase: the socket, then the device's thread. */
async function serve(
  def: DeviceDefinition, options: Record<string, unknown>, parsed: unknown, resources: unknown,
  socketPath: string | undefined, activated: number | undefined,
  serving: Serving, sandbox: SandboxMode, before: ReadonlySet<number>,
): Promise<void> {
  const { life, permissions } = serving;
  const start = startMessage(def, options, parsed, resources, serving, {});
  const extras = { metrics: serving.metricsAddress !== undefined };
  const reexec = sandboxOff(def, sandbox, extras) === null;
  let where: string;
  if (options.fd !== undefined) {
    const fd = Number(options.fd);
    if (!/^[0-9]+$/.test(String(options.fd)) || !Number.isSafeInteger(fd)) throw new Error(`--fd ${String(options.fd)}: not a file descriptor number`);
    let listening: boolean;
    try {
      listening = isListening(fd);
    } catch (e) {
      throw optionError(`--fd ${fd}`, e);
    }
    if (listening) start.listenFd = fd;
    else start.connectedFd = fd;
    where = `fd ${fd}${listening ? "" : " (connected)"}`;
  } else if (socketPath !== undefined) {
    try {
      // Into the sandbox, the path is put in place by the re-exec'd image (see runDevice).
      const listener = listenOn(socketPath, (bound) => {
        life.socketPath = bound; // bound: ours to remove from here on
        permissions?.(bound);
      }, !reexec);
      start.listenFd = listener.fd;
      life.socketPath = listener.bound;
    } catch (e) {
      throw optionError(`--socket ${socketPath}`, e, { ENOENT: "its directory does not exist" });
    }
    where = socketPath;
  } else {
    start.listenFd = activated; // systemd owns that socket and its path: left alone on exit
    where = `fd ${activated} from systemd`;
  }
  // Re-execs into the sandbox unless it is off (does not return then).
  const handover: Handover & ResolvedPeers = {
    resources, listenFd: start.listenFd, connectedFd: start.connectedFd, where, ownSocket: life.socketPath,
    socketPath: options.fd === undefined ? socketPath : undefined,
    allowUids: serving.allowUids, allowGids: serving.allowGids,
  };
  // A stop taken by one of Bun's threads since the handlers were installed waits for a turn of the
  // event loop: let it run here (it exits, removing the socket) rather than lose it in the execve.
  if (reexec) await new Promise((r) => setTimeout(r, 0));
  lockDown(def, parsed, sandbox, handover, before, extras);
  releaseHeldSignals();
  run(def, start, where, serving);
}

function startMessage(
  def: DeviceDefinition, options: Record<string, unknown>, parsed: unknown, resources: unknown, serving: Serving,
  fds: { listenFd?: number; connectedFd?: number },
): WorkerStart {
  return {
    type: "start", device: def.name, options: parsed, resources, logLevel: String(options["log-level"]),
    queueThreadEntry: QUEUE_THREAD_ENTRY, settings: threadSettings(), allowUids: serving.allowUids, allowGids: serving.allowGids,
    listenFd: fds.listenFd, connectedFd: fds.connectedFd,
  };
}

/** Serving: metrics, then the device's thread. */
function run(def: DeviceDefinition, start: WorkerStart, where: string, { life, metricsAddress }: Serving): void {
  if (metricsAddress !== undefined) {
    life.metricsServer = serveMetrics(metricsAddress, metrics());
    log.info(`metrics on ${life.metricsServer.where}`);
  }
  life.supervise(start, (ready) => {
    const status = `listening on ${where} (${def.name}, ${ready.queues} queues, features ${ready.features})`;
    log.info(status);
    notifyReady(status);
    runRequestedProbe(); // test-only (app/sandbox.ts): nothing unless its variable is set
  });
}

/**
 * Listens on `path` so that the path appears only once it is listening: bound and listening under
 * a temporary name beside it, then renamed into place (atomic). A front-end that connects as soon
 * as the file exists (libvirt, a test, a script) otherwise can hit the moment between bind and
 * listen and be refused. Falls back to binding `path` itself when the temporary name would be too
 * long for a socket address.
 */
function listenOn(path: string, beforeListen: (bound: string) => void, rename = true): { fd: number; bound: string } {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  if (Buffer.byteLength(tmp) > MAX_SOCKET_PATH) return { fd: listenUnix(path, 1, () => beforeListen(path)), bound: path };
  const fd = listenUnix(tmp, 1, () => beforeListen(tmp));
  if (!rename) return { fd, bound: tmp };
  try {
    renameSync(tmp, path);
  } catch (e) {
    close(fd);
    unlink(tmp);
    throw e;
  }
  return { fd, bound: path };
}

/** The thread entry files, beside this one (the compiled binary embeds them: see build.ts). */
const DEVICE_THREAD_ENTRY = threadEntry("device_worker.ts");
const QUEUE_THREAD_ENTRY = threadEntry("queue_worker.ts");

type Ready = Extract<FromWorker, { type: "ready" }>;

/**
 * The process's life: stop signals (installed before the socket is bound, so a stop during startup
 * leaves no socket file behind), the device worker, failures and exit codes.
 */
class Lifecycle {
  /** The socket file this process bound (removed on exit); systemd's and --fd sockets are not ours. */
  socketPath: string | undefined;
  metricsServer: MetricsServer | undefined;
  private worker: Worker | null = null;
  private wakeFd = -1;
  private exiting = false;

  constructor(hostSignals: Readonly<Partial<Record<HostSignal, string>>>) {
    for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(sig, () => this.shutdown(sig));
    // Host events the device asked for (console: resize on SIGWINCH; sound: jacks on SIGUSR1/2).
    for (const [sig, name] of Object.entries(hostSignals)) process.on(sig as HostSignal, () => this.toWorker({ type: "host-event", name }));
  }

  private toWorker(msg: ToWorker): void {
    if (this.worker === null) return;
    this.worker.postMessage(msg);
    if (this.wakeFd >= 0) signal(this.wakeFd); // the worker sits in epoll_wait: wake it to read the message
  }

  exit(code: number): never {
    this.metricsServer?.stop();
    if (this.socketPath !== undefined) unlink(this.socketPath);
    process.exit(code);
  }

  shutdown(why: string): void {
    if (this.exiting) return;
    this.exiting = true;
    notifyStopping();
    log.info(`${why}: shutting down`);
    if (this.worker === null) this.exit(0);
    this.toWorker({ type: "stop" });
    // The worker restores host state (terminal modes...) and answers "stopped"; don't wait forever.
    setTimeout(() => this.exit(0), 2000).unref();
  }

  /** Runs the device worker until a signal or the worker ends it. */
  supervise(start: WorkerStart, onReady: (ready: Ready) => void): void {
    const worker = new Worker(DEVICE_THREAD_ENTRY);
    this.worker = worker;
    worker.onmessage = (ev: MessageEvent<FromWorker>) => {
      const msg = ev.data;
      if (msg.type === "ready") {
        this.wakeFd = msg.wakeFd;
        if (this.exiting) this.toWorker({ type: "stop" }); // a stop that came while it started
        else onReady(msg);
      } else if (msg.type === "fatal") {
        log.error(msg.message);
        this.exit(1);
      } else if (msg.type === "finished") this.shutdown("front-end session ended");
      else if (msg.type === "stopped") this.exit(0);
    };
    worker.onerror = (ev) => {
      log.error(`device worker failed: ${ev.message}`);
      this.exit(1);
    };
    worker.postMessage(start);
  }
}

let lifecycle: Lifecycle | null = null;

function startLifecycle(hostSignals: Readonly<Partial<Record<HostSignal, string>>>): Lifecycle {
  lifecycle = new Lifecycle(hostSignals);
  return lifecycle;
}

function deviceCommand(def: DeviceDefinition) {
  const cmd = defineCommand({
    meta: { name: def.name, description: def.description },
    args: { ...COMMON_ARGS, ...(def.args as ArgsDef) },
    run: async ({ args, rawArgs }) => {
      try {
        await runDevice(def, args as Record<string, unknown>, rawArgs);
      } catch (e) {
        log.error((e as Error).message);
        lifecycle?.exit(1); // removes a socket already bound
        process.exit(1);
      }
    },
  });
  return withUsage(cmd, { example: def.example });
}

const device = defineCommand({
  meta: { name: "device", description: `Serve one virtio device over vhost-user: ${Object.keys(DEVICES).join(", ")}` },
  subCommands: Object.fromEntries(Object.entries(DEVICES).map(([name, d]) => [name, deviceCommand(d)])),
});

export const main = defineCommand({
  meta: { name: "backend", version: pkg.version, description: "vhost-user device backends (crosvm-style `backend device <type>`)" },
  subCommands: { device },
});

/**
 * The arguments as `backend ...` takes them. Installed under a vhost-user name (QEMU's convention,
 * `vhost-user-<type>`, e.g. a link /usr/libexec/vhost-user-block -> backend), the binary serves
 * that device: `vhost-user-block --socket-path=S ...` is `backend device block --socket-path=S ...`.
 */
export function cliArgs(argv0: string, args: readonly string[]): string[] {
  const m = /^vhost-user-(.+)$/.exec(basename(argv0));
  const def = m === null ? undefined : Object.values(DEVICES).find((d) => d.capabilities.type === m[1] || d.name === m[1]);
  return def === undefined ? [...args] : ["device", def.name, ...args];
}

/** Runs the command line (the entry point: this file, or app/sandbox_entry.ts in a re-exec'd image run from sources). */
export function runCli(): void {
  // Libraries (citty's usage errors) write to console.error, with colors: make every such line a
  // log event, so it follows the log's rules (one line, no escape codes off a terminal).
  console.error = (...args: unknown[]) => log.error(...args);
  runMain(main, { rawArgs: cliArgs(process.argv0, process.argv.slice(2)), showUsage: usagePrinter(main) as typeof showUsage });
}

if (import.meta.main) runCli();
