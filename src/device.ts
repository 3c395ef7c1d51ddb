// The contract between the common vhost-user handler and one device (crosvm's VhostUserDevice).
// The handler owns the protocol, memory and ring bookkeeping; a device owns only its queues'
// meaning and its host-side resources.
//
// Threads. Every VhostUserDevice method is called on the device thread (the worker that owns the
// vhost-user socket, src/device_thread.ts), one at a time, from the handler. A device that serves its
// queues in parallel does so through a QueueRunner per queue thread (src/queue_thread.ts); the
// runner's methods are called on its own thread. A throw from any method is reported and
// contained: from a request handler, the front-end gets an error reply and the session goes on;
// from startQueue, the ring stays stopped; from a runner, that ring is not served.
import type { EventLoop } from "./event_loop.ts";
import type { Capabilities } from "./capabilities.ts";
import type { VirtqueueConfig, RingPosition } from "./ring.ts";
import type { GuestMemory } from "./memory.ts";
import type { HostAccess } from "./host_access.ts";
import type { QueueService, QueueServiceOptions } from "./queue_thread.ts";

export type { VirtqueueConfig, RingPosition };

/** What a device may ask of the backend that hosts it. */
export interface DeviceContext {
  /** The worker's event loop, for host-side fds (terminals, files, sockets). */
  loop: EventLoop;
  /** Tells the front-end to re-read the config space (BACKEND_CONFIG_CHANGE_MSG), if it can be told. */
  configChanged(): void;
  /** The queue threads' entry file (a URL) for QueueService: the program's, which knows the devices. */
  queueThreadEntry: string;
  /**
   * Where this device's queues run: its definition's queueRunner, in this thread (threads = 0) or
   * in `threads` queue threads spawned now (queue i in thread threadOf(i), default i % threads).
   */
  queueService(o: QueueServicePlacement): QueueService;
}

/** What a device says about where its queues run (the rest of QueueServiceOptions comes from its definition). */
export type QueueServicePlacement = Pick<QueueServiceOptions, "options" | "threads" | "threadOf">;

/** Who a device is: stated once, on its DeviceDefinition; the handler puts it in snapshots. */
export interface DeviceIdentity {
  /** Short name used on the command line and in snapshots ("console", "block"...). */
  readonly name: string;
  /** Virtio device id (3 console, 2 block, 1 net, 25 sound). */
  readonly virtioId: number;
}

export interface VhostUserDevice {
  maxQueues(): number;
  /** Virtio feature bits offered (the handler adds VHOST_USER_F_PROTOCOL_FEATURES). */
  features(): bigint;
  /** Features the driver acked (always a subset of features()). */
  ackFeatures(features: bigint): void;
  /** Protocol features this device adds to the handler's own set. */
  protocolFeatures(): bigint;
  /** Config space bytes [offset, offset+size), or null if that range is not in the config space. */
  readConfig(offset: number, size: number): Uint8Array | null;
  /** Writes to the config space; false refuses (read-only field or out of range). */
  writeConfig(offset: number, data: Uint8Array): boolean;
  /**
   * The ring is started and enabled: serve it from now on. `ring` is plain data; the device (or
   * the queue thread it hands the ring to) builds its Virtqueue over `mem` and watches
   * ring.kickFd. `ackedFeatures` are the driver's features at this start (a reset may renegotiate
   * others before the next). `mem` stays mapped until stopQueue returns.
   */
  startQueue(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void;
  /**
   * Stops serving the ring and returns where it stopped. Requests in flight must be complete and
   * published before this returns, so the position is final (nextAvail becomes GET_VRING_BASE's
   * answer). Null when the ring was not running here.
   */
  stopQueue(index: number): RingPosition | null;
  /** Back to the power-on state (rings are already stopped). */
  reset(): void;
  /** All rings are stopped: nothing may touch guest memory until a ring starts again. */
  enterSuspendedState(): void;
  /** Device state as plain data (CBOR-encodable), taken while suspended. */
  snapshot(): unknown;
  /**
   * Validates `state` completely, then applies it together with `ackedFeatures` (the driver's
   * features, which the snapshot envelope carries: a device's own state never repeats them, and
   * the handler does not ack them separately); throws, changing nothing, if it does not fit.
   */
  restore(state: unknown, ackedFeatures: bigint): void;
  /** SEND_RARP (protocol feature RARP): announce the guest's MAC on the host side after migration. */
  sendRarp?(mac: Uint8Array): void;
  /** NET_SET_MTU (protocol feature NET_MTU): the MTU the front-end configured. */
  setMtu?(mtu: number): void;
  /** A host event forwarded from the main thread (e.g. "resize" on SIGWINCH). */
  hostEvent?(name: string): void;
  /** Releases host resources at process exit. */
  dispose?(): void;
}

/** Feature bit `n` (the spec numbers them) as a mask of the 64-bit feature word. */
export const featureBit = (n: number): bigint => 1n << BigInt(n);

export const VIRTIO_F_INDIRECT_DESC = 1n << 28n;
export const VIRTIO_F_EVENT_IDX = 1n << 29n;
export const VIRTIO_F_VERSION_1 = 1n << 32n;
export const VIRTIO_F_RING_PACKED = 1n << 34n;

/** The ring features every device here supports through the common Virtqueue. */
export const COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX;

/** Host signals a device may ask to be told about (forwarded to VhostUserDevice.hostEvent). */
export type HostSignal = "SIGWINCH" | "SIGUSR1" | "SIGUSR2";

/**
 * A device built from command-line options, in a fixed order (crosvm opens in the parent, then
 * jails): `parse(raw)` checks the options and returns them as plain data; `acquire(options)`, in
 * the main thread before anything is served, opens every fd the device will ever need (images,
 * taps, io_urings, host files) and returns them as plain, structured-cloneable data (fds are
 * process-wide); `create(options, resources, ctx)` builds the device in its thread from those,
 * and spawns its queue threads. From then on until exit the device opens nothing, creates no
 * socket and starts no thread beyond what `hostAccess(options)` declares (the sandbox turns that
 * declaration into its rules; the strace tests hold every device to it).
 */
export interface DeviceDefinition<Options = any, Resources = any> {
  /** `backend device <name>`; also the key in the registry (app/registry.ts) and the snapshot's device name. */
  name: string;
  /** Virtio device id (1 net, 2 block, 3 console, 25 sound); the same as the created device's virtioId. */
  virtioId: number;
  description: string;
  /**
   * What `--print-capabilities` prints (vhost-user spec, "Backend program conventions"; QEMU's
   * schema, see src/capabilities.ts): the backend type and, for types whose schema entry lists
   * features, the optional command-line features the device supports.
   */
  capabilities: Capabilities;
  /** One typical command line, the arguments after `backend device <name>`; shown at the end of `--help`. */
  example: readonly string[];
  /** citty argument definitions for `backend device <name>`. */
  args: Record<string, unknown>;
  /** Options that may be given more than once; they arrive as arrays of strings. */
  repeatable?: string[];
  /** Host signals the device acts on, and the host event each becomes (console: SIGWINCH → "resize"). */
  hostSignals?: Readonly<Partial<Record<HostSignal, string>>>;
  /**
   * The vhost-user socket path the device's own options name, if any (crosvm's `SOCK,...` option
   * forms); throws when they disagree with --socket/--fd. Called in the main thread first.
   */
  socketPath?(raw: Record<string, unknown>): string | null;
  /** Checks the raw command-line options and returns them parsed, as plain data; throws on bad ones. */
  parse(raw: Record<string, unknown>): Options;
  /** Opens everything the device needs, in the main thread, before serving; plain data. Undefined: nothing. */
  acquire?(options: Options): Resources;
  /** Closes what acquire opened, when startup fails after it. */
  release?(resources: Resources): void;
  /** What the device may still open or connect to after acquire (default: nothing). */
  hostAccess?(options: Options): HostAccess;
  /** Builds the device inside its thread from its options and acquired resources. */
  create(options: Options, resources: Resources, ctx: DeviceContext): VhostUserDevice;
  /**
   * Builds the runner for one queue thread (see QueueRunner). Called on that thread with the
   * options the device passed to its QueueService; the thread finds it through the registry.
   */
  queueRunner?: (options: unknown, loop: EventLoop) => QueueRunner;
}

/**
 * Serves the queues one thread is given (rust-vmm's per-thread backend handler). Created once per
 * thread, it may keep state all its queues share as fields (block: one image fd; net: a tap queue
 * for an rx/tx pair). All methods run on that thread, one at a time.
 */
export interface QueueRunner {
  /**
   * Builds a Virtqueue from `ring` over `mem` and serves it on the thread's loop until stop.
   * A throw leaves the ring unserved (logged); the thread goes on serving its other queues.
   */
  start(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void;
  /** Stops queue `index`, completing what is in flight; returns its final position (null if not running). */
  stop(index: number): RingPosition | null;
  /** The thread is ending: release shared host resources. */
  dispose?(): void;
}
