#!/usr/bin/env bun
// `backend`: serves virtio devices to VMMs over vhost-user. The main thread parses the command
// line, creates the socket, handles signals and supervises one worker thread per device.
import { defineCommand, runMain, type ArgsDef } from "citty";
import { existsSync, lstatSync } from "node:fs";
import { DEVICES } from "../devices/index.ts";
import type { DeviceDefinition } from "./device.ts";
import { listenUnix, isListening } from "../ffi/socket.ts";
import { unlink } from "../ffi/io.ts";
import { signal } from "../ffi/eventfd.ts";
import { log, setLogLevel, LOG_LEVELS } from "./log.ts";
import { capabilities } from "./capabilities.ts";
import { repeatedOption } from "./cli_args.ts";
import type { FromWorker, ToWorker } from "./worker.ts";
import pkg from "../package.json" with { type: "json" };

const COMMON_ARGS = {
  socket: { type: "string", description: "Listen for the front-end on this unix socket path" },
  "socket-path": { type: "string", description: "Same as --socket (the vhost-user spec's name)" },
  fd: { type: "string", description: "Use this inherited socket fd (listening or connected) instead of a path" },
  "print-capabilities": { type: "boolean", description: "Print the backend's capabilities as JSON and exit" },
  "log-level": { type: "string", default: "info", description: `Log level: ${Object.keys(LOG_LEVELS).join(", ")}` },
} as const satisfies ArgsDef;

/** Removes a stale socket left by a previous run; refuses to touch anything that is not a socket. */
function prepareSocketPath(path: string): void {
  if (!existsSync(path)) return;
  if (!lstatSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
  unlink(path);
}

async function runDevice(def: DeviceDefinition, args: Record<string, unknown>): Promise<void> {
  setLogLevel(String(args["log-level"] ?? "info"));
  if (args["print-capabilities"]) {
    console.log(JSON.stringify(capabilities(def.name)));
    return;
  }
  const socketPath = (args.socket ?? args["socket-path"]) as string | undefined;
  const sources = [args.socket, args["socket-path"], args.fd].filter((x) => x !== undefined).length;
  if (sources !== 1) throw new Error("give exactly one of --socket PATH, --socket-path PATH or --fd N");
  for (const name of def.repeatable ?? []) {
    if (args[name] !== undefined) args[name] = repeatedOption(process.argv, name);
  }
  def.validate?.(args);

  // citty's parsed args are not structured-cloneable as they are: pass plain data to the worker.
  const options = JSON.parse(JSON.stringify(args)) as Record<string, unknown>;
  const start: ToWorker = { type: "start", device: def.name, options, logLevel: String(args["log-level"]) };
  if (args.fd !== undefined) {
    const fd = Number(args.fd);
    if (!Number.isInteger(fd) || fd < 0) throw new Error(`--fd ${String(args.fd)} is not a file descriptor number`);
    if (isListening(fd)) start.listenFd = fd;
    else start.connectedFd = fd;
  } else {
    prepareSocketPath(socketPath!);
    start.listenFd = listenUnix(socketPath!, 1);
  }
  await supervise(start, socketPath);
}

/** Runs the device worker and ties its life to this process: signals, failures, exit codes. */
function supervise(start: ToWorker, socketPath: string | undefined): Promise<void> {
  const worker = new Worker(new URL("./worker.ts", import.meta.url).href);
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
  process.on("SIGWINCH", () => toWorker({ type: "host-event", name: "resize" }));
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
  return defineCommand({
    meta: { name: def.name, description: def.description },
    args: { ...COMMON_ARGS, ...(def.args as ArgsDef) },
    run: async ({ args }) => {
      try {
        await runDevice(def, args as Record<string, unknown>);
      } catch (e) {
        log.error((e as Error).message);
        process.exit(1);
      }
    },
  });
}

const device = defineCommand({
  meta: { name: "device", description: `Serve one virtio device over vhost-user: ${Object.keys(DEVICES).join(", ")}` },
  subCommands: Object.fromEntries(Object.values(DEVICES).map((d) => [d.name, deviceCommand(d)])),
});

export const main = defineCommand({
  meta: { name: "backend", version: pkg.version, description: "vhost-user device backends (crosvm-style `backend device <type>`)" },
  subCommands: { device },
});

if (import.meta.main) runMain(main);
