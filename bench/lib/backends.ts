// The two vhost-user-blk backends under comparison (ours and qemu-storage-daemon), their RAM-backed
// images, and host CPU accounting from /proc/PID/stat.
import type { Subprocess } from "bun";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { join } from "node:path";
import { connectBlocking } from "../../devices/block/disk/nbd_connection.ts";
import { closeHandle } from "../../ffi/nbd.ts";

/** Clock ticks per second for /proc/PID/stat's utime/stime (USER_HZ; 100 on every Linux we know). */
export const CLK_TCK = (() => {
  const r = Bun.spawnSync(["getconf", "CLK_TCK"]);
  const n = Number(r.stdout.toString().trim());
  return Number.isInteger(n) && n > 0 ? n : 100;
})();

/**
 * utime+stime of the whole process in clock ticks. /proc/PID/stat of the thread-group leader sums
 * every live thread plus the threads that already exited (qsd's thread pool comes and goes), so the
 * queue threads of ours and qsd's aio workers are included. Children (cutime) are not: neither
 * backend forks.
 */
export function cpuTicks(pid: number): number {
  const t = cpuTicksSplit(pid);
  return t.user + t.system;
}

/** utime and stime of `pid` (all threads), in clock ticks: where a difference in CPU lies. */
export function cpuTicksSplit(pid: number): { user: number; system: number } {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch (e) {
    throw new Error(`cannot read /proc/${pid}/stat (backend gone?): ${(e as Error).message}`);
  }
  // comm (field 2) is in parentheses and may contain spaces: split after the last ')'.
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  if (rest[0] === "Z" || rest[0] === "X") throw new Error(`backend pid ${pid} is a zombie (it died)`);
  return { user: Number(rest[11]), system: Number(rest[12]) };
}

export type BackendKind = "ours" | "qsd";

export interface Backend {
  /** "ours" or "qsd" — which implementation serves the disk. */
  kind: BackendKind;
  /** Slot label used in results: "ours" or "qsd" (in --peer-only mode the "ours" slot is a second qsd). */
  label: BackendKind;
  socket: string;
  image: string;
  proc: Subprocess;
  pid: number;
  argv: string[];
  /** Captured output (stderr+stdout), for failure messages. */
  output(): string;
  /** Throws if the process has exited. */
  assertAlive(): void;
  stop(): Promise<void>;
}

export interface BackendOptions {
  image: string;
  socket: string;
  numQueues: number;
  queueSize: number;
}

export interface OursOptions extends BackendOptions {
  /** argv prefix that runs the backend CLI, e.g. ["/work/main/dist/backend"] or ["bun", "app/main.ts"]. */
  command: string[];
  /** Extra args for `device block` (e.g. ["--direct"]). */
  extraArgs: string[];
  env?: Record<string, string>;
}

export interface QsdOptions extends BackendOptions {
  qsd: string;
  /** aio= of the file driver: "threads" (qsd's default), "io_uring" or "native". */
  aio: string;
  /** Run the export in a dedicated iothread (qsd serves it from the main loop by default). */
  iothread: boolean;
  /** The image's format: raw (default: the file driver alone) or qcow2 (the qcow2 driver over it). */
  format?: "raw" | "qcow2";
  /** Serve an NBD export instead of `image` (QEMU's nbd driver, the export on a unix socket). */
  nbd?: { socket: string; exportName: string };
  /** Serve a Ceph RBD image instead of `image` (QEMU's rbd driver). */
  rbd?: { pool: string; image: string; conf: string };
  /** locking=off on the file driver: several backends share one image, serving it in turn. */
  noLock?: boolean;
}

export async function startOurs(label: BackendKind, o: OursOptions): Promise<Backend> {
  const argv = [
    ...o.command,
    "device", "block",
    "--socket", o.socket,
    "--file", o.image,
    "--num-queues", String(o.numQueues),
    "--queue-size", String(o.queueSize),
    "--log-level", "warn",
    ...o.extraArgs,
  ];
  return spawnBackend("ours", label, argv, o, o.env);
}

export async function startQsd(label: BackendKind, o: QsdOptions): Promise<Backend> {
  const argv = [
    o.qsd,
    ...(o.iothread ? ["--object", "iothread,id=io0"] : []),
    // driver=file directly (no raw format layer on top): the same raw image ours serves.
    // cache.direct=off: buffered, like ours without --direct (and O_DIRECT on tmpfs is moot anyway).
    "--blockdev", o.nbd !== undefined
      ? `driver=nbd,node-name=f,server.type=unix,server.path=${o.nbd.socket},export=${o.nbd.exportName}`
      : o.rbd !== undefined
      ? `driver=rbd,node-name=f,pool=${o.rbd.pool},image=${o.rbd.image},conf=${o.rbd.conf}`
      : o.format === "qcow2"
      ? `driver=qcow2,node-name=f,file.driver=file,file.filename=${o.image},file.cache.direct=off,file.aio=${o.aio}`
      : `driver=file,node-name=f,filename=${o.image},cache.direct=off,aio=${o.aio}${o.noLock ? ",locking=off" : ""}`,
    "--export",
    `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${o.socket},writable=on,` +
      `num-queues=${o.numQueues}${o.iothread ? ",iothread=io0" : ""}`,
  ];
  return spawnBackend("qsd", label, argv, o);
}

async function spawnBackend(
  kind: BackendKind,
  label: BackendKind,
  argv: string[],
  o: BackendOptions,
  env?: Record<string, string>,
): Promise<Backend> {
  rmSync(o.socket, { force: true });
  const proc = Bun.spawn(argv, {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, ...env },
  });
  let out = "";
  const drain = async (s: ReadableStream<Uint8Array>) => {
    const d = new TextDecoder();
    for await (const b of s) out += d.decode(b, { stream: true });
  };
  void drain(proc.stdout as ReadableStream<Uint8Array>);
  void drain(proc.stderr as ReadableStream<Uint8Array>);
  const b: Backend = {
    kind,
    label,
    socket: o.socket,
    image: o.image,
    proc,
    pid: proc.pid,
    argv,
    output: () => out,
    assertAlive() {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        throw new Error(
          `${label} backend (${kind}, pid ${proc.pid}) died: exit ${proc.exitCode} signal ${proc.signalCode}\n` +
            `argv: ${argv.join(" ")}\noutput:\n${tail(out, 30)}`,
        );
      }
    },
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await proc.exited;
      clearTimeout(t);
    },
  };
  // Both must listen before QEMU starts (vhost-user-blk-pci connects at realize).
  const deadline = Date.now() + 15_000;
  while (!existsSync(o.socket)) {
    b.assertAlive();
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`${label} backend did not create ${o.socket} within 15 s\nargv: ${argv.join(" ")}\n${tail(out, 30)}`);
    }
    await Bun.sleep(20);
  }
  return b;
}

/** An NBD server for both backends: qemu-nbd exporting `image` (raw) on a unix socket. */
export interface NbdServer {
  pid: number;
  socket: string;
  exportName: string;
  /** `nbd+unix:///EXPORT?socket=PATH`, what ours takes as --file. */
  uri: string;
  argv: string[];
  assertAlive(): void;
  stop(): Promise<void>;
}

/**
 * qemu-nbd with the settings a host would serve a shared disk with: the raw image buffered
 * (writeback, thread-pool AIO, qemu-nbd's defaults), several clients at once (`-e`: ours and qsd
 * each connect; one client at a time runs I/O), persistent (`-t`).
 */
export async function startNbdServer(image: string, socket: string, exportName: string): Promise<NbdServer> {
  rmSync(socket, { force: true });
  const argv = ["qemu-nbd", "-f", "raw", "-k", socket, "-x", exportName, "-e", "8", "-t", "--cache=writeback", "--discard=unmap", image];
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
  let out = "";
  void (async () => {
    const d = new TextDecoder();
    for await (const b of proc.stderr as ReadableStream<Uint8Array>) out += d.decode(b, { stream: true });
  })();
  const assertAlive = () => {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`qemu-nbd died: exit ${proc.exitCode} signal ${proc.signalCode}\n${tail(out, 20)}`);
  };
  const uri = `nbd+unix:///${exportName}?socket=${socket}`;
  // The socket file exists from bind(), before listen(): wait until a client gets through the handshake.
  const deadline = Date.now() + 15_000;
  for (;;) {
    assertAlive();
    if (existsSync(socket)) {
      try {
        closeHandle(connectBlocking(uri));
        break;
      } catch {
        // not accepting yet
      }
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`qemu-nbd did not serve ${uri} within 15 s\n${tail(out, 20)}`);
    }
    await Bun.sleep(20);
  }
  return {
    pid: proc.pid,
    socket,
    exportName,
    uri,
    argv,
    assertAlive,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      await proc.exited;
    },
  };
}

/**
 * Fully allocated images on /dev/shm, made together: every page exists before the guest writes, so
 * writes do not pay for allocation, and every page is written once (zeros), so none is left "not
 * uptodate" (shmem clears falloc'd pages lazily, at first access: that made the first write job on
 * an image measurably dearer than later ones).
 *
 * The images are written 1 MiB at a time in turn, not one after the other: the page allocator
 * hands out the smallest free blocks first, so of images made one after the other the first gets
 * the scattered pages of a fragmented host and the next ones long runs of contiguous pages, and
 * here (a VM) reading scattered pages costs up to twice the CPU per byte: 128k reads took 53 vs
 * 108 ms per GiB from two such images (dd, page cache to user), and two identical backends in
 * bench:block-ring differed by 21-50% in CPU per I/O at read-128k-qd32, the slower one always
 * on the less contiguous image (the "sandbox cost" issue 17 once measured). Made in turn, each
 * image gets the same mix (0.758/0.760 of pages followed by their physical neighbour, vs
 * 0.385/0.973 one after the other).
 */
export function createImages(paths: readonly string[], sizeBytes: number): void {
  const CHUNK = 1 << 20;
  const zeros = new Uint8Array(CHUNK);
  const fds = paths.map((p) => {
    rmSync(p, { force: true });
    return openSync(p, "w");
  });
  try {
    for (let off = 0; off < sizeBytes; off += CHUNK) {
      for (const fd of fds) writeSync(fd, zeros, 0, Math.min(CHUNK, sizeBytes - off), off);
    }
  } finally {
    for (const fd of fds) closeSync(fd);
  }
  // On tmpfs, st_blocks tells whether the pages are really there.
  for (const p of paths) {
    const st = statSync(p);
    if (st.size !== sizeBytes || st.blocks * 512 < sizeBytes) throw new Error(`${p} is not fully allocated (size ${st.size}, ${st.blocks} blocks)`);
  }
}

/** One image (createImages). */
export function createImage(path: string, sizeBytes: number): void {
  createImages([path], sizeBytes);
}

export function tail(text: string, lines: number): string {
  return text.split("\n").slice(-lines).join("\n");
}

export function socketPath(dir: string, name: string): string {
  return join(dir, `${name}.sock`);
}

/** Busy CPU time of the whole host (all CPUs, everything but idle and iowait), in clock ticks. */
export function hostBusyTicks(): number {
  const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
  // cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  return f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
}

/** The pid of the process whose command line contains `needle` (e.g. a unique socket path), or null. */
export function findPidByCmdline(needle: string): number | null {
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, "utf8").includes(needle)) return Number(e);
    } catch {
      // gone
    }
  }
  return null;
}
