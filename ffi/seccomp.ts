// Thin bindings for confining this process: prctl (no_new_privs, capability bounding set, ambient
// set), seccomp(2), capget/capset, unshare, mount/pivot_root and execve. Each function is one
// system call plus errno handling; what to confine and in which order is src/sandbox's business.
import { dlopen, ptr } from "bun:ffi";
import { libc, check, errno, SysError, SYS } from "./libc.ts";

const lib = dlopen("libc.so.6", {
  prctl: { args: ["i32", "u64", "u64", "u64", "u64"], returns: "i32" },
  unshare: { args: ["i32"], returns: "i32" },
  execve: { args: ["cstring", "ptr", "ptr"], returns: "i32" },
  mount: { args: ["cstring", "cstring", "cstring", "u64", "ptr"], returns: "i32" },
  umount2: { args: ["cstring", "i32"], returns: "i32" },
  chdir: { args: ["cstring"], returns: "i32" },
  mkdir: { args: ["cstring", "u32"], returns: "i32" },
  gettid: { args: [], returns: "i32" },
  pthread_sigmask: { args: ["i32", "ptr", "ptr"], returns: "i32" },
});
const sys = libc.syscall;

const AT_REMOVEDIR = 0x200;

/** prctl options and arguments (<linux/prctl.h> PR_*). */
export const PR = {
  CAPBSET_READ: 23,
  CAPBSET_DROP: 24,
  SET_SECUREBITS: 28,
  SET_NO_NEW_PRIVS: 38,
  GET_NO_NEW_PRIVS: 39,
  CAP_AMBIENT: 47,
  /** PR_CAP_AMBIENT's arg2: empty the ambient set. */
  CAP_AMBIENT_CLEAR_ALL: 4,
} as const;

/** Namespace and thread flags of clone/unshare (<linux/sched.h> CLONE_*). */
export const CLONE = {
  THREAD: 0x00010000,
  NEWNS: 0x00020000,
  NEWCGROUP: 0x02000000,
  NEWUTS: 0x04000000,
  NEWIPC: 0x08000000,
  NEWUSER: 0x10000000,
  NEWPID: 0x20000000,
  NEWNET: 0x40000000,
} as const;

/** seccomp(2) operations and SECCOMP_SET_MODE_FILTER's flags (<linux/seccomp.h> SECCOMP_*). */
export const SECCOMP = {
  SET_MODE_FILTER: 1,
  GET_ACTION_AVAIL: 2,
  FILTER_FLAG_TSYNC: 1,
  FILTER_FLAG_LOG: 2,
  /** With TSYNC: report a thread that could not be synchronized as ESRCH instead of its tid. */
  FILTER_FLAG_TSYNC_ESRCH: 16,
} as const;

/** mount(2) flags (<sys/mount.h> MS_*). */
export const MS = {
  RDONLY: 1,
  NOSUID: 2,
  NODEV: 4,
  NOEXEC: 8,
  REMOUNT: 32,
  BIND: 4096,
  REC: 16384,
  PRIVATE: 1 << 18,
} as const;
export const MNT_DETACH = 2;

/** statfs(2) f_flags bits that a bind mount's remount must keep (<sys/statvfs.h> ST_*: mount flags of the same values). */
export const ST = {
  NOSUID: 2,
  NODEV: 4,
  NOEXEC: 8,
} as const;

export function prctl(option: number, a2 = 0, a3 = 0, a4 = 0, a5 = 0): number {
  return check(lib.symbols.prctl(option, a2, a3, a4, a5), `prctl(${option})`);
}

/** prctl returning -errno instead of throwing (capability numbers the kernel does not know give EINVAL). */
export function prctlRaw(option: number, a2 = 0, a3 = 0, a4 = 0, a5 = 0): number {
  const r = lib.symbols.prctl(option, a2, a3, a4, a5);
  return r < 0 ? -errno() : r;
}

export function unshare(flags: number): void {
  check(lib.symbols.unshare(flags), "unshare");
}

export function gettid(): number {
  return lib.symbols.gettid();
}

/**
 * seccomp(SECCOMP_SET_MODE_FILTER, flags, &sock_fprog) with `program` the filter's 8-byte
 * instructions. Returns 0, or with TSYNC (without TSYNC_ESRCH) the id of a thread that could not
 * be synchronized; throws on failure.
 */
export function seccompSetFilter(program: Uint8Array, flags: number): number {
  if (program.byteLength % 8 !== 0 || program.byteLength === 0) throw new Error("seccomp filter: not a whole number of instructions");
  const fprog = new DataView(new ArrayBuffer(16));
  fprog.setUint16(0, program.byteLength / 8, true);
  fprog.setBigUint64(8, BigInt(ptr(program)), true);
  const r = sys(SYS.seccomp, SECCOMP.SET_MODE_FILTER, flags, ptr(fprog), 0, 0, 0);
  return check(r, "seccomp(SECCOMP_SET_MODE_FILTER)");
}

/** True when the kernel knows the seccomp return action `action` (e.g. SECCOMP_RET_KILL_PROCESS). */
export function seccompActionAvailable(action: number): boolean {
  const a = new Uint32Array([action >>> 0]);
  return sys(SYS.seccomp, SECCOMP.GET_ACTION_AVAIL, 0, ptr(a), 0, 0, 0) === 0;
}

const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
/** The highest capability number this code knows (CAP_CHECKPOINT_RESTORE); the kernel may know fewer. */
export const CAP_LAST_KNOWN = 40;

export interface CapabilitySets {
  /** Each set as a bigint bit mask (64 bits, two 32-bit words in the ABI). */
  effective: bigint;
  permitted: bigint;
  inheritable: bigint;
}

/** capget(2) for the calling thread. */
export function capget(): CapabilitySets {
  const header = new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]);
  const data = new Uint32Array(6); // two __user_cap_data_struct {effective, permitted, inheritable}
  check(sys(SYS.capget, ptr(header), ptr(data), 0, 0, 0, 0), "capget");
  const word = (i: number) => BigInt(data[i]!) | (BigInt(data[i + 3]!) << 32n);
  return { effective: word(0), permitted: word(1), inheritable: word(2) };
}

/** capset(2) for the calling thread. */
export function capset(sets: CapabilitySets): void {
  const header = new Uint32Array([LINUX_CAPABILITY_VERSION_3, 0]);
  const data = new Uint32Array(6);
  const put = (i: number, v: bigint) => {
    data[i] = Number(v & 0xffffffffn);
    data[i + 3] = Number((v >> 32n) & 0xffffffffn);
  };
  put(0, sets.effective);
  put(1, sets.permitted);
  put(2, sets.inheritable);
  check(sys(SYS.capset, ptr(header), ptr(data), 0, 0, 0, 0), "capset");
}

/** mount(2); `data` is the filesystem's option string (tmpfs: "size=...,mode=..."). */
export function mount(source: string, target: string, fstype: string | null, flags: number, data: string | null = null): void {
  const r = lib.symbols.mount(Buffer.from(source + "\0"), Buffer.from(target + "\0"), fstype === null ? null : Buffer.from(fstype + "\0"), flags, data === null ? null : Buffer.from(data + "\0"));
  check(r, `mount(${target})`);
}

export function umount2(target: string, flags: number): void {
  check(lib.symbols.umount2(Buffer.from(target + "\0"), flags), `umount2(${target})`);
}

export function pivotRoot(newRoot: string, putOld: string): void {
  const a = Buffer.from(newRoot + "\0");
  const b = Buffer.from(putOld + "\0");
  check(sys(SYS.pivot_root, ptr(a), ptr(b), 0, 0, 0, 0), "pivot_root");
}

/** statfs(2)'s f_flags for `path` (ST_* bits: how the mount holding it is mounted). */
export function statfsFlags(path: string): number {
  const buf = new BigInt64Array(15); // struct statfs on x86_64: 120 bytes, f_flags at offset 80
  const p = Buffer.from(path + "\0");
  check(sys(SYS.statfs, ptr(p), ptr(buf), 0, 0, 0, 0), `statfs(${path})`);
  return Number(buf[10]);
}

/** unlinkat(dirFd, name, AT_REMOVEDIR): removes an empty directory named relative to `dirFd`. */
export function rmdirAt(dirFd: number, name: string): void {
  const p = Buffer.from(name + "\0");
  check(sys(SYS.unlinkat, dirFd, ptr(p), AT_REMOVEDIR, 0, 0, 0), `rmdir(${name})`);
}

export function chdir(path: string): void {
  check(lib.symbols.chdir(Buffer.from(path + "\0")), `chdir(${path})`);
}

export function mkdir(path: string, mode: number): void {
  check(lib.symbols.mkdir(Buffer.from(path + "\0"), mode), `mkdir(${path})`);
}

/** NUL-terminated strings and the NULL-terminated pointer array pointing at them (argv, envp). */
function cStringArray(items: readonly string[]): { array: BigUint64Array; keep: Buffer[] } {
  const keep = items.map((s) => Buffer.from(s + "\0"));
  const array = new BigUint64Array(items.length + 1);
  keep.forEach((b, i) => (array[i] = BigInt(ptr(b))));
  return { array, keep };
}

/** execve(2): returns only by throwing (the image is replaced on success). */
export function execve(path: string, argv: readonly string[], env: readonly string[]): never {
  const a = cStringArray(argv);
  const e = cStringArray(env);
  lib.symbols.execve(Buffer.from(path + "\0"), a.array, e.array);
  const err = errno();
  void a.keep; // the pointer arrays point into these: alive until the call returned
  void e.keep;
  throw new SysError(`execve(${path})`, err);
}

export const SIG_BLOCK = 0;
export const SIG_UNBLOCK = 1;

/** pthread_sigmask(2) for the calling thread: blocks or unblocks `signals` (numbers). The mask survives execve. */
export function signalMask(how: typeof SIG_BLOCK | typeof SIG_UNBLOCK, signals: readonly number[]): void {
  const set = new BigUint64Array(16); // glibc's sigset_t: 1024 bits
  for (const sig of signals) set[(sig - 1) >> 6]! |= 1n << BigInt((sig - 1) & 63);
  const r = lib.symbols.pthread_sigmask(how, set, null);
  if (r !== 0) throw new SysError("pthread_sigmask", r);
}
