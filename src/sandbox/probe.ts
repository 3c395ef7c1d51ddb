// Test-only escape attempts, run from inside a sandboxed process (the sandbox tests start the
// binary with the probe entry and read the results). Each probe tries one thing a compromised
// device must not be able to do and reports what happened; a probe the seccomp filter answers
// with a kill never reports: the test sees the process die of SIGSYS.
import { ptr } from "bun:ffi";
import { libc, errno, errnoName } from "../../ffi/libc.ts";

export const PROBES = [
  "open-shadow", "open-passwd", "create-tmp", "exec-true", "connect-unix-path", "connect-unix-abstract", "socket-inet",
  "ptrace-parent", "signal-parent", "open-tun", "io-uring-setup",
] as const;
export type ProbeName = (typeof PROBES)[number];

export interface ProbeResult {
  probe: ProbeName;
  /** True when the attempt succeeded (an escape). */
  allowed: boolean;
  detail: string;
}

const O_RDONLY = 0;
const O_RDWR = 2;
const O_WRONLY = 1;
const O_CREAT = 0o100;
const O_EXCL = 0o200;
const O_CLOEXEC = 0o2000000;
const AF_UNIX = 1;
const AF_INET = 2;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SYS_ptrace = 101;
const SYS_kill = 62;
const SYS_execve = 59;
const SYS_io_uring_setup = 425;
/** PTRACE_SEIZE attaches without stopping the tracee (an ATTACH would leave the test runner stopped). */
const PTRACE_SEIZE = 0x4206;

function outcome(probe: ProbeName, ret: number | bigint, what: string, cleanup?: (r: number) => void): ProbeResult {
  if (ret < 0) return { probe, allowed: false, detail: `${what}: ${errnoName(errno())}` };
  cleanup?.(Number(ret));
  return { probe, allowed: true, detail: `${what}: succeeded (${ret})` };
}

const cstr = (s: string) => Buffer.from(s + "\0");

function sockaddrUn(path: string, abstract: boolean): Uint8Array {
  const a = new Uint8Array(110);
  a[0] = AF_UNIX;
  const name = Buffer.from(path);
  a.set(name, abstract ? 3 : 2); // abstract: sun_path[0] is NUL
  return a;
}

/** Connects a new AF_UNIX socket to `addr`; the socket() call may be the denied one. */
function connectUnix(probe: ProbeName, addr: Uint8Array, len: number, what: string): ProbeResult {
  const fd = libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return { probe, allowed: false, detail: `socket(AF_UNIX): ${errnoName(errno())}` };
  const r = libc.connect(fd, addr, len);
  const res = outcome(probe, r, `connect(${what})`);
  libc.close(fd);
  return res;
}

/**
 * Runs one probe. `target` gives the pathname socket and abstract name to connect to (the test
 * listens on both, so a refusal is the sandbox's and not an absent peer's).
 */
export function runProbe(probe: ProbeName, target: { unixPath: string; abstractName: string; tmpDir: string }): ProbeResult {
  const ppid = process.ppid;
  switch (probe) {
    case "open-shadow":
      return outcome(probe, libc.open(cstr("/etc/shadow"), O_RDONLY | O_CLOEXEC, 0), "open(/etc/shadow)", (fd) => libc.close(fd));
    case "open-passwd":
      // Readable by anyone on the host: only the sandbox stops it (Landlock: EACCES; the empty root: ENOENT).
      return outcome(probe, libc.open(cstr("/etc/passwd"), O_RDONLY | O_CLOEXEC, 0), "open(/etc/passwd)", (fd) => libc.close(fd));
    case "create-tmp": {
      const path = `${target.tmpDir}/sandbox-probe-${process.pid}`;
      return outcome(probe, libc.open(cstr(path), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600), `open(${path}, O_CREAT)`, (fd) => {
        libc.close(fd);
        libc.unlink(cstr(path));
      });
    }
    case "exec-true": {
      // Through syscall() so that a success replaces the process and the test sees /bin/true's exit.
      const argv = new BigUint64Array([BigInt(ptr(cstr("/bin/true"))), 0n]);
      const path = cstr("/bin/true");
      const keep = [argv];
      const r = libc.syscall(SYS_execve, ptr(path), ptr(argv), 0, 0, 0, 0);
      void keep;
      return outcome(probe, r, "execve(/bin/true)");
    }
    case "connect-unix-path":
      return connectUnix(probe, sockaddrUn(target.unixPath, false), 110, target.unixPath);
    case "connect-unix-abstract":
      return connectUnix(probe, sockaddrUn(target.abstractName, true), 3 + target.abstractName.length, `@${target.abstractName}`);
    case "socket-inet":
      return outcome(probe, libc.socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket(AF_INET)", (fd) => libc.close(fd));
    case "ptrace-parent":
      // Detached when this process exits, right after reporting.
      return outcome(probe, libc.syscall(SYS_ptrace, PTRACE_SEIZE, ppid, 0, 0, 0, 0), `ptrace(PTRACE_SEIZE, ${ppid})`);
    case "signal-parent":
      // Signal 0: the permission check without a delivery.
      return outcome(probe, libc.syscall(SYS_kill, ppid, 0, 0, 0, 0, 0), `kill(${ppid}, 0)`);
    case "open-tun":
      return outcome(probe, libc.open(cstr("/dev/net/tun"), O_RDWR | O_CLOEXEC, 0), "open(/dev/net/tun)", (fd) => libc.close(fd));
    case "io-uring-setup": {
      const params = new Uint8Array(120);
      return outcome(probe, libc.syscall(SYS_io_uring_setup, 4, ptr(params), 0, 0, 0, 0), "io_uring_setup", (fd) => libc.close(fd));
    }
  }
}
