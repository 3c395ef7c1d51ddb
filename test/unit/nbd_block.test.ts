// The block device serving an NBD export (`--file nbd+unix:///EXPORT?socket=PATH`) through the
// in-process front-end: the options, the config space the export's geometry gives, random I/O on
// two queues (queue threads with one connection each when the server offers multi-conn; the device
// thread otherwise) against a model and the server's image file, discard and write zeroes, a
// read-only export, a server restart under load, and a failing start-up.
import { describe, test, expect, afterEach } from "bun:test";
import { readFileSync } from "node:fs";
import { BackendUnderTest, Req } from "../support/frontend.ts";
import { SECTOR, rng, randomBytes, segment, Disk, disposeDisks, randomRounds } from "../support/block_disk.ts";
import { NbdServer, disposeNbdServers, nbdTestsUnavailable } from "../support/nbd_server.ts";
import { blockDevice } from "../../devices/block/index.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S, VIRTIO_BLK_F,
} from "../../devices/block/config.ts";

const MiB = 1 << 20;
const unavailable = nbdTestsUnavailable();
const maybe = unavailable === null ? describe : describe.skip;

afterEach(async () => {
  await disposeDisks();
  await disposeNbdServers();
});

maybe("block device on an NBD export", () => {
  test("--file takes NBD URIs (no stat), --nbd-timeout in seconds, --format qcow2 refused", () => {
    expect(blockDevice.parse({ file: "nbd://10.0.0.1:10900/vm1" }).nbdTimeoutMs).toBe(0);
    expect(blockDevice.parse({ file: "nbd+unix:///vm1?socket=/run/nbd.sock", "nbd-timeout": "2.5" }).nbdTimeoutMs).toBe(2500);
    expect(() => blockDevice.parse({ file: "nbd://h/e", "nbd-timeout": "soon" })).toThrow(/--nbd-timeout: 'soon' is not a number of seconds/);
    expect(() => blockDevice.parse({ file: "nbd://h/e", format: "qcow2" })).toThrow(/qemu-nbd -f qcow2/);
    expect(blockDevice.hostAccess!(blockDevice.parse({ file: "nbd+unix:///vm1?socket=/run/nbd.sock" }))).toMatchObject({ unixSockets: ["/run/nbd.sock"], tcp: [] });
    expect(blockDevice.hostAccess!(blockDevice.parse({ file: "nbd://10.0.0.1:10900/vm1" }))).toMatchObject({ tcp: ["10.0.0.1:10900"], hostNetwork: true });
  });

  test("the config space shows the export; random I/O on two queue threads (multi-conn) and in the device thread", async () => {
    const model = randomBytes(rng(21), 16 * MiB);
    const s = new NbdServer({ content: model });
    await s.start();
    for (const threads of ["2", "0"]) {
      const d = await Disk.start({ file: s.uri, "num-queues": "2", threads, "queue-size": "256" }, { queues: 2, queueSize: 256 });
      const v = d.config(0, 60);
      expect(v.getBigUint64(0, true)).toBe(BigInt(16 * MiB / SECTOR));
      expect(v.getUint32(20, true)).toBe(512); // blk_size: qemu-nbd's minimum is 1 byte
      expect(1 << v.getUint8(24)).toBe(8); // physical block 4096 (the export's preferred size)
      expect(await randomRounds(d, model, threads === "2" ? 22 : 23, 12)).toBeGreaterThan(150);
      expect(Buffer.compare(readFileSync(s.image), model)).toBe(0);
      await disposeDisks();
    }
  });

  test("discard and write zeroes reach the server", async () => {
    const model = randomBytes(rng(24), 8 * MiB);
    const s = new NbdServer({ content: model });
    await s.start();
    const d = await Disk.start({ file: s.uri });
    const f = d.vmm.conn.requestU64(Req.GET_FEATURES);
    expect(f & (VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES)).toBe(VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES);
    const results = await d.run([
      { type: VIRTIO_BLK_T.WRITE_ZEROES, payload: Buffer.concat([segment(0, 128, 1), segment(1024, 8, 0)]) },
      { type: VIRTIO_BLK_T.DISCARD, payload: segment(4096, 2048) },
      { type: VIRTIO_BLK_T.FLUSH },
    ]);
    expect(results.map((x) => x.status)).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
    model.fill(0, 0, 128 * SECTOR);
    model.fill(0, 1024 * SECTOR, 1032 * SECTOR);
    model.fill(0, 4096 * SECTOR, 6144 * SECTOR); // qemu-nbd --discard=unmap on a raw file: a hole
    expect(Buffer.compare(readFileSync(s.image), model)).toBe(0);
    expect(Buffer.compare(await d.read(1000, 64), model.subarray(1000 * SECTOR, 1064 * SECTOR))).toBe(0);
  });

  test("a read-only export is offered read-only and refuses writes", async () => {
    const model = randomBytes(rng(25), 4 * MiB);
    const s = new NbdServer({ content: model, readOnly: true });
    await s.start();
    const d = await Disk.start({ file: s.uri }, { activate: false });
    expect(d.vmm.conn.requestU64(Req.GET_FEATURES) & VIRTIO_BLK_F.RO).toBe(VIRTIO_BLK_F.RO);
    d.vmm.activate(1, 128);
    expect((await d.one({ type: VIRTIO_BLK_T.OUT, sector: 8, out: new Uint8Array(4096) })).status).toBe(VIRTIO_BLK_S.IOERR);
    expect(Buffer.compare(await d.read(8, 8), model.subarray(8 * SECTOR, 16 * SECTOR))).toBe(0);
    expect(Buffer.compare(readFileSync(s.image), model)).toBe(0);
  });

  test("the server restarts while both queues have requests in flight: every request succeeds, nothing is lost", async () => {
    const model = randomBytes(rng(26), 16 * MiB);
    const s = new NbdServer({ content: model });
    await s.start();
    const d = await Disk.start({ file: s.uri, "num-queues": "2", threads: "2", "queue-size": "256" }, { queues: 2, queueSize: 256 });
    const n = await randomRounds(d, model, 27, 6, async (round) => {
      if (round % 2 !== 0) return;
      await s.stop();
      await Bun.sleep(200);
      await s.start();
    });
    expect(n).toBeGreaterThan(60);
    const flush = await d.one({ type: VIRTIO_BLK_T.FLUSH });
    expect(flush.status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.compare(readFileSync(s.image), model)).toBe(0);
  });

  test("a missing export or an absent server fails the start, saying what to do", async () => {
    const s = new NbdServer();
    await s.start();
    for (const [file, why] of [
      [`nbd+unix:///nope?socket=${s.socket}`, /no export named 'nope'.*fix EXPORT/],
      [`nbd+unix:///disk?socket=${s.dir}/absent.sock`, /start the NBD server/],
    ] as const) {
      const b = new BackendUnderTest("block", { file });
      await expect(b.ready).rejects.toThrow(why);
      await b.stop();
    }
  });
});
