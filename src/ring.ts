// What both ring layouts share: the ring description handed between threads, where a stopped
// ring is, descriptor flags and limits, and locating a ring structure in guest memory.
import type { GuestMemory, Window } from "./memory.ts";
import type { DirtyLogShare } from "./dirty_log.ts";
import type { InflightShare } from "./inflight.ts";
import { ChainError } from "./chain.ts";

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


/**
 * A table of 16-byte descriptors in guest memory (the split ring's table, a packed ring, an
 * indirect table), read through 32- and 16-bit typed-array views. Not through a DataView: with
 * Bun 1.4.5, DataView reads and writes of mapped guest memory made JavaScriptCore's optimized
 * code exit on every call ("Uncountable" OSR exits that never taught the profiler anything), so
 * the hottest loops ran in the baseline tier (bench/README.md, "Profiling ours"). Typed arrays
 * use the host's byte order, which is little-endian like virtio's on every platform Bun runs on.
 *
 * The fields are those of both layouts: split {addr u64, len u32, flags u16, next u16}, packed
 * {addr u64, len u32, id u16, flags u16}; entry `i` is words [base + 4i, base + 4i + 4).
 */
export class DescriptorTable {
  u32: Uint32Array = new Uint32Array(0);
  u16: Uint16Array = new Uint16Array(0);
  /** Index in u32 of entry 0. */
  base = 0;
  /** For a table that is not 4-byte aligned (no spec rule aligns indirect tables): a copy, read once. */
  private scratch: Uint32Array | null = null;
  private scratch16: Uint16Array | null = null;

  /** Points at the `len`-byte table at byte `off` of `win`; `len` is a multiple of 16. */
  at(win: Window, off: number, len: number): this {
    if (off % 4 === 0) {
      this.u32 = win.u32;
      this.u16 = win.u16;
      this.base = off / 4;
      return this;
    }
    if (this.scratch === null || this.scratch.length < len / 4) {
      this.scratch = new Uint32Array(len / 4);
      this.scratch16 = new Uint16Array(this.scratch.buffer);
    }
    new Uint8Array(this.scratch.buffer, 0, len).set(win.u8.subarray(off, off + len));
    this.u32 = this.scratch;
    this.u16 = this.scratch16!;
    this.base = 0;
    return this;
  }

  /**
   * Points at the indirect table an indirect descriptor names (`gpa`, `len`), after the checks
   * both layouts make: the feature negotiated, a whole number of entries, at most `maxEntries`,
   * inside guest memory. A bad one is the guest's error (ChainError: the chain is refused).
   */
  atIndirect(mem: GuestMemory, gpa: number, len: number, negotiated: boolean, maxEntries: number): this {
    if (!negotiated) throw new ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
    if (len === 0 || len % 16 !== 0 || len / 16 > maxEntries) {
      throw new ChainError(`indirect table of ${len} bytes (needs 16..${16 * maxEntries}, a multiple of 16)`);
    }
    const r = mem.translate(gpa, len);
    const win = r === null ? null : r.region.window(r.offset, len);
    if (r === null || win === null) throw new ChainError(`indirect table 0x${gpa.toString(16)}+${len} outside guest memory`);
    return this.at(win, r.offset - win.start, len);
  }

  /** The guest address in entry `i` (a u64; exact below 2^53, and no region lies above that). */
  addr(i: number): number {
    const w = this.base + 4 * i;
    return this.u32[w + 1]! * 0x1_0000_0000 + this.u32[w]!;
  }
  len(i: number): number {
    return this.u32[this.base + 4 * i + 2]!;
  }
  /** The u16 at byte 12 of entry `i`: split flags, packed buffer id. */
  word12(i: number): number {
    return this.u16[2 * (this.base + 4 * i) + 6]!;
  }
  /** The u16 at byte 14 of entry `i`: split next, packed flags. */
  word14(i: number): number {
    return this.u16[2 * (this.base + 4 * i) + 7]!;
  }
}
