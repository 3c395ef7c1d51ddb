// What the net device thread (control queue, feature negotiation, front-end requests) shares with
// the threads that move frames: the receive filter the driver programs (CTRL_RX, CTRL_MAC),
// whether received frames may be GSO-sized (the guest's offloads, which CTRL_GUEST_OFFLOADS may
// change at any time), the MTU (NET_SET_MTU), and per-pair counters. One SharedRecord
// (src/shared_record.ts): one writer (the device thread), readers that see whole values; the
// frame threads keep a copy of the filter and refresh it when the record's version moves.

import { SharedRecord, i32, bool, bytes, counters, type SharedRecordData } from "../../src/shared_record.ts";
import { metrics, type Counter } from "../../src/metrics.ts";

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

export const NET_SHARED_SCHEMA = {
  rxMode: i32,
  bigFrames: bool,
  mtu: i32,
  mac: bytes(6),
  unicastCount: i32,
  multicastCount: i32,
  /** Unicast addresses, then multicast ones, 6 bytes each. */
  table: bytes(6 * MAC_TABLE_ENTRIES),
  stats: counters(MAX_PAIRS * STATS_PER_PAIR),
};
export type NetSharedRecord = SharedRecord<typeof NET_SHARED_SCHEMA>;

/** The receive filter as a frame thread uses it: a plain copy, taken at one version of the record. */
interface Filter {
  version: number;
  mode: number;
  mac: Uint8Array;
  table: Uint8Array;
  unicast: number;
  multicast: number;
}

/** The --metrics series of a pair counter (updated by the thread serving the pair). */
function pairCounter(pair: number, stat: PairStat): Counter {
  const m = metrics();
  switch (stat) {
    case PairStat.TxFrames: return m.counter("vhost_net_frames", "Frames between the guest and the tap", { pair, direction: "tx" });
    case PairStat.RxFrames: return m.counter("vhost_net_frames", "Frames between the guest and the tap", { pair, direction: "rx" });
    case PairStat.TxDropped: return m.counter("vhost_net_dropped", "Frames dropped (malformed, refused by the tap, too large for the guest's buffers)", { pair, direction: "tx" });
    case PairStat.RxDropped: return m.counter("vhost_net_dropped", "Frames dropped (malformed, refused by the tap, too large for the guest's buffers)", { pair, direction: "rx" });
    case PairStat.RxFiltered: return m.counter("vhost_net_rx_filtered", "Received frames the guest's filter (MAC table, rx mode) refused", { pair });
    case PairStat.RxStalls: return m.counter("vhost_net_rx_stalls", "Times the guest had no receive buffers (reading paused until its kick)", { pair });
    case PairStat.TxBlocked: return m.counter("vhost_net_tap_eagain", "Times the tap was full (EAGAIN) and transmit waited for it", { pair });
  }
}

export class NetShared {
  /** --metrics counters by stat slot (created on first count, in the counting thread). */
  private readonly exported: Counter[] = [];
  readonly record: NetSharedRecord;
  private filter: Filter | null = null;
  /** The per-pair counters (counted per frame: no field lookup). */
  private readonly stats: Int32Array;

  /** A new record (`subscribers`: wake-up slots, one per frame thread), or the one `data` shares. */
  constructor(data?: SharedRecordData, subscribers = 0) {
    this.record = data === undefined ? SharedRecord.create(NET_SHARED_SCHEMA, subscribers) : SharedRecord.attach(NET_SHARED_SCHEMA, data);
    this.stats = this.record.countersView("stats");
  }

  get data(): SharedRecordData {
    return this.record.shared;
  }

  get rxMode(): number {
    return this.record.get("rxMode");
  }
  set rxMode(v: number) {
    this.record.set("rxMode", v);
  }

  /** Received frames may be up to 64 KiB (the guest acked a receive GSO offload). */
  get bigFrames(): boolean {
    return this.record.get("bigFrames");
  }
  set bigFrames(v: boolean) {
    this.record.set("bigFrames", v);
  }

  /** The device's MTU (the largest non-GSO frame is this plus the Ethernet header). */
  get mtu(): number {
    return this.record.get("mtu");
  }
  set mtu(v: number) {
    this.record.set("mtu", v);
  }

  get mac(): Uint8Array {
    return this.record.get("mac");
  }
  set mac(m: Uint8Array) {
    this.record.set("mac", m.subarray(0, 6));
  }

  /** The driver's MAC_TABLE_SET: unicast then multicast addresses (at most MAC_TABLE_ENTRIES together). */
  setTable(unicast: Uint8Array[], multicast: Uint8Array[]): void {
    const all = [...unicast, ...multicast];
    if (all.length > MAC_TABLE_ENTRIES) throw new Error(`MAC table of ${all.length} entries (at most ${MAC_TABLE_ENTRIES})`);
    const t = new Uint8Array(6 * all.length);
    all.forEach((m, i) => t.set(m.subarray(0, 6), 6 * i));
    this.record.update((w) => {
      w("table", t);
      w("unicastCount", unicast.length);
      w("multicastCount", multicast.length);
    });
  }

  table(): { unicast: Uint8Array[]; multicast: Uint8Array[] } {
    const f = this.current();
    const at = (i: number) => f.table.slice(6 * i, 6 * i + 6);
    return { unicast: Array.from({ length: f.unicast }, (_, i) => at(i)), multicast: Array.from({ length: f.multicast }, (_, i) => at(f.unicast + i)) };
  }

  /** The filter at the record's current version (copied again only after a change). */
  private current(): Filter {
    const v = this.record.version;
    if (this.filter !== null && this.filter.version === v) return this.filter;
    // Read at one version: a change in between is read again.
    for (let tries = 0; ; tries++) {
      const version = this.record.version;
      const f: Filter = {
        version,
        mode: this.record.get("rxMode"),
        mac: this.record.get("mac"),
        table: this.record.get("table"),
        unicast: Math.min(this.record.get("unicastCount"), MAC_TABLE_ENTRIES),
        multicast: Math.min(this.record.get("multicastCount"), MAC_TABLE_ENTRIES),
      };
      f.multicast = Math.min(f.multicast, MAC_TABLE_ENTRIES - f.unicast);
      if ((version & 1) === 0 && this.record.version === version) return (this.filter = f);
      if (tries > 1000) return f;
    }
  }

  /** Whether a frame to destination `d` passes the driver's receive filter (QEMU's receive_filter). */
  accepts(d: Uint8Array): boolean {
    const f = this.current();
    const mode = f.mode;
    if (mode & RX_PROMISC) return true;
    if (d[0]! & 1) {
      const broadcast = d[0] === 0xff && d[1] === 0xff && d[2] === 0xff && d[3] === 0xff && d[4] === 0xff && d[5] === 0xff;
      if (broadcast) return (mode & RX_NOBCAST) === 0;
      if (mode & RX_NOMULTI) return false;
      if (mode & RX_ALLMULTI) return true;
      return inTable(f.table, d, f.unicast, f.unicast + f.multicast);
    }
    if (mode & RX_NOUNI) return false;
    if (mode & RX_ALLUNI) return true;
    if (matches(f.mac, 0, d)) return true;
    return inTable(f.table, d, 0, f.unicast);
  }

  /** Whether the filter lets every frame through (no destination to look at). */
  promiscuous(): boolean {
    return (this.current().mode & RX_PROMISC) !== 0;
  }

  count(pair: number, stat: PairStat, n = 1): void {
    if (pair >= MAX_PAIRS) return;
    Atomics.add(this.stats, pair * STATS_PER_PAIR + stat, n);
    (this.exported[pair * STATS_PER_PAIR + stat] ??= pairCounter(pair, stat)).inc(n);
  }

  /** Frame bytes (virtio-net header included) moved by a pair, for --metrics. */
  bytes(pair: number, direction: "rx" | "tx", n: number): void {
    (this.exported[MAX_PAIRS * STATS_PER_PAIR + 2 * pair + (direction === "rx" ? 0 : 1)] ??=
      metrics().counter("vhost_net_bytes", "Frame bytes between the guest and the tap (virtio-net header included)", { pair, direction })).inc(n);
  }

  stat(pair: number, stat: PairStat): number {
    return pair < MAX_PAIRS ? Atomics.load(this.stats, pair * STATS_PER_PAIR + stat) : 0;
  }
}

function inTable(t: Uint8Array, d: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (matches(t, 6 * i, d)) return true;
  return false;
}

function matches(t: Uint8Array, at: number, d: Uint8Array): boolean {
  return d[0] === t[at] && d[1] === t[at + 1] && d[2] === t[at + 2] && d[3] === t[at + 3] && d[4] === t[at + 4] && d[5] === t[at + 5];
}
