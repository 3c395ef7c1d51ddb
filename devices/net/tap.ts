// The net device's host side: a Linux tap with virtio-net headers, one non-blocking fd per queue
// pair. Opening turns kernel errnos into messages that say what to do; offloads are probed the way
// QEMU (tap_probe_*) and crosvm do and then follow what the guest negotiated, so the kernel only
// hands us partial checksums and GSO frames the guest accepts.
import { readFileSync } from "node:fs";
import { close, SysError, EPERM, EBUSY, EINVAL, ENOENT, ENOTTY, EAGAIN } from "../../ffi/libc.ts";
import { write, setNonBlocking } from "../../ffi/io.ts";
import * as tun from "../../ffi/tap.ts";
import {
  VIRTIO_NET_HDR_SIZE,
  VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6,
} from "./virtio_net.ts";
import { formatMac, type NetOptions } from "./options.ts";

export type TapOpenOptions = Pick<NetOptions, "tap" | "queuePairs" | "mtu" | "offloads">;

const TAP_FLAGS = tun.IFF.TAP | tun.IFF.NO_PI | tun.IFF.VNET_HDR;
/** The name template of taps we create (crosvm's), filled in by the kernel. */
const CREATED_TAP_NAME = "vmtap%d";
const EBADFD = 77;
const CAP_NET_ADMIN_BIT = 12n;

const NEEDS_CAP = "needs CAP_NET_ADMIN: run as root or give the binary cap_net_admin";

/** The TUNSETOFFLOAD combinations the kernel accepts one by one (it refuses USO4 without USO6, anything without CSUM). */
const OFFLOAD_PROBES = [
  tun.TUN_F.CSUM,
  tun.TUN_F.CSUM | tun.TUN_F.TSO4,
  tun.TUN_F.CSUM | tun.TUN_F.TSO6,
  tun.TUN_F.CSUM | tun.TUN_F.TSO4 | tun.TUN_F.TSO_ECN,
  tun.TUN_F.CSUM | tun.TUN_F.UFO,
  tun.TUN_F.CSUM | tun.TUN_F.USO4 | tun.TUN_F.USO6,
];

function fail(message: string, cause: unknown): never {
  throw new Error(message, { cause });
}

function errnoOf(e: unknown): number {
  return e instanceof SysError ? e.errno : -1;
}

function mkTapHint(name: string, multiQueue: boolean): string {
  return `ip tuntap add mode tap name ${name} vnet_hdr${multiQueue ? " multi_queue" : ""}`;
}

function openTunOrExplain(): number {
  try {
    return tun.openTunDevice();
  } catch (e) {
    if (errnoOf(e) === ENOENT) fail(`${tun.TUN_DEVICE} does not exist: load the tun module (modprobe tun) or create the node (mknod ${tun.TUN_DEVICE} c 10 200)`, e);
    if (errnoOf(e) === 13 /* EACCES */ || errnoOf(e) === EPERM) fail(`cannot open ${tun.TUN_DEVICE}: ${NEEDS_CAP} (or make the node accessible to this user)`, e);
    throw e;
  }
}

/** TUNSETIFF on a fresh fd; closes it again on failure. */
function attach(name: string, flags: number): { fd: number; name: string } {
  const fd = openTunOrExplain();
  try {
    return { fd, name: tun.tunSetIff(fd, name, flags) };
  } catch (e) {
    close(fd);
    throw e;
  }
}

/** One fd per queue pair on the existing tap `name`, with errnos translated. */
function attachByName(name: string, pairs: number): number[] {
  const exists = tun.withControlSocket((s) => tun.ifIndex(s, name) >= 0);
  if (!exists) {
    throw new Error(
      `no tap named ${name} in this network namespace: create it with \`${mkTapHint(name, pairs > 1)}\`` +
        " (a tap in another namespace: run the backend under `ip netns exec NS`)",
    );
  }
  // A single pair also works on a multi_queue tap, so it may fall back to IFF_MULTI_QUEUE.
  let flags = TAP_FLAGS | (pairs > 1 ? tun.IFF.MULTI_QUEUE : 0);
  const fds: number[] = [];
  try {
    for (let i = 0; i < pairs; i++) {
      try {
        fds.push(attach(name, flags).fd);
      } catch (e) {
        if (i > 0 || errnoOf(e) !== EINVAL) throw e;
        // EINVAL: the multi_queue setting differs from ours, or it is not a tap at all.
        const flipped = flags ^ tun.IFF.MULTI_QUEUE;
        let probe: number;
        try {
          probe = attach(name, flipped).fd;
        } catch {
          fail(`${name} is not a tap (\`ip -d link show ${name}\` should say 'tun type tap'): create one with \`${mkTapHint(name, pairs > 1)}\``, e);
        }
        if (pairs > 1) {
          close(probe);
          fail(`tap ${name} is single-queue, and --queue-pairs ${pairs} needs a multi_queue tap: recreate it with \`ip link del ${name}; ${mkTapHint(name, true)}\``, e);
        }
        flags = flipped;
        fds.push(probe);
      }
    }
  } catch (e) {
    fds.forEach(close);
    const n = errnoOf(e);
    if (n === EPERM) fail(`tap ${name}: ${NEEDS_CAP} (or create the tap for this user: \`ip tuntap add mode tap name ${name} vnet_hdr user $USER\`)`, e);
    if (n === EBUSY) fail(`tap ${name} is in use: a single-queue tap takes one fd, and another process holds it (stop it, or use a multi_queue tap)`, e);
    throw e;
  }
  return fds;
}

/** Checks that an inherited fd is a tap opened with our flags; returns its name. */
function checkTapFd(fd: number): string {
  let info: { name: string; flags: number };
  try {
    info = tun.tunGetIff(fd);
  } catch (e) {
    const n = errnoOf(e);
    if (n === 9 /* EBADF */) fail(`--tap-fd ${fd} is not an open file descriptor (pass it to the backend open, without close-on-exec)`, e);
    if (n === EBADFD) fail(`--tap-fd ${fd} is /dev/net/tun but attached to no interface (TUNSETIFF was not called)`, e);
    if (n === EINVAL || n === ENOTTY) fail(`--tap-fd ${fd} is not a tun/tap fd`, e);
    throw e;
  }
  if ((info.flags & tun.IFF.TAP) === 0) fail(`--tap-fd ${fd} is a tun (layer 3) device ${info.name}, not a tap`, null);
  const missing = [
    (info.flags & tun.IFF.NO_PI) === 0 && "IFF_NO_PI",
    (info.flags & tun.IFF.VNET_HDR) === 0 && "IFF_VNET_HDR",
  ].filter(Boolean);
  if (missing.length > 0) {
    fail(
      `--tap-fd ${fd} (tap ${info.name}) was opened without ${missing.join(" and ")}: open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, ` +
        `or recreate the tap with \`${mkTapHint(info.name, false)}\` and pass --tap-name`,
      null,
    );
  }
  return info.name;
}

function hasCapNetAdmin(): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync("/proc/self/status", "utf8"));
  return m !== null && ((BigInt(`0x${m[1]}`) >> CAP_NET_ADMIN_BIT) & 1n) === 1n;
}

/** Creates a tap (vmtapN) with one fd per pair and configures its host side as crosvm's --device does. */
function createTap(o: TapOpenOptions & { tap: { kind: "create" } }): { name: string; fds: number[] } {
  const flags = TAP_FLAGS | (o.queuePairs > 1 ? tun.IFF.MULTI_QUEUE : 0);
  const fds: number[] = [];
  let name = CREATED_TAP_NAME;
  try {
    for (let i = 0; i < o.queuePairs; i++) {
      const a = attach(name, flags);
      fds.push(a.fd);
      name = a.name;
    }
    tun.withControlSocket((s) => {
      tun.setIfAddr(s, name, o.tap.hostIp);
      tun.setIfNetmask(s, name, o.tap.netmask);
      if (o.tap.hostMac !== null) tun.setIfHwAddr(s, name, o.tap.hostMac);
      if (o.mtu !== null) tun.setIfMtu(s, name, o.mtu);
      tun.setIfUp(s, name);
    });
  } catch (e) {
    fds.forEach(close); // the tap is not persistent: it goes with its last fd
    if (errnoOf(e) === EPERM) fail(`creating a tap ${NEEDS_CAP}`, e);
    if (errnoOf(e) === EINVAL && e instanceof SysError && e.call.startsWith("ioctl(SIOCSIFMTU")) fail(`--mtu ${o.mtu}: the tap refused that MTU`, e);
    throw e;
  }
  return { name, fds };
}

/**
 * Maps the guest's receive offloads to TUN_F_* as QEMU's tap_fd_set_offload does: nothing without
 * GUEST_CSUM, ECN only with TSO, and USO only as the pair the kernel accepts.
 */
export function guestFeaturesToTunOffloads(features: bigint): number {
  const has = (f: bigint) => (features & f) !== 0n;
  if (!has(VIRTIO_NET_F_GUEST_CSUM)) return 0;
  let t = tun.TUN_F.CSUM;
  if (has(VIRTIO_NET_F_GUEST_TSO4)) t |= tun.TUN_F.TSO4;
  if (has(VIRTIO_NET_F_GUEST_TSO6)) t |= tun.TUN_F.TSO6;
  if (has(VIRTIO_NET_F_GUEST_ECN) && (t & (tun.TUN_F.TSO4 | tun.TUN_F.TSO6)) !== 0) t |= tun.TUN_F.TSO_ECN;
  if (has(VIRTIO_NET_F_GUEST_UFO)) t |= tun.TUN_F.UFO;
  if (has(VIRTIO_NET_F_GUEST_USO4) && has(VIRTIO_NET_F_GUEST_USO6)) t |= tun.TUN_F.USO4 | tun.TUN_F.USO6;
  return t;
}

/**
 * The virtio-net offload features a device may offer over a tap that accepts `supported`. Guest
 * receive offloads follow the probe. The transmit ones (CSUM, HOST_*) need nothing from
 * TUNSETOFFLOAD, since a vnet_hdr tap takes partial-checksum and GSO frames on write; HOST_USO needs a
 * kernel that knows UDP_L4 GSO, which the USO probe shows.
 */
export function offloadFeatures(supported: number): bigint {
  if ((supported & tun.TUN_F.CSUM) === 0) return 0n;
  let f = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_HOST_UFO;
  if (supported & tun.TUN_F.TSO4) f |= VIRTIO_NET_F_GUEST_TSO4;
  if (supported & tun.TUN_F.TSO6) f |= VIRTIO_NET_F_GUEST_TSO6;
  if (supported & tun.TUN_F.TSO_ECN) f |= VIRTIO_NET_F_GUEST_ECN;
  if (supported & tun.TUN_F.UFO) f |= VIRTIO_NET_F_GUEST_UFO;
  if (supported & tun.TUN_F.USO4) f |= VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6 | VIRTIO_NET_F_HOST_USO;
  return f;
}

/** Tries each TUNSETOFFLOAD combination on `fd`; returns the union the tap accepted, leaving offloads off. */
function probeOffloads(fd: number): number {
  let supported = 0;
  for (const p of OFFLOAD_PROBES) if (tun.tunTrySetOffload(fd, p)) supported |= p;
  tun.tunSetOffload(fd, 0); // the guest has negotiated nothing yet
  return supported;
}

/** A RARP "reverse request" announcing `mac`, as QEMU's announce_self (and SEND_RARP back-ends) build it: 60 bytes. */
export function rarpFrame(mac: Uint8Array): Uint8Array {
  const f = new Uint8Array(60); // Ethernet minimum without FCS; the tail is padding
  const v = new DataView(f.buffer);
  f.fill(0xff, 0, 6);
  f.set(mac, 6);
  v.setUint16(12, 0x8035); // ETH_P_RARP
  v.setUint16(14, 1); // hardware: Ethernet
  v.setUint16(16, 0x0800); // protocol: IPv4
  f[18] = 6;
  f[19] = 4;
  v.setUint16(20, 3); // reverse request
  f.set(mac, 22); // sender hardware address; sender IP stays 0.0.0.0
  f.set(mac, 32); // target hardware address; target IP stays 0.0.0.0
  return f;
}

export class Tap {
  private closed = false;
  private currentOffloads = 0;
  /** Whether each queue (fd) is attached to the tap: the kernel steers frames only to attached queues. */
  private readonly attached: boolean[];

  constructor(
    readonly name: string,
    /** One non-blocking fd per queue pair (pair i reads and writes fds[i]). */
    readonly fds: readonly number[],
    /** TUN_F_* flags the tap accepted in the probe (0 with --no-offloads). */
    readonly supportedOffloads: number,
    /** The tap's MTU when it was opened. */
    readonly mtu: number,
  ) {
    this.attached = fds.map(() => true); // TUNSETIFF attaches
  }

  /**
   * Attaches the queues `want` picks and detaches the others (TUNSETQUEUE), so the kernel steers
   * flows only to queues a pair serves. Queue 0 stays attached: a tap without queues drops every
   * frame, and frames waiting there reach the guest once its first pair runs. A detached queue's
   * fd still transmits. Throws on the first queue the kernel refuses (the others keep their state).
   */
  setAttached(want: (queue: number) => boolean): void {
    if (this.closed) return;
    for (let i = 1; i < this.fds.length; i++) {
      const w = want(i);
      if (w === this.attached[i]) continue;
      tun.tunSetQueue(this.fds[i]!, w);
      this.attached[i] = w;
    }
  }

  /** Whether queue `i` is attached. */
  isAttached(i: number): boolean {
    return this.attached[i] ?? false;
  }

  /** The TUN_F_* flags last set on the tap. */
  get offloads(): number {
    return this.currentOffloads;
  }

  /** Applies the guest's acked (or CTRL_GUEST_OFFLOADS-set) receive offloads; returns the TUN_F_* flags set. */
  setOffloads(guestFeatures: bigint): number {
    const flags = guestFeaturesToTunOffloads(guestFeatures) & this.supportedOffloads;
    tun.tunSetOffload(this.fds[0]!, flags); // a device-wide setting: one queue's fd sets it for all
    this.currentOffloads = flags;
    return flags;
  }

  /** Writes a RARP announcement of `mac` to the host side (after migration: switches learn where the guest is now). */
  writeRarp(mac: Uint8Array): void {
    if (mac.length !== 6) throw new Error("a MAC address has 6 bytes");
    const pkt = new Uint8Array(VIRTIO_NET_HDR_SIZE + 60); // a zeroed header: no checksum, no GSO
    pkt.set(rarpFrame(mac), VIRTIO_NET_HDR_SIZE);
    const n = write(this.fds[0]!, pkt, pkt.length);
    if (n === -EAGAIN) throw new Error(`tap ${this.name}: RARP for ${formatMac(mac)} not sent, the tap is busy`);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.fds.forEach(close);
  }
}

/**
 * What net's acquire phase opened, as plain data: the tap's queue fds and what was probed, plus an
 * AF_INET control socket kept for the SIOC* ioctls NET_SET_MTU needs later (after acquire the
 * device creates no socket).
 */
export interface AcquiredTap {
  name: string;
  fds: number[];
  supportedOffloads: number;
  mtu: number;
  controlFd: number;
}

/** Opens the tap and the control socket (net's acquire phase). */
export function acquireTap(o: TapOpenOptions): AcquiredTap {
  const tap = openTap(o);
  let controlFd: number;
  try {
    controlFd = tun.inetControlSocket();
  } catch (e) {
    tap.close();
    throw e;
  }
  return { name: tap.name, fds: [...tap.fds], supportedOffloads: tap.supportedOffloads, mtu: tap.mtu, controlFd };
}

/** Closes what acquireTap opened (startup failed after it). */
export function releaseTap(a: AcquiredTap): void {
  a.fds.forEach(close);
  close(a.controlFd);
}

/** The Tap over acquired fds (in the device thread). */
export function tapFrom(a: AcquiredTap): Tap {
  return new Tap(a.name, a.fds, a.supportedOffloads, a.mtu);
}

/**
 * Opens the host side for `o`: one non-blocking fd per queue pair (IFF_MULTI_QUEUE when there is
 * more than one), 12-byte vnet headers, offloads probed and switched off until the guest acks some.
 * Opens in the calling thread's network namespace. Throws messages that say what to do.
 */
export function openTap(o: TapOpenOptions): Tap {
  let name: string;
  let fds: number[];
  if (o.tap.kind === "name") {
    name = o.tap.name;
    fds = attachByName(name, o.queuePairs);
  } else if (o.tap.kind === "fd") {
    name = checkTapFd(o.tap.fd);
    setNonBlocking(o.tap.fd);
    fds = [o.tap.fd];
  } else {
    ({ name, fds } = createTap(o as TapOpenOptions & { tap: { kind: "create" } }));
  }
  try {
    if ((tun.tunGetIff(fds[0]!).flags & tun.IFF.VNET_HDR) === 0) {
      throw new Error(`tap ${name} has no vnet_hdr: recreate it with \`${mkTapHint(name, o.queuePairs > 1)}\``);
    }
    tun.tunSetVnetHdrSize(fds[0]!, VIRTIO_NET_HDR_SIZE); // device-wide; the kernel default is 10 (no num_buffers)
    const supported = o.offloads ? probeOffloads(fds[0]!) : 0;
    if (!o.offloads) tun.tunSetOffload(fds[0]!, 0);
    // A tap in another namespace (--tap-fd) has no name here: fall back to Ethernet's MTU.
    let mtu = 1500;
    tun.withControlSocket((s) => {
      if (tun.ifIndex(s, name) >= 0) mtu = tun.getIfMtu(s, name);
    });
    return new Tap(name, fds, supported, mtu);
  } catch (e) {
    fds.forEach(close);
    throw e;
  }
}

/**
 * The checks openTap would fail on, for DeviceDefinition.validate in the main thread before the
 * socket exists. Holds nothing open afterwards and never takes over an inherited --tap-fd.
 */
export function validateTap(o: TapOpenOptions): void {
  if (o.tap.kind === "name") {
    attachByName(o.tap.name, o.queuePairs).forEach(close);
  } else if (o.tap.kind === "fd") {
    checkTapFd(o.tap.fd);
  } else {
    if (!hasCapNetAdmin()) throw new Error(`--host-ip: creating a tap ${NEEDS_CAP}`);
    close(openTunOrExplain());
  }
}
