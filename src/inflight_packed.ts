// Inflight tracking for packed rings (the vhost-user spec's "Inflight I/O tracking", packed
// layout; see src/inflight.ts for the split one and the region's life). On a packed ring a
// chain's descriptors do not stay where the driver wrote them: the used descriptors of chains
// completed out of order overwrite the slots of chains still in flight. So the region keeps a
// copy of each chain in flight, in entries taken from a free list:
//
//   header (32 bytes): features u64, version u16, desc_num u16, free_head u16, old_free_head u16,
//     used_idx u16, old_used_idx u16, used_wrap_counter u8, old_used_wrap_counter u8, padding
//   desc_num × 32-byte entries: inflight u8, pad u8, next u16, last u16, num u16, counter u64,
//     id u16, flags u16, len u32, addr u64
//
// A chain of n descriptors takes n entries off the free list (linked by their `next`); the first
// is its head (inflight, counter = pop order, num = n, last = its last entry). The `old_*` fields
// are the committed state, everything else work in progress:
//   pop:   copy the descriptors, mark the head, move free_head; then old_free_head (commit).
//   flush: push each completed chain's entries back on the free list, advance used_idx/wrap;
//          publish the used descriptors' flags in guest memory; clear the heads' inflight; then
//          old_used_idx, old_used_wrap_counter, old_free_head (commit).
// A crash at any instant leaves a region recover() repairs: if used_idx moved past old_used_idx,
// the ring slot at old_used_idx says whether the batch reached the driver (the queue publishes a
// batch's first descriptor last): then the batch is committed, else rolled back, as is a pop in
// progress. What stays in flight is resubmitted in pop order, and the ring resumes at the used
// position the region records, its available side as many descriptors further as the chains in
// flight hold (what a front-end gives for a packed ring after a crash is stale: QEMU has no
// used index in guest memory to read and keeps the base of the last ring start).
//
// The region is the front-end's shared memory: recovery reads each field once, checks every
// index, bounds every walk and refuses a region that does not add up (InflightError: the ring is
// not started). While the ring runs, the queue only writes the region, from state of its own.
import { toArrayBuffer } from "bun:ffi";
import { PACKED_DESC, PACKED_HEADER, type InflightShare } from "./inflight.ts";

const VERSION = 1;
const H_VERSION = 8;
const H_DESC_NUM = 10;
const H_FREE_HEAD = 12;
const H_OLD_FREE_HEAD = 14;
const H_USED_IDX = 16;
const H_OLD_USED_IDX = 18;
const H_USED_WRAP = 20;
const H_OLD_USED_WRAP = 21;
const E_INFLIGHT = 0;
const E_NEXT = 2;
const E_LAST = 4;
const E_NUM = 6;
const E_COUNTER = 8;
const E_ID = 16; // and flags at 18: the two are stored as one u32
const E_LEN = 20;
const E_ADDR = 24;

const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;
const WRAP = 1 << 15;

/** A region that cannot be what a backend left: the ring is not started over it. */
export class InflightError extends Error {}

/** One descriptor of a chain in flight, as the region saved it. */
export interface SavedDesc {
  addr: number;
  len: number;
  flags: number;
}

/** A chain a previous backend left in flight, to resubmit. */
export interface SavedChain {
  /** Its head entry and last entry in the region, and its descriptor count. */
  entry: number;
  last: number;
  num: number;
  counter: number;
  /** The buffer id (its last descriptor's). */
  id: number;
  descs: SavedDesc[];
  /** Its entries in chain order (head first). */
  entries: number[];
}

/** What recovery found: where the ring resumes (index | wrap << 15) and what to resubmit. */
export interface PackedRecoveryPlan {
  /** An uninitialised region (version 0): nothing to recover, the front-end's base stands. */
  fresh: boolean;
  /** Whether an interrupted publication was committed (true) or rolled back (false); null: none. */
  batchPublished: boolean | null;
  usedPos: number;
  availPos: number;
  /** Chains in flight, in pop order. */
  chains: SavedChain[];
  /** Free entries, in list order (the region's free list, then any entry it lost). */
  free: number[];
  maxCounter: number;
}

interface RegionViews {
  u8: Uint8Array;
  u16: Uint16Array;
  u32: Uint32Array;
}

function views(share: InflightShare, ringSize: number): RegionViews {
  if (share.layout !== "packed") throw new InflightError(`inflight region with the ${share.layout} layout for a packed ring`);
  if (ringSize > share.queueSize) throw new InflightError(`ring of ${ringSize} entries, inflight region for ${share.queueSize}`);
  const need = PACKED_HEADER + PACKED_DESC * ringSize;
  if (share.size < need) throw new InflightError(`inflight region of ${share.size} bytes for a ring of ${ringSize} (needs ${need})`);
  const ab = toArrayBuffer(share.host as never, 0, need);
  return { u8: new Uint8Array(ab), u16: new Uint16Array(ab), u32: new Uint32Array(ab) };
}

function advance(pos: number, by: number, n: number): number {
  let idx = (pos & 0x7fff) + by;
  let wrap = (pos & WRAP) !== 0;
  while (idx >= n) {
    idx -= n;
    wrap = !wrap;
  }
  return idx | (wrap ? WRAP : 0);
}

/**
 * Reads the region of a packed ring of `n` descriptors and works out what a restart must do,
 * without writing anything. `slotFlags(i)` reads the flags of descriptor ring slot i (guest
 * memory). Throws InflightError for a region that does not add up.
 */
export function planPackedRecovery(share: InflightShare, n: number, slotFlags: (slot: number) => number): PackedRecoveryPlan {
  const { u8, u16, u32 } = views(share, n);
  const version = u16[H_VERSION / 2]!;
  if (version === 0) return { fresh: true, batchPublished: null, usedPos: 0, availPos: 0, chains: [], free: [], maxCounter: 0 };
  if (version !== VERSION) throw new InflightError(`inflight region version ${version} (this backend knows ${VERSION})`);
  const descNum = u16[H_DESC_NUM / 2]!;
  if (descNum !== n) throw new InflightError(`inflight region for a ring of ${descNum} descriptors, the ring has ${n}`);
  const freeHead = u16[H_FREE_HEAD / 2]!;
  const oldFreeHead = u16[H_OLD_FREE_HEAD / 2]!;
  const usedIdx = u16[H_USED_IDX / 2]!;
  const oldUsedIdx = u16[H_OLD_USED_IDX / 2]!;
  const usedWrap = u8[H_USED_WRAP]!;
  const oldUsedWrap = u8[H_OLD_USED_WRAP]!;
  if (freeHead > n || oldFreeHead > n) throw new InflightError(`inflight region: free list head ${freeHead} (old ${oldFreeHead}) outside ${n} entries`);
  if (usedIdx >= n || oldUsedIdx >= n) throw new InflightError(`inflight region: used index ${usedIdx} (old ${oldUsedIdx}) outside a ring of ${n}`);
  if (usedWrap > 1 || oldUsedWrap > 1) throw new InflightError(`inflight region: used wrap counter ${usedWrap} (old ${oldUsedWrap}) is not 0 or 1`);

  // An interrupted publication: did its first used descriptor reach the ring? The slot still
  // holds the driver's available descriptor (its flags as made available under the old counter)
  // until then; anything else (the used flags, or the driver's next lap) means it did.
  let free = oldFreeHead;
  let usedPos = oldUsedIdx | (oldUsedWrap ? WRAP : 0);
  let batchPublished: boolean | null = null;
  if (usedIdx !== oldUsedIdx || usedWrap !== oldUsedWrap) {
    const availForm = oldUsedWrap ? F_AVAIL : F_USED;
    batchPublished = (slotFlags(oldUsedIdx) & (F_AVAIL | F_USED)) !== availForm;
    if (batchPublished) {
      free = freeHead;
      usedPos = usedIdx | (usedWrap ? WRAP : 0);
    }
  }

  // The free list, bounded and acyclic; its entries are not in flight whatever they say.
  const inFree = new Uint8Array(n);
  const freeList: number[] = [];
  for (let e = free; e !== n; ) {
    if (e > n) throw new InflightError(`inflight region: the free list reaches entry ${e} (ring of ${n})`);
    if (inFree[e] !== 0) throw new InflightError(`inflight region: the free list loops at entry ${e}`);
    inFree[e] = 1;
    freeList.push(e);
    e = u16[(PACKED_HEADER + PACKED_DESC * e + E_NEXT) / 2]!;
  }

  // Every other entry marked in flight heads a chain: its entries follow `next`, `num` of them,
  // ending at `last`, none free or another chain's.
  const owned = new Uint8Array(n);
  const ids = new Uint8Array(n);
  const chains: SavedChain[] = [];
  let maxCounter = 0;
  for (let h = 0; h < n; h++) {
    const o = PACKED_HEADER + PACKED_DESC * h;
    if (inFree[h] !== 0 || owned[h] !== 0 || u8[o + E_INFLIGHT] !== 1) continue;
    const num = u16[(o + E_NUM) / 2]!;
    const last = u16[(o + E_LAST) / 2]!;
    const counter = u32[(o + E_COUNTER) / 4]! + u32[(o + E_COUNTER) / 4 + 1]! * 0x1_0000_0000;
    if (num === 0 || num > n) throw new InflightError(`inflight region: chain at entry ${h} of ${num} descriptors (ring of ${n})`);
    const descs: SavedDesc[] = [];
    const entries: number[] = [];
    let e = h;
    let id = 0;
    for (let k = 0; ; k++) {
      if (e >= n) throw new InflightError(`inflight region: chain at entry ${h} reaches entry ${e} (ring of ${n})`);
      if (inFree[e] !== 0 || owned[e] !== 0) throw new InflightError(`inflight region: chain at entry ${h} runs into entry ${e}, which is ${inFree[e] !== 0 ? "free" : "already in a chain"}`);
      owned[e] = 1;
      entries.push(e);
      const eo = PACKED_HEADER + PACKED_DESC * e;
      const idFlags = u32[(eo + E_ID) / 4]!;
      id = idFlags & 0xffff;
      descs.push({ flags: idFlags >>> 16, len: u32[(eo + E_LEN) / 4]!, addr: u32[(eo + E_ADDR) / 4]! + u32[(eo + E_ADDR) / 4 + 1]! * 0x1_0000_0000 });
      if (k + 1 === num) break;
      e = u16[(eo + E_NEXT) / 2]!;
    }
    if (e !== last) throw new InflightError(`inflight region: chain at entry ${h} ends at entry ${e}, its head says ${last}`);
    if (id >= n) throw new InflightError(`inflight region: chain at entry ${h} has buffer id ${id} (ring of ${n})`);
    if (ids[id] !== 0) throw new InflightError(`inflight region: two chains in flight have buffer id ${id}`);
    ids[id] = 1;
    if (counter > maxCounter) maxCounter = counter;
    chains.push({ entry: h, last, num, counter, id, descs, entries });
  }
  chains.sort((a, b) => a.counter - b.counter);
  let inFlight = 0;
  for (const c of chains) inFlight += c.num;
  // The slots of what is in flight, after the used position, are ones the driver made available
  // and the device has not written since (but for a rolled-back publication's used flags): their
  // AVAIL bit is their lap's wrap counter. A stale or forged region naming chains the driver does
  // not have outstanding is caught here (a slot of the lap before), and not replayed.
  for (let i = 0, pos = usedPos; i < inFlight; i++, pos = advance(pos, 1, n)) {
    const f = slotFlags(pos & 0x7fff);
    if (((f & F_AVAIL) !== 0) !== ((pos & WRAP) !== 0)) {
      throw new InflightError(`inflight region: ${inFlight} descriptors in flight after the used position 0x${usedPos.toString(16)}, but ring slot ${pos & 0x7fff} was not made available by the driver (flags 0x${f.toString(16)})`);
    }
  }
  // Entries neither free nor in flight (a region some crash lost them from) are free again.
  for (let e = 0; e < n; e++) if (inFree[e] === 0 && owned[e] === 0) freeList.push(e);
  return { fresh: false, batchPublished, usedPos, availPos: advance(usedPos, inFlight, n), chains, free: freeList, maxCounter };
}

/**
 * One packed queue's region, kept by the queue in whichever thread serves it. The queue calls
 * take() for each descriptor while walking a chain, popped() once the chain is its, released()
 * for each completed chain and then published() around storing the used flags (see flush in
 * src/packed_virtqueue.ts). Plain typed-array stores; the commit points are Atomics stores, so
 * nothing is reordered past them.
 */
export class PackedInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** The free list as this queue keeps it (the region's copy is written, never read back). */
  private readonly next: Uint16Array;
  private freeHead: number;
  private usedPos = 0;
  private counter = 1;
  /** The entries take() handed out for the chain being walked: its first and its last. */
  first = 0;
  lastTaken = 0;

  constructor(share: InflightShare, private readonly n: number) {
    ({ u8: this.u8, u16: this.u16, u32: this.u32 } = views(share, n));
    this.next = new Uint16Array(n);
    this.freeHead = n;
  }

  /**
   * At ring start: applies `plan` (from planPackedRecovery on this region): commits or rolls
   * back what the crash interrupted, frees what is not in flight, and returns the chains to
   * resubmit. A fresh region starts over at `usedPos` (the front-end's base).
   */
  recover(plan: PackedRecoveryPlan, usedPos: number): SavedChain[] {
    if (plan.fresh) {
      this.restart(usedPos);
      return [];
    }
    const u16 = this.u16;
    const u8 = this.u8;
    // In an order a crash may interrupt anywhere, the next recovery then deciding the same: the
    // free entries stop being in flight first (a batch committed below must not come back as in
    // flight); the free list is linked back to front (no entry is reachable before its link is
    // written); the positions follow, old_free_head last (until then the old free list stands,
    // a suffix of this one: what it lacks is freed again).
    for (const e of plan.free) u8[this.e(e) + E_INFLIGHT] = 0;
    for (const c of plan.chains) {
      for (let k = 0; k + 1 < c.entries.length; k++) this.next[c.entries[k]!] = c.entries[k + 1]!;
    }
    let head = this.n;
    for (let i = plan.free.length - 1; i >= 0; i--) {
      const e = plan.free[i]!;
      this.next[e] = head;
      u16[(this.e(e) + E_NEXT) / 2] = head;
      head = e;
    }
    this.freeHead = head;
    const used = plan.usedPos & 0x7fff;
    const wrap = (plan.usedPos & WRAP) !== 0 ? 1 : 0;
    u16[H_USED_IDX / 2] = used;
    u8[H_USED_WRAP] = wrap;
    u16[H_FREE_HEAD / 2] = head;
    Atomics.store(u16, H_OLD_USED_IDX / 2, used);
    Atomics.store(u8, H_OLD_USED_WRAP, wrap);
    Atomics.store(u16, H_OLD_FREE_HEAD / 2, head);
    this.usedPos = plan.usedPos;
    this.counter = plan.maxCounter + 1;
    return plan.chains;
  }

  /** Starts the region over: nothing in flight, every entry free, the used side at `usedPos`. */
  restart(usedPos: number): void {
    const n = this.n;
    this.u8.fill(0);
    for (let e = 0; e < n; e++) {
      this.next[e] = e + 1;
      this.u16[(this.e(e) + E_NEXT) / 2] = e + 1;
    }
    this.freeHead = 0;
    this.usedPos = usedPos;
    this.counter = 1;
    const u16 = this.u16;
    u16[H_DESC_NUM / 2] = n;
    u16[H_USED_IDX / 2] = u16[H_OLD_USED_IDX / 2] = usedPos & 0x7fff;
    this.u8[H_USED_WRAP] = this.u8[H_OLD_USED_WRAP] = (usedPos & WRAP) !== 0 ? 1 : 0;
    Atomics.store(u16, H_VERSION / 2, VERSION);
  }

  private e(entry: number): number {
    return PACKED_HEADER + PACKED_DESC * entry;
  }

  /**
   * Saves descriptor `k` of the chain being walked (k from 0). False when no entry is left: more
   * descriptors in flight than the ring holds, which only a driver breaking the protocol gets to.
   */
  take(k: number, addr: number, len: number, id: number, flags: number): boolean {
    const e = k === 0 ? this.freeHead : this.next[this.lastTaken]!;
    if (e >= this.n) return false;
    if (k === 0) this.first = e;
    this.lastTaken = e;
    const w = this.e(e) / 4;
    const u32 = this.u32;
    u32[w + E_ID / 4] = id | (flags << 16);
    u32[w + E_LEN / 4] = len;
    u32[w + E_ADDR / 4] = addr >>> 0;
    u32[w + E_ADDR / 4 + 1] = Math.floor(addr / 0x1_0000_0000);
    return true;
  }

  /** The chain take() saved (`num` descriptors) is in flight: its head, then the commit. */
  popped(num: number): void {
    const h = this.first;
    const w = this.e(h) / 4;
    const u32 = this.u32;
    const c = this.counter++;
    u32[w + E_COUNTER / 4] = c >>> 0;
    u32[w + E_COUNTER / 4 + 1] = Math.floor(c / 0x1_0000_0000);
    u32[w + E_LAST / 4] = this.lastTaken | (num << 16); // last and num
    this.u8[this.e(h) + E_INFLIGHT] = 1;
    this.freeHead = this.next[this.lastTaken]!;
    this.u16[H_FREE_HEAD / 2] = this.freeHead;
    Atomics.store(this.u16, H_OLD_FREE_HEAD / 2, this.freeHead);
  }

  /** A completed chain (head `entry`, last entry `last`, `num` descriptors) back on the free list; before its used flags are stored. */
  released(entry: number, last: number, num: number): void {
    this.next[last] = this.freeHead;
    this.u16[(this.e(last) + E_NEXT) / 2] = this.freeHead;
    this.freeHead = entry;
    this.usedPos = advance(this.usedPos, num, this.n);
  }

  /** After released() for a batch: the work-in-progress head and used position, before the flags. */
  releasedAll(): void {
    const u16 = this.u16;
    u16[H_FREE_HEAD / 2] = this.freeHead;
    u16[H_USED_IDX / 2] = this.usedPos & 0x7fff;
    this.u8[H_USED_WRAP] = (this.usedPos & WRAP) !== 0 ? 1 : 0;
  }

  /** The used flags of the batch are stored: its heads are no longer in flight (clear each with cleared()), then commit(). */
  cleared(entry: number): void {
    this.u8[this.e(entry) + E_INFLIGHT] = 0;
  }

  /** The batch's commit: the old used index first, its wrap counter, then the free list head. */
  commit(): void {
    Atomics.store(this.u16, H_OLD_USED_IDX / 2, this.usedPos & 0x7fff);
    Atomics.store(this.u8, H_OLD_USED_WRAP, (this.usedPos & WRAP) !== 0 ? 1 : 0);
    Atomics.store(this.u16, H_OLD_FREE_HEAD / 2, this.freeHead);
  }
}
