// The block device serving qcow2 images, through the in-process front-end: the format detected
// from the header (or forced with --format, a raw image then never probed), requests of every type
// from two queues checked against a model, then `qemu-img check` clean and `qemu-img compare` equal.
import { test, expect, afterEach } from "bun:test";
import { writeFileSync, statSync, openSync, writeSync, closeSync } from "node:fs";
import { join } from "node:path";
import { Disk, disposeDisks, segment, SECTOR, type Pending } from "../support/block_disk.ts";
import { signal } from "../../ffi/eventfd.ts";
import { parseBlockOptions } from "../../devices/block/options.ts";
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from "../../devices/block/config.ts";
import { qemuImg, check, sameAsRaw, tempDir, cleanupDirs, rng, randomBytes } from "../support/qcow2.ts";

afterEach(async () => {
  await disposeDisks();
  cleanupDirs();
});

const MiB = 1 << 20;

test("--format: auto (default) and qcow2 accepted, anything else refused", () => {
  expect(parseBlockOptions({ file: "x" }).format).toBe("auto");
  expect(parseBlockOptions({ file: "x", format: "qcow2" }).format).toBe("qcow2");
  expect(() => parseBlockOptions({ file: "x", format: "vmdk" })).toThrow(/--format/);
});

for (const aio of ["sync", "io_uring", "hybrid"] as const) test(`a qcow2 image is detected and served (--aio ${aio}): capacity is the virtual size; every request type from two queues matches a model`, async () => {
  const dir = tempDir();
  const size = 16 * MiB;
  const base = randomBytes(rng(21), 12 * MiB);
  writeFileSync(join(dir, "base.raw"), base);
  const img = join(dir, "d.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384", "-b", "base.raw", "-F", "raw", img, String(size));
  const model = new Uint8Array(size);
  model.set(base);
  const d = await Disk.start({ file: img, "num-queues": "2", aio }, { queues: 2 });
  expect(Number(d.config(0, 8).getBigUint64(0, true))).toBe(size / SECTOR);

  const r = rng(22);
  for (let round = 0; round < 30; round++) {
    // Per round: a batch on each queue, ranges disjoint across the whole round.
    const used: [number, number][] = [];
    const pick = (maxSectors: number): [number, number] => {
      for (;;) {
        const n = 1 + Math.floor(r() * maxSectors);
        const s = Math.floor(r() * (size / SECTOR - n));
        if (!used.some(([a, b]) => s < b && a < s + n)) {
          used.push([s, s + n]);
          return [s, n];
        }
      }
    };
    const batches = [0, 1].map((qi) => {
      const q = d.q(qi);
      const items: { p: ReturnType<Disk["add"]>; want: Uint8Array | null }[] = [];
      for (let i = 0; i < 6; i++) {
        const k = r();
        if (k < 0.35) {
          const [s, n] = pick(160);
          const data = randomBytes(r, n * SECTOR);
          items.push({ p: d.add(q, { type: VIRTIO_BLK_T.OUT, sector: s, out: data, pieces: 3 }), want: null });
          model.set(data, s * SECTOR);
        } else if (k < 0.7) {
          const [s, n] = pick(160);
          items.push({ p: d.add(q, { type: VIRTIO_BLK_T.IN, sector: s, inLen: n * SECTOR, pieces: 2 }), want: model.slice(s * SECTOR, (s + n) * SECTOR) });
        } else if (k < 0.8) {
          const [s, n] = pick(256);
          items.push({ p: d.add(q, { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: s, out: segment(s, n, r() < 0.5 ? 1 : 0) }), want: null });
          model.fill(0, s * SECTOR, (s + n) * SECTOR);
        } else if (k < 0.9) {
          // Discard: whole 16 KiB clusters read back as zeroes (over a backing file too); the rest is unchanged.
          const [s, n] = pick(256);
          items.push({ p: d.add(q, { type: VIRTIO_BLK_T.DISCARD, sector: s, out: segment(s, n) }), want: null });
          const first = Math.ceil((s * SECTOR) / 16384) * 16384;
          const end = Math.floor(((s + n) * SECTOR) / 16384) * 16384;
          if (end > first) model.fill(0, first, end);
        } else {
          items.push({ p: d.add(q, { type: VIRTIO_BLK_T.FLUSH }), want: null });
        }
      }
      return { q, items };
    });
    for (const b of batches) signal(b.q.kick);
    for (const b of batches) {
      const results = await d.finish(b.q, b.items.map((i) => i.p));
      results.forEach((res, i) => {
        expect(res.status).toBe(VIRTIO_BLK_S.OK);
        const want = b.items[i]!.want;
        if (want) expect(Buffer.compare(Buffer.from(res.data), Buffer.from(want))).toBe(0);
      });
    }
    d.arena.reset();
  }
  await disposeDisks();
  const chk = check(img);
  expect(chk.corruptions).toBe(0);
  expect(chk.leaks).toBe(0);
  writeFileSync(join(dir, "model.raw"), model);
  expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
});

test("--format raw serves a qcow2 file as the raw bytes it holds (never probed)", async () => {
  const dir = tempDir();
  const img = join(dir, "r.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=full", img, String(MiB));
  const fileSize = statSync(img).size;
  const d = await Disk.start({ file: img, format: "raw" });
  expect(Number(d.config(0, 8).getBigUint64(0, true))).toBe(Math.floor(fileSize / SECTOR));
  const first = await d.read(0, 1);
  expect([...first.subarray(0, 4)]).toEqual([0x51, 0x46, 0x49, 0xfb]);
});

test("--format qcow2 on a raw file is refused at startup", async () => {
  const dir = tempDir();
  const img = join(dir, "raw.img");
  writeFileSync(img, new Uint8Array(MiB));
  await expect(Disk.start({ file: img, format: "qcow2" })).rejects.toThrow(/qcow2|magic/);
});

test("snapshot and restore on a qcow2 image: rings stopped mid-stream, state moved to a fresh backend on the same image, data intact", async () => {
  const dir = tempDir();
  const img = join(dir, "snap.qcow2");
  const size = 8 * MiB;
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, String(size));
  const model = new Uint8Array(size);
  const r = rng(31);
  const a = await Disk.start({ file: img }, { queues: 2 });
  const writes = Array.from({ length: 32 }, (_, i) => ({ sector: i * 200 + 3, data: randomBytes(r, 40 * SECTOR) }));
  for (const w of writes) model.set(w.data, w.sector * SECTOR);
  a.arena.reset();
  const tail: Pending[][] = [[], []];
  for (let i = 0; i < 16; i++) tail[i % 2]!.push(a.add(a.q(i % 2), { type: VIRTIO_BLK_T.OUT, sector: writes[i]!.sector, out: writes[i]!.data, pieces: 2 }));
  signal(a.q(0).kick);
  signal(a.q(1).kick);
  const bases = a.vmm.stopAll();
  // Made available on the stopped rings: served only by the new backend.
  for (let i = 16; i < 32; i++) tail[i % 2]!.push(a.add(a.q(i % 2), { type: VIRTIO_BLK_T.OUT, sector: writes[i]!.sector, out: writes[i]!.data, pieces: 2 }));
  const blob = await a.vmm.saveState();

  const b = await Disk.start({ file: img }, { activate: false, guest: a });
  b.vmm.handshake();
  b.vmm.setMemTable();
  expect(await b.vmm.loadState(blob)).toBe(0n);
  b.vmm.queues = a.vmm.queues;
  a.vmm.queues = [];
  for (const q of b.vmm.queues) b.vmm.startQueue(q, bases[q.index]!);
  const done = [...(await a.finish(b.q(0), tail[0]!)), ...(await a.finish(b.q(1), tail[1]!))];
  expect(done.length).toBe(32);
  expect(done.every((x) => x.status === VIRTIO_BLK_S.OK)).toBe(true);
  for (let s = 0; s < size / SECTOR; s += 2048) {
    expect(Buffer.compare(Buffer.from(await b.read(s, 2048)), Buffer.from(model.subarray(s * SECTOR, (s + 2048) * SECTOR)))).toBe(0);
  }
  await disposeDisks();
  const chk = check(img);
  expect(chk.corruptions).toBe(0);
  writeFileSync(join(dir, "model.raw"), model);
  expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
});

test("a hostile image through the device: requests touching a bad table fail with IOERR, the others are served", async () => {
  const dir = tempDir();
  const img = join(dir, "h.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", img, "2G");
  const f = Buffer.from(await Bun.file(img).arrayBuffer());
  const l1 = Number(f.readBigUInt64BE(40));
  // L1 entry 0 points to an L2 table far past the end of the file.
  const entry = Buffer.alloc(8);
  entry.writeBigUInt64BE((1n << 63n) | (1n << 40n));
  const fd = openSync(img, "r+");
  writeSync(fd, entry, 0, 8, l1);
  closeSync(fd);
  const d = await Disk.start({ file: img });
  const bad = await d.one({ type: VIRTIO_BLK_T.IN, sector: 0, inLen: 4096 });
  expect(bad.status).toBe(VIRTIO_BLK_S.IOERR);
  const badWrite = await d.one({ type: VIRTIO_BLK_T.OUT, sector: 8, out: new Uint8Array(4096).fill(1) });
  expect(badWrite.status).toBe(VIRTIO_BLK_S.IOERR);
  // Past the first 512 MiB (another L1 entry): served.
  const data = randomBytes(rng(51), 8192);
  await d.write((1 << 30) / SECTOR, data);
  expect(Buffer.compare(Buffer.from(await d.read((1 << 30) / SECTOR, 16)), Buffer.from(data))).toBe(0);
  await disposeDisks();
  expect(statSync(img).size).toBeLessThan(f.length + (4 << 20));
});
