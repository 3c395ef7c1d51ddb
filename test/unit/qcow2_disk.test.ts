// The qcow2 Disk (devices/block/disk/qcow2/disk.ts): acquired as fds for the whole chain, built,
// served through a DiskQueue; errors as -errno; suspend/activate re-reads the metadata another
// program may have changed in between.
import { describe, test, expect, afterEach } from "bun:test";
import { ptr } from "bun:ffi";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { acquireQcow2Disk, openQcow2Disk, isQcow2File, type Qcow2Disk } from "../../devices/block/disk/qcow2/disk.ts";
import { Qcow2UringQueue } from "../../devices/block/disk/qcow2/uring_queue.ts";
import { ZERO_UNMAP, ZERO_MAY_FAIL_FAST, type DiskQueue, type DiskRequest } from "../../devices/block/disk/disk.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { qemuImg, qemuIo, check, sameAsRaw, tempDir, cleanupDirs, rng, randomBytes, firstDiff } from "../support/qcow2.ts";

afterEach(cleanupDirs);

class Harness {
  readonly results: number[] = [];
  readonly loop = new EventLoop();
  readonly q: DiskQueue;
  constructor(disk: Qcow2Disk) {
    this.q = disk.attach(this.loop, { depth: 4, segMax: 8 }, { done: (_r, res) => this.results.push(res), batchDone: () => {} });
  }
  /** Runs one operation on a two-segment buffer; returns its result. */
  op(kind: "read" | "write", offset: number, buf: Uint8Array): number {
    const req = this.q.next()!;
    req.iov.clear();
    const half = Math.floor(buf.length / 1024) * 512;
    req.iov.push(ptr(buf), half);
    req.iov.push(ptr(buf) + half, buf.length - half);
    if (kind === "read") this.q.read(req, offset, buf.length);
    else this.q.write(req, offset, buf.length, false);
    return this.results.pop()!;
  }
  plain(fn: (q: DiskQueue) => void): number {
    fn(this.q);
    return this.results.pop()!;
  }
  dispose(): void {
    this.q.close();
    this.loop.dispose();
  }
}

test("a qcow2 overlay through the Disk interface: reads, writes, flush, discard, write-zeroes, errors as -errno", () => {
  const dir = tempDir();
  const size = 8 << 20;
  const base = randomBytes(rng(11), size);
  writeFileSync(join(dir, "base.raw"), base);
  const img = join(dir, "top.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", img);
  expect(isQcow2File(img)).toBe(true);
  expect(isQcow2File(join(dir, "base.raw"))).toBe(false);
  const res = acquireQcow2Disk(img, { readOnly: false, lock: true });
  expect(res.chain.map((l) => l.format)).toEqual(["qcow2", "raw"]);
  const disk = openQcow2Disk(res, true);
  disk.activate();
  // Locked as QEMU locks a guest disk and its backing file: QEMU can write neither meanwhile.
  expect(Bun.spawnSync(["qemu-io", "-c", "write 0 512", img]).exitCode).not.toBe(0);
  expect(Bun.spawnSync(["qemu-io", "-f", "raw", "-c", "write 0 512", join(dir, "base.raw")]).exitCode).not.toBe(0);
  expect(disk.size).toBe(size);
  expect(disk.multiThread).toBe(false);
  expect(disk.description).toContain("backing chain of 1");
  expect(disk.identity().location).toBe(img);
  const h = new Harness(disk);
  const model = base.slice();

  const buf = new Uint8Array(12288);
  expect(h.op("read", 4096, buf)).toBe(12288);
  expect(firstDiff(buf, model.subarray(4096, 4096 + 12288))).toBe(-1);
  const data = randomBytes(rng(12), 10240);
  expect(h.op("write", 6144, data)).toBe(10240);
  model.set(data, 6144);
  expect(h.plain((q) => q.flush(q.next()!))).toBe(0);
  expect(h.plain((q) => q.discard(q.next()!, 65536, 8192))).toBe(0);
  model.fill(0, 65536, 65536 + 8192);
  expect(h.plain((q) => q.writeZeroes(q.next()!, 131072 + 512, 1024, ZERO_UNMAP))).toBe(0);
  model.fill(0, 131072 + 512, 131072 + 1536);
  // A partial cluster is not a metadata-only zeroing: refused when the caller asked for fast zeroes only.
  expect(h.plain((q) => q.writeZeroes(q.next()!, 512, 1024, ZERO_MAY_FAIL_FAST))).toBe(-95);
  expect(h.plain((q) => q.writeZeroes(q.next()!, 4096 * 40, 4096 * 3, ZERO_MAY_FAIL_FAST | ZERO_UNMAP))).toBe(0);
  model.fill(0, 4096 * 40, 4096 * 43);
  // Past the end: -EINVAL, and the queue keeps serving.
  expect(h.op("read", size - 512, new Uint8Array(1024))).toBe(-22);
  const all = new Uint8Array(size);
  expect(h.op("read", 0, all)).toBe(size);
  expect(firstDiff(all, model)).toBe(-1);
  h.dispose();
  disk.close();
  expect(check(img).corruptions).toBe(0);
  writeFileSync(join(dir, "model.raw"), model);
  expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
});

test("suspend flushes the metadata; activate re-reads what another program wrote meanwhile (--no-lock)", () => {
  const dir = tempDir();
  const img = join(dir, "m.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", img, "4M");
  const disk = openQcow2Disk(acquireQcow2Disk(img, { readOnly: false, lock: false }), true);
  disk.activate();
  const h = new Harness(disk);
  expect(h.op("write", 0, new Uint8Array(65536).fill(0x61))).toBe(65536);
  disk.suspend();
  // The metadata is on disk: QEMU sees our write, and writes one of its own.
  qemuIo("-c", "read -P 0x61 0 64k", "-c", "write -P 0x62 1M 64k", img);
  disk.activate();
  const b = new Uint8Array(65536);
  expect(h.op("read", 1 << 20, b)).toBe(65536);
  expect(b).toEqual(new Uint8Array(65536).fill(0x62));
  expect(h.op("write", 2 << 20, new Uint8Array(4096).fill(0x63))).toBe(4096);
  h.dispose();
  disk.close();
  const chk = check(img);
  expect(chk.corruptions).toBe(0);
  expect(chk.leaks).toBe(0);
});

test("two of our backends on one qcow2 image hand it over as a migration does: the destination writes nothing until the source let go", () => {
  const dir = tempDir();
  const img = join(dir, "mig.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M");
  const src = openQcow2Disk(acquireQcow2Disk(img, { readOnly: false, lock: true }), true);
  src.activate();
  const hs = new Harness(src);
  expect(hs.op("write", 0, new Uint8Array(8192).fill(0x71))).toBe(8192);
  // The destination opens the image while the source serves: it waits, and cannot take over yet.
  const res = acquireQcow2Disk(img, { readOnly: false, lock: true });
  expect(res.chain[0]!.lock).toBe("waiting");
  const dst = openQcow2Disk(res, true);
  expect(() => dst.activate()).toThrow(/in use/);
  expect(hs.op("write", 1 << 20, new Uint8Array(8192).fill(0x72))).toBe(8192);
  src.suspend();
  dst.activate();
  const hd = new Harness(dst);
  const b = new Uint8Array(8192);
  expect(hd.op("read", 1 << 20, b)).toBe(8192);
  expect(b).toEqual(new Uint8Array(8192).fill(0x72));
  expect(hd.op("write", 2 << 20, new Uint8Array(8192).fill(0x73))).toBe(8192);
  hd.dispose();
  dst.close();
  hs.dispose();
  src.close();
  const chk = check(img);
  expect(chk.corruptions).toBe(0);
  expect(chk.leaks).toBe(0);
});

test("acquire refuses a broken image or a missing backing file at startup, naming the file", () => {
  const dir = tempDir();
  const img = join(dir, "o.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", img, "4M");
  expect(() => acquireQcow2Disk(img, { readOnly: false, lock: true })).toThrow(/o\.qcow2.*gone\.raw|ENOENT/);
  writeFileSync(join(dir, "bad.qcow2"), Buffer.concat([Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 9]), Buffer.alloc(1000)]));
  expect(() => acquireQcow2Disk(join(dir, "bad.qcow2"), { readOnly: false, lock: true })).toThrow(/bad\.qcow2: unsupported qcow2 version 9/);
});

for (const aio of ["io_uring", "hybrid"] as const) describe(`--aio ${aio}: reads and in-place writes of data clusters in flight together`, () => {
  for (const kind of ["preallocated", "empty over a backing file"] as const) {
    test(kind, () => {
      const dir = tempDir();
      const size = 16 << 20;
      const img = join(dir, "u.qcow2");
      const model = new Uint8Array(size);
      if (kind === "preallocated") {
        qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,preallocation=metadata", img, String(size));
      } else {
        const base = randomBytes(rng(41), size);
        writeFileSync(join(dir, "base.raw"), base);
        model.set(base);
        qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384", "-b", "base.raw", "-F", "raw", img);
      }
      const disk = openQcow2Disk(acquireQcow2Disk(img, { readOnly: false, lock: true, aio }), true);
      disk.activate();
      expect(disk.description).toContain(`aio ${aio}`);
      const loop = new EventLoop();
      // A slot completed inside its call is free again at once: results are counted, not keyed by slot.
      const results: number[] = [];
      const q = disk.attach(loop, { depth: 32, segMax: 8 }, { done: (_req, res) => void results.push(res), batchDone: () => {} }) as Qcow2UringQueue;
      expect(q).toBeInstanceOf(Qcow2UringQueue);
      const r = rng(42);
      let largeReads = 0;
      for (let round = 0; round < 40; round++) {
        // Up to 24 requests in flight on disjoint ranges; checked once all are done.
        const used: [number, number][] = [];
        const reads: { buf: Uint8Array; want: Uint8Array }[] = [];
        const keep: Uint8Array[] = [];
        results.length = 0;
        let issued = 0;
        for (let i = 0; i < 24; i++) {
          // Mostly up to 16 KiB; one in four 64-256 KiB (what hybrid hands to the ring when read).
          const len = (r() < 0.25 ? 128 + Math.floor(r() * 385) : 1 + Math.floor(r() * 32)) * 512;
          const off = Math.floor((r() * (size - len)) / 512) * 512;
          if (used.some(([a, b]) => off < b && a < off + len)) continue;
          used.push([off, off + len]);
          const req = q.next()!;
          req.iov.clear();
          const k = r();
          if (k < 0.45) {
            const buf = new Uint8Array(len);
            req.iov.push(ptr(buf), len);
            reads.push({ buf, want: model.slice(off, off + len) });
            keep.push(buf);
            if (len >= 65536) largeReads++;
            q.read(req, off, len);
          } else if (k < 0.9) {
            const data = randomBytes(r, len);
            keep.push(data);
            req.iov.push(ptr(data), len);
            model.set(data, off);
            q.write(req, off, len, false);
          } else if (k < 0.95) {
            q.flush(req);
          } else {
            q.writeZeroes(req, off, len, ZERO_UNMAP);
            model.fill(0, off, off + len);
          }
          issued++;
        }
        q.submit();
        for (let spins = 0; q.inFlight > 0 && spins < 1000; spins++) loop.runOnce(50);
        expect(q.inFlight).toBe(0);
        expect(results.length).toBe(issued);
        expect(results.filter((x) => x < 0)).toEqual([]);
        for (const rd of reads) expect(firstDiff(rd.buf, rd.want)).toBe(-1);
        void keep;
      }
      if (aio === "io_uring") expect(q.transfersStarted).toBeGreaterThan(100);
      else {
        // Only large reads of data clusters went to the ring (the empty overlay's unwritten ones
        // read the backing file, in the call).
        expect(q.transfersStarted).toBeLessThanOrEqual(largeReads);
        expect(q.transfersStarted).toBeGreaterThan(kind === "preallocated" ? largeReads / 2 : 0);
      }
      q.close();
      loop.dispose();
      disk.close();
      const chk = check(img);
      expect(chk.corruptions).toBe(0);
      expect(chk.leaks).toBe(0);
      writeFileSync(join(dir, "model.raw"), model);
      expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
    });
  }
});

describe("--aio hybrid: large reads go to the ring, small reads and writes run in their call", () => {
  /** A preallocated image (every cluster holds data, contiguous) with known content, and a queue over it. */
  function rig(aio: "io_uring" | "hybrid") {
    const dir = tempDir();
    const size = 4 << 20;
    const img = join(dir, "h.qcow2");
    const model = randomBytes(rng(77), size);
    writeFileSync(join(dir, "content.raw"), model);
    qemuImg("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536,preallocation=metadata", join(dir, "content.raw"), img);
    const disk = openQcow2Disk(acquireQcow2Disk(img, { readOnly: false, lock: true, aio }), true);
    disk.activate();
    const loop = new EventLoop();
    const results: number[] = [];
    const q = disk.attach(loop, { depth: 8, segMax: 8 }, { done: (_r, res) => void results.push(res), batchDone: () => {} }) as Qcow2UringQueue;
    const start = (op: (req: DiskRequest) => void, buf: Uint8Array) => {
      const req = q.next()!;
      req.iov.clear();
      req.iov.push(ptr(buf), buf.length);
      op(req);
    };
    const settle = () => {
      q.submit();
      for (let spins = 0; q.inFlight > 0 && spins < 1000; spins++) loop.runOnce(50);
      expect(q.inFlight).toBe(0);
    };
    const dispose = () => {
      q.close();
      loop.dispose();
      disk.close();
      expect(check(img).corruptions).toBe(0);
    };
    return { disk, q, model, results, start, settle, dispose };
  }

  test("where each request runs, counted: hybrid against io_uring on the same requests", () => {
    for (const aio of ["hybrid", "io_uring"] as const) {
      const { q, model, results, start, settle, dispose } = rig(aio);
      expect(q).toBeInstanceOf(Qcow2UringQueue);
      const big = new Uint8Array(128 << 10);
      start((req) => q.read(req, 1 << 20, big.length), big);
      expect(q.transfersStarted).toBe(1); // both: into the ring
      expect(q.inFlight).toBe(1);
      expect(results.length).toBe(0);
      const small = new Uint8Array(4096);
      start((req) => q.read(req, 8192, small.length), small);
      const bigWrite = randomBytes(rng(78), 128 << 10);
      start((req) => q.write(req, 2 << 20, bigWrite.length, false), bigWrite);
      const smallWrite = randomBytes(rng(79), 4096);
      start((req) => q.write(req, 3 << 20, smallWrite.length, false), smallWrite);
      if (aio === "hybrid") {
        // Completed inside their calls, before any submit; the large read still in the ring.
        expect(q.transfersStarted).toBe(1);
        expect(results).toEqual([4096, 128 << 10, 4096]);
        expect(q.inFlight).toBe(1);
      } else {
        expect(q.transfersStarted).toBe(4);
      }
      // Exactly ASYNC_READ_MIN goes to the ring; one sector less does not (hybrid).
      const edge = new Uint8Array(65536);
      start((req) => q.read(req, 512 << 10, edge.length), edge);
      const under = new Uint8Array(65536 - 512);
      start((req) => q.read(req, 768 << 10, under.length), under);
      expect(q.transfersStarted).toBe(aio === "hybrid" ? 2 : 6);
      settle();
      expect(results.length).toBe(6);
      expect(results.filter((x) => x < 0)).toEqual([]);
      expect(firstDiff(big, model.subarray(1 << 20, (1 << 20) + big.length))).toBe(-1);
      expect(firstDiff(small, model.subarray(8192, 8192 + 4096))).toBe(-1);
      expect(firstDiff(edge, model.subarray(512 << 10, (512 << 10) + 65536))).toBe(-1);
      expect(firstDiff(under, model.subarray(768 << 10, (768 << 10) + under.length))).toBe(-1);
      // The writes landed: read back (large, so through the ring).
      const back = new Uint8Array(128 << 10);
      start((req) => q.read(req, 2 << 20, back.length), back);
      settle();
      expect(firstDiff(back, bigWrite)).toBe(-1);
      dispose();
    }
  });

  test("a flush while a large read is in the ring frees nothing; one after it does", () => {
    const { q, disk, results, start, settle, dispose } = rig("hybrid");
    const big = new Uint8Array(256 << 10);
    start((req) => q.read(req, 0, big.length), big);
    expect(q.transfersInFlight).toBe(1);
    // A discard frees clusters on the next flush, not while a transfer could still land in one.
    start((req) => q.discard(req, 1 << 20, 256 << 10), new Uint8Array(0));
    start((req) => q.flush(req), new Uint8Array(0));
    expect(results).toEqual([0, 0]);
    expect(q.transfersInFlight).toBe(1); // the discard and flush ran in their calls
    const pendingFrees = () => (disk as unknown as { image: { pendingFrees: number[] } }).image.pendingFrees.length;
    expect(pendingFrees()).toBe(4); // four 64 KiB clusters, kept until no transfer is in flight
    settle();
    expect(q.transfersInFlight).toBe(0);
    start((req) => q.flush(req), new Uint8Array(0));
    expect(pendingFrees()).toBe(0);
    dispose();
  });

  test("without io_uring (simulated), hybrid serves synchronously, with one warning", () => {
    process.env.BACKEND_NO_IO_URING = "1";
    let res;
    try {
      res = acquireQcow2Disk(join(tempDir(), "x.qcow2"), { readOnly: false, lock: false, aio: "hybrid" });
    } catch {
      res = null;
    }
    expect(res).toBeNull(); // no such file: the image is checked before any ring
    const dir = tempDir();
    const img = join(dir, "f.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", img, "1M");
    try {
      res = acquireQcow2Disk(img, { readOnly: false, lock: false, aio: "hybrid" });
    } finally {
      delete process.env.BACKEND_NO_IO_URING;
    }
    expect(res.aio).toBe("sync");
    expect(res.rings).toEqual([]);
    const disk = openQcow2Disk(res, true);
    expect(disk.description).toContain("aio sync");
    const h = new Harness(disk);
    expect(h.q).not.toBeInstanceOf(Qcow2UringQueue);
    const data = randomBytes(rng(5), 128 << 10);
    expect(h.op("write", 0, data)).toBe(128 << 10);
    const back = new Uint8Array(128 << 10);
    expect(h.op("read", 0, back)).toBe(128 << 10);
    expect(firstDiff(back, data)).toBe(-1);
    h.dispose();
    disk.close();
  });
});
