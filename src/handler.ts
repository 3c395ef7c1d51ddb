// The common vhost-user request handler (crosvm's DeviceRequestHandler): negotiation, guest memory,
// ring state and snapshots, for any VhostUserDevice. It is transport-agnostic: `handle` takes a
// decoded message and returns the reply payload (or null); the session does the socket side.
import { close } from "../ffi/libc.ts";
import { setNonBlocking } from "../ffi/io.ts";
import {
  Req, reqName, pf, ProtocolFeature, HANDLER_PROTOCOL_FEATURES, F_PROTOCOL_FEATURES, F_LOG_ALL, VHOST_VRING_F_LOG, MAX_MEM_SLOTS,
  TRANSFER_SAVE, TRANSFER_LOAD, PHASE_STOPPED, DEVICE_STATE_NO_FD,
} from "./protocol/constants.ts";
import { type Message, type MemoryRegionDesc, u64Bytes, vringStateBytes, configBytes, inflightBytes } from "./protocol/codec.ts";
import { GuestMemory, MemoryRegion } from "./memory.ts";
import { checkRing } from "./open_virtqueue.ts";
import { MAX_QUEUE_SIZE, type VirtqueueConfig } from "./ring.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, type VhostUserDevice, type DeviceIdentity } from "./device.ts";
import type { EventLoop } from "./event_loop.ts";
import { encodeEnvelope, decodeEnvelope, StateTransfer, SNAPSHOT_FORMAT_VERSION } from "./snapshot.ts";
import { BackendChannel } from "./backend_channel.ts";
import { DirtyLog } from "./dirty_log.ts";
import { InflightRegion, type InflightLayout } from "./inflight.ts";

/** Feature bits that belong to vhost-user itself, not to the virtio device. */
const VHOST_FEATURES = F_PROTOCOL_FEATURES | F_LOG_ALL;
import { log } from "./log.ts";

/** A request the handler refuses; the session replies with an error and goes on. */
export class RequestError extends Error {}

/** Requests whose reply carries a value (sent whether or not NEED_REPLY is set). */
export const VALUE_REPLIES: ReadonlySet<number> = new Set([
  Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE, Req.GET_QUEUE_NUM, Req.GET_CONFIG,
  Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS, Req.SET_DEVICE_STATE_FD, Req.CHECK_DEVICE_STATE, Req.GET_INFLIGHT_FD,
  Req.SET_LOG_BASE, Req.IOTLB_MSG, Req.POSTCOPY_END,
]);

/**
 * The error reply for a value request, shaped like the real one: an error value where the spec
 * has one, or null where it has none (GET_VRING_BASE...). A front-end reads exactly the size of
 * the reply it expects (crosvm), so a short reply would leave it waiting: the caller drops the
 * session instead.
 */
export function errorReply(code: number, msg?: Message): Uint8Array | null {
  switch (code) {
    case Req.GET_CONFIG: {
      const b = msg?.body;
      return configBytes(b?.kind === "config" ? b.offset : 0, b?.kind === "config" ? b.flags : 0, new Uint8Array(0));
    }
    case Req.SET_DEVICE_STATE_FD:
      return u64Bytes(DEVICE_STATE_NO_FD | 1);
    case Req.CHECK_DEVICE_STATE:
    case Req.SET_LOG_BASE:
    case Req.IOTLB_MSG:
    case Req.POSTCOPY_END:
      return u64Bytes(1);
    case Req.GET_INFLIGHT_FD:
      return inflightBytes(0, 0, 0, 0); // size 0: no region (QEMU then goes on without one)
    default:
      return null;
  }
}

interface Vring {
  num: number;
  addr: { desc: number; used: number; avail: number } | null;
  /** SET_VRING_ADDR's VHOST_VRING_F_LOG and log address: where used-ring writes are logged. */
  logUsed: number | null;
  /** SET_VRING_BASE's value or where the ring stopped; null until either (a fresh ring). */
  base: number | null;
  kickFd: number;
  callFd: number;
  errFd: number;
  enabled: boolean;
  started: boolean;
  /** The device is serving the ring. */
  running: boolean;
  /** Where the used ring continues after a pause (a memory-table change); unset after GET/SET_VRING_BASE. */
  nextUsed: number | undefined;
}

function newVring(): Vring {
  return { num: 0, addr: null, logUsed: null, base: null, kickFd: -1, callFd: -1, errFd: -1, enabled: false, started: false, running: false, nextUsed: undefined };
}

export class VhostUserHandler {
  private owner = false;
  private ackedFeatures = 0n;
  private ackedProtocol = 0n;
  private status = 0;
  private readonly mem = new GuestMemory();
  private vrings: Vring[];
  private backend: BackendChannel | null = null;
  private readonly transfer: StateTransfer;
  private suspended = false;
  /** The inflight region (GET_INFLIGHT_FD/SET_INFLIGHT_FD), shared with the front-end. */
  private inflight: InflightRegion | null = null;
  /** fds to send with the reply being built (GET_INFLIGHT_FD); the session sends, then closes them. */
  private replyFds: number[] = [];
  /** The dirty log (SET_LOG_BASE) and its notification fd (SET_LOG_FD). */
  private log: DirtyLog | null = null;
  private logFd = -1;

  constructor(private readonly device: VhostUserDevice, private readonly loop: EventLoop, private readonly identity: DeviceIdentity) {
    this.vrings = Array.from({ length: device.maxQueues() }, newVring);
    this.transfer = new StateTransfer(loop);
  }

  offeredFeatures(): bigint {
    return this.device.features() | VHOST_FEATURES | VIRTIO_F_RING_PACKED;
  }

  offeredProtocolFeatures(): bigint {
    return HANDLER_PROTOCOL_FEATURES | this.device.protocolFeatures();
  }

  hasProtocol(bit: number): boolean {
    return (this.ackedProtocol & pf(bit)) !== 0n;
  }

  /** Handles one request; returns the reply payload for value requests, null otherwise. */
  handle(msg: Message): Uint8Array | null {
    const b = msg.body;
    switch (msg.header.code) {
      case Req.GET_FEATURES:
        return u64Bytes(this.offeredFeatures());
      case Req.SET_FEATURES:
        this.setFeatures(b.kind === "u64" ? b.value : 0n);
        return null;
      case Req.SET_OWNER:
        if (this.owner) throw new RequestError("SET_OWNER: session already has an owner");
        this.owner = true;
        return null;
      case Req.RESET_OWNER:
        this.resetDevice();
        this.owner = false;
        return null;
      case Req.GET_PROTOCOL_FEATURES:
        return u64Bytes(this.offeredProtocolFeatures());
      case Req.SET_PROTOCOL_FEATURES: {
        const v = b.kind === "u64" ? b.value : 0n;
        const unknown = v & ~this.offeredProtocolFeatures();
        if (unknown) throw new RequestError(`SET_PROTOCOL_FEATURES: bits 0x${unknown.toString(16)} were not offered`);
        this.ackedProtocol = v;
        return null;
      }
      case Req.GET_QUEUE_NUM:
        return u64Bytes(this.device.maxQueues());
      case Req.SET_MEM_TABLE:
        this.requireOwner(msg);
        if (b.kind === "memTable") this.setMemTable(b.regions, msg.fds);
        return null;
      case Req.GET_MAX_MEM_SLOTS:
        return u64Bytes(MAX_MEM_SLOTS);
      case Req.ADD_MEM_REG:
        this.requireOwner(msg);
        if (b.kind === "memRegion") this.addMemRegion(b.region, msg.fds[0]!);
        return null;
      case Req.REM_MEM_REG:
        this.requireOwner(msg);
        for (const fd of msg.fds) close(fd);
        if (b.kind === "memRegion") this.removeMemRegion(b.region);
        return null;
      case Req.SET_VRING_NUM:
        if (b.kind === "vringState") this.setVringNum(b.index, b.num);
        return null;
      case Req.SET_VRING_ADDR:
        if (b.kind === "vringAddr") this.setVringAddr(b.index, b.flags, b.desc, b.used, b.avail, b.log);
        return null;
      case Req.SET_VRING_BASE:
        if (b.kind === "vringState") this.setVringBase(b.index, b.num);
        return null;
      case Req.GET_VRING_BASE:
        if (b.kind !== "vringState") return null;
        return vringStateBytes(b.index, this.getVringBase(b.index));
      case Req.SET_VRING_KICK:
      case Req.SET_VRING_CALL:
      case Req.SET_VRING_ERR:
        if (b.kind === "vringFd") this.setVringFd(msg.header.code, b.index, b.noFd ? -1 : msg.fds[0]!);
        return null;
      case Req.SET_VRING_ENABLE:
        if (b.kind === "vringState") this.setVringEnable(b.index, b.num);
        return null;
      case Req.GET_CONFIG: {
        if (b.kind !== "config") return null;
        const data = this.device.readConfig(b.offset, b.size);
        if (data === null || data.length !== b.size) {
          throw new RequestError(`GET_CONFIG: range ${b.offset}+${b.size} is outside the config space`);
        }
        return configBytes(b.offset, b.flags, data);
      }
      case Req.SET_CONFIG:
        if (b.kind !== "config") return null;
        if (b.flags > 1) throw new RequestError(`SET_CONFIG: unknown flags ${b.flags}`);
        if (!this.device.writeConfig(b.offset, b.data)) {
          throw new RequestError(`SET_CONFIG: range ${b.offset}+${b.size} is not writable`);
        }
        return null;
      case Req.SET_BACKEND_REQ_FD:
        this.setBackendFd(msg.fds[0]!);
        return null;
      case Req.RESET_DEVICE:
        this.resetDevice();
        return null;
      case Req.SET_STATUS: {
        const v = b.kind === "u64" ? b.value : 0n;
        if (v > 0xffn) throw new RequestError(`SET_STATUS: status 0x${v.toString(16)} does not fit a byte`);
        this.status = Number(v);
        return null;
      }
      case Req.GET_STATUS:
        return u64Bytes(this.status);
      case Req.SET_DEVICE_STATE_FD:
        if (b.kind !== "deviceStateFd") return null;
        return u64Bytes(this.setDeviceStateFd(b.direction, b.phase, msg.fds[0]!));
      case Req.CHECK_DEVICE_STATE:
        return u64Bytes(this.checkDeviceState());
      case Req.GET_INFLIGHT_FD:
        if (b.kind !== "inflight") return null;
        return this.getInflightFd(b.numQueues, b.queueSize);
      case Req.SET_INFLIGHT_FD:
        if (b.kind !== "inflight") return null;
        this.setInflightFd(msg.fds[0]!, b.mmapSize, b.mmapOffset, b.numQueues, b.queueSize);
        return null;
      case Req.SET_LOG_BASE:
        if (b.kind !== "logBase") return null;
        this.setLogBase(b.size, b.offset, msg.fds[0]!);
        return u64Bytes(0);
      case Req.SET_LOG_FD:
        this.setLogFd(msg.fds[0]!);
        return null;
      case Req.SEND_RARP: {
        if (!this.hasProtocol(ProtocolFeature.RARP) || this.device.sendRarp === undefined) throw new RequestError("SEND_RARP: RARP was not negotiated");
        // The MAC is the first 6 bytes of the u64 payload.
        const mac = u64Bytes(b.kind === "u64" ? b.value : 0n).slice(0, 6);
        this.device.sendRarp(mac);
        return null;
      }
      case Req.NET_SET_MTU: {
        if (!this.hasProtocol(ProtocolFeature.NET_MTU) || this.device.setMtu === undefined) throw new RequestError("NET_SET_MTU: NET_MTU was not negotiated");
        const mtu = b.kind === "u64" ? b.value : 0n;
        if (mtu < 68n || mtu > 65535n) throw new RequestError(`NET_SET_MTU: ${mtu} is not an MTU (68..65535)`);
        this.device.setMtu(Number(mtu));
        return null;
      }
      default:
        for (const fd of msg.fds) close(fd);
        throw new RequestError(`${reqName(msg.header.code)} is not supported by this backend`);
    }
  }

  private requireOwner(msg: Message): void {
    if (!this.owner) {
      for (const fd of msg.fds) close(fd);
      throw new RequestError(`${reqName(msg.header.code)} before SET_OWNER`);
    }
  }

  private vring(index: number, what: string): Vring {
    const v = this.vrings[index];
    if (v === undefined) throw new RequestError(`${what}: queue ${index} does not exist (device has ${this.vrings.length})`);
    return v;
  }

  // ---- features ----

  private setFeatures(features: bigint): void {
    if (!this.owner) throw new RequestError("SET_FEATURES before SET_OWNER");
    const unknown = features & ~this.offeredFeatures();
    if (unknown) throw new RequestError(`SET_FEATURES: bits 0x${unknown.toString(16)} were not offered`);
    if (this.vrings.some((v) => v.running) && features !== this.ackedFeatures) {
      // Only logging may be switched on a live device (migration start and end); the rings are
      // handed over again so every thread serving them logs, or stops logging, from now on.
      if ((features ^ this.ackedFeatures) !== F_LOG_ALL) throw new RequestError("SET_FEATURES: cannot change features while rings are running");
      this.withRingsPaused(() => {
        this.ackedFeatures = features;
      });
      log.info(`dirty logging ${(features & F_LOG_ALL) !== 0n ? "on" : "off"}`);
      return;
    }
    this.ackedFeatures = features;
    this.device.ackFeatures(features & ~VHOST_FEATURES);
    // Without VHOST_USER_F_PROTOCOL_FEATURES rings are born enabled; with it they wait for
    // SET_VRING_ENABLE (crosvm gets this backwards).
    if ((features & F_PROTOCOL_FEATURES) === 0n) {
      this.vrings.forEach((v, i) => {
        v.enabled = true;
        this.activate(i);
      });
    }
  }

  // ---- memory ----

  private setMemTable(regions: MemoryRegionDesc[], fds: number[]): void {
    const fresh = new GuestMemory();
    const fail = (consumed: number, e: unknown): never => {
      for (let j = consumed; j < fds.length; j++) close(fds[j]!);
      fresh.clear();
      throw new RequestError(`SET_MEM_TABLE: ${(e as Error).message}`);
    };
    for (let i = 0; i < regions.length; i++) {
      let region: MemoryRegion;
      try {
        region = MemoryRegion.map(regions[i]!, fds[i]!); // closes fds[i] either way
      } catch (e) {
        return fail(i + 1, e);
      }
      try {
        fresh.add(region);
      } catch (e) {
        region.unmap();
        return fail(i + 1, e);
      }
    }
    this.withRingsPaused(() => {
      this.mem.clear();
      for (const r of fresh.list()) this.mem.add(r);
    });
  }

  private addMemRegion(desc: MemoryRegionDesc, fd: number): void {
    let region: MemoryRegion;
    try {
      region = MemoryRegion.map(desc, fd);
    } catch (e) {
      throw new RequestError(`ADD_MEM_REG: ${(e as Error).message}`);
    }
    if (this.mem.regionCount >= MAX_MEM_SLOTS) {
      region.unmap();
      throw new RequestError(`ADD_MEM_REG: all ${MAX_MEM_SLOTS} memory slots are in use`);
    }
    // No ring stops: rings in this thread share the table, and rings in queue threads have their
    // copies extended before add() returns (QueueService listens to the table), so the region is
    // usable everywhere once this request is acknowledged.
    try {
      this.mem.add(region);
    } catch (e) {
      region.unmap();
      throw new RequestError(`ADD_MEM_REG: ${(e as Error).message}`);
    }
    // A ring that could not start for want of this region may start now.
    this.vrings.forEach((_, i) => this.activate(i));
  }

  private removeMemRegion(desc: MemoryRegionDesc): void {
    let found = false;
    this.withRingsPaused(() => {
      found = this.mem.remove(desc);
    });
    if (!found) throw new RequestError(`REM_MEM_REG: no region at 0x${desc.gpa.toString(16)}+0x${desc.size.toString(16)}`);
  }

  /** Stops running rings (their views point into the old mapping), runs `fn`, restarts them. */
  private withRingsPaused(fn: () => void): void {
    const paused: number[] = [];
    this.vrings.forEach((v, i) => {
      if (v.running) {
        this.deactivate(i);
        paused.push(i);
      }
    });
    try {
      fn();
    } finally {
      for (const i of paused) this.activate(i);
    }
  }

  // ---- rings ----

  private requireStopped(v: Vring, index: number, what: string): void {
    if (v.running) throw new RequestError(`${what}: queue ${index} is running`);
  }

  private setVringNum(index: number, num: number): void {
    const v = this.vring(index, "SET_VRING_NUM");
    this.requireStopped(v, index, "SET_VRING_NUM");
    const packed = (this.ackedFeatures & VIRTIO_F_RING_PACKED) !== 0n;
    if (num === 0 || num > MAX_QUEUE_SIZE || (!packed && (num & (num - 1)) !== 0)) {
      throw new RequestError(`SET_VRING_NUM: size ${num} is not ${packed ? "" : "a power of 2 "}in 1..${MAX_QUEUE_SIZE}`);
    }
    v.num = num;
  }

  /**
   * A running ring may be given its addresses again with only the logging flag changed: that is
   * how a front-end turns used-ring logging on and off around a migration (QEMU's vhost_dev_set_log).
   */
  private setVringAddr(index: number, flags: number, desc: number, used: number, avail: number, log: number): void {
    const v = this.vring(index, "SET_VRING_ADDR");
    if (flags & ~VHOST_VRING_F_LOG) throw new RequestError(`SET_VRING_ADDR: unknown flags 0x${flags.toString(16)}`);
    const logUsed = flags & VHOST_VRING_F_LOG ? log : null;
    if (v.running) {
      const a = v.addr!;
      if (a.desc !== desc || a.used !== used || a.avail !== avail) throw new RequestError(`SET_VRING_ADDR: queue ${index} is running`);
      if (v.logUsed === logUsed) return;
      this.deactivate(index);
      v.logUsed = logUsed;
      this.activate(index);
      return;
    }
    v.addr = { desc, used, avail };
    v.logUsed = logUsed;
    this.activate(index);
  }

  private setVringBase(index: number, base: number): void {
    const v = this.vring(index, "SET_VRING_BASE");
    this.requireStopped(v, index, "SET_VRING_BASE");
    // Split: a u16 index. Packed: index | wrap << 15, and optionally the used side in bits 16-31.
    if (base > 0xffff && (this.ackedFeatures & VIRTIO_F_RING_PACKED) === 0n) throw new RequestError(`SET_VRING_BASE: ${base} is not a split-ring index`);
    v.base = base;
    v.nextUsed = undefined;
  }

  /** Where ring `v` starts: a fresh packed ring at index 0 with both wrap counters set. */
  private baseOf(v: Vring): number {
    return v.base ?? ((this.ackedFeatures & VIRTIO_F_RING_PACKED) !== 0n ? 0x8000 : 0);
  }

  private getVringBase(index: number): number {
    const v = this.vring(index, "GET_VRING_BASE");
    this.deactivate(index);
    v.started = false;
    v.nextUsed = undefined; // the next owner of the ring reads the used index from guest memory
    if (v.kickFd >= 0) close(v.kickFd);
    v.kickFd = -1;
    if (!this.suspended && this.vrings.every((r) => !r.started)) {
      this.suspended = true;
      this.device.enterSuspendedState();
    }
    return this.baseOf(v);
  }

  private setVringFd(code: number, index: number, fd: number): void {
    const v = this.vrings[index];
    if (v === undefined) {
      if (fd >= 0) close(fd);
      throw new RequestError(`${reqName(code)}: queue ${index} does not exist`);
    }
    if (fd >= 0) {
      // Notification fds come as the front-end made them: a blocking eventfd preloaded near its
      // maximum, or a pipe nobody reads, would block this thread in write(2) (and a blocking kick
      // fd in read(2)). Non-blocking, a full eventfd (EAGAIN) already means "notified".
      try {
        setNonBlocking(fd);
      } catch (e) {
        close(fd);
        throw new RequestError(`${reqName(code)}: fd ${fd} is unusable: ${(e as Error).message}`);
      }
    }
    if (code === Req.SET_VRING_KICK) {
      if (fd < 0) throw new RequestError("SET_VRING_KICK without an fd: polling mode is not supported");
      this.deactivate(index);
      if (v.kickFd >= 0) close(v.kickFd);
      v.kickFd = fd;
      v.started = true;
      this.suspended = false;
      this.activate(index);
    } else {
      // A running ring is restarted around the swap: it may be served by another thread, which
      // then picks up the new fd with the rest of the ring description.
      const running = v.running;
      this.deactivate(index);
      if (code === Req.SET_VRING_CALL) {
        if (v.callFd >= 0) close(v.callFd);
        v.callFd = fd;
      } else {
        if (v.errFd >= 0) close(v.errFd);
        v.errFd = fd;
      }
      if (running) this.activate(index);
    }
  }

  private setVringEnable(index: number, num: number): void {
    const v = this.vring(index, "SET_VRING_ENABLE");
    if (num > 1) throw new RequestError(`SET_VRING_ENABLE: ${num} is neither 0 nor 1`);
    v.enabled = num === 1;
    if (v.enabled) this.activate(index);
    else this.deactivate(index);
  }

  /** Hands the ring to the device once it is started, enabled and fully described. */
  private activate(index: number): void {
    const v = this.vrings[index]!;
    if (v.running || !v.started || !v.enabled || v.addr === null || v.num === 0 || this.mem.regionCount === 0) return;
    const { desc, used, avail } = v.addr;
    const packed = (this.ackedFeatures & VIRTIO_F_RING_PACKED) !== 0n;
    const descGpa = this.mem.vaToGpa(desc, 16 * v.num);
    // Packed rings: the driver and device event areas (4 bytes each) instead of avail/used rings.
    const availGpa = this.mem.vaToGpa(avail, packed ? 4 : 6 + 2 * v.num);
    const usedGpa = this.mem.vaToGpa(used, packed ? 4 : 6 + 8 * v.num);
    if (descGpa === null || availGpa === null || usedGpa === null) {
      log.warn(`queue ${index}: ring addresses are not in the memory table; not started`);
      return;
    }
    const ring: VirtqueueConfig = {
      index, size: v.num, descGpa, availGpa, usedGpa,
      eventIdx: (this.ackedFeatures & VIRTIO_F_EVENT_IDX) !== 0n,
      indirect: (this.ackedFeatures & VIRTIO_F_INDIRECT_DESC) !== 0n,
      nextAvail: this.baseOf(v), nextUsed: v.nextUsed, kickFd: v.kickFd, callFd: v.callFd, errFd: v.errFd,
      packed,
    };
    // The region's layout follows the features acked when it was made (split or packed).
    const inflight = this.inflight?.queue(index) ?? null;
    if (inflight !== null && this.hasProtocol(ProtocolFeature.INFLIGHT_SHMFD) && v.num <= inflight.queueSize) {
      if (inflight.layout === (packed ? "packed" : "split")) ring.inflight = inflight;
      else log.warn(`queue ${index}: the inflight region has the ${inflight.layout} layout, the ring is not ${inflight.layout}; not tracked`);
    }
    if (this.logging()) {
      ring.log = this.log!.share();
      if (v.logUsed !== null) ring.usedLogGpa = v.logUsed;
      if (this.logFd >= 0) ring.logFd = this.logFd;
    }
    try {
      checkRing(this.mem, ring);
    } catch (e) {
      log.warn(`queue ${index}: ${(e as Error).message}; not started`);
      return;
    }
    log.debug(`queue ${index}: started (size ${v.num}, base ${v.base})`);
    v.running = true;
    try {
      this.device.startQueue(ring, this.mem, this.ackedFeatures & ~VHOST_FEATURES);
    } catch (e) {
      // A fd the front-end gave that epoll refuses (a regular file as kick fd...), a thread that
      // could not take the ring: the ring stays stopped, the session goes on.
      log.warn(`queue ${index}: could not start: ${(e as Error).message}`);
      this.deactivate(index);
    }
  }

  /** Takes the ring back from the device; its position becomes the next base. */
  private deactivate(index: number): void {
    const v = this.vrings[index]!;
    if (!v.running) return;
    v.running = false;
    let pos = null;
    try {
      pos = this.device.stopQueue(index);
    } catch (e) {
      log.error(`queue ${index}: stopping failed: ${(e as Error).message}`);
    }
    if (pos !== null) {
      v.base = pos.nextAvail;
      v.nextUsed = pos.nextUsed;
    }
    log.debug(`queue ${index}: stopped at ${v.base}`);
  }

  /** fds the reply to the last request carries (the caller sends them, then closes its copies). */
  takeReplyFds(): number[] {
    const fds = this.replyFds;
    this.replyFds = [];
    return fds;
  }

  // ---- inflight tracking (crash-safe reconnect) ----

  private getInflightFd(numQueues: number, queueSize: number): Uint8Array {
    if (!this.hasProtocol(ProtocolFeature.INFLIGHT_SHMFD)) throw new RequestError("GET_INFLIGHT_FD: INFLIGHT_SHMFD was not negotiated");
    if (numQueues > this.vrings.length) throw new RequestError(`GET_INFLIGHT_FD: ${numQueues} queues (the device has ${this.vrings.length})`);
    let r: { region: InflightRegion; fd: number };
    try {
      r = InflightRegion.allocate(numQueues, queueSize, this.inflightLayout());
    } catch (e) {
      throw new RequestError(`GET_INFLIGHT_FD: ${(e as Error).message}`);
    }
    this.adoptInflight(r.region);
    this.replyFds.push(r.fd);
    return inflightBytes(r.region.size, 0, numQueues, queueSize);
  }

  private setInflightFd(fd: number, size: number, offset: number, numQueues: number, queueSize: number): void {
    if (!this.hasProtocol(ProtocolFeature.INFLIGHT_SHMFD)) {
      close(fd);
      throw new RequestError("SET_INFLIGHT_FD: INFLIGHT_SHMFD was not negotiated");
    }
    let region: InflightRegion;
    try {
      if (numQueues > this.vrings.length) throw new Error(`${numQueues} queues (the device has ${this.vrings.length})`);
      region = InflightRegion.map(fd, size, offset, numQueues, queueSize, this.inflightLayout());
    } catch (e) {
      throw new RequestError(`SET_INFLIGHT_FD: ${(e as Error).message}`);
    }
    this.adoptInflight(region);
  }

  /** The layout of a region made or adopted now: the ring layout the acked features give (QEMU
   * sends SET_FEATURES before GET_INFLIGHT_FD and SET_INFLIGHT_FD so that a backend knows it). */
  private inflightLayout(): InflightLayout {
    return (this.ackedFeatures & VIRTIO_F_RING_PACKED) !== 0n ? "packed" : "split";
  }

  /** Running rings are handed over again so they track in the new region. */
  private adoptInflight(region: InflightRegion): void {
    const old = this.inflight;
    this.withRingsPaused(() => {
      this.inflight = region;
    });
    old?.unmap();
  }

  // ---- dirty logging (live migration) ----

  /** SET_LOG_BASE: maps the new log and hands running rings over to it; the old one is unmapped after. */
  private setLogBase(size: number, offset: number, fd: number): void {
    if (!this.hasProtocol(ProtocolFeature.LOG_SHMFD)) {
      close(fd);
      throw new RequestError("SET_LOG_BASE: LOG_SHMFD was not negotiated");
    }
    let fresh: DirtyLog;
    try {
      fresh = DirtyLog.map(fd, size, offset);
    } catch (e) {
      throw new RequestError(`SET_LOG_BASE: ${(e as Error).message}`);
    }
    const old = this.log;
    this.withRingsPaused(() => {
      this.log = fresh;
    });
    old?.unmap();
    log.debug(`dirty log of ${size} bytes mapped`);
  }

  private setLogFd(fd: number): void {
    try {
      setNonBlocking(fd);
    } catch (e) {
      close(fd);
      throw new RequestError(`SET_LOG_FD: ${(e as Error).message}`);
    }
    // Rings pick up the new fd with the rest of their description.
    this.withRingsPaused(() => {
      if (this.logFd >= 0) close(this.logFd);
      this.logFd = fd;
    });
  }

  /** Rings log while the driver acked LOG_ALL and a log is mapped. */
  private logging(): boolean {
    return (this.ackedFeatures & F_LOG_ALL) !== 0n && this.log !== null;
  }

  // ---- backend channel ----

  private setBackendFd(fd: number): void {
    this.backend?.close();
    this.backend = new BackendChannel(this.loop, fd);
  }

  /** BACKEND_CONFIG_CHANGE_MSG: the front-end re-reads the config space. */
  notifyConfigChanged(): boolean {
    if (this.backend === null || !this.hasProtocol(ProtocolFeature.BACKEND_REQ)) return false;
    return this.backend.configChanged();
  }

  // ---- device state ----

  private setDeviceStateFd(direction: number, phase: number, fd: number): bigint {
    try {
      if (!this.hasProtocol(ProtocolFeature.DEVICE_STATE)) throw new RequestError("SET_DEVICE_STATE_FD: DEVICE_STATE was not negotiated");
      if (phase !== PHASE_STOPPED) throw new RequestError(`SET_DEVICE_STATE_FD: phase ${phase} is not supported (only 0, stopped)`);
      if (direction !== TRANSFER_SAVE && direction !== TRANSFER_LOAD) throw new RequestError(`SET_DEVICE_STATE_FD: direction ${direction}`);
      if (this.vrings.some((v) => v.started)) throw new RequestError("SET_DEVICE_STATE_FD: rings must be stopped first");
      if (this.transfer.busy) throw new RequestError("SET_DEVICE_STATE_FD: a transfer is already in progress");
    } catch (e) {
      close(fd);
      throw e;
    }
    if (direction === TRANSFER_LOAD) {
      this.transfer.load(fd);
    } else {
      let blob: Uint8Array;
      try {
        blob = encodeEnvelope({
          formatVersion: SNAPSHOT_FORMAT_VERSION,
          device: this.identity.name,
          virtioId: this.identity.virtioId,
          ackedFeatures: this.ackedFeatures.toString(),
          ackedProtocolFeatures: this.ackedProtocol.toString(),
          state: this.device.snapshot(),
        });
      } catch (e) {
        close(fd);
        throw new RequestError(`SET_DEVICE_STATE_FD: snapshot failed: ${(e as Error).message}`);
      }
      this.transfer.save(fd, blob);
    }
    return BigInt(DEVICE_STATE_NO_FD); // success; we never supply our own fd
  }

  private checkDeviceState(): bigint {
    let loaded: Uint8Array | null;
    try {
      loaded = this.transfer.finish();
    } catch (e) {
      throw new RequestError(`CHECK_DEVICE_STATE: ${(e as Error).message}`);
    }
    if (loaded === null) return 0n; // a save that completed
    try {
      const env = decodeEnvelope(loaded, this.identity.name, this.identity.virtioId);
      const features = BigInt(env.ackedFeatures);
      const protocol = BigInt(env.ackedProtocolFeatures);
      if (features & ~this.offeredFeatures()) throw new Error("saved features are not offered by this device");
      if (protocol & ~this.offeredProtocolFeatures()) throw new Error("saved protocol features are not offered by this backend");
      // Validates fully before changing anything, then applies the state and the features at once.
      this.device.restore(env.state, features & ~VHOST_FEATURES);
      this.ackedFeatures = features;
      this.ackedProtocol = protocol;
    } catch (e) {
      throw new RequestError(`CHECK_DEVICE_STATE: restore refused: ${(e as Error).message}`);
    }
    log.info("device state restored");
    return 0n;
  }

  // ---- reset and teardown ----

  private resetDevice(): void {
    this.vrings.forEach((_, i) => this.deactivate(i));
    for (const v of this.vrings) for (const fd of [v.kickFd, v.callFd, v.errFd]) if (fd >= 0) close(fd);
    this.vrings = this.vrings.map(newVring);
    this.device.reset();
    this.ackedFeatures = 0n;
    this.status = 0;
    this.suspended = false;
  }

  /** The front-end went away: stop everything, reset the device, release every resource. */
  dispose(): void {
    this.transfer.cancel();
    this.resetDevice();
    this.backend?.close();
    this.backend = null;
    this.mem.clear();
    this.log?.unmap();
    this.log = null;
    this.inflight?.unmap();
    this.inflight = null;
    if (this.logFd >= 0) close(this.logFd);
    this.logFd = -1;
  }
}
