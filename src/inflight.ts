// Inflight tracking for crash-safe reconnect (protocol feature INFLIGHT_SHMFD, the vhost-user
// spec's "Inflight I/O tracking", split-ring layout). The backend allocates a shared region per
// device (GET_INFLIGHT_FD); the front-end keeps its fd and hands it to the next backend process
// (SET_INFLIGHT_FD) after a crash. Each descriptor head popped is marked in flight with an order
// counter; completions are chained into a "last batch" list and cleared once the used index that
// publishes them is stored. The stores follow the spec's order, so a crash at any instruction
// leaves a region the next process can repair (the last batch) and replay: the heads still in
// flight, in their original order.
//
// Layout per queue, as libvhost-user's (so regions stay compatible): features u64, version u16,
// desc_num u16, last_batch_head u16, used_idx u16, then desc_num × { inflight u8, pad[5],
// next u16, counter u64 }, the region rounded up to 64 bytes. Packed rings have a layout of their
// own (src/inflight_packed.ts); a region has one layout, chosen by the features acked when the
// front-end asks for it (QEMU sends SET_FEATURES before GET_INFLIGHT_FD for this reason).
import { toArrayBuffer } from "bun:ffi";
import { memfdCreate, MFD_CLOEXEC, MFD_ALLOW_SEALING, mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED } from "../ffi/mem.ts";
import { ftruncate } from "../ffi/io.ts";
import { close } from "../ffi/libc.ts";
import { checkSharedFile, guardAgainstShrinking } from "./shared_file.ts";
import { log } from "./log.ts";

const ALIGNMENT = 64;
const HEADER = 16;
const DESC = 16;
const VERSION = 1;
const O_VERSION = 8;
const O_DESC_NUM = 10;
const O_LAST_BATCH_HEAD = 12;
const O_USED_IDX = 14;
const D_INFLIGHT = 0;
const D_NEXT = 6;
const D_COUNTER = 8;
/** The packed layout's header and entry sizes (QueueRegionPacked, DescStatePacked). */
export const PACKED_HEADER = 32;
export const PACKED_DESC = 32;

/** Which of the spec's two region layouts: split rings' or packed rings'. */
export type InflightLayout = "split" | "packed";

/**
 * Bytes of one queue's region for a ring of `queueSize`: libvhost-user's vu_inflight_queue_size
 * for split rings; for packed ones a 32-byte header and 32 bytes per descriptor (DPDK's size).
 */
export function queueRegionSize(queueSize: number, layout: InflightLayout = "split"): number {
  const bytes = layout === "packed" ? PACKED_HEADER + PACKED_DESC * queueSize : DESC * queueSize + 2;
  return Math.ceil(bytes / ALIGNMENT) * ALIGNMENT;
}

/** One queue's part of a mapped region, as plain data for the thread serving the queue. */
export interface InflightShare {
  host: number;
  size: number;
  /** The region's ring size (desc_num); a ring may not be larger. */
  queueSize: number;
  layout: InflightLayout;
}

/** The whole shared region: every queue's part, back to back. */
export class InflightRegion {
  private constructor(readonly host: number, readonly size: number, readonly numQueues: number, readonly queueSize: number, readonly layout: InflightLayout) {}

  /** GET_INFLIGHT_FD: a fresh zeroed region; returns it and its fd (for the front-end to keep). */
  static allocate(numQueues: number, queueSize: number, layout: InflightLayout = "split"): { region: InflightRegion; fd: number } {
    InflightRegion.check(numQueues, queueSize);
    const size = numQueues * queueRegionSize(queueSize, layout);
    // Sealed against shrinking, so the next backend given this fd can rely on its size.
    const fd = memfdCreate("vhost-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    try {
      ftruncate(fd, size);
      guardAgainstShrinking(fd);
      return { region: new InflightRegion(mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), size, numQueues, queueSize, layout), fd };
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** SET_INFLIGHT_FD: maps the front-end's region; closes the fd either way. */
  static map(fd: number, size: number, offset: number, numQueues: number, queueSize: number, layout: InflightLayout = "split"): InflightRegion {
    try {
      InflightRegion.check(numQueues, queueSize);
      const need = numQueues * queueRegionSize(queueSize, layout);
      if (size < need) throw new Error(`inflight region of ${size} bytes, ${numQueues} queues of ${queueSize} need ${need} (${layout} layout)`);
      if (offset % 4096 !== 0) throw new Error(`inflight offset ${offset} is not page aligned`);
      // The claimed size is the front-end's word; the file's is what a read past it would SIGBUS on.
      const guard = checkSharedFile(fd, offset, need, "inflight region", { regularOnly: true });
      if (guard === "unsealable" || guard === "not-memfd") {
        log.warn("inflight region: its file cannot be sealed against shrinking; a front-end that truncates it can crash this backend");
      }
      return new InflightRegion(mmap(need, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset), need, numQueues, queueSize, layout);
    } finally {
      close(fd);
    }
  }

  private static check(numQueues: number, queueSize: number): void {
    if (numQueues < 1 || numQueues > 1024) throw new Error(`inflight region for ${numQueues} queues`);
    if (queueSize < 1 || queueSize > 32768) throw new Error(`inflight region for queues of ${queueSize}`);
  }

  queue(index: number): InflightShare | null {
    if (index >= this.numQueues) return null;
    const size = queueRegionSize(this.queueSize, this.layout);
    return { host: this.host + index * size, size, queueSize: this.queueSize, layout: this.layout };
  }

  unmap(): void {
    munmap(this.host, this.size);
  }
}

/** One queue's inflight state, used by its Virtqueue in whichever thread serves it. */
export class QueueInflight {
  private readonly dv: DataView;
  /** The same bytes as u8/u16/u32 for the per-request marks (not a DataView there: see
   * DescriptorTable in src/ring.ts). Every field is naturally aligned in the layout. */
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private counter = 1;
  /** Heads completed since the last publication (the "last batch"). */
  private readonly batch: number[] = [];

  constructor(share: InflightShare, private readonly ringSize: number) {
    if (share.layout !== "split") throw new Error(`inflight region with the ${share.layout} layout for a split ring`);
    if (ringSize > share.queueSize) throw new Error(`ring of ${ringSize} entries, inflight region for ${share.queueSize}`);
    const ab = toArrayBuffer(share.host as never, 0, share.size);
    this.dv = new DataView(ab);
    this.u8 = new Uint8Array(ab);
    this.u16 = new Uint16Array(ab, 0, share.size >>> 1);
    this.u32 = new Uint32Array(ab, 0, share.size >>> 2);
  }

  private d(head: number): number {
    return HEADER + DESC * head;
  }

  /**
   * At ring start: initialises a fresh region, or repairs one left by a crashed backend (the
   * last batch may have been published but not cleared) and returns the heads still in flight,
   * in the order they were popped. `usedIdx` is the used ring's index in guest memory.
   */
  recover(usedIdx: number): number[] {
    const v = this.dv;
    const n = this.ringSize;
    if (v.getUint16(O_VERSION, true) !== VERSION || v.getUint16(O_DESC_NUM, true) !== n) {
      this.restart(usedIdx);
      return [];
    }
    const saved = v.getUint16(O_USED_IDX, true);
    if (saved !== usedIdx) {
      // The last batch reached the used ring before the crash: those heads are not in flight.
      let batch = (usedIdx - saved) & 0xffff;
      let h = v.getUint16(O_LAST_BATCH_HEAD, true);
      for (let i = 0; batch > 0 && i < n && h < n; i++, batch--) {
        v.setUint8(this.d(h) + D_INFLIGHT, 0);
        h = v.getUint16(this.d(h) + D_NEXT, true);
      }
      v.setUint16(O_USED_IDX, usedIdx, true);
    }
    const inflight: { head: number; counter: number }[] = [];
    let max = 0;
    for (let h = 0; h < n; h++) {
      if (v.getUint8(this.d(h) + D_INFLIGHT) !== 1) continue;
      const c = v.getUint32(this.d(h) + D_COUNTER, true) + v.getUint32(this.d(h) + D_COUNTER + 4, true) * 0x1_0000_0000;
      inflight.push({ head: h, counter: c });
      if (c > max) max = c;
    }
    this.counter = max + 1;
    return inflight.sort((a, b) => a.counter - b.counter).map((e) => e.head);
  }

  /** Starts the region over for this ring: nothing in flight, the used index `usedIdx`. */
  restart(usedIdx: number): void {
    const v = this.dv;
    this.u8.fill(0);
    v.setUint16(O_DESC_NUM, this.ringSize, true);
    v.setUint16(O_USED_IDX, usedIdx, true);
    v.setUint16(O_VERSION, VERSION, true);
    this.counter = 1;
    this.batch.length = 0;
  }

  /** A head taken from the available ring: its order first, then the flag. */
  popped(head: number): void {
    const o = this.d(head);
    const c = this.counter++;
    this.u32[(o + D_COUNTER) / 4] = c >>> 0;
    this.u32[(o + D_COUNTER) / 4 + 1] = Math.floor(c / 0x1_0000_0000);
    this.u8[o + D_INFLIGHT] = 1;
  }

  /** A head given back unused (rewind): no longer in flight. */
  rewound(head: number): void {
    this.u8[this.d(head) + D_INFLIGHT] = 0;
  }

  /** A head completed (its used element is written): chained into the last batch. */
  completed(head: number): void {
    this.u16[(this.d(head) + D_NEXT) / 2] = this.u16[O_LAST_BATCH_HEAD / 2]!;
    this.u16[O_LAST_BATCH_HEAD / 2] = head;
    this.batch.push(head);
  }

  /** The used index `usedIdx` was stored: the batch is no longer in flight. */
  published(usedIdx: number): void {
    for (let i = 0; i < this.batch.length; i++) this.u8[this.d(this.batch[i]!) + D_INFLIGHT] = 0;
    this.batch.length = 0;
    this.u16[O_USED_IDX / 2] = usedIdx;
  }
}

/**
 * Whether `heads` (in the order they were popped) can be what a backend left in flight on a split
 * ring of `size` whose used index is `usedIdx` and available index `availIdx`; `availHead(i)` is
 * the head in available slot i. Returns null, or why not.
 *
 * Whatever a backend popped and did not complete, the driver still counts as outstanding, so at
 * most avail - used heads are in flight; and the last backend popped the slots before
 * used + (heads in flight), in order, so each head in flight sits in a slot of its own there, in
 * pop order (completions out of order leave heads in flight before the used index: io_uring on
 * a real disk). Slots before avail - size were rewritten by the driver and cannot be checked: a
 * region naming heads only found there is refused too, which costs those requests (the driver's
 * timeout) rather than running stale chains.
 */
export function checkReplay(heads: readonly number[], usedIdx: number, availIdx: number, size: number, availHead: (index: number) => number): string | null {
  const k = heads.length;
  const outstanding = (availIdx - usedIdx) & 0xffff;
  if (outstanding > size) return `the available index (${availIdx}) is ${outstanding} entries ahead of the used index (${usedIdx}), more than the ring's ${size}`;
  if (k > outstanding) return `${k} heads in flight, but the driver has ${outstanding} requests outstanding (available index ${availIdx}, used index ${usedIdx})`;
  let m = k - 1;
  const visible = size - (outstanding - k);
  for (let s = 0, i = (usedIdx + k - 1) & 0xffff; s < visible && m >= 0; s++, i = (i - 1) & 0xffff) {
    if (availHead(i) === heads[m]) m--;
  }
  if (m >= 0) return `head ${heads[m]} is marked in flight, but the available ring does not hold it (in pop order) where the last backend popped`;
  return null;
}
