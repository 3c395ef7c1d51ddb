// What both ring layouts share: the ring description handed between threads, where a stopped
// ring is, descriptor flags and limits, and locating a ring structure in guest memory.
import type { GuestMemory, Window } from "./memory.ts";
import type { DirtyLogShare } from "./dirty_log.ts";
import type { InflightShare } from "./inflight.ts";

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const MAX_QUEUE_SIZE = 32768;
/**
 * Largest indirect table accepted. Linux sizes indirect tables by its segment count (virtio-blk's
 * seg_max + 2), which may exceed a small ring; QEMU and libvhost-user accept up to 1024 entries.
 */
export const MAX_INDIRECT_ENTRIES = 1024;

/**
 * A ring as the front-end described it: plain data, so it can be handed to the thread that serves
 * the ring, which builds its Virtqueue there (crosvm: QueueConfig → Queue).
 */
export interface VirtqueueConfig {
  index: number;
  size: number;
  /** VIRTIO_F_RING_PACKED: a packed ring (desc = descriptor ring, avail = driver area, used = device area). */
  packed?: boolean;
  descGpa: number;
  availGpa: number;
  usedGpa: number;
  eventIdx: boolean;
  indirect: boolean;
  nextAvail: number;
  /** Where the used ring continues; read from guest memory when absent. */
  nextUsed?: number;
  kickFd: number;
  callFd: number;
  errFd: number;
  /** The dirty log while the driver acked VHOST_F_LOG_ALL (live migration), else absent. */
  log?: DirtyLogShare | null;
  /** Guest-physical address to log used-ring writes at (SET_VRING_ADDR's log address); default usedGpa. */
  usedLogGpa?: number;
  /** SET_LOG_FD's eventfd, signalled after each logged publication (libvhost-user's log kick). */
  logFd?: number;
  /** This queue's part of the inflight region (INFLIGHT_SHMFD), for crash-safe reconnect. */
  inflight?: InflightShare | null;
}

/** Where a ring stopped: GET_VRING_BASE's answer (nextAvail), and where a restart continues. */
export interface RingPosition {
  nextAvail: number;
  nextUsed: number;
}

export interface Located {
  win: Window;
  /** Byte offset of the structure inside `win`. */
  off: number;
}

export function locate(mem: GuestMemory, gpa: number, len: number, align: number, what: string): Located {
  if (gpa % align !== 0) throw new Error(`${what} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
  const r = mem.translate(gpa, len);
  const win = r === null ? null : r.region.window(r.offset, len);
  if (r === null || win === null) throw new Error(`${what} 0x${gpa.toString(16)}+${len} is outside guest memory`);
  return { win, off: r.offset - win.start };
}

