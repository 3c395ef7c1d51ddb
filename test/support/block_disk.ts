// The block device under test through the in-process front-end (test/support/frontend.ts): images,
// guest buffers, and a Disk that builds virtio-blk requests and reads their results. Shared by the
// block unit tests (sync and io_uring). Call disposeDisks() after each test.
import { expect } from "bun:test";
import { mkdtempSync, writeFileSync, readFileSync, rmSync, truncateSync, existsSync } from "node:fs";
import { spawn, type Subprocess } from "bun";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, Req, configPayload, type BufferSpec } from "./frontend.ts";
import { signal } from "../../ffi/eventfd.ts";
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from "../../devices/block/config.ts";
import { rng } from "./random.ts";

export const SECTOR = 512;
export const IMAGE_BYTES = 8 << 20;
export const CAPACITY = IMAGE_BYTES / SECTOR;

// ---- helpers: deterministic randomness, images, guest buffers ----

export { rng };
export const randInt = (r: () => number, lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));

export function randomBytes(r: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  const w = new Uint32Array(b.buffer, 0, n >>> 2);
  for (let i = 0; i < w.length; i++) w[i] = (r() * 2 ** 32) >>> 0;
  for (let i = w.length * 4; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

export const dirs: string[] = [];
export function tempDir(base = tmpdir()): string {
  const d = mkdtempSync(join(base, "blk-test-"));
  dirs.push(d);
  return d;
}

/** A sparse image of `bytes` (zeroes), or filled with `content`. */
export function makeImage(content: Uint8Array | number = IMAGE_BYTES, base?: string): string {
  const p = join(tempDir(base), "disk.img");
  if (typeof content === "number") {
    writeFileSync(p, "");
    truncateSync(p, content);
  } else writeFileSync(p, content);
  return p;
}

/** Bump allocator over one big chunk of guest RAM, reset between batches. */
export class Arena {
  private readonly base: number;
  private next = 0;
  constructor(readonly ram: GuestRam, readonly size: number) {
    this.base = ram.alloc(size, 4096);
  }
  alloc(len: number, align = 8, misalign = 0): number {
    this.next = Math.ceil(this.next / align) * align + misalign;
    const gpa = this.base + this.next;
    this.next += Math.max(len, 1);
    if (this.next > this.size) throw new Error("arena exhausted");
    return gpa;
  }
  reset(): void {
    this.next = 0;
  }
}

export interface BlkReq {
  type: number;
  sector?: number | bigint;
  /** OUT data. */
  out?: Uint8Array;
  /** Raw readable payload after the header (discard / write-zeroes segments). */
  payload?: Uint8Array;
  /** Device-writable data bytes before the status (IN, GET_ID). */
  inLen?: number;
  /** Split the data into this many descriptors. */
  pieces?: number;
  indirect?: boolean;
  /** Alignment offset of data buffers in guest memory (to test unaligned O_DIRECT). */
  misalign?: number;
  /** Framing variants. */
  headerWithData?: boolean;
  dataWithStatus?: boolean;
  splitHeader?: boolean;
  headerLen?: number;
  /** The header's address this many bytes past a 4 KiB boundary (not 4-byte aligned: read by copy). */
  headerMisalign?: number;
  noStatus?: boolean;
}

export interface Pending {
  head: number;
  req: BlkReq;
  statusGpa: number | null;
  inBufs: { gpa: number; len: number }[];
}

export interface Result {
  status: number;
  data: Uint8Array;
  usedLen: number;
}

export function splitLen(len: number, pieces: number, r: () => number): number[] {
  pieces = Math.max(1, Math.min(pieces, len));
  if (pieces === 1) return [len];
  const cuts = new Set<number>();
  while (cuts.size < pieces - 1) cuts.add(randInt(r, 1, len - 1));
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: number[] = [];
  let prev = 0;
  for (const c of [...sorted, len]) {
    out.push(c - prev);
    prev = c;
  }
  return out;
}

export function segment(sector: number, sectors: number, flags = 0): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(sector), true);
  v.setUint32(8, sectors, true);
  v.setUint32(12, flags, true);
  return b;
}
export const concat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));

/** What Disk needs of the backend it drives: an in-process BackendUnderTest, or a SpawnedBackend. */
export interface BackendHandle {
  readonly socketPath: string;
  readonly ready: Promise<void>;
  stop(): Promise<void>;
}

/**
 * `backend device block ARGS --socket PATH` run as its own process from the sources (app/main.ts,
 * the real entry point: acquire, the sandbox's re-exec, the device thread), ready once it serves.
 */
export class SpawnedBackend implements BackendHandle {
  readonly socketPath: string;
  readonly ready: Promise<void>;
  private readonly proc: Subprocess;
  private stderr = "";

  constructor(args: string[]) {
    const sock = join(tempDir(), "blk.sock");
    this.socketPath = sock;
    const proc = spawn([process.execPath, join(import.meta.dir, "../../app/main.ts"), "device", "block", "--socket", sock, ...args], { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
    this.proc = proc;
    void (async () => {
      for await (const chunk of proc.stderr as ReadableStream<Uint8Array>) this.stderr += Buffer.from(chunk).toString();
    })();
    this.ready = (async () => {
      const deadline = Date.now() + 30_000;
      while (!existsSync(sock) || !this.stderr.includes("listening on")) {
        if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`backend exited (${proc.exitCode ?? proc.signalCode}): ${this.stderr.slice(-2000)}`);
        if (Date.now() > deadline) throw new Error(`backend did not serve in 30 s: ${this.stderr.slice(-2000)}`);
        await Bun.sleep(20);
      }
    })();
  }

  /** What it logged so far. */
  get log(): string {
    return this.stderr;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill("SIGTERM");
    await this.proc.exited;
  }
}

/** A started block backend with a VMM session, guest RAM and driver queues. */
export class Disk {
  readonly backend: BackendHandle;
  readonly ram: GuestRam;
  vmm: Vmm;
  readonly arena: Arena;
  readonly r = rng(1234);

  private readonly ownsRam: boolean;

  private constructor(readonly options: Record<string, unknown>, ramSize: number, guest?: Disk, backend?: BackendHandle) {
    this.backend = backend ?? new BackendUnderTest("block", options);
    this.ownsRam = guest === undefined;
    this.ram = guest?.ram ?? new GuestRam(ramSize);
    this.arena = guest?.arena ?? new Arena(this.ram, ramSize - (8 << 20));
    this.vmm = null as unknown as Vmm;
  }

  /** Starts a backend; with `guest`, the same guest (RAM) as another Disk, e.g. to restore into;
   * with `backend`, drives that one (started elsewhere) instead, and `options` are ignored. */
  static async start(options: Record<string, unknown>, o: { queues?: number; queueSize?: number; ramSize?: number; activate?: boolean; guest?: Disk; backend?: BackendHandle } = {}): Promise<Disk> {
    const d = new Disk(options, o.ramSize ?? 64 << 20, o.guest, o.backend);
    opened.push(d);
    await d.backend.ready;
    d.vmm = new Vmm(d.backend, d.ram);
    if (o.activate ?? true) d.vmm.activate(o.queues ?? 1, o.queueSize ?? 128);
    return d;
  }

  q(i = 0): DriverQueue {
    return this.vmm.queues[i]!;
  }

  /** Puts a request's buffers in guest memory and makes its chain available (kicks only if asked). */
  add(q: DriverQueue, req: BlkReq, kick = false): Pending {
    const a = this.arena;
    const ram = this.ram;
    const hdr = new Uint8Array(16);
    const hv = new DataView(hdr.buffer);
    hv.setUint32(0, req.type, true);
    hv.setBigUint64(8, BigInt.asUintN(64, BigInt(req.sector ?? 0)), true);
    const bufs: BufferSpec[] = [];
    const put = (bytes: Uint8Array, misalign = 0): number => {
      const gpa = a.alloc(bytes.length, misalign ? 4096 : 8, misalign);
      ram.bytes(gpa, bytes.length).set(bytes);
      return gpa;
    };
    const readable = req.out ?? req.payload ?? new Uint8Array(0);
    const header = hdr.subarray(0, req.headerLen ?? 16);
    if (req.headerWithData) {
      const all = concat(header, readable);
      bufs.push({ gpa: put(all), len: all.length });
    } else {
      if (req.splitHeader) {
        bufs.push({ gpa: put(header.subarray(0, 8)), len: 8 }, { gpa: put(header.subarray(8)), len: header.length - 8 });
      } else bufs.push({ gpa: put(header, req.headerMisalign), len: header.length });
      if (readable.length > 0) {
        let off = 0;
        for (const n of splitLen(readable.length, req.pieces ?? 1, this.r)) {
          bufs.push({ gpa: put(readable.subarray(off, off + n), req.misalign), len: n });
          off += n;
        }
      }
    }
    const inBufs: { gpa: number; len: number }[] = [];
    let statusGpa: number | null = null;
    const inLen = req.inLen ?? 0;
    if (req.dataWithStatus && inLen > 0) {
      const gpa = a.alloc(inLen + 1, 4096, req.misalign ?? 0);
      ram.bytes(gpa, inLen + 1).fill(0xee);
      bufs.push({ gpa, len: inLen + 1, write: true });
      inBufs.push({ gpa, len: inLen });
      statusGpa = gpa + inLen;
    } else {
      if (inLen > 0) {
        for (const n of splitLen(inLen, req.pieces ?? 1, this.r)) {
          const gpa = a.alloc(n, req.misalign ? 4096 : 8, req.misalign ?? 0);
          ram.bytes(gpa, n).fill(0xee);
          bufs.push({ gpa, len: n, write: true });
          inBufs.push({ gpa, len: n });
        }
      }
      if (!req.noStatus) {
        statusGpa = a.alloc(1, 1);
        bufs.push({ gpa: statusGpa, len: 1, write: true });
      }
    }
    if (statusGpa !== null) ram.bytes(statusGpa, 1)[0] = 0xff; // "not written" sentinel
    const head = q.addChain(bufs, { indirect: req.indirect, kick });
    return { head, req, statusGpa, inBufs };
  }

  /** Waits for the given requests (all on queue q) and reads their results. */
  async finish(q: DriverQueue, pending: Pending[]): Promise<Result[]> {
    const used = await q.waitUsed(pending.length);
    const byHead = new Map(used.map((u) => [u.id, u.len]));
    return pending.map((p) => {
      const usedLen = byHead.get(p.head);
      if (usedLen === undefined) throw new Error(`head ${p.head} not completed`);
      const status = p.statusGpa === null ? -1 : this.ram.bytes(p.statusGpa, 1)[0]!;
      const data = concat(...p.inBufs.map((b) => this.ram.bytes(b.gpa, b.len).slice()));
      return { status, data, usedLen };
    });
  }

  /** Submits requests on one queue with a single kick and returns their results. */
  async run(reqs: BlkReq[], qi = 0): Promise<Result[]> {
    const q = this.q(qi);
    this.arena.reset();
    const pending = reqs.map((r) => this.add(q, r));
    signal(q.kick);
    return this.finish(q, pending);
  }

  async one(req: BlkReq, qi = 0): Promise<Result> {
    return (await this.run([req], qi))[0]!;
  }

  async read(sector: number, sectors: number, qi = 0): Promise<Uint8Array> {
    const r = await this.one({ type: VIRTIO_BLK_T.IN, sector, inLen: sectors * SECTOR }, qi);
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
    return r.data;
  }

  async write(sector: number, data: Uint8Array, qi = 0): Promise<void> {
    const r = await this.one({ type: VIRTIO_BLK_T.OUT, sector, out: data }, qi);
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
  }

  config(offset = 0, size = 60): DataView {
    const r = this.vmm.conn.request(Req.GET_CONFIG, configPayload(offset, size));
    const data = r.payload.subarray(12);
    return new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  async dispose(): Promise<void> {
    this.vmm?.dispose();
    await this.backend.stop();
    if (this.ownsRam) this.ram.dispose();
  }
}

/** Random reads and writes on two queues against a model; requests in one batch never overlap. */
export async function randomIo(options: Record<string, unknown>, seed: number, rounds: number, base?: string, misalign = false) {
  const r = rng(seed);
  const initial = randomBytes(r, IMAGE_BYTES);
  const img = makeImage(initial, base);
  const model = initial.slice();
  const d = await Disk.start({ file: img, "queue-size": "256", ...options }, { queues: 2, queueSize: 256 });
  let requests = 0;
  for (let round = 0; round < rounds; round++) {
    d.arena.reset();
    const busy: [number, number][] = [];
    const batches: { q: DriverQueue; pending: Pending[]; expect: (Uint8Array | null)[]; writes: [number, Uint8Array][] }[] = [];
    for (let qi = 0; qi < 2; qi++) {
      const q = d.q(qi);
      const b = { q, pending: [] as Pending[], expect: [] as (Uint8Array | null)[], writes: [] as [number, Uint8Array][] };
      const n = randInt(r, 4, 12);
      for (let i = 0; i < n; i++) {
        const kind = r();
        const indirect = r() < 0.5;
        const pieces = randInt(r, 1, 8);
        const ma = misalign && r() < 0.5 ? randInt(r, 1, 511) : 0;
        if (kind < 0.05) {
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.FLUSH, inLen: 0, indirect }));
          b.expect.push(null);
          continue;
        }
        const sectors = randInt(r, 1, 128);
        let sector = 0;
        for (let tries = 0; ; tries++) {
          sector = randInt(r, 0, CAPACITY - sectors);
          if (!busy.some(([s, e]) => sector < e && s < sector + sectors)) break;
          if (tries > 50) throw new Error("no free range");
        }
        busy.push([sector, sector + sectors]);
        if (kind < 0.5) {
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.IN, sector, inLen: sectors * SECTOR, pieces, indirect, misalign: ma }));
          b.expect.push(model.slice(sector * SECTOR, (sector + sectors) * SECTOR));
        } else {
          const data = randomBytes(r, sectors * SECTOR);
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.OUT, sector, out: data, pieces, indirect, misalign: ma }));
          b.expect.push(null);
          b.writes.push([sector, data]);
        }
      }
      batches.push(b);
    }
    for (const b of batches) signal(b.q.kick); // both queues in flight together
    for (const b of batches) {
      const results = await d.finish(b.q, b.pending);
      results.forEach((res, i) => {
        expect(res.status).toBe(VIRTIO_BLK_S.OK);
        const want = b.expect[i];
        if (want) {
          expect(res.usedLen).toBe(want.length + 1);
          expect(Buffer.compare(res.data, want)).toBe(0);
        } else expect(res.usedLen).toBe(1);
      });
      for (const [sector, data] of b.writes) model.set(data, sector * SECTOR);
      requests += results.length;
    }
  }
  expect(requests).toBeGreaterThan(rounds * 8);
  // The file itself holds exactly what the model says, and so does a read through the device.
  expect(Buffer.compare(readFileSync(img), model)).toBe(0);
  for (let s = 0; s < CAPACITY; s += 2048) {
    expect(Buffer.compare(await d.read(s, 2048, s & 1), model.subarray(s * SECTOR, (s + 2048) * SECTOR))).toBe(0);
  }
  return requests;
}

/**
 * Random reads, writes and flushes on both queues at once, none overlapping within a round;
 * checks every status and read against `model` and applies the writes. Between the kicks and the
 * collection, `meanwhile` runs (a server restart, an image resize).
 */
export async function randomRounds(d: Disk, model: Uint8Array, seed: number, rounds: number, meanwhile?: (round: number) => Promise<void>): Promise<number> {
  const r = rng(seed);
  const capacity = model.length / SECTOR;
  let requests = 0;
  for (let round = 0; round < rounds; round++) {
    d.arena.reset();
    const busy: [number, number][] = [];
    const batches: { qi: number; pending: Pending[]; want: (Uint8Array | null)[]; writes: [number, Uint8Array][] }[] = [];
    for (let qi = 0; qi < 2; qi++) {
      const q = d.q(qi);
      const b = { qi, pending: [] as Pending[], want: [] as (Uint8Array | null)[], writes: [] as [number, Uint8Array][] };
      for (let i = randInt(r, 6, 14); i > 0; i--) {
        if (r() < 0.05) {
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.FLUSH }));
          b.want.push(null);
          continue;
        }
        const sectors = randInt(r, 1, 256);
        let sector = 0;
        do sector = randInt(r, 0, capacity - sectors);
        while (busy.some(([s, e]) => sector < e && s < sector + sectors));
        busy.push([sector, sector + sectors]);
        const pieces = randInt(r, 1, 8);
        if (r() < 0.5) {
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.IN, sector, inLen: sectors * SECTOR, pieces, indirect: r() < 0.5 }));
          b.want.push(model.slice(sector * SECTOR, (sector + sectors) * SECTOR));
        } else {
          const data = randomBytes(r, sectors * SECTOR);
          b.pending.push(d.add(q, { type: VIRTIO_BLK_T.OUT, sector, out: data, pieces, indirect: r() < 0.5 }));
          b.want.push(null);
          b.writes.push([sector, data]);
        }
      }
      batches.push(b);
    }
    for (const b of batches) signal(d.q(b.qi).kick);
    await meanwhile?.(round);
    for (const b of batches) {
      const results = await d.finish(d.q(b.qi), b.pending);
      results.forEach((res, i) => {
        expect(res.status).toBe(VIRTIO_BLK_S.OK);
        const want = b.want[i];
        if (want) expect(Buffer.compare(res.data, want)).toBe(0);
      });
      for (const [sector, data] of b.writes) model.set(data, sector * SECTOR);
      requests += results.length;
    }
  }
  return requests;
}

/** Every Disk started (so tests can dispose of one early by taking it out). */
export const opened: Disk[] = [];

/** Stops every Disk and removes every temporary directory. */
export async function disposeDisks(): Promise<void> {
  // Disks sharing another's guest RAM are disposed first (they were started after it).
  for (const d of opened.splice(0).reverse()) await d.dispose();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
