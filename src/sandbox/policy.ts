// The seccomp policy of a sandboxed device: a common set every device's serving path uses (Bun's
// runtime and JSC included), plus the groups a device declares in its HostAccess. Derived from
// `strace -f -c` of the unit tests (test/unit/{block,block_uring,console,net,net_tap,snd,snd_alsa,
// core}.test.ts) and of a compiled binary serving, with crosvm's jail/seccomp/x86_64/*.policy as a
// reference. Calls that have no business in a device after setup kill the process; calls that are
// merely not needed fail with an errno (a code path we did not foresee degrades, it does not die).
import type { HostAccess } from "../host_access.ts";
import { ALLOW, KILL, errnoAction, type Action, type ArgCase, type FilterSpec, type SyscallRule } from "./seccomp_filter.ts";
import type { SyscallName } from "./syscalls.ts";

const EPERM = 1;
const EACCES = 13;
const ENOSYS = 38;

// Constants the argument checks need.
const CLONE_THREAD = 0x00010000;
const PROT_EXEC = 4;
const MAP_ANONYMOUS = 0x20;
const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const PR_SET_NAME = 15;
const PR_GET_NAME = 16;
const PR_GET_DUMPABLE = 3;
const PR_CAPBSET_READ = 23;
const PR_GET_SECUREBITS = 27;
const PR_GET_NO_NEW_PRIVS = 39;
const PR_SET_VMA = 0x53564d41;
const PR_GET_TIMERSLACK = 30;

// ioctl requests. Terminal ones for the console's host side and Bun's own stdio checks.
const TCGETS = 0x5401;
const TCSETS = 0x5402;
const TCSETSW = 0x5403;
const TCSETSF = 0x5404;
const TIOCGWINSZ = 0x5413;
const TIOCGPGRP = 0x540f;
const FIONREAD = 0x541b;
const FIONBIO = 0x5421;
const FIONCLEX = 0x5450;
const FIOCLEX = 0x5451;
// The net device's taps after acquire: offloads follow the guest's features, queues are enabled
// and disabled with the guest's.
const TUNSETOFFLOAD = 0x400454d0;
const TUNSETVNETHDRSZ = 0x400454d8;
const TUNGETVNETHDRSZ = 0x800454d7;
const TUNSETQUEUE = 0x400454d9;
const TUNGETIFF = 0x800454d2;
const TUNGETFEATURES = 0x800454cf;
const TUNSETVNETLE = 0x400454dc;
// On the net device's kept AF_INET control socket: NET_SET_MTU reaches the tap.
const SIOCGIFFLAGS = 0x8913;
const SIOCGIFMTU = 0x8921;
const SIOCSIFMTU = 0x8922;
const SIOCGIFINDEX = 0x8933;
/** CAP_NET_ADMIN: SIOCSIFMTU on a tap needs it. */
export const CAP_NET_ADMIN = 12;
// Block devices.
const BLKDISCARD = 0x1277;
const BLKZEROOUT = 0x127f;
const BLKGETSIZE64 = 0x80081272;
const BLKSSZGET = 0x1268;
const BLKPBSZGET = 0x127b;

/** Calls every device's serving path makes (with Bun and JSC under it). */
const COMMON: readonly SyscallName[] = [
  // The hot paths first (order does not matter to the kernel's cache, but it reads better).
  "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
  "recvmsg", "sendmsg", "recvfrom", "sendto", "epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "futex",
  "poll", "ppoll", "pselect6",
  // Descriptors.
  "close", "close_range", "dup", "dup3", "fcntl", "fstat", "newfstatat", "statx", "lseek", "pipe2", "eventfd2",
  "epoll_create1", "timerfd_create", "timerfd_settime", "timerfd_gettime", "memfd_create", "ftruncate",
  "getdents64", "readlink", "readlinkat", "getcwd", "access", "faccessat", "faccessat2",
  // Sockets already open (the vhost-user listener accepts again after a reconnect).
  "accept4", "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "recvmmsg", "sendmmsg",
  // Memory (mmap and mprotect have their own rules below).
  "mprotect", "pkey_mprotect", "munmap", "mremap", "madvise", "brk", "membarrier", "mincore", "msync", "mlock", "munlock",
  // Threads, signals, time.
  "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "gettid", "getpid", "getppid", "sched_yield",
  "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler", "getpriority",
  "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigpending",
  "sigaltstack", "restart_syscall", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres",
  "gettimeofday", "exit", "exit_group", "arch_prctl",
  // Identity and limits, read-only.
  "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "uname", "sysinfo",
  "getrlimit", "prlimit64", "getrusage", "times", "getrandom",
];

/** Calls no device may make after setup: the process is killed. */
const FORBIDDEN: readonly SyscallName[] = [
  "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
  "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
  "mount_setattr", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load",
  "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "iopl", "ioperm", "acct",
  "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "quotactl", "quotactl_fd",
  "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "vhangup", "personality",
  "fork", "vfork", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
  "setfsuid", "setfsgid", "capset", "lookup_dcookie", "uselib", "nfsservctl", "kcmp", "pidfd_open",
  "pidfd_send_signal", "migrate_pages", "move_pages", "mbind", "set_mempolicy", "io_uring_setup",
];

/** Extra calls and ioctls per declared syscall group (HostAccess.syscallGroups). */
interface Group {
  calls: readonly SyscallName[];
  ioctls?: readonly number[];
  /** Every ioctl request (devices whose ioctls Landlock judges per device file: ALSA). */
  anyIoctl?: boolean;
  /** Capabilities the process keeps (all others are dropped). */
  capabilities?: readonly number[];
}

export const SYSCALL_GROUPS: Readonly<Record<string, Group>> = {
  "block-io": {
    calls: ["fsync", "fdatasync", "fallocate", "sync_file_range", "copy_file_range", "fadvise64", "flock"],
    ioctls: [BLKDISCARD, BLKZEROOUT, BLKGETSIZE64, BLKSSZGET, BLKPBSZGET],
  },
  // Rings are set up in acquire, each restricted to the opcodes its device submits
  // (IORING_REGISTER_RESTRICTIONS, which seccomp cannot replace: it does not see SQEs); serving
  // only submits and (un)registers eventfds. io_uring_setup stays forbidden: a new ring would
  // carry no restriction.
  io_uring: { calls: ["io_uring_enter", "io_uring_register"] },
  // The tap's MTU follows the guest's NET_SET_MTU: that keeps CAP_NET_ADMIN (in the host's network
  // namespace, since net keeps it): the one capability a sandboxed device holds.
  tap: {
    calls: [],
    ioctls: [TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNGETVNETHDRSZ, TUNSETQUEUE, TUNGETIFF, TUNGETFEATURES, TUNSETVNETLE, SIOCGIFFLAGS, SIOCGIFMTU, SIOCSIFMTU, SIOCGIFINDEX],
    capabilities: [CAP_NET_ADMIN],
  },
  alsa: {
    calls: [
      "flock", "statfs", "fstatfs", "umask", "fchmod", "shmget", "shmat", "shmdt", "shmctl", "semget", "semop",
      "semtimedop", "semctl", "sched_setscheduler", "setpriority", "mkdir", "mkdirat", "unlink", "unlinkat",
    ],
    anyIoctl: true,
  },
  // librados (an RBD disk connects from the serving thread): its messenger's epoll is made with
  // the old epoll_create (a refusal is thrown as std::system_error and aborts the process);
  // libselinux, which it links, statfs()es /sys/fs/selinux when loaded.
  ceph: { calls: ["epoll_create", "statfs", "fstatfs"] },
  // Files created or rewritten after acquire (a WAV directory).
  "fs-write": { calls: ["fsync", "fdatasync", "fallocate", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "fchmod"] },
};

export interface PolicyContext {
  /** This process's id (after the re-exec: it does not change again). kill/tgkill are allowed on it only. */
  pid: number;
  /**
   * Whether open/openat may proceed: only when the device declared paths (Landlock, or the empty
   * mount namespace, then decides which). Otherwise they fail with EACCES.
   */
  openAllowed: boolean;
  /** unlink and rename allowed (Landlock limits them to the socket's directory: app/sandbox.ts). */
  unlinkAllowed?: boolean;
}

const arg = (i: number, oneOf: readonly number[], mask?: number) => ({ arg: i, oneOf, ...(mask === undefined ? {} : { mask }) });
const when = (all: ArgCase["all"], action: Action): ArgCase => ({ all, action });

/** The seccomp filter for a device that declared `access`. Throws on an unknown syscall group. */
export function buildPolicy(access: HostAccess, ctx: PolicyContext): FilterSpec {
  const rules = new Map<SyscallName, SyscallRule>();
  const set = (name: SyscallName, rule: SyscallRule) => {
    if (rules.has(name)) throw new Error(`seccomp policy: ${name} has two rules`);
    rules.set(name, rule);
  };
  const groups = access.syscallGroups.map((g) => {
    const group = SYSCALL_GROUPS[g];
    if (group === undefined) throw new Error(`sandbox: unknown syscall group '${g}' (known: ${Object.keys(SYSCALL_GROUPS).join(", ")})`);
    return group;
  });
  const writes = access.paths.some((p) => p.rights.includes("write") || p.rights.includes("create"));
  if (writes && !access.syscallGroups.includes("fs-write")) groups.push(SYSCALL_GROUPS["fs-write"]!);

  const allowed = new Set<SyscallName>(COMMON);
  if (ctx.unlinkAllowed) for (const c of ["unlink", "unlinkat", "rename", "renameat", "renameat2"] as const) allowed.add(c);
  for (const g of groups) for (const c of g.calls) allowed.add(c);
  for (const name of allowed) set(name, { action: ALLOW });

  // Threads yes, processes no. glibc tries clone3 first and falls back to clone on ENOSYS;
  // clone3's flags sit behind a pointer seccomp cannot read, clone's are its first argument.
  set("clone", { cases: [when([arg(0, [CLONE_THREAD], CLONE_THREAD)], ALLOW)], otherwise: KILL });
  set("clone3", { action: errnoAction(ENOSYS) });

  // JSC reserves its JIT pool (read-write-execute, 1 GiB, MAP_NORESERVE) once at startup, before
  // the filter; afterwards file mappings (dlopen of a library Landlock let us read) may be
  // executable, new anonymous executable mappings may not. mprotect to PROT_EXEC stays allowed:
  // bun:ffi's TinyCC (ffi/sigbus.ts, compiled in the device thread) makes its code pages
  // read-write-execute that way. With an RWX JIT pool in the process this is no W^X barrier
  // (see the README): it only keeps new executable regions from appearing by mmap.
  const noExec = arg(2, [0], PROT_EXEC);
  set("mmap", { cases: [when([noExec], ALLOW), when([arg(3, [0], MAP_ANONYMOUS)], ALLOW)], otherwise: errnoAction(EACCES) });

  // Signals to this process's own threads only (JSC stops threads for its collector with tgkill).
  set("kill", { cases: [when([arg(0, [ctx.pid])], ALLOW)], otherwise: errnoAction(EPERM) });
  set("tgkill", { cases: [when([arg(0, [ctx.pid])], ALLOW)], otherwise: errnoAction(EPERM) });
  set("tkill", { action: errnoAction(EPERM) });

  set("prctl", {
    cases: [when([arg(0, [PR_SET_NAME, PR_GET_NAME, PR_SET_VMA, PR_GET_NO_NEW_PRIVS, PR_CAPBSET_READ, PR_GET_SECUREBITS, PR_GET_DUMPABLE, PR_GET_TIMERSLACK])], ALLOW)],
    otherwise: errnoAction(EPERM),
  });

  const ioctls = [TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, TIOCGPGRP, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX];
  for (const g of groups) ioctls.push(...(g.ioctls ?? []));
  if (groups.some((g) => g.anyIoctl)) set("ioctl", { action: ALLOW });
  else set("ioctl", { cases: [when([arg(1, ioctls)], ALLOW)], otherwise: errnoAction(EPERM) });

  const open: Action = ctx.openAllowed ? ALLOW : errnoAction(EACCES);
  set("open", { action: open });
  set("openat", { action: open });
  set("openat2", { action: errnoAction(ENOSYS) }); // glibc falls back to openat
  set("creat", { action: errnoAction(EACCES) });

  // New sockets only of the declared kinds; connect only when something was declared to connect to.
  const domains: number[] = [];
  if (access.unixSockets.length > 0) domains.push(AF_UNIX);
  if (access.tcp.length > 0) domains.push(AF_INET, AF_INET6);
  set("socket", domains.length > 0 ? { cases: [when([arg(0, domains)], ALLOW)], otherwise: KILL } : { action: KILL });
  set("socketpair", { cases: [when([arg(0, [AF_UNIX])], ALLOW)], otherwise: KILL });
  set("connect", { action: domains.length > 0 ? ALLOW : KILL });
  set("bind", { action: errnoAction(EPERM) });
  set("listen", { action: ALLOW }); // on the listener acquire made (listen again is harmless)

  for (const name of FORBIDDEN) if (!rules.has(name)) set(name, { action: KILL });
  return { rules, defaultAction: errnoAction(ENOSYS) };
}

/** The capabilities a device keeps: those of its declared groups (none for most). */
export function keptCapabilities(access: HostAccess): number[] {
  const caps = new Set<number>();
  for (const g of access.syscallGroups) for (const c of SYSCALL_GROUPS[g]?.capabilities ?? []) caps.add(c);
  return [...caps].sort((a, b) => a - b);
}

/** Names of the calls `spec` allows unconditionally (for the README table and tests). */
export function allowedCalls(spec: FilterSpec): SyscallName[] {
  return [...spec.rules].filter(([, r]) => "action" in r && r.action.kind === "allow").map(([n]) => n);
}
