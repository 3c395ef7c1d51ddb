// The virtio-console device: port 0 (receiveq 0, transmitq 1) and, with --port, MULTIPORT with the
// control queues (2, 3) and ports 1..N (2N+2, 2N+3).
//
// Features that need the config space (SIZE, EMERG_WRITE, MULTIPORT's max_nr_ports) are offered only
// when the front-end has one: QEMU's generic vhost-user-device with config_size=0 never reads it, and
// a guest that negotiated them would read zeros there.
import { COMMON_FEATURES, type DeviceContext, type VhostUserDevice } from "../../src/device.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import { type VirtqueueConfig, type RingPosition } from "../../src/ring.ts";
import type { GuestMemory } from "../../src/memory.ts";
import {
  VIRTIO_CONSOLE_F_SIZE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_EMERG_WRITE,
  CONFIG, CONFIG_SIZE, queueCount, queueRole, configBytes, type WindowSize,
} from "./config.ts";
import { ConsolePort, type PortState } from "./port.ts";
import { ControlChannel, type ControlState } from "./control.ts";
import type { InputSource, OutputSink } from "./host_io.ts";

export const CONSOLE_STATE_VERSION = 1;

/** One port's host side, opened by the caller. */
export interface PortSetup {
  name: string | null;
  input: InputSource | null;
  output: OutputSink | null;
}

interface ConsoleState {
  version: number;
  /** Port names in order (port 0 first): the layout a restored state must match. */
  portNames: (string | null)[];
  ports: PortState[];
  control: ControlState;
}

export class ConsoleDevice implements VhostUserDevice {
  private readonly ports: ConsolePort[];
  private readonly control: ControlChannel;
  private readonly offered: bigint;
  private acked = 0n;
  private size: WindowSize | null;
  /** The initial size went to the driver (a config change right after the receive queue starts). */
  private sizeAnnounced = false;

  constructor(private readonly ctx: DeviceContext, setup: PortSetup[], configSpace: boolean) {
    this.ports = setup.map((s, i) => new ConsolePort(i, s.name, ctx.loop, s.input, s.output));
    const port0Input = this.ports[0]!.input;
    this.size = port0Input?.windowSize() ?? null;
    let f = COMMON_FEATURES;
    if (configSpace) {
      f |= VIRTIO_CONSOLE_F_EMERG_WRITE;
      if (this.size !== null) f |= VIRTIO_CONSOLE_F_SIZE;
    }
    if (this.ports.length > 1) f |= VIRTIO_CONSOLE_F_MULTIPORT;
    this.offered = f;
    this.control = new ControlChannel(ctx.loop, this.ports, () => (this.negotiated(VIRTIO_CONSOLE_F_SIZE) ? this.size : null));
    // Host input starts flowing (into `pending`) as soon as the loop runs, before any front-end.
    ctx.loop.defer(() => {
      for (const p of this.ports) p.startInput();
    });
  }

  private negotiated(bit: bigint): boolean {
    return (this.acked & bit) !== 0n;
  }

  maxQueues(): number {
    return queueCount(this.ports.length, (this.offered & VIRTIO_CONSOLE_F_MULTIPORT) !== 0n);
  }

  features(): bigint {
    return this.offered;
  }

  ackFeatures(features: bigint): void {
    this.acked = features;
    const multiport = this.negotiated(VIRTIO_CONSOLE_F_MULTIPORT);
    for (const p of this.ports) p.gated = multiport;
  }

  protocolFeatures(): bigint {
    return 0n;
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    if (offset < 0 || size < 0 || offset + size > CONFIG_SIZE) return null;
    const sized = (this.offered & VIRTIO_CONSOLE_F_SIZE) !== 0n ? this.size : null;
    return configBytes(sized, this.ports.length).slice(offset, offset + size);
  }

  /** Only emerg_wr is writable: its low byte is one character of port 0 output. */
  writeConfig(offset: number, data: Uint8Array): boolean {
    if ((this.offered & VIRTIO_CONSOLE_F_EMERG_WRITE) === 0n) return false;
    if (data.length === 0 || offset < CONFIG.EMERG_WR || offset + data.length > CONFIG_SIZE) return false;
    if (offset === CONFIG.EMERG_WR) this.ports[0]!.emergencyWrite(data[0]!);
    return true;
  }

  /** Each port's pair and the control pair build their rings here, in the device thread. */
  startQueue(ring: VirtqueueConfig, mem: GuestMemory): void {
    const role = queueRole(ring.index);
    const target = role.kind === "control-receive" || role.kind === "control-transmit" ? this.control : this.ports[role.port];
    if (target === undefined) return;
    target.startQueue(openVirtqueue(mem, ring));
    if (role.kind === "receive" && role.port === 0) this.announceSize();
  }

  stopQueue(index: number): RingPosition | null {
    const role = queueRole(index);
    const target = role.kind === "control-receive" || role.kind === "control-transmit" ? this.control : this.ports[role.port];
    return target?.stopQueue(index) ?? null;
  }

  /**
   * Linux reads cols/rows only on a config-change interrupt (single-port) or from RESIZE messages
   * (multiport, sent after PORT_READY), so a single-port console learns its first size from a
   * config change once the driver is up.
   */
  private announceSize(): void {
    if (this.sizeAnnounced || !this.negotiated(VIRTIO_CONSOLE_F_SIZE) || this.negotiated(VIRTIO_CONSOLE_F_MULTIPORT)) return;
    this.sizeAnnounced = true;
    this.ctx.loop.defer(() => this.ctx.configChanged());
  }

  /** SIGWINCH: re-read the terminal's size and tell the driver if it changed. */
  hostEvent(name: string): void {
    if (name !== "resize") return;
    const size = this.ports[0]!.input?.windowSize() ?? null;
    if (size === null || (this.size !== null && size.cols === this.size.cols && size.rows === this.size.rows)) return;
    this.size = size;
    if (!this.negotiated(VIRTIO_CONSOLE_F_SIZE)) return;
    if (this.negotiated(VIRTIO_CONSOLE_F_MULTIPORT)) this.control.resize();
    else this.ctx.configChanged();
  }

  reset(): void {
    this.control.reset();
    for (const p of this.ports) p.reset();
    this.acked = 0n;
    this.sizeAnnounced = false;
  }

  enterSuspendedState(): void {
    // Nothing to quiesce: no chain is held between event-loop turns, and host input keeps
    // collecting in `pending` without touching guest memory.
  }

  snapshot(): ConsoleState {
    return {
      version: CONSOLE_STATE_VERSION,
      portNames: this.ports.map((p) => p.name),
      ports: this.ports.map((p) => p.snapshot()),
      control: this.control.snapshot(),
    };
  }

  restore(state: unknown, ackedFeatures: bigint): void {
    if (typeof state !== "object" || state === null) throw new Error("console state is not a map");
    const s = state as Record<string, unknown>;
    if (s.version !== CONSOLE_STATE_VERSION) throw new Error(`console state version ${String(s.version)}, this backend reads ${CONSOLE_STATE_VERSION}`);
    const names = this.ports.map((p) => p.name);
    if (!Array.isArray(s.portNames) || JSON.stringify(s.portNames) !== JSON.stringify(names)) {
      throw new Error(`console state has ports ${JSON.stringify(s.portNames)}, this device has ${JSON.stringify(names)}`);
    }
    if (!Array.isArray(s.ports) || s.ports.length !== this.ports.length) throw new Error("console state: port list does not match its names");
    const ports = s.ports.map((p, i) => ConsolePort.check(p, `port ${i}`));
    const control = ControlChannel.check(s.control);
    // Everything checked: apply.
    this.ackFeatures(ackedFeatures);
    ports.forEach((p, i) => this.ports[i]!.restore(p));
    this.control.restore(control);
    // The new host terminal may differ in size from the old one: announce it again.
    this.sizeAnnounced = false;
  }

  dispose(): void {
    this.control.dispose();
    for (const p of this.ports) p.dispose();
  }
}
