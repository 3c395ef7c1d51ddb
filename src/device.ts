// The contract between the common vhost-user handler and one device (crosvm's VhostUserDevice).
// The handler owns the protocol, memory and ring bookkeeping; a device owns only its queues'
// meaning and its host-side resources.
import type { EventLoop } from "./event_loop.ts";
import type { Virtqueue } from "./virtqueue.ts";
import type { GuestMemory } from "./memory.ts";
import type { QueueRunnerModule } from "./queue_thread.ts";

/** What a device may ask of the backend that hosts it. */
export interface DeviceContext {
  /** The worker's event loop, for host-side fds (terminals, files, sockets). */
  loop: EventLoop;
  /** Tells the front-end to re-read the config space (BACKEND_CONFIG_CHANGE_MSG), if it can be told. */
  configChanged(): void;
}

export interface VhostUserDevice {
  /** Short name used on the command line and in snapshots ("console", "block"...). */
  readonly name: string;
  /** Virtio device id (3 console, 2 block, 1 net, 25 sound). */
  readonly virtioId: number;
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
  /** The ring is started and enabled: process it from now on (watch queue.kickFd). */
  startQueue(queue: Virtqueue, mem: GuestMemory): void;
  /**
   * Stops processing the ring. In-flight requests must be completed before this returns, so
   * queue.nextAvail is final (it becomes GET_VRING_BASE's answer).
   */
  stopQueue(index: number): void;
  /** Back to the power-on state (rings are already stopped). */
  reset(): void;
  /** All rings are stopped: nothing may touch guest memory until a ring starts again. */
  enterSuspendedState(): void;
  /** Device state as plain data (CBOR-encodable), taken while suspended. */
  snapshot(): unknown;
  /** Validates `state` completely, then applies it; throws (changing nothing) if it does not fit. */
  restore(state: unknown): void;
  /** A host event forwarded from the main thread (e.g. "resize" on SIGWINCH). */
  hostEvent?(name: string): void;
  /** Releases host resources at process exit. */
  dispose?(): void;
}

export const VIRTIO_F_INDIRECT_DESC = 1n << 28n;
export const VIRTIO_F_EVENT_IDX = 1n << 29n;
export const VIRTIO_F_VERSION_1 = 1n << 32n;
export const VIRTIO_F_RING_PACKED = 1n << 34n;

/** The ring features every device here supports through the common Virtqueue. */
export const COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX;

/** A device built from parsed command-line options. */
export interface DeviceDefinition<Options = Record<string, unknown>> {
  name: string;
  description: string;
  /** citty argument definitions for `backend device <name>`. */
  args: Record<string, unknown>;
  /** Options that may be given more than once; they arrive as arrays of strings. */
  repeatable?: string[];
  /** Validates options in the main thread so bad options fail before the socket is created. */
  validate?(options: Options): void;
  /** Builds the device inside the worker. */
  create(options: Options, ctx: DeviceContext): VhostUserDevice;
  /** Per-queue processing that can run in a queue thread of its own (see src/queue_thread.ts). */
  queueRunner?: QueueRunnerModule;
}
