// The device side of a packed virtqueue (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED). One descriptor
// ring carries both directions: the driver makes a chain available by writing its first
// descriptor's flags (AVAIL = its wrap counter, USED = the inverse) last; the device writes one
// used descriptor per chain (the buffer id, the length, flags AVAIL = USED = its wrap counter) and
// moves on by the chain's descriptor count. Guest memory is untrusted: the first descriptor's
// flags are read with a barrier, every field once, chains are bounded by the ring size, every
// buffer is checked against the memory table; devices see the same DescriptorChain as on a split
// ring and cannot tell the two apart.
//
// Rewound chains (a device that could not start a request, MRG_RXBUF chains a frame did not need)
// are kept, already walked, and handed out again before the ring is read: on a packed ring the
// device's used descriptors overwrite the slots of chains it consumed, so the ring position cannot
// simply move back. A stop reports the position of the first rewound chain, whose slots are still
// the driver's (used writes never reach past the chains completed before it).
//
// With an inflight region (src/inflight_packed.ts) each chain taken from the ring is copied there
// as it is walked, and a new process resubmits what its predecessor left in flight before it
// reads the ring, which then resumes where the region says.
import type { GuestMemory } from "./memory.ts";
import { DescriptorChain, ChainError, appendBuffer } from "./chain.ts";
import { DirtyLog } from "./dirty_log.ts";
import { signal } from "../ffi/eventfd.ts";
import { VirtqueueBase } from "./virtqueue_base.ts";
import { PackedInflight, planPackedRecovery, type PackedRecoveryPlan, type SavedChain } from "./inflight_packed.ts";
import { log as logger } from "./log.ts";
import {
  VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT, MAX_QUEUE_SIZE,
  locate, DescriptorTable, type Located, type VirtqueueConfig, type RingPosition,
} from "./ring.ts";
import type { Virtqueue } from "./virtqueue.ts";

const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;
/** Event suppression flags (driver and device areas: off_wrap u16, flags u16). */
const EVENT_ENABLE = 0;
const EVENT_DISABLE = 1;
const EVENT_DESC = 2;
const WRAP = 1 << 15;

/**
 * Throws if `c` does not describe a packed ring that lies in `mem`, or if its inflight region
 * cannot be recovered (read only: the queue recovers it when it is built).
 */
export function checkPackedRing(mem: GuestMemory, c: VirtqueueConfig): void {
  if (c.size === 0 || c.size > MAX_QUEUE_SIZE) throw new Error(`queue ${c.index}: size ${c.size} is not in 1..${MAX_QUEUE_SIZE}`);
  const ring = locate(mem, c.descGpa, 16 * c.size, 16, `queue ${c.index} descriptor ring`);
  locate(mem, c.availGpa, 4, 4, `queue ${c.index} driver event area`);
  locate(mem, c.usedGpa, 4, 4, `queue ${c.index} device event area`);
  if (c.inflight) planPackedRecovery(c.inflight, c.size, slotFlagsReader(ring));
}

function slotFlagsReader(ring: Located): (slot: number) => number {
  const u16 = ring.win.u16;
  const at = (ring.off + 14) / 2;
  return (slot) => Atomics.load(u16, at + slot * 8);
}

/** A chain taken from the ring, for completion and rewind. */
interface Popped {
  id: number;
  /** Ring descriptors the chain took (1 for an indirect one). */
  count: number;
  /** Where the ring stood before it (index | wrap << 15). */
  from: number;
  /** Order of the chain in the ring (pops from the ring count up; a rewound chain keeps its own). */
  seq: number;
  chain: DescriptorChain;
  /** Its head and last entries in the inflight region (0 without one). */
  entry: number;
  last: number;
}

/** A used descriptor written and not yet published. */
interface PendingUsed {
  slot: number;
  flags: number;
  p: Popped;
}

export class PackedVirtqueue extends VirtqueueBase implements Virtqueue {
  inFlight = 0;
  notifyLater: (() => void) | null = null;

  private readonly ring: Located;
  /** The descriptor ring and each indirect table, read through typed arrays (see DescriptorTable). */
  private readonly table: DescriptorTable;
  private readonly indirectTable = new DescriptorTable();
  private readonly ringU16: Uint16Array;
  private readonly ringFlags0: number;
  private readonly driverArea: Located;
  private readonly deviceArea: Located;
  /** Next descriptor to read, and the driver's wrap counter we expect there. */
  private availIdx: number;
  private availWrap: boolean;
  /** Next slot for a used descriptor, and our wrap counter. */
  private usedIdx: number;
  private usedWrap: boolean;
  /** Chains in flight by buffer id. */
  private readonly byId: (Popped | undefined)[];
  /** Chains popped and not completed, in pop order (rewind takes from the end). */
  private readonly order: Popped[] = [];
  /** Rewound chains, handed out again before the ring is read. */
  private readonly stash: Popped[] = [];
  /** Used descriptors written but not yet published, in completion order. */
  private pendingUsed: PendingUsed[] = [];
  private signalledUsed: number | null = null;
  private readonly log: DirtyLog | null;
  /** Sequence number of the next chain taken from the ring, and the latest one the device completed. */
  private seq = 0;
  private lastCompletedSeq = -1;
  /** Inflight tracking (see src/inflight_packed.ts), and the chains a crashed predecessor left in flight. */
  private readonly inflight: PackedInflight | null;
  private readonly resubmit: SavedChain[] = [];

  constructor(private readonly mem: GuestMemory, c: VirtqueueConfig) {
    super(c);
    if (c.size === 0 || c.size > MAX_QUEUE_SIZE) throw new Error(`queue ${c.index}: size ${c.size} is not in 1..${MAX_QUEUE_SIZE}`);
    this.ring = locate(mem, c.descGpa, 16 * c.size, 16, `queue ${c.index} descriptor ring`);
    this.table = new DescriptorTable().at(this.ring.win, this.ring.off, 16 * c.size);
    this.driverArea = locate(mem, c.availGpa, 4, 4, `queue ${c.index} driver event area`);
    this.deviceArea = locate(mem, c.usedGpa, 4, 4, `queue ${c.index} device event area`);
    this.ringU16 = this.ring.win.u16;
    this.ringFlags0 = (this.ring.off + 14) / 2;
    // GET/SET_VRING_BASE for packed rings: index in bits 0-14, wrap counter in bit 15 (a fresh
    // ring is 0x8000: index 0, counter set; 0 is index 0 after an odd number of wraps, and the
    // handler passes 0x8000 for a ring the front-end gave no base). The used side continues where
    // the available side stopped, unless the front-end says otherwise (bits 16-31, as QEMU sends
    // them, or nextUsed).
    const avail = c.nextAvail & 0xffff;
    const used = c.nextUsed ?? (c.nextAvail > 0xffff ? c.nextAvail >>> 16 : avail);
    this.availIdx = (avail & 0x7fff) % c.size;
    this.availWrap = (avail & WRAP) !== 0;
    this.usedIdx = (used & 0x7fff) % c.size;
    this.usedWrap = (used & WRAP) !== 0;
    this.byId = new Array(c.size);
    this.log = c.log ? DirtyLog.borrow(c.log) : null;
    this.inflight = c.inflight ? new PackedInflight(c.inflight, c.size) : null;
    if (this.inflight !== null) this.recover(planPackedRecovery(c.inflight!, c.size, slotFlagsReader(this.ring)));
  }

  /**
   * Takes the region's word over the front-end's base (after a crash QEMU gives the base of the
   * last ring start again: it has no used index in guest memory to read): the ring's used side
   * resumes where the region says the last publication left it, its available side past the
   * chains still in flight, which are resubmitted first.
   */
  private recover(plan: PackedRecoveryPlan): void {
    const given = this.nextUsed;
    const chains = this.inflight!.recover(plan, given);
    if (plan.fresh) return;
    const base = this.availPos;
    this.usedIdx = plan.usedPos & 0x7fff;
    this.usedWrap = (plan.usedPos & WRAP) !== 0;
    this.availIdx = plan.availPos & 0x7fff;
    this.availWrap = (plan.availPos & WRAP) !== 0;
    this.scrubPartialBatch(chains);
    this.resubmit.push(...chains);
    const interrupted = plan.batchPublished === null ? "" : `; an interrupted publication was ${plan.batchPublished ? "completed" : "rolled back"}`;
    const message = `queue ${this.index}: inflight region: used side at ${hex(plan.usedPos)}, available side at ${hex(plan.availPos)} (the front-end's base: ${hex(base)}, used ${hex(given)})${interrupted}`;
    if (chains.length > 0) logger.info(`${message}; resubmitting ${chains.length} chain(s) left in flight by the previous backend`);
    else logger.debug(message);
  }

  /**
   * A batch the last process had begun to publish (its first used descriptor last) and rolled
   * back may have left later used descriptors flagged in the slots of chains still in flight; the
   * driver would take one for a completion when it reaches that slot. Those slots are the
   * device's until it publishes there: each is set back to how the driver made it available.
   */
  private scrubPartialBatch(chains: SavedChain[]): void {
    let slot = this.usedIdx;
    let wrap = this.usedWrap;
    let total = 0;
    for (const c of chains) total += c.num;
    for (let i = 0; i < total; i++) {
      const at = this.ringFlags0 + slot * 8;
      const f = Atomics.load(this.ringU16, at);
      const usedForm = wrap ? F_AVAIL | F_USED : 0;
      if ((f & (F_AVAIL | F_USED)) === usedForm) {
        Atomics.store(this.ringU16, at, (f & ~(F_AVAIL | F_USED)) | (wrap ? F_AVAIL : F_USED));
        this.log?.mark(this.config.descGpa + slot * 16 + 14, 2);
      }
      if (++slot === this.size) {
        slot = 0;
        wrap = !wrap;
      }
    }
  }

  private get availPos(): number {
    return this.availIdx | (this.availWrap ? WRAP : 0);
  }

  /** Where a stop leaves the ring: before the first rewound chain taken from it, if any. */
  get nextAvail(): number {
    for (const p of this.stash) if (p.from >= 0) return p.from;
    return this.availPos;
  }

  get nextUsed(): number {
    return this.usedIdx | (this.usedWrap ? WRAP : 0);
  }

  position(): RingPosition {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  private descAvailable(slot: number, wrap: boolean): boolean {
    const f = Atomics.load(this.ringU16, this.ringFlags0 + slot * 8);
    return ((f & F_AVAIL) !== 0) === wrap && ((f & F_USED) !== 0) !== wrap;
  }

  pending(): number {
    if (this.broken) return 0;
    return this.stash.length > 0 || this.resubmit.length > 0 || this.descAvailable(this.availIdx, this.availWrap) ? 1 : 0;
  }

  pop(): DescriptorChain | null {
    if (this.broken) return null;
    const again = this.stash.shift();
    if (again !== undefined) {
      this.track(again);
      return again.chain;
    }
    while (this.resubmit.length > 0) {
      const chain = this.popResubmitted(this.resubmit.shift()!);
      if (chain !== null) return chain;
    }
    for (;;) {
      if (this.broken || !this.descAvailable(this.availIdx, this.availWrap)) return null;
      const from = this.availPos;
      let walked: { id: number; count: number; chain: DescriptorChain | null; error: string | null; badId: boolean };
      try {
        walked = this.walk();
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.breakRing(e.message); // the chain's extent is unknown: the ring cannot be followed
        return null;
      }
      const { id, count } = walked;
      // Neither can be completed (no used descriptor may name them): skipped, as a split ring
      // skips such heads. The used side simply never gets these slots back. An inflight region
      // cannot record slots skipped so (after a crash the next process would place the ring's
      // available side before them): with one, the ring stops instead.
      const skip = walked.badId ? `buffer id ${id} (queue size ${this.size})` : this.byId[id] !== undefined ? `buffer id ${id} is already in flight` : null;
      if (skip !== null && this.inflight !== null) {
        this.breakRing(`${skip}; the inflight region cannot track a skipped chain`);
        return null;
      }
      this.advance(count);
      if (skip !== null) {
        this.guestError(`${skip}; chain skipped`);
        continue;
      }
      const popped: Popped = { id, count, from, seq: this.seq++, chain: walked.chain ?? new DescriptorChain(id), entry: 0, last: 0 };
      if (this.inflight !== null) {
        this.inflight.popped(count);
        popped.entry = this.inflight.first;
        popped.last = this.inflight.lastTaken;
      }
      this.track(popped);
      if (walked.error !== null) {
        this.guestError(`bad descriptor chain (buffer id ${id}): ${walked.error}; completed with length 0`);
        this.complete(id, 0, false);
        continue;
      }
      return popped.chain;
    }
  }

  /** A chain a crashed predecessor left in flight, rebuilt from the region's copy (its entries stay). */
  private popResubmitted(s: SavedChain): DescriptorChain | null {
    if (this.byId[s.id] !== undefined) return null; // the planner let no two chains share an id; the ring's own may not either
    const p: Popped = { id: s.id, count: s.num, from: -1, seq: this.seq++, chain: new DescriptorChain(s.id), entry: s.entry, last: s.last };
    this.track(p);
    try {
      for (let k = 0; k < s.descs.length; k++) {
        const d = s.descs[k]!;
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
          if (s.descs.length !== 1) throw new ChainError("an indirect descriptor must be alone in its chain");
          this.walkIndirect(p.chain, d.addr, d.len);
        } else appendBuffer(p.chain, this.mem, d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) !== 0);
      }
    } catch (e) {
      if (!(e instanceof ChainError)) throw e;
      this.guestError(`bad descriptor chain resubmitted from the inflight region (buffer id ${s.id}): ${e.message}; completed with length 0`);
      this.complete(s.id, 0, false);
      return null;
    }
    return p.chain;
  }

  private track(p: Popped): void {
    this.byId[p.id] = p;
    this.order.push(p);
    this.inFlight++;
  }

  private advance(n: number): void {
    this.availIdx += n;
    if (this.availIdx >= this.size) {
      this.availIdx -= this.size;
      this.availWrap = !this.availWrap;
    }
  }

  /**
   * Walks the chain at the available position. Its extent (count) and buffer id (of its last
   * descriptor) must be found, or the ring is broken (ChainError); a chain whose buffers are bad
   * is returned with `error` set, to be completed empty.
   */
  private walk(): { id: number; count: number; chain: DescriptorChain | null; error: string | null; badId: boolean } {
    const table = this.table;
    let slot = this.availIdx;
    let count = 0;
    let id = 0;
    let error: string | null = null;
    let chain: DescriptorChain | null = new DescriptorChain(0);
    const inflight = this.inflight;
    for (;;) {
      if (++count > this.size) throw new ChainError(`chain longer than the ring's ${this.size} descriptors`);
      const gpa = table.addr(slot);
      const len = table.len(slot);
      id = table.word12(slot);
      const flags = table.word14(slot);
      // Saved as read (uncommitted until popped()): the driver may not rely on the ring's copy.
      if (inflight !== null && !inflight.take(count - 1, gpa, len, id, flags)) {
        throw new ChainError(`more descriptors in flight than the ring's ${this.size}`);
      }
      if (error === null) {
        try {
          if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (count !== 1 || flags & VIRTQ_DESC_F_NEXT) throw new ChainError("an indirect descriptor must be alone in its chain");
            this.walkIndirect(chain!, gpa, len);
          } else appendBuffer(chain!, this.mem, gpa, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
        } catch (e) {
          if (!(e instanceof ChainError)) throw e;
          error = e.message;
          chain = null;
        }
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      slot = slot + 1 === this.size ? 0 : slot + 1;
    }
    if (id >= this.size) return { id, count, chain: null, error: null, badId: true };
    if (chain !== null) (chain as { head: number }).head = id;
    return { id, count, chain, error, badId: false };
  }

  private walkIndirect(chain: DescriptorChain, gpa: number, len: number): void {
    const table = this.indirectTable.atIndirect(this.mem, gpa, len, this.indirect, this.maxIndirect);
    // Packed indirect tables are read in order; NEXT is ignored in them (§2.8.19).
    for (let i = 0; i < len / 16; i++) {
      const flags = table.word14(i);
      if (flags & VIRTQ_DESC_F_INDIRECT) throw new ChainError("nested indirect table");
      appendBuffer(chain, this.mem, table.addr(i), table.len(i), (flags & VIRTQ_DESC_F_WRITE) !== 0);
    }
  }

  /**
   * Gives back the last `n` chains popped and not completed; they are handed out again first.
   * Refused (nothing changes) when the device completed a chain popped after the first of them:
   * its used descriptor may overwrite their slots, so a stop could not hand them back.
   */
  rewind(n = 1): void {
    if (n <= 0) return;
    if (n > this.order.length) throw new Error(`queue ${this.index}: rewind of ${n} chains, but only ${this.order.length} popped ones are in flight`);
    const first = this.order[this.order.length - n]!;
    if (this.lastCompletedSeq > first.seq) throw new Error(`queue ${this.index}: rewind of buffer ${first.id}, but a chain popped after it was already completed`);
    // Still in flight in the inflight region, which need not know: after a crash they are
    // resubmitted from there, and the ring resumes past them.
    for (let i = 0; i < n; i++) {
      const p = this.order.pop()!;
      this.byId[p.id] = undefined;
      this.inFlight--;
      this.stash.unshift(p);
    }
  }

  undoPop(): void {
    this.rewind(1);
  }

  /** Writes the used descriptor for buffer `id`; the driver sees it at the next flush(). */
  add(id: number, len: number): void {
    this.complete(id, len, true);
  }

  private complete(id: number, len: number, byDevice: boolean): void {
    const p = id >= 0 && id < this.size ? this.byId[id] : undefined;
    if (p === undefined) throw new Error(`queue ${this.index}: completion of buffer ${id}, which is not in flight`);
    // A malformed chain the queue completed itself does not stop a rewind over it (the guest's fault).
    if (byDevice && p.seq > this.lastCompletedSeq) this.lastCompletedSeq = p.seq;
    this.byId[id] = undefined;
    this.inFlight--;
    const k = this.order.indexOf(p);
    if (k >= 0) this.order.splice(k, 1);
    const slot = this.usedIdx;
    // The used descriptor's len and id; its flags are stored at flush (typed arrays: see DescriptorTable).
    const t = this.table;
    t.u32[t.base + 4 * slot + 2] = len;
    t.u16[2 * (t.base + 4 * slot) + 6] = id;
    this.pendingUsed.push({ slot, flags: (this.usedWrap ? F_AVAIL | F_USED : 0) | (len > 0 ? VIRTQ_DESC_F_WRITE : 0), p });
    this.log?.markWritten(p.chain, len);
    this.usedIdx += p.count;
    if (this.usedIdx >= this.size) {
      this.usedIdx -= this.size;
      this.usedWrap = !this.usedWrap;
    }
  }

  /**
   * Publishes the used descriptors written since the last flush: their flags, the first one last
   * (so the driver sees the batch at once), each store a release barrier. With an inflight
   * region, the batch is released there before and committed after (see src/inflight_packed.ts).
   */
  flush(): void {
    const batch = this.pendingUsed;
    if (batch.length === 0) return;
    this.pendingUsed = [];
    const inflight = this.inflight;
    if (inflight !== null) {
      for (let i = 0; i < batch.length; i++) inflight.released(batch[i]!.p.entry, batch[i]!.p.last, batch[i]!.p.count);
      inflight.releasedAll();
    }
    for (let i = batch.length - 1; i >= 0; i--) {
      const u = batch[i]!;
      Atomics.store(this.ringU16, this.ringFlags0 + u.slot * 8, u.flags);
      this.log?.mark(this.config.descGpa + u.slot * 16, 16);
    }
    if (inflight !== null) {
      for (let i = 0; i < batch.length; i++) inflight.cleared(batch[i]!.p.entry);
      inflight.commit();
    }
    if (this.log !== null && this.config.logFd !== undefined) signal(this.config.logFd);
    if (this.notifyLater !== null) this.notifyLater();
    else if (this.needsNotification()) this.notify();
  }

  /** No cheap estimate on a packed ring: never counts as busy for coalescing. */
  driverOutstanding(): number {
    return 0;
  }

  notifyIfNeeded(): void {
    if (this.needsNotification()) this.notify();
  }

  /**
   * The driver's event suppression (QEMU's virtio_packed_should_notify). Positions are counted
   * modulo two rings (index, plus the ring size while the wrap counter is set), so a batch that
   * wraps the used side is measured exactly (QEMU's u16 arithmetic treats it as 64K entries).
   */
  private needsNotification(): boolean {
    const u16 = this.driverArea.win.u16;
    const at = this.driverArea.off / 2;
    const flags = Atomics.load(u16, at + 1);
    const span = 2 * this.size;
    const now = this.usedIdx + (this.usedWrap ? this.size : 0);
    const old = this.signalledUsed;
    this.signalledUsed = now;
    if (flags === EVENT_DISABLE) return false;
    if (flags !== EVENT_DESC || !this.eventIdx) return true;
    if (old === null) return true;
    const offWrap = Atomics.load(u16, at);
    const off = ((offWrap & 0x7fff) % this.size) + ((offWrap & WRAP) !== 0 ? this.size : 0);
    // vring_need_event(): notify if the driver's event lies in [old, now).
    return (now - off - 1 + 2 * span) % span < (now - old + span) % span;
  }

  notify(): void {
    if (this.callFd >= 0) signal(this.callFd);
  }

  private setDeviceEvent(flags: number, offWrap?: number): void {
    const u16 = this.deviceArea.win.u16;
    const at = this.deviceArea.off / 2;
    if (offWrap !== undefined) Atomics.store(u16, at, offWrap);
    Atomics.store(u16, at + 1, flags);
    this.log?.mark(this.config.usedGpa, 4);
  }

  disableNotification(): void {
    this.setDeviceEvent(EVENT_DISABLE);
  }

  enableNotification(): boolean {
    if (this.broken) return false;
    if (this.eventIdx) this.setDeviceEvent(EVENT_DESC, this.availPos);
    else this.setDeviceEvent(EVENT_ENABLE);
    return this.pending() !== 0;
  }
}

function hex(pos: number): string {
  return `0x${pos.toString(16)}`;
}
