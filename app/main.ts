#!/usr/bin/env bun
// `backend`: serves virtio devices to VMMs over vhost-user. The main thread parses the command
// line, runs the device's acquire phase (everything it will ever open, opened here), creates the
// socket, handles signals and supervises the device's thread. This folder (app/) is the program:
// the only place that knows both the library (src/) and the devices (devices/).
import { defineCommand, runMain, type ArgsDef, type showUsage } from "citty";
import { existsSync, lstatSync } from "node:fs";
import { DEVICES } from "./registry.ts";
import type { DeviceDefinition, HostSignal } from "../src/device.ts";
import { listenUnix, isListening, unixListenerAlive } from "../ffi/socket.ts";
import { fcntl, unlink } from "../ffi/io.ts";
import { libc, errno, errnoName } from "../ffi/libc.ts";
import { signal } from "../ffi/eventfd.ts";
import { log, setLogLevel, LOG_LEVELS } from "../src/log.ts";
import { booleanFromArgv, repeatedOption, systemdListenFds, SD_LISTEN_FDS_START } from "../src/cli_args.ts";
import { usagePrinter, withUsage } from "./help.ts";
import { checkArgv, type OptionSpec } from "./argv_check.ts";
import type { FromWorker, ToWorker, WorkerStart } from "../src/device_thread.ts";
import pkg from "../package.json" with { type: "json" };

const COMMON_ARGS = {
  socket: { type: "string", valueHint: "PATH", description: "Listen for the front-end on this unix socket path" },
  "socket-path": { type: "string", valueHint: "PATH", description: "Same as --socket (the vhost-user spec's name)" },
  fd: {
    type: "string",
    valueHint: "N",
    description: "Use this inherited socket fd (listening or connected) instead of a path. With no socket option, a socket passed by systemd socket activation (LISTEN_FDS, fd 3) is used",
  },
  "print-capabilities": { type: "boolean", description: "Print the backend's capabilities as JSON and exit" },
  "log-level": { type: "string", valueHint: "LEVEL", default: "info", description: `Log level: ${Object.keys(LOG_LEVELS).join(", ")}` },
} as const satisfies ArgsDef;

const SOCKET_SOURCES = "give exactly one of --socket PATH, --socket-path PATH or --fd N, or start from a systemd .socket unit";

/**
 * Removes a stale socket left by a previous run; refuses to touch anything that is not a socket,
 * or a socket something still listens on (unlinking it would leave that backend running but
 * unreachable, and two backends serving one image).
 */
function prepareSocketPath(path: string): void {
  if (!existsSync(path)) return;
  if (!lstatSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
  if (unixListenerAlive(path)) throw new Error(`${path} is in use by a running backend (something accepts connections on it); stop it first or choose another --socket`);
  unlink(path);
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
  checkArgv(rawArgs, { ...COMMON_ARGS, ...(def.args as ArgsDef) } as Record<string, OptionSpec>);
  const options = deviceOptions(def, args, rawArgs);
  if (options["print-capabilities"] === true) {
    console.log(JSON.stringify({ type: def.capabilities.type, features: def.capabilities.features }));
    return;
  }
  // A device's own options may name the socket too (crosvm's `--tap-name SOCK,NAME`): it counts
  // as --socket, and must agree with one given as well.
  const named = def.socketPath?.(options) ?? null;
  if (named !== null && options.socket === undefined && options["socket-path"] === undefined) options.socket = named;
  const socketPath = (options.socket ?? options["socket-path"]) as string | undefined;
  const sources = [options.socket, options["socket-path"], options.fd].filter((x) => x !== undefined).length;
  if (sources > 1) throw new Error(SOCKET_SOURCES);
  const activated = sources === 0 ? activatedSocket() : undefined;
  const parsed = def.parse(options);
  // A socket another backend serves is refused before this one opens (and locks) anything.
  if (options.fd === undefined && socketPath !== undefined) prepareSocketPath(socketPath);
  const resources = def.acquire?.(parsed);
  try {
    await serve(def, options, parsed, resources, socketPath, activated);
  } catch (e) {
    if (resources !== undefined) def.release?.(resources);
    throw e;
  }
}

/** Past the acquire phase: the socket, then the device's thread. */
async function serve(
  def: DeviceDefinition, options: Record<string, unknown>, parsed: unknown, resources: unknown,
  socketPath: string | undefined, activated: number | undefined,
): Promise<void> {
  const start: WorkerStart = {
    type: "start", device: def.name, options: parsed, resources, logLevel: String(options["log-level"]),
    queueThreadEntry: QUEUE_THREAD_ENTRY,
  };
  if (options.fd !== undefined) {
    const fd = Number(options.fd);
    if (!/^[0-9]+$/.test(String(options.fd)) || !Number.isSafeInteger(fd)) throw new Error(`--fd ${String(options.fd)} is not a file descriptor number`);
    if (isListening(fd)) start.listenFd = fd;
    else start.connectedFd = fd;
  } else if (socketPath !== undefined) {
    start.listenFd = listenUnix(socketPath, 1);
  } else {
    start.listenFd = activated; // systemd owns that socket and its path: left alone on exit
  }
  await supervise(start, socketPath, def.hostSignals ?? {});
}

/** The thread entry files, beside this one (the compiled binary embeds them: see build.ts). */
const DEVICE_THREAD_ENTRY = new URL("./device_worker.ts", import.meta.url).href;
const QUEUE_THREAD_ENTRY = new URL("./queue_worker.ts", import.meta.url).href;

/** Runs the device worker and ties its life to this process: signals, failures, exit codes. */
function supervise(start: WorkerStart, socketPath: string | undefined, hostSignals: Readonly<Partial<Record<HostSignal, string>>>): Promise<void> {
  const worker = new Worker(DEVICE_THREAD_ENTRY);
  let wakeFd = -1;
  let exiting = false;
  const toWorker = (msg: ToWorker) => {
    worker.postMessage(msg);
    if (wakeFd >= 0) signal(wakeFd); // the worker sits in epoll_wait: wake it to read the message
  };
  const exit = (code: number) => {
    if (socketPath !== undefined) unlink(socketPath);
    process.exit(code);
  };
  const shutdown = (why: string) => {
    if (exiting) return;
    exiting = true;
    log.info(`${why}: shutting down`);
    toWorker({ type: "stop" });
    // The worker restores host state (terminal modes...) and answers "stopped"; don't wait forever.
    setTimeout(() => exit(0), 2000).unref();
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
  // Host events the device asked for (console: resize on SIGWINCH; sound: jacks on SIGUSR1/2).
  for (const [sig, name] of Object.entries(hostSignals)) process.on(sig as HostSignal, () => toWorker({ type: "host-event", name }));
  worker.onmessage = (ev: MessageEvent<FromWorker>) => {
    const msg = ev.data;
    if (msg.type === "ready") wakeFd = msg.wakeFd;
    else if (msg.type === "fatal") {
      log.error(msg.message);
      exit(1);
    } else if (msg.type === "finished") shutdown("front-end session ended");
    else if (msg.type === "stopped") exit(0);
  };
  worker.onerror = (ev) => {
    log.error(`device worker failed: ${ev.message}`);
    exit(1);
  };
  worker.postMessage(start);
  return new Promise(() => {}); // runs until a signal or the worker ends it
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

if (import.meta.main) runMain(main, { showUsage: usagePrinter(main) as typeof showUsage });
