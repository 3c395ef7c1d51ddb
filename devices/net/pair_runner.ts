// The net QueueRunner (src/device.ts): moves frames between the rx/tx queues of the pairs one
// thread serves and the tap queue fd of each pair. Frames never pass through a JS buffer:
//
// - transmit: each chain (virtio-net header + frame) goes to the tap with ONE writev whose iovecs
//   point into guest memory (the tap takes the 12-byte header as its vnet header); several chains
//   per kick, one used-index publish and at most one notification per batch. A full tap (EAGAIN)
//   puts the chain back and waits for EPOLLOUT; the loop never blocks.
// - receive: ONE readv from the tap straight into guest receive buffers. With MRG_RXBUF a frame may
//   span several chains: enough chains for the largest frame the guest may receive are popped
//   first (chains a frame did not need stay held for the next frames, and go back to the ring
//   when the queue stops); num_buffers is written into the first. When the guest has no buffers, reading stops
//   until its next kick: frames wait in (or are dropped by) the kernel's tap queue, never truncated
//   or merged here.
import { ptr } from "bun:ffi";
import { readv, writev, IovecArray } from "../../ffi/io.ts";
import { EAGAIN, SysError } from "../../ffi/libc.ts";
import type { QueueRunner } from "../../src/device.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { type RingPosition, type VirtqueueConfig } from "../../src/ring.ts";
import { ChainReader, ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import { QueuePair, processQueue, fillQueue } from "../../src/queue_serving.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import type { SharedRecordData } from "../../src/shared_record.ts";
import { NetShared, PairStat } from "./shared.ts";
import {
  VIRTIO_NET_HDR_SIZE, HDR_NUM_BUFFERS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_F_NEEDS_CSUM,
} from "./virtio_net.ts";

/** Largest frame a guest may send: 64 KiB of GSO payload plus headers (QEMU's and Linux's limit). */
export const MAX_TX_FRAME = 65550;
/** Largest frame the tap hands us with receive GSO on (the same limit), header included. */
const MAX_RX_GSO = VIRTIO_NET_HDR_SIZE + MAX_TX_FRAME;
/** Ethernet header plus one VLAN tag, on top of the MTU, for a frame without GSO. */
const L2_OVERHEAD = 14 + 4;
/** The kernel's UIO_MAXIOV: the most iovecs one readv/writev takes. */
const MAX_IOVECS = 1024;

/** What every net runner is created with (plain data, cloned into queue threads). */
export interface NetRunnerOptions {
  /** Tap queue fd of pair i (opened by the device thread; fds are process-wide). */
  fds: number[];
  /** The device thread's NetShared (filter, MTU, offloads, counters). */
  shared: SharedRecordData;
}

/** One rx/tx pair: its queues and the tap queue they share. */
class Pair {
  readonly queues: QueuePair;
  rx: Virtqueue | null = null;
  tx: Virtqueue | null = null;
  features = 0n;
  /** Reading the tap is paused: the guest had no receive buffers (resumes at its kick). */
  starved = false;
  /** The last read found the tap empty (until it is readable again). */
  tapEmpty = false;
  /** The tap was full: transmit resumes at EPOLLOUT. */
  txBlocked = false;
  watching = false;
  /** Receive chains popped and not yet completed, in pop order; null writer: unusable (too small). */
  readonly held: DescriptorChain[] = [];
  readonly writers: (ChainWriter | null)[] = [];
  heldCapacity = 0;
  /** The part of a received frame still to be copied into guest buffers (mergeable), or null. */
  tail: Uint8Array | null = null;
  frameLen = 0;

  constructor(readonly index: number, readonly fd: number, loop: EventLoop, onRx: () => void, onTx: () => void) {
    this.queues = new QueuePair(loop, onRx, onTx);
  }

  /** Holds a popped receive chain (one whose buffers cannot take a header counts as unusable). */
  hold(chain: DescriptorChain, writer?: ChainWriter | null): void {
    const w = writer !== undefined ? writer : chain.writableLen < VIRTIO_NET_HDR_SIZE ? null : new ChainWriter(chain);
    this.held.push(chain);
    this.writers.push(w);
    if (w !== null) this.heldCapacity += chain.writableLen;
  }

  clearHeld(): void {
    this.held.length = 0;
    this.writers.length = 0;
    this.heldCapacity = 0;
  }
}

export class NetPairRunner implements QueueRunner {
  private readonly pairs = new Map<number, Pair>();
  private readonly shared: NetShared;
  private readonly iov = new IovecArray(MAX_IOVECS);
  private readonly hdr = new Uint8Array(VIRTIO_NET_HDR_SIZE);
  private readonly dest = new Uint8Array(6);
  private readonly numBuffers = new Uint8Array(2);
  private readonly guestErrors = new GuestErrorLog("net", "debug");
  /** Where a received frame's bytes go beyond the chains at hand (see receive). */
  private readonly bounce = new Uint8Array(MAX_RX_GSO + 64);
  private readonly bouncePtr = ptr(this.bounce);

  constructor(private readonly o: NetRunnerOptions, private readonly loop: EventLoop) {
    this.shared = new NetShared(o.shared);
  }

  /** The record's version when mtu and bigFrames were read. */
  private settingsVersion = -1;
  private mtu = 1500;
  private bigFrames = false;

  /** Takes the device thread's latest MTU and offloads (NET_SET_MTU, CTRL_GUEST_OFFLOADS) when they changed. */
  private refreshSettings(): void {
    const v = this.shared.record.version;
    if (v === this.settingsVersion) return;
    this.settingsVersion = v;
    this.mtu = this.shared.mtu;
    this.bigFrames = this.shared.bigFrames;
  }

  private pair(index: number): Pair {
    let p = this.pairs.get(index);
    if (p === undefined) {
      const fd = this.o.fds[index];
      if (fd === undefined) throw new Error(`net: no tap queue for pair ${index}`);
      const pair: Pair = new Pair(index, fd, this.loop, () => this.onRxKick(pair), () => this.transmit(pair));
      p = pair;
      this.pairs.set(index, p);
    }
    return p;
  }

  start(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void {
    const p = this.pair(ring.index >> 1);
    const q = openVirtqueue(mem, ring);
    p.features = ackedFeatures;
    if (ring.index % 2 === 0) {
      p.rx = q;
      p.starved = false;
    } else {
      p.tx = q;
      p.txBlocked = false;
    }
    p.queues.member(ring.index).start(q);
    this.updateInterest(p);
  }

  stop(index: number): RingPosition | null {
    const p = this.pairs.get(index >> 1);
    if (p === undefined) return null;
    if (index % 2 === 0 && p.rx !== null && p.held.length > 0) {
      // Held receive chains go back to the ring, in order (they are the latest pops); a frame
      // waiting for more buffers is dropped with them.
      p.rx.rewind(p.held.length);
      p.clearHeld();
      if (p.tail !== null) this.shared.count(p.index, PairStat.RxDropped);
      p.tail = null;
    }
    const pos = p.queues.member(index).stop();
    if (index % 2 === 0) p.rx = null;
    else p.tx = null;
    this.updateInterest(p);
    return pos;
  }

  dispose(): void {
    for (const p of this.pairs.values()) {
      p.queues.stop();
      p.rx = p.tx = null;
      this.updateInterest(p);
    }
  }

  /** Watches the tap fd for what the pair waits for: frames to receive, room to transmit. */
  private updateInterest(p: Pair): void {
    const readable = p.rx !== null && !p.starved;
    const writable = p.tx !== null && p.txBlocked;
    if (!readable && !writable) {
      if (p.watching) this.loop.remove(p.fd);
      p.watching = false;
      return;
    }
    if (!p.watching) {
      this.loop.watch(p.fd, { readable: () => this.receive(p), writable: () => this.onWritable(p) }, { readable, writable });
      p.watching = true;
    } else this.loop.setInterest(p.fd, { readable, writable });
  }

  private onWritable(p: Pair): void {
    p.txBlocked = false;
    this.updateInterest(p);
    this.transmit(p);
  }

  private onRxKick(p: Pair): void {
    if (p.starved) {
      p.starved = false;
      this.updateInterest(p);
    }
    this.receive(p);
  }

  // ---- transmit: guest → tap ----

  private transmit(p: Pair): void {
    const q = p.tx;
    if (q === null || p.txBlocked) return;
    processQueue(q, (chain) => this.transmitChain(p, q, chain), undefined, p.queues.tx.budget);
    if (p.txBlocked) this.updateInterest(p);
  }

  /** Sends one chain; false (chain rewound) when the tap is full. */
  private transmitChain(p: Pair, q: Virtqueue, chain: DescriptorChain): boolean {
    const why = this.checkTx(p, chain);
    if (why !== null) {
      this.guestErrors.report(`tx queue ${q.index}: ${why}; frame dropped`);
      this.shared.count(p.index, PairStat.TxDropped);
      q.add(chain.head, 0);
      return true;
    }
    this.iov.clear();
    if (!new ChainReader(chain).iovecs(this.iov, chain.readableLen)) {
      this.guestErrors.report(`tx queue ${q.index}: frame in more than ${MAX_IOVECS} buffers; dropped`);
      this.shared.count(p.index, PairStat.TxDropped);
      q.add(chain.head, 0);
      return true;
    }
    let r: number;
    try {
      r = writev(p.fd, this.iov);
    } catch (e) {
      // The kernel refused the frame (a header it finds inconsistent: EINVAL); the ring goes on.
      this.guestErrors.report(`tx queue ${q.index}: the tap refused a frame (${(e as SysError).message}); dropped`);
      this.shared.count(p.index, PairStat.TxDropped);
      q.add(chain.head, 0);
      return true;
    }
    if (r === -EAGAIN) {
      q.rewind(1);
      p.txBlocked = true;
      this.shared.count(p.index, PairStat.TxBlocked);
      return false;
    }
    this.shared.count(p.index, PairStat.TxFrames);
    this.shared.bytes(p.index, "tx", r);
    q.add(chain.head, 0);
    return true;
  }

  /** Why a transmit chain must be dropped, or null. The kernel checks the header again on write. */
  private checkTx(p: Pair, chain: DescriptorChain): string | null {
    const len = chain.readableLen;
    if (len <= VIRTIO_NET_HDR_SIZE) return `chain of ${len} bytes holds no frame after the ${VIRTIO_NET_HDR_SIZE}-byte header`;
    if (len - VIRTIO_NET_HDR_SIZE > MAX_TX_FRAME) return `frame of ${len - VIRTIO_NET_HDR_SIZE} bytes (at most ${MAX_TX_FRAME})`;
    new ChainReader(chain).read(this.hdr);
    const flags = this.hdr[0]!;
    const gso = this.hdr[1]!;
    const f = p.features;
    if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM && (f & VIRTIO_NET_F_CSUM) === 0n) return "partial checksum without VIRTIO_NET_F_CSUM";
    const type = gso & ~VIRTIO_NET_HDR_GSO_ECN;
    if (gso & VIRTIO_NET_HDR_GSO_ECN && (f & VIRTIO_NET_F_HOST_ECN) === 0n) return "GSO with ECN without VIRTIO_NET_F_HOST_ECN";
    const needs =
      type === VIRTIO_NET_HDR_GSO_NONE ? 0n
      : type === VIRTIO_NET_HDR_GSO_TCPV4 ? VIRTIO_NET_F_HOST_TSO4
      : type === VIRTIO_NET_HDR_GSO_TCPV6 ? VIRTIO_NET_F_HOST_TSO6
      : type === VIRTIO_NET_HDR_GSO_UDP ? VIRTIO_NET_F_HOST_UFO
      : type === VIRTIO_NET_HDR_GSO_UDP_L4 ? VIRTIO_NET_F_HOST_USO
      : -1n;
    if (needs === -1n) return `unknown gso_type ${gso}`;
    if (needs !== 0n && (f & needs) === 0n) return `gso_type ${gso} was not negotiated`;
    return null;
  }

  // ---- receive: tap → guest ----

  /** The most bytes one received frame (with its header) may take. */
  private frameLimit(): number {
    return this.bigFrames ? MAX_RX_GSO : VIRTIO_NET_HDR_SIZE + this.mtu + L2_OVERHEAD;
  }

  /**
   * Receives frames while the tap has them and the guest has buffers: fillQueue's "disable
   * notifications, fill, re-enable, re-check" loop, where filling a chain means holding it and
   * reading every frame the held chains can take. Each frame is read with one readv into the held
   * chains, plus a bounce buffer behind them: a frame larger than the chains at hand is never
   * truncated; its tail waits in `p.tail` for the guest's next buffers (mergeable) or the frame is
   * dropped (a buffer too small without MRG_RXBUF). Chains no frame needed yet stay held for the
   * next frames (popped and walked once, not per wakeup); stop() gives them back to the ring.
   */
  private receive(p: Pair): void {
    const q = p.rx;
    if (q === null || p.starved) return;
    this.refreshSettings();
    const mergeable = (p.features & VIRTIO_NET_F_MRG_RXBUF) !== 0n;
    const budget = p.queues.rx.budget;
    p.tapEmpty = false; // the tap became readable or the guest added buffers: look again
    let force = false;
    for (;;) {
      // The chains already held first, then new ones one by one (fillQueue publishes all at its end).
      this.deliver(p, q, mergeable, force);
      const outOfBuffers = fillQueue(q, () => p.tail !== null || !p.tapEmpty, (chain) => {
        p.hold(chain);
        this.deliver(p, q, mergeable, false);
        return true;
      }, budget);
      if (!outOfBuffers) return;
      if (budget.exhausted) {
        budget.yieldTurn();
        return;
      }
      // The ring ran dry with fewer chains held than the largest frame needs: the next frames may
      // fit them anyway (read once more, whatever is held); a frame's tail waits for the next kick.
      if (!force && p.tail === null && p.heldCapacity > 0) {
        force = true;
        continue;
      }
      this.starve(p);
      return;
    }
  }

  /**
   * Reads frames into the held chains while they can take the largest frame (or, with `force`,
   * any), completing each; a frame's tail goes into chains held after it. Stops when the tap is
   * empty, the held chains are not enough, or the turn's budget is spent.
   */
  private deliver(p: Pair, q: Virtqueue, mergeable: boolean, force: boolean): void {
    const budget = p.queues.rx.budget;
    for (;;) {
      this.completeUnusable(p, q);
      if (p.tail !== null) {
        if (!this.deliverTail(p, q)) return; // the rest waits for more chains
        continue;
      }
      if (p.tapEmpty || p.heldCapacity === 0) return;
      if (!force && p.heldCapacity < (mergeable ? this.frameLimit() : 1)) return;
      if (budget.exhausted) return;
      const n = this.readFrame(p);
      if (n === -EAGAIN) {
        p.tapEmpty = true;
        return;
      }
      if (n < 0) continue; // dropped or filtered: its chains serve the next frame
      // Bytes count here; the chains were counted when popped.
      budget.spendBytes(n);
      if (n > p.heldCapacity) {
        if (!mergeable) {
          this.guestErrors.report(`rx queue ${q.index}: frame of ${n} bytes does not fit a ${p.heldCapacity}-byte buffer (no MRG_RXBUF); dropped`);
          this.shared.count(p.index, PairStat.RxDropped);
          continue;
        }
        // The tail went to the bounce buffer; it is copied into the next chains.
        p.tail = this.bounce.slice(0, n - p.heldCapacity);
        p.frameLen = n;
        continue;
      }
      this.completeFrame(p, q, n, mergeable);
    }
  }

  private starve(p: Pair): void {
    p.starved = true;
    this.shared.count(p.index, PairStat.RxStalls);
    this.updateInterest(p);
  }

  /** Completes the unusable chains at the front of `held` (they are ordered behind used ones). */
  private completeUnusable(p: Pair, q: Virtqueue): void {
    while (p.held.length > 0 && p.writers[0] === null) {
      q.add(p.held.shift()!.head, 0);
      p.writers.shift();
    }
  }

  /** Copies the pending tail into the chains held after the frame's first ones; true once done. */
  private deliverTail(p: Pair, q: Virtqueue): boolean {
    let tail = p.tail!;
    let delivered = p.frameLen - tail.length; // frame bytes already in guest buffers
    let pos = 0; // frame offset where the current chain starts
    for (const w of p.writers) {
      if (w === null) continue;
      const cap = w.chain.writableLen;
      if (pos + cap > delivered) {
        const n = Math.min(pos + cap - delivered, tail.length);
        w.writeAt(delivered - pos, tail.subarray(0, n));
        tail = tail.subarray(n);
        delivered += n;
      }
      pos += cap;
      if (tail.length === 0) break;
    }
    if (tail.length > 0) {
      p.tail = tail; // the rest waits for more buffers
      return false;
    }
    p.tail = null;
    this.completeFrame(p, q, p.frameLen, true);
    return true;
  }

  /**
   * Reads one frame into the held chains and the bounce buffer; returns its length with the
   * header, -EAGAIN when the tap is empty, or -1 when the frame was filtered or unreadable.
   */
  private readFrame(p: Pair): number {
    const iov = this.iov;
    iov.clear();
    let capacity = 0;
    for (const w of p.writers) {
      if (w === null) continue;
      if (iov.count + w.chain.writable.length >= MAX_IOVECS || !w.iovecs(iov, w.remaining)) break;
      capacity += w.chain.writableLen;
      w.pos = 0; // iovecs() moved the cursor; the chain is written by the kernel, not the cursor
    }
    iov.push(this.bouncePtr, this.bounce.length);
    let n: number;
    try {
      n = readv(p.fd, iov);
    } catch (e) {
      // A tap in an error state would be readable forever: pause until the guest's next kick.
      this.guestErrors.report(`rx pair ${p.index}: reading the tap failed (${(e as Error).message}); paused until the next kick`);
      this.shared.count(p.index, PairStat.RxDropped);
      this.starve(p);
      return -EAGAIN;
    }
    if (n === -EAGAIN) return n;
    if (n > capacity && capacity < p.heldCapacity) {
      // The iovec limit left chains out: copy what spilled into them, as a tail.
      this.shared.count(p.index, PairStat.RxDropped);
      return -1;
    }
    if (n < VIRTIO_NET_HDR_SIZE + 6) {
      this.shared.count(p.index, PairStat.RxDropped);
      return -1;
    }
    if (!this.shared.promiscuous()) {
      this.frameBytes(p, VIRTIO_NET_HDR_SIZE, this.dest);
      if (!this.shared.accepts(this.dest)) {
        this.shared.count(p.index, PairStat.RxFiltered);
        return -1;
      }
    }
    return n;
  }

  /** Copies frame bytes [pos, pos+dst.length) out of the held chains (then the bounce buffer). */
  private frameBytes(p: Pair, pos: number, dst: Uint8Array): void {
    let base = 0;
    let done = 0;
    for (const w of p.writers) {
      if (w === null) continue;
      const cap = w.chain.writableLen;
      if (pos + done < base + cap) done += w.readAt(pos + done - base, dst.subarray(done));
      if (done >= dst.length) return;
      base += cap;
    }
    dst.set(this.bounce.subarray(pos + done - base, pos + dst.length - base), done);
  }

  /** Completes the chains a frame of `n` bytes filled, in order, with num_buffers set. */
  private completeFrame(p: Pair, q: Virtqueue, n: number, mergeable: boolean): void {
    let left = n;
    let used = 0;
    const done: { head: number; len: number }[] = [];
    const rest: DescriptorChain[] = [];
    const restW: (ChainWriter | null)[] = [];
    let firstWriter: ChainWriter | null = null;
    for (let i = 0; i < p.held.length; i++) {
      const chain = p.held[i]!;
      const w = p.writers[i] ?? null;
      if (left > 0 && w !== null) {
        const len = Math.min(left, chain.writableLen);
        left -= len;
        used++;
        firstWriter ??= w;
        done.push({ head: chain.head, len });
      } else {
        rest.push(chain);
        restW.push(w);
      }
    }
    // num_buffers: how many chains the driver must gather for this frame (1 without MRG_RXBUF).
    this.numBuffers[0] = mergeable ? used & 0xff : 1;
    this.numBuffers[1] = mergeable ? used >> 8 : 0;
    firstWriter!.writeAt(HDR_NUM_BUFFERS, this.numBuffers);
    for (const d of done) q.add(d.head, d.len);
    p.clearHeld();
    for (let i = 0; i < rest.length; i++) p.hold(rest[i]!, restW[i]);
    this.completeUnusable(p, q);
    this.shared.count(p.index, PairStat.RxFrames);
    this.shared.bytes(p.index, "rx", n);
  }
}

export function netPairRunner(options: unknown, loop: EventLoop): NetPairRunner {
  return new NetPairRunner(options as NetRunnerOptions, loop);
}
