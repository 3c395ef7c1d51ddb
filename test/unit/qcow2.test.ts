// The qcow2 engine against qemu-img and qemu-io (an independent implementation): every request type
// mirrored into an in-memory model and compared as it goes, then `qemu-img check` clean and
// `qemu-img compare` identical to the model written as a raw file, and backing files unchanged.
import { describe, test, expect, afterEach } from "bun:test";
import { writeFileSync, readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import {
  qemuImg, qemuIo, check, sameAsRaw, tempDir, cleanupDirs, sha, open, readAt, writeAt, firstDiff,
  rng, randomBytes, ops, applyToModel, applyToImage,
} from "../support/qcow2.ts";

afterEach(cleanupDirs);

interface Case {
  name: string;
  cluster: number;
  refcountBits?: number;
  compat?: "0.10" | "1.1";
  backing?: "raw" | "qcow2" | null;
  prealloc?: "metadata" | "off";
  size: number;
  ops: number;
}

const CASES: Case[] = [
  { name: "v3, 64 KiB clusters, no backing", cluster: 65536, size: 16 << 20, ops: 400 },
  { name: "v3, 4 KiB clusters, 1-bit refcounts, raw backing", cluster: 4096, refcountBits: 1, backing: "raw", size: 8 << 20, ops: 400 },
  { name: "v3, 2 MiB clusters, 64-bit refcounts, qcow2 backing", cluster: 2 << 20, refcountBits: 64, backing: "qcow2", size: 24 << 20, ops: 120 },
  { name: "v3, 512 B clusters, 64-bit refcounts (the refcount table grows)", cluster: 512, refcountBits: 64, size: 4 << 20, ops: 400 },
  { name: "v3, 4 KiB clusters, 16-bit refcounts, preallocated metadata", cluster: 4096, refcountBits: 16, prealloc: "metadata", size: 8 << 20, ops: 300 },
  { name: "v2 (compat 0.10), 64 KiB clusters, raw backing", cluster: 65536, compat: "0.10", backing: "raw", size: 8 << 20, ops: 300 },
  { name: "v2 (compat 0.10), 4 KiB clusters, no backing", cluster: 4096, compat: "0.10", size: 8 << 20, ops: 300 },
];

function makeBacking(dir: string, kind: "raw" | "qcow2", size: number, seed: number): { path: string; content: Uint8Array } {
  // The backing file is smaller than the overlay: reads past its end must be zeroes.
  const bsize = size - 3 * 65536 - 4096;
  const content = randomBytes(rng(seed), bsize);
  const raw = join(dir, "base.raw");
  writeFileSync(raw, content);
  if (kind === "raw") return { path: raw, content };
  const q = join(dir, "base.qcow2");
  qemuImg("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, q);
  return { path: q, content };
}

describe("qcow2 engine vs qemu-img: random requests mirrored into a model", () => {
  for (const c of CASES) {
    test(c.name, () => {
      const dir = tempDir();
      const img = join(dir, "disk.qcow2");
      const model = new Uint8Array(c.size);
      let backingPath: string | null = null;
      const opts = [`cluster_size=${c.cluster}`, `compat=${c.compat ?? "1.1"}`];
      if (c.refcountBits) opts.push(`refcount_bits=${c.refcountBits}`);
      if (c.prealloc) opts.push(`preallocation=${c.prealloc}`);
      const args = ["create", "-q", "-f", "qcow2", "-o", opts.join(",")];
      if (c.backing) {
        const b = makeBacking(dir, c.backing, c.size, 7);
        backingPath = b.path;
        model.set(b.content);
        args.push("-b", b.path, "-F", c.backing);
      }
      qemuImg(...args, img, String(c.size));
      const backingHash = backingPath && sha(backingPath);
      // Some data written by QEMU first, so we also meet clusters it allocated.
      qemuIo("-c", `write -P 0x5c ${c.cluster} ${c.cluster * 2}`, "-c", "write -P 0xa5 1M 4k", img);
      model.fill(0x5c, c.cluster, c.cluster * 3);
      model.fill(0xa5, 1 << 20, (1 << 20) + 4096);

      const discardZeroes = !(c.compat === "0.10" && c.backing);
      let disk = open(img);
      let n = 0;
      for (const op of ops(c.cluster + c.size, c.size, c.cluster)) {
        if (n++ >= c.ops) break;
        const got = applyToImage(disk, op);
        applyToModel(model, op, c.cluster, discardZeroes);
        if (got !== null && op.op === "read") {
          const want = model.subarray(op.offset, op.offset + op.len);
          const at = firstDiff(got, want);
          if (at >= 0) throw new Error(`op ${n}: read [${op.offset}, +${op.len}) differs at +${at}: ${got[at]} != ${want[at]}`);
        }
        if (n === Math.floor(c.ops / 2)) {
          // Close and reopen half way: what is on disk must be what we had in memory.
          disk.close();
          disk = open(img);
        }
      }
      const whole = readAt(disk, 0, c.size);
      expect(firstDiff(whole, model)).toBe(-1);
      disk.close();

      const chk = check(img);
      expect(chk.corruptions).toBe(0);
      expect(chk.checkErrors).toBe(0);
      expect(chk.leaks).toBe(0);
      const raw = join(dir, "model.raw");
      writeFileSync(raw, model);
      expect(sameAsRaw(img, raw)).toBe(true);
      if (backingPath) expect(sha(backingPath)).toBe(backingHash!);
    }, 120_000);
  }
});

describe("every refcount width", () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    test(`${bits}-bit refcounts, 1 KiB clusters${bits > 1 ? ", an internal snapshot (shared clusters)" : ""}`, () => {
      const dir = tempDir();
      const img = join(dir, "w.qcow2");
      const size = 4 << 20;
      qemuImg("create", "-q", "-f", "qcow2", "-o", `cluster_size=1024,refcount_bits=${bits}`, img, String(size));
      qemuIo("-c", "write -P 0x3c 0 256k", img);
      const model = new Uint8Array(size).fill(0x3c, 0, 256 * 1024);
      // A snapshot needs refcounts of 2: 1-bit refcounts cannot hold them (QEMU refuses it too).
      if (bits > 1) qemuImg("snapshot", "-c", "s1", img);
      const disk = open(img);
      let n = 0;
      for (const op of ops(bits, size, 1024)) {
        if (n++ >= 200) break;
        const got = applyToImage(disk, op);
        applyToModel(model, op, 1024, true);
        if (got !== null && op.op === "read") expect(firstDiff(got, model.subarray(op.offset, op.offset + op.len))).toBe(-1);
      }
      disk.close();
      const chk = check(img);
      expect(chk.corruptions).toBe(0);
      expect(chk.leaks).toBe(0);
      writeFileSync(join(dir, "model.raw"), model);
      expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
    });
  }
});

describe("qcow2 images QEMU made", () => {
  test("a chain of three: raw base, qcow2 middle, qcow2 top; relative names; writes stay in the top", () => {
    const dir = tempDir();
    const size = 4 << 20;
    const base = randomBytes(rng(1), size);
    writeFileSync(join(dir, "base.raw"), base);
    qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", join(dir, "mid.qcow2"));
    qemuIo("-c", "write -P 0x11 64k 128k", join(dir, "mid.qcow2"));
    // No backing format recorded for the top: the middle is probed.
    qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", join(dir, "top.qcow2"));
    qemuIo("-c", "write -P 0x22 128k 8k", join(dir, "top.qcow2"));
    const hashes = [sha(join(dir, "base.raw")), sha(join(dir, "mid.qcow2"))];
    const model = base.slice();
    model.fill(0x11, 65536, 65536 + 131072);
    model.fill(0x22, 131072, 131072 + 8192);
    const disk = open(join(dir, "top.qcow2"));
    expect(firstDiff(readAt(disk, 0, size), model)).toBe(-1);
    const data = randomBytes(rng(2), 100_000 - (100_000 % 512));
    writeAt(disk, 70_000 - (70_000 % 512), data);
    model.set(data, 70_000 - (70_000 % 512));
    disk.close();
    writeFileSync(join(dir, "model.raw"), model);
    expect(sameAsRaw(join(dir, "top.qcow2"), join(dir, "model.raw"))).toBe(true);
    expect(check(join(dir, "top.qcow2")).corruptions).toBe(0);
    expect([sha(join(dir, "base.raw")), sha(join(dir, "mid.qcow2"))]).toEqual(hashes);
  });

  for (const type of ["zlib", "zstd"] as const) {
    test(`a compressed image (${type}) reads whole, and writes over compressed clusters copy them`, () => {
      const dir = tempDir();
      const size = 3 << 20;
      const r = rng(3);
      const content = new Uint8Array(size);
      // Compressible stretches, random ones (stored uncompressed), zeroes.
      for (let o = 0; o < size; o += 65536) {
        const k = (o / 65536) % 3;
        if (k === 0) content.set(new TextEncoder().encode(`cluster ${o} `.repeat(65536 / 16)).subarray(0, 65536), o);
        else if (k === 1) content.set(randomBytes(r, 65536), o);
      }
      writeFileSync(join(dir, "src.raw"), content);
      const img = join(dir, "c.qcow2");
      qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", `compression_type=${type}`, join(dir, "src.raw"), img);
      const disk = open(img);
      expect(firstDiff(readAt(disk, 0, size), content)).toBe(-1);
      // Partial writes into compressed clusters, then a discard of one.
      const model = content.slice();
      for (const [off, len] of [[512, 1024], [65536 * 3 + 4096, 70000 - (70000 % 512)], [65536 * 9, 65536]] as const) {
        const d = randomBytes(r, len);
        writeAt(disk, off, d);
        model.set(d, off);
      }
      disk.discard(65536 * 6, 65536);
      model.fill(0, 65536 * 6, 65536 * 7);
      expect(firstDiff(readAt(disk, 0, size), model)).toBe(-1);
      disk.close();
      const chk = check(img);
      expect(chk.corruptions).toBe(0);
      expect(chk.leaks).toBe(0);
      writeFileSync(join(dir, "model.raw"), model);
      expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
    });
  }

  test("internal snapshots stay intact: shared clusters and L2 tables are copied, not overwritten", () => {
    const dir = tempDir();
    const img = join(dir, "s.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M");
    qemuIo("-c", "write -P 0x31 0 1M", img);
    qemuImg("snapshot", "-c", "snap1", img);
    const disk = open(img);
    const model = new Uint8Array(4 << 20).fill(0x31, 0, 1 << 20);
    const d = randomBytes(rng(4), 300 * 1024);
    writeAt(disk, 4096 * 10 + 512, d);
    model.set(d, 4096 * 10 + 512);
    disk.writeZeroes(512 * 1024, 64 * 1024, true);
    model.fill(0, 512 * 1024, 576 * 1024);
    disk.discard(768 * 1024, 64 * 1024);
    model.fill(0, 768 * 1024, 832 * 1024);
    disk.close();
    const chk = check(img);
    expect(chk.corruptions).toBe(0);
    expect(chk.leaks).toBe(0);
    writeFileSync(join(dir, "model.raw"), model);
    expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
    // The snapshot still reads as it was taken.
    qemuImg("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=snap1", img, join(dir, "snap.raw"));
    const snap = readFileSync(join(dir, "snap.raw"));
    expect(firstDiff(new Uint8Array(snap), new Uint8Array(4 << 20).fill(0x31, 0, 1 << 20))).toBe(-1);
  });

  test("a dirty image with lazy refcounts (QEMU killed mid-run) is repaired on open", () => {
    const dir = tempDir();
    const img = join(dir, "lazy.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", img, "8M");
    // qemu-io's abort leaves the dirty bit set and refcounts stale.
    const r = Bun.spawnSync(["qemu-io", "-c", "write -P 0x77 0 2M", "-c", "write -P 0x78 4M 64k", "-c", "abort", img]);
    expect(r.exitCode).not.toBe(0);
    const hdr = readFileSync(img);
    expect(hdr.readBigUInt64BE(72) & 1n).toBe(1n);
    expect(check(img).corruptions).toBeGreaterThan(0);
    const disk = open(img);
    const model = new Uint8Array(8 << 20).fill(0x77, 0, 2 << 20).fill(0x78, 4 << 20, (4 << 20) + 65536);
    const d = randomBytes(rng(5), 40960);
    writeAt(disk, 6 << 20, d);
    model.set(d, 6 << 20);
    expect(firstDiff(readAt(disk, 0, 8 << 20), model)).toBe(-1);
    disk.close();
    expect(readFileSync(img).readBigUInt64BE(72) & 1n).toBe(0n);
    const chk = check(img);
    expect(chk.corruptions).toBe(0);
    writeFileSync(join(dir, "model.raw"), model);
    expect(sameAsRaw(img, join(dir, "model.raw"))).toBe(true);
  });

  test("read-only opens write nothing, even on a dirty image", () => {
    const dir = tempDir();
    const img = join(dir, "ro.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M");
    Bun.spawnSync(["qemu-io", "-c", "write -P 0x41 0 64k", "-c", "abort", img]);
    const before = sha(img);
    const disk = open(img, true);
    expect(readAt(disk, 0, 4)).toEqual(new Uint8Array([0x41, 0x41, 0x41, 0x41]));
    expect(() => writeAt(disk, 0, new Uint8Array(512))).toThrow(/read-only/);
    disk.close();
    expect(sha(img)).toBe(before);
    expect(existsSync(img)).toBe(true);
  });
});
