// The Disk interface (devices/block/disk/disk.ts) through its raw implementation, the same tests
// for each way a raw queue runs (sync: completions inside the call; io_uring: completions from the
// loop) and with O_DIRECT: data against a model, every operation's result, errors as -errno,
// multi-step requests on one slot, depth, and the disk built from an acquired resource (no open).
import { describe, test, expect, afterEach } from "bun:test";
import { ptr } from "bun:ffi";
import { readFileSync, statSync, truncateSync, readdirSync, readlinkSync } from "node:fs";
import { rng, randomBytes, makeImage, disposeDisks } from "../support/block_disk.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { acquireRawDisk, RawDisk, type AioMode } from "../../devices/block/disk/raw.ts";
import { UringRawQueue } from "../../devices/block/disk/raw_uring.ts";
import { ZERO_UNMAP, ZERO_FUA, ZERO_MAY_FAIL_FAST, type Disk, type DiskQueue, type DiskRequest } from "../../devices/block/disk/disk.ts";

afterEach(disposeDisks);

const EIO = 5;
const EBADF = 9;
const MiB = 1 << 20;

/** One disk and one queue on a loop, with every completion recorded. */
class Rig {
  readonly loop = new EventLoop();
  readonly disk: RawDisk;
  readonly io: DiskQueue;
  readonly results: { id: number; result: number }[] = [];
  batches = 0;
  /** Called inside `done` (multi-step requests); returns true when it started another operation. */
  onDone: ((req: DiskRequest, result: number) => boolean) | null = null;
  /** Buffers the iovecs point into, kept alive until their request completes. */
  private readonly keep: Uint8Array[] = [];

  constructor(readonly path: string, aio: AioMode, o: { readOnly?: boolean; direct?: boolean; depth?: number } = {}) {
    const resource = acquireRawDisk(path, { readOnly: o.readOnly ?? false, direct: o.direct ?? false, aio, lock: false });
    this.disk = new RawDisk(resource, true);
    this.io = this.disk.attach(this.loop, { depth: o.depth ?? 16, segMax: 8 }, {
      done: (req, result) => {
        if (this.onDone?.(req, result)) return;
        this.results.push({ id: req.id, result });
      },
      batchDone: () => this.batches++,
    });
  }

  /** Fills next()'s iovecs with `pieces` (guest buffers). */
  slot(pieces: Uint8Array[]): DiskRequest {
    const req = this.io.next();
    if (req === null) throw new Error("no free slot");
    req.iov.clear();
    for (const p of pieces) {
      req.iov.push(ptr(p), p.length);
      this.keep.push(p);
    }
    return req;
  }

  /** Submits, then waits for every operation in flight, through the loop (not drain()). */
  settle(): void {
    this.io.submit();
    const deadline = Date.now() + 5000;
    while (this.io.inFlight > 0) {
      if (Date.now() > deadline) throw new Error(`${this.io.inFlight} operations still in flight`);
      this.loop.runOnce(50);
    }
  }

  read(offset: number, pieces: Uint8Array[]): void {
    this.io.read(this.slot(pieces), offset, pieces.reduce((n, p) => n + p.length, 0));
  }

  write(offset: number, pieces: Uint8Array[], fua = false): void {
    this.io.write(this.slot(pieces), offset, pieces.reduce((n, p) => n + p.length, 0), fua);
  }

  /** The results since the last take, in completion order. */
  take(): number[] {
    const r = this.results.map((x) => x.result);
    this.results.length = 0;
    return r;
  }

  close(): void {
    this.io.close();
    this.disk.close();
    this.loop.dispose();
  }
}

/** Splits `n` bytes into `k` pieces of random sizes (each a multiple of 512 with O_DIRECT-friendly 4 KiB alignment off). */
function split(r: () => number, data: Uint8Array, k: number): Uint8Array[] {
  const cuts = new Set<number>();
  while (cuts.size < k - 1) cuts.add(1 + Math.floor(r() * (data.length - 1)));
  const sorted = [0, ...[...cuts].sort((a, b) => a - b), data.length];
  const out: Uint8Array[] = [];
  for (let i = 0; i + 1 < sorted.length; i++) out.push(data.slice(sorted[i], sorted[i + 1]));
  return out;
}

function openFds(): string[] {
  const out: string[] = [];
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      out.push(readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

const MODES: { name: string; aio: AioMode; direct: boolean }[] = [
  { name: "sync", aio: "sync", direct: false },
  { name: "io_uring", aio: "io_uring", direct: false },
  { name: "io_uring, O_DIRECT", aio: "io_uring", direct: true },
  { name: "sync, O_DIRECT", aio: "sync", direct: true },
  { name: "hybrid", aio: "hybrid", direct: false },
  { name: "hybrid, O_DIRECT", aio: "hybrid", direct: true },
];

for (const mode of MODES) {
  describe(`raw disk (${mode.name})`, () => {
    const rig = (path: string, o: { readOnly?: boolean; depth?: number } = {}) => new Rig(path, mode.aio, { ...o, direct: mode.direct });

    test("geometry and identity come from the fd", () => {
      const path = makeImage(3 * MiB + 512);
      const g = rig(path);
      try {
        const st = statSync(path);
        expect(g.disk.size).toBe(3 * MiB + 512);
        expect(g.disk.logicalBlockSize).toBe(512);
        expect(g.disk.physicalBlockSize & (g.disk.physicalBlockSize - 1)).toBe(0);
        expect(g.disk.physicalBlockSize).toBeGreaterThanOrEqual(512);
        expect(g.disk.readOnly).toBe(false);
        expect(g.disk.multiThread).toBe(true);
        expect(g.disk.identity()).toEqual({ location: path, size: 3 * MiB + 512, dev: st.dev, ino: st.ino });
        truncateSync(path, 4 * MiB);
        expect(g.disk.currentSize()).toBe(4 * MiB);
      } finally {
        g.close();
      }
    });

    test("random scattered reads and writes match a model, with FUA and flushes between", () => {
      const r = rng(7);
      const model = randomBytes(r, 4 * MiB);
      const path = makeImage(model);
      const g = rig(path);
      try {
        for (let round = 0; round < 20; round++) {
          const expected: number[] = [];
          const reads: { at: number; pieces: Uint8Array[] }[] = [];
          const writes = new Set<number>();
          // A batch of non-overlapping operations (4 KiB-aligned extents of 4-64 KiB).
          for (let k = 0; k < 8; k++) {
            const len = 4096 * (1 + Math.floor(r() * 16));
            const at = 4096 * Math.floor(r() * ((4 * MiB - len) / 4096));
            let clash = false;
            for (let b = at; b < at + len; b += 4096) if (writes.has(b)) clash = true;
            if (clash) continue;
            for (let b = at; b < at + len; b += 4096) writes.add(b);
            if (r() < 0.5) {
              const data = randomBytes(r, len);
              g.write(at, split(r, data, 1 + Math.floor(r() * 8)), r() < 0.3);
              model.set(data, at);
            } else {
              const pieces = split(r, new Uint8Array(len), 1 + Math.floor(r() * 8));
              g.read(at, pieces);
              reads.push({ at, pieces });
            }
            expected.push(len);
          }
          if (round % 4 === 3) {
            g.io.flush(g.io.next()!);
            expected.push(0);
          }
          g.settle();
          expect(g.take().sort((a, b) => a - b)).toEqual(expected.sort((a, b) => a - b));
          for (const { at, pieces } of reads) {
            const got = Buffer.concat(pieces);
            expect(Buffer.compare(got, model.subarray(at, at + got.length))).toBe(0);
          }
        }
        expect(Buffer.compare(readFileSync(path), model)).toBe(0);
      } finally {
        g.close();
      }
    });

    test("discard and write zeroes (with and without unmap, FUA, may-fail-fast) read back as zeroes", () => {
      const r = rng(8);
      const model = randomBytes(r, 2 * MiB);
      const path = makeImage(model);
      const g = rig(path);
      try {
        const ops: [number, number, number][] = [
          [0, 64 * 1024, ZERO_UNMAP],
          [128 * 1024, 4096, 0],
          [256 * 1024, 512 * 1024, ZERO_UNMAP | ZERO_FUA],
          [1 * MiB, 8192, ZERO_MAY_FAIL_FAST],
        ];
        for (const [at, len, flags] of ops) {
          g.io.writeZeroes(g.io.next()!, at, len, flags);
          model.fill(0, at, at + len);
        }
        g.io.discard(g.io.next()!, MiB + 64 * 1024, 64 * 1024); // a file: punched, reads back as zeroes
        model.fill(0, MiB + 64 * 1024, MiB + 128 * 1024);
        g.settle();
        expect(g.take()).toEqual([0, 0, 0, 0, 0]);
        expect(Buffer.compare(readFileSync(path), model)).toBe(0);
      } finally {
        g.close();
      }
    });

    test("errors are -errno, never a success: past the end of the file, a write to a read-only fd", () => {
      const path = makeImage(MiB);
      const g = rig(path);
      try {
        g.read(MiB - 4096, [new Uint8Array(8192)]); // half of it past the end
        g.settle();
        expect(g.take()).toEqual([-EIO]);
        // A short read that can finish is continued, not failed.
        const a = [new Uint8Array(1536), new Uint8Array(2560)];
        g.read(MiB - 4096, a);
        g.settle();
        expect(g.take()).toEqual([4096]);
      } finally {
        g.close();
      }
      const ro = rig(path, { readOnly: true });
      try {
        expect(ro.disk.readOnly).toBe(true);
        ro.write(0, [new Uint8Array(4096)]);
        ro.io.flush(ro.io.next()!); // nothing to make durable: succeeds
        ro.settle();
        expect(ro.take().sort((a, b) => a - b)).toEqual([-EBADF, 0]); // in any order
      } finally {
        ro.close();
      }
    });

    test("a request of several steps keeps its slot: done may start the next operation on it", () => {
      const r = rng(9);
      const model = randomBytes(r, MiB);
      const path = makeImage(model);
      const g = rig(path);
      try {
        const steps = new Map<number, number>();
        const data = randomBytes(r, 4096);
        g.onDone = (req, result) => {
          expect(result).toBeGreaterThanOrEqual(0);
          const left = steps.get(req.id) ?? 0;
          if (left === 0) return false;
          steps.set(req.id, left - 1);
          const at = 4096 * (10 + left);
          req.iov.clear();
          req.iov.push(ptr(data), data.length);
          g.io.write(req, at, 4096, false);
          model.set(data, at);
          return true;
        };
        const first = g.slot([data]);
        steps.set(first.id, 5);
        g.io.write(first, 4096 * 10, 4096, false);
        model.set(data, 4096 * 10);
        g.settle();
        expect(g.take()).toEqual([4096]); // one completion for the whole request
        expect(g.io.inFlight).toBe(0);
        expect(Buffer.compare(readFileSync(path), model)).toBe(0);
      } finally {
        g.close();
      }
    });

    test("at most `depth` operations in flight; next() answers null while full (never for sync, nor hybrid's small reads)", () => {
      const path = makeImage(MiB);
      const g = rig(path, { depth: 4 });
      try {
        let issued = 0;
        for (let i = 0; i < 8; i++) {
          const req = g.io.next();
          if (req === null) break;
          req.iov.clear();
          const b = new Uint8Array(4096);
          req.iov.push(ptr(b), b.length);
          g.io.read(req, i * 4096, 4096);
          issued++;
        }
        if (mode.aio !== "io_uring") expect(issued).toBe(8);
        else {
          expect(issued).toBe(4);
          expect(g.io.inFlight).toBe(4);
        }
        g.settle();
        expect(g.take()).toEqual(new Array(issued).fill(4096));
        expect(g.io.next()).not.toBeNull();
      } finally {
        g.close();
      }
    });
  });
}

describe("raw disk: completions and resources", () => {
  test("io_uring completions arrive from the loop and end with one batchDone; sync ones inside the call", () => {
    const path = makeImage(MiB);
    const u = new Rig(path, "io_uring");
    const s = new Rig(path, "sync");
    try {
      for (let i = 0; i < 4; i++) u.read(i * 4096, [new Uint8Array(4096)]);
      u.io.submit();
      const deadline = Date.now() + 5000;
      while (u.results.length + 0 < 4 && Date.now() < deadline) u.loop.runOnce(50);
      expect(u.take()).toEqual([4096, 4096, 4096, 4096]);
      s.read(0, [new Uint8Array(4096)]);
      expect(s.take()).toEqual([4096]); // before any submit or loop turn
      expect(s.batches).toBe(0);
    } finally {
      u.close();
      s.close();
    }
  });

  test("hybrid: reads of 64 KiB or more go to the ring, smaller reads and writes complete in their call; a FUA write's fdatasync goes to the ring, and a flush waits for it", () => {
    const model = randomBytes(rng(21), MiB);
    const path = makeImage(model);
    const g = new Rig(path, "hybrid");
    try {
      expect(g.disk.description).toContain("aio hybrid");
      const q = g.io as UringRawQueue;
      expect(q).toBeInstanceOf(UringRawQueue);
      const big = [new Uint8Array(40960), new Uint8Array(24576)]; // 64 KiB in two pieces
      g.read(128 * 1024, big);
      expect(q.transfersStarted).toBe(1);
      expect(g.io.inFlight).toBe(1);
      const small = [new Uint8Array(65536 - 512)];
      g.read(0, small);
      expect(g.results.length).toBe(1); // before any submit or loop turn
      const data = randomBytes(rng(22), 256 * 1024);
      g.write(512 * 1024, [data]);
      expect(g.results.length).toBe(2);
      expect(q.transfersStarted).toBe(1);
      // FUA: the data is written in the call; the fdatasync is in the ring, and completes from there.
      const fua = randomBytes(rng(23), 4096);
      g.write(8192, [fua], true);
      expect(g.results.length).toBe(2);
      expect(g.io.inFlight).toBe(2);
      expect(readFileSync(path).subarray(8192, 8192 + 4096)).toEqual(Buffer.from(fua));
      // A flush now waits for that write (its epoch) before its own fdatasync.
      g.io.flush(g.io.next()!);
      expect(g.io.inFlight).toBe(3);
      expect(q.transfersStarted).toBe(1); // syncs are not transfers
      g.settle();
      expect(g.take().sort((a, b) => a - b)).toEqual([0, 4096, 65024, 65536, 256 * 1024]);
      expect(Buffer.concat(big)).toEqual(Buffer.from(model.subarray(128 * 1024, 192 * 1024)));
      expect(Buffer.concat(small)).toEqual(Buffer.from(model.subarray(0, 65024)));
      model.set(data, 512 * 1024);
      model.set(fua, 8192);
      expect(Buffer.compare(readFileSync(path), model)).toBe(0);
    } finally {
      g.close();
    }
  });

  test("disks built from one resource share its fds; only the owner closes them", () => {
    const path = makeImage(MiB);
    const resource = acquireRawDisk(path, { readOnly: false, direct: true, aio: "sync", lock: false });
    const before = openFds().filter((l) => l === path).length;
    expect(before).toBeGreaterThanOrEqual(2); // the image and its buffered twin (O_DIRECT)
    const owner = new RawDisk(resource, true);
    const other: Disk = new RawDisk(resource, false);
    expect(openFds().filter((l) => l === path).length).toBe(before); // building opens nothing
    other.close();
    expect(openFds().filter((l) => l === path).length).toBe(before);
    expect(owner.currentSize()).toBe(MiB);
    owner.close();
    expect(openFds().filter((l) => l === path).length).toBe(before - 2);
  });
});
