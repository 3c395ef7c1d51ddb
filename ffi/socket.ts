// AF_UNIX stream sockets with SCM_RIGHTS fd passing (sendmsg/recvmsg). Struct layouts are the
// x86_64 glibc ones: msghdr 56 bytes, iovec 16, cmsghdr header 16, sockaddr_un 110.
import { ptr } from "bun:ffi";
import { libc, check, checkAllow, close, errno, SysError, EAGAIN, EINTR, ENOENT } from "./libc.ts";

const ECONNREFUSED = 111;

/** Address families (<sys/socket.h> AF_*). */
export const AF = {
  UNIX: 1,
  INET: 2,
  PACKET: 17,
} as const;
/** Socket types, and the flags socket()/accept4() take with them (<sys/socket.h> SOCK_*). */
export const SOCK = {
  STREAM: 1,
  DGRAM: 2,
  RAW: 3,
  NONBLOCK: 0o4000,
  CLOEXEC: 0o2000000,
} as const;
/** The socket level of get/setsockopt and of control messages, and its options (<asm/socket.h> SO_*). */
const SOL_SOCKET = 1;
const SO = {
  PEERCRED: 17,
  RCVTIMEO: 20,
  SNDTIMEO: 21,
  ACCEPTCONN: 30,
} as const;
/** sendmsg/recvmsg flags (<sys/socket.h> MSG_*). */
const MSG = {
  CTRUNC: 0x8,
  NOSIGNAL: 0x4000,
  CMSG_CLOEXEC: 0x40000000,
} as const;
const SOCKADDR_UN_LEN = 110;

/** The control message type that carries fds (at level SOL_SOCKET). */
const SCM_RIGHTS = 1;
/** Largest fd count we accept in one message: the spec's front-ends send at most 8. */
export const MAX_FDS = 8;
const cmsgSpace = (n: number) => 16 + ((4 * n + 7) & ~7);

/** Longest unix socket path bind/connect take (sun_path is 108 bytes with its terminating NUL). */
export const MAX_SOCKET_PATH = SOCKADDR_UN_LEN - 2 - 1;

function sockaddrUn(path: string): Uint8Array {
  const bytes = Buffer.from(path);
  if (bytes.length > MAX_SOCKET_PATH) throw new Error(`socket path too long (${bytes.length} bytes, at most ${MAX_SOCKET_PATH}): ${path}`);
  const sa = new Uint8Array(SOCKADDR_UN_LEN);
  sa[0] = AF.UNIX;
  sa.set(bytes, 2);
  return sa;
}

/**
 * A sockaddr_un for `name` and its length: a path, or an abstract name written `@name` (sun_path
 * starts with NUL and the name is exactly the bytes given, as systemd's NOTIFY_SOCKET says).
 */
export function unixAddress(name: string): { addr: Uint8Array; len: number } {
  if (!name.startsWith("@")) return { addr: sockaddrUn(name), len: SOCKADDR_UN_LEN };
  const bytes = Buffer.from(name.slice(1));
  if (bytes.length > SOCKADDR_UN_LEN - 3) throw new Error(`abstract socket name too long: ${name}`);
  const addr = new Uint8Array(SOCKADDR_UN_LEN);
  addr[0] = AF.UNIX;
  addr.set(bytes, 3);
  return { addr, len: 3 + bytes.length };
}

/** A new unix socket of `type`, set up by `setup` (closed again if that throws). */
function unixSocket(type: number, setup: (fd: number) => void): number {
  const fd = check(libc.socket(AF.UNIX, type | SOCK.CLOEXEC, 0), "socket");
  try {
    setup(fd);
  } catch (e) {
    close(fd);
    throw e;
  }
  return fd;
}

/**
 * Creates, binds and listens on a unix stream socket at `path` (which must not exist).
 * `beforeListen` runs between bind and listen, while no peer can connect yet (permissions).
 */
export function listenUnix(path: string, backlog = 1, beforeListen?: () => void): number {
  return unixSocket(SOCK.STREAM, (fd) => {
    check(libc.bind(fd, sockaddrUn(path), SOCKADDR_UN_LEN), `bind(${path})`);
    beforeListen?.();
    check(libc.listen(fd, backlog), "listen");
  });
}

/**
 * Sends one datagram to the unix socket `name` (a path or `@abstract`) from a new unbound
 * socket: sd_notify's way. Returns bytes sent; throws with errno.
 */
export function sendDatagramTo(name: string, data: Uint8Array): number {
  const { addr, len } = unixAddress(name);
  const fd = check(libc.socket(AF.UNIX, SOCK.DGRAM | SOCK.CLOEXEC, 0), "socket");
  try {
    const msg = new Uint8Array(56);
    const mv = new DataView(msg.buffer);
    const iov = new BigUint64Array([BigInt(ptr(data)), BigInt(data.length)]);
    mv.setBigUint64(0, BigInt(ptr(addr)), true);
    mv.setUint32(8, len, true);
    mv.setBigUint64(16, BigInt(ptr(iov)), true);
    mv.setBigUint64(24, 1n, true);
    for (;;) {
      const r = checkAllow(libc.sendmsg(fd, msg, MSG.NOSIGNAL), `sendmsg(${name})`, EINTR);
      if (r !== -EINTR) return r;
    }
  } finally {
    close(fd);
  }
}

/** The credentials of a connected unix socket's peer (SO_PEERCRED: taken when it connected). */
export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

export function peerCredentials(fd: number): PeerCredentials {
  const ucred = new Int32Array(3);
  const len = new Uint32Array([12]);
  check(libc.getsockopt(fd, SOL_SOCKET, SO.PEERCRED, ucred, len), "getsockopt(SO_PEERCRED)");
  return { pid: ucred[0]!, uid: ucred[1]! >>> 0, gid: ucred[2]! >>> 0 };
}

export function connectUnix(path: string): number {
  return unixSocket(SOCK.STREAM, (fd) => check(libc.connect(fd, sockaddrUn(path), SOCKADDR_UN_LEN), `connect(${path})`));
}

/** A datagram socket connected to `path` (the syslog socket, /dev/log), non-blocking unless told otherwise. */
export function connectUnixDatagram(path: string, nonBlocking = true): number {
  return unixSocket(SOCK.DGRAM | (nonBlocking ? SOCK.NONBLOCK : 0), (fd) =>
    check(libc.connect(fd, sockaddrUn(path), SOCKADDR_UN_LEN), `connect(${path})`));
}

/** A non-blocking datagram socket bound at `path` (which must not exist) or at an `@abstract` name. */
export function bindUnixDatagram(path: string): number {
  const { addr, len } = unixAddress(path);
  return unixSocket(SOCK.DGRAM | SOCK.NONBLOCK, (fd) => check(libc.bind(fd, addr, len), `bind(${path})`));
}

/** accept4 with CLOEXEC (and NONBLOCK when asked); returns -EAGAIN when nothing is pending. */
export function accept(listenFd: number, nonBlocking = false): number {
  for (;;) {
    const r = checkAllow(
      libc.accept4(listenFd, null, null, SOCK.CLOEXEC | (nonBlocking ? SOCK.NONBLOCK : 0)),
      "accept4",
      EAGAIN,
      EINTR,
    );
    if (r !== -EINTR) return r;
  }
}

export function socketPair(): [number, number] {
  const fds = new Int32Array(2);
  check(libc.socketpair(AF.UNIX, SOCK.STREAM | SOCK.CLOEXEC, 0, fds), "socketpair");
  return [fds[0]!, fds[1]!];
}

/** Whether `fd` is a listening socket (SO_ACCEPTCONN); throws ENOTSOCK for other fds. */
export function isListening(fd: number): boolean {
  const val = new Int32Array(1);
  const len = new Uint32Array([4]);
  check(libc.getsockopt(fd, SOL_SOCKET, SO.ACCEPTCONN, val, len), "getsockopt(SO_ACCEPTCONN)");
  return val[0] !== 0;
}

/** SO_RCVTIMEO/SO_SNDTIMEO, so blocking calls on `fd` give up after `ms` with EAGAIN. */
export function setTimeouts(fd: number, ms: number): void {
  const tv = new BigInt64Array([BigInt(Math.floor(ms / 1000)), BigInt((ms % 1000) * 1000)]);
  check(libc.setsockopt(fd, SOL_SOCKET, SO.RCVTIMEO, tv, 16), "setsockopt(SO_RCVTIMEO)");
  check(libc.setsockopt(fd, SOL_SOCKET, SO.SNDTIMEO, tv, 16), "setsockopt(SO_SNDTIMEO)");
}

export function shutdown(fd: number): void {
  libc.shutdown(fd, 2 /* SHUT_RDWR */);
}

/**
 * Reusable msghdr + iovec + control buffers for one socket direction. Keeping them allocated
 * avoids building structs per message and keeps every pointed-to object alive.
 */
export class MsgIo {
  private readonly msg = new Uint8Array(56);
  private readonly msgView = new DataView(this.msg.buffer);
  private readonly iov = new Uint8Array(16);
  private readonly iovView = new DataView(this.iov.buffer);
  private readonly control = new Uint8Array(cmsgSpace(MAX_FDS * 4));
  private readonly controlView = new DataView(this.control.buffer);

  constructor() {
    this.msgView.setBigUint64(16, BigInt(ptr(this.iov)), true);
    this.msgView.setBigUint64(24, 1n, true);
  }

  private setIov(base: number, len: number): void {
    this.iovView.setBigUint64(0, BigInt(base), true);
    this.iovView.setBigUint64(8, BigInt(len), true);
  }

  /**
   * recvmsg into `buf[off..off+len)`. Returns bytes read (0 = peer closed, -EAGAIN = nothing yet),
   * the fds that came with them (CLOEXEC), and whether the kernel truncated the fd list.
   */
  recv(fd: number, buf: Uint8Array, off: number, len: number): { n: number; fds: number[]; truncated: boolean } {
    this.setIov(ptr(buf) + off, len);
    this.msgView.setBigUint64(32, BigInt(ptr(this.control)), true);
    this.msgView.setBigUint64(40, BigInt(this.control.length), true);
    this.msgView.setInt32(48, 0, true);
    let n: number;
    for (;;) {
      n = checkAllow(libc.recvmsg(fd, this.msg, MSG.CMSG_CLOEXEC), "recvmsg", EAGAIN, EINTR);
      if (n !== -EINTR) break;
    }
    const fds: number[] = [];
    if (n < 0) return { n, fds, truncated: false };
    const controlLen = Number(this.msgView.getBigUint64(40, true));
    const flags = this.msgView.getInt32(48, true) & ~MSG.CMSG_CLOEXEC;
    let o = 0;
    while (o + 16 <= controlLen) {
      const cmsgLen = Number(this.controlView.getBigUint64(o, true));
      if (cmsgLen < 16 || o + cmsgLen > controlLen) break;
      const level = this.controlView.getInt32(o + 8, true);
      const type = this.controlView.getInt32(o + 12, true);
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        for (let i = 16; i + 4 <= cmsgLen; i += 4) fds.push(this.controlView.getInt32(o + i, true));
      }
      o += (cmsgLen + 7) & ~7;
    }
    return { n, fds, truncated: (flags & MSG.CTRUNC) !== 0 };
  }

  /** sendmsg of `buf[0..len)` with `fds` attached; returns bytes sent or -EAGAIN. */
  send(fd: number, buf: Uint8Array, len: number, fds: readonly number[] = []): number {
    this.setIov(ptr(buf), len);
    if (fds.length > 0) {
      if (fds.length > MAX_FDS) throw new Error(`too many fds to send: ${fds.length}`);
      const cmsgLen = 16 + 4 * fds.length;
      this.controlView.setBigUint64(0, BigInt(cmsgLen), true);
      this.controlView.setInt32(8, SOL_SOCKET, true);
      this.controlView.setInt32(12, SCM_RIGHTS, true);
      fds.forEach((f, i) => this.controlView.setInt32(16 + 4 * i, f, true));
      this.msgView.setBigUint64(32, BigInt(ptr(this.control)), true);
      this.msgView.setBigUint64(40, BigInt(cmsgSpace(fds.length)), true);
    } else {
      this.msgView.setBigUint64(32, 0n, true);
      this.msgView.setBigUint64(40, 0n, true);
    }
    for (;;) {
      const r = checkAllow(libc.sendmsg(fd, this.msg, MSG.NOSIGNAL), "sendmsg", EAGAIN, EINTR);
      if (r !== -EINTR) return r;
    }
  }
}

/**
 * Whether something listens on the unix socket at `path`: a non-blocking connect that succeeds,
 * or finds the backlog full (EAGAIN), means a live listener; a refusal means a stale socket file.
 * The probe connection is closed at once (the listener sees a peer that hangs up).
 */
export function unixListenerAlive(path: string): boolean {
  const fd = check(libc.socket(AF.UNIX, SOCK.STREAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0), "socket");
  try {
    if (libc.connect(fd, sockaddrUn(path), SOCKADDR_UN_LEN) >= 0) return true;
    const e = errno();
    if (e === EAGAIN) return true;
    if (e === ECONNREFUSED || e === ENOENT) return false;
    throw new SysError(`connect(${path})`, e);
  } finally {
    close(fd);
  }
}
