// The NBD disk (devices/block/disk/nbd.ts) through the Disk interface, against real servers
// (qemu-nbd, and nbdkit with filters for servers that lack FUA, write-zeroes or multi-conn, or
// that limit the request size) on unix sockets: data against a mirror with requests in flight at
// once, every request type and its flags, read-only exports, servers that go away in the middle of
// a burst (nothing failed, nothing lost), --nbd-timeout, and the start-up errors.
import { describe, test, expect, afterEach, spyOn } from "bun:test";
import { toArrayBuffer } from "bun:ffi";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { rng, randomBytes } from "../support/block_disk.ts";
import { NbdServer, disposeNbdServers, nbdTestsUnavailable } from "../support/nbd_server.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { EPOLLIN } from "../../ffi/epoll.ts";
import { eventfd, signal, drain } from "../../ffi/eventfd.ts";
import { close } from "../../ffi/libc.ts";
import { log } from "../../src/log.ts";
import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS } from "../../ffi/mem.ts";
import { acquireNbdDisk, openNbdDisk, nbdHostAccess, isNbdUri, type NbdDisk, type NbdDiskResource } from "../../devices/block/disk/nbd.ts";
import { ZERO_UNMAP, ZERO_FUA, ZERO_MAY_FAIL_FAST, type DiskQueue, type DiskRequest } from "../../devices/block/disk/disk.ts";

const MiB = 1 << 20;
const EIO = 5;
const EROFS = 30;
const EOPNOTSUPP = 95;
const ETIMEDOUT = 110;

const unavailable = nbdTestsUnavailable();
if (unavailable !== null) console.warn(`NBD tests skipped: ${unavailable}`);
const maybe = unavailable === null ? describe : describe.skip;

/** "Guest memory": one anonymous mapping that buffers are carved from, as guest RAM is. */
class Memory {
  readonly base: number;
  readonly bytes: Uint8Array;
  private next = 0;
  constructor(readonly size: number) {
    this.base = mmap(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    this.bytes = new Uint8Array(toArrayBuffer(this.base as never, 0, size));
  }
  /** `len` bytes at `align` (+ misalign), never adjacent to the previous buffer (separate runs). */
  alloc(len: number, align = 512): number {
    this.next = Math.ceil((this.next + 64) / align) * align;
    if (this.next + len > this.size) this.next = 0;
    const at = this.next;
    this.next += len;
    return at;
  }
  close(): void {
    munmap(this.base, this.size);
  }
}

interface Piece {
  at: number;
  len: number;
}

/** One NBD disk and one queue on a loop; completions recorded by slot. */
class Rig {
  readonly loop = new EventLoop();
  readonly disk: NbdDisk;
  readonly io: DiskQueue;
  readonly mem = new Memory(64 * MiB);
  readonly results: number[] = [];
  batches = 0;

  constructor(readonly resource: NbdDiskResource, depth = 64) {
    this.disk = openNbdDisk(resource, true);
    this.io = this.disk.attach(this.loop, { depth, segMax: 64 }, {
      done: (_req, result) => void this.results.push(result),
      batchDone: () => void this.batches++,
    });
  }

  static async open(server: NbdServer, o: { readOnly?: boolean; timeoutMs?: number; depth?: number } = {}): Promise<Rig> {
    return new Rig(acquireNbdDisk(server.uri, { readOnly: o.readOnly ?? false, timeoutMs: o.timeoutMs ?? 0 }), o.depth);
  }

  /** Places `data` (or room for `len` bytes) in memory as `pieces` separate buffers. */
  buffers(len: number, pieces: number, r: () => number, data?: Uint8Array): Piece[] {
    const sizes: number[] = [];
    let left = len;
    for (let i = pieces; i > 1; i--) {
      const n = 512 * Math.max(1, Math.floor((r() * 2 * (left / 512)) / i));
      if (n >= left) break;
      sizes.push(n);
      left -= n;
    }
    sizes.push(left);
    let off = 0;
    return sizes.map((n) => {
      const at = this.mem.alloc(n);
      if (data !== undefined) this.mem.bytes.set(data.subarray(off, off + n), at);
      off += n;
      return { at, len: n };
    });
  }

  slot(pieces: Piece[]): DiskRequest {
    const req = this.io.next();
    if (req === null) throw new Error("no free slot");
    req.iov.clear();
    for (const p of pieces) req.iov.push(this.mem.base + p.at, p.len);
    return req;
  }

  gathered(pieces: Piece[]): Uint8Array {
    return Buffer.concat(pieces.map((p) => this.mem.bytes.subarray(p.at, p.at + p.len)));
  }

  /** Submits, then serves the loop until nothing is in flight. */
  settle(timeoutMs = 10_000): void {
    this.io.submit();
    const deadline = Date.now() + timeoutMs;
    while (this.io.inFlight > 0) {
      if (Date.now() > deadline) throw new Error(`${this.io.inFlight} operations still in flight`);
      this.loop.runOnce(20);
    }
  }

  /** Serves the loop for `ms` (requests may stay in flight). */
  spin(ms: number): void {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) this.loop.runOnce(10);
  }

  take(): number[] {
    return this.results.splice(0);
  }

  close(): void {
    this.io.close();
    this.disk.close();
    this.loop.dispose();
    this.mem.close();
  }
}

const rigs: Rig[] = [];
async function rig(server: NbdServer, o: { readOnly?: boolean; timeoutMs?: number; depth?: number } = {}): Promise<Rig> {
  const g = await Rig.open(server, o);
  rigs.push(g);
  return g;
}

afterEach(async () => {
  for (const g of rigs.splice(0)) g.close();
  await disposeNbdServers();
});

/**
 * A burst of non-overlapping reads and writes (random sizes, 1-12 buffers each; some requests big
 * enough to go one command per memory run), all in flight at once; checks every result and every
 * read against the mirror and updates it with the writes.
 */
function burst(g: Rig, mirror: Uint8Array, r: () => number, count: number, o: { fua?: boolean; settle?: boolean; taken?: Set<number> } = {}): Burst {
  // 4 KiB blocks that requests in flight together use: none touches another's.
  const taken = o.taken ?? new Set<number>();
  const reads: { at: number; pieces: Piece[] }[] = [];
  let expected = 0;
  for (let k = 0; k < count && g.io.next() !== null; k++) {
    const big = r() < 0.1;
    const len = big ? 4096 * (1100 + Math.floor(r() * 400)) : 512 * (1 + Math.floor(r() * 256));
    const at = 4096 * Math.floor(r() * ((mirror.length - len) / 4096));
    let clash = false;
    for (let b = Math.floor(at / 4096); b < Math.ceil((at + len) / 4096); b++) if (taken.has(b)) clash = true;
    if (clash) continue;
    for (let b = Math.floor(at / 4096); b < Math.ceil((at + len) / 4096); b++) taken.add(b);
    const pieces = 1 + Math.floor(r() * 12);
    if (r() < 0.5) {
      const data = randomBytes(r, len);
      g.io.write(g.slot(g.buffers(len, pieces, r, data)), at, len, o.fua ?? r() < 0.2);
      mirror.set(data, at);
    } else {
      const bufs = g.buffers(len, pieces, r);
      g.io.read(g.slot(bufs), at, len);
      reads.push({ at, pieces: bufs });
    }
    expected++;
  }
  const checkReads = () => {
    for (const { at, pieces } of reads) {
      const got = g.gathered(pieces);
      expect(Buffer.compare(got, mirror.subarray(at, at + got.length))).toBe(0);
    }
  };
  if (o.settle ?? true) {
    g.settle();
    const results = g.take();
    expect(results.length).toBe(expected);
    expect(results.filter((x) => x < 0)).toEqual([]);
    checkReads();
  }
  return { expected, checkReads };
}

interface Burst {
  /** Requests made. */
  expected: number;
  /** Every read returned the mirror's bytes. */
  checkReads(): void;
}

/** Settles, then checks that the bursts' requests all succeeded and their reads match. */
function settleBursts(g: Rig, ...bursts: Burst[]): void {
  g.settle();
  const results = g.take();
  expect(results.length).toBe(bursts.reduce((n, b) => n + b.expected, 0));
  expect(results.filter((x) => x < 0)).toEqual([]);
  for (const b of bursts) b.checkReads();
}

maybe("NBD disk", () => {
  test("URIs, host access and the export's geometry (qemu-nbd)", async () => {
    const s = new NbdServer({ size: 12 * MiB });
    await s.start();
    expect(isNbdUri(s.uri)).toBe(true);
    expect(isNbdUri("nbd://10.0.0.1/disk")).toBe(true);
    expect(isNbdUri("/var/lib/nbd.img")).toBe(false);
    expect(nbdHostAccess(s.uri)).toMatchObject({ unixSockets: [s.socket], tcp: [], hostNetwork: false });
    expect(nbdHostAccess("nbd://storage.example:10999/vm1")).toMatchObject({ unixSockets: [], tcp: ["storage.example:10999"], hostNetwork: true });
    expect(nbdHostAccess("nbd://10.1.2.3/vm1").tcp).toEqual(["10.1.2.3:10809"]);
    const g = await rig(s);
    expect(g.disk.size).toBe(12 * MiB);
    expect(g.disk.currentSize()).toBe(12 * MiB);
    expect(g.disk.logicalBlockSize).toBe(512);
    expect(g.disk.physicalBlockSize).toBe(4096);
    expect(g.disk.readOnly).toBe(false);
    expect(g.disk.multiThread).toBe(true); // qemu-nbd -e 64 advertises multi-conn
    const id = g.disk.identity();
    expect(id).toMatchObject({ location: s.uri, size: 12 * MiB });
    // The identity names the export, not the socket path it is reached by (another host's path).
    const other = acquireNbdDisk(s.uri, { readOnly: false, timeoutMs: 0 });
    expect(openNbdDisk({ ...other, uri: `nbd+unix:///disk?socket=/elsewhere.sock` }, true).identity().ino).toBe(id.ino);
  });

  test("reads and writes in flight at once match a mirror, through the guest's scattered buffers", async () => {
    const r = rng(11);
    const mirror = randomBytes(r, 32 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s);
    for (let round = 0; round < 6; round++) burst(g, mirror, r, 48);
    g.io.flush(g.io.next()!);
    g.settle();
    expect(g.take()).toEqual([0]);
    expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
  });

  test("flush, FUA, discard and write zeroes with every flag", async () => {
    const r = rng(12);
    const mirror = randomBytes(r, 8 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s);
    const zeroOps: [number, number, number][] = [
      [0, 64 * 1024, ZERO_UNMAP],
      [128 * 1024, 4096, 0],
      [256 * 1024, 512 * 1024, ZERO_UNMAP | ZERO_FUA],
      [2 * MiB, 8192, ZERO_FUA],
    ];
    for (const [at, len, flags] of zeroOps) {
      g.io.writeZeroes(g.io.next()!, at, len, flags);
      mirror.fill(0, at, at + len);
    }
    g.io.discard(g.io.next()!, 4 * MiB, 1 * MiB);
    g.io.flush(g.io.next()!);
    g.settle();
    expect(g.take()).toEqual([0, 0, 0, 0, 0, 0]);
    // Discarded: qemu-nbd --discard=unmap punches the hole, so those bytes read back as zeroes.
    mirror.fill(0, 4 * MiB, 5 * MiB);
    // Fast zeroing may be refused (-EOPNOTSUPP, and then nothing changed) but never emulated slowly.
    g.io.writeZeroes(g.io.next()!, 6 * MiB, 64 * 1024, ZERO_MAY_FAIL_FAST | ZERO_UNMAP);
    g.settle();
    const [fast] = g.take();
    expect([0, -EOPNOTSUPP]).toContain(fast!);
    if (fast === 0) mirror.fill(0, 6 * MiB, 6 * MiB + 64 * 1024);
    burst(g, mirror, r, 16, { fua: true });
    g.io.flush(g.io.next()!);
    g.settle();
    expect(g.take()).toEqual([0]);
    expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
  });

  test("a server without FUA, write-zeroes or multi-conn, and a 64 KiB request limit (nbdkit filters)", async () => {
    const r = rng(13);
    const mirror = randomBytes(r, 8 * MiB);
    const s = new NbdServer({
      server: "nbdkit",
      content: mirror,
      nbdkitArgs: ["--filter=blocksize-policy", "--filter=fua", "--filter=nozero", "--filter=multi-conn",
        "blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error",
        "zeromode=none", "multi-conn-mode=disable"], // the fua filter's default mode: no FUA
    });
    await s.start();
    const g = await rig(s);
    expect(g.resource).toMatchObject({ canFua: false, canZero: false, multiConn: false, maxPayload: 65536 });
    expect(g.disk.multiThread).toBe(false);
    // Requests up to several MiB: split into 64 KiB commands (the server refuses bigger ones).
    for (let round = 0; round < 3; round++) burst(g, mirror, r, 24);
    // Write zeroes becomes writes of zero pages; asked to fail fast instead, it does.
    g.io.writeZeroes(g.io.next()!, 1 * MiB, 3 * MiB + 4096, ZERO_UNMAP | ZERO_FUA);
    mirror.fill(0, 1 * MiB, 4 * MiB + 4096);
    g.settle();
    expect(g.take()).toEqual([0]);
    g.io.writeZeroes(g.io.next()!, 6 * MiB, 4096, ZERO_MAY_FAIL_FAST);
    g.settle();
    expect(g.take()).toEqual([-EOPNOTSUPP]);
    expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
  });

  test("an error the server returns fails that request only; the connection stays", async () => {
    const s = new NbdServer({
      server: "nbdkit",
      size: 4 * MiB,
      nbdkitArgs: ["--filter=error", "error=EIO", "error-pread-rate=100%", `error-pread-file=${"/nonexistent"}`],
    });
    // The error filter fails reads while its trigger file exists.
    const trigger = join(s.dir, "fail-reads");
    s.options.nbdkitArgs![3] = `error-pread-file=${trigger}`;
    await s.start();
    const g = await rig(s);
    const buf = g.buffers(4096, 1, rng(1));
    g.io.read(g.slot(buf), 0, 4096);
    g.settle();
    expect(g.take()).toEqual([4096]);
    writeFileSync(trigger, "");
    g.io.read(g.slot(buf), 0, 4096);
    g.io.write(g.slot(buf), 8192, 4096, false);
    g.settle();
    expect(g.take().sort()).toEqual([-EIO, 4096].sort());
    expect(g.disk.connection.reconnects).toBe(0);
  });

  test("a read-only export, and --read-only on a writable one, refuse writes and serve reads", async () => {
    const r = rng(14);
    const content = randomBytes(r, 4 * MiB);
    for (const [serverRo, optionRo] of [[true, false], [false, true]] as const) {
      const s = new NbdServer({ content, readOnly: serverRo });
      await s.start();
      const g = await rig(s, { readOnly: optionRo });
      expect(g.disk.readOnly).toBe(true);
      expect(g.resource.exportReadOnly).toBe(serverRo);
      const data = randomBytes(r, 8192);
      g.io.write(g.slot(g.buffers(8192, 2, r, data)), 0, 8192, false);
      g.io.writeZeroes(g.io.next()!, 0, 4096, 0);
      g.io.discard(g.io.next()!, 0, 4096);
      const bufs = g.buffers(65536, 3, r);
      g.io.read(g.slot(bufs), 4096, 65536);
      g.io.flush(g.io.next()!);
      g.settle();
      expect(g.take()).toEqual([-EROFS, -EROFS, -EROFS, 0, 65536]); // refusals and the flush at once, the read later
      expect(Buffer.compare(g.gathered(bufs), content.subarray(4096, 4096 + 65536))).toBe(0);
      expect(Buffer.compare(readFileSync(s.image), content)).toBe(0);
    }
  });

  test("start-up errors say what is wrong and what to do", async () => {
    const s = new NbdServer();
    await s.start();
    const o = { readOnly: false, timeoutMs: 0 };
    expect(() => acquireNbdDisk(`nbd+unix:///nope?socket=${s.socket}`, o)).toThrow(/no export named 'nope'.*fix EXPORT in the URI/);
    expect(() => acquireNbdDisk(`nbd+unix:///disk?socket=${s.dir}/missing.sock`, o)).toThrow(/No such file.*start the NBD server \(qemu-nbd -k PATH, nbdkit -U PATH\) or fix socket=/);
    expect(() => acquireNbdDisk("nbd://127.0.0.1:1/disk", o)).toThrow(/refused.*nothing listens there: start the NBD server or fix HOST:PORT/);
    expect(() => acquireNbdDisk("nbdx://host/disk", o)).toThrow(/--file nbdx:\/\/host\/disk/);
  });

  test("the server restarts in the middle of a burst: requests wait, are resent, none fails, none is lost; one warning", async () => {
    const r = rng(15);
    const mirror = randomBytes(r, 32 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s, { depth: 128 });
    const warn = spyOn(log, "warn");
    const info = spyOn(log, "info");
    try {
      for (let outage = 0; outage < 3; outage++) {
        const taken = new Set<number>();
        const first = burst(g, mirror, r, 96, { settle: false, taken });
        g.io.submit();
        g.loop.runOnce(0); // some replies may come, most not
        await s.stop();
        g.spin(150); // the loss is seen; attempts fail while the server is away
        // More requests while it is down: they wait too.
        const second = burst(g, mirror, r, 16, { settle: false, taken });
        g.io.submit();
        g.spin(100);
        expect(g.io.inFlight).toBeGreaterThan(0);
        await s.start();
        settleBursts(g, first, second);
      }
      expect(g.disk.connection.reconnects).toBe(3);
      const outageWarnings = warn.mock.calls.filter((c) => String(c[0]).includes("lost the connection"));
      expect(outageWarnings.length).toBe(3);
      expect(info.mock.calls.filter((c) => String(c[0]).includes("connected again")).length).toBe(3);
    } finally {
      warn.mockRestore();
      info.mockRestore();
    }
    g.io.flush(g.io.next()!);
    g.settle();
    expect(g.take()).toEqual([0]);
    expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
  });

  test("over TCP (nbd://localhost:PORT/EXPORT, the server on 127.0.0.1 only): I/O, and a restart under a burst", async () => {
    const r = rng(18);
    const mirror = randomBytes(r, 8 * MiB);
    // "localhost" may resolve to ::1 first: libnbd then moves on to the next address on a new socket.
    const s = new NbdServer({ content: mirror, tcpPort: 20000 + Math.floor(Math.random() * 20000) });
    await s.start();
    const g = await rig(s);
    burst(g, mirror, r, 32);
    const taken = new Set<number>();
    const b = burst(g, mirror, r, 32, { settle: false, taken });
    g.io.submit();
    await s.stop();
    g.spin(300);
    await s.start();
    settleBursts(g, b); // whatever was in flight when it went away
    burst(g, mirror, r, 16); // and new requests, which need the new connection
    expect(g.disk.connection.reconnects).toBe(1);
    expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
  });

  test("--nbd-timeout: waiting requests fail once the outage outlasts it, new ones at once, until the server is back", async () => {
    const r = rng(16);
    const mirror = randomBytes(r, 4 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s, { timeoutMs: 300 });
    await s.stop();
    const buf = g.buffers(4096, 1, r);
    g.io.read(g.slot(buf), 0, 4096);
    g.io.submit();
    g.spin(150);
    expect(g.take()).toEqual([]); // still waiting
    g.spin(400);
    expect(g.take()).toEqual([-ETIMEDOUT]);
    g.io.read(g.slot(buf), 0, 4096);
    expect(g.take()).toEqual([-ETIMEDOUT]); // at once
    await s.start();
    // The next attempt finds it (attempts back off to 2 s apart: wait for it, not for a fixed time).
    const deadline = Date.now() + 10_000;
    while (!g.disk.connection.connected && Date.now() < deadline) g.loop.runOnce(20);
    g.io.read(g.slot(buf), 0, 4096);
    g.settle();
    expect(g.take()).toEqual([4096]);
    expect(Buffer.compare(g.gathered(buf), mirror.subarray(0, 4096))).toBe(0);
  });

  test("a drain() earlier in the loop's turn reads the reply the NBD socket was readable for: the stale readiness is not passed on, and later requests still go out", async () => {
    // What a queue stopped by a vhost-user message (GET_VRING_BASE, SET_LOG_BASE) does when that
    // message and a reply come in the same epoll batch: drain() reads the reply, and the socket's
    // readiness in the batch is stale by the time its handler runs. Telling libnbd the socket is
    // readable then parks it in a reply read that never comes (REPLY.START, EAGAIN): every later
    // command waits behind it, unsent, and the next drain() waits for ever.
    const r = rng(23);
    const mirror = randomBytes(r, 1 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s);
    const message = eventfd();
    try {
      // Ready first, so the message comes before the socket in the batch (epoll's ready list is FIFO).
      g.loop.add(message, EPOLLIN, () => {
        drain(message);
        g.io.drain();
      });
      signal(message);
      const first = g.buffers(4096, 1, r);
      g.io.read(g.slot(first), 0, 4096);
      g.io.submit();
      Bun.sleepSync(100); // the reply is in the socket before the loop turns
      g.loop.runOnce(0);
      expect(g.io.inFlight).toBe(0);
      expect(g.take()).toEqual([4096]);
      expect(Buffer.compare(g.gathered(first), mirror.subarray(0, 4096))).toBe(0);
      const second = g.buffers(4096, 1, r);
      g.io.read(g.slot(second), 8192, 4096);
      g.settle(2_000);
      expect(g.take()).toEqual([4096]);
      expect(Buffer.compare(g.gathered(second), mirror.subarray(8192, 12288))).toBe(0);
    } finally {
      g.loop.remove(message);
      close(message);
    }
  });

  test("drain() blocks through an outage until the server is back (a queue being stopped)", async () => {
    const r = rng(17);
    const mirror = randomBytes(r, 8 * MiB);
    const s = new NbdServer({ content: mirror });
    await s.start();
    const g = await rig(s);
    await s.stop();
    const b = burst(g, mirror, r, 32, { settle: false });
    g.io.submit();
    // The server comes back 400 ms from now, started by a shell: this thread is blocked in drain.
    const later = Bun.spawn(["sh", "-c", `sleep 0.4; exec qemu-nbd -f raw -k ${s.socket} -x ${s.exportName} -e 64 -t ${s.image}`], { stdout: "ignore", stderr: "ignore" });
    try {
      const t0 = Date.now();
      g.io.drain();
      expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
      expect(g.io.inFlight).toBe(0);
      expect(g.batches).toBeGreaterThan(0);
      const results = g.take();
      expect(results.length).toBe(b.expected);
      expect(results.filter((x) => x < 0)).toEqual([]);
      b.checkReads();
      expect(Buffer.compare(readFileSync(s.image), mirror)).toBe(0);
    } finally {
      later.kill("SIGKILL");
      await later.exited;
    }
  });
});

