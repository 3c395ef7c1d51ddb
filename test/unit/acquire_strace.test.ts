// Issue 15's acquire phase, held to by tracing: each device runs a full session (connect, negotiate,
// memory table, rings, real I/O, snapshot, reset, reconnect, I/O again) as a subprocess under
// `strace -f`, and after the backend reported ready (the reply to the first request) it may open,
// create sockets, io_urings and threads only as its definition's hostAccess() declares. What the
// JavaScript runtime itself does at any time (Bun/JSC: see RUNTIME_ALLOWANCES in
// test/support/strace_session.ts) is told apart by exact path or thread name; one test runs with
// JSC's helper threads turned off and tolerates no thread at all, to show that list is the runtime's.
import { describe, test, expect, afterEach } from "bun:test";
import { readFileSync, writeFileSync, existsSync, readdirSync, truncateSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { GuestRam, Vmm, DriverQueue, Req, u64, type BufferSpec } from "../support/frontend.ts";
import { ProtocolFeature } from "../../src/protocol/constants.ts";
import {
  StracedBackend, straceAvailable, offences, describeOffences, declaredAccess, threadNamesFromLog, RUNTIME_ALLOWANCES,
  JSC_HELPER_THREADS_OFF, type StracedOptions, type RuntimeAllowance,
} from "../support/strace_session.ts";
import { SndDriver, DEFAULT_PARAMS } from "../support/snd_driver.ts";
import { NbdServer, nbdTestsUnavailable } from "../support/nbd_server.ts";
import { CephCluster, cephTestsUnavailable } from "../support/ceph_cluster.ts";
import { NetNamespace, netnsAvailable } from "../support/netns.ts";
import { open, read, write, O_WRONLY, O_NONBLOCK } from "../../ffi/io.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from "../../devices/block/config.ts";
import { VIRTIO_NET_HDR_SIZE, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_OK } from "../../devices/net/virtio_net.ts";
import { wavHeader } from "../../devices/snd/wav.ts";
import * as P from "../../devices/snd/protocol.ts";
import { packetSocket, TEST_ETHERTYPE } from "../support/packet_socket.ts";

const MiB = 1 << 20;
const STRACE = straceAvailable();

const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** Waits until `predicate` holds (a condition, not a timing assertion). */
async function until(predicate: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(2);
  }
}

/** What a device's session does on its rings (twice: before and after the reconnect). */
interface DeviceDriver {
  /** Negotiates, sets the memory table and starts the rings (the default: every queue of `queues`). */
  activate(vmm: Vmm, ram: GuestRam, round: number): void | Promise<void>;
  /** Real I/O both ways, checked. */
  io(vmm: Vmm, ram: GuestRam, round: number): Promise<void>;
}

interface SessionPlan extends StracedOptions {
  device: string;
  /** The device's options as the definition parses them (for its hostAccess declaration). */
  raw: Record<string, unknown>;
  driver: DeviceDriver;
  /** Runtime behaviours tolerated (default: RUNTIME_ALLOWANCES). */
  allow?: readonly RuntimeAllowance[];
  /** What the backend's log must not say (that the session ran the mode it is about, not a fallback). */
  logLacks?: RegExp;
}

/**
 * One full session under strace; returns the traced calls after ready that nothing allowed, as
 * a message (empty: none). Round 1: negotiate, memory table, rings, I/O, stop the rings, save
 * the device state, RESET_DEVICE. Round 2 on a new connection: the same again; then the
 * front-end leaves and the backend gets SIGTERM.
 */
async function tracedSession(plan: SessionPlan): Promise<string> {
  const b = await StracedBackend.start(plan.device, plan);
  cleanups.push(() => b.dispose());
  const ram = new GuestRam(32 * MiB);
  cleanups.push(() => ram.dispose());
  const vmm = new Vmm(b, ram);
  const old: DriverQueue[] = [];
  cleanups.push(() => {
    vmm.dispose();
    old.forEach((q) => q.dispose());
  });
  vmm.conn.requestU64(Req.GET_FEATURES);
  const ready = Date.now() / 1000;
  for (let round = 0; round < 2; round++) {
    if (round === 1) vmm.reconnect();
    await plan.driver.activate(vmm, ram, round);
    await plan.driver.io(vmm, ram, round);
    vmm.stopAll();
    const state = await vmm.saveState();
    expect(state.length).toBeGreaterThan(0);
    expect(vmm.conn.ack(Req.RESET_DEVICE)).toBe(0n);
    old.push(...vmm.queues);
    vmm.queues = [];
  }
  vmm.conn.close();
  vmm.conn = { close() {} } as never;
  const { code, stderr } = await b.stop();
  expect({ code, errors: stderr.split("\n").filter((l) => / (error|fatal) /.test(l)) }).toEqual({ code: 0, errors: [] });
  if (plan.logLacks !== undefined) expect(stderr).not.toMatch(plan.logLacks);
  const events = b.log();
  const names = threadNamesFromLog(events);
  const found = offences(events, { since: ready, until: b.stoppedAt }, declaredAccess(plan.device, plan.raw, plan.env), plan.allow ?? RUNTIME_ALLOWANCES, names);
  return found.length === 0 ? "" : `${plan.device} ${b.args.join(" ")}: after ready (${ready.toFixed(6)}):\n${describeOffences(found)}`;
}

const activateAll = (queues: number, size = 64): DeviceDriver["activate"] => (vmm) => vmm.activate(queues, size);

// ---- console ----

function consoleDriver(dir: string): DeviceDriver {
  let input = -1;
  cleanups.push(() => {
    if (input >= 0) close(input);
  });
  return {
    activate: activateAll(2),
    async io(vmm, ram, round) {
      const [rx, tx] = vmm.queues as [DriverQueue, DriverQueue];
      const out = Buffer.from(`guest output, session ${round}\n`);
      const g = ram.alloc(out.length);
      ram.bytes(g, out.length).set(out);
      tx.addChain([{ gpa: g, len: out.length }]);
      await tx.waitUsed(1);
      await until(() => readFileSync(join(dir, "out.log"), "utf8").includes(out.toString()), "the guest's output in --output-file");
      // The backend holds the FIFO's read end: this open does not wait.
      if (input < 0) input = open(join(dir, "in.fifo"), O_WRONLY | O_NONBLOCK);
      const text = Buffer.from(`host input, session ${round}`);
      expect(write(input, text, text.length)).toBe(text.length);
      const buf = ram.alloc(256);
      rx.addChain([{ gpa: buf, len: 256, write: true }]);
      const [u] = await rx.waitUsed(1);
      expect(Buffer.from(ram.bytes(buf, u!.len)).toString()).toBe(text.toString());
    },
  };
}

// ---- block ----

const SECTOR = 512;

/** One virtio-blk request on `q`: header, data (out, or `inLen` bytes in), status. */
function blk(ram: GuestRam, q: DriverQueue, type: number, sector: number, out?: Uint8Array, inLen = 0): { status: number; data: number } {
  const hdr = ram.alloc(16);
  const v = new DataView(ram.bytes(hdr, 16).buffer, ram.bytes(hdr, 16).byteOffset, 16);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  const bufs: BufferSpec[] = [{ gpa: hdr, len: 16 }];
  let data = 0;
  if (out !== undefined) {
    data = ram.alloc(out.length, 512);
    ram.bytes(data, out.length).set(out);
    bufs.push({ gpa: data, len: out.length });
  } else if (inLen > 0) {
    data = ram.alloc(inLen, 512);
    bufs.push({ gpa: data, len: inLen, write: true });
  }
  const status = ram.alloc(1);
  ram.bytes(status, 1)[0] = 0xff;
  bufs.push({ gpa: status, len: 1, write: true });
  q.addChain(bufs);
  return { status, data };
}

/** `image`: the image file, or how to read the whole image otherwise (an RBD image through `rbd export`). */
function blockDriver(image: string | (() => Uint8Array)): DeviceDriver {
  const contents = typeof image === "string" ? () => readFileSync(image) : image;
  return {
    activate: activateAll(2),
    async io(vmm, ram, round) {
      // Written through one queue (one queue thread), read back through the other, flushed; then the
      // image itself. 64 KiB: what --aio hybrid reads through its ring (io_uring's workers).
      const [q0, q1] = vmm.queues as [DriverQueue, DriverQueue];
      const data = new Uint8Array(randomBytes(128 * SECTOR));
      const sector = 64 + 16 * round;
      const w = blk(ram, q0, VIRTIO_BLK_T.OUT, sector, data);
      await q0.waitUsed(1);
      expect(ram.bytes(w.status, 1)[0]).toBe(VIRTIO_BLK_S.OK);
      const f = blk(ram, q0, VIRTIO_BLK_T.FLUSH, 0);
      await q0.waitUsed(1);
      expect(ram.bytes(f.status, 1)[0]).toBe(VIRTIO_BLK_S.OK);
      const r = blk(ram, q1, VIRTIO_BLK_T.IN, sector, undefined, data.length);
      await q1.waitUsed(1);
      expect(ram.bytes(r.status, 1)[0]).toBe(VIRTIO_BLK_S.OK);
      expect(Buffer.from(ram.bytes(r.data, data.length)).equals(Buffer.from(data))).toBe(true);
      expect(Buffer.from(contents()).subarray(sector * SECTOR, sector * SECTOR + data.length).equals(Buffer.from(data))).toBe(true);
    },
  };
}

// ---- net ----


/** A broadcast frame of our own ethertype carrying `tag`. */
function frame(tag: string): Uint8Array {
  const f = new Uint8Array(96);
  f.fill(0xff, 0, 6);
  f.set([2, 0, 0, 0, 0xaa, 1], 6);
  new DataView(f.buffer).setUint16(12, TEST_ETHERTYPE);
  f.set(Buffer.from(`${tag}|`), 14);
  return f;
}

async function capture(fd: number, tag: string, timeoutMs = 5000): Promise<void> {
  const buf = new Uint8Array(65536);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const n = read(fd, buf, buf.length);
    if (n > 0 && ((buf[12]! << 8) | buf[13]!) === TEST_ETHERTYPE && Buffer.from(buf.subarray(14, 40)).toString("latin1").startsWith(`${tag}|`)) return;
    if (n === -EAGAIN) {
      if (Date.now() > deadline) throw new Error(`frame '${tag}' did not reach the tap`);
      await Bun.sleep(2);
    }
  }
}

function netDriver(ps: () => number, setMtu: boolean): DeviceDriver {
  let ctrlOk = 0;
  return {
    // Two pairs (rx0, tx0, rx1, tx1) and the control queue: each pair on a queue thread of its own.
    activate: activateAll(5, 256),
    async io(vmm, ram, round) {
      const [rx0, tx0, rx1, tx1, ctrl] = vmm.queues as [DriverQueue, DriverQueue, DriverQueue, DriverQueue, DriverQueue];
      // Guest → tap, from both pairs.
      for (const [tx, pair] of [[tx0, 0], [tx1, 1]] as const) {
        const tag = `to-host-${round}-${pair}`;
        const out = frame(tag);
        const g = ram.alloc(VIRTIO_NET_HDR_SIZE + out.length);
        ram.bytes(g, VIRTIO_NET_HDR_SIZE + out.length).fill(0);
        ram.bytes(g + VIRTIO_NET_HDR_SIZE, out.length).set(out);
        tx.addChain([{ gpa: g, len: VIRTIO_NET_HDR_SIZE + out.length }]);
        await tx.waitUsed(1);
        await capture(ps(), tag);
      }
      // Tap → guest: the tap steers the frame to either pair.
      const bufs = new Map<string, number>();
      for (const rx of [rx0, rx1]) {
        for (let i = 0; i < 8; i++) {
          const b = ram.alloc(2048);
          bufs.set(`${rx.index}/${rx.addChain([{ gpa: b, len: 2048, write: true }])}`, b);
        }
      }
      const inbound = frame(`to-guest-${round}`);
      expect(write(ps(), inbound, inbound.length)).toBe(inbound.length);
      const deadline = Date.now() + 5000;
      for (;;) {
        const got = [rx0, rx1].flatMap((rx) => rx.takeUsed().map((u) => ram.bytes(bufs.get(`${rx.index}/${u.id}`)! + VIRTIO_NET_HDR_SIZE, u.len - VIRTIO_NET_HDR_SIZE)));
        if (got.some((f) => Buffer.from(f.subarray(14, 40)).toString("latin1").startsWith(`to-guest-${round}|`))) break;
        if (Date.now() > deadline) throw new Error("the frame written to the tap did not reach a receive queue");
        await Bun.sleep(2);
      }
      // The control queue (promiscuous mode on, then off) and the MTU QEMU sets when it has one (host_mtu).
      for (const on of [1, 0]) {
        const cmd = ram.alloc(3);
        ram.bytes(cmd, 3).set([VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, on]);
        const ack = ram.alloc(1);
        ram.bytes(ack, 1)[0] = 0xff;
        ctrl.addChain([{ gpa: cmd, len: 3 }, { gpa: ack, len: 1, write: true }]);
        await ctrl.waitUsed(1);
        if (ram.bytes(ack, 1)[0] === VIRTIO_NET_OK) ctrlOk++;
      }
      expect(ctrlOk).toBe(2 * (round + 1));
      if (setMtu) {
        const proto = vmm.conn.requestU64(Req.GET_PROTOCOL_FEATURES);
        expect(proto & (1n << BigInt(ProtocolFeature.NET_MTU))).not.toBe(0n);
        expect(vmm.conn.ack(Req.NET_SET_MTU, u64(BigInt(1400 + round)))).toBe(0n);
      }
    },
  };
}

// ---- snd ----

const PERIOD = DEFAULT_PARAMS.periodBytes;

function sndDriver(capture: boolean): DeviceDriver {
  let drv: SndDriver;
  return {
    activate(vmm, ram) {
      drv = new SndDriver(vmm, ram);
      drv.activate();
    },
    async io(_vmm, _ram, round) {
      // A few periods played on output stream 0 (the file backend writes them to a WAV file).
      expect(await drv.setParams(0)).toBe(P.S_OK);
      expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
      const pcm = new Uint8Array(randomBytes(6 * PERIOD));
      const done = await drv.play(0, pcm, PERIOD);
      expect(done.every((d) => d.status === P.S_OK)).toBe(true);
      expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
      expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
      // A different format on the second session: the file backend starts a new WAV beside the first.
      if (round === 0) {
        expect(await drv.setParams(0, { rate: P.RATE_44100, periodBytes: 1764, bufferBytes: 4 * 1764 })).toBe(P.S_OK);
        expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
        expect(await drv.play(0, new Uint8Array(4 * 1764), 1764)).toHaveLength(4);
        expect(await drv.pcm(P.R_PCM_STOP, 0)).toBe(P.S_OK);
        expect(await drv.pcm(P.R_PCM_RELEASE, 0)).toBe(P.S_OK);
      }
      // Input stream 1: recorded from the capture file (or silence).
      expect(await drv.setParams(1)).toBe(P.S_OK);
      expect(await drv.pcm(P.R_PCM_PREPARE, 1)).toBe(P.S_OK);
      const rec = await drv.record(1, 4, PERIOD);
      expect(rec.every((d) => d.status === P.S_OK && d.len === PERIOD + 8)).toBe(true);
      if (capture) expect(rec.some((d) => d.data.some((x) => x !== 0))).toBe(true);
      expect(await drv.pcm(P.R_PCM_STOP, 1)).toBe(P.S_OK);
      expect(await drv.pcm(P.R_PCM_RELEASE, 1)).toBe(P.S_OK);
    },
  };
}

function testDir(name: string): string {
  const d = mkdtempSync(join(tmpdir(), `vhu-strace-${name}-`));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

describe.skipIf(!STRACE)("after ready, a device opens only what it declared (strace -f)", () => {
  test("console: output file, input FIFO", async () => {
    const dir = testDir("console");
    Bun.spawnSync(["mkfifo", join(dir, "in.fifo")]);
    const raw = { "output-file": join(dir, "out.log"), "input-file": join(dir, "in.fifo") };
    const found = await tracedSession({ device: "console", dir, raw, args: ["--output-file", raw["output-file"], "--input-file", raw["input-file"]], driver: consoleDriver(dir) });
    expect(found).toBe("");
  }, 60_000);

  test("console, with JSC's helper threads off: not even the runtime starts a thread after ready", async () => {
    const dir = testDir("console-nothreads");
    Bun.spawnSync(["mkfifo", join(dir, "in.fifo")]);
    const raw = { "output-file": join(dir, "out.log"), "input-file": join(dir, "in.fifo") };
    const found = await tracedSession({
      device: "console", dir, raw, env: JSC_HELPER_THREADS_OFF,
      args: ["--output-file", raw["output-file"], "--input-file", raw["input-file"]], driver: consoleDriver(dir),
      allow: RUNTIME_ALLOWANCES.filter((a) => a.kind !== "thread"),
    });
    expect(found).toBe("");
  }, 60_000);

  // With io_uring, acquire sets up a ring per queue (devices/block/disk/uring_queue.ts); the
  // queue threads only map and use them.
  for (const aio of ["sync", "io_uring", "hybrid"]) {
    test(`block: --aio ${aio}, two queues on two queue threads, reads and writes on an image`, async () => {
      const dir = testDir(`block-${aio}`);
      const image = join(dir, "disk.img");
      writeFileSync(image, "");
      truncateSync(image, 8 * MiB);
      const raw = { file: image, "num-queues": "2", threads: "2", aio };
      const found = await tracedSession({ device: "block", dir, raw, args: ["--file", image, "--num-queues", "2", "--threads", "2", "--aio", aio], driver: blockDriver(image), logLacks: /io_uring unavailable/ });
      expect(found).toBe("");
    }, 60_000);
  }

  // After ready, every queue thread connects to the NBD server itself (libnbd handles stay in the
  // thread that made them): a unix socket and a connect, which nbdHostAccess declares.
  (nbdTestsUnavailable() !== null ? test.skip : test)("block: an NBD export (nbd+unix), two queues on two queue threads", async () => {
    const dir = testDir("block-nbd");
    const server = new NbdServer({ size: 8 * MiB });
    cleanups.push(() => server.dispose());
    await server.start();
    const raw = { file: server.uri, "num-queues": "2", threads: "2" };
    const found = await tracedSession({ device: "block", dir, raw, args: ["--file", server.uri, "--num-queues", "2", "--threads", "2"], driver: blockDriver(server.image) });
    expect(found).toBe("");
  }, 60_000);

  // After ready, the device thread connects to the Ceph cluster (librados's threads, TCP to the
  // monitor and the OSD, the conf file read again), all of which rbdHostAccess declares.
  (cephTestsUnavailable() !== null ? test.skip : test)("block: an RBD image, two queues (served from the device thread)", async () => {
    const dir = testDir("block-rbd");
    const cluster = await CephCluster.start();
    cleanups.push(() => cluster.stop());
    cluster.createPool("rbd");
    cluster.createImage("rbd", "img", 8 * MiB);
    const file = `rbd:rbd/img:conf=${cluster.conf}`;
    const raw = { file, "num-queues": "2" };
    const found = await tracedSession({ device: "block", dir, raw, args: ["--file", file, "--num-queues", "2"], driver: blockDriver(() => cluster.readImage("rbd/img")) });
    expect(found).toBe("");
  }, 90_000);

  async function netSession(setMtu: boolean): Promise<string> {
    const ns = NetNamespace.create();
    let ps = -1;
    cleanups.push(() => {
      if (ps >= 0) close(ps);
      ns.destroy();
    });
    const tap = ns.addTap("vhustrace0", { multiQueue: true });
    ps = ns.enter(() => packetSocket(tap));
    const dir = testDir("net");
    const raw = { "tap-name": tap, mac: "02:00:00:00:00:42", "queue-pairs": "2" };
    return tracedSession({
      device: "net", dir, raw, prefix: ["ip", "netns", "exec", ns.name],
      args: ["--tap-name", tap, "--mac", "02:00:00:00:00:42", "--queue-pairs", "2"], driver: netDriver(() => ps, setMtu),
      // Frames went through the pairs' rings (set up in acquire), not the writev fallback.
      logLacks: /io_uring (unavailable|refused|failed)/,
    });
  }

  test.skipIf(!netnsAvailable())("net: two pairs on queue threads, frames both ways through a multi-queue tap in a network namespace, control queue", async () => {
    expect(await netSession(false)).toBe("");
  }, 60_000);

  // NET_SET_MTU's SIOCSIFMTU goes through the AF_INET control socket net opens in acquire (it
  // made a socket per request before).
  (netnsAvailable() ? test : test.skip)("net: the same with NET_SET_MTU (QEMU sends it when it has a host_mtu)", async () => {
    expect(await netSession(true)).toBe("");
  }, 60_000);

  // WavWriter opens its files "w+" and "r+" (O_RDWR): the playback directory is declared with
  // "read" as well as "create" and "write" (Landlock: READ_FILE).
  test("snd: --backend file, playback WAV files created on PREPARE, capture read from a WAV", async () => {
    const dir = testDir("snd-file");
    const capturePath = join(dir, "in.wav");
    const pcm = new Uint8Array(randomBytes(2 * PERIOD));
    writeFileSync(capturePath, Buffer.concat([wavHeader({ format: P.FMT_S16, channels: 2, rateHz: 48000 }, pcm.length), pcm]));
    const raw = { backend: "file", "playback-file": join(dir, "out-{stream}.wav"), "capture-file": capturePath };
    const found = await tracedSession({
      device: "snd", dir, raw, args: ["--backend", "file", "--playback-file", raw["playback-file"], "--capture-file", capturePath], driver: sndDriver(true),
    });
    expect(readdirSync(dir).filter((f) => f.endsWith(".wav")).length).toBeGreaterThanOrEqual(2);
    expect(existsSync(join(dir, "out-0.wav"))).toBe(true);
    expect(found).toBe("");
  }, 60_000);

  // libasound's null plugin opens /dev/null (O_WRONLY, playback) and /dev/full (O_RDONLY,
  // capture) at each PCM_PREPARE: both declared. (The configuration itself is read before ready.)
  test("snd: --backend alsa over ALSA's null PCM (ALSA_CONFIG_PATH in the test directory)", async () => {
    const dir = testDir("snd-alsa");
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, ["pcm.null { type null }", "pcm.default { type null }"].join("\n"));
    const found = await tracedSession({ device: "snd", dir, raw: { backend: "alsa" }, args: ["--backend", "alsa"], env: { ALSA_CONFIG_PATH: conf }, driver: sndDriver(false) });
    expect(found).toBe("");
  }, 60_000);

  test("snd: --backend null", async () => {
    const dir = testDir("snd-null");
    const found = await tracedSession({ device: "snd", dir, raw: { backend: "null" }, args: ["--backend", "null"], driver: sndDriver(false) });
    expect(found).toBe("");
  }, 60_000);
});
