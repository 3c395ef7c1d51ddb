// The empty mount namespace (issue 17), the layer under Landlock for a backend started as root:
// the main thread, already in a new mount namespace (unshare(CLONE_NEWNS), done with the other
// namespaces), builds a small tmpfs holding only bind mounts of what the re-exec'd image needs —
// the binary, its loader, the directories of the libraries mapped now, the runtime's few /etc,
// /dev and /sys files, a fresh /proc, the files behind the kept descriptors, the socket's
// directory, and exactly the paths the device declared — then pivot_roots into it and
// detaches the host's tree. Every path keeps its host name inside (symlinks on the way are
// recreated), so what the device was told still resolves; anything else is absent (ENOENT), not
// just refused. Like crosvm's minijail pivot_root and virtiofsd --sandbox=namespace.
//
// Order matters: this runs before Landlock, whose rules are taken on the paths of the new root
// (a rule on the host's /usr/lib would not be met walking up from a file bound into the tmpfs).
import { closeSync, lstatSync, mkdirSync, mkdtempSync, openSync, rmdirSync, readFileSync, readlinkSync, statSync, symlinkSync, writeFileSync, type Stats } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import {
  MNT_DETACH, MS, ST,
  chdir, mount, pivotRoot, rmdirAt, statfsFlags, umount2,
} from "../../ffi/seccomp.ts";
import type { HostAccess } from "../host_access.ts";

/** One bind mount into the new root, at the same path. */
export interface Bind {
  path: string;
  writable: boolean;
  /** Why (the log, the tests): "runtime" or "declared". */
  source: "runtime" | "declared";
}

export interface RootPlan {
  binds: Bind[];
  /** Host symlinks recreated even when nothing is bound through them (/lib -> usr/lib: the loader's cache names libraries by it). */
  links: string[];
}

const DYNAMIC_LOADER = "/lib64/ld-linux-x86-64.so.2";

/** Shared objects this process has mapped (the binary's libraries and those bun:ffi opened): the re-exec'd image maps the same. */
export function mappedLibraries(maps = readFileSync("/proc/self/maps", "utf8")): string[] {
  const libs = new Set<string>();
  for (const line of maps.split("\n")) {
    const path = line.slice(line.indexOf("/")); // the pathname column, when there is one
    if (line.indexOf("/") < 0 || path.endsWith(" (deleted)")) continue;
    if (/\.so(\.[0-9]+)*$/.test(path)) libs.add(path);
  }
  return [...libs];
}

/**
 * The files and devices behind the descriptors kept across the execve (a disk image, a console's
 * input file or terminal, net's /dev/net/tun), at the path they were opened by, writable when the
 * descriptor is: the re-exec'd image parses the same command line, and its checks stat those
 * paths. No new access (the process holds them open); Landlock still refuses a new open.
 */
export function keptFiles(fds: readonly number[]): Bind[] {
  const binds: Bind[] = [];
  for (const fd of fds) {
    try {
      const path = readlinkSync(`/proc/self/fd/${fd}`);
      if (!path.startsWith("/")) continue; // sockets, pipes, anonymous inodes
      const st = statSync(`/proc/self/fd/${fd}`);
      if (!st.isFile() && !st.isBlockDevice() && !st.isCharacterDevice()) continue;
      const there = statSync(path, { throwIfNoEntry: false });
      if (there === undefined || there.ino !== st.ino || there.dev !== st.dev) continue; // renamed or removed since: not by that name
      const flags = Number.parseInt(/^flags:\s*([0-7]+)/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))?.[1] ?? "0", 8);
      binds.push({ path, writable: (flags & 3) !== 0, source: "runtime" });
    } catch {
      // closed meanwhile: nothing to bind
    }
  }
  return binds;
}

export interface PlanInput {
  execPath: string;
  access: HostAccess;
  /** Further read-only paths (the project directory when run from source). */
  readPaths?: readonly string[];
  /** Files removed (and renamed into place) at exit: their directories are bound read-write. */
  removable?: readonly string[];
  libraries?: readonly string[];
  /** Files behind the kept descriptors (keptFiles). */
  kept?: readonly Bind[];
}

/** What the new root holds: the same files Landlock grants, narrowed to the libraries actually used. */
export function rootPlan(input: PlanInput): RootPlan {
  const ro = (path: string, source: Bind["source"] = "runtime"): Bind => ({ path, writable: false, source });
  const binds: Bind[] = [
    ro(input.execPath),
    ro(DYNAMIC_LOADER),
    // The directories of the libraries mapped now, not just those files: a device dlopens some
    // only once it serves (snd's libasound, and its plugins' libraries), and glibc loads others
    // lazily (libgcc_s for unwinding). Landlock grants these directories too.
    ...[...new Set((input.libraries ?? mappedLibraries()).map((p) => dirname(p)))].map((d) => ro(d)),
    ro("/etc/ld.so.cache"),
    ro("/etc/localtime"),
    ro("/dev/null"),
    ro("/dev/zero"),
    ro("/dev/urandom"),
    ro("/sys/devices/system/cpu"),
    ro("/sys/devices/system/node"),
    ro("/sys/fs/cgroup"),
    ro("/sys/kernel/mm/transparent_hugepage"),
    ...(input.readPaths ?? []).map((p) => ro(p)),
    ...input.access.paths.map((p): Bind => ({ path: p.path, writable: p.rights.includes("write") || p.rights.includes("create"), source: "declared" })),
    // A server may recreate its socket (a restart): its directory, read-only (connect needs no write to the mount).
    ...input.access.unixSockets.map((s) => ro(dirname(s), "declared")),
    ...(input.removable ?? []).map((p): Bind => ({ path: dirname(p), writable: true, source: "runtime" })),
    ...(input.kept ?? []),
  ];
  // Parents before children (a child bound first would be hidden by its parent's bind); a path
  // asked for twice is bound once, writable if either asks.
  const byPath = new Map<string, Bind>();
  for (const b of binds) {
    const had = byPath.get(b.path);
    byPath.set(b.path, had === undefined ? b : { ...had, writable: had.writable || b.writable });
  }
  const depth = (p: string) => p.split("/").filter((c) => c !== "").length;
  return { binds: [...byPath.values()].sort((a, b) => depth(a.path) - depth(b.path)), links: ["/lib", "/lib64"] };
}

export interface EmptyRootResult {
  /** Paths bound (as given) and where they were skipped (absent on the host). */
  bound: string[];
  skipped: string[];
  /** How /proc came in: "proc" (a fresh mount) or "bind". */
  proc: "proc" | "bind";
}

const O_PATH = 0o10000000;
const O_DIRECTORY = 0o200000;

const lstatOrNull = (p: string): Stats | null => {
  try {
    return lstatSync(p);
  } catch {
    return null;
  }
};

/**
 * Creates `path` inside `root` the way the host has it: directories, the host's symlinks (so the
 * same name resolves the same way), and for the last component an empty file or directory to
 * mount on (`leaf` false: stop before it). Returns the path with every symlink resolved (where
 * the bind goes), or null when the host has no such path.
 */
function materialize(root: string, path: string, leaf = true): string | null {
  let rest = path.split("/").filter((c) => c !== "");
  let cur = "";
  let hops = 0;
  while (rest.length > 0) {
    const name = rest.shift()!;
    if (name === ".") continue;
    if (name === "..") {
      cur = dirname(cur === "" ? "/" : cur);
      if (cur === "/") cur = "";
      continue;
    }
    const next = `${cur}/${name}`;
    let inside = lstatOrNull(root + next);
    if (inside === null) {
      const there = lstatOrNull(next);
      if (there === null) return null;
      if (there.isSymbolicLink()) symlinkSync(readlinkSync(next), root + next);
      else if (rest.length === 0 && !leaf) return next;
      else if (there.isDirectory()) mkdirSync(root + next, 0o755);
      else writeFileSync(root + next, "", { mode: 0o444 });
      inside = lstatSync(root + next);
    }
    if (inside.isSymbolicLink()) {
      if (++hops > 40) return null;
      const target = readlinkSync(root + next);
      if (target.startsWith("/")) cur = "";
      rest = [...target.split("/").filter((c) => c !== ""), ...rest];
      continue;
    }
    cur = next;
  }
  return cur === "" ? "/" : cur;
}

/** The one directory every backend builds its root on, each in its own mount namespace. */
const BUILD_DIRECTORY = "/run/vhost-backend-root";

/**
 * Where the new root is built: a mount point in this namespace only, shadowing nothing the binds
 * read. One fixed, root-owned directory that is never removed — a directory per start cannot be
 * removed after the pivot (it is still a mount point in the detached old tree: EBUSY), and every
 * start left one behind in /tmp. A fresh temporary directory when the fixed one cannot be made or
 * trusted (no /run; not a root-owned directory that only root may write).
 */
function buildDirectory(): { path: string; temporary: boolean } {
  try {
    try {
      mkdirSync(BUILD_DIRECTORY, 0o700);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    const st = lstatSync(BUILD_DIRECTORY);
    if (st.isDirectory() && st.uid === 0 && (st.mode & 0o022) === 0) return { path: BUILD_DIRECTORY, temporary: false };
  } catch {
    // no /run, or not ours: a temporary directory
  }
  return { path: mkdtempSync(join(tmpdir(), "vhost-backend-root-")), temporary: true };
}

/**
 * Builds the new root from `plan` and pivots into it; the calling thread must already be in its
 * own mount namespace with CAP_SYS_ADMIN. Afterwards "/" is the tmpfs (read-only), the host's tree
 * is detached, and the working directory is `cwd` when it is in the new root, "/" otherwise.
 * Throws on a failure; before the pivot it first undoes the tmpfs, so the caller may go on without.
 */
export function enterEmptyRoot(plan: RootPlan, cwd = process.cwd()): EmptyRootResult {
  mount("none", "/", null, MS.REC | MS.PRIVATE);
  const { path: buildAt, temporary } = buildDirectory();
  const parentFd = openSync(dirname(buildAt), O_PATH | O_DIRECTORY);
  const bound: string[] = [];
  const skipped: string[] = [];
  let proc: EmptyRootResult["proc"] = "proc";
  try {
    mount("tmpfs", buildAt, "tmpfs", MS.NOSUID | MS.NODEV, "size=64k,nr_inodes=1024,mode=0755");
  } catch (e) {
    if (temporary) rmdirSync(buildAt);
    closeSync(parentFd);
    throw e;
  }
  try {
    for (const link of plan.links) if (lstatOrNull(link)?.isSymbolicLink()) materialize(buildAt, link, false);
    for (const b of plan.binds) {
      const at = materialize(buildAt, b.path);
      if (at === null) {
        skipped.push(`${b.path} (ENOENT)`);
        continue;
      }
      mount(at, buildAt + at, null, MS.BIND | MS.REC);
      // Keep what the source mount forbids (a remount may not lift it), add read-only unless writable.
      const kept = statfsFlags(at) & (ST.NOSUID | ST.NODEV | ST.NOEXEC);
      mount("none", buildAt + at, null, MS.REMOUNT | MS.BIND | kept | (b.writable ? 0 : MS.RDONLY));
      bound.push(b.path);
    }
    mkdirSync(`${buildAt}/proc`, 0o555);
    try {
      mount("proc", `${buildAt}/proc`, "proc", MS.NOSUID | MS.NODEV | MS.NOEXEC);
    } catch {
      // A proc mount may be refused (a container's masked /proc): the host's, recursively.
      mount("/proc", `${buildAt}/proc`, null, MS.BIND | MS.REC);
      proc = "bind";
    }
    mount("none", buildAt, null, MS.REMOUNT | MS.RDONLY | MS.NOSUID | MS.NODEV);
  } catch (e) {
    umount2(buildAt, MNT_DETACH);
    if (temporary) rmdirSync(buildAt);
    closeSync(parentFd);
    throw e;
  }
  // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached.
  chdir(buildAt);
  pivotRoot(".", ".");
  umount2(".", MNT_DETACH);
  chdir("/");
  try {
    // Only a temporary directory is removed, and usually cannot be (EBUSY: it is still a mount
    // point in the detached old tree); the fixed one is meant to stay.
    if (temporary) rmdirAt(parentFd, basename(buildAt));
  } catch {
    // an empty directory left in the host's temporary directory
  } finally {
    closeSync(parentFd);
  }
  try {
    chdir(cwd);
  } catch {
    // not in the new root: stays "/"
  }
  return { bound, skipped, proc };
}
