// /dev/net/tun and the SIOC* interface ioctls: what a virtio-net backend needs to attach to a tap
// (TUNSETIFF, offloads, vnet header size) and what crosvm's `--device` form needs to create and
// configure one (address, netmask, MAC, MTU, up). Each wrapper is one ioctl; struct ifreq is 40
// bytes on x86_64 (name[16] + a 24-byte union). Failures throw SysError naming the ioctl.
import { libc, check, checkAllow, close, EINVAL, ENODEV } from "./libc.ts";
import { open, O_RDWR, O_NONBLOCK } from "./io.ts";
import { AF, SOCK } from "./socket.ts";

/** struct ifreq's ifr_flags (IFF_*). */
export const IFF = {
  // For TUNSETIFF/TUNGETIFF/TUNSETQUEUE (<linux/if_tun.h>).
  TUN: 0x0001,
  TAP: 0x0002,
  MULTI_QUEUE: 0x0100,
  ATTACH_QUEUE: 0x0200,
  DETACH_QUEUE: 0x0400,
  PERSIST: 0x0800,
  NO_PI: 0x1000,
  VNET_HDR: 0x4000,
  // Interface flags, for SIOCGIFFLAGS/SIOCSIFFLAGS (<net/if.h>).
  UP: 0x1,
  RUNNING: 0x40,
} as const;

/** TUNSETOFFLOAD flags: what the kernel may hand us on read (partial checksums, GSO frames) (<linux/if_tun.h> TUN_F_*). */
export const TUN_F = {
  CSUM: 0x01,
  TSO4: 0x02,
  TSO6: 0x04,
  TSO_ECN: 0x08,
  UFO: 0x10,
  USO4: 0x20,
  USO6: 0x40,
} as const;

/** The tun driver's ioctls (<linux/if_tun.h> TUN*): _IOW('T', n, int) = 0x40045400 | n, _IOR = 0x80045400 | n. */
const TUN = {
  SETIFF: 0x400454ca,
  SETPERSIST: 0x400454cb,
  GETFEATURES: 0x800454cf,
  SETOFFLOAD: 0x400454d0,
  GETIFF: 0x800454d2,
  GETVNETHDRSZ: 0x800454d7,
  SETVNETHDRSZ: 0x400454d8,
  SETQUEUE: 0x400454d9,
  SETVNETLE: 0x400454dc,
} as const;

/** Interface ioctls, made on a socket (<linux/sockios.h> SIOC*). */
const SIOC = {
  GIFFLAGS: 0x8913,
  SIFFLAGS: 0x8914,
  SIFADDR: 0x8916,
  SIFNETMASK: 0x891c,
  GIFMTU: 0x8921,
  SIFMTU: 0x8922,
  SIFHWADDR: 0x8924,
  GIFHWADDR: 0x8927,
  GIFINDEX: 0x8933,
} as const;

export const IFNAMSIZ = 16;
/** struct ifreq: the name, then a 24-byte union (x86_64). */
const IFREQ_SIZE = IFNAMSIZ + 24;
const ARPHRD_ETHER = 1;

export const TUN_DEVICE = "/dev/net/tun";

/** A struct ifreq: the interface name, then the request's argument (a union) from IFNAMSIZ on. */
type Ifreq = { buf: Uint8Array; view: DataView };

/** A zeroed struct ifreq carrying `name` (at most IFNAMSIZ-1 bytes; "tap%d" lets the kernel pick). */
function ifreq(name: string): Ifreq {
  const bytes = Buffer.from(name);
  if (bytes.length >= IFNAMSIZ) throw new Error(`interface name '${name}' is longer than ${IFNAMSIZ - 1} bytes`);
  const buf = new Uint8Array(IFREQ_SIZE);
  buf.set(bytes, 0);
  return { buf, view: new DataView(buf.buffer) };
}

function ifreqName(buf: Uint8Array): string {
  const end = buf.indexOf(0);
  return Buffer.from(buf.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end)).toString();
}

function ioctl(fd: number, request: number, arg: Uint8Array | number, what: string): number {
  return check(libc.ioctl(fd, request, arg as never), what);
}

/**
 * An interface ioctl (SIOC*IF*): `request` on an ifreq for `name` whose argument `fill` sets
 * first; returns the ifreq, which holds the kernel's answer for the getters.
 */
function ifIoctl(sock: number, name: string, request: number, what: string, fill?: (r: Ifreq) => void): Ifreq {
  const r = ifreq(name);
  fill?.(r);
  ioctl(sock, request, r.buf, what);
  return r;
}

/** A new, unattached /dev/net/tun fd (non-blocking unless told otherwise, close-on-exec). */
export function openTunDevice(nonBlocking = true): number {
  return open(TUN_DEVICE, O_RDWR | (nonBlocking ? O_NONBLOCK : 0));
}

/** TUNSETIFF: attaches `fd` to the tap `name` (created if missing, which needs CAP_NET_ADMIN); returns the name the kernel used. */
export function tunSetIff(fd: number, name: string, flags: number): string {
  const r = ifreq(name);
  r.view.setUint16(IFNAMSIZ, flags, true);
  ioctl(fd, TUN.SETIFF, r.buf, `ioctl(TUNSETIFF ${name})`);
  return ifreqName(r.buf);
}

/** TUNSETQUEUE: attaches or detaches one queue of a multi_queue tap. */
export function tunSetQueue(fd: number, attach: boolean): void {
  const r = ifreq("");
  r.view.setUint16(IFNAMSIZ, attach ? IFF.ATTACH_QUEUE : IFF.DETACH_QUEUE, true);
  ioctl(fd, TUN.SETQUEUE, r.buf, `ioctl(TUNSETQUEUE ${attach ? "attach" : "detach"})`);
}

/** TUNGETIFF: the attached interface's name and IFF_* flags (EBADFD if `fd` is not attached). */
export function tunGetIff(fd: number): { name: string; flags: number } {
  const r = ifreq("");
  ioctl(fd, TUN.GETIFF, r.buf, "ioctl(TUNGETIFF)");
  return { name: ifreqName(r.buf), flags: r.view.getUint16(IFNAMSIZ, true) };
}

/** TUNGETFEATURES: the IFF_* flags this kernel's tun driver supports. */
export function tunGetFeatures(fd: number): number {
  const v = new Uint32Array(1);
  ioctl(fd, TUN.GETFEATURES, new Uint8Array(v.buffer), "ioctl(TUNGETFEATURES)");
  return v[0]!;
}

/** TUNSETOFFLOAD (the flags travel by value, not by pointer). */
export function tunSetOffload(fd: number, tunFlags: number): void {
  ioctl(fd, TUN.SETOFFLOAD, tunFlags, `ioctl(TUNSETOFFLOAD 0x${tunFlags.toString(16)})`);
}

/** TUNSETOFFLOAD as a probe: false when the kernel refuses the combination (EINVAL). */
export function tunTrySetOffload(fd: number, tunFlags: number): boolean {
  return checkAllow(libc.ioctl(fd, TUN.SETOFFLOAD, tunFlags as never), `ioctl(TUNSETOFFLOAD 0x${tunFlags.toString(16)})`, EINVAL) >= 0;
}

export function tunSetVnetHdrSize(fd: number, size: number): void {
  ioctl(fd, TUN.SETVNETHDRSZ, new Uint8Array(new Int32Array([size]).buffer), `ioctl(TUNSETVNETHDRSZ ${size})`);
}

export function tunGetVnetHdrSize(fd: number): number {
  const v = new Int32Array(1);
  ioctl(fd, TUN.GETVNETHDRSZ, new Uint8Array(v.buffer), "ioctl(TUNGETVNETHDRSZ)");
  return v[0]!;
}

/** TUNSETVNETLE: little-endian vnet headers; only a big-endian host needs it (virtio 1.x is LE). */
export function tunSetVnetLe(fd: number, on: boolean): void {
  ioctl(fd, TUN.SETVNETLE, new Uint8Array(new Int32Array([on ? 1 : 0]).buffer), "ioctl(TUNSETVNETLE)");
}

/** TUNSETPERSIST: whether the tap outlives its last fd. */
export function tunSetPersist(fd: number, on: boolean): void {
  ioctl(fd, TUN.SETPERSIST, on ? 1 : 0, "ioctl(TUNSETPERSIST)");
}

// ---- interface configuration (on any AF_INET socket of the interface's network namespace) ----

/** The AF_INET datagram socket the SIOC* ioctls go through; it belongs to the calling thread's network namespace. */
export function inetControlSocket(): number {
  return check(libc.socket(AF.INET, SOCK.DGRAM | SOCK.CLOEXEC, 0), "socket(AF_INET)");
}

/** With a throwaway control socket: runs `fn(sock)`, then closes it. */
export function withControlSocket<T>(fn: (sock: number) => T): T {
  const sock = inetControlSocket();
  try {
    return fn(sock);
  } finally {
    close(sock);
  }
}

/** SIOCGIFINDEX; -1 when no interface has that name (ENODEV). */
export function ifIndex(sock: number, name: string): number {
  const r = ifreq(name);
  const ret = checkAllow(libc.ioctl(sock, SIOC.GIFINDEX, r.buf as never), `ioctl(SIOCGIFINDEX ${name})`, ENODEV);
  return ret < 0 ? -1 : r.view.getInt32(IFNAMSIZ, true);
}

function sockaddrIn(r: Ifreq, ip: Uint8Array): void {
  if (ip.length !== 4) throw new Error("an IPv4 address has 4 bytes");
  r.view.setUint16(IFNAMSIZ, AF.INET, true);
  r.buf.set(ip, IFNAMSIZ + 4);
}

export function setIfAddr(sock: number, name: string, ip: Uint8Array): void {
  ifIoctl(sock, name, SIOC.SIFADDR, `ioctl(SIOCSIFADDR ${name})`, (r) => sockaddrIn(r, ip));
}

export function setIfNetmask(sock: number, name: string, mask: Uint8Array): void {
  ifIoctl(sock, name, SIOC.SIFNETMASK, `ioctl(SIOCSIFNETMASK ${name})`, (r) => sockaddrIn(r, mask));
}

export function setIfHwAddr(sock: number, name: string, mac: Uint8Array): void {
  if (mac.length !== 6) throw new Error("a MAC address has 6 bytes");
  ifIoctl(sock, name, SIOC.SIFHWADDR, `ioctl(SIOCSIFHWADDR ${name})`, (r) => {
    r.view.setUint16(IFNAMSIZ, ARPHRD_ETHER, true);
    r.buf.set(mac, IFNAMSIZ + 2);
  });
}

export function getIfHwAddr(sock: number, name: string): Uint8Array {
  return ifIoctl(sock, name, SIOC.GIFHWADDR, `ioctl(SIOCGIFHWADDR ${name})`).buf.slice(IFNAMSIZ + 2, IFNAMSIZ + 8);
}

export function getIfFlags(sock: number, name: string): number {
  return ifIoctl(sock, name, SIOC.GIFFLAGS, `ioctl(SIOCGIFFLAGS ${name})`).view.getUint16(IFNAMSIZ, true);
}

export function setIfFlags(sock: number, name: string, flags: number): void {
  ifIoctl(sock, name, SIOC.SIFFLAGS, `ioctl(SIOCSIFFLAGS ${name})`, (r) => r.view.setUint16(IFNAMSIZ, flags, true));
}

/** Brings the interface up (read-modify-write of its flags). */
export function setIfUp(sock: number, name: string): void {
  setIfFlags(sock, name, getIfFlags(sock, name) | IFF.UP);
}

export function getIfMtu(sock: number, name: string): number {
  return ifIoctl(sock, name, SIOC.GIFMTU, `ioctl(SIOCGIFMTU ${name})`).view.getInt32(IFNAMSIZ, true);
}

export function setIfMtu(sock: number, name: string, mtu: number): void {
  ifIoctl(sock, name, SIOC.SIFMTU, `ioctl(SIOCSIFMTU ${name} ${mtu})`, (r) => r.view.setInt32(IFNAMSIZ, mtu, true));
}
