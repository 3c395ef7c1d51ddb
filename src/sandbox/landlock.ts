// Landlock rules for a sandboxed device: what its runtime reads to start (the binary, its
// libraries, a few /proc and /sys files), plus exactly the paths its HostAccess declares, plus the
// declared TCP ports; everything else on the filesystem and every other TCP port is denied, and
// from ABI 6 abstract unix sockets and signals are scoped to the sandbox. Best effort across ABI
// versions: rights a kernel does not know are left out, and the report says what was not enforced.
import { ACCESS_FS, ACCESS_NET, SCOPE, addNetPortRule, addPathRule, createRuleset, fsRightsOfAbi, landlockAbi, restrictSelf } from "../../ffi/landlock.ts";
import { open, fstat, O_CLOEXEC, S_IFMT } from "../../ffi/io.ts";
import { close, errnoName, SysError } from "../../ffi/libc.ts";
import type { HostAccess, PathRight } from "../host_access.ts";
import { dirname } from "node:path";

const O_PATH = 0o10000000;
const S_IFDIR = 0o040000;

/** Rights that apply to a file (not a directory) in a path-beneath rule. */
const FILE_RIGHTS = ACCESS_FS.EXECUTE | ACCESS_FS.WRITE_FILE | ACCESS_FS.READ_FILE | ACCESS_FS.TRUNCATE | ACCESS_FS.IOCTL_DEV;
const READ = ACCESS_FS.READ_FILE | ACCESS_FS.READ_DIR;

export interface PathGrant {
  path: string;
  access: bigint;
  /** Why (for the log): "runtime" or "declared". */
  source: "runtime" | "declared";
}

/** Landlock rights for a declared path's rights. */
export function rightsFor(rights: readonly PathRight[]): bigint {
  let a = 0n;
  for (const r of rights) {
    if (r === "read") a |= READ;
    else if (r === "write") a |= ACCESS_FS.WRITE_FILE | ACCESS_FS.TRUNCATE;
    else if (r === "create") a |= ACCESS_FS.MAKE_REG | ACCESS_FS.WRITE_FILE | ACCESS_FS.TRUNCATE | ACCESS_FS.READ_FILE | ACCESS_FS.READ_DIR | ACCESS_FS.REMOVE_FILE;
  }
  // Device nodes (ALSA's /dev/snd): their ioctls are judged per file from ABI 5.
  return a | (a & (ACCESS_FS.READ_FILE | ACCESS_FS.WRITE_FILE) ? ACCESS_FS.IOCTL_DEV : 0n);
}

export interface RuntimeFiles {
  /** The executable re-exec'd into the sandbox (execute + read). */
  execPath: string;
  /** This process's id (the same after execve): its /proc directory is readable, no other's. */
  pid: number;
  /** Further read-only paths (the sources and node_modules when running `bun src/...`). */
  readPaths?: readonly string[];
}

const DYNAMIC_LOADER = "/lib64/ld-linux-x86-64.so.2";

/** What every device's runtime (Bun, JSC, glibc's loader) reads to start and run. */
export function runtimeGrants(rt: RuntimeFiles): PathGrant[] {
  const r = (path: string, access = READ): PathGrant => ({ path, access, source: "runtime" });
  return [
    r(rt.execPath, ACCESS_FS.EXECUTE | ACCESS_FS.READ_FILE),
    // execve opens the ELF interpreter with exec permission too (glibc's loader, x86_64 path).
    r(DYNAMIC_LOADER, ACCESS_FS.EXECUTE | ACCESS_FS.READ_FILE),
    r("/usr/lib"),
    r("/lib"),
    r("/lib64"),
    r("/etc/ld.so.cache"),
    r("/etc/localtime"),
    r(`/proc/${rt.pid}`),
    r("/proc/sys/vm"),
    r("/sys/devices/system/cpu"),
    r("/sys/devices/system/node"),
    r("/sys/fs/cgroup"),
    r("/sys/kernel/mm/transparent_hugepage"),
    r("/dev/null", READ | ACCESS_FS.WRITE_FILE),
    r("/dev/urandom"),
    ...(rt.readPaths ?? []).map((p) => r(p)),
  ];
}

export function declaredGrants(access: HostAccess): PathGrant[] {
  return access.paths.map((p) => ({ path: p.path, access: rightsFor(p.rights), source: "declared" }));
}

/**
 * Removal and renaming of socket files in the directories of `paths` (Landlock has no per-file
 * removal right; a rename within a directory needs removal plus making the file's type there).
 */
export function removalGrants(paths: readonly string[]): PathGrant[] {
  return paths.map((p) => ({ path: dirname(p), access: ACCESS_FS.REMOVE_FILE | ACCESS_FS.MAKE_SOCK, source: "runtime" }));
}

/** Ports of declared "host:port" TCP endpoints. */
export function tcpPorts(access: HostAccess): number[] {
  return access.tcp.map((ep) => {
    const port = Number(ep.slice(ep.lastIndexOf(":") + 1));
    if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`sandbox: TCP endpoint '${ep}' has no port`);
    return port;
  });
}

export interface LandlockResult {
  abi: number;
  /** What is enforced, for the log ("filesystem", "tcp", "scopes"). */
  enforced: string[];
  /** What this kernel could not enforce, and why. */
  missing: string[];
  /** Grants skipped (path absent): the path stays denied. */
  skipped: string[];
}

/**
 * Restricts the calling thread (and what it execs) to `grants` and `ports`. Needs no_new_privs
 * set first (or CAP_SYS_ADMIN). Returns what was enforced; throws only on an unexpected failure.
 * Landlock absent or disabled → abi < 1 and nothing enforced.
 */
export function applyLandlock(grants: readonly PathGrant[], ports: readonly number[]): LandlockResult {
  const abi = landlockAbi();
  if (abi < 1) return { abi, enforced: [], missing: [`landlock unavailable (${errnoName(-abi)})`], skipped: [] };
  const missing: string[] = [];
  const handledFs = fsRightsOfAbi(abi);
  if (abi < 2) missing.push("file renames across directories (ABI 2)");
  if (abi < 3) missing.push("truncate (ABI 3)");
  if (abi < 5) missing.push("device ioctls (ABI 5)");
  const handledNet = abi >= 4 ? ACCESS_NET.BIND_TCP | ACCESS_NET.CONNECT_TCP : 0n;
  if (abi < 4) missing.push("TCP bind/connect (ABI 4)");
  const scoped = abi >= 6 ? SCOPE.ABSTRACT_UNIX_SOCKET | SCOPE.SIGNAL : 0n;
  if (abi < 6) missing.push("abstract unix socket and signal scoping (ABI 6)");
  const ruleset = createRuleset({ handledFs, handledNet, scoped }, abi);
  const skipped: string[] = [];
  try {
    for (const g of grants) {
      let fd: number;
      try {
        fd = open(g.path, O_PATH | O_CLOEXEC, 0); // follows symlinks: the rule is on the file itself
      } catch (e) {
        if (e instanceof SysError) {
          skipped.push(`${g.path} (${e.code})`);
          continue;
        }
        throw e;
      }
      try {
        const dir = (fstat(fd).mode & S_IFMT) === S_IFDIR;
        const access = g.access & handledFs & (dir ? handledFs : FILE_RIGHTS);
        if (access !== 0n) addPathRule(ruleset, fd, access);
      } finally {
        close(fd);
      }
    }
    if (handledNet !== 0n) for (const port of ports) addNetPortRule(ruleset, port, ACCESS_NET.CONNECT_TCP);
    restrictSelf(ruleset);
  } finally {
    close(ruleset);
  }
  const enforced = ["filesystem"];
  if (handledNet !== 0n) enforced.push("tcp");
  if (scoped !== 0n) enforced.push("scopes");
  return { abi, enforced, missing, skipped };
}
