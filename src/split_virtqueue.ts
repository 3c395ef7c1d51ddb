// The device side of a split virtqueue (virtio 1.2 §2.7). Guest memory is untrusted and shared:
// each descriptor field is read exactly once, every buffer is checked against the memory table,
// chains are bounded (so loops end), and index publication uses Atomics for the memory barriers.
import type { GuestMemory } from "./memory.ts";
import { DescriptorChain, ChainError, appendBuffer } from "./chain.ts";
import { DirtyLog } from "./dirty_log.ts";
import { QueueInflight, checkReplay } from "./inflight.ts";
import { signal } from "../ffi/eventfd.ts";
import { VirtqueueBase } from "./virtqueue_base.ts";
import { log } from "./log.ts";
import {
  VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT, MAX_QUEUE_SIZE,
  locate, DescriptorTable, type VirtqueueConfig, type RingPosition,
} from "./ring.ts";
import type { Virtqueue } from "./virtqueue.ts";

const VIRTQ_USED_F_NO_NOTIFY = 1;
const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
const SLOT_CHAIN = 1;
const SLOT_SKIPPED = 2;
const SLOT_COMPLETED = 3;

/** Throws if `c` does not describe a split ring that lies in `mem` (what the constructor checks). */
export function checkSplitRing(mem: GuestMemory, c: VirtqueueConfig): void {
  checkSize(c);
  locate(mem, c.descGpa, 16 * c.size, 16, `queue ${c.index} descriptor table`);
  locate(mem, c.availGpa, 6 + 2 * c.size, 2, `queue ${c.index} available ring`);
  locate(mem, c.usedGpa, 6 + 8 * c.size, 4, `queue ${c.index} used ring`);
}

function checkSize(c: VirtqueueConfig): void {
  if (c.size === 0 || c.size > MAX_QUEUE_SIZE || (c.size & (c.size - 1)) !== 0) {
    throw new Error(`queue ${c.index}: size ${c.size} is not a power of 2 in 1..${MAX_QUEUE_SIZE}`);
  }
}

export class SplitVirtqueue extends VirtqueueBase implements Virtqueue {
  /** Next available-ring slot to take (free-running u16). */
  nextAvail: number;
  /** Next used-ring slot to fill (free-running u16). */
  nextUsed: number;
  private signalledUsed: number | null = null;
  /** Chains popped and not yet completed; `inFlightHead[h]` is 1 while head h is one of them. */
  inFlight = 0;
  private readonly inFlightHead: Uint8Array;
  /**
   * What the last pass over each available slot did, for rewind: `slotPass[s]` is the available
   * index that visited slot s, plus 1 (0: none), and `slotKind[s]` what came of it (a chain, whose
   * head is `poppedHead[s]`; an entry skipped; a malformed chain completed on the spot).
   */
  private readonly slotPass: Int32Array;
  private readonly slotKind: Uint8Array;
  private readonly poppedHead: Uint16Array;
  private unpublished = false;

  /** The descriptor table, and a view re-pointed at each indirect table (see DescriptorTable). */
  private readonly table: DescriptorTable;
  private readonly indirectTable = new DescriptorTable();
  /** The indirect descriptor walkTable stopped at. */
  private indirectGpa = 0;
  private indirectLen = 0;
  private readonly availU16: Uint16Array;
  private readonly availFlags: number;
  private readonly availIdx: number;
  private readonly availRing: number;
  private readonly usedEvent: number;
  private readonly usedU32: Uint32Array;
  private readonly usedU16: Uint16Array;
  private readonly usedFlags: number;
  private readonly usedIdx: number;
  private readonly usedRing: number;
  private readonly availEvent: number;
  /** Dirty logging (see src/dirty_log.ts): the log, where the used ring is, and the chains in flight. */
  private readonly log: DirtyLog | null;
  private readonly usedLogGpa: number;
  /** The chain object of each head (see walk); at completion, what the dirty log marks. */
  private readonly chains: (DescriptorChain | undefined)[];
  /** Inflight tracking (see src/inflight.ts), and the heads a crashed predecessor left in flight. */
  private readonly inflightRegion: QueueInflight | null;
  private resubmit: number[] = [];
  /** Heads popped from `resubmit`, in order (so rewind can give them back there). */
  private readonly resubmitted: number[] = [];
  /** Available slots passed since the queue was built: rewinding past them gives back resubmitted heads. */
  private availPassed = 0;

  /** The ring position now: where a stop leaves it. */
  position(): RingPosition {
    return { nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  constructor(private readonly mem: GuestMemory, c: VirtqueueConfig) {
    super(c);
    checkSize(c);
    this.nextAvail = c.nextAvail & 0xffff;
    const desc = locate(mem, c.descGpa, 16 * c.size, 16, `queue ${c.index} descriptor table`);
    this.table = new DescriptorTable().at(desc.win, desc.off, 16 * c.size);
    const avail = locate(mem, c.availGpa, 6 + 2 * c.size, 2, `queue ${c.index} available ring`);
    const used = locate(mem, c.usedGpa, 6 + 8 * c.size, 4, `queue ${c.index} used ring`);
    this.availU16 = avail.win.u16;
    this.availFlags = avail.off / 2;
    this.availIdx = this.availFlags + 1;
    this.availRing = this.availFlags + 2;
    this.usedEvent = this.availRing + c.size;
    this.usedU32 = used.win.u32;
    this.usedU16 = used.win.u16;
    this.usedFlags = used.off / 2;
    this.usedIdx = this.usedFlags + 1;
    this.usedRing = used.off + 4;
    this.availEvent = (used.off + 4 + 8 * c.size) / 2;
    // The used index in guest memory is where the previous owner of the ring stopped.
    this.nextUsed = c.nextUsed ?? Atomics.load(this.usedU16, this.usedIdx);
    this.inflightRegion = c.inflight ? new QueueInflight(c.inflight, c.size) : null;
    if (this.inflightRegion !== null) {
      // After a crash: what the last backend had popped and not completed is served first, in
      // its original order; the available ring continues after them (libvhost-user does the same).
      // The region is the front-end's word: it is checked against the ring first, and one that
      // does not fit (stale, forged) is not replayed at all (libvhost-user trusts it).
      const usedNow = Atomics.load(this.usedU16, this.usedIdx);
      const heads = this.inflightRegion.recover(usedNow);
      const refused = heads.length === 0 ? null : checkReplay(heads, usedNow, Atomics.load(this.availU16, this.availIdx), c.size, (i) => this.availU16[this.availRing + (i & (c.size - 1))]!);
      if (refused !== null) {
        log.warn(`queue ${c.index}: inflight region refused, nothing replayed: ${refused}; the ring continues from its own indices`);
        this.inflightRegion.restart(usedNow);
      } else if (heads.length > 0) {
        log.info(`queue ${c.index}: resubmitting ${heads.length} chain(s) left in flight by the previous backend`);
        this.resubmit = heads;
        this.nextUsed = usedNow;
        this.nextAvail = (this.nextUsed + heads.length) & 0xffff;
      }
    }

    this.log = c.log ? DirtyLog.borrow(c.log) : null;
    this.usedLogGpa = c.usedLogGpa ?? c.usedGpa;
    this.chains = new Array(c.size);
    this.inFlightHead = new Uint8Array(c.size);
    this.poppedHead = new Uint16Array(c.size);
    this.slotPass = new Int32Array(c.size);
    this.slotKind = new Uint8Array(c.size);
  }

  /**
   * Number of chains the driver has made available and we have not taken; 0 once the ring is
   * broken, so no "re-check for more work" loop can spin on a ring that will never yield a chain.
   */
  pending(): number {
    if (this.broken) return 0;
    return (Atomics.load(this.availU16, this.availIdx) - this.nextAvail) & 0xffff;
  }

  /**
   * Takes the next available chain, or null when there is none. A malformed chain is logged and
   * completed with length 0 (so the guest gets its buffers back), and the next one is tried.
   */
  pop(): DescriptorChain | null {
    while (this.resubmit.length > 0 && !this.broken) {
      const head = this.resubmit.shift()!;
      if (head >= this.size || this.inFlightHead[head] !== 0) continue;
      this.inFlightHead[head] = 1;
      this.inFlight++;
      this.resubmitted.push(head);
      try {
        return this.walk(head);
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.resubmitted.pop();
        this.guestError(`bad descriptor chain at resubmitted head ${head}: ${e.message}; completed with length 0`);
        this.add(head, 0);
      }
    }
    for (;;) {
      if (this.broken) return null;
      const pending = this.pending();
      if (pending === 0) return null;
      if (pending > this.size) {
        this.breakRing(`available index moved ${pending} entries ahead (queue size ${this.size})`);
        return null;
      }
      const index = this.nextAvail;
      const slot = index & (this.size - 1);
      this.nextAvail = (index + 1) & 0xffff;
      this.availPassed++;
      if (this.slotPass[slot] === index + 1 && this.slotKind[slot] === SLOT_COMPLETED) continue; // completed before a rewind
      this.slotPass[slot] = index + 1;
      this.slotKind[slot] = SLOT_SKIPPED;
      const head = this.availU16[this.availRing + slot]!;
      if (head >= this.size) {
        this.guestError(`available ring names descriptor ${head} (queue size ${this.size}); skipped`);
        continue;
      }
      if (this.inFlightHead[head] !== 0) {
        // Completing it would complete the one in flight twice: the driver broke the protocol.
        this.guestError(`available ring names descriptor ${head}, which is already in flight; skipped`);
        continue;
      }
      this.inFlightHead[head] = 1;
      this.inFlight++;
      this.poppedHead[slot] = head;
      this.inflightRegion?.popped(head);
      try {
        const chain = this.walk(head);
        this.slotKind[slot] = SLOT_CHAIN;
        return chain;
      } catch (e) {
        if (!(e instanceof ChainError)) throw e;
        this.guestError(`bad descriptor chain at head ${head}: ${e.message}; completed with length 0`);
        this.slotKind[slot] = SLOT_COMPLETED;
        this.add(head, 0);
      }
    }
  }

  /**
   * Walks and checks the chain starting at `head`: in the descriptor table, then in the indirect
   * table its last descriptor may name, each by a loop of its own (walkTable).
   */
  private walk(head: number): DescriptorChain {
    // One chain object per head, reused: the head is not in flight (pop refuses one that is), so
    // whoever had this object last completed it.
    let chain = this.chains[head];
    if (chain === undefined) chain = this.chains[head] = new DescriptorChain(head);
    else chain.reuse();
    if (this.walkTable(chain, this.table, this.size, head) < 0) return chain;
    // The indirect descriptor's address and length, as walkTable read them (each field once).
    const len = this.indirectLen;
    const table = this.indirectTable.atIndirect(this.mem, this.indirectGpa, len, this.indirect, this.maxIndirect);
    if (this.walkTable(chain, table, len / 16, 0) >= 0) throw new ChainError("nested indirect table");
    return chain;
  }

  /**
   * Appends the buffers of the chain at entry `idx` of `table` (of `tableSize` entries) to `chain`.
   * Returns -1 at the chain's end, or the index of the indirect descriptor that ends the chain here
   * (its address and length left in indirectGpa/indirectLen).
   */
  private walkTable(chain: DescriptorChain, table: DescriptorTable, tableSize: number, idx: number): number {
    for (let count = 1; ; count++) {
      if (idx >= tableSize) throw new ChainError(`next index ${idx} outside table of ${tableSize}`);
      if (count > tableSize) throw new ChainError(`chain longer than ${tableSize} descriptors (loop?)`);
      const gpa = table.addr(idx);
      const len = table.len(idx);
      const flags = table.word12(idx);
      const next = table.word14(idx);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (flags & VIRTQ_DESC_F_NEXT) throw new ChainError("indirect descriptor with NEXT set");
        this.indirectGpa = gpa;
        this.indirectLen = len;
        return idx;
      }
      appendBuffer(chain, this.mem, gpa, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return -1;
      idx = next;
    }
  }

  /**
   * Gives back the last `n` chains popped and not completed, so they are popped again (a request
   * the device could not start; MRG_RXBUF chains a frame did not need). Chains popped before them
   * may still be in flight; the rewound ones must be the most recent pops. Entries pop() skipped
   * or completed among them are passed over again without effect.
   */
  rewind(n = 1): void {
    // Checked completely first, so a refused rewind changes nothing.
    let index = this.nextAvail;
    let fromResubmitted = 0;
    let stepped = 0;
    for (let left = n; left > 0; ) {
      if (stepped === this.availPassed) {
        // Before the first pop from the available ring: the resubmitted heads, most recent first.
        const k = this.resubmitted.length - 1 - fromResubmitted;
        if (k < 0 || this.inFlightHead[this.resubmitted[k]!] === 0) throw new Error(`queue ${this.index}: rewind of ${n} chains, but only ${n - left} popped ones are not in flight`);
        fromResubmitted++;
        left--;
        continue;
      }
      index = (index - 1) & 0xffff;
      stepped++;
      const slot = index & (this.size - 1);
      if (this.slotPass[slot] !== index + 1) throw new Error(`queue ${this.index}: rewind of ${n} chains, but only ${n - left} popped ones are not in flight`);
      if (this.slotKind[slot] !== SLOT_CHAIN) continue;
      const head = this.poppedHead[slot]!;
      if (this.inFlightHead[head] === 0) throw new Error(`queue ${this.index}: rewind of chain ${head}, which is not in flight (already completed)`);
      left--;
    }
    for (let i = index; i !== this.nextAvail; i = (i + 1) & 0xffff) {
      const slot = i & (this.size - 1);
      if (this.slotKind[slot] !== SLOT_CHAIN) continue;
      const head = this.poppedHead[slot]!;
      this.inFlightHead[head] = 0;
      this.inFlight--;
      this.inflightRegion?.rewound(head);
    }
    for (let i = 0; i < fromResubmitted; i++) {
      // Still in flight in the region: they stay resubmissions.
      const head = this.resubmitted.pop()!;
      this.inFlightHead[head] = 0;
      this.inFlight--;
      this.resubmit.unshift(head);
    }
    this.availPassed -= stepped;
    this.nextAvail = index;
  }

  /** Puts the last popped chain back (rewind(1)). */
  undoPop(): void {
    this.rewind(1);
  }

  /**
   * Writes a used element; it becomes visible to the driver at the next flush(). Completing a
   * head that is not in flight is a device bug: refused (thrown), never shown to the driver.
   */
  add(head: number, len: number): void {
    if (head >= this.size || this.inFlightHead[head] === 0) throw new Error(`queue ${this.index}: completion of descriptor ${head}, which is not in flight`);
    this.inFlightHead[head] = 0;
    this.inFlight--;
    // The used element {id u32, len u32}; the used ring is 4-byte aligned (typed arrays, not a
    // DataView: see DescriptorTable).
    const w = this.usedRing / 4 + (this.nextUsed & (this.size - 1)) * 2;
    this.usedU32[w] = head;
    this.usedU32[w + 1] = len;
    if (this.log !== null) this.logCompletion(head, len); // after the writes it marks
    this.inflightRegion?.completed(head);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    this.unpublished = true;
  }

  /** Marks what completing `head` wrote: its writable bytes up to `len`, and the used element. */
  private logCompletion(head: number, len: number): void {
    const log = this.log!;
    // The head's chain as its walk left it (one that failed its walk completes with 0 bytes).
    const chain = this.chains[head];
    if (chain !== undefined) log.markWritten(chain, len);
    log.mark(this.usedLogGpa + 4 + (this.nextUsed & (this.size - 1)) * 8, 8);
  }

  /**
   * Publishes the used index (a full barrier) and notifies the driver if it asked to be, or leaves
   * that decision to `notifyLater` when set (notification coalescing, see src/notify_coalescer.ts).
   */
  flush(): void {
    if (!this.unpublished) return;
    this.unpublished = false;
    Atomics.store(this.usedU16, this.usedIdx, this.nextUsed);
    this.inflightRegion?.published(this.nextUsed);
    if (this.log !== null) {
      this.log.mark(this.usedLogGpa + 2, 2);
      if (this.config.logFd !== undefined) signal(this.config.logFd);
    }
    if (this.notifyLater !== null) this.notifyLater();
    else if (this.needsNotification()) this.notify();
  }

  /** Set by a coalescer: called instead of deciding on a notification at every flush. */
  notifyLater: (() => void) | null = null;

  /**
   * How many requests the driver has made available beyond the used index it last asked to hear
   * about (EVENT_IDX's used_event), i.e. roughly how many it has outstanding; 0 without EVENT_IDX.
   * Guest-written and only a hint: it steers timing, never what is accessed.
   */
  driverOutstanding(): number {
    if (!this.eventIdx) return 0;
    return (Atomics.load(this.availU16, this.availIdx) - Atomics.load(this.availU16, this.usedEvent)) & 0xffff;
  }

  /** Notifies the driver if what was published since the last notification calls for one. */
  notifyIfNeeded(): void {
    if (this.needsNotification()) this.notify();
  }

  private needsNotification(): boolean {
    if (!this.eventIdx) return (Atomics.load(this.availU16, this.availFlags) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    const newIdx = this.nextUsed;
    const old = this.signalledUsed;
    this.signalledUsed = newIdx;
    if (old === null) return true;
    const usedEvent = Atomics.load(this.availU16, this.usedEvent);
    // vring_need_event(): notify if used_event lies in [old, new).
    return ((newIdx - usedEvent - 1) & 0xffff) < ((newIdx - old) & 0xffff);
  }

  notify(): void {
    if (this.callFd >= 0) signal(this.callFd);
  }

  /** Asks the driver not to kick (used only without EVENT_IDX; with it, not re-arming is enough). */
  disableNotification(): void {
    if (!this.eventIdx) {
      Atomics.store(this.usedU16, this.usedFlags, VIRTQ_USED_F_NO_NOTIFY);
      this.log?.mark(this.usedLogGpa, 2);
    }
  }

  /**
   * Asks the driver to kick on new buffers; returns true if buffers arrived meanwhile (the caller
   * must then process them, or the kick may be lost).
   */
  enableNotification(): boolean {
    if (this.broken) return false;
    if (this.eventIdx) {
      Atomics.store(this.usedU16, this.availEvent, this.nextAvail);
      this.log?.mark(this.usedLogGpa + 4 + 8 * this.size, 2);
    } else {
      Atomics.store(this.usedU16, this.usedFlags, 0);
      this.log?.mark(this.usedLogGpa, 2);
    }
    return this.pending() !== 0;
  }
}