// The block device through the in-process front-end: a real worker behind a real socket, a real
// image file, guest RAM in a memfd and driver-side split rings. Every data test checks the image
// against a JS model of it; every error test checks the status byte and that the device goes on.
import { describe, test, expect, afterEach } from "bun:test";
import { readFileSync, statSync, truncateSync, copyFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BackendUnderTest, DriverQueue, Req, configPayload, RING_PACKED } from "../support/frontend.ts";
import {
  SECTOR, IMAGE_BYTES, CAPACITY, rng, randomBytes, randomIo, tempDir, makeImage, segment, concat, Disk, opened, disposeDisks,
  type BlkReq, type Pending, type Result,
} from "../support/block_disk.ts";
import { signal } from "../../ffi/eventfd.ts";
import { COMMON_FEATURES } from "../../src/device.ts";
import { blockDevice } from "../../devices/block/index.ts";
import { validateBlockState, type BlockStateSelf } from "../../devices/block/state.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S, VIRTIO_BLK_F, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
} from "../../devices/block/config.ts";

afterEach(disposeDisks);

const zeros = (n: number) => new Uint8Array(n);
const statusOf = async (d: Disk, req: BlkReq) => (await d.one(req)).status;

// ---- tests ----

describe("block: options and registration", () => {
  test("parse checks the file and the options in the main thread", () => {
    const img = makeImage();
    expect(() => blockDevice.parse({ file: img })).not.toThrow();
    expect(() => blockDevice.parse({})).toThrow(/--file/);
    expect(() => blockDevice.parse({ file: join(tmpdir(), "no-such-image-xyz.img") })).toThrow(/no such file/);
    expect(() => blockDevice.parse({ file: tmpdir() })).toThrow(/neither a regular file nor a block device/);
    expect(() => blockDevice.parse({ file: img, serial: "x".repeat(21) })).toThrow(/longer than 20/);
    expect(() => blockDevice.parse({ file: img, "num-queues": "0" })).toThrow(/num-queues/);
    expect(() => blockDevice.parse({ file: img, "queue-size": "100" })).toThrow(/power of 2/);
    expect(() => blockDevice.parse({ file: img, "read-only": true, "num-queues": "4", "queue-size": "128" })).not.toThrow();
  });

  test("a backend that cannot open the image fails before serving, saying why", async () => {
    const b = new BackendUnderTest("block", { file: join(tmpdir(), "no-such-image-xyz.img") });
    await expect(b.ready).rejects.toThrow(/ENOENT|no such file/);
    await b.stop();
  });
});

describe("block: features and config space", () => {
  test("offers the virtio-blk features and describes the disk", async () => {
    const img = makeImage();
    const d = await Disk.start({ file: img, "num-queues": "4" }, { activate: false });
    const c = d.vmm.conn;
    const features = c.requestU64(Req.GET_FEATURES);
    const want = COMMON_FEATURES | VIRTIO_BLK_F.SEG_MAX | VIRTIO_BLK_F.BLK_SIZE | VIRTIO_BLK_F.TOPOLOGY | VIRTIO_BLK_F.FLUSH |
      VIRTIO_BLK_F.CONFIG_WCE | VIRTIO_BLK_F.MQ | VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES;
    expect(features & want).toBe(want);
    expect(features & VIRTIO_BLK_F.RO).toBe(0n);
    expect(c.requestU64(Req.GET_QUEUE_NUM)).toBe(4n);
    d.vmm.handshake();
    const v = d.config(0, 60);
    expect(v.getBigUint64(0, true)).toBe(BigInt(CAPACITY));
    expect(v.getUint32(12, true)).toBe(126); // seg_max = default queue-size 128 - 2, as QEMU's ring
    expect(v.getUint32(20, true)).toBe(512); // blk_size
    expect(1 << v.getUint8(24)).toBe(Math.max(1, statSync(img).blksize / 512)); // physical_block_exp
    expect(v.getUint8(32)).toBe(1); // writeback
    expect(v.getUint16(34, true)).toBe(4); // num_queues
    expect(v.getUint32(36, true)).toBe(MAX_DISCARD_SECTORS);
    expect(v.getUint32(40, true)).toBe(MAX_DISCARD_SEGMENTS);
    expect(v.getUint32(44, true)).toBe(1); // discard_sector_alignment (512-byte blocks)
    expect(v.getUint32(48, true)).toBe(MAX_DISCARD_SECTORS);
    expect(v.getUint32(52, true)).toBe(MAX_DISCARD_SEGMENTS);
    expect(v.getUint8(56)).toBe(1); // write_zeroes_may_unmap
    // A window of the config space, and a range beyond it (error: empty config).
    expect(d.config(8, 8).getUint32(4, true)).toBe(126);
    const bad = c.request(Req.GET_CONFIG, configPayload(90, 16));
    expect(new DataView(bad.payload.buffer).getUint32(4, true)).toBe(0);
  });

  test("--queue-size sets seg_max, --no-sparse drops DISCARD and unmapping, --read-only offers RO only", async () => {
    const img = makeImage();
    const d = await Disk.start({ file: img, "queue-size": "64", sparse: false }, { activate: false });
    const f = d.vmm.conn.requestU64(Req.GET_FEATURES);
    expect(f & VIRTIO_BLK_F.DISCARD).toBe(0n);
    expect(f & VIRTIO_BLK_F.WRITE_ZEROES).toBe(VIRTIO_BLK_F.WRITE_ZEROES);
    d.vmm.handshake();
    const v = d.config();
    expect(v.getUint32(12, true)).toBe(62);
    expect(v.getUint32(36, true)).toBe(0);
    expect(v.getUint8(56)).toBe(0);
    expect(v.getUint16(34, true)).toBe(16); // default num-queues

    const ro = await Disk.start({ file: img, "read-only": true }, { activate: false });
    const rf = ro.vmm.conn.requestU64(Req.GET_FEATURES);
    expect(rf & VIRTIO_BLK_F.RO).toBe(VIRTIO_BLK_F.RO);
    expect(rf & (VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES)).toBe(0n);
  });

  test("writeback is the only writable field (CONFIG_WCE)", async () => {
    const d = await Disk.start({ file: makeImage() });
    const c = d.vmm.conn;
    expect(c.ack(Req.SET_CONFIG, configPayload(32, 1, 0, new Uint8Array([0])))).toBe(0n);
    expect(d.config(32, 1).getUint8(0)).toBe(0);
    expect(c.ack(Req.SET_CONFIG, configPayload(32, 1, 0, new Uint8Array([2])))).not.toBe(0n);
    expect(c.ack(Req.SET_CONFIG, configPayload(0, 8, 0, new Uint8Array(8)))).not.toBe(0n);
    expect(c.ack(Req.SET_CONFIG, configPayload(32, 2, 0, new Uint8Array([1, 0])))).not.toBe(0n);
    // Writethrough: writes still land (each is followed by fdatasync).
    const data = randomBytes(rng(5), 8192);
    await d.write(100, data);
    expect(await d.read(100, 16)).toEqual(data);
    expect(c.ack(Req.SET_CONFIG, configPayload(32, 1, 0, new Uint8Array([1])))).toBe(0n);
    expect(d.config(32, 1).getUint8(0)).toBe(1);
  });

  test("CONFIG_WCE without FLUSH starts in writethrough", async () => {
    const d = await Disk.start({ file: makeImage() }, { activate: false });
    const offered = d.vmm.conn.requestU64(Req.GET_FEATURES);
    d.vmm.handshake(offered & ~VIRTIO_BLK_F.FLUSH & ~RING_PACKED);
    expect(d.config(32, 1).getUint8(0)).toBe(0);
  });
});

describe("block: data integrity", () => {
  test("hundreds of random reads and writes on two queues, multi-segment and indirect", async () => {
    expect(await randomIo({}, 42, 30)).toBeGreaterThan(300);
    // The same with both queues served in the device thread instead of queue threads.
    expect(await randomIo({ threads: "0" }, 43, 10)).toBeGreaterThan(100);
  });

  test("O_DIRECT, with guest buffers both aligned and misaligned", async () => {
    await randomIo({ direct: true }, 7, 10, undefined, true);
  });

  test("an image on tmpfs", async () => {
    await randomIo({}, 9, 8, "/dev/shm");
  });

  test("any framing: header with data, data with status, header split in two, header not 4-byte aligned", async () => {
    const d = await Disk.start({ file: makeImage() });
    const data = randomBytes(rng(3), 4096);
    expect((await d.one({ type: VIRTIO_BLK_T.OUT, sector: 8, out: data, headerWithData: true })).status).toBe(VIRTIO_BLK_S.OK);
    const r1 = await d.one({ type: VIRTIO_BLK_T.IN, sector: 8, inLen: 4096, dataWithStatus: true });
    expect(r1.status).toBe(VIRTIO_BLK_S.OK);
    expect(r1.data).toEqual(data);
    expect(r1.usedLen).toBe(4097);
    const r2 = await d.one({ type: VIRTIO_BLK_T.IN, sector: 8, inLen: 4096, splitHeader: true, pieces: 5 });
    expect(r2.status).toBe(VIRTIO_BLK_S.OK);
    expect(r2.data).toEqual(data);
    for (const headerMisalign of [1, 2, 3, 6]) {
      const r = await d.one({ type: VIRTIO_BLK_T.IN, sector: 8, inLen: 4096, headerMisalign });
      expect(r.status).toBe(VIRTIO_BLK_S.OK);
      expect(r.data).toEqual(data);
    }
  });

  test("a batch of completions costs one call notification (EVENT_IDX)", async () => {
    const d = await Disk.start({ file: makeImage() });
    const q = d.q();
    await d.read(0, 1);
    await Bun.sleep(20); // the used index is published before the call is signalled: let it land
    q.calls();
    q.setUsedEvent(q.usedIdx()); // "notify me at the next used entry", as Linux does after draining
    d.arena.reset();
    const pending = Array.from({ length: 32 }, (_, i) => d.add(q, { type: VIRTIO_BLK_T.IN, sector: i * 8, inLen: 4096 }));
    signal(q.kick);
    const res = await d.finish(q, pending);
    expect(res.every((r) => r.status === VIRTIO_BLK_S.OK)).toBe(true);
    await Bun.sleep(20); // 32 outstanding: the notification waits out the coalescing window
    expect(q.calls()).toBe(1);
  });
});

describe("block: flush, discard, write zeroes", () => {
  test("flush succeeds and leaves data in place", async () => {
    const img = makeImage();
    const d = await Disk.start({ file: img });
    const data = randomBytes(rng(11), 65536);
    await d.write(1000, data);
    const r = await d.one({ type: VIRTIO_BLK_T.FLUSH });
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
    expect(r.usedLen).toBe(1);
    expect(Buffer.compare(readFileSync(img).subarray(1000 * SECTOR, 1000 * SECTOR + 65536), data)).toBe(0);
  });

  async function filled(base?: string, options: Record<string, unknown> = {}) {
    const img = makeImage(IMAGE_BYTES, base);
    const d = await Disk.start({ file: img, ...options });
    const data = randomBytes(rng(21), 1 << 20);
    for (let i = 0; i < 16; i++) await d.write(i * 128, data.subarray(i * 65536, (i + 1) * 65536));
    expect((await d.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    return { img, d, data, blocks: () => statSync(img).blocks };
  }

  test("discard punches a hole: zeroes read back, the file's blocks are freed", async () => {
    const { d, data, blocks } = await filled();
    const before = blocks();
    expect(before).toBeGreaterThanOrEqual(2048);
    // Two segments in one request: sectors 0-511 and 1024-1535.
    const r = await d.one({ type: VIRTIO_BLK_T.DISCARD, payload: concat(segment(0, 512), segment(1024, 512)) });
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
    expect(blocks()).toBeLessThanOrEqual(before - 1024);
    expect(await d.read(0, 512)).toEqual(zeros(512 * SECTOR));
    expect(await d.read(512, 512)).toEqual(data.subarray(512 * SECTOR, 1024 * SECTOR));
    expect(await d.read(1024, 512)).toEqual(zeros(512 * SECTOR));
    expect(await d.read(1536, 512)).toEqual(data.subarray(1536 * SECTOR, 2048 * SECTOR));
  });

  test("write zeroes keeps blocks without UNMAP and frees them with it", async () => {
    const { d, data, blocks } = await filled();
    const before = blocks();
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(0, 512) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(0, 512)).toEqual(zeros(512 * SECTOR));
    expect(blocks()).toBeGreaterThanOrEqual(before - 8);
    const mid = blocks();
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(512, 512, 1) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(512, 512)).toEqual(zeros(512 * SECTOR));
    expect(blocks()).toBeLessThanOrEqual(mid - 512);
    expect(await d.read(1024, 1024)).toEqual(data.subarray(1024 * SECTOR));
  });

  test("write zeroes where fallocate cannot zero a range (tmpfs) writes zero pages", async () => {
    const { d, data, blocks } = await filled("/dev/shm");
    const before = blocks();
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(100, 700) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(100, 700)).toEqual(zeros(700 * SECTOR));
    expect(await d.read(0, 100)).toEqual(data.subarray(0, 100 * SECTOR));
    expect(await d.read(800, 1248)).toEqual(data.subarray(800 * SECTOR));
    expect(blocks()).toBe(before);
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(1024, 1024, 1) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(blocks()).toBeLessThan(before);
    expect(await d.read(1024, 1024)).toEqual(zeros(1024 * SECTOR));
  });

  test("--no-sparse: no DISCARD, and UNMAP does not deallocate", async () => {
    const { d, blocks } = await filled(undefined, { sparse: false });
    expect(await statusOf(d, { type: VIRTIO_BLK_T.DISCARD, payload: segment(0, 8) })).toBe(VIRTIO_BLK_S.UNSUPP);
    const before = blocks();
    expect((await d.one({ type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(0, 1024, 1) })).status).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(0, 1024)).toEqual(zeros(1024 * SECTOR));
    expect(blocks()).toBeGreaterThanOrEqual(before - 8);
  });

  test("discard and write-zeroes segments are checked before anything happens", async () => {
    const { d, data } = await filled();
    const seg = (s: number, n: number, f = 0) => segment(s, n, f);
    const cases: [number, Uint8Array, number][] = [
      [VIRTIO_BLK_T.DISCARD, seg(0, 8, 1), VIRTIO_BLK_S.UNSUPP], // UNMAP flag on discard
      [VIRTIO_BLK_T.WRITE_ZEROES, seg(0, 8, 2), VIRTIO_BLK_S.UNSUPP], // unknown flag
      [VIRTIO_BLK_T.DISCARD, concat(...Array.from({ length: MAX_DISCARD_SEGMENTS + 1 }, () => seg(0, 8))), VIRTIO_BLK_S.UNSUPP],
      [VIRTIO_BLK_T.DISCARD, seg(0, MAX_DISCARD_SECTORS + 1), VIRTIO_BLK_S.IOERR],
      [VIRTIO_BLK_T.DISCARD, seg(CAPACITY - 4, 8), VIRTIO_BLK_S.IOERR],
      [VIRTIO_BLK_T.WRITE_ZEROES, concat(seg(0, 8), seg(CAPACITY, 1)), VIRTIO_BLK_S.IOERR], // second segment bad: nothing done
      [VIRTIO_BLK_T.WRITE_ZEROES, seg(2 ** 53, 8), VIRTIO_BLK_S.IOERR],
      [VIRTIO_BLK_T.DISCARD, new Uint8Array(0), VIRTIO_BLK_S.IOERR], // no segment
      [VIRTIO_BLK_T.DISCARD, new Uint8Array(20), VIRTIO_BLK_S.IOERR], // not a multiple of 16
    ];
    for (const [type, payload, want] of cases) expect(await statusOf(d, { type, payload })).toBe(want);
    const big = new Uint8Array(16);
    new DataView(big.buffer).setBigUint64(0, 0xffff_ffff_ffff_fff0n, true);
    new DataView(big.buffer).setUint32(8, 0x20, true);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.DISCARD, payload: big })).toBe(VIRTIO_BLK_S.IOERR);
    expect(await d.read(0, 2048)).toEqual(data);
  });
});

describe("block: host block devices", () => {
  // A loop device needs root and loop support; elsewhere this test is skipped.
  const canLoop = process.getuid?.() === 0 && Bun.spawnSync(["losetup", "--version"]).exitCode === 0;
  test.skipIf(!canLoop)("a loop device: size from BLKGETSIZE64, reads, writes, discard", async () => {
    const img = makeImage(randomBytes(rng(31), IMAGE_BYTES));
    const attach = Bun.spawnSync(["losetup", "-f", "--show", img]);
    if (attach.exitCode !== 0) return; // no free loop device here: nothing to test
    const dev = attach.stdout.toString().trim();
    try {
      const d = await Disk.start({ file: dev });
      expect(d.config().getBigUint64(0, true)).toBe(BigInt(CAPACITY));
      const data = randomBytes(rng(32), 65536);
      await d.write(CAPACITY - 128, data);
      expect(await d.read(CAPACITY - 128, 128)).toEqual(data);
      expect(await statusOf(d, { type: VIRTIO_BLK_T.IN, sector: CAPACITY, inLen: SECTOR })).toBe(VIRTIO_BLK_S.IOERR);
      expect(await statusOf(d, { type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(0, 64, 1) })).toBe(VIRTIO_BLK_S.OK);
      expect(await d.read(0, 64)).toEqual(zeros(64 * SECTOR));
      expect(await statusOf(d, { type: VIRTIO_BLK_T.DISCARD, payload: segment(64, 64) })).toBe(VIRTIO_BLK_S.OK);
      expect(await statusOf(d, { type: VIRTIO_BLK_T.FLUSH })).toBe(VIRTIO_BLK_S.OK);
      await d.dispose();
      opened.splice(opened.indexOf(d), 1);
      expect(Buffer.compare(readFileSync(img).subarray((CAPACITY - 128) * SECTOR), data)).toBe(0);
    } finally {
      Bun.spawnSync(["losetup", "-d", dev]);
    }
  });
});

describe("block: GET_ID", () => {
  test("the default serial is derived from the file's device and inode", async () => {
    const img = makeImage();
    const d = await Disk.start({ file: img });
    const st = statSync(img, { bigint: true });
    const want = Buffer.alloc(20);
    want.write(`${st.dev.toString(16)}-${st.ino.toString(16)}`);
    const r = await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 20 });
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
    expect(r.usedLen).toBe(21);
    expect(Buffer.from(r.data)).toEqual(want);
  });

  test("--serial: 20 bytes without NUL; a small buffer gets IOERR, a large one the id first", async () => {
    const d = await Disk.start({ file: makeImage(), serial: "ABCDEFGHIJ0123456789" });
    const r = await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 20, pieces: 3 });
    expect(r.status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.from(r.data).toString()).toBe("ABCDEFGHIJ0123456789");
    const small = await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 19 });
    expect(small.status).toBe(VIRTIO_BLK_S.IOERR);
    expect(small.data).toEqual(new Uint8Array(19).fill(0xee)); // untouched
    const large = await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 64 });
    expect(large.status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.from(large.data.subarray(0, 20)).toString()).toBe("ABCDEFGHIJ0123456789");

    const short = await Disk.start({ file: makeImage(), serial: "vol-7" });
    const s = await short.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 20 });
    expect(Buffer.from(s.data)).toEqual(Buffer.concat([Buffer.from("vol-7"), Buffer.alloc(15)]));
  });
});

describe("block: bounds and hostile requests", () => {
  test("the last sector is readable and writable; one past it, overflows and misalignment are IOERR", async () => {
    const r = rng(77);
    const initial = randomBytes(r, IMAGE_BYTES);
    const img = makeImage(initial);
    const d = await Disk.start({ file: img });
    const last = randomBytes(r, SECTOR);
    await d.write(CAPACITY - 1, last);
    expect(await d.read(CAPACITY - 1, 1)).toEqual(last);
    expect(await d.read(CAPACITY - 8, 8)).toEqual(concat(initial.subarray((CAPACITY - 8) * SECTOR, (CAPACITY - 1) * SECTOR), last));
    const ioerr: BlkReq[] = [
      { type: VIRTIO_BLK_T.IN, sector: CAPACITY, inLen: SECTOR },
      { type: VIRTIO_BLK_T.IN, sector: CAPACITY - 1, inLen: 2 * SECTOR },
      { type: VIRTIO_BLK_T.OUT, sector: CAPACITY - 1, out: randomBytes(r, 2 * SECTOR) },
      { type: VIRTIO_BLK_T.OUT, sector: CAPACITY, out: randomBytes(r, SECTOR) },
      { type: VIRTIO_BLK_T.IN, sector: 0xffff_ffff_ffff_ffffn, inLen: SECTOR },
      { type: VIRTIO_BLK_T.OUT, sector: 0xffff_ffff_ffff_fff8n, out: randomBytes(r, 8 * SECTOR) }, // wraps past 2^64
      { type: VIRTIO_BLK_T.IN, sector: 2n ** 55n, inLen: SECTOR }, // sector * 512 overflows u64
      { type: VIRTIO_BLK_T.IN, sector: 2 ** 53 + 2, inLen: SECTOR },
      { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 100 }, // not a multiple of 512
      { type: VIRTIO_BLK_T.OUT, sector: 0, out: randomBytes(r, 700) },
    ];
    for (const req of ioerr) {
      const res = await d.one(req);
      expect(res.status).toBe(VIRTIO_BLK_S.IOERR);
    }
    const model = initial.slice();
    model.set(last, (CAPACITY - 1) * SECTOR);
    expect(Buffer.compare(readFileSync(img), model)).toBe(0);
  });

  test("unknown request types are UNSUPP", async () => {
    const d = await Disk.start({ file: makeImage() });
    for (const type of [2, 3, 10, 14, 0x80000000, 0xffffffff]) {
      const r = await d.one({ type, inLen: 512 });
      expect(r.status).toBe(VIRTIO_BLK_S.UNSUPP);
    }
    expect(await d.read(0, 1)).toEqual(zeros(SECTOR));
  });

  test("more data segments than seg_max is IOERR; seg_max exactly is fine", async () => {
    // Driver ring of 64 entries against a device sized for 16 (seg_max 14).
    const d = await Disk.start({ file: makeImage(), "queue-size": "16" }, { queueSize: 64 });
    expect(d.config().getUint32(12, true)).toBe(14);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 8192, pieces: 14, indirect: true })).toBe(VIRTIO_BLK_S.OK);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 8192, pieces: 15, indirect: true })).toBe(VIRTIO_BLK_S.IOERR);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.OUT, sector: 0, out: new Uint8Array(8192), pieces: 15 })).toBe(VIRTIO_BLK_S.IOERR);
  });

  test("malformed chains complete with an error and the device keeps serving", async () => {
    const d = await Disk.start({ file: makeImage() });
    const q = d.q();
    // No writable byte at all: nowhere to put a status, completed with length 0.
    const noStatus = await d.one({ type: VIRTIO_BLK_T.OUT, sector: 0, out: new Uint8Array(512), noStatus: true });
    expect(noStatus.usedLen).toBe(0);
    // A header shorter than 16 bytes.
    const short = await d.one({ type: VIRTIO_BLK_T.IN, headerLen: 8, inLen: 512 });
    expect(short.status).toBe(VIRTIO_BLK_S.IOERR);
    // A read-only (device-readable) buffer where the read data should go is never written.
    const ro = await d.one({ type: VIRTIO_BLK_T.IN, sector: 0, out: new Uint8Array(512).fill(7) });
    expect(ro.status).toBe(VIRTIO_BLK_S.OK); // zero-length read: nothing to do
    // A buffer outside guest memory: the ring layer completes the chain with length 0.
    d.arena.reset();
    const hdr = d.arena.alloc(16);
    const st = d.arena.alloc(1);
    const head = q.addChain([{ gpa: hdr, len: 16 }, { gpa: d.ram.size + 4096, len: 512, write: true }, { gpa: st, len: 1, write: true }]);
    const [u] = await q.waitUsed(1);
    expect(u).toEqual({ id: head, len: 0 });
    // A buffer straddling the end of guest memory: same.
    const head2 = q.addChain([{ gpa: hdr, len: 16 }, { gpa: d.ram.size - 256, len: 512, write: true }, { gpa: st, len: 1, write: true }]);
    const [u2] = await q.waitUsed(1);
    expect(u2).toEqual({ id: head2, len: 0 });
    // Still serving.
    const data = randomBytes(rng(8), 2048);
    await d.write(64, data);
    expect(await d.read(64, 4)).toEqual(data);
  });

  test("a read-only disk refuses writes, discard and write zeroes with IOERR, and reads", async () => {
    const initial = randomBytes(rng(99), IMAGE_BYTES);
    const img = makeImage(initial);
    const d = await Disk.start({ file: img, "read-only": true });
    expect(await statusOf(d, { type: VIRTIO_BLK_T.OUT, sector: 0, out: new Uint8Array(4096) })).toBe(VIRTIO_BLK_S.IOERR);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.DISCARD, payload: segment(0, 8) })).toBe(VIRTIO_BLK_S.IOERR);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.WRITE_ZEROES, payload: segment(0, 8, 1) })).toBe(VIRTIO_BLK_S.IOERR);
    expect(await statusOf(d, { type: VIRTIO_BLK_T.FLUSH })).toBe(VIRTIO_BLK_S.OK);
    expect(await d.read(0, 8)).toEqual(initial.subarray(0, 4096));
    expect(Buffer.compare(readFileSync(img), initial)).toBe(0);
  });
});

describe("block: snapshot and restore", () => {
  test("mid-stream: requests in flight, rings stopped, state moved to a fresh backend, data intact", async () => {
    const r = rng(2024);
    const initial = randomBytes(r, IMAGE_BYTES);
    const img = makeImage(initial);
    const model = initial.slice();
    const a = await Disk.start({ file: img }, { queues: 2, queueSize: 128 });
    a.vmm.conn.ack(Req.SET_CONFIG, configPayload(32, 1, 0, new Uint8Array([0]))); // writethrough, to see it restored

    // Non-overlapping writes: 48 of 64 KiB, spread over both queues.
    const writes = Array.from({ length: 48 }, (_, i) => ({ sector: i * 128 + 8, data: randomBytes(r, 65536) }));
    for (const w of writes) model.set(w.data, w.sector * SECTOR);
    a.arena.reset();
    const pending: Pending[][] = [[], []];
    // 16 completed before the stop.
    for (let i = 0; i < 16; i++) pending[i % 2]!.push(a.add(a.q(i % 2), { type: VIRTIO_BLK_T.OUT, sector: writes[i]!.sector, out: writes[i]!.data, pieces: 3, indirect: true }));
    signal(a.q(0).kick);
    signal(a.q(1).kick);
    await a.finish(a.q(0), pending[0]!);
    await a.finish(a.q(1), pending[1]!);
    // 16 kicked and immediately followed by the stop (some may be served before it, some not),
    // then 16 made available on the stopped rings (served only after the restore).
    const done: Result[] = [];
    const tail: Pending[][] = [[], []];
    const addTail = (i: number) => tail[i % 2]!.push(a.add(a.q(i % 2), { type: VIRTIO_BLK_T.OUT, sector: writes[i]!.sector, out: writes[i]!.data, pieces: 2 }));
    for (let i = 16; i < 32; i++) addTail(i);
    signal(a.q(0).kick);
    signal(a.q(1).kick);
    const bases = a.vmm.stopAll();
    expect(bases[0]! + bases[1]!).toBeGreaterThanOrEqual(16);
    expect(bases[0]! + bases[1]!).toBeLessThanOrEqual(32);
    for (let i = 32; i < 48; i++) addTail(i);
    await Bun.sleep(20);
    expect(a.q(0).usedIdx() + a.q(1).usedIdx()).toBe(bases[0]! + bases[1]!); // nothing served after the stop
    const blob = await a.vmm.saveState();

    const b = await Disk.start({ file: img }, { activate: false, guest: a });
    b.vmm.handshake();
    b.vmm.setMemTable();
    expect(await b.vmm.loadState(blob)).toBe(0n);
    expect(b.config(32, 1).getUint8(0)).toBe(0); // writeback restored
    // The same rings continue on the new backend from where the old one stopped.
    b.vmm.queues = a.vmm.queues;
    a.vmm.queues = [];
    for (const q of b.vmm.queues) b.vmm.startQueue(q, bases[q.index]!);
    for (let qi = 0; qi < 2; qi++) {
      // Completions made by the old backend before it stopped are in the used ring already.
      done.push(...(await a.finish(b.q(qi), tail[qi]!)));
    }
    expect(done.length).toBe(32);
    expect(done.every((x) => x.status === VIRTIO_BLK_S.OK)).toBe(true);
    // Continue: reads through the new backend see every write, old and new.
    const more = randomBytes(r, 65536);
    await b.write(7000, more, 1);
    model.set(more, 7000 * SECTOR);
    for (let s = 0; s < CAPACITY; s += 2048) expect(Buffer.compare(await b.read(s, 2048, s & 1), model.subarray(s * SECTOR, (s + 2048) * SECTOR))).toBe(0);
    expect(Buffer.compare(readFileSync(img), model)).toBe(0);
  });

  test("restore refuses a different image and a resized one; accepts a copy with the same --serial", async () => {
    const content = randomBytes(rng(5), IMAGE_BYTES);
    const img = makeImage(content);
    const other = makeImage(content); // same size, same bytes, different file
    const a = await Disk.start({ file: img });
    a.vmm.stopAll();
    const blob = await a.vmm.saveState();

    const tryRestore = async (options: Record<string, unknown>) => {
      const d = await Disk.start(options, { activate: false });
      d.vmm.handshake();
      d.vmm.setMemTable();
      const res = await d.vmm.loadState(blob);
      return { d, res };
    };
    expect((await tryRestore({ file: other })).res).not.toBe(0n);
    expect((await tryRestore({ file: img, serial: "something-else" })).res).not.toBe(0n);
    expect((await tryRestore({ file: img, "read-only": true })).res).not.toBe(0n);
    const same = await tryRestore({ file: img });
    expect(same.res).toBe(0n);

    // Resized after the save.
    truncateSync(img, IMAGE_BYTES + (1 << 20));
    const resized = await tryRestore({ file: img });
    expect(resized.res).not.toBe(0n);
    // A refused restore leaves the device usable.
    resized.d.vmm.queues = [new DriverQueue(resized.d.ram, 0, 64)];
    resized.d.vmm.startQueue(resized.d.q());
    expect(await resized.d.read(0, 8)).toEqual(content.subarray(0, 4096));
    truncateSync(img, IMAGE_BYTES);

    // With an explicit serial on both sides, a copy of the image on another path restores.
    const s = await Disk.start({ file: img, serial: "disk-1" });
    s.vmm.stopAll();
    const named = await s.vmm.saveState();
    const copyDir = join(tempDir(), "copy");
    mkdirSync(copyDir);
    const copy = join(copyDir, "disk.img");
    copyFileSync(img, copy);
    const c = await Disk.start({ file: copy, serial: "disk-1" }, { activate: false });
    c.vmm.handshake();
    c.vmm.setMemTable();
    expect(await c.vmm.loadState(named)).toBe(0n);
    const c2 = await Disk.start({ file: copy }, { activate: false });
    c2.vmm.handshake();
    c2.vmm.setMemTable();
    expect(await c2.vmm.loadState(named)).not.toBe(0n);
  });

  test("the refusals say what differs", () => {
    const self: BlockStateSelf = {
      image: { path: "/img/a.raw", size: 1 << 20, dev: 5, ino: 77 },
      serial: "5-4d", explicitSerial: false, capacitySectors: 2048, blkSize: 512, segMax: 254, readOnly: false,
    };
    const saved = { version: 1, ...self, writeback: 1 };
    expect(validateBlockState(saved, self).writeback).toBe(1);
    const v = (patch: Record<string, unknown>) => () => validateBlockState({ ...saved, ...patch }, self);
    expect(v({ image: { ...self.image, size: 2 << 20 } })).toThrow(/resized/);
    expect(v({ image: { ...self.image, ino: 78 } })).toThrow(/different image.*--serial/);
    expect(v({ serial: "x" })).toThrow(/serial differs/);
    expect(v({ readOnly: true })).toThrow(/read-only/);
    expect(v({ segMax: 1022 })).toThrow(/seg_max/);
    expect(v({ version: 2 })).toThrow(/version/);
    expect(v({ writeback: 3 })).toThrow(/writeback/);
    expect(v({ serial: 5 })).toThrow(/serial is not a string/);
    // Features not offered are refused by the handler, from the envelope (handler tests).
    expect(() => validateBlockState("junk", self)).toThrow(/not a map/);
  });
});
