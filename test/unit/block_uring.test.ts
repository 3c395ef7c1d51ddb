// The block device with --aio io_uring: many requests in flight per queue, completions in batches.
// Same front-end and helpers as block.test.ts; what is specific here: concurrency, flush ordering,
// stopping with requests in flight, and the synchronous fallback. No timing assertions.
import { describe, test, expect, afterEach } from "bun:test";
import { dlopen, ptr } from "bun:ffi";
import { readFileSync, readdirSync, readlinkSync, truncateSync } from "node:fs";
import { Req, configPayload } from "../support/frontend.ts";
import {
  SECTOR, IMAGE_BYTES, CAPACITY, rng, randomBytes, randomIo, makeImage, segment, Disk, disposeDisks, type Pending,
} from "../support/block_disk.ts";
import { signal } from "../../ffi/eventfd.ts";
import { ioUringUnavailable } from "../../devices/block/disk/uring_queue.ts";
import { acquireRawDisk, RawDisk } from "../../devices/block/disk/raw.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { parseBlockOptions } from "../../devices/block/options.ts";
import { acquireBlockDisk } from "../../devices/block/acquire.ts";
import { releaseDiskResource } from "../../devices/block/disk/open.ts";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "bun";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S,
} from "../../devices/block/config.ts";

afterEach(disposeDisks);

const URING = { aio: "io_uring" } as const;
const HYBRID = { aio: "hybrid" } as const;

/** io_uring instances open in this process (the backend's workers are threads of it). */
function ringFds(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === "anon_inode:[io_uring]") n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/** Workers read the process environment (libc's) when they start; process.env is this thread's copy. */
const libc = dlopen("libc.so.6", {
  setenv: { args: ["cstring", "cstring", "i32"], returns: "i32" },
  unsetenv: { args: ["cstring"], returns: "i32" },
});
const cstr = (s: string) => Buffer.from(s + "\0");

describe("block io_uring: options", () => {
  test("--aio defaults to io_uring with --direct and to sync otherwise; other values are refused", () => {
    expect(parseBlockOptions({ file: "x" }).aio).toBe("sync");
    expect(parseBlockOptions({ file: "x", aio: "hybrid" }).aio).toBe("hybrid");
    expect(parseBlockOptions({ file: "x", aio: "sync" }).aio).toBe("sync");
    expect(parseBlockOptions({ file: "x", direct: true, aio: "hybrid" }).aio).toBe("hybrid");
    expect(parseBlockOptions({ file: "x", direct: true }).aio).toBe("io_uring");
    expect(parseBlockOptions({ file: "x", direct: true, aio: "sync" }).aio).toBe("sync");
    expect(parseBlockOptions({ file: "x", aio: "io_uring" }).aio).toBe("io_uring");
    expect(() => parseBlockOptions({ file: "x", aio: "libaio" })).toThrow(/--aio/);
  });

  test("--direct does not pick io_uring for a qcow2 image (served through the page cache); an explicit --aio still holds", () => {
    const dir = mkdtempSync(join(tmpdir(), "uring-qcow2-"));
    try {
      const path = join(dir, "d.qcow2");
      const made = spawnSync(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"]);
      expect(made.exitCode).toBe(0);
      const aioOf = (extra: Record<string, unknown>) => {
        const resource = acquireBlockDisk(parseBlockOptions({ file: path, ...extra }));
        try {
          expect(resource.kind).toBe("qcow2");
          return (resource as { aio: string }).aio;
        } finally {
          releaseDiskResource(resource);
        }
      };
      expect(aioOf({ direct: true })).toBe("sync");
      expect(aioOf({ direct: true, aio: "io_uring" })).toBe("io_uring");
      expect(aioOf({})).toBe("sync");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("io_uring is available on this host (else the io_uring tests below test the fallback)", () => {
    expect(ioUringUnavailable()).toBeNull();
  });
});

describe("block io_uring: data integrity", () => {
  test("random reads, writes and flushes on two queues, in queue threads and in the device thread", async () => {
    expect(await randomIo(URING, 142, 20)).toBeGreaterThan(200);
    expect(await randomIo({ ...URING, threads: "0" }, 143, 10)).toBeGreaterThan(100);
  });

  test("--aio hybrid, in queue threads and in the device thread, and on tmpfs", async () => {
    expect(await randomIo(HYBRID, 144, 20)).toBeGreaterThan(200);
    expect(await randomIo({ ...HYBRID, threads: "0" }, 145, 10)).toBeGreaterThan(100);
    await randomIo(HYBRID, 146, 5, "/dev/shm");
  });

  test("O_DIRECT (io_uring by default), guest buffers aligned and misaligned", async () => {
    await randomIo({ direct: true }, 17, 10, undefined, true);
  });

  test("an image on tmpfs (reads are punted to io-wq there)", async () => {
    await randomIo(URING, 19, 5, "/dev/shm");
  });

  test("64 requests in flight at once: one kick, all complete with the right data", async () => {
    for (const options of [URING, { direct: true }]) {
      const r = rng(64);
      const initial = randomBytes(r, IMAGE_BYTES);
      const img = makeImage(initial);
      const d = await Disk.start({ file: img, "queue-size": "128", ...options }, { queueSize: 128 });
      const q = d.q();
      const model = initial.slice();
      d.arena.reset();
      // 32 writes of 64 KiB and 32 reads of other 64 KiB ranges, interleaved.
      const pending: Pending[] = [];
      const reads: [Pending, number][] = [];
      for (let i = 0; i < 64; i++) {
        const sector = i * 256;
        if (i % 2 === 0) {
          const data = randomBytes(r, 65536);
          model.set(data, sector * SECTOR);
          pending.push(d.add(q, { type: VIRTIO_BLK_T.OUT, sector, out: data, pieces: 4, indirect: true }));
        } else {
          const p = d.add(q, { type: VIRTIO_BLK_T.IN, sector, inLen: 65536, pieces: 3, indirect: true });
          pending.push(p);
          reads.push([p, sector]);
        }
      }
      signal(q.kick);
      const results = await d.finish(q, pending);
      expect(results.every((x) => x.status === VIRTIO_BLK_S.OK)).toBe(true);
      results.forEach((res, i) => {
        if (i % 2 === 1) {
          expect(res.usedLen).toBe(65537);
          expect(Buffer.compare(res.data, initial.subarray(i * 256 * SECTOR, i * 256 * SECTOR + 65536))).toBe(0);
        } else expect(res.usedLen).toBe(1);
      });
      expect(Buffer.compare(readFileSync(img), model)).toBe(0);
      await disposeDisks();
    }
  });

  test("writethrough: every write is made stable (fdatasync before completing) and reads back", async () => {
    const img = makeImage();
    const d = await Disk.start({ file: img, ...URING });
    expect(d.vmm.conn.ack(Req.SET_CONFIG, configPayload(32, 1, 0, new Uint8Array([0])))).toBe(0n);
    const r = rng(6);
    const writes = Array.from({ length: 16 }, (_, i) => ({ type: VIRTIO_BLK_T.OUT, sector: i * 100, out: randomBytes(r, 8192) }));
    const res = await d.run(writes);
    expect(res.every((x) => x.status === VIRTIO_BLK_S.OK)).toBe(true);
    const file = readFileSync(img);
    for (const w of writes) expect(Buffer.compare(file.subarray(w.sector * SECTOR, w.sector * SECTOR + 8192), w.out)).toBe(0);
  });
});

describe("block io_uring: ordering and stopping", () => {
  test("a FLUSH completes only after the writes made available before it", async () => {
    for (const options of [URING, { direct: true }]) {
      const img = makeImage();
      const d = await Disk.start({ file: img, ...options });
      const q = d.q();
      const r = rng(7);
      for (let round = 0; round < 4; round++) {
        d.arena.reset();
        const writes: Pending[] = [];
        for (let i = 0; i < 24; i++) writes.push(d.add(q, { type: VIRTIO_BLK_T.OUT, sector: i * 256 + round, out: randomBytes(r, 65536), pieces: 2 }));
        const flush = d.add(q, { type: VIRTIO_BLK_T.FLUSH });
        const after = d.add(q, { type: VIRTIO_BLK_T.IN, sector: 8000, inLen: 4096 });
        signal(q.kick);
        const used = await q.waitUsed(26);
        const order = used.map((u) => u.id);
        const flushAt = order.indexOf(flush.head);
        for (const w of writes) expect(order.indexOf(w.head)).toBeLessThan(flushAt);
        expect(order).toContain(after.head);
        const st = d.ram.bytes(flush.statusGpa!, 1)[0];
        expect(st).toBe(VIRTIO_BLK_S.OK);
      }
      await disposeDisks();
    }
  });

  test("stopping with requests in flight: GET_VRING_BASE answers after all complete and are published", async () => {
    for (const options of [URING, { direct: true }, { direct: true, threads: "0" }]) {
      const r = rng(8);
      const img = makeImage();
      const d = await Disk.start({ file: img, "num-queues": "2", ...options }, { queues: 2, queueSize: 128 });
      d.arena.reset();
      const writes: { q: number; sector: number; data: Uint8Array; p: Pending }[] = [];
      for (let i = 0; i < 96; i++) {
        const qi = i % 2;
        const sector = i * 128;
        const data = randomBytes(r, 65536);
        writes.push({ q: qi, sector, data, p: d.add(d.q(qi), { type: VIRTIO_BLK_T.OUT, sector, out: data, pieces: 2, indirect: true }) });
      }
      signal(d.q(0).kick);
      signal(d.q(1).kick);
      const bases = d.vmm.stopAll();
      // Every request the device took is complete and in the used ring by the time it answers.
      for (let qi = 0; qi < 2; qi++) expect(d.q(qi).usedIdx()).toBe(bases[qi]!);
      await Bun.sleep(20);
      for (let qi = 0; qi < 2; qi++) expect(d.q(qi).usedIdx()).toBe(bases[qi]!);
      const file = readFileSync(img);
      for (let qi = 0; qi < 2; qi++) {
        const used = d.q(qi).takeUsed();
        expect(used.length).toBe(bases[qi]!);
        const done = new Set(used.map((u) => u.id));
        for (const w of writes.filter((x) => x.q === qi && done.has(x.p.head))) {
          expect(d.ram.bytes(w.p.statusGpa!, 1)[0]).toBe(VIRTIO_BLK_S.OK);
          expect(Buffer.compare(file.subarray(w.sector * SECTOR, w.sector * SECTOR + 65536), w.data)).toBe(0);
        }
      }
      await disposeDisks();
    }
  });

  for (const [name, aio] of [["--aio io_uring", URING], ["--aio hybrid", HYBRID]] as const) test(`one ring per queue, set up with the device (acquire), kept across queue stops, released with the device (${name})`, async () => {
    const before = ringFds();
    const d = await Disk.start({ file: makeImage(), "num-queues": "2", ...aio }, { queues: 2 });
    expect(ringFds()).toBe(before + 2);
    await d.write(0, randomBytes(rng(1), 4096), 1);
    expect(ringFds()).toBe(before + 2);
    d.vmm.stopAll();
    expect(ringFds()).toBe(before + 2);
    await disposeDisks();
    expect(ringFds()).toBe(before);
  });
});

describe("block io_uring: checks still apply", () => {
  test("bounds, alignment, read-only, GET_ID, discard and write zeroes", async () => {
    const initial = randomBytes(rng(99), IMAGE_BYTES);
    const img = makeImage(initial);
    const d = await Disk.start({ file: img, ...URING, serial: "uring-disk" });
    const bad = [
      { type: VIRTIO_BLK_T.IN, sector: CAPACITY, inLen: SECTOR },
      { type: VIRTIO_BLK_T.OUT, sector: CAPACITY - 1, out: new Uint8Array(2 * SECTOR) },
      { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 100 },
      { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 8192, pieces: 200, indirect: true }, // > seg_max 126
    ];
    for (const req of bad) expect((await d.one(req)).status).toBe(VIRTIO_BLK_S.IOERR);
    const id = await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 20 });
    expect(Buffer.from(id.data).toString().replace(/\0+$/, "")).toBe("uring-disk");
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(0, 64) })).status).toBe(VIRTIO_BLK_S.OK);
    expect((await d.one({ type: VIRTIO_BLK_T.DISCARD, payload: segment(64, 64) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(0, 128)).toEqual(new Uint8Array(128 * SECTOR));
    expect(await d.read(128, 8)).toEqual(initial.subarray(128 * SECTOR, 136 * SECTOR));

    // Beside the writable one still serving: only without the image lock (it refuses a reader then).
    const ro = await Disk.start({ file: img, "read-only": true, direct: true, lock: false });
    expect((await ro.one({ type: VIRTIO_BLK_T.OUT, sector: 0, out: new Uint8Array(4096) })).status).toBe(VIRTIO_BLK_S.IOERR);
    expect((await ro.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await ro.read(128, 8)).toEqual(initial.subarray(128 * SECTOR, 136 * SECTOR));
  });
});

describe("block io_uring: the raw disk's queue alone", () => {
  test("a short read is continued, and one that cannot finish is an error, never a success", () => {
    const content = randomBytes(rng(12), 1 << 20);
    const path = makeImage(content);
    const disk = new RawDisk(acquireRawDisk(path, { readOnly: false, direct: false, aio: "io_uring", lock: false }), true);
    const loop = new EventLoop();
    const results: number[] = [];
    const io = disk.attach(loop, { depth: 8, segMax: 4 }, { done: (_req, result) => results.push(result), batchDone: () => {} });
    try {
      const read = (offset: number, pieces: Uint8Array[]) => {
        const req = io.next()!;
        req.iov.clear();
        for (const p of pieces) req.iov.push(ptr(p), p.length);
        io.read(req, offset, pieces.reduce((n, p) => n + p.length, 0));
      };
      const a = [new Uint8Array(1536), new Uint8Array(2560)];
      read((1 << 20) - 4096, a); // whole: fine
      io.submit();
      io.drain();
      truncateSync(path, (1 << 20) - 2048); // the image shrinks under us
      const b = [new Uint8Array(1024), new Uint8Array(3072)];
      read((1 << 20) - 4096, b); // 2048 bytes, then end of file
      io.submit();
      io.drain();
      expect(io.inFlight).toBe(0);
      expect(results.length).toBe(2);
      expect(results.filter((r) => r === 4096).length).toBe(1);
      expect(results.find((r) => r !== 4096)).toBe(-5); // EIO: end of file
      expect(Buffer.concat(a)).toEqual(Buffer.from(content.subarray((1 << 20) - 4096)));
    } finally {
      io.close();
      disk.close();
      loop.dispose();
    }
  });
});

describe("block io_uring: fallback", () => {
  for (const [name, aio] of [["--aio io_uring", URING], ["--aio hybrid", HYBRID]] as const) test(`without io_uring (simulated), ${name} serves synchronously`, async () => {
    const before = ringFds();
    // The rings are set up in acquire (this thread: process.env); queue threads read libc's environment.
    libc.symbols.setenv(cstr("BACKEND_NO_IO_URING"), cstr("1"), 1);
    process.env.BACKEND_NO_IO_URING = "1";
    let d: Disk;
    try {
      d = await Disk.start({ file: makeImage(), "num-queues": "2", ...aio }, { queues: 2 });
    } finally {
      libc.symbols.unsetenv(cstr("BACKEND_NO_IO_URING"));
      delete process.env.BACKEND_NO_IO_URING;
    }
    const data = randomBytes(rng(2), 65536);
    await d.write(10, data, 1);
    expect(await d.read(10, 128, 0)).toEqual(data);
    expect(ringFds()).toBe(before);
  });
});
