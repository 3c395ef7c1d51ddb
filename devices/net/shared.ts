// What the net device thread (control queue, feature negotiation) shares with the threads that
// move frames: the receive filter the driver programs (CTRL_RX, CTRL_MAC), whether received
// frames may be GSO-sized (the guest's offloads, which CTRL_GUEST_OFFLOADS may change at any time),
// and per-pair counters. One SharedArrayBuffer, one writer (the device thread), readers that
// tolerate a torn update (it affects the filtering of one frame at most).

export const RX_PROMISC = 1;
export const RX_ALLMULTI = 2;
export const RX_ALLUNI = 4;
export const RX_NOMULTI = 8;
export const RX_NOUNI = 16;
export const RX_NOBCAST = 32;

/** virtio-net's MAC filter table size: QEMU's MAC_TABLE_ENTRIES. */
export const MAC_TABLE_ENTRIES = 64;

/** Per-pair counters (one Int32 each; wrap is fine, they are for logs and tests). */
export const enum PairStat {
  TxFrames = 0,
  TxDropped = 1,
  RxFrames = 2,
  RxFiltered = 3,
  /** The guest had no receive buffers: reading paused until its next kick. */
  RxStalls = 4,
  /** The tap was full: transmit waited for EPOLLOUT. */
  TxBlocked = 5,
  RxDropped = 6,
}
const STATS_PER_PAIR = 8;
const MAX_PAIRS = 16;

// Int32 word indices.
const W_RX_MODE = 0;
const W_BIG_FRAMES = 1;
const W_UNI_COUNT = 2;
const W_MULTI_COUNT = 3;
const W_STATS = 16;
// Byte offsets.
const B_MAC = 1024;
const B_TABLE = 1040;
const SIZE = B_TABLE + 6 * MAC_TABLE_ENTRIES + 16;

export class NetShared {
  readonly i32: Int32Array;
  readonly u8: Uint8Array;

  constructor(readonly sab: SharedArrayBuffer = new SharedArrayBuffer(SIZE)) {
    this.i32 = new Int32Array(sab);
    this.u8 = new Uint8Array(sab);
  }

  get rxMode(): number {
    return Atomics.load(this.i32, W_RX_MODE);
  }
  set rxMode(v: number) {
    Atomics.store(this.i32, W_RX_MODE, v);
  }

  /** Received frames may be up to 64 KiB (the guest acked a receive GSO offload). */
  get bigFrames(): boolean {
    return Atomics.load(this.i32, W_BIG_FRAMES) === 1;
  }
  set bigFrames(v: boolean) {
    Atomics.store(this.i32, W_BIG_FRAMES, v ? 1 : 0);
  }

  get mac(): Uint8Array {
    return this.u8.slice(B_MAC, B_MAC + 6);
  }
  set mac(m: Uint8Array) {
    this.u8.set(m.subarray(0, 6), B_MAC);
  }

  /** The driver's MAC_TABLE_SET: unicast then multicast addresses (at most MAC_TABLE_ENTRIES together). */
  setTable(unicast: Uint8Array[], multicast: Uint8Array[]): void {
    const all = [...unicast, ...multicast];
    if (all.length > MAC_TABLE_ENTRIES) throw new Error(`MAC table of ${all.length} entries (at most ${MAC_TABLE_ENTRIES})`);
    all.forEach((m, i) => this.u8.set(m, B_TABLE + 6 * i));
    Atomics.store(this.i32, W_UNI_COUNT, unicast.length);
    Atomics.store(this.i32, W_MULTI_COUNT, multicast.length);
  }

  table(): { unicast: Uint8Array[]; multicast: Uint8Array[] } {
    const u = Atomics.load(this.i32, W_UNI_COUNT);
    const m = Atomics.load(this.i32, W_MULTI_COUNT);
    const at = (i: number) => this.u8.slice(B_TABLE + 6 * i, B_TABLE + 6 * i + 6);
    return { unicast: Array.from({ length: u }, (_, i) => at(i)), multicast: Array.from({ length: m }, (_, i) => at(u + i)) };
  }

  /**
   * Whether a frame for destination `d` (its first 6 bytes) passes the driver's filter, as
   * QEMU's receive_filter decides (virtio 1.2 §5.1.6.5.1). Promiscuous mode, the reset default,
   * passes everything without looking.
   */
  accepts(d: Uint8Array): boolean {
    const mode = this.rxMode;
    if (mode & RX_PROMISC) return true;
    const u = Atomics.load(this.i32, W_UNI_COUNT);
    const m = Atomics.load(this.i32, W_MULTI_COUNT);
    if (d[0]! & 1) {
      const broadcast = d[0] === 0xff && d[1] === 0xff && d[2] === 0xff && d[3] === 0xff && d[4] === 0xff && d[5] === 0xff;
      if (broadcast) return (mode & RX_NOBCAST) === 0;
      if (mode & RX_NOMULTI) return false;
      if (mode & RX_ALLMULTI) return true;
      return this.inTable(d, u, u + m);
    }
    if (mode & RX_NOUNI) return false;
    if (mode & RX_ALLUNI) return true;
    if (this.matches(d, B_MAC)) return true;
    return this.inTable(d, 0, u);
  }

  private inTable(d: Uint8Array, from: number, to: number): boolean {
    for (let i = from; i < to; i++) if (this.matches(d, B_TABLE + 6 * i)) return true;
    return false;
  }

  private matches(d: Uint8Array, at: number): boolean {
    const t = this.u8;
    return d[0] === t[at] && d[1] === t[at + 1] && d[2] === t[at + 2] && d[3] === t[at + 3] && d[4] === t[at + 4] && d[5] === t[at + 5];
  }

  count(pair: number, stat: PairStat, n = 1): void {
    if (pair < MAX_PAIRS) Atomics.add(this.i32, W_STATS + pair * STATS_PER_PAIR + stat, n);
  }

  stat(pair: number, stat: PairStat): number {
    return Atomics.load(this.i32, W_STATS + pair * STATS_PER_PAIR + stat);
  }
}
