// Thin, typed bindings to glibc through bun:ffi. Nothing here knows about vhost-user or virtio:
// every function is one libc call plus errno handling. Pointers are plain JS numbers (they fit in
// 2^53 on x86_64) or TypedArrays, which bun:ffi converts to pointers at the call.
import { dlopen, read, FFIType } from "bun:ffi";

const lib = dlopen("libc.so.6", {
  __errno_location: { args: [], returns: "ptr" },
  close: { args: ["i32"], returns: "i32" },
  read: { args: ["i32", "ptr", "u64"], returns: FFIType.i64_fast },
  write: { args: ["i32", "ptr", "u64"], returns: FFIType.i64_fast },
  pread: { args: ["i32", "ptr", "u64", "i64"], returns: FFIType.i64_fast },
  pwrite: { args: ["i32", "ptr", "u64", "i64"], returns: FFIType.i64_fast },
  readv: { args: ["i32", "ptr", "i32"], returns: FFIType.i64_fast },
  writev: { args: ["i32", "ptr", "i32"], returns: FFIType.i64_fast },
  preadv: { args: ["i32", "ptr", "i32", "i64"], returns: FFIType.i64_fast },
  pwritev: { args: ["i32", "ptr", "i32", "i64"], returns: FFIType.i64_fast },
  open: { args: ["cstring", "i32", "u32"], returns: "i32" },
  fcntl: { args: ["i32", "i32", "i64"], returns: "i32" },
  ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
  ftruncate: { args: ["i32", "i64"], returns: "i32" },
  fallocate: { args: ["i32", "i32", "i64", "i64"], returns: "i32" },
  fdatasync: { args: ["i32"], returns: "i32" },
  fstat: { args: ["i32", "ptr"], returns: "i32" },
  lseek: { args: ["i32", "i64", "i32"], returns: FFIType.i64_fast },
  pipe2: { args: ["ptr", "i32"], returns: "i32" },
  unlink: { args: ["cstring"], returns: "i32" },
  isatty: { args: ["i32"], returns: "i32" },
  tcgetattr: { args: ["i32", "ptr"], returns: "i32" },
  tcsetattr: { args: ["i32", "i32", "ptr"], returns: "i32" },
  strerror: { args: ["i32"], returns: "cstring" },
  // Formats a message a library hands over as format + va_list (ALSA's error handler).
  vsnprintf: { args: ["ptr", "u64", "ptr", "ptr"], returns: "i32" },
  // User and group names through NSS (struct passwd: pw_uid at 16, pw_gid at 20; struct group: gr_gid at 16).
  getpwnam: { args: ["cstring"], returns: "ptr" },
  getgrnam: { args: ["cstring"], returns: "ptr" },
  socket: { args: ["i32", "i32", "i32"], returns: "i32" },
  socketpair: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  bind: { args: ["i32", "ptr", "u32"], returns: "i32" },
  listen: { args: ["i32", "i32"], returns: "i32" },
  accept4: { args: ["i32", "ptr", "ptr", "i32"], returns: "i32" },
  connect: { args: ["i32", "ptr", "u32"], returns: "i32" },
  sendmsg: { args: ["i32", "ptr", "i32"], returns: FFIType.i64_fast },
  recvmsg: { args: ["i32", "ptr", "i32"], returns: FFIType.i64_fast },
  shutdown: { args: ["i32", "i32"], returns: "i32" },
  getsockopt: { args: ["i32", "i32", "i32", "ptr", "ptr"], returns: "i32" },
  setsockopt: { args: ["i32", "i32", "i32", "ptr", "u32"], returns: "i32" },
  mmap: { args: ["ptr", "u64", "i32", "i32", "i32", "i64"], returns: "ptr" },
  munmap: { args: ["ptr", "u64"], returns: "i32" },
  memfd_create: { args: ["cstring", "u32"], returns: "i32" },
  eventfd: { args: ["u32", "i32"], returns: "i32" },
  timerfd_create: { args: ["i32", "i32"], returns: "i32" },
  timerfd_settime: { args: ["i32", "i32", "ptr", "ptr"], returns: "i32" },
  epoll_create1: { args: ["i32"], returns: "i32" },
  epoll_ctl: { args: ["i32", "i32", "i32", "ptr"], returns: "i32" },
  epoll_wait: { args: ["i32", "ptr", "i32", "i32"], returns: "i32" },
  // Network namespaces are per thread: setns(2) moves only the calling thread (tests enter a
  // namespace to open taps and packet sockets that live there).
  setns: { args: ["i32", "i32"], returns: "i32" },
  // glibc's variadic syscall(2), declared with explicit 64-bit arguments (plain register moves on
  // x86_64; unused arguments are passed as 0). Used for the calls in SYS below.
  syscall: { args: ["i64", "i64", "i64", "i64", "i64", "i64", "i64"], returns: FFIType.i64_fast },
});

export const libc = lib.symbols;

/** The system calls made through libc.syscall (glibc wraps none of them, or none bun can bind): their numbers (x86_64 <asm/unistd_64.h> __NR_*). */
export const SYS = {
  capget: 125,
  capset: 126,
  statfs: 137,
  pivot_root: 155,
  unlinkat: 263,
  seccomp: 317,
  io_uring_setup: 425,
  io_uring_enter: 426,
  io_uring_register: 427,
  landlock_create_ruleset: 444,
  landlock_add_rule: 445,
  landlock_restrict_self: 446,
} as const;

/** errno names for the values a backend meets; others print as their number. */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 4: "EINTR", 5: "EIO", 6: "ENXIO", 9: "EBADF", 11: "EAGAIN", 12: "ENOMEM",
  13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 20: "ENOTDIR", 21: "EISDIR",
  22: "EINVAL", 24: "EMFILE", 25: "ENOTTY", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS",
  32: "EPIPE", 38: "ENOSYS", 61: "ENODATA", 75: "EOVERFLOW", 88: "ENOTSOCK", 95: "EOPNOTSUPP",
  98: "EADDRINUSE", 99: "EADDRNOTAVAIL", 104: "ECONNRESET", 107: "ENOTCONN", 110: "ETIMEDOUT",
  111: "ECONNREFUSED",
};

export const EPERM = 1;
export const ENOENT = 2;
export const EINTR = 4;
export const EIO = 5;
export const EAGAIN = 11;
export const ENXIO = 6;
export const EBUSY = 16;
export const ENODEV = 19;
export const EEXIST = 17;
export const EINVAL = 22;
export const ENOTTY = 25;
export const EOPNOTSUPP = 95;

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

/** A failed system call: which call, and the errno it left. */
export class SysError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call}: ${errnoName(errno)} (${lib.symbols.strerror(errno)})`);
    this.name = "SysError";
  }
  get code(): string {
    return errnoName(this.errno);
  }
}

/** errno of the calling thread; read it immediately after the failing call. */
export function errno(): number {
  return read.i32(lib.symbols.__errno_location()!, 0);
}

/** Returns `ret` when the call succeeded (>= 0), throws a SysError naming `call` otherwise. */
export function check(ret: number | bigint, call: string): number {
  if (ret < 0) throw new SysError(call, errno());
  return Number(ret);
}

/**
 * Like check(), but returns -errno for the errnos the caller handles itself (EAGAIN, EINTR...),
 * so non-blocking loops need no try/catch on the hot path.
 */
export function checkAllow(ret: number | bigint, call: string, allowed: number, allowed2 = allowed): number {
  if (ret >= 0) return Number(ret);
  const e = errno();
  if (e === allowed || e === allowed2) return -e;
  throw new SysError(call, e);
}

export function close(fd: number): void {
  if (fd >= 0) lib.symbols.close(fd);
}

function cString(s: string): Buffer {
  return Buffer.from(`${s}\0`);
}

/** The uid of user `name` (NSS: files, LDAP...), or null when there is no such user. */
export function userId(name: string): number | null {
  const p = lib.symbols.getpwnam(cString(name));
  return p === null || p === 0 ? null : read.u32(p, 16);
}

/** The gid of group `name`, or null when there is no such group. */
export function groupId(name: string): number | null {
  const p = lib.symbols.getgrnam(cString(name));
  return p === null || p === 0 ? null : read.u32(p, 16);
}
