// The body of a device's thread: its own epoll loop runs the vhost-user session and the device's
// queues, so the main thread stays free for signals and the CLI (a blocked ffi call there would
// stall Bun's timers and signal handlers, measured here). The program's thread entry file (app/)
// calls serveDeviceThread with the way to find a device's definition, so this library knows no
// device.
import { EventLoop } from "./event_loop.ts";
import { BackendServer } from "./server.ts";
import { log, setLogLevel } from "./log.ts";
import { applyThreadSettings, type ThreadSettings } from "./thread_settings.ts";
import type { DeviceDefinition, VhostUserDevice } from "./device.ts";
import { QueueService } from "./queue_thread.ts";

declare const self: Worker;

export interface WorkerStart {
  type: "start";
  device: string;
  /** Test hook: a module whose default export is the DeviceDefinition to serve. */
  module?: string;
  /** The device's parsed options (DeviceDefinition.parse), plain data. */
  options: unknown;
  /** What the device's acquire() opened, plain data (fds are process-wide). */
  resources: unknown;
  /** The queue threads' entry file (a URL), for QueueService. */
  queueThreadEntry: string;
  listenFd?: number;
  connectedFd?: number;
  logLevel: string;
  /** Log format and device name, the metrics buffer (tests may leave it out: defaults). */
  settings?: ThreadSettings;
  /** Peers allowed to connect (SO_PEERCRED on accept); none given: anyone who can reach the socket. */
  allowUids?: number[];
  allowGids?: number[];
}

export type ToWorker = WorkerStart | { type: "host-event"; name: string } | { type: "stop" };
export type FromWorker =
  | { type: "ready"; wakeFd: number; features: string; queues: number }
  | { type: "fatal"; message: string }
  | { type: "finished" }
  | { type: "stopped" };

/** How a device thread finds the definition of `device` (or of the test module `module`). */
export type DefinitionLookup = (device: string, module: string | undefined) => Promise<DeviceDefinition<any, any> | undefined>;

/** Makes this Worker a device thread. */
export function serveDeviceThread(findDefinition: DefinitionLookup): void {
  let loop: EventLoop | null = null;
  let device: VhostUserDevice | null = null;
  let server: BackendServer | null = null;

  const post = (msg: FromWorker): void => self.postMessage(msg);

  const start = async (msg: WorkerStart): Promise<void> => {
    setLogLevel(msg.logLevel);
    if (msg.settings !== undefined) applyThreadSettings(msg.settings);
    const def = await findDefinition(msg.device, msg.module);
    if (def === undefined) throw new Error(`unknown device '${msg.device}'`);
    loop = new EventLoop();
    const l = loop;
    device = def.create(msg.options, msg.resources, {
      loop: l,
      queueThreadEntry: msg.queueThreadEntry,
      queueService: (o) => {
        if (def.queueRunner === undefined) throw new Error(`device '${def.name}' has no queueRunner for its QueueService`);
        return new QueueService({ ...o, entry: msg.queueThreadEntry, device: def.name, module: msg.module, loop: l, runner: def.queueRunner });
      },
      configChanged: () => void server?.current?.notifyConfigChanged(),
    });
    server = new BackendServer(l, device, {
      identity: { name: def.name, virtioId: def.virtioId },
      listenFd: msg.listenFd,
      connectedFd: msg.connectedFd,
      allowUids: msg.allowUids,
      allowGids: msg.allowGids,
      onFinished: () => post({ type: "finished" }),
    });
    post({ type: "ready", wakeFd: l.wakeFd, features: `0x${device.features().toString(16)}`, queues: device.maxQueues() });
    l.run();
  };

  const stop = (): void => {
    try {
      server?.dispose();
      device?.dispose?.();
    } catch (e) {
      log.error("shutdown:", e);
    }
    loop?.stop();
    post({ type: "stopped" });
  };

  self.onmessage = (ev: MessageEvent<ToWorker>) => {
    const msg = ev.data;
    try {
      if (msg.type === "start") start(msg).catch((e) => post({ type: "fatal", message: (e as Error).message }));
      else if (msg.type === "stop") stop();
      else if (msg.type === "host-event") device?.hostEvent?.(msg.name);
    } catch (e) {
      post({ type: "fatal", message: (e as Error).message });
    }
  };
}
