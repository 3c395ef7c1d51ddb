// Hostile qcow2 images: every table offset, size and entry is untrusted. Each one is refused at
// open or fails the requests it touches with an error; none crashes the process, hangs, or makes
// it write outside the image (the image file does not grow, metadata it did not own stays as is).
import { describe, test, expect, afterEach } from "bun:test";
import { openSync, writeSync, closeSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { deflateRawSync } from "node:zlib";
import { qemuImg, qemuIo, tempDir, cleanupDirs, open, readAt, writeAt } from "../support/qcow2.ts";

afterEach(cleanupDirs);

function patch(path: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(path, "r+");
  writeSync(fd, bytes, 0, bytes.length, offset);
  closeSync(fd);
}
function u64(v: bigint): Uint8Array {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}
function u32(v: number): Uint8Array {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
function layout(path: string) {
  const f = readFileSync(path);
  const l1 = Number(f.readBigUInt64BE(40));
  const l2 = Number(f.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  return {
    l1,
    reftable: Number(f.readBigUInt64BE(48)),
    l2,
    refblock: Number(f.readBigUInt64BE(Number(f.readBigUInt64BE(48)))),
    data0: l2 ? Number(f.readBigUInt64BE(l2) & 0x00fffffffffffe00n) : 0,
    length: f.length,
  };
}

/** A 2 GiB, 64 KiB-cluster image (four L1 entries) with guest clusters 0 and 1 written (0x11, 0x22). */
function image(): string {
  const p = join(tempDir(), "h.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", p, "2G");
  qemuIo("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", p);
  return p;
}

describe("hostile headers are refused at open", () => {
  const cases: [string, (p: string) => void, RegExp][] = [
    ["L1 table past the end of the file", (p) => patch(p, 40, u64(1n << 40n)), /L1 table .* past the end/],
    ["L1 table overlapping the header", (p) => patch(p, 40, u64(0n)), /L1 table overlaps the header/],
    ["L1 table of 2^28 entries", (p) => patch(p, 36, u32(1 << 28)), /L1 table of .* larger/],
    ["L1 table too small for the disk", (p) => patch(p, 36, u32(0)), /too small/],
    ["refcount table claiming terabytes", (p) => patch(p, 56, u32(0x1000_0000)), /refcount table of .* larger/],
    ["refcount table past the end", (p) => patch(p, 48, u64(1n << 44n)), /refcount table .* past the end/],
    ["refcount table on the L1 table", (p) => patch(p, 48, readFileSync(p).subarray(40, 48)), /overlaps the refcount table/],
    ["an unknown incompatible feature", (p) => patch(p, 72, u64(1n << 40n)), /unsupported incompatible feature.*bit 40/],
    ["the corrupt bit", (p) => patch(p, 72, u64(2n)), /marked corrupt/],
    ["an external data file", (p) => patch(p, 72, u64(4n)), /external data/],
    ["cluster_bits 30", (p) => patch(p, 20, u32(30)), /cluster_bits/],
    ["version 4", (p) => patch(p, 4, u32(4)), /version 4/],
    ["refcount_order 7", (p) => patch(p, 96, u32(7)), /refcount_order/],
    ["encryption", (p) => patch(p, 32, u32(1)), /encrypted/],
    ["a backing name outside the first cluster", (p) => { patch(p, 8, u64(65530n)); patch(p, 16, u32(100)); }, /backing file name/],
  ];
  for (const [name, mutate, msg] of cases) {
    test(name, () => {
      const p = image();
      mutate(p);
      expect(() => open(p)).toThrow(msg);
    });
  }

  test("extended L2 entries are refused cleanly", () => {
    const p = join(tempDir(), "x.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "16M");
    expect(() => open(p)).toThrow(/extended L2/);
  });

  test("a backing chain that loops (itself, or through another image) is refused", () => {
    const dir = tempDir();
    const a = join(dir, "a.qcow2");
    const b = join(dir, "b.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", a, "16M");
    qemuImg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b);
    qemuImg("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a);
    expect(() => open(b)).toThrow(/loops/);
    qemuImg("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", a);
    expect(() => open(a)).toThrow(/loops/);
  });

  test("backing names that are not local files are refused", () => {
    const dir = tempDir();
    const a = join(dir, "a.qcow2");
    qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "nbd://localhost/x", "-F", "raw", a, "16M");
    expect(() => open(a)).toThrow(/not a local file/);
  });
});

describe("hostile tables fail the requests that touch them", () => {
  test("an L2 table past the end of the file", () => {
    const p = image();
    const { l1, length } = layout(p);
    patch(p, l1, u64((1n << 63n) | BigInt(length + (1 << 30))));
    const disk = open(p);
    expect(() => readAt(disk, 0, 4096)).toThrow(/L2 table .* outside the image/);
    expect(() => writeAt(disk, 0, new Uint8Array(4096))).toThrow(/L2 table/);
    // Other L2 tables still serve.
    expect(readAt(disk, 1 << 30, 512)).toEqual(new Uint8Array(512));
    writeAt(disk, 1 << 30, new Uint8Array(512).fill(7));
    expect(readAt(disk, 1 << 30, 512)).toEqual(new Uint8Array(512).fill(7));
    disk.close();
    expect(statSync(p).size).toBeLessThan(length + 65536 * 4);
  });

  test("an L2 table on top of the L1 table or the header", () => {
    for (const target of ["l1", "header"] as const) {
      const p = image();
      const { l1 } = layout(p);
      patch(p, l1, u64((1n << 63n) | BigInt(target === "l1" ? l1 : 0)));
      const disk = open(p);
      if (target === "l1") expect(() => readAt(disk, 0, 512)).toThrow(/overlaps the L1 table/);
      else expect(readAt(disk, 0, 512)).toEqual(new Uint8Array(512)); // offset 0: unallocated
      disk.close();
    }
  });

  test("data clusters past the end, on the refcount table, on the header: reads and writes fail, metadata untouched", () => {
    const p = image();
    const { l2, reftable, length } = layout(p);
    patch(p, l2, u64((1n << 63n) | BigInt(length + (1 << 30)) & ~0xffffn));
    patch(p, l2 + 8, u64((1n << 63n) | BigInt(reftable)));
    const before = readFileSync(p);
    const disk = open(p);
    expect(() => readAt(disk, 0, 4096)).toThrow(/outside the image/);
    expect(() => writeAt(disk, 0, new Uint8Array(4096).fill(1))).toThrow(/outside the image/);
    expect(() => readAt(disk, 65536, 4096)).toThrow(/overlaps the refcount table/);
    expect(() => writeAt(disk, 65536, new Uint8Array(4096).fill(1))).toThrow(/overlaps the refcount table/);
    disk.close();
    const after = readFileSync(p);
    expect(after.length).toBe(before.length);
    expect(after.subarray(reftable, reftable + 65536).equals(before.subarray(reftable, reftable + 65536))).toBe(true);
  });

  test("reserved bits in an L2 entry", () => {
    const p = image();
    const { l2, data0 } = layout(p);
    patch(p, l2, u64((1n << 63n) | BigInt(data0) | 0x2n));
    const disk = open(p);
    expect(() => readAt(disk, 0, 512)).toThrow(/reserved bits/);
    expect(readAt(disk, 65536, 512)).toEqual(new Uint8Array(512).fill(0x22));
    disk.close();
  });

  test("a cluster referenced twice: writes stay in the image, the double free fails the flush, the process keeps serving", () => {
    const p = image();
    const { l2, data0, length } = layout(p);
    patch(p, l2 + 8, u64((1n << 63n) | BigInt(data0)));
    const disk = open(p);
    expect(readAt(disk, 65536, 512)).toEqual(new Uint8Array(512).fill(0x11));
    disk.discard(0, 2 * 65536);
    expect(() => disk.flush()).toThrow(/already 0/);
    writeAt(disk, 4 << 20, new Uint8Array(4096).fill(9));
    disk.flush();
    expect(readAt(disk, 4 << 20, 4096)).toEqual(new Uint8Array(4096).fill(9));
    disk.close();
    expect(statSync(p).size).toBeLessThan(length + 65536 * 8);
  });

  test("a refcount block past the end or on the L1 table: allocating writes fail, nothing is written", () => {
    for (const where of ["end", "l1"] as const) {
      const p = image();
      const { reftable, l1, length } = layout(p);
      patch(p, reftable, u64(BigInt(where === "end" ? length + 65536 * 100 : l1)));
      const disk = open(p);
      expect(() => writeAt(disk, 8 << 20, new Uint8Array(4096).fill(3))).toThrow(/refcount block/);
      expect(readAt(disk, 0, 512)).toEqual(new Uint8Array(512).fill(0x11));
      disk.close();
      expect(statSync(p).size).toBe(length);
    }
  });

  test("compressed clusters that inflate past a cluster, or are garbage, fail their reads", () => {
    const p = image();
    const { l2, length } = layout(p);
    // A deflate stream of 256 KiB of zeroes (a few hundred bytes), past the end of the file's data.
    const bomb = deflateRawSync(new Uint8Array(256 * 1024));
    const garbage = new Uint8Array(1024).fill(0xff);
    const at = Math.ceil(length / 512) * 512;
    patch(p, at, bomb);
    patch(p, at + 4096, garbage);
    const entry = (off: number, bytes: number) => (1n << 62n) | (BigInt(Math.ceil(bytes / 512) - 1) << 54n) | BigInt(off);
    patch(p, l2, u64(entry(at, bomb.length)));
    patch(p, l2 + 8, u64(entry(at + 4096, garbage.length)));
    const disk = open(p);
    expect(() => readAt(disk, 0, 4096)).toThrow(/compressed cluster/);
    expect(() => readAt(disk, 65536, 4096)).toThrow(/compressed cluster/);
    expect(() => writeAt(disk, 512, new Uint8Array(512))).toThrow(/compressed cluster/);
    expect(readAt(disk, 2 * 65536, 512)).toEqual(new Uint8Array(512));
    disk.close();
  });

  test("a compressed cluster pointing past the end of the file", () => {
    const p = image();
    const { l2, length } = layout(p);
    patch(p, l2, u64((1n << 62n) | BigInt(length * 4)));
    const disk = open(p);
    expect(() => readAt(disk, 0, 4096)).toThrow(/outside the image/);
    disk.close();
  });
});

test("a truncated image (header only) is refused", () => {
  const p = join(tempDir(), "t.qcow2");
  qemuImg("create", "-q", "-f", "qcow2", p, "16M");
  writeFileSync(p, readFileSync(p).subarray(0, 200));
  expect(() => open(p)).toThrow();
});
