// The virtio-net device (virtio id 1) over a Linux tap: features, config space, the control
// queue, offloads pushed to the tap, SEND_RARP, snapshots. Frames move in NetPairRunner (the
// device thread for one pair; one queue thread per pair otherwise), each pair over its own tap
// queue fd.
import { COMMON_FEATURES, type DeviceContext, type VhostUserDevice } from "../../src/device.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import { type VirtqueueConfig, type RingPosition } from "../../src/ring.ts";
import { QueueService } from "../../src/queue_thread.ts";
import { WatchedQueue, processQueue } from "../../src/queue_serving.ts";
import { pf, ProtocolFeature } from "../../src/protocol/constants.ts";
import { log } from "../../src/log.ts";
import * as tun from "../../ffi/tap.ts";
import { tapFrom, offloadFeatures, type Tap } from "./tap.ts";
import { releaseRings, type AcquiredNet } from "./acquire.ts";
import { formatMac, type NetOptions } from "./options.ts";
import { NetShared, RX_PROMISC } from "./shared.ts";
import { NetControl } from "./control.ts";
import { netPairRunner, type NetRunnerOptions } from "./pair_runner.ts";
import type { RingHandle } from "../../ffi/io_uring.ts";
import { close } from "../../ffi/libc.ts";
import { validateNetState, NET_STATE_VERSION, type NetState } from "./state.ts";
import {
  VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
  VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6, GUEST_OFFLOAD_FEATURES, VIRTIO_NET_S, NET_CONFIG_SIZE,
  encodeNetConfig, ctrlQueueIndex,
} from "./virtio_net.ts";

/** Receive offloads that let the tap hand over 64 KiB frames. */
const GSO_RECEIVE = VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6;

/** A locally administered unicast MAC (52:54:00 is QEMU's prefix; ours sets the local bit). */
function randomMac(): Uint8Array {
  const m = crypto.getRandomValues(new Uint8Array(6));
  m[0] = (m[0]! & 0xfc) | 0x02;
  return m;
}

export class NetDevice implements VhostUserDevice {
  readonly tap: Tap;
  readonly shared = new NetShared();
  private readonly offered: bigint;
  private acked = 0n;
  private readonly pairs: number;
  private mtu: number;
  private readonly defaultMac: Uint8Array;
  private mac: Uint8Array;
  private status: number = VIRTIO_NET_S.LINK_UP;
  /** Pairs in use: all of them until the driver's VQ_PAIRS_SET (QEMU serves the control queue itself and never tells us). */
  private activePairs: number;
  /** Pairs whose receive ring runs (started and enabled): QEMU tells us the pairs in use only this way. */
  private readonly rxRunning: boolean[];
  /** Receive offloads in force (the acked ones, or what CTRL_GUEST_OFFLOADS set since). */
  private guestOffloads = 0n;
  private readonly queues: QueueService;
  private readonly ctrl: WatchedQueue;
  private readonly control: NetControl;
  /** Each pair's io_uring (null: writev/readv), set up in acquire and closed with the device. */
  private readonly rings: (RingHandle | null)[];
  /** Each pair's receive io_uring (a multishot read), or null; closed with the device. */
  private readonly rxRings: (RingHandle | null)[];

  /** The AF_INET socket for SIOC* ioctls on the tap (NET_SET_MTU), opened in acquire. */
  private readonly controlFd: number;

  /** Takes ownership of what `acquired` holds (released also when it throws). */
  constructor(opts: NetOptions, acquired: AcquiredNet, private readonly ctx: DeviceContext) {
    this.tap = tapFrom(acquired);
    this.rings = acquired.rings;
    this.rxRings = acquired.rxRings;
    this.controlFd = acquired.controlFd;
    this.pairs = opts.queuePairs;
    this.activePairs = this.pairs;
    this.rxRunning = new Array<boolean>(this.pairs).fill(false);
    // Until a pair's receive ring runs, its tap queue takes no frames (the virtio default is one pair).
    if (!this.updateAttachedQueues()) {
      this.tap.close();
      releaseRings(this.rings);
      releaseRings(this.rxRings);
      throw new Error(`tap ${this.tap.name}: could not detach the queues of pairs not in use`);
    }
    this.mtu = opts.mtu ?? this.tap.mtu;
    this.defaultMac = opts.mac ?? randomMac();
    this.mac = this.defaultMac;
    this.offered =
      COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_RX |
      VIRTIO_NET_F_CTRL_MAC_ADDR | VIRTIO_NET_F_GUEST_ANNOUNCE |
      (opts.mtu !== null ? VIRTIO_NET_F_MTU : 0n) |
      (opts.mrgRxbuf ? VIRTIO_NET_F_MRG_RXBUF : 0n) |
      (this.pairs > 1 ? VIRTIO_NET_F_MQ : 0n) |
      (opts.offloads ? offloadFeatures(this.tap.supportedOffloads) | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS : 0n);
    this.resetFilter();
    this.shared.mtu = this.mtu;
    if (acquired.ringsRefused !== null) log.info(`net: io_uring unavailable (${acquired.ringsRefused}): one writev/readv per frame`);
    const runnerOptions: NetRunnerOptions = { fds: [...this.tap.fds], shared: this.shared.data, rings: this.rings, rxRings: this.rxRings };
    this.queues = new QueueService({
      entry: ctx.queueThreadEntry, device: "net", options: runnerOptions, threads: this.pairs > 1 ? this.pairs : 0, threadOf: (i) => i >> 1,
      loop: ctx.loop, runner: netPairRunner,
    });
    this.control = new NetControl(this.shared, {
      acked: () => this.acked,
      maxPairs: this.pairs,
      setActivePairs: (n) => this.setActivePairs(n),
      setGuestOffloads: (f) => this.applyOffloads(f),
      setMac: (m) => {
        this.mac = m;
        this.shared.mac = m;
      },
      announceAcked: () => {
        this.status &= ~VIRTIO_NET_S.ANNOUNCE;
      },
    });
    this.ctrl = new WatchedQueue(ctx.loop, () => this.serveControl());
    log.info(
      `net: tap ${this.tap.name} (${this.pairs} queue pair(s), MTU ${this.mtu}, offloads ${opts.offloads ? `0x${this.tap.supportedOffloads.toString(16)}` : "off"}, ` +
        `MRG_RXBUF ${opts.mrgRxbuf ? "on" : "off"}, I/O ${this.rings.some((r) => r !== null) ? "io_uring batches" : "writev/readv"}), guest MAC ${formatMac(this.mac)}`,
    );
  }

  /**
   * The pairs the driver uses (VQ_PAIRS_SET): the tap queues of the others are detached, so no
   * frame waits on a receive queue the guest no longer serves. False when the tap refuses.
   */
  private setActivePairs(n: number): boolean {
    const before = this.activePairs;
    this.activePairs = n;
    if (this.updateAttachedQueues()) return true;
    this.activePairs = before;
    this.updateAttachedQueues();
    return false;
  }

  /**
   * Attaches the tap queue of each pair in use whose receive ring runs, and detaches the others:
   * the kernel steers each flow to an attached queue, and a frame on a queue no ring serves would
   * be lost. False when the tap refuses.
   */
  private updateAttachedQueues(): boolean {
    try {
      this.tap.setAttached((i) => i < this.activePairs && this.rxRunning[i] === true);
      return true;
    } catch (e) {
      log.warn(`net: ${(e as Error).message}`);
      return false;
    }
  }

  private resetFilter(): void {
    this.shared.rxMode = RX_PROMISC; // QEMU's reset state: promiscuous until the driver says otherwise
    this.shared.setTable([], []);
    this.shared.mac = this.mac;
  }

  maxQueues(): number {
    return 2 * this.pairs + 1; // the pairs, then the control queue
  }

  features(): bigint {
    return this.offered;
  }

  ackFeatures(features: bigint): void {
    const negotiatedOffloads = features & GUEST_OFFLOAD_FEATURES;
    const sameOffloads = negotiatedOffloads === (this.acked & GUEST_OFFLOAD_FEATURES);
    this.acked = features;
    // The same receive offloads again (the handler re-acking after a restore, a front-end's repeated
    // SET_FEATURES, e.g. QEMU's for dirty logging) keep what CTRL_GUEST_OFFLOADS or the restored
    // state set; only a new negotiation starts over from the negotiated set.
    if (sameOffloads) return;
    if (!this.applyOffloads(negotiatedOffloads)) log.warn("net: the tap refused the guest's receive offloads");
  }

  /** Pushes receive offloads to the tap (TUNSETOFFLOAD); false when the tap refuses them. */
  private applyOffloads(features: bigint): boolean {
    try {
      this.tap.setOffloads(features);
    } catch (e) {
      log.warn(`net: TUNSETOFFLOAD failed: ${(e as Error).message}`);
      return false;
    }
    this.guestOffloads = features;
    this.shared.bigFrames = (features & GSO_RECEIVE) !== 0n;
    return true;
  }

  protocolFeatures(): bigint {
    return pf(ProtocolFeature.RARP) | pf(ProtocolFeature.NET_MTU);
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    if (offset < 0 || size < 0 || offset + size > NET_CONFIG_SIZE) return null;
    return encodeNetConfig({ mac: this.mac, status: this.status, maxVirtqueuePairs: this.pairs, mtu: this.mtu }).subarray(offset, offset + size);
  }

  /** The config space is read-only for a VERSION_1 driver (it sets its MAC through the control queue). */
  writeConfig(): boolean {
    return false;
  }

  startQueue(ring: VirtqueueConfig, mem: GuestMemory, ackedFeatures: bigint): void {
    if (ring.index === ctrlQueueIndex(this.pairs)) {
      this.ctrl.start(openVirtqueue(mem, ring));
      return;
    }
    this.queues.start(ring, mem, ackedFeatures);
    if (ring.index % 2 === 0) {
      this.rxRunning[ring.index >> 1] = true;
      this.updateAttachedQueues();
    }
  }

  stopQueue(index: number): RingPosition | null {
    if (index === ctrlQueueIndex(this.pairs)) return this.ctrl.stop();
    if (index % 2 === 0 && this.rxRunning[index >> 1] === true) {
      // Detached first: the kernel stops steering flows to the queue before its ring stops.
      this.rxRunning[index >> 1] = false;
      this.updateAttachedQueues();
    }
    return this.queues.stop(index);
  }

  private serveControl(): void {
    const q = this.ctrl.queue;
    if (q === null) return;
    processQueue(q, (chain) => {
      q.add(chain.head, this.control.handle(chain));
      return true;
    }, undefined, this.ctrl.budget);
  }

  sendRarp(mac: Uint8Array): void {
    try {
      this.tap.writeRarp(mac);
      log.info(`net: announced ${formatMac(mac)} on tap ${this.tap.name} (RARP)`);
    } catch (e) {
      log.warn(`net: SEND_RARP: ${(e as Error).message}`);
    }
  }

  /** NET_SET_MTU: the front-end's MTU; the tap follows when we may change it. */
  setMtu(mtu: number): void {
    this.mtu = mtu;
    this.shared.mtu = mtu; // the frame threads size their receive buffers by it
    try {
      tun.setIfMtu(this.controlFd, this.tap.name, mtu);
    } catch (e) {
      log.warn(`net: NET_SET_MTU ${mtu}: the tap keeps its MTU (${(e as Error).message})`);
    }
  }

  reset(): void {
    for (const i of this.queues.running()) this.queues.stop(i);
    this.rxRunning.fill(false);
    this.ctrl.stop();
    this.acked = 0n;
    this.mac = this.defaultMac;
    this.status = VIRTIO_NET_S.LINK_UP;
    if (!this.setActivePairs(this.pairs)) this.activePairs = this.pairs; // no VQ_PAIRS_SET seen yet: every running pair carries frames
    this.resetFilter();
    this.applyOffloads(0n);
  }

  enterSuspendedState(): void {}

  snapshot(): NetState {
    const table = this.shared.table();
    return {
      version: NET_STATE_VERSION,
      guestOffloads: this.guestOffloads.toString(),
      mac: this.mac.slice(),
      mtu: this.mtu,
      status: this.status,
      queuePairs: this.pairs,
      activePairs: this.activePairs,
      rxMode: this.shared.rxMode,
      unicast: table.unicast,
      multicast: table.multicast,
    };
  }

  restore(raw: unknown, ackedFeatures: bigint): void {
    const s = validateNetState(raw, this.pairs, ackedFeatures);
    const offloads = BigInt(s.guestOffloads);
    const tunFlags = offloads === 0n ? 0 : this.tap.supportedOffloads;
    if (offloads !== 0n && tunFlags === 0) throw new Error(`net state: the guest had receive offloads 0x${offloads.toString(16)}, which tap ${this.tap.name} cannot take`);
    // Everything checked: apply.
    if (!this.applyOffloads(offloads)) throw new Error(`net state: tap ${this.tap.name} refused the saved offloads 0x${offloads.toString(16)}`);
    this.acked = ackedFeatures;
    this.mac = s.mac.slice();
    this.shared.mac = this.mac;
    this.mtu = s.mtu;
    this.shared.mtu = s.mtu;
    if (!this.setActivePairs(s.activePairs)) log.warn(`net state: the tap keeps ${this.activePairs} queue pair(s) attached, the guest uses ${s.activePairs}`);
    this.shared.rxMode = s.rxMode;
    this.shared.setTable(s.unicast, s.multicast);
    this.status = s.status;
    if ((this.acked & VIRTIO_NET_F_GUEST_ANNOUNCE) !== 0n) {
      // After a migration the guest announces itself (gratuitous ARP) when asked to.
      this.status |= VIRTIO_NET_S.ANNOUNCE;
      this.ctx.loop.defer(() => this.ctx.configChanged());
    }
  }

  dispose(): void {
    this.ctrl.stop();
    this.queues.dispose();
    this.tap.close();
    close(this.controlFd);
    releaseRings(this.rings);
    releaseRings(this.rxRings);
    this.shared.record.dispose();
  }
}
