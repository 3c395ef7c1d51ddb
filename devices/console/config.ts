// virtio-console constants and the device's config space (virtio 1.2 §5.3): feature bits, the
// queue layout of a multiport device, and the 12-byte config structure.

export const VIRTIO_ID_CONSOLE = 3;

export const VIRTIO_CONSOLE_F_SIZE = 1n << 0n;
export const VIRTIO_CONSOLE_F_MULTIPORT = 1n << 1n;
export const VIRTIO_CONSOLE_F_EMERG_WRITE = 1n << 2n;

/** struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }: byte offsets. */
export const CONFIG = {
  COLS: 0,
  ROWS: 2,
  MAX_NR_PORTS: 4,
  EMERG_WR: 8,
} as const;
export const CONFIG_SIZE = 12;

/** Queues 2 and 3 carry control messages once MULTIPORT is negotiated. */
const CONTROL_RECEIVEQ = 2;
const CONTROL_TRANSMITQ = 3;

/**
 * Extra ports beyond port 0. QEMU's virtio-serial caps a device at 32 ports; it also keeps the
 * queue count (2·(ports+1)+2 = 66) far below vhost-user's 256-queue index limit.
 */
export const MAX_EXTRA_PORTS = 31;

/** Number of queues for `ports` ports (port 0 included). */
export function queueCount(ports: number, multiport: boolean): number {
  return multiport ? 2 * ports + 2 : 2;
}

export function receiveqOf(port: number): number {
  return port === 0 ? 0 : 2 * port + 2;
}

export function transmitqOf(port: number): number {
  return port === 0 ? 1 : 2 * port + 3;
}

/** What queue `index` is for: a port's receive/transmit queue, or one of the control queues. */
export type QueueRole =
  | { kind: "receive"; port: number }
  | { kind: "transmit"; port: number }
  | { kind: "control-receive" }
  | { kind: "control-transmit" };

export function queueRole(index: number): QueueRole {
  if (index === 0) return { kind: "receive", port: 0 };
  if (index === 1) return { kind: "transmit", port: 0 };
  if (index === CONTROL_RECEIVEQ) return { kind: "control-receive" };
  if (index === CONTROL_TRANSMITQ) return { kind: "control-transmit" };
  const port = (index - 2) >> 1;
  return index % 2 === 0 ? { kind: "receive", port } : { kind: "transmit", port };
}

export interface WindowSize {
  cols: number;
  rows: number;
}

/** The config space as the driver reads it; emerg_wr is write-only and reads as 0. */
export function configBytes(size: WindowSize | null, maxNrPorts: number): Uint8Array {
  const b = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setUint16(CONFIG.COLS, size?.cols ?? 0, true);
  v.setUint16(CONFIG.ROWS, size?.rows ?? 0, true);
  v.setUint32(CONFIG.MAX_NR_PORTS, maxNrPorts, true);
  return b;
}
