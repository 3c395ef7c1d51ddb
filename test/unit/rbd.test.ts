// The block device serving a Ceph RBD image (`--file rbd:POOL/IMAGE[@SNAP][:conf=PATH]...`) through
// the in-process front-end, against a real single-node cluster (test/support/ceph_cluster.ts, one
// per file): the spec's parsing and what the sandbox is told, every request type checked against a
// mirror and against the image as `rbd export` reads it, a read-only snapshot, a resize seen while
// serving, and the start-up failures (no pool, no image, no snapshot, no monitor).
import { describe, test, expect, afterEach, beforeAll, afterAll } from "bun:test";
import { BackendUnderTest, DriverQueue, Req } from "../support/frontend.ts";
import { socketPair, setTimeouts } from "../../ffi/socket.ts";
import { read } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { HEADER_SIZE, BackendReq } from "../../src/protocol/constants.ts";
import { SECTOR, rng, randomBytes, segment, Disk, disposeDisks, randomRounds, SpawnedBackend } from "../support/block_disk.ts";
import { CephCluster, cephTestsUnavailable, freePort } from "../support/ceph_cluster.ts";
import { blockDevice } from "../../devices/block/index.ts";
import { parseRbdSpec } from "../../devices/block/disk/rbd_spec.ts";
import { monEndpoints } from "../../devices/block/disk/rbd.ts";
import { librbdUnavailable } from "../../ffi/rbd.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S, VIRTIO_BLK_F,
} from "../../devices/block/config.ts";

const MiB = 1 << 20;
const unavailable = cephTestsUnavailable() ?? librbdUnavailable();
const maybe = unavailable === null ? describe : describe.skip;
if (unavailable !== null) console.warn(`rbd tests skipped: ${unavailable}`);

let cluster: CephCluster;
let imageSeq = 0;

/** A new image in pool "rbd" holding `content`; returns its --file spec. */
function image(content: Uint8Array): { name: string; file: string } {
  const name = `img${++imageSeq}`;
  cluster.importImage(`rbd/${name}`, content);
  return { name, file: `rbd:rbd/${name}:conf=${cluster.conf}` };
}

maybe("block device on a Ceph RBD image", () => {
  beforeAll(async () => {
    // cephx, as real clusters run: the backend reads client.admin's keyring (the conf names it),
    // also inside the sandbox.
    cluster = await CephCluster.start({ auth: "cephx" });
    cluster.createPool("rbd");
  }, 60_000);
  afterAll(async () => {
    await cluster?.stop();
  });
  afterEach(async () => {
    await disposeDisks();
  });

  test("--file takes QEMU's rbd: spelling (escapes, namespace, snapshot, user, conf, options); the sandbox is told the conf, the monitors and the daemons' ports", () => {
    expect(parseRbdSpec("rbd:pool/ns/img@snap:id=alice:conf=/etc/c.conf:mon_host=10.0.0.1\\:6789:rbd_cache=false")).toEqual({
      pool: "pool", namespace: "ns", image: "img", snap: "snap", user: "alice", conf: "/etc/c.conf",
      options: [["mon_host", "10.0.0.1:6789"], ["rbd_cache", "false"]],
    });
    expect(parseRbdSpec("rbd:p/a\\@b\\:c")).toMatchObject({ pool: "p", image: "a@b:c", snap: null, namespace: "" });
    for (const bad of ["rbd:pool", "rbd:/img", "rbd:p/i@", "rbd:p/i:novalue"]) expect(() => blockDevice.parse({ file: bad })).toThrow(/rbd:POOL\/IMAGE/);
    expect(() => blockDevice.parse({ file: "rbd:p/i", format: "qcow2" })).toThrow(/RBD image, served as raw/);
    expect(monEndpoints("[v2:127.0.0.1:3301,v1:127.0.0.1:6790] 10.0.0.2 v1:10.0.0.3")).toEqual(["127.0.0.1:3301", "127.0.0.1:6790", "10.0.0.2:3300", "10.0.0.2:6789", "10.0.0.3:6789"]);
    const access = blockDevice.hostAccess!(blockDevice.parse({ file: `rbd:rbd/x:conf=${cluster.conf}` }));
    expect(access.paths).toContainEqual({ path: cluster.conf, rights: ["read"] });
    expect(access.paths).toContainEqual({ path: cluster.keyring, rights: ["read"] });
    expect(access.tcp).toContain(`127.0.0.1:${cluster.monPorts.v2}`);
    expect(access.tcp).toContain(`127.0.0.1:${cluster.monPorts.v1}`);
    expect(access.tcp).toContain("*:6800");
    expect(access.tcp).toContain("*:7300");
    expect(access).toMatchObject({ hostNetwork: true, threadsAfterAcquire: true });
  });

  test("the config space shows the image; random I/O on two queues matches the mirror and the image", async () => {
    const model = randomBytes(rng(31), 16 * MiB);
    const img = image(model);
    const d = await Disk.start({ file: img.file, "num-queues": "2", "queue-size": "256" }, { queues: 2, queueSize: 256 });
    const v = d.config(0, 60);
    expect(v.getBigUint64(0, true)).toBe(BigInt(16 * MiB / SECTOR));
    expect(v.getUint32(20, true)).toBe(512);
    expect(await randomRounds(d, model, 32, 12)).toBeGreaterThan(150);
    expect((await d.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.compare(cluster.readImage(`rbd/${img.name}`), model)).toBe(0);
  }, 60_000);

  test("served by the real entry point under the sandbox (librados connects after the re-exec): random I/O matches the mirror and the image", async () => {
    const model = randomBytes(rng(37), 8 * MiB);
    const img = image(model);
    const backend = new SpawnedBackend(["--file", img.file, "--num-queues", "2", "--queue-size", "256"]);
    const d = await Disk.start({}, { backend, queues: 2, queueSize: 256 });
    const sandbox = backend.log.split("\n").find((l) => l.includes("sandbox:")) ?? "";
    expect(sandbox).toMatch(/landlock\(.*filesystem,tcp.*seccomp/);
    expect(backend.log).not.toContain("not applied");
    expect(await randomRounds(d, model, 38, 6)).toBeGreaterThan(60);
    expect((await d.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.compare(cluster.readImage(`rbd/${img.name}`), model)).toBe(0);
  }, 60_000);

  test("flush, discard, write zeroes (with and without unmap) and get-id", async () => {
    const model = randomBytes(rng(33), 8 * MiB);
    const img = image(model);
    const d = await Disk.start({ file: img.file, serial: "rbd-disk-7" });
    const f = d.vmm.conn.requestU64(Req.GET_FEATURES);
    expect(f & (VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES)).toBe(VIRTIO_BLK_F.DISCARD | VIRTIO_BLK_F.WRITE_ZEROES);
    const results = await d.run([
      { type: VIRTIO_BLK_T.WRITE_ZEROES, payload: Buffer.concat([segment(0, 128, 1), segment(1024, 8, 0)]) },
      // Whole 4 MiB objects: librbd skips a discard's partial objects (rbd_skip_partial_discard), so only these read back as zeroes.
      { type: VIRTIO_BLK_T.DISCARD, payload: segment(8192, 8192) },
      { type: VIRTIO_BLK_T.FLUSH },
      { type: VIRTIO_BLK_T.GET_ID, inLen: 20 },
    ]);
    expect(results.map((x) => x.status)).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
    expect(Buffer.from(results[3]!.data).toString().replace(/\0+$/, "")).toBe("rbd-disk-7");
    model.fill(0, 0, 128 * SECTOR);
    model.fill(0, 1024 * SECTOR, 1032 * SECTOR);
    model.fill(0, 8192 * SECTOR, 16384 * SECTOR);
    expect(Buffer.compare(await d.read(0, 16384), model)).toBe(0);
    expect(Buffer.compare(cluster.readImage(`rbd/${img.name}`), model)).toBe(0);
  }, 60_000);

  test("a snapshot is served read-only and refuses writes; the image itself stays writable", async () => {
    const before = randomBytes(rng(34), 4 * MiB);
    const img = image(before);
    cluster.rbd(["snap", "create", `rbd/${img.name}@s1`]);
    const d = await Disk.start({ file: `rbd:rbd/${img.name}@s1:conf=${cluster.conf}` }, { activate: false });
    expect(d.vmm.conn.requestU64(Req.GET_FEATURES) & VIRTIO_BLK_F.RO).toBe(VIRTIO_BLK_F.RO);
    d.vmm.activate(1, 128);
    expect((await d.one({ type: VIRTIO_BLK_T.OUT, sector: 8, out: new Uint8Array(4096) })).status).toBe(VIRTIO_BLK_S.IOERR);
    // The image changes after the snapshot; the snapshot does not.
    const w = await Disk.start({ file: img.file });
    await w.write(8, new Uint8Array(4096).fill(0x5a));
    expect((await w.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.compare(await d.read(0, 8192), before.subarray(0, 8192 * SECTOR))).toBe(0);
    expect(Buffer.compare(cluster.readImage(`rbd/${img.name}@s1`), before)).toBe(0);
    expect(cluster.readImage(`rbd/${img.name}`)[8 * SECTOR]).toBe(0x5a);
  }, 60_000);

  test("--read-only on the image itself: writes refused, reads served", async () => {
    const model = randomBytes(rng(35), 4 * MiB);
    const img = image(model);
    const d = await Disk.start({ file: img.file, "read-only": true });
    expect((await d.one({ type: VIRTIO_BLK_T.OUT, sector: 0, out: new Uint8Array(512) })).status).toBe(VIRTIO_BLK_S.IOERR);
    expect((await d.one({ type: VIRTIO_BLK_T.IN, sector: 100, inLen: 4096 })).data).toEqual(model.subarray(100 * SECTOR, 108 * SECTOR));
  }, 60_000);

  test("a resize while serving: the config space shows the new capacity and the front-end is told (CONFIG_CHANGE_MSG)", async () => {
    const img = image(randomBytes(rng(36), 4 * MiB));
    const d = await Disk.start({ file: img.file }, { activate: false });
    const [ours, theirs] = socketPair();
    setTimeouts(ours, 10_000);
    try {
      d.vmm.handshake();
      expect(d.vmm.conn.ack(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs])).toBe(0n);
      close(theirs);
      d.vmm.setMemTable();
      d.vmm.queues = [new DriverQueue(d.ram, 0, 128)];
      d.vmm.startQueue(d.q(0));
      expect(d.config(0, 8).getBigUint64(0, true)).toBe(BigInt(4 * MiB / SECTOR));
      cluster.rbd(["resize", "--size", "8M", `rbd/${img.name}`]);
      const h = new Uint8Array(HEADER_SIZE);
      expect(read(ours, h, HEADER_SIZE)).toBe(HEADER_SIZE); // blocking, up to the socket timeout
      expect(new DataView(h.buffer).getUint32(0, true)).toBe(BackendReq.CONFIG_CHANGE_MSG);
      expect(d.config(0, 8).getBigUint64(0, true)).toBe(BigInt(8 * MiB / SECTOR));
      // The new space is usable.
      await d.write(12000, new Uint8Array(4096).fill(0x77));
      expect((await d.read(12000, 8))[0]).toBe(0x77);
    } finally {
      close(ours);
    }
  }, 60_000);

  test("a missing pool, image or snapshot, or no monitor, fails the start, saying what to do", async () => {
    const img = image(new Uint8Array(MiB));
    const deadPort = await freePort();
    for (const [file, why] of [
      [`rbd:nopool/${img.name}:conf=${cluster.conf}`, /no pool 'nopool'.*ceph osd pool create nopool/],
      [`rbd:rbd/absent:conf=${cluster.conf}`, /pool 'rbd' has no image 'absent'.*rbd create --size SIZE rbd\/absent/],
      [`rbd:rbd/${img.name}@nosnap:conf=${cluster.conf}`, /has no snapshot 'nosnap'.*rbd snap ls/],
      [`rbd:rbd/${img.name}:conf=${cluster.dir}/absent.conf`, /cannot read the Ceph configuration .*absent.conf.*fix conf=PATH/],
      [`rbd:rbd/${img.name}:id=nobody:conf=${cluster.conf}`, /no key for client.nobody .*fix :id=USER, or give its keyring as :keyring=PATH/],
      [`rbd:rbd/${img.name}:mon_host=127.0.0.1\\:${deadPort}:client_mount_timeout=2:auth_client_required=none`, /cannot connect to the Ceph cluster.*no monitor answered at 127.0.0.1:\d+ within 2 s: start the cluster/],
    ] as const) {
      const b = new BackendUnderTest("block", { file });
      await expect(b.ready).rejects.toThrow(why);
      await b.stop();
    }
  }, 60_000);
});
