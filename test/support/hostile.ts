// Driver-side helpers for hostile front-end / guest tests (test/unit/hostile.test.ts and the hostile
// part of fuzz.test.ts). Unlike frontend.ts, everything here is built so that a backend that hangs,
// spins or crashes cannot take the test runner with it:
// - SpawnedBackend runs `bun app/main.ts device ...` in a subprocess (a SIGSEGV/SIGBUS kills only it,
//   a spinning thread is SIGKILLed at cleanup, and its CPU time is readable from /proc/PID/stat);
// - GuestMemfd maps guest memory in small windows on demand, so regions of 4 GiB and more (which
//   no single ArrayBuffer can span) work, and only touched pages exist (the memfd stays sparse);
// - Ring is a split-ring driver addressed purely by guest physical address over a GuestSpace
//   (any number of regions, any layout), with raw access for hostile index stores;
// - HostileFront is a vhost-user session built on FrontendConnection with per-call timeouts.
import { toArrayBuffer } from "bun:ffi";
import { existsSync, mkdtempSync, rmSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { memfdCreate, mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MFD_CLOEXEC, MFD_ALLOW_SEALING } from "../../ffi/mem.ts";
import { ftruncate, pipe, write, setNonBlocking, fcntl, O_CLOEXEC, O_NONBLOCK } from "../../ffi/io.ts";
import { setTimeouts, connectUnix } from "../../ffi/socket.ts";
import { eventfd, drain, signal, EFD_CLOEXEC } from "../../ffi/eventfd.ts";
import { libc, close, EAGAIN, checkAllow, type SysError } from "../../ffi/libc.ts";
import { FrontendConnection, Req, u64, vringState, vringAddr, memTable, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT } from "./frontend.ts";

export { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT };

export const KiB = 1024;
export const MiB = 1 << 20;
export const GiB = 2 ** 30;
export { MFD_ALLOW_SEALING };
const PAGE = 4096;
const CHUNK = 2 * MiB;

const MAIN = join(import.meta.dir, "../../app/main.ts");

// ---- the backend in a subprocess ----

export interface SpawnOptions {
  /** --log-level (default $TEST_LOG_LEVEL or warn: warnings reach `stderr` for tests that look for them).
   * HOSTILE_DEBUG=1 prints each backend's stderr when it is killed. */
  logLevel?: string;
}

/** `bun app/main.ts device <device> --socket ... <args>` in a subprocess of its own. */
export class SpawnedBackend {
  readonly dir: string;
  readonly socketPath: string;
  private err = "";
  private readonly stderrDone: Promise<void>;

  private constructor(readonly device: string, readonly proc: ReturnType<typeof Bun.spawn>, dir: string, socketPath: string) {
    this.dir = dir;
    this.socketPath = socketPath;
    const stream = proc.stderr as ReadableStream<Uint8Array>;
    this.stderrDone = (async () => {
      const dec = new TextDecoder();
      for await (const chunk of stream) this.err += dec.decode(chunk, { stream: true });
    })().catch(() => {});
  }

  /** Starts the backend and waits until its socket exists. `args` may use `{dir}` for its temp dir. */
  static async start(device: "console" | "block", args: string[], o: SpawnOptions = {}): Promise<SpawnedBackend> {
    const dir = mkdtempSync(join(tmpdir(), "vhu-hostile-"));
    const socketPath = join(dir, "sock");
    // HOSTILE_BACKEND_BIN=dist/backend runs the compiled binary instead of the sources.
    const program = process.env.HOSTILE_BACKEND_BIN ? [process.env.HOSTILE_BACKEND_BIN] : [process.execPath, MAIN];
    const argv = [...program, "device", device, "--socket", socketPath, "--log-level", o.logLevel ?? process.env.TEST_LOG_LEVEL ?? "warn", ...args.map((a) => a.replaceAll("{dir}", dir))];
    const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
    const b = new SpawnedBackend(device, proc, dir, socketPath);
    const deadline = Date.now() + 10_000;
    while (!existsSync(socketPath)) {
      if (!b.alive()) throw new Error(`backend exited before creating its socket (${b.status()}): ${b.stderr}`);
      if (Date.now() > deadline) throw new Error("backend did not create its socket");
      await Bun.sleep(5);
    }
    return b;
  }

  get pid(): number {
    return this.proc.pid;
  }

  /** What the backend printed on stderr so far. */
  get stderr(): string {
    return this.err;
  }

  alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** "running", "exit N" or the signal that killed it ("SIGSEGV", "SIGBUS"...). */
  status(): string {
    if (this.proc.signalCode !== null) return String(this.proc.signalCode);
    if (this.proc.exitCode !== null) return `exit ${this.proc.exitCode}`;
    return "running";
  }

  /** Waits up to `ms` for the process to die; returns status() (a crash shows as its signal). */
  async settle(ms: number): Promise<string> {
    await Promise.race([this.proc.exited, Bun.sleep(ms)]);
    return this.status();
  }

  /** CPU seconds (user + system, every thread) used so far, from /proc/PID/stat. */
  cpuSeconds(): number {
    const stat = readFileSync(`/proc/${this.pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields after the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    return (Number(fields[11]) + Number(fields[12])) / 100; // USER_HZ is 100 on Linux
  }

  /** Share of one CPU used over the next `ms` milliseconds. */
  async cpuShare(ms: number): Promise<number> {
    const c0 = this.cpuSeconds();
    const t0 = performance.now();
    await Bun.sleep(ms);
    const c1 = this.cpuSeconds();
    return (c1 - c0) / ((performance.now() - t0) / 1000);
  }

  async kill(): Promise<void> {
    // Always SIGKILL: a backend that crashed may still sit in Bun's crash handler (not yet exited).
    try {
      this.proc.kill("SIGKILL");
    } catch {
      /* gone already */
    }
    await Promise.race([this.proc.exited, Bun.sleep(3000)]);
    await Promise.race([this.stderrDone, Bun.sleep(200)]);
    if (process.env.HOSTILE_DEBUG) console.error(`--- ${this.device} backend (${this.status()}) stderr:\n${this.err}`);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---- guest memory: a memfd mapped in windows ----

interface MapWindow {
  off: number;
  len: number;
  host: number;
  u8: Uint8Array;
  dv: DataView;
  u16: Uint16Array;
}

/** One memfd of guest RAM; the test maps only the windows it touches. */
export class GuestMemfd {
  readonly fd: number;
  private windows: MapWindow[] = [];

  constructor(readonly size: number, o: { sealing?: boolean; name?: string } = {}) {
    this.fd = memfdCreate(o.name ?? "hostile-guest", MFD_CLOEXEC | (o.sealing ? MFD_ALLOW_SEALING : 0));
    ftruncate(this.fd, size);
  }

  /** A window covering file range [off, off+len) (mapped on first use). */
  window(off: number, len: number): MapWindow {
    if (off < 0 || len < 0 || off + len > this.size) throw new Error(`memfd range 0x${off.toString(16)}+${len} outside its ${this.size} bytes`);
    for (const w of this.windows) if (off >= w.off && off + len <= w.off + w.len) return w;
    const start = Math.floor(off / CHUNK) * CHUNK;
    const end = Math.min(Math.ceil((off + Math.max(len, 1)) / CHUNK) * CHUNK, Math.ceil(this.size / PAGE) * PAGE);
    const wlen = end - start;
    const host = mmap(wlen, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, start);
    const ab = toArrayBuffer(host as never, 0, wlen);
    const w = { off: start, len: wlen, host, u8: new Uint8Array(ab), dv: new DataView(ab), u16: new Uint16Array(ab, 0, Math.floor(wlen / 2)) };
    this.windows.push(w);
    return w;
  }

  /** Unmaps every window (after this, nothing of the memfd may be touched through old views). */
  unmapAll(): void {
    for (const w of this.windows) munmap(w.host, w.len);
    this.windows = [];
  }

  dispose(): void {
    this.unmapAll();
    close(this.fd);
  }
}

/** One memory-table entry: guest physical range [gpa, gpa+size) backed by memfd bytes from `offset`. */
export interface RegionSpec {
  mem: GuestMemfd;
  gpa: number;
  size: number;
  offset: number;
  /** The "VMM virtual address" claimed for `gpa` (ring addresses are sent as such). */
  uaddr: number;
}

/** The guest physical address space: the regions of one memory table. */
export class GuestSpace {
  constructor(readonly regions: RegionSpec[]) {}

  /** A QEMU-like space: one memfd region per entry, uaddr = 0x7f00_0000_0000 + offset in the memfd. */
  static of(...specs: { mem: GuestMemfd; gpa: number; size?: number; offset?: number }[]): GuestSpace {
    return new GuestSpace(specs.map((s) => ({ mem: s.mem, gpa: s.gpa, size: s.size ?? s.mem.size - (s.offset ?? 0), offset: s.offset ?? 0, uaddr: 0x7f00_0000_0000 + (s.offset ?? 0) })));
  }

  private find(gpa: number, len: number): { r: RegionSpec; off: number } {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return { r, off: r.offset + (gpa - r.gpa) };
    }
    throw new Error(`test bug: GPA 0x${gpa.toString(16)}+${len} is not in the guest space`);
  }

  /** Guest bytes [gpa, gpa+len) (a view into a mapped window). */
  bytes(gpa: number, len: number): Uint8Array {
    const { r, off } = this.find(gpa, len);
    const w = r.mem.window(off, len);
    return w.u8.subarray(off - w.off, off - w.off + len);
  }

  view(gpa: number, len: number): DataView {
    const b = this.bytes(gpa, len);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  /** A Uint16Array and index for the (2-aligned) u16 at `gpa`, for Atomics. */
  u16(gpa: number): [Uint16Array, number] {
    const { r, off } = this.find(gpa, 2);
    const w = r.mem.window(off, 2);
    return [w.u16, (off - w.off) / 2];
  }

  va(gpa: number): number {
    const { r } = this.find(gpa, 1);
    return r.uaddr + (gpa - r.gpa);
  }

  memTable(): { payload: Uint8Array; fds: number[] } {
    return {
      payload: memTable(this.regions.map((r) => ({ gpa: r.gpa, size: r.size, uaddr: r.uaddr, offset: r.offset }))),
      fds: this.regions.map((r) => r.mem.fd),
    };
  }
}

/** Bump allocator over guest physical addresses [start, end). */
export class Bump {
  private next: number;
  constructor(readonly start: number, readonly end: number) {
    this.next = start;
  }
  alloc(len: number, align = 8): number {
    const gpa = Math.ceil(this.next / align) * align;
    if (gpa + len > this.end) throw new Error("test bug: bump allocator exhausted");
    this.next = gpa + len;
    return gpa;
  }
}

// ---- the driver side of a split ring, by GPA ----

export interface RingBuffer {
  gpa: number;
  len: number;
  write?: boolean;
}

/** Bytes a ring of `size` entries needs with ring()'s page-separated layout. */
export function ringFootprint(size: number): number {
  const pages = (n: number) => Math.ceil(n / PAGE) * PAGE;
  return pages(16 * size) + pages(6 + 2 * size) + pages(6 + 8 * size);
}

export class Ring {
  readonly kick = eventfd();
  readonly call = eventfd();
  readonly err = eventfd();
  availIdx = 0;
  usedSeen = 0;
  private free: number[];

  constructor(readonly space: GuestSpace, readonly index: number, readonly size: number, readonly desc: number, readonly avail: number, readonly used: number) {
    this.free = Array.from({ length: size }, (_, i) => i);
    this.space.bytes(desc, 16 * size).fill(0);
    this.space.bytes(avail, 6 + 2 * size).fill(0);
    this.space.bytes(used, 6 + 8 * size).fill(0);
  }

  /** Descriptor table, available ring and used ring each on pages of their own, from `gpa` on. */
  static at(space: GuestSpace, index: number, size: number, gpa: number): Ring {
    const pages = (n: number) => Math.ceil(n / PAGE) * PAGE;
    const desc = gpa;
    const avail = desc + pages(16 * size);
    const used = avail + pages(6 + 2 * size);
    return new Ring(space, index, size, desc, avail, used);
  }

  /** Forgets the driver state (after the ring was stopped), zeroing the ring memory. */
  reset(): void {
    this.availIdx = 0;
    this.usedSeen = 0;
    this.free = Array.from({ length: this.size }, (_, i) => i);
    this.space.bytes(this.desc, 16 * this.size).fill(0);
    this.space.bytes(this.avail, 6 + 2 * this.size).fill(0);
    this.space.bytes(this.used, 6 + 8 * this.size).fill(0);
  }

  writeDesc(tableGpa: number, i: number, gpa: number, len: number, flags: number, next: number): void {
    const v = this.space.view(tableGpa + 16 * i, 16);
    v.setUint32(0, gpa % 0x1_0000_0000, true);
    v.setUint32(4, Math.floor(gpa / 0x1_0000_0000), true);
    v.setUint32(8, len, true);
    v.setUint16(12, flags, true);
    v.setUint16(14, next, true);
  }

  private take(): number {
    const d = this.free.shift();
    if (d === undefined) throw new Error("test bug: descriptor table full");
    return d;
  }

  /** Chains `bufs` (direct descriptors, or an indirect table at `indirectAt`) and publishes it. */
  add(bufs: RingBuffer[], o: { kick?: boolean; indirectAt?: number } = {}): number {
    let head: number;
    const flags = (b: RingBuffer, i: number) => (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F_NEXT : 0);
    if (o.indirectAt !== undefined) {
      bufs.forEach((b, i) => this.writeDesc(o.indirectAt!, i, b.gpa, b.len, flags(b, i), i + 1));
      head = this.take();
      this.writeDesc(this.desc, head, o.indirectAt, 16 * bufs.length, VIRTQ_DESC_F_INDIRECT, 0);
    } else {
      const ids = bufs.map(() => this.take());
      bufs.forEach((b, i) => this.writeDesc(this.desc, ids[i]!, b.gpa, b.len, flags(b, i), ids[i + 1] ?? 0));
      head = ids[0]!;
    }
    this.publish(head, o.kick ?? true);
    return head;
  }

  /** Puts `head` in the available ring, stores the new index, kicks. */
  publish(head: number, kick = true): void {
    this.space.view(this.avail + 4 + 2 * (this.availIdx % this.size), 2).setUint16(0, head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.storeAvailIdx(this.availIdx);
    if (kick) signal(this.kick);
  }

  /** One store of avail->idx (what a hostile guest does to jump it). */
  storeAvailIdx(v: number): void {
    const [a, i] = this.space.u16(this.avail + 2);
    Atomics.store(a, i, v & 0xffff);
  }

  usedIdx(): number {
    const [a, i] = this.space.u16(this.used + 2);
    return Atomics.load(a, i);
  }

  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const idx = this.usedIdx();
    while (this.usedSeen !== idx) {
      const v = this.space.view(this.used + 4 + 8 * (this.usedSeen % this.size), 8);
      out.push({ id: v.getUint32(0, true), len: v.getUint32(4, true) });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }

  recycle(head: number): void {
    let i = head;
    for (let n = 0; n < this.size; n++) {
      this.free.push(i);
      const v = this.space.view(this.desc + 16 * i, 16);
      if (!(v.getUint16(12, true) & VIRTQ_DESC_F_NEXT) || v.getUint16(12, true) & VIRTQ_DESC_F_INDIRECT) break;
      i = v.getUint16(14, true);
    }
  }

  async waitUsed(count: number, timeoutMs = 3000): Promise<{ id: number; len: number }[]> {
    const got: { id: number; len: number }[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (const u of this.takeUsed()) {
        got.push(u);
        this.recycle(u.id);
      }
      if (got.length >= count) return got;
      if (Date.now() > deadline) throw new Error(`queue ${this.index}: ${got.length}/${count} used elements after ${timeoutMs} ms`);
      await Bun.sleep(2);
    }
  }

  dispose(): void {
    close(this.kick);
    close(this.call);
    close(this.err);
  }
}

// ---- hostile notification fds ----

/** A BLOCKING eventfd whose counter is 0xfffffffffffffffe: the next write(2) of 1 blocks. */
export function fullBlockingEventfd(): number {
  const fd = eventfd(EFD_CLOEXEC);
  const v = new BigUint64Array([0xffff_ffff_ffff_fffen]);
  if (Number(libc.write(fd, v, 8)) !== 8) throw new Error("could not preload the eventfd");
  return fd;
}

/** A pipe whose buffer is full, both ends blocking: [readEnd, writeEnd]. Writing blocks until read. */
export function fullBlockingPipe(): [number, number] {
  const [r, w] = pipe(O_CLOEXEC);
  setNonBlocking(w);
  const junk = new Uint8Array(65536);
  while (write(w, junk, junk.length) !== -EAGAIN) {
    /* fill */
  }
  const one = new Uint8Array(1);
  while (write(w, one, 1) !== -EAGAIN) {
    /* fill the last bytes */
  }
  setNonBlocking(w, false);
  return [r, w];
}

/** Empties a counter/pipe without blocking (also if the backend made it blocking or not). */
export function drainAny(fd: number): number {
  const flags = fcntl(fd, 3 /* F_GETFL */);
  fcntl(fd, 4 /* F_SETFL */, flags | O_NONBLOCK);
  const buf = new Uint8Array(65536);
  let total = 0;
  for (;;) {
    const n = checkAllow(libc.read(fd, buf, buf.length), "read", EAGAIN);
    if (n <= 0) return total;
    total += n;
  }
}

export { drain, signal, eventfd, setNonBlocking, pipe };

// ---- a vhost-user session with timeouts ----

/**
 * connect(2) to a backend that may have bound its socket but not called listen(2) yet (the socket
 * file exists then, and connecting is refused for a moment): retried for up to 3 s.
 */
export function connectRetrying(path: string, ms = 3000): number {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return connectUnix(path);
    } catch (e) {
      const code = (e as SysError).code;
      if ((code !== "ECONNREFUSED" && code !== "ENOENT") || Date.now() > deadline) throw e;
      Bun.sleepSync(5);
    }
  }
}

export class HostileFront {
  conn: FrontendConnection;
  features = 0n;

  constructor(readonly socketPath: string, readonly timeoutMs = 2000) {
    this.conn = new FrontendConnection(connectRetrying(socketPath), timeoutMs);
  }

  timeout(ms: number): void {
    setTimeouts(this.conn.fd, ms);
  }

  /** Every offered feature and protocol feature; returns the features. */
  handshake(mask = ~0n): bigint {
    const c = this.conn;
    const offered = c.requestU64(Req.GET_FEATURES);
    const proto = c.requestU64(Req.GET_PROTOCOL_FEATURES);
    c.send(Req.SET_PROTOCOL_FEATURES, u64(proto));
    c.send(Req.SET_OWNER);
    this.features = offered & mask & ~(1n << 34n); // split rings only: no VIRTIO_F_RING_PACKED
    this.ok(c.ack(Req.SET_FEATURES, u64(this.features)), "SET_FEATURES");
    return this.features;
  }

  private ok(v: bigint, what: string): void {
    if (v !== 0n) throw new Error(`${what} refused (${v})`);
  }

  setMemTable(space: GuestSpace): bigint {
    const t = space.memTable();
    return this.conn.ack(Req.SET_MEM_TABLE, t.payload, t.fds);
  }

  /** SET_MEM_TABLE with NEED_REPLY, not waiting for the reply (pipelining). */
  sendMemTable(space: GuestSpace): void {
    const t = space.memTable();
    this.conn.send(Req.SET_MEM_TABLE, t.payload, t.fds, true);
  }

  /** NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE; the fds default to the ring's own. */
  startRing(q: Ring, o: { base?: number; call?: number | null; err?: number | null; kick?: number } = {}): void {
    const c = this.conn;
    const s = q.space;
    this.ok(c.ack(Req.SET_VRING_NUM, vringState(q.index, q.size)), "SET_VRING_NUM");
    this.ok(c.ack(Req.SET_VRING_BASE, vringState(q.index, o.base ?? 0)), "SET_VRING_BASE");
    this.ok(c.ack(Req.SET_VRING_ADDR, vringAddr(q.index, s.va(q.desc), s.va(q.used), s.va(q.avail))), "SET_VRING_ADDR");
    const call = o.call === undefined ? q.call : o.call;
    if (call !== null) this.ok(c.ack(Req.SET_VRING_CALL, u64(q.index), [call]), "SET_VRING_CALL");
    const err = o.err === undefined ? q.err : o.err;
    if (err !== null) this.ok(c.ack(Req.SET_VRING_ERR, u64(q.index), [err]), "SET_VRING_ERR");
    this.ok(c.ack(Req.SET_VRING_KICK, u64(q.index), [o.kick ?? q.kick]), "SET_VRING_KICK");
    this.ok(c.ack(Req.SET_VRING_ENABLE, vringState(q.index, 1)), "SET_VRING_ENABLE");
  }

  /** GET_VRING_BASE (stops the ring); throws "timed out waiting for a reply" if the backend hangs. */
  getVringBase(index: number, timeoutMs = this.timeoutMs): number {
    this.timeout(timeoutMs);
    try {
      const r = this.conn.request(Req.GET_VRING_BASE, vringState(index, 0));
      return new DataView(r.payload.buffer).getUint32(4, true);
    } finally {
      this.timeout(this.timeoutMs);
    }
  }

  /** Round trip of one GET_FEATURES in ms; throws "timed out waiting for a reply" after `timeoutMs`. */
  featuresLatency(timeoutMs = this.timeoutMs): number {
    this.timeout(timeoutMs);
    try {
      const t0 = performance.now();
      this.conn.requestU64(Req.GET_FEATURES);
      return performance.now() - t0;
    } finally {
      this.timeout(this.timeoutMs);
    }
  }

  close(): void {
    this.conn.close();
  }
}

// ---- virtio-blk requests by GPA ----

export const BLK_T_IN = 0;
export const BLK_T_OUT = 1;
export const BLK_T_GET_ID = 8;
export const BLK_S_OK = 0;

export interface BlkPlaced {
  head: number;
  status: number;
  data: number;
  len: number;
}

/**
 * A virtio-blk request with its header and status from `bump`, and its data buffer at `dataGpa`
 * (anywhere: across region boundaries, over the rings...). OUT data is copied there first.
 */
export function blkRequest(space: GuestSpace, q: Ring, bump: Bump, type: number, sector: number, dataGpa: number, len: number, o: { out?: Uint8Array; kick?: boolean } = {}): BlkPlaced {
  const hdr = bump.alloc(16);
  const v = space.view(hdr, 16);
  v.setUint32(0, type, true);
  v.setUint32(4, 0, true);
  v.setUint32(8, sector % 0x1_0000_0000, true);
  v.setUint32(12, Math.floor(sector / 0x1_0000_0000), true);
  const status = bump.alloc(1, 1);
  space.bytes(status, 1)[0] = 0xff;
  if (o.out) space.bytes(dataGpa, len).set(o.out);
  const head = q.add([{ gpa: hdr, len: 16 }, { gpa: dataGpa, len, write: type !== BLK_T_OUT }, { gpa: status, len: 1, write: true }], { kick: o.kick });
  return { head, status, data: dataGpa, len };
}

/** A 20-byte GET_ID request; resolves to the status byte once used (throws on timeout). */
export async function blkGetId(space: GuestSpace, q: Ring, bump: Bump, timeoutMs = 3000): Promise<number> {
  const data = bump.alloc(20);
  const r = blkRequest(space, q, bump, BLK_T_GET_ID, 0, data, 20);
  const used = await q.waitUsed(1, timeoutMs);
  if (used[0]!.id !== r.head) throw new Error(`GET_ID: head ${used[0]!.id} completed, expected ${r.head}`);
  return space.bytes(r.status, 1)[0]!;
}

/** Deterministic bytes (xorshift32). */
export function pattern(seed: number, n: number): Uint8Array {
  let x = seed >>> 0 || 1;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Polls `cond` every few ms until it holds or `ms` pass; returns whether it held. */
export async function eventually(cond: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (cond()) return true;
    if (Date.now() > deadline) return false;
    await Bun.sleep(5);
  }
}
