// The multiport control queues (virtio 1.2 §5.3.6.2): the driver reports on the control transmitq
// (DEVICE_READY, PORT_READY, PORT_OPEN), the device answers on the control receiveq (PORT_ADD,
// CONSOLE_PORT, PORT_NAME, PORT_OPEN, RESIZE). The device's messages wait in `outgoing` until the
// driver posts buffers for them.
//
// After PORT_READY the order is QEMU virtio-serial's (the device Linux's driver grew up with):
// CONSOLE_PORT, PORT_NAME, PORT_OPEN, so the port exists and is set up before it is named and opened.
import type { EventLoop } from "../../src/event_loop.ts";
import type { RingPosition } from "../../src/ring.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import { QueuePair, processQueue, fillQueue } from "../../src/queue_serving.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import { log } from "../../src/log.ts";
import type { WindowSize } from "./config.ts";
import type { ConsolePort } from "./port.ts";

/** Control message events (virtio 1.2 §5.3.6.2, VIRTIO_CONSOLE_*). */
export const VIRTIO_CONSOLE = {
  DEVICE_READY: 0,
  PORT_ADD: 1,
  PORT_REMOVE: 2,
  PORT_READY: 3,
  CONSOLE_PORT: 4,
  RESIZE: 5,
  PORT_OPEN: 6,
  PORT_NAME: 7,
} as const;

/** struct virtio_console_control { le32 id; le16 event; le16 value; } */
const CONTROL_HEADER_SIZE = 8;
/** Port names are short identifiers (they become /dev/virtio-ports/NAME). */
export const PORT_NAME_MAX = 64;
/** Device→driver messages held for a driver that posts no control buffers; more are dropped. */
const OUTGOING_CAP = 1024;

export function controlMessage(id: number, event: number, value: number, extra?: Uint8Array): Uint8Array {
  const b = new Uint8Array(CONTROL_HEADER_SIZE + (extra?.length ?? 0));
  const v = new DataView(b.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  if (extra) b.set(extra, CONTROL_HEADER_SIZE);
  return b;
}

/** struct virtio_console_resize { le16 cols; le16 rows; } (the spec's order; Linux ≥ 6.15 reads it so). */
function resizeMessage(id: number, size: WindowSize): Uint8Array {
  const extra = new Uint8Array(4);
  const v = new DataView(extra.buffer);
  v.setUint16(0, size.cols, true);
  v.setUint16(2, size.rows, true);
  return controlMessage(id, VIRTIO_CONSOLE.RESIZE, 0, extra);
}

export interface ControlState {
  /** The driver sent DEVICE_READY. */
  deviceReady: boolean;
  /** Device→driver messages not yet delivered. */
  outgoing: Uint8Array[];
}

export class ControlChannel {
  private readonly queues: QueuePair;
  private outgoing: Uint8Array[] = [];
  deviceReady = false;
  private readonly guestErrors = new GuestErrorLog("console control queue");
  private readonly header = new Uint8Array(CONTROL_HEADER_SIZE);

  /**
   * `consoleSize` is the console's size when the driver negotiated SIZE, else null (then no RESIZE
   * is sent).
   */
  constructor(
    private readonly loop: EventLoop,
    private readonly ports: readonly ConsolePort[],
    private readonly consoleSize: () => WindowSize | null,
  ) {
    this.queues = new QueuePair(loop, () => this.deliver(), () => this.receive());
  }

  /** Serves ring `q` as the control receive (even index) or transmit (odd) queue. */
  startQueue(q: Virtqueue): void {
    this.queues.member(q.index).start(q);
  }

  stopQueue(index: number): RingPosition | null {
    return this.queues.member(index).stop();
  }

  private send(msg: Uint8Array): void {
    if (this.outgoing.length >= OUTGOING_CAP) {
      this.guestError("control receive queue is not being drained; message dropped");
      return;
    }
    this.outgoing.push(msg);
  }

  /** Tells the driver the console's new size (after SIGWINCH), if it is ready to hear it. */
  resize(): void {
    const size = this.consoleSize();
    const port0 = this.ports[0]!;
    if (size === null || !port0.guestReady) return;
    this.send(resizeMessage(0, size));
    this.deliver();
  }

  /** Handles the driver's messages on the control transmitq. */
  private receive(): void {
    const q = this.queues.tx.queue;
    if (q === null) return;
    processQueue(q, (chain) => {
      if (new ChainReader(chain).read(this.header) < CONTROL_HEADER_SIZE) {
        this.guestError(`control message in chain ${chain.head} is shorter than ${CONTROL_HEADER_SIZE} bytes; ignored`);
      } else {
        const v = new DataView(this.header.buffer);
        this.handle(v.getUint32(0, true), v.getUint16(4, true), v.getUint16(6, true));
      }
      q.add(chain.head, 0);
      return true;
    }, undefined, this.queues.tx.budget);
    this.deliver();
  }

  private handle(id: number, event: number, value: number): void {
    switch (event) {
      case VIRTIO_CONSOLE.DEVICE_READY:
        if (value !== 1) {
          log.warn("console: the driver failed to initialise the device (DEVICE_READY 0)");
          return;
        }
        this.deviceReady = true;
        for (const p of this.ports) this.send(controlMessage(p.id, VIRTIO_CONSOLE.PORT_ADD, 1));
        return;
      case VIRTIO_CONSOLE.PORT_READY: {
        const port = this.ports[id];
        if (port === undefined) return this.guestError(`PORT_READY for port ${id}, which does not exist`);
        if (value !== 1) {
          log.warn(`console: the driver failed to add port ${id}`);
          return;
        }
        port.guestReady = true;
        if (port.isConsole) this.send(controlMessage(id, VIRTIO_CONSOLE.CONSOLE_PORT, 1));
        if (port.name !== null) this.send(controlMessage(id, VIRTIO_CONSOLE.PORT_NAME, 1, Buffer.from(port.name)));
        // The host end of every port is always connected.
        this.send(controlMessage(id, VIRTIO_CONSOLE.PORT_OPEN, 1));
        const size = port.isConsole ? this.consoleSize() : null;
        if (size !== null) this.send(resizeMessage(id, size));
        return;
      }
      case VIRTIO_CONSOLE.PORT_OPEN: {
        const port = this.ports[id];
        if (port === undefined) return this.guestError(`PORT_OPEN for port ${id}, which does not exist`);
        port.guestOpen = value === 1;
        if (port.guestOpen) this.loop.defer(() => port.deliver());
        return;
      }
      default:
        this.guestError(`unexpected control event ${event} for port ${id}; ignored`);
    }
  }

  /** Moves outgoing messages into the driver's control receive buffers. */
  deliver(): void {
    const q = this.queues.rx.queue;
    if (q === null) return;
    fillQueue(q, () => this.outgoing.length > 0, (chain) => {
      const msg = this.outgoing.shift()!;
      if (chain.writableLen < msg.length) {
        // Too small for this message, and it would be for every retry: drop the message.
        this.guestError(`control receive buffer of ${chain.writableLen} bytes is too small for a ${msg.length}-byte message; dropped`);
        q.add(chain.head, 0);
        return true;
      }
      q.add(chain.head, new ChainWriter(chain).write(msg));
      return true;
    });
  }

  reset(): void {
    this.outgoing = [];
    this.deviceReady = false;
  }

  private guestError(message: string): void {
    this.guestErrors.report(message);
  }

  snapshot(): ControlState {
    return { deviceReady: this.deviceReady, outgoing: this.outgoing.map((m) => m.slice()) };
  }

  static check(s: unknown): ControlState {
    if (typeof s !== "object" || s === null) throw new Error("control state is not a map");
    const c = s as Record<string, unknown>;
    if (typeof c.deviceReady !== "boolean") throw new Error("control.deviceReady is not a boolean");
    if (!Array.isArray(c.outgoing) || c.outgoing.length > OUTGOING_CAP) throw new Error(`control.outgoing is not a list of at most ${OUTGOING_CAP} messages`);
    for (const m of c.outgoing) {
      if (!(m instanceof Uint8Array) || m.length < CONTROL_HEADER_SIZE || m.length > CONTROL_HEADER_SIZE + PORT_NAME_MAX) {
        throw new Error("control.outgoing holds a message that is not a control message");
      }
    }
    return c as unknown as ControlState;
  }

  restore(s: ControlState): void {
    this.deviceReady = s.deviceReady;
    this.outgoing = s.outgoing.map((m) => m.slice());
  }

  dispose(): void {
    this.queues.stop();
  }
}
