// The driver side of one packed virtqueue (virtio 1.2 §2.8) for tests, after Linux's
// drivers/virtio/virtio_ring.c (virtqueue_add_packed, virtqueue_get_buf_ctx_packed,
// virtqueue_kick_prepare_packed, virtqueue_enable_cb_prepare_packed): a descriptor ring in
// GuestRam, the driver and device event suppression areas, both wrap counters, buffer ids from a
// free list, chains made available by writing their first descriptor's flags last.
import { eventfd, drain, signal } from "../../ffi/eventfd.ts";
import { close } from "../../ffi/libc.ts";
import { type GuestRam, type BufferSpec, type Vmm, Req, u64, vringState, vringAddr, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT } from "./frontend.ts";

export const VRING_PACKED_DESC_F_AVAIL = 1 << 7;
export const VRING_PACKED_DESC_F_USED = 1 << 15;
export const VRING_PACKED_EVENT_FLAG_ENABLE = 0;
export const VRING_PACKED_EVENT_FLAG_DISABLE = 1;
export const VRING_PACKED_EVENT_FLAG_DESC = 2;
const WRAP = 1 << 15;

/** One descriptor as a hostile test writes it (the driver adds the AVAIL/USED bits). */
export interface RawDesc {
  gpa: number;
  len: number;
  flags: number;
  id: number;
}

export interface UsedDesc {
  id: number;
  len: number;
  flags: number;
  /** Ring slot the used descriptor was read from. */
  slot: number;
}

/** vring_need_event(): true if `event` lies in [old, now) (u16 arithmetic, as Linux). */
function needEvent(event: number, now: number, old: number): boolean {
  return ((now - event - 1) & 0xffff) < ((now - old) & 0xffff);
}

export class PackedDriverQueue {
  /** Descriptor ring, driver event area (we write), device event area (the device writes). */
  readonly desc: number;
  readonly driverEvent: number;
  readonly deviceEvent: number;
  readonly kick = eventfd();
  readonly call = eventfd();
  /** Next slot to fill and our (avail) wrap counter. */
  nextAvail = 0;
  availWrap = true;
  /** Next slot to read a used descriptor from and the used wrap counter we expect. */
  lastUsed = 0;
  usedWrap = true;
  /** Descriptors not taken by chains in flight. */
  numFree: number;
  /** Descriptors made available since the last kick decision. */
  private numAdded = 0;
  private freeIds: number[];
  /** Ring descriptors each buffer id in flight took (Linux's desc_state[id].num). */
  readonly inFlight = new Map<number, number>();
  /** Kicks actually sent (after the device's event suppression). */
  kicks = 0;

  constructor(readonly ram: GuestRam, readonly index: number, readonly size: number, readonly eventIdx = false) {
    this.desc = ram.alloc(16 * size, 16);
    this.driverEvent = ram.alloc(4, 4);
    this.deviceEvent = ram.alloc(4, 4);
    this.numFree = size;
    this.freeIds = Array.from({ length: size }, (_, i) => i);
  }

  private o(gpa: number): number {
    return gpa - this.ram.gpaBase;
  }

  /** The AVAIL/USED bits that make a descriptor available under wrap counter `wrap`. */
  static availFlags(wrap: boolean): number {
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
  }

  /** Where the driver stands: next avail slot | wrap << 15 (what SET_VRING_BASE carries). */
  get availPos(): number {
    return this.nextAvail | (this.availWrap ? WRAP : 0);
  }

  get usedPos(): number {
    return this.lastUsed | (this.usedWrap ? WRAP : 0);
  }

  /** Writes one 16-byte descriptor (addr, len, id, flags) at `slot` of table `tableGpa`. */
  writeDesc(tableGpa: number, slot: number, gpa: number, len: number, id: number, flags: number): void {
    const o = this.o(tableGpa) + 16 * slot;
    const dv = this.ram.dv;
    dv.setUint32(o, gpa % 0x1_0000_0000, true);
    dv.setUint32(o + 4, Math.floor(gpa / 0x1_0000_0000), true);
    dv.setUint32(o + 8, len, true);
    dv.setUint16(o + 12, id, true);
    dv.setUint16(o + 14, flags, true);
  }

  flagsAt(slot: number): number {
    return Atomics.load(this.ram.u16, this.o(this.desc) / 2 + slot * 8 + 7);
  }

  private takeId(): number {
    const id = this.freeIds.shift();
    if (id === undefined) throw new Error("no free buffer id");
    return id;
  }

  /**
   * Makes `bufs` available as one chain (or one indirect descriptor); returns its buffer id.
   * `kick`: true kicks always, "auto" only if the device's event suppression asks for it.
   */
  addChain(bufs: BufferSpec[], opts: { indirect?: boolean; kick?: boolean | "auto"; misalign?: number } = {}): number {
    const id = this.takeId();
    if (opts.indirect) {
      // `misalign`: the table starts that many bytes past a 16-byte boundary (the spec asks no alignment of it).
      const table = this.ram.alloc(16 * bufs.length + (opts.misalign ?? 0), 16) + (opts.misalign ?? 0);
      bufs.forEach((b, i) => this.writeDesc(table, i, b.gpa, b.len, 0, b.write ? VIRTQ_DESC_F_WRITE : 0));
      this.addRaw([{ gpa: table, len: 16 * bufs.length, flags: VIRTQ_DESC_F_INDIRECT, id }], { kick: opts.kick, track: id });
    } else {
      const descs = bufs.map((b, i) => ({ gpa: b.gpa, len: b.len, id, flags: (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F_NEXT : 0) }));
      this.addRaw(descs, { kick: opts.kick, track: id });
    }
    return id;
  }

  /**
   * Writes `descs` at the next slots as they are (hostile chains), adding each slot's AVAIL/USED
   * bits, the first descriptor's flags last (release); `track`: the buffer id the driver expects
   * back (it then reclaims descs.length slots when that id is used), or null for none.
   */
  addRaw(descs: RawDesc[], opts: { kick?: boolean | "auto"; track?: number | null; headFlagsOverride?: number } = {}): void {
    if (descs.length > this.numFree) throw new Error(`ring full: ${descs.length} descriptors wanted, ${this.numFree} free`);
    const head = this.nextAvail;
    const headWrap = this.availWrap;
    let slot = this.nextAvail;
    let wrap = this.availWrap;
    descs.forEach((d, i) => {
      const flags = d.flags | PackedDriverQueue.availFlags(wrap);
      if (i === 0) this.writeDesc(this.desc, slot, d.gpa, d.len, d.id, this.flagsAt(slot));
      else this.writeDesc(this.desc, slot, d.gpa, d.len, d.id, flags);
      if (++slot === this.size) {
        slot = 0;
        wrap = !wrap;
      }
    });
    this.nextAvail = slot;
    this.availWrap = wrap;
    this.numFree -= descs.length;
    this.numAdded += descs.length;
    const track = opts.track === undefined ? descs[descs.length - 1]!.id : opts.track;
    if (track !== null) {
      if (this.inFlight.has(track)) throw new Error(`driver: id ${track} already in flight`);
      this.inFlight.set(track, descs.length);
      const k = this.freeIds.indexOf(track);
      if (k >= 0) this.freeIds.splice(k, 1);
    }
    // virtio_wmb, then the head's flags: the chain becomes available at once.
    Atomics.store(this.ram.u16, this.o(this.desc) / 2 + head * 8 + 7, opts.headFlagsOverride ?? (descs[0]!.flags | PackedDriverQueue.availFlags(headWrap)));
    const kick = opts.kick ?? true;
    if (kick === "auto") this.kickIfNeeded();
    else if (kick) this.doKick();
  }

  private doKick(): void {
    this.numAdded = 0;
    this.kicks++;
    signal(this.kick);
  }

  /** virtqueue_kick_prepare_packed: whether the device's event suppression wants this kick. */
  kickPrepare(): boolean {
    const newIdx = this.nextAvail;
    const old = (newIdx - this.numAdded) & 0xffff;
    this.numAdded = 0;
    const offWrap = Atomics.load(this.ram.u16, this.o(this.deviceEvent) / 2);
    const flags = Atomics.load(this.ram.u16, this.o(this.deviceEvent) / 2 + 1);
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC) return flags !== VRING_PACKED_EVENT_FLAG_DISABLE;
    let event = offWrap & 0x7fff;
    if (((offWrap & WRAP) !== 0) !== this.availWrap) event -= this.size;
    return needEvent(event & 0xffff, newIdx, old);
  }

  kickIfNeeded(): boolean {
    const added = this.numAdded;
    if (!this.kickPrepare()) return false;
    this.numAdded = added;
    this.doKick();
    return true;
  }

  /** The device's event suppression area (it asks us for kicks). */
  deviceEventArea(): { offWrap: number; flags: number } {
    const at = this.o(this.deviceEvent) / 2;
    return { offWrap: Atomics.load(this.ram.u16, at), flags: Atomics.load(this.ram.u16, at + 1) };
  }

  /** Writes our event suppression area (used-buffer notifications). */
  setDriverEvent(flags: number, offWrap?: number): void {
    const at = this.o(this.driverEvent) / 2;
    if (offWrap !== undefined) Atomics.store(this.ram.u16, at, offWrap);
    Atomics.store(this.ram.u16, at + 1, flags);
  }

  /** virtqueue_disable_cb_packed. */
  disableCb(): void {
    this.setDriverEvent(VRING_PACKED_EVENT_FLAG_DISABLE);
  }

  /** virtqueue_enable_cb_prepare_packed: a call at the next used descriptor (EVENT_IDX) or any. */
  enableCb(): void {
    if (this.eventIdx) this.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, this.usedPos);
    else this.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
  }

  /** virtqueue_enable_cb_delayed_packed: a call once the used side reaches `bufs` slots ahead. */
  enableCbDelayed(bufs: number): void {
    let idx = this.lastUsed + bufs;
    let wrap = this.usedWrap;
    if (idx >= this.size) {
      idx -= this.size;
      wrap = !wrap;
    }
    this.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, idx | (wrap ? WRAP : 0));
  }

  /** is_used_desc_packed. */
  isUsed(slot: number, wrap: boolean): boolean {
    const f = this.flagsAt(slot);
    const avail = (f & VRING_PACKED_DESC_F_AVAIL) !== 0;
    const used = (f & VRING_PACKED_DESC_F_USED) !== 0;
    return avail === used && used === wrap;
  }

  /** Used descriptors published since the last call (each reclaims its chain's slots and id). */
  takeUsed(): UsedDesc[] {
    const out: UsedDesc[] = [];
    while (this.isUsed(this.lastUsed, this.usedWrap)) {
      const o = this.o(this.desc) + 16 * this.lastUsed;
      const dv = this.ram.dv;
      const u: UsedDesc = { id: dv.getUint16(o + 12, true), len: dv.getUint32(o + 8, true), flags: dv.getUint16(o + 14, true), slot: this.lastUsed };
      const num = this.inFlight.get(u.id);
      if (num === undefined) throw new Error(`driver: used descriptor names id ${u.id}, which is not in flight`);
      this.inFlight.delete(u.id);
      this.freeIds.push(u.id);
      this.numFree += num;
      out.push(u);
      this.lastUsed += num;
      if (this.lastUsed >= this.size) {
        this.lastUsed -= this.size;
        this.usedWrap = !this.usedWrap;
      }
    }
    return out;
  }

  /** Waits until `count` used descriptors arrived (polling), or throws after `timeoutMs`. */
  async waitUsed(count: number, timeoutMs = 5000): Promise<UsedDesc[]> {
    const got: UsedDesc[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      got.push(...this.takeUsed());
      if (got.length >= count) return got;
      if (Date.now() > deadline) throw new Error(`packed queue ${this.index}: ${got.length}/${count} used descriptors after ${timeoutMs} ms`);
      await Bun.sleep(1);
    }
  }

  /** Call notifications since the last read. */
  calls(): number {
    return drain(this.call);
  }

  dispose(): void {
    close(this.kick);
    close(this.call);
  }
}

/**
 * Starts packed ring `q` on the backend (what QEMU's vhost_virtqueue_start sends: the descriptor
 * ring as desc, the device area as used, the driver area as avail); `base` null sends no
 * SET_VRING_BASE (the backend must start a fresh ring at 0x8000).
 */
export function startPackedQueue(vmm: Vmm, q: PackedDriverQueue, base: number | null = q.availPos): void {
  const c = vmm.conn;
  const ok = (v: bigint, what: string) => {
    if (v !== 0n) throw new Error(`${what} refused`);
  };
  ok(c.ack(Req.SET_VRING_NUM, vringState(q.index, q.size)), "SET_VRING_NUM");
  if (base !== null) ok(c.ack(Req.SET_VRING_BASE, vringState(q.index, base)), "SET_VRING_BASE");
  ok(c.ack(Req.SET_VRING_ADDR, vringAddr(q.index, q.ram.va(q.desc), q.ram.va(q.deviceEvent), q.ram.va(q.driverEvent))), "SET_VRING_ADDR");
  ok(c.ack(Req.SET_VRING_CALL, u64(q.index), [q.call]), "SET_VRING_CALL");
  ok(c.ack(Req.SET_VRING_KICK, u64(q.index), [q.kick]), "SET_VRING_KICK");
  ok(c.ack(Req.SET_VRING_ENABLE, vringState(q.index, 1)), "SET_VRING_ENABLE");
}

/** GET_VRING_BASE: stops the ring; returns where it stopped (index | wrap << 15). */
export function getVringBase(vmm: Vmm, index: number): number {
  const r = vmm.conn.request(Req.GET_VRING_BASE, vringState(index, 0));
  return new DataView(r.payload.buffer).getUint32(4, true);
}
