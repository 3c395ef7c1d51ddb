// The net QueueRunner (src/device.ts): moves frames between the rx/tx queues of the pairs one
// thread serves and the tap queue fd of each pair. Frames pass through no JS buffer, except
// received ones on the multishot path (our provided buffers, then one copy into guest memory):
//
// - transmit: each chain (virtio-net header + frame) goes to the tap with ONE writev whose iovecs
//   point into guest memory (the tap takes the 12-byte header as its vnet header); several chains
//   per kick, one used-index publish and at most one notification per batch. A full tap (EAGAIN)
//   puts the chain back and waits for EPOLLOUT; the loop never blocks.
// - receive, with io_uring on 6.7+: one multishot read per pair into our own provided buffers,
//   each frame copied into guest receive buffers (rx_multishot.ts, receiveShot below); before
//   6.7, READV batches straight into the held guest buffers (uring_rx.ts); without io_uring,
//   ONE readv from the tap straight into guest receive buffers. With MRG_RXBUF a frame may
//   span several chains: enough chains for the largest frame the guest may receive are popped
//   first (chains a frame did not need stay held for the next frames, and go back to the ring
//   when the queue stops); num_buffers is written into the first. When the guest has no buffers, reading stops
//   until its next kick: frames wait in (or are dropped by) the kernel's tap queue, never truncated
//   or merged here.
import { ptr } from "bun:ffi";
import { readv, writev, IovecArray } from "../../ffi/io.ts";
import { EAGAIN, SysError } from "../../ffi/libc.ts";

const ECANCELED = 125;
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
import { IoUring, type RingHandle } from "../../ffi/io_uring.ts";
import { TxBatch } from "./uring_tx.ts";
import { RxBatch, RX_BATCH } from "./uring_rx.ts";
import { RxMultishot } from "./rx_multishot.ts";
import { log } from "../../src/log.ts";
import { NetShared, PairStat } from "./shared.ts";
import {
  VIRTIO_NET_HDR_SIZE, HDR_NUM_BUFFERS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_HDR_GSO,
  VIRTIO_NET_HDR_F,
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
  /**
   * Per pair, the io_uring its transmit batches go through (set up with the device), or null:
   * one writev per frame (--net-io syscall, or io_uring unavailable).
   */
  rings: (RingHandle | null)[];
  /** Per pair, the io_uring of its multishot receive (rx_multishot.ts), or null: READV batches on `rings`. */
  rxRings?: (RingHandle | null)[];
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
  /** The pair's io_uring (null: one system call per frame), and its transmit and receive batches. */
  ring: IoUring | null = null;
  txBatch: TxBatch | null = null;
  rxBatch: RxBatch | null = null;
  /** The pair's multishot receive (its own ring), or null. */
  rxShot: RxMultishot | null = null;
  /** The receive ring's fd is watched. */
  rxShotWatching = false;
  rxShotFd = -1;
  /**
   * Transmit chains popped but not sent (the tap was full), in order: they go first when it has
   * room again. `txRetryIsTail`: nothing popped after them was completed, so stop() may give them
   * back to the ring.
   */
  readonly txRetry: DescriptorChain[] = [];
  txRetryIsTail = true;
  /** A chain was dropped (completed) while the batch held frames popped before it. */
  txDroppedInBatch = false;
  watching = false;
  /** Receive chains popped and not yet completed, in pop order; null writer: unusable (too small). */
  readonly held: DescriptorChain[] = [];
  readonly writers: (ChainWriter | null)[] = [];
  heldCapacity = 0;
  /** No chain popped after the held ones was completed (stop() may give them back to the ring). */
  heldIsTail = true;
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
  private readonly reader = new ChainReader();
  private readonly dest = new Uint8Array(6);
  private readonly numBuffers = new Uint8Array(2);
  /** receiveBatch's scratch: which held chains stay held. */
  private readonly keep: boolean[] = [];
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
      const ring = this.o.rings?.[index] ?? null;
      if (ring !== null) {
        try {
          pair.ring = IoUring.attach(ring);
          pair.txBatch = new TxBatch(pair.ring, fd);
          pair.rxBatch = new RxBatch(pair.ring, fd);
        } catch (e) {
          log.warn(`net: pair ${index}: io_uring refused (${(e as Error).message}); one system call per frame`);
          this.dropRing(pair);
        }
      }
      const rxRing = this.o.rxRings?.[index] ?? null;
      if (rxRing !== null && pair.ring !== null) {
        try {
          pair.rxShot = new RxMultishot(rxRing, fd);
        } catch (e) {
          log.warn(`net: pair ${index}: multishot receive refused (${(e as Error).message}); READV batches`);
        }
      }
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
      // Held receive chains go back to the ring, in order, when they are the latest pops; after a
      // batch completed chains behind them they are completed empty instead (the driver drops an
      // empty buffer). A frame waiting for more buffers is dropped with them.
      if (p.heldIsTail) p.rx.rewind(p.held.length);
      else for (const c of p.held) p.rx.add(c.head, 0);
      p.clearHeld();
      p.heldIsTail = true;
      if (p.tail !== null) this.shared.count(p.index, PairStat.RxDropped);
      p.tail = null;
    }
    if (index % 2 === 1 && p.tx !== null && p.txRetry.length > 0) {
      // Frames the tap had no room for: back to the ring when they are the latest pops, else
      // completed unsent (a write after them went out first).
      if (p.txRetryIsTail) p.tx.rewind(p.txRetry.length);
      else {
        for (const c of p.txRetry) p.tx.add(c.head, 0);
        this.shared.count(p.index, PairStat.TxDropped, p.txRetry.length);
      }
      p.txRetry.length = 0;
      p.txRetryIsTail = true;
    }
    const pos = p.queues.member(index).stop();
    if (index % 2 === 0) p.rx = null;
    else p.tx = null;
    this.updateInterest(p);
    return pos;
  }

  dispose(): void {
    for (const p of this.pairs.values()) {
      this.dropRxShot(p);
      this.dropRing(p);
      p.queues.stop();
      p.rx = p.tx = null;
      this.updateInterest(p);
    }
  }

  /** Watches the tap fd for what the pair waits for: frames to receive, room to transmit. */
  private updateInterest(p: Pair): void {
    const shot = p.rxShot;
    const watchShot = shot !== null && p.rx !== null;
    if (watchShot !== p.rxShotWatching) {
      if (watchShot) this.loop.watch(shot.ring.fd, { readable: () => this.receive(p) }, { readable: true, writable: false });
      else this.loop.remove(p.rxShotFd);
      p.rxShotWatching = watchShot;
      p.rxShotFd = watchShot ? shot.ring.fd : -1;
    }
    const readable = p.rx !== null && !p.starved && shot === null;
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
    const b = p.txBatch;
    if (b !== null) this.transmitBatched(p, q, b);
    else processQueue(q, (chain) => this.transmitChain(p, q, chain), undefined, p.queues.tx.budget);
    if (p.txBlocked) this.updateInterest(p);
  }

  /**
   * Transmit through io_uring: the chains of this turn are queued as one WRITEV each and go to
   * the tap in batches of TX_BATCH, one io_uring_enter per batch; the used ring is published and
   * the driver notified once, at the end (processQueue). Frames the tap had no room for wait in
   * p.txRetry, in order, until EPOLLOUT.
   */
  private transmitBatched(p: Pair, q: Virtqueue, b: TxBatch): void {
    // Frames left over from a full tap go first, in their order (they fitted a batch before).
    const retry = p.txRetry.splice(0);
    const wasTail = p.txRetryIsTail;
    p.txRetryIsTail = true;
    for (let i = 0; i < retry.length; i++) {
      const r = b.queue(retry[i]!, MAX_IOVECS);
      if (r === "queued") continue;
      if (r === "too-long") {
        this.dropTx(p, q, retry[i]!, `frame in more than ${MAX_IOVECS} buffers`);
        continue;
      }
      if (!this.sendBatch(p, q, b)) {
        // Full again: what was not sent keeps its place ahead of the rest.
        p.txRetry.push(...retry.slice(i));
        p.txRetryIsTail &&= wasTail;
        q.flush();
        return;
      }
      i--; // queue it again, into the empty batch
    }
    processQueue(q, (chain) => {
      if (!this.txAcceptable(p, q, chain)) {
        if (b.size > 0) p.txDroppedInBatch = true; // completed ahead of frames still to be sent
        return true;
      }
      for (;;) {
        const r = b.queue(chain, MAX_IOVECS);
        if (r === "queued") return true;
        if (r === "too-long") {
          this.dropTx(p, q, chain, `frame in more than ${MAX_IOVECS} buffers`);
          if (b.size > 0) p.txDroppedInBatch = true;
          return true;
        }
        // The batch is full: send it. A full tap stops popping; this chain waits with the others.
        if (!this.sendBatch(p, q, b)) {
          p.txRetry.push(chain);
          return false;
        }
      }
    }, () => {
      this.sendBatch(p, q, b);
    }, p.queues.tx.budget);
  }

  /**
   * Sends the queued batch and completes what the tap took (or refused: dropped). Frames from
   * the first EAGAIN on go to p.txRetry and the pair waits for EPOLLOUT; returns false then. If
   * io_uring itself fails, the pair falls back to writev for good (the batch is retried so).
   */
  private sendBatch(p: Pair, q: Virtqueue, b: TxBatch): boolean {
    if (b.size === 0) return !p.txBlocked;
    const droppedInBatch = p.txDroppedInBatch;
    p.txDroppedInBatch = false;
    let n: number;
    try {
      n = b.submit();
    } catch (e) {
      log.warn(`net: pair ${p.index}: io_uring failed (${(e as Error).message}); one system call per frame from now on`);
      p.txRetry.unshift(...b.chains);
      b.clear();
      this.dropRing(p);
      this.loop.defer(() => this.retryWithWritev(p));
      return false;
    }
    let blocked = false;
    let sent = 0;
    let sentBytes = 0;
    for (let i = 0; i < n; i++) {
      const chain = b.chains[i]!;
      const r = b.result(i);
      if (r === -EAGAIN || (blocked && r === -ECANCELED)) {
        blocked = true;
        p.txRetry.push(chain);
      } else if (r < 0) {
        // The kernel refused the frame (a header it finds inconsistent: EINVAL); the ring goes on.
        this.dropTx(p, q, chain, `the tap refused a frame (errno ${-r})`);
        if (blocked) p.txRetryIsTail = false;
      } else {
        sent++;
        sentBytes += r;
        q.add(chain.head, 0);
        if (blocked) p.txRetryIsTail = false; // sent after an earlier frame found the tap full
      }
    }
    b.clear();
    // Counted once per batch: the counters are shared with the device thread (atomics).
    if (sent > 0) {
      this.shared.count(p.index, PairStat.TxFrames, sent);
      this.shared.bytes(p.index, "tx", sentBytes);
    }
    if (blocked) {
      if (droppedInBatch) p.txRetryIsTail = false;
      p.txBlocked = true;
      this.shared.count(p.index, PairStat.TxBlocked);
    }
    return !blocked;
  }

  /** Stops using the pair's io_uring (it failed, or the runner goes): system calls from now on. */
  private dropRing(p: Pair): void {
    p.txBatch = null;
    p.rxBatch = null;
    p.ring?.close();
    p.ring = null;
  }

  /** After io_uring failed: sends the frames it left behind with writev, then serves the ring. */
  private retryWithWritev(p: Pair): void {
    const q = p.tx;
    if (q === null) return;
    while (p.txRetry.length > 0 && !p.txBlocked) {
      const chain = p.txRetry[0]!;
      if (this.writeFrame(p, q, chain) === -EAGAIN) break;
      p.txRetry.shift();
    }
    q.flush();
    if (p.txBlocked) this.updateInterest(p);
    else this.transmit(p);
  }

  /** Drops (completes unsent, counted) a chain the guest should not have sent. */
  private dropTx(p: Pair, q: Virtqueue, chain: DescriptorChain, why: string): void {
    this.guestErrors.report(`tx queue ${q.index}: ${why}; frame dropped`);
    this.shared.count(p.index, PairStat.TxDropped);
    q.add(chain.head, 0);
  }

  /** False (the chain dropped) when the frame must not reach the tap. */
  private txAcceptable(p: Pair, q: Virtqueue, chain: DescriptorChain): boolean {
    const why = this.checkTx(p, chain);
    if (why === null) return true;
    this.dropTx(p, q, chain, why);
    return false;
  }

  /** Sends one chain; false (chain rewound) when the tap is full. */
  private transmitChain(p: Pair, q: Virtqueue, chain: DescriptorChain): boolean {
    if (!this.txAcceptable(p, q, chain)) return true;
    if (this.writeFrame(p, q, chain) !== -EAGAIN) return true;
    q.rewind(1);
    return false;
  }

  /**
   * One writev of the chain's frame; completes it (sent or dropped) unless the tap is full:
   * then -EAGAIN, the pair waits for EPOLLOUT and the caller keeps the chain.
   */
  private writeFrame(p: Pair, q: Virtqueue, chain: DescriptorChain): number {
    this.iov.clear();
    if (!this.reader.reset(chain).iovecs(this.iov, chain.readableLen)) {
      this.dropTx(p, q, chain, `frame in more than ${MAX_IOVECS} buffers`);
      return 0;
    }
    let r: number;
    try {
      r = writev(p.fd, this.iov);
    } catch (e) {
      // The kernel refused the frame (a header it finds inconsistent: EINVAL); the ring goes on.
      this.dropTx(p, q, chain, `the tap refused a frame (${(e as SysError).message})`);
      return 0;
    }
    if (r === -EAGAIN) {
      p.txBlocked = true;
      this.shared.count(p.index, PairStat.TxBlocked);
      return r;
    }
    this.shared.count(p.index, PairStat.TxFrames);
    this.shared.bytes(p.index, "tx", r);
    q.add(chain.head, 0);
    return r;
  }

  /** Why a transmit chain must be dropped, or null. The kernel checks the header again on write. */
  private checkTx(p: Pair, chain: DescriptorChain): string | null {
    const len = chain.readableLen;
    if (len <= VIRTIO_NET_HDR_SIZE) return `chain of ${len} bytes holds no frame after the ${VIRTIO_NET_HDR_SIZE}-byte header`;
    if (len - VIRTIO_NET_HDR_SIZE > MAX_TX_FRAME) return `frame of ${len - VIRTIO_NET_HDR_SIZE} bytes (at most ${MAX_TX_FRAME})`;
    // The two header bytes that decide, read in place (the chain holds more than the header).
    const r = this.reader.reset(chain);
    const flags = r.peekByte(0);
    const gso = r.peekByte(1);
    const f = p.features;
    if (flags & VIRTIO_NET_HDR_F.NEEDS_CSUM && (f & VIRTIO_NET_F_CSUM) === 0n) return "partial checksum without VIRTIO_NET_F_CSUM";
    const type = gso & ~VIRTIO_NET_HDR_GSO.ECN;
    if (gso & VIRTIO_NET_HDR_GSO.ECN && (f & VIRTIO_NET_F_HOST_ECN) === 0n) return "GSO with ECN without VIRTIO_NET_F_HOST_ECN";
    const needs =
      type === VIRTIO_NET_HDR_GSO.NONE ? 0n
      : type === VIRTIO_NET_HDR_GSO.TCPV4 ? VIRTIO_NET_F_HOST_TSO4
      : type === VIRTIO_NET_HDR_GSO.TCPV6 ? VIRTIO_NET_F_HOST_TSO6
      : type === VIRTIO_NET_HDR_GSO.UDP ? VIRTIO_NET_F_HOST_UFO
      : type === VIRTIO_NET_HDR_GSO.UDP_L4 ? VIRTIO_NET_F_HOST_USO
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
    if (p.rxShot !== null) {
      this.receiveShot(p, p.rxShot);
      return;
    }
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
        if (p.tail !== null || this.enoughHeld(p, mergeable)) this.deliver(p, q, mergeable, false);
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
   * Receive through the multishot read: takes the frames it posted, copies them into guest
   * buffers in order (fillQueue's loop, one chain held ahead so a guest with no buffers is seen
   * at once), gives their buffers back and arms the read again if it ended. While starved, frames
   * wait in our buffers (then in the tap) until the guest's kick.
   */
  private receiveShot(p: Pair, s: RxMultishot): void {
    const q = p.rx;
    if (q === null) return;
    try {
      s.reap();
      if (s.failed !== 0) {
        // A tap in an error state would fail every read: pause until the guest's next kick.
        this.guestErrors.report(`rx pair ${p.index}: reading the tap failed (errno ${-s.failed}); paused until the next kick`);
        this.shared.count(p.index, PairStat.RxDropped);
        s.failed = 0;
        if (!p.starved) this.starve(p);
      }
      if (!p.starved) {
        this.refreshSettings();
        const mergeable = (p.features & VIRTIO_NET_F_MRG_RXBUF) !== 0n;
        const budget = p.queues.rx.budget;
        this.deliverShot(p, q, s, mergeable);
        const outOfBuffers = fillQueue(q, () => s.pending > 0 || p.held.length === 0, (chain) => {
          p.hold(chain);
          this.deliverShot(p, q, s, mergeable);
          return true;
        }, budget);
        if (outOfBuffers) {
          if (budget.exhausted) budget.yieldTurn();
          else this.starve(p);
        }
      }
      s.publish();
      if (!p.starved) s.arm();
    } catch (e) {
      log.warn(`net: pair ${p.index}: multishot receive failed (${(e as Error).message}); READV batches from now on`);
      this.dropRxShot(p);
      this.updateInterest(p);
      this.loop.defer(() => this.receive(p));
    }
  }

  /** Copies pending frames into the held chains while they can take them (see receiveShot). */
  private deliverShot(p: Pair, q: Virtqueue, s: RxMultishot, mergeable: boolean): void {
    const budget = p.queues.rx.budget;
    const limit = this.frameLimit();
    while (s.pending > 0 && !budget.exhausted) {
      this.completeUnusable(p, q);
      const n = s.frontLen;
      const bytes = s.frontBytes();
      if (n < VIRTIO_NET_HDR_SIZE + 6 || n > limit || n > bytes.length) {
        if (n > limit) this.guestErrors.report(`rx queue ${q.index}: frame of ${n} bytes is above the ${limit}-byte limit (the tap's MTU is above the guest's?); dropped`);
        this.shared.count(p.index, PairStat.RxDropped);
        s.release();
        continue;
      }
      if (!this.shared.promiscuous() && !this.shared.accepts(bytes.subarray(VIRTIO_NET_HDR_SIZE, VIRTIO_NET_HDR_SIZE + 6))) {
        this.shared.count(p.index, PairStat.RxFiltered);
        s.release();
        continue;
      }
      // The chains the frame takes: enough for it with MRG_RXBUF, else the first one.
      let k = 0;
      let used = 0;
      let cap = 0;
      if (mergeable) {
        while (k < p.held.length && cap < n) {
          const w = p.writers[k++];
          if (w === null || w === undefined) continue;
          cap += w.chain.writableLen;
          used++;
        }
        if (cap < n) return; // more chains first
      } else {
        if (p.held.length === 0) return;
        const w = p.writers[0]!; // completeUnusable left a usable one in front
        if (w.chain.writableLen < n) {
          this.guestErrors.report(`rx queue ${q.index}: frame of ${n} bytes does not fit a ${w.chain.writableLen}-byte buffer (no MRG_RXBUF); dropped`);
          this.shared.count(p.index, PairStat.RxDropped);
          s.release();
          continue;
        }
        k = used = 1;
        cap = w.chain.writableLen;
      }
      // num_buffers: how many chains the driver must gather for this frame.
      bytes[HDR_NUM_BUFFERS] = used & 0xff;
      bytes[HDR_NUM_BUFFERS + 1] = used >> 8;
      // Unusable chains among them complete first, empty: never inside the frame's run.
      for (let i = 0; i < k; i++) if (p.writers[i] === null) q.add(p.held[i]!.head, 0);
      let off = 0;
      for (let i = 0; i < k; i++) {
        const w = p.writers[i];
        if (w === null || w === undefined) continue;
        const len = Math.min(n - off, w.chain.writableLen);
        w.writeAt(0, bytes.subarray(off, off + len));
        q.add(w.chain.head, len);
        off += len;
      }
      p.held.splice(0, k);
      p.writers.splice(0, k);
      p.heldCapacity -= cap;
      s.release();
      budget.spendBytes(n);
      this.shared.count(p.index, PairStat.RxFrames);
      this.shared.bytes(p.index, "rx", n);
    }
  }

  /** Stops the multishot receive (it failed, or the runner goes): READV batches or readv from now on. */
  private dropRxShot(p: Pair): void {
    const s = p.rxShot;
    if (s === null) return;
    p.rxShot = null;
    if (p.rxShotWatching) this.loop.remove(p.rxShotFd);
    p.rxShotWatching = false;
    p.rxShotFd = -1;
    try {
      s.close();
    } catch (e) {
      log.warn(`net: pair ${p.index}: closing the multishot receive: ${(e as Error).message}`);
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
      if (!force && !this.enoughHeld(p, mergeable)) return;
      if (budget.exhausted) return;
      if (p.rxBatch !== null && this.receiveBatch(p, q, p.rxBatch, mergeable)) continue;
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

  /**
   * Whether the held chains are worth reading into: room for the largest frame (one chain without
   * MRG_RXBUF), or with io_uring for a whole batch of them (fewer once the ring runs dry: `force`).
   */
  private enoughHeld(p: Pair, mergeable: boolean): boolean {
    const frames = p.rxBatch !== null ? RX_BATCH : 1;
    return mergeable ? p.heldCapacity >= frames * this.frameLimit() : p.held.length >= frames;
  }

  /**
   * Reads up to RX_BATCH frames with one io_uring_enter into parts of the held chains (each part
   * takes the largest frame), and completes them in order. False when the held chains make fewer
   * than two parts (one readv does then, with the tail logic for frames that need more chains).
   */
  private receiveBatch(p: Pair, q: Virtqueue, b: RxBatch, mergeable: boolean): boolean {
    const need = mergeable ? this.frameLimit() : 1;
    b.clear();
    for (let i = 0; i < p.held.length && b.size < RX_BATCH; ) {
      const from = i;
      let cap = 0;
      while (i < p.held.length && cap < need) cap += p.writers[i++]?.chain.writableLen ?? 0;
      if (cap < need || !b.addPart(p.writers, from, i)) break;
    }
    if (b.size < 2) return false;
    let n: number;
    try {
      n = b.submit();
    } catch (e) {
      log.warn(`net: pair ${p.index}: io_uring failed (${(e as Error).message}); one system call per frame from now on`);
      this.dropRing(p);
      return false;
    }
    // Chains a frame filled are completed; the others stay held, in order.
    const keep = this.keep;
    keep.length = 0;
    for (let k = 0; k < p.held.length; k++) keep.push(true);
    let stalled = false;
    for (let i = 0; i < n; i++) {
      const r = b.result(i);
      if (r === -EAGAIN || r === -ECANCELED) {
        p.tapEmpty = true;
        continue;
      }
      if (r < 0) {
        // A tap in an error state would be readable forever: pause until the guest's next kick.
        this.guestErrors.report(`rx pair ${p.index}: reading the tap failed (errno ${-r}); paused until the next kick`);
        this.shared.count(p.index, PairStat.RxDropped);
        stalled = true;
        continue;
      }
      const cap = b.capacity[i]!;
      if (r < VIRTIO_NET_HDR_SIZE + 6 || r > cap) {
        if (r > cap) this.guestErrors.report(`rx queue ${q.index}: frame of ${r} bytes does not fit its ${cap}-byte buffers (${mergeable ? "the tap's MTU is above the guest's?" : "no MRG_RXBUF"}); dropped`);
        this.shared.count(p.index, PairStat.RxDropped);
        continue;
      }
      if (!this.shared.promiscuous()) {
        this.partBytes(p, b.first[i]!, VIRTIO_NET_HDR_SIZE, this.dest);
        if (!this.shared.accepts(this.dest)) {
          this.shared.count(p.index, PairStat.RxFiltered);
          continue;
        }
      }
      let left = r;
      let used = 0;
      let firstWriter: ChainWriter | null = null;
      for (let k = b.first[i]!; k < b.end[i]! && left > 0; k++) {
        const w = p.writers[k];
        if (w === null || w === undefined) continue;
        const len = Math.min(left, w.chain.writableLen);
        left -= len;
        used++;
        firstWriter ??= w;
        q.add(w.chain.head, len);
        keep[k] = false;
      }
      this.numBuffers[0] = mergeable ? used & 0xff : 1;
      this.numBuffers[1] = mergeable ? used >> 8 : 0;
      firstWriter!.writeAt(HDR_NUM_BUFFERS, this.numBuffers);
      this.shared.count(p.index, PairStat.RxFrames);
      this.shared.bytes(p.index, "rx", r);
    }
    // Rebuild the held list without the completed chains.
    let j = 0;
    let capacity = 0;
    for (let k = 0; k < p.held.length; k++) {
      if (!keep[k]) {
        if (j > 0) p.heldIsTail = false; // completed behind a chain still held
        continue;
      }
      p.held[j] = p.held[k]!;
      const w = p.writers[k]!;
      p.writers[j] = w;
      if (w !== null) capacity += w.chain.writableLen;
      j++;
    }
    p.held.length = j;
    p.writers.length = j;
    p.heldCapacity = capacity;
    if (stalled) {
      p.tapEmpty = true;
      this.starve(p);
    }
    return true;
  }

  /** Copies bytes [pos, pos+dst.length) of the frame read into the held chains from index `from` on. */
  private partBytes(p: Pair, from: number, pos: number, dst: Uint8Array): void {
    let base = 0;
    let done = 0;
    for (let k = from; k < p.writers.length && done < dst.length; k++) {
      const w = p.writers[k];
      if (w === null || w === undefined) continue;
      const cap = w.chain.writableLen;
      if (pos + done < base + cap) done += w.readAt(pos + done - base, dst.subarray(done));
      base += cap;
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
