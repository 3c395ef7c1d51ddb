#!/usr/bin/env bun
/**
 * Guest-less block bench: this process is the VMM *and* the guest driver. It maps its own guest RAM,
 * hands it to each vhost-user-blk backend over the socket exactly as QEMU does (memory table, inflight
 * region when offered, split ring of 128 with EVENT_IDX and indirect descriptors: header, one
 * descriptor per 4 KiB data page, status, as Linux's virtio-blk lays requests out), and keeps a fixed number of 4k/128k requests in flight, like fio.
 * No TCG guest in the way, so the backends' host CPU per I/O is measured with little noise, and two
 * builds of ours can be compared back to back (`--ours-bin`) alongside qemu-storage-daemon.
 *
 *   bun run bench:block-ring [--rounds 5] [--seconds 3] [--jobs a,b] [--ours-bin label=PATH ...] [--format raw|qcow2|qcow2-empty|nbd|rbd]
 *                            [--no-qsd] [--qsd PATH] [--perf-stat] [--perf] [--warmup SECONDS] [--scatter] [--one-image]
 *
 * Per job and backend it prints the median IOPS and host CPU µs per I/O (utime+stime of the whole
 * backend process, all threads, from /proc/PID/stat) and each one's ratio to the first backend.
 * The driver itself is single-threaded and busy only between waits on the call eventfd; its own CPU
 * is not counted. Backends run one after the other, never at once, rotating order every round.
 */
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { Epoll, EPOLLIN } from "../ffi/epoll.ts";
import { drain, eventfd, signal } from "../ffi/eventfd.ts";
import { close } from "../ffi/libc.ts";
import { inflightBytes } from "../src/protocol/codec.ts";
import { F_LOG_ALL, F_PROTOCOL_FEATURES, ProtocolFeature } from "../src/protocol/constants.ts";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1 } from "../src/device.ts";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../src/ring.ts";
import { VIRTIO_BLK_T } from "../devices/block/config.ts";
import { FrontendConnection, GuestRam, Req, RING_PACKED, u64, vringAddr, vringState, memTable } from "../test/support/frontend.ts";
import { cpuTicks, cpuTicksSplit, CLK_TCK, createImage, createImages, startNbdServer, startOurs, startQsd, type Backend, type NbdServer } from "./lib/backends.ts";
import { fmt, median, table } from "./lib/stats.ts";
import { CephCluster } from "../test/support/ceph_cluster.ts";
import { jitDumpEnv, startPerf } from "./lib/perf.ts";

const ROOT = resolve(import.meta.dir, "..");

interface Job {
  name: string;
  write: boolean;
  bs: number;
  qd: number;
  sequential: boolean;
}
const JOBS: Job[] = [
  { name: "randread-4k-qd32", write: false, bs: 4096, qd: 32, sequential: false },
  { name: "randread-4k-qd1", write: false, bs: 4096, qd: 1, sequential: false },
  { name: "randwrite-4k-qd32", write: true, bs: 4096, qd: 32, sequential: false },
  { name: "randwrite-4k-qd1", write: true, bs: 4096, qd: 1, sequential: false },
  { name: "read-128k-qd32", write: false, bs: 131072, qd: 32, sequential: true },
];

const QUEUE_SIZE = 128;
const PAGE = 4096;

/** One connected front-end with one split ring, driving requests like a guest's virtio-blk. */
class RingDriver {
  private readonly conn: FrontendConnection;
  private readonly ram: GuestRam;
  private readonly kick: number;
  private readonly call: number;
  private readonly epoll = new Epoll(4);
  private readonly eventIdx: boolean;
  private readonly desc: number;
  private readonly avail: number;
  private readonly used: number;
  /** Per request slot: GPA of its header, data and status, and its indirect table. */
  /** Per request slot: its header, status and indirect table, and the GPA of each 4 KiB page of its data. */
  private readonly slots: { hdr: number; pages: number[]; status: number; table: number }[] = [];
  private availIdx = 0;
  private usedSeen = 0;
  private inflightFd = -1;
  private maxBs = 131072;
  readonly imageSectors: number;

  /**
   * `scatter`: a request's data pages lie apart in guest RAM (as a guest's page cache or fio's
   * buffers usually do), not one after the other.
   */
  constructor(socket: string, imageBytes: number, scatter = false) {
    this.imageSectors = imageBytes / 512;
    this.ram = new GuestRam(64 << 20);
    this.conn = new FrontendConnection(socket, 10_000);
    const c = this.conn;
    const offered = c.requestU64(Req.GET_FEATURES);
    if (!(offered & F_PROTOCOL_FEATURES)) throw new Error("backend does not offer PROTOCOL_FEATURES");
    const proto = c.requestU64(Req.GET_PROTOCOL_FEATURES);
    c.send(Req.SET_PROTOCOL_FEATURES, u64(proto));
    c.send(Req.SET_OWNER);
    // What Linux's virtio-blk and QEMU settle on: the offered features less the packed layout and
    // the vhost-only ones QEMU acks only during migration.
    const features = offered & ~(RING_PACKED | F_LOG_ALL);
    for (const f of [VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1]) if (!(features & f)) throw new Error(`backend lacks feature 0x${f.toString(16)}`);
    this.eventIdx = (features & VIRTIO_F_EVENT_IDX) !== 0n;
    c.send(Req.SET_FEATURES, u64(features));
    c.send(Req.SET_MEM_TABLE, memTable([{ gpa: 0, size: this.ram.size, uaddr: this.ram.uaddr, offset: 0 }]), [this.ram.fd]);
    if (proto & (1n << BigInt(ProtocolFeature.INFLIGHT_SHMFD))) {
      // QEMU's vhost-user-blk always sets up the inflight region when the backend offers it.
      const r = c.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 1, QUEUE_SIZE));
      if (r.fds.length !== 1) throw new Error("GET_INFLIGHT_FD gave no fd");
      this.inflightFd = r.fds[0]!;
      const size = new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true);
      c.send(Req.SET_INFLIGHT_FD, inflightBytes(Number(size), 0, 1, QUEUE_SIZE), [this.inflightFd]);
    }
    this.desc = this.ram.alloc(16 * QUEUE_SIZE, 16);
    this.avail = this.ram.alloc(6 + 2 * QUEUE_SIZE, 2);
    this.used = this.ram.alloc(6 + 8 * QUEUE_SIZE, 4096);
    this.kick = eventfd();
    this.call = eventfd();
    this.epoll.add(this.call, EPOLLIN);
    c.send(Req.SET_VRING_NUM, vringState(0, QUEUE_SIZE));
    c.send(Req.SET_VRING_BASE, vringState(0, 0));
    c.send(Req.SET_VRING_ADDR, vringAddr(0, this.ram.va(this.desc), this.ram.va(this.used), this.ram.va(this.avail)));
    c.send(Req.SET_VRING_CALL, u64(0), [this.call]);
    c.send(Req.SET_VRING_KICK, u64(0), [this.kick]);
    // A synchronous round trip so every message above was taken before requests flow.
    if (c.ack(Req.SET_VRING_ENABLE, vringState(0, 1)) !== 0n) throw new Error("SET_VRING_ENABLE refused");
    for (let i = 0; i < QUEUE_SIZE; i++) {
      this.slots.push({
        hdr: this.ram.alloc(16, 16),
        status: this.ram.alloc(1, 1),
        table: this.ram.alloc(16 * (this.maxBs / PAGE + 2), 16),
        pages: [],
      });
    }
    const busy = this.slots.slice(0, 32);
    const pages = this.maxBs / PAGE;
    if (scatter) {
      // Page p of every slot, then page p+1 of every slot: a slot's pages are 32 pages apart.
      for (let p = 0; p < pages; p++) for (const s of busy) s.pages.push(this.ram.alloc(PAGE, PAGE));
    } else {
      for (const s of busy) {
        const data = this.ram.alloc(this.maxBs, PAGE);
        for (let p = 0; p < pages; p++) s.pages.push(data + p * PAGE);
      }
    }
  }

  /**
   * Lays out slot `i`'s request in descriptor `i`: an indirect table of header, the data one
   * descriptor per 4 KiB page (as Linux's virtio-blk maps a request's bio pages), and status.
   */
  private prepare(i: number, job: Job): void {
    const s = this.slots[i]!;
    const dv = this.ram.dv;
    dv.setUint32(s.hdr, job.write ? VIRTIO_BLK_T.OUT : VIRTIO_BLK_T.IN, true);
    dv.setUint32(s.hdr + 4, 0, true);
    const put = (table: number, n: number, gpa: number, len: number, flags: number, next: number) => {
      const o = table + 16 * n;
      dv.setBigUint64(o, BigInt(gpa), true);
      dv.setUint32(o + 8, len, true);
      dv.setUint16(o + 12, flags, true);
      dv.setUint16(o + 14, next, true);
    };
    const pages = Math.ceil(job.bs / PAGE);
    put(s.table, 0, s.hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    for (let p = 0; p < pages; p++) {
      put(s.table, 1 + p, s.pages[p]!, Math.min(PAGE, job.bs - p * PAGE), VIRTQ_DESC_F_NEXT | (job.write ? 0 : VIRTQ_DESC_F_WRITE), 2 + p);
    }
    put(s.table, 1 + pages, s.status, 1, VIRTQ_DESC_F_WRITE, 0);
    put(this.desc, i, s.table, 16 * (pages + 2), VIRTQ_DESC_F_INDIRECT, 0);
    if (job.write) for (let p = 0; p < pages; p++) this.ram.u8.fill(0xa5, s.pages[p]!, s.pages[p]! + Math.min(PAGE, job.bs - p * PAGE));
  }

  /**
   * Runs `job` for `seconds`; returns the number of I/Os completed and the CPU ticks spent by the
   * backend (`pid`) and by the server behind it (`serverPid`, the NBD server; 0 when there is none).
   */
  run(job: Job, seconds: number, pid: number, seed: number, serverPid = 0): { ios: number; ticks: number; userTicks: number; serverTicks: number; errors: number } {
    for (let i = 0; i < job.qd; i++) this.prepare(i, job);
    const dv = this.ram.dv;
    const u16 = this.ram.u16;
    const availIdxAt = this.avail / 2 + 1;
    const availRing = this.avail / 2 + 2;
    const usedEventAt = this.avail / 2 + 2 + QUEUE_SIZE;
    const usedIdxAt = this.used / 2 + 1;
    const availEventAt = this.used / 2 + 2 + 4 * QUEUE_SIZE;
    const blocks = Math.floor((this.imageSectors * 512) / job.bs);
    let rnd = seed >>> 0;
    let seq = 0;
    const nextSector = () => {
      if (job.sequential) return ((seq++ % blocks) * job.bs) / 512;
      rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0;
      return ((rnd % blocks) * job.bs) / 512;
    };
    const submit = (slot: number) => {
      const s = this.slots[slot]!;
      const sector = nextSector();
      dv.setUint32(s.hdr + 8, sector >>> 0, true);
      dv.setUint32(s.hdr + 12, Math.floor(sector / 2 ** 32), true);
      this.ram.u8[s.status] = 0xff;
      u16[availRing + (this.availIdx % QUEUE_SIZE)] = slot;
      this.availIdx = (this.availIdx + 1) & 0xffff;
    };
    const publishAndKick = (oldIdx: number) => {
      Atomics.store(u16, availIdxAt, this.availIdx);
      // vring_need_event(avail_event, new, old), as Linux's virtqueue_kick_prepare.
      const event = Atomics.load(u16, availEventAt);
      if (!this.eventIdx || ((this.availIdx - event - 1) & 0xffff) < ((this.availIdx - oldIdx) & 0xffff)) signal(this.kick);
    };

    let old = this.availIdx;
    for (let i = 0; i < job.qd; i++) submit(i);
    const t0 = cpuTicksSplit(pid);
    const s0 = serverPid > 0 ? cpuTicks(serverPid) : 0;
    const deadline = performance.now() + seconds * 1000;
    let ios = 0;
    let errors = 0;
    publishAndKick(old);
    let done = false;
    while (!done) {
      if (this.eventIdx) Atomics.store(u16, usedEventAt, this.usedSeen);
      let usedIdx = Atomics.load(u16, usedIdxAt);
      if (usedIdx === this.usedSeen) {
        if (this.epoll.wait(10_000) === 0) throw new Error(`no completion within 10 s (${ios} I/Os done)`);
        drain(this.call);
        usedIdx = Atomics.load(u16, usedIdxAt);
        if (usedIdx === this.usedSeen) continue;
      }
      done = performance.now() >= deadline;
      old = this.availIdx;
      while (this.usedSeen !== usedIdx) {
        const o = this.used + 4 + 8 * (this.usedSeen % QUEUE_SIZE);
        const slot = dv.getUint32(o, true);
        this.usedSeen = (this.usedSeen + 1) & 0xffff;
        if (slot >= job.qd || this.ram.u8[this.slots[slot]!.status] !== 0) errors++;
        ios++;
        if (!done) submit(slot);
      }
      if (!done) publishAndKick(old);
    }
    // Let the rest of the in-flight requests finish so the next job starts on an idle ring.
    const outstanding = (this.availIdx - this.usedSeen) & 0xffff;
    let left = outstanding;
    const drainDeadline = performance.now() + 10_000;
    while (left > 0) {
      if (this.eventIdx) Atomics.store(u16, usedEventAt, this.usedSeen);
      const usedIdx = Atomics.load(u16, usedIdxAt);
      if (usedIdx === this.usedSeen) {
        if (performance.now() > drainDeadline) throw new Error("requests did not finish");
        this.epoll.wait(100);
        drain(this.call);
        continue;
      }
      while (this.usedSeen !== usedIdx) {
        this.usedSeen = (this.usedSeen + 1) & 0xffff;
        left--;
      }
    }
    const t1 = cpuTicksSplit(pid);
    const serverTicks = serverPid > 0 ? cpuTicks(serverPid) - s0 : 0;
    return { ios, ticks: t1.user + t1.system - t0.user - t0.system, userTicks: t1.user - t0.user, serverTicks, errors };
  }

  dispose(): void {
    this.conn.close();
    close(this.kick);
    close(this.call);
    close(this.epoll.fd);
    if (this.inflightFd >= 0) close(this.inflightFd);
    this.ram.dispose();
  }
}


interface Contender {
  label: string;
  ours: boolean;
  start(socket: string, image: string): Promise<Backend>;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      rounds: { type: "string", default: "5" },
      seconds: { type: "string", default: "3" },
      jobs: { type: "string" },
      "ours-bin": { type: "string", multiple: true },
      "no-qsd": { type: "boolean", default: false },
      qsd: { type: "string" },
      "image-mib": { type: "string", default: "1024" },
      format: { type: "string", default: "raw" },
      "ours-arg": { type: "string", multiple: true },
      "perf-stat": { type: "boolean", default: false },
      warmup: { type: "string", default: "1" },
      scatter: { type: "boolean", default: false },
      "one-image": { type: "boolean", default: false },
      perf: { type: "boolean", default: false },
    },
  });
  const rounds = Number(a.rounds);
  const seconds = Number(a.seconds);
  const jobs = a.jobs ? a.jobs.split(",").map((n) => JOBS.find((j) => j.name === n) ?? fail(`unknown job ${n}`)) : JOBS;
  const imageBytes = Number(a["image-mib"]) << 20;
  // raw; qcow2 (64 KiB clusters, every cluster allocated up front); qcow2-empty (allocates as it goes);
  // nbd (one raw image behind one qemu-nbd on a unix socket, the same export for every backend);
  // rbd (one image of a single-node Ceph cluster, test/support/ceph_cluster.ts, memstore OSD: every
  // backend serves the same image, ours by its rbd: spec, qsd through its rbd driver).
  const format = a.format!;
  if (!["raw", "qcow2", "qcow2-empty", "nbd", "rbd"].includes(format)) fail(`--format ${format}: raw, qcow2, qcow2-empty, nbd or rbd`);
  const nbdTarget = format === "nbd";
  const rbdTarget = format === "rbd";
  let cluster: CephCluster | null = null;
  const makeImage = (path: string) => {
    if (format === "raw" || format === "nbd") return createImage(path, imageBytes);
    rmSync(path, { force: true });
    const prealloc = format === "qcow2" ? ",preallocation=falloc" : "";
    const r = Bun.spawnSync(["qemu-img", "create", "-q", "-f", "qcow2", "-o", `cluster_size=65536${prealloc}`, path, String(imageBytes)], { stderr: "pipe" });
    if (r.exitCode !== 0) fail(`qemu-img create failed: ${r.stderr.toString()}`);
  };
  const contenders: Contender[] = [];
  const resultsDir = join(ROOT, "bench", "results");
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "");
  const jitDir = (label: string) => {
    const d = join(resultsDir, `block-ring-${stamp}-${label}-jitdump`);
    mkdirSync(d, { recursive: true });
    return d;
  };
  const bins = a["ours-bin"]?.length ? a["ours-bin"] : [`ours=${join(ROOT, "dist/backend")}`];
  for (const spec of bins) {
    const eq = spec.indexOf("=");
    const label = eq > 0 ? spec.slice(0, eq) : "ours";
    const bin = resolve(eq > 0 ? spec.slice(eq + 1) : spec);
    if (!existsSync(bin)) fail(`${bin} not found (bun run build)`);
    contenders.push({
      label,
      ours: true,
      start: (socket, image) =>
        startOurs("ours", {
          command: [bin],
          // A profiled run is unconfined unless an --ours-arg says otherwise: sandboxed, JSC writes
          // its JITDump (the sandbox declares the directory) but the re-exec'd image's functions
          // come out as "<name not materialized>#hash" (no seccomp filter in the profile, then).
          extraArgs: [...(a["ours-arg"] ?? []), ...(a["one-image"] ? ["--no-lock"] : []), ...(a.perf && !(a["ours-arg"] ?? []).some((x) => x.startsWith("--sandbox")) ? ["--sandbox", "none"] : [])],
          image,
          socket,
          numQueues: 1,
          queueSize: QUEUE_SIZE,
          env: a.perf ? jitDumpEnv(jitDir(label)) : undefined,
        }),
    });
  }
  if (!a["no-qsd"]) {
    const qsd = a.qsd ?? findQsd();
    if (!qsd) fail("qemu-storage-daemon not found: pass --qsd PATH or --no-qsd");
    contenders.push({
      label: "qsd",
      ours: false,
      start: (socket, image) =>
        startQsd("qsd", {
          qsd,
          aio: "threads",
          iothread: false,
          image,
          socket,
          numQueues: 1,
          queueSize: QUEUE_SIZE,
          format: format === "qcow2" || format === "qcow2-empty" ? "qcow2" : "raw",
          nbd: nbdTarget ? { socket: join(dir, "nbd.sock"), exportName: "bench" } : undefined,
          rbd: cluster !== null ? { pool: "rbd", image: "bench", conf: cluster.conf } : undefined,
          noLock: a["one-image"],
        }),
    });
  }

  const dir = mkdtempSync(join(tmpdir(), "bench-ring-"));
  const live: { c: Contender; b: Backend; d: RingDriver }[] = [];
  let server: NbdServer | null = null;
  // Named by our pid: two benches at once (a shared machine) must not remove each other's images.
  const imagePath = (name: string | number) => `/dev/shm/bench-ring-${process.pid}-${name}.img`;
  const NBD_IMAGE = imagePath("nbd");
  try {
    if (nbdTarget) {
      makeImage(NBD_IMAGE);
      server = await startNbdServer(NBD_IMAGE, join(dir, "nbd.sock"), "bench");
    }
    if (rbdTarget) {
      cluster = await CephCluster.start();
      // librbd's cache is writethrough until the client's first flush (a guest flushes early; this
      // driver never does): writeback from the start for both backends, as after a guest's flush.
      appendFileSync(cluster.conf, "\n[client]\nrbd cache writethrough until flush = false\n");
      cluster.createPool("rbd");
      cluster.createImage("rbd", "bench", imageBytes);
      // Every object written once, so reads hit data (a read of an absent object costs the OSD less).
      cluster.rbd(["bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "4", "--io-total", String(imageBytes), "--io-pattern", "seq", "rbd/bench"]);
    }
    const serverPid = server?.pid ?? cluster?.osdPid ?? 0;
    // Raw images are made together, in turn (createImages: each gets the same mix of the host's
    // scattered and contiguous pages; made one after the other, the first one's 128k reads cost up
    // to 50% more CPU whoever serves it).
    const ownImages = server === null && cluster === null;
    // --one-image: every backend serves the same raw image (unlocked; they run one at a time), so
    // a comparison of two builds is not also one of two images' page placement.
    const oneImage = a["one-image"]!;
    if (oneImage && format !== "raw") fail("--one-image: raw images only");
    if (ownImages && format === "raw") createImages(oneImage ? [imagePath(0)] : contenders.map((_, i) => imagePath(i)), imageBytes);
    for (const [i, c] of contenders.entries()) {
      // NBD: every backend serves the one export (ours by its URI, qsd through its nbd driver); RBD likewise.
      const image = server !== null ? server.uri : cluster !== null ? `rbd:rbd/bench:conf=${cluster.conf}` : imagePath(oneImage ? 0 : i);
      if (ownImages && format !== "raw") makeImage(image);
      const b = await c.start(join(dir, `${i}.sock`), image);
      live.push({ c, b, d: new RingDriver(b.socket, imageBytes, a.scatter) });
    }
    console.log(`block ring bench: ${rounds} rounds × ${seconds} s per job and backend; CLK_TCK ${CLK_TCK}`);
    if (server !== null) console.log(`  NBD server (pid ${server.pid}): ${server.argv.join(" ")}`);
    if (cluster !== null) console.log(`  Ceph cluster: one mon, one memstore OSD (pid ${cluster.osdPid}; "server µs/IO" is its CPU), image rbd/bench of ${imageBytes >> 20} MiB, librbd cache writeback`);
    for (const l of live) console.log(`  ${l.c.label}: ${l.b.argv.join(" ")}`);
    // Each backend runs every job once, unmeasured, before the rounds: ours compiles its hot path
    // (JIT) in the first seconds, which is not the steady state a long-lived backend serves in.
    const warmup = Number(a.warmup);
    if (warmup > 0) {
      for (const job of jobs) for (const l of live) l.d.run(job, warmup, l.b.pid, 7);
      process.stderr.write(`warm-up done (${warmup} s per job and backend)\n`);
    }
    const perfs = a.perf
      ? live.filter((l) => l.c.ours).map((l) => {
          const out = join(resultsDir, `block-ring-${stamp}-${l.c.label}.perf.data`);
          return { label: l.c.label, out, rec: startPerf(l.b.pid, out, join(resultsDir, `block-ring-${stamp}-${l.c.label}-jitdump`)) };
        })
      : [];
    const results = new Map<string, { iops: number[]; cpu: number[]; userCpu: number[]; serverCpu: number[]; rounds: number[]; errors: number }>();
    const counters: { job: string; label: string; ios: number; syscalls: number; switches: number; migrations: number; faults: number }[] = [];
    for (let round = 0; round < rounds; round++) {
      for (const job of jobs) {
        const order = live.map((_, i) => live[(i + round) % live.length]!);
        for (const l of order) {
          l.b.assertAlive();
          server?.assertAlive();
          const stat = a["perf-stat"] ? await PerfStat.attach(l.b.pid, dir) : null;
          const r = l.d.run(job, seconds, l.b.pid, 1 + round * 7919, serverPid);
          if (stat !== null) {
            const c = await stat.finish();
            counters.push({ job: job.name, label: l.c.label, ios: r.ios, ...c });
          }
          const key = `${job.name}\0${l.c.label}`;
          const acc = results.get(key) ?? { iops: [], cpu: [], userCpu: [], serverCpu: [], rounds: [], errors: 0 };
          acc.iops.push(r.ios / seconds);
          acc.rounds.push(round);
          acc.cpu.push(((r.ticks / CLK_TCK) * 1e6) / r.ios);
          acc.userCpu.push(((r.userTicks / CLK_TCK) * 1e6) / r.ios);
          acc.serverCpu.push(((r.serverTicks / CLK_TCK) * 1e6) / r.ios);
          acc.errors += r.errors;
          results.set(key, acc);
        }
      }
      process.stderr.write(`round ${round + 1}/${rounds} done\n`);
    }
    for (const p of perfs) {
      const top = await p.rec.stop();
      console.log(`perf of ${p.label}: ${p.out.replace(ROOT + "/", "")}; top symbols:\n` + top.slice(0, 30).map((l) => "  " + l).join("\n") + "\n");
    }
    const base = live[0]!.c.label;
    const rows: string[][] = [];
    for (const job of jobs) {
      const b = results.get(`${job.name}\0${base}`)!;
      for (const l of live) {
        const r = results.get(`${job.name}\0${l.c.label}`)!;
        const iops = median(r.iops);
        const cpu = median(r.cpu);
        rows.push([
          job.name,
          l.c.label,
          fmt(iops, 0),
          fmt(cpu, 2),
          // User-space share (utime): a difference here is our code (or the runtime), not the kernel.
          fmt(median(r.userCpu), 2),
          `${fmt(Math.min(...r.cpu), 2)}–${fmt(Math.max(...r.cpu), 2)}`,
          l.c.label === base ? "1.00" : fmt(iops / median(b.iops), 2),
          l.c.label === base ? "1.00" : fmt(median(r.iops.map((x, i) => x / b.iops[b.rounds.indexOf(r.rounds[i]!)]!)), 2),
          l.c.label === base ? "1.00" : fmt(cpu / median(b.cpu), 3),
          // Ratios of samples taken in the same round (back to back): cancels slow drift of the host.
          l.c.label === base ? "1.00" : fmt(median(r.cpu.map((c, i) => c / b.cpu[b.rounds.indexOf(r.rounds[i]!)]!)), 3),
          ...(serverPid !== 0 ? [fmt(median(r.serverCpu), 2)] : []),
          String(r.errors),
        ]);
      }
    }
    // The NBD server's (the OSD's) CPU is common to both backends (what each one's requests cost it): not in theirs.
    console.log(table(["job", "backend", "IOPS", "CPU µs/IO", "user µs/IO", "range", `IOPS/${base}`, "paired", `CPU/${base}`, "paired", ...(serverPid !== 0 ? ["server µs/IO"] : []), "errors"], rows));
    if (counters.length > 0) {
      const crow: string[][] = [];
      for (const job of jobs) {
        for (const l of live) {
          const cs = counters.filter((c) => c.job === job.name && c.label === l.c.label);
          const perIo = (f: (c: (typeof cs)[number]) => number, digits: number) => fmt(median(cs.map((c) => f(c) / c.ios)), digits);
          crow.push([job.name, l.c.label, perIo((c) => c.syscalls, 2), perIo((c) => c.switches, 2), perIo((c) => c.migrations * 1000, 2), perIo((c) => c.faults * 1000, 2)]);
        }
      }
      console.log("\nperf stat (whole process, all threads; medians per I/O):");
      console.log(table(["job", "backend", "syscalls/IO", "context switches/IO", "migrations/1000 IO", "page faults/1000 IO"], crow));
    }
  } finally {
    for (const l of live) {
      l.d.dispose();
      await l.b.stop();
    }
    await server?.stop();
    await cluster?.stop();
    rmSync(dir, { recursive: true, force: true });
    for (let i = 0; i < contenders.length; i++) rmSync(imagePath(i), { force: true });
    rmSync(NBD_IMAGE, { force: true });
  }
}

/** `perf stat -p PID` around one job: syscalls and context switches of the whole process. */
class PerfStat {
  private constructor(private readonly proc: ReturnType<typeof Bun.spawn>, private readonly out: string) {}

  static async attach(pid: number, dir: string): Promise<PerfStat> {
    const out = join(dir, `perf-stat-${pid}.csv`);
    const proc = Bun.spawn(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches,cpu-migrations,page-faults", "-p", String(pid), "-o", out], {
      stdout: "ignore",
      stderr: "inherit",
    });
    await Bun.sleep(200); // attached before the job starts
    return new PerfStat(proc, out);
  }

  async finish(): Promise<{ syscalls: number; switches: number; migrations: number; faults: number }> {
    this.proc.kill("SIGINT");
    await this.proc.exited;
    const text = await Bun.file(this.out).text();
    const value = (event: string) => {
      const line = text.split("\n").find((l) => l.includes(event));
      const n = line === undefined ? NaN : Number(line.split(",")[0]);
      if (!Number.isFinite(n)) throw new Error(`perf stat gave no ${event} count:\n${text}`);
      return n;
    };
    return {
      syscalls: value("raw_syscalls:sys_enter"),
      switches: value("context-switches"),
      migrations: value("cpu-migrations"),
      faults: value("page-faults"),
    };
  }
}

function findQsd(): string | null {
  for (const p of ["/usr/bin/qemu-storage-daemon", "/usr/local/bin/qemu-storage-daemon"]) if (existsSync(p)) return p;
  const w = Bun.which("qemu-storage-daemon");
  return w ?? null;
}

function fail(msg: string): never {
  console.error(msg);
  process.exit(2);
}

await main();
