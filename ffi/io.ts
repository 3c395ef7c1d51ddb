// File and fd I/O: read/write, positional and vectored variants, fcntl, fallocate, fdatasync,
// fstat, pipes, terminals. Each wrapper is one call; EAGAIN/EINTR are returned as -errno where a
// non-blocking caller wants to handle them, everything else throws SysError.
import { ptr, type Pointer } from "bun:ffi";
import { libc, check, checkAllow, EAGAIN, EINTR } from "./libc.ts";

export type Buf = Uint8Array | number; // a TypedArray or a raw host address

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;

export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_SETPIPE_SZ = 1031;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

const p = (b: Buf) => b as unknown as Pointer;

export function open(path: string, flags: number, mode = 0o644): number {
  return check(libc.open(Buffer.from(path + "\0"), flags | O_CLOEXEC, mode), `open(${path})`);
}

/** read(2); returns bytes read, 0 at EOF, -EAGAIN when a non-blocking fd has nothing. */
export function read(fd: number, buf: Buf, len: number): number {
  for (;;) {
    const r = checkAllow(libc.read(fd, p(buf), len), "read", EAGAIN, EINTR);
    if (r !== -EINTR) return r;
  }
}

/** write(2); returns bytes written or -EAGAIN. */
export function write(fd: number, buf: Buf, len: number): number {
  for (;;) {
    const r = checkAllow(libc.write(fd, p(buf), len), "write", EAGAIN, EINTR);
    if (r !== -EINTR) return r;
  }
}

export function pread(fd: number, buf: Buf, len: number, off: number): number {
  for (;;) {
    const r = checkAllow(libc.pread(fd, p(buf), len, off), "pread", EINTR);
    if (r !== -EINTR) return r;
  }
}

export function pwrite(fd: number, buf: Buf, len: number, off: number): number {
  for (;;) {
    const r = checkAllow(libc.pwrite(fd, p(buf), len, off), "pwrite", EINTR);
    if (r !== -EINTR) return r;
  }
}

/** preadv(2) with an iovec array built by IovecArray. */
export function preadv(fd: number, iov: IovecArray, off: number): number {
  for (;;) {
    const r = checkAllow(libc.preadv(fd, iov.ptr, iov.count, off), "preadv", EINTR);
    if (r !== -EINTR) return r;
  }
}

export function pwritev(fd: number, iov: IovecArray, off: number): number {
  for (;;) {
    const r = checkAllow(libc.pwritev(fd, iov.ptr, iov.count, off), "pwritev", EINTR);
    if (r !== -EINTR) return r;
  }
}

export function readv(fd: number, iov: IovecArray): number {
  for (;;) {
    const r = checkAllow(libc.readv(fd, iov.ptr, iov.count), "readv", EAGAIN, EINTR);
    if (r !== -EINTR) return r;
  }
}

export function writev(fd: number, iov: IovecArray): number {
  for (;;) {
    const r = checkAllow(libc.writev(fd, iov.ptr, iov.count), "writev", EAGAIN, EINTR);
    if (r !== -EINTR) return r;
  }
}

/**
 * A reusable `struct iovec[]` (16 bytes each: base u64, len u64). Reused across requests so the
 * I/O path allocates nothing; `ptr` is stable for the life of the array.
 */
export class IovecArray {
  /** The struct array itself; held here so the GC never frees the memory `ptr` points to. */
  readonly bytes: Uint8Array;
  readonly ptr: number;
  private readonly view: DataView;
  count = 0;
  constructor(readonly capacity: number) {
    this.bytes = new Uint8Array(capacity * 16);
    this.view = new DataView(this.bytes.buffer);
    this.ptr = ptr(this.bytes);
  }
  clear(): void {
    this.count = 0;
  }
  /** Drops the entries from `count` on (undoes pushes). */
  truncate(count: number): void {
    this.count = Math.min(this.count, count);
  }
  /** Appends one segment; returns false when the array is full. */
  push(base: number, len: number): boolean {
    if (this.count >= this.capacity) return false;
    const o = this.count * 16;
    this.view.setUint32(o, base >>> 0, true);
    this.view.setUint32(o + 4, Math.floor(base / 0x1_0000_0000), true);
    this.view.setUint32(o + 8, len >>> 0, true);
    this.view.setUint32(o + 12, Math.floor(len / 0x1_0000_0000), true);
    this.count++;
    return true;
  }
  /** Segment `i`'s address. */
  baseAt(i: number): number {
    return this.view.getUint32(16 * i, true) + this.view.getUint32(16 * i + 4, true) * 0x1_0000_0000;
  }
  /** Segment `i`'s length. */
  lenAt(i: number): number {
    return this.view.getUint32(16 * i + 8, true) + this.view.getUint32(16 * i + 12, true) * 0x1_0000_0000;
  }
  /** Drops the first `n` bytes of the segments (after a short preadv/pwritev). Rare path. */
  advance(n: number): void {
    const v = this.view;
    const u64 = (o: number) => v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
    let i = 0;
    while (i < this.count && n >= u64(16 * i + 8)) n -= u64(16 * i++ + 8);
    this.bytes.copyWithin(0, 16 * i, 16 * this.count);
    this.count -= i;
    if (this.count > 0 && n > 0) {
      const base = u64(0) + n;
      const len = u64(8) - n;
      v.setUint32(0, base >>> 0, true);
      v.setUint32(4, Math.floor(base / 0x1_0000_0000), true);
      v.setUint32(8, len >>> 0, true);
      v.setUint32(12, Math.floor(len / 0x1_0000_0000), true);
    }
  }
}

export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check(libc.fcntl(fd, cmd, arg), "fcntl");
}

export function setNonBlocking(fd: number, on = true): void {
  const flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK);
}

export function ioctl(fd: number, request: number, arg: Buf | null): number {
  return check(libc.ioctl(fd, request, arg === null ? null : p(arg)), "ioctl");
}

const BLKGETSIZE64 = 0x80081272; // u64: size in bytes

/** A block device's size in bytes (ioctl BLKGETSIZE64). */
export function blockDeviceSize(fd: number): number {
  const u64 = new Uint8Array(8);
  ioctl(fd, BLKGETSIZE64, u64);
  return Number(new DataView(u64.buffer).getBigUint64(0, true));
}

export function ftruncate(fd: number, len: number): void {
  check(libc.ftruncate(fd, len), "ftruncate");
}

export function fallocate(fd: number, mode: number, off: number, len: number): void {
  for (;;) {
    const r = checkAllow(libc.fallocate(fd, mode, off, len), "fallocate", EINTR);
    if (r !== -EINTR) return;
  }
}

export function fdatasync(fd: number): void {
  check(libc.fdatasync(fd), "fdatasync");
}

export interface Stat {
  dev: number;
  ino: number;
  mode: number;
  size: number;
  blksize: number;
  mtimeNs: number;
}

export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFBLK = 0o060000;
export const S_IFIFO = 0o010000;
export const S_IFCHR = 0o020000;

/** fstat(2), x86_64 `struct stat` layout (144 bytes). */
export function fstat(fd: number): Stat {
  const b = new Uint8Array(144);
  check(libc.fstat(fd, b), "fstat");
  const v = new DataView(b.buffer);
  const u64 = (o: number) => v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
  return {
    dev: u64(0),
    ino: u64(8),
    mode: v.getUint32(24, true),
    size: u64(48),
    blksize: u64(56),
    mtimeNs: u64(88) * 1e9 + u64(96),
  };
}

/** lseek whence (<unistd.h> SEEK_*). */
export const SEEK_SET = 0;
export const SEEK_END = 2;
export function lseek(fd: number, off: number, whence: number): number {
  return check(libc.lseek(fd, off, whence), "lseek");
}

/** pipe2(2); returns [readEnd, writeEnd]. */
export function pipe(flags = O_CLOEXEC): [number, number] {
  const fds = new Int32Array(2);
  check(libc.pipe2(fds, flags), "pipe2");
  return [fds[0]!, fds[1]!];
}

export function unlink(path: string): boolean {
  return libc.unlink(Buffer.from(path + "\0")) === 0;
}

export function isatty(fd: number): boolean {
  return libc.isatty(fd) === 1;
}

/** struct termios is 60 bytes on x86_64 glibc; we treat it as opaque bytes except c_lflag/c_iflag. */
export function tcgetattr(fd: number): Uint8Array {
  const t = new Uint8Array(60);
  check(libc.tcgetattr(fd, t), "tcgetattr");
  return t;
}

export function tcsetattr(fd: number, termios: Uint8Array): void {
  check(libc.tcsetattr(fd, 0 /* TCSANOW */, termios), "tcsetattr");
}
