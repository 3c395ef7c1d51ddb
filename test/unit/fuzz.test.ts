// Seeded fuzzing of the two untrusted inputs: front-end messages and guest rings. The backend must
// answer or drop the connection, never crash or hang, and keep serving afterwards.
import { describe, test, expect, afterEach } from "bun:test";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, FrontendConnection, Req, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../support/frontend.ts";
import { PackedDriverQueue, startPackedQueue, getVringBase } from "../support/packed_driver.ts";
import { setLogLevel } from "../../src/log.ts";
import { eventfd, signal, drain } from "../../ffi/eventfd.ts";
import { SpawnedBackend, GuestMemfd, GuestSpace, Ring, Bump, HostileFront, blkRequest, blkGetId, eventually } from "../support/hostile.ts";
import { close } from "../../ffi/libc.ts";
import { HEADER_SIZE } from "../../src/protocol/constants.ts";
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { xorshift } from "../support/random.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;

const rng = xorshift;

let cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanup.reverse()) await c();
  cleanup = [];
});

/** True if the backend still answers a simple request on a fresh connection. */
function alive(path: string): boolean {
  const c = new FrontendConnection(path, 3000);
  try {
    return c.requestU64(Req.GET_QUEUE_NUM) === 2n;
  } finally {
    c.close();
  }
}

describe("fuzz", () => {
  test("random front-end messages (seed 1234): answered or dropped, never fatal", async () => {
    const backend = new BackendUnderTest("echo", {}, ECHO);
    await backend.ready;
    cleanup.push(() => backend.stop());
    const ram = new GuestRam(1 << 20);
    cleanup.push(() => ram.dispose());
    const r = rng(1234);
    let conn = new FrontendConnection(backend.socketPath, 20);
    let dropped = 0;
    for (let i = 0; i < 300; i++) {
      // Mostly valid headers with random codes, sizes and payloads; sometimes garbage flags.
      const code = r(4) === 0 ? r(1 << 16) : 1 + r(46);
      const size = r(8) === 0 ? r(5000) : [0, 8, 12, 16, 24, 40, 264][r(7)]! + (r(4) === 0 ? r(9) - 4 : 0);
      const flags = r(10) === 0 ? r(256) : 0x1 | (r(2) ? 0x8 : 0);
      const payload = new Uint8Array(Math.max(0, Math.min(size, 4096)));
      for (let j = 0; j < payload.length; j++) payload[j] = r(4) === 0 ? r(256) : 0;
      const msg = new Uint8Array(HEADER_SIZE + payload.length);
      const v = new DataView(msg.buffer);
      v.setUint32(0, code, true);
      v.setUint32(4, flags, true);
      v.setUint32(8, size, true);
      msg.set(payload, HEADER_SIZE);
      const fds = r(3) === 0 ? [r(2) ? ram.fd : eventfd()] : [];
      try {
        conn.sendRaw(msg, fds);
        // Drain whatever comes back; a silent backend is fine (no reply required), a closed one too.
        try {
          conn.recv();
        } catch {
          /* timeout or closed */
        }
      } catch {
        /* the backend dropped us mid-send */
      }
      for (const fd of fds) if (fd !== ram.fd) close(fd);
      if (i % 20 === 19 || (flags & ~0xb) !== 0 || size > 4096) {
        conn.close();
        dropped++;
        conn = new FrontendConnection(backend.socketPath, 20);
      }
    }
    conn.close();
    expect(dropped).toBeGreaterThan(0);
    await Bun.sleep(20);
    expect(alive(backend.socketPath)).toBe(true);
  }, 60_000);

  test.each(["echo", "block"])("random descriptor tables and buffers (seed 99) on %s: chains completed or skipped, the device survives", async (device) => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-fuzz-"));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, "disk.img");
    writeFileSync(image, new Uint8Array(1 << 20));
    const backend = device === "echo" ? new BackendUnderTest("echo", {}, ECHO) : new BackendUnderTest("block", { file: image, "num-queues": "2", threads: "0" });
    await backend.ready;
    cleanup.push(() => backend.stop());
    const ram = new GuestRam(1 << 20);
    cleanup.push(() => ram.dispose());
    const vmm = new Vmm(backend, ram);
    cleanup.push(() => vmm.dispose());
    vmm.activate(1, 64);
    const q = vmm.queues[0] as DriverQueue;
    const r = rng(99);
    for (let i = 0x10000; i < ram.size; i += 4) ram.dv.setUint32(i, r(2) ? r(0xffffffff) : r(16), true); // headers, garbage
    for (let round = 0; round < 30; round++) {
      // Fill the descriptor table with random entries pointing anywhere (inside RAM or not).
      for (let i = 0; i < q.size; i++) {
        const addr = r(4) === 0 ? r(0xffffffff) * 4096 : 0x1000 + r(ram.size);
        q.writeDesc(q.desc, i, addr, r(3) === 0 ? r(1 << 20) : r(512), r(8), r(4) === 0 ? r(70000) & 0xffff : r(q.size));
      }
      const heads = 1 + r(8);
      for (let h = 0; h < heads; h++) q.publish(r(q.size + 4), false);
      signal(q.kick);
      await Bun.sleep(5);
      q.takeUsed();
    }
    // The ring still works: a well-formed chain is completed (echo: its bytes; block: a GET_ID).
    const src = ram.alloc(16);
    ram.bytes(src, 16).set(device === "echo" ? Buffer.from("good") : new Uint8Array([8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    const dst = ram.alloc(32);
    ram.bytes(dst, 32).fill(0xee);
    q.writeDesc(q.desc, 0, src, device === "echo" ? 4 : 16, 1, 1);
    q.writeDesc(q.desc, 1, dst, device === "echo" ? 16 : 21, 2, 0);
    q.publish(0);
    const deadline = Date.now() + 5000;
    let done = false;
    while (Date.now() < deadline && !done) {
      for (const u of q.takeUsed()) if (u.id === 0 && u.len > 0) done = true;
      await Bun.sleep(2);
    }
    expect(done).toBe(true);
    if (device === "echo") expect(Buffer.from(ram.bytes(dst, 4)).toString()).toBe("good");
    else expect(ram.bytes(dst, 32)[20]).toBe(0); // VIRTIO_BLK_S_OK after the 20-byte id
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  }, 60_000);
});

// ---- hostile ring positions (audit findings 1 and 2's error fd): seeded, against a subprocess ----
// The backend runs in a subprocess (test/support/hostile.ts), so a hang is a reply timeout and a
// spinning thread is killed with it. Each round is a well-behaved request or one hostile event: the
// available index jumped more than a ring's worth in one store, a SET_VRING_BASE that disagrees with
// the guest's index, or (block) a read whose buffer is the available ring itself, with an index from
// the image. After each event the session must still answer, GET_VRING_BASE must stop the ring, and
// the restarted ring must serve requests again.

describe("fuzz: hostile ring positions", () => {
  const kinds: [string, "console" | "block", string[]][] = [
    ["console", "console", []],
    ["block --threads 0", "block", ["--threads", "0"]],
    ["block --threads 1", "block", ["--threads", "1"]],
  ];
  test.each(kinds)("seed 4242 on %s: avail-index jumps, bad SET_VRING_BASE, reads over the ring; the session goes on", async (_label, device, extra) => {
    const SIZE = 64;
    const r = rng(4242);
    const dir = mkdtempSync(join(tmpdir(), "vhu-fuzz-hostile-"));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    // Block: sectors 0..15 each hold a random avail->idx at bytes 2..3 (read over the ring).
    const image = join(dir, "disk.img");
    const img = new Uint8Array(8 << 20);
    for (let s = 0; s < 16; s++) new DataView(img.buffer).setUint16(s * 512 + 2, r(0x10000), true);
    writeFileSync(image, img);
    const out = join(dir, "out");
    const args = device === "console" ? ["--output-file", out] : ["--file", image, "--num-queues", "1", "--queue-size", String(SIZE), ...extra];
    const backend = await SpawnedBackend.start(device, args);
    cleanup.push(() => backend.kill());
    const mem = new GuestMemfd(16 << 20);
    cleanup.push(() => mem.dispose());
    const space = GuestSpace.of({ mem, gpa: 0 });
    const f = new HostileFront(backend.socketPath, 2000);
    cleanup.push(() => f.close());
    f.handshake();
    expect(f.setMemTable(space)).toBe(0n);
    const rings = Array.from({ length: device === "console" ? 2 : 1 }, (_, i) => Ring.at(space, i, SIZE, 0x10000 + i * 0x10000));
    for (const q of rings) cleanup.push(() => q.dispose());
    const q = rings[device === "console" ? 1 : 0]!;
    for (const ring of rings) f.startRing(ring);
    let bump = new Bump(1 << 20, 16 << 20);
    let serial = 0;

    const goodRequest = async (what: string) => {
      if (device === "block") {
        expect(`${what}: GET_ID status ${await blkGetId(space, q, bump, 3000).catch((e) => (e as Error).message)}`).toBe(`${what}: GET_ID status 0`);
        return;
      }
      const text = Buffer.from(`fuzz-${++serial};`);
      const gpa = bump.alloc(text.length);
      space.bytes(gpa, text.length).set(text);
      q.add([{ gpa, len: text.length }]);
      expect(`${what}: ${await q.waitUsed(1, 3000).then(() => "done", (e) => (e as Error).message)}`).toBe(`${what}: done`);
      expect(await eventually(() => readFileSync(out, "latin1").includes(text.toString()), 3000)).toBe(true);
    };
    const answers = (what: string, fn: () => unknown) => {
      let result = "ok";
      try {
        fn();
      } catch (e) {
        result = (e as Error).message;
      }
      expect(`${what}: ${result}`).toBe(`${what}: ok`);
    };

    await goodRequest("before any hostile event");
    for (let round = 0; round < 16; round++) {
      const ev = r(device === "block" ? 4 : 3);
      const what = `round ${round} event ${ev}`;
      if (ev === 0) {
        await goodRequest(what);
        continue;
      }
      let breaks = true;
      if (ev === 1) {
        // One store moving the index (SIZE, 0xffff] entries past the backend's position.
        q.storeAvailIdx(q.availIdx + SIZE + 1 + r(0x10000 - SIZE - 1));
        signal(q.kick);
      } else if (ev === 2) {
        // The front-end restarts the ring with a base that disagrees with the guest's index.
        answers(`${what}: GET_VRING_BASE before the restart`, () => f.getVringBase(q.index));
        q.reset();
        q.availIdx = r(0x10000);
        q.storeAvailIdx(q.availIdx);
        const base = (q.availIdx - SIZE - 1 - r(0x10000 - SIZE - 1)) & 0xffff;
        answers(`${what}: restart at base ${base} with avail idx ${q.availIdx}`, () => f.startRing(q, { base }));
      } else {
        // A read of a poisoned sector into the available ring (the index it stores is random).
        breaks = false;
        blkRequest(space, q, bump, 0 /* IN */, r(16), q.avail, 512);
      }
      await Bun.sleep(20);
      answers(`${what}: GET_FEATURES`, () => f.featuresLatency(2000));
      expect(backend.status()).toBe("running");
      if (breaks) expect(await eventually(() => drain(q.err) > 0, 1000)).toBe(true);
      answers(`${what}: GET_VRING_BASE`, () => f.getVringBase(q.index));
      q.reset();
      answers(`${what}: clean restart`, () => f.startRing(q));
      await goodRequest(`${what}: after the restart`);
      bump = new Bump(1 << 20, 16 << 20);
    }
    expect(backend.status()).toBe("running");
  }, 30_000);
});

// ---- packed rings: random descriptors through the real device (seeded) ----
// Each round fills the packed ring with random chains (random addresses, lengths, flags, buffer
// ids, sometimes wrong wrap bits), kicks, lets the device chew on them, stops the ring with
// GET_VRING_BASE (which must answer) and restarts it fresh. Afterwards a well-formed chain must
// be completed.

describe("fuzz: packed rings", () => {
  test.each(["echo", "block"])("random packed descriptor rings (seed 77) on %s: chains completed, skipped or the ring broken; the device survives", async (device) => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-fuzz-packed-"));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, "disk.img");
    writeFileSync(image, new Uint8Array(1 << 20));
    const backend = device === "echo" ? new BackendUnderTest("echo", {}, ECHO) : new BackendUnderTest("block", { file: image, "num-queues": "2", threads: "0" });
    await backend.ready;
    cleanup.push(() => backend.stop());
    const ram = new GuestRam(1 << 20);
    cleanup.push(() => ram.dispose());
    const vmm = new Vmm(backend, ram);
    cleanup.push(() => vmm.dispose());
    vmm.handshake(vmm.conn.requestU64(Req.GET_FEATURES)); // RING_PACKED included
    vmm.setMemTable();
    const SIZE = 24;
    const q = new PackedDriverQueue(ram, 0, SIZE, true);
    cleanup.push(() => q.dispose());
    const r = rng(77);
    for (let i = 0x10000; i < ram.size; i += 4) ram.dv.setUint32(i, r(2) ? r(0xffffffff) : r(16), true); // headers, garbage
    const restart = () => {
      ram.bytes(q.desc, 16 * SIZE).fill(0);
      ram.bytes(q.driverEvent, 4).fill(0);
      q.nextAvail = q.lastUsed = 0;
      q.availWrap = q.usedWrap = true;
      q.numFree = SIZE;
      q.inFlight.clear();
      startPackedQueue(vmm, q, 0x8000); // the driver starts over: a fresh ring
    };
    restart();
    for (let round = 0; round < 30; round++) {
      while (q.numFree > 0) {
        const n = Math.min(q.numFree, 1 + r(4));
        const descs = Array.from({ length: n }, (_, i) => ({
          gpa: r(4) === 0 ? r(0xffffffff) * 4096 : 0x1000 + r(ram.size),
          len: r(3) === 0 ? r(1 << 20) : r(512),
          flags: (r(8) & ~VIRTQ_DESC_F_NEXT) | (i + 1 < n || r(8) === 0 ? VIRTQ_DESC_F_NEXT : 0),
          id: r(5) === 0 ? r(0x10000) : r(SIZE),
        }));
        q.addRaw(descs, { kick: false, track: null, headFlagsOverride: r(10) === 0 ? r(0x10000) : undefined });
        if (r(3) === 0) break;
      }
      if (r(4) === 0) q.setDriverEvent(r(3), r(0x10000));
      signal(q.kick);
      await Bun.sleep(5);
      const base = getVringBase(vmm, 0);
      expect(base).toBeLessThan(0x10000);
      restart();
    }
    // The ring still works: a well-formed chain is completed (echo: its bytes; block: a GET_ID).
    q.enableCb();
    const src = ram.alloc(16);
    ram.bytes(src, 16).set(device === "echo" ? Buffer.from("good") : new Uint8Array([8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    const dst = ram.alloc(32);
    ram.bytes(dst, 32).fill(0xee);
    const id = q.addChain([{ gpa: src, len: device === "echo" ? 4 : 16 }, { gpa: dst, len: device === "echo" ? 16 : 21, write: true }]);
    const used = await q.waitUsed(1);
    expect(used.map((u) => u.id)).toEqual([id]);
    if (device === "echo") expect(Buffer.from(ram.bytes(dst, 4)).toString()).toBe("good");
    else expect(ram.bytes(dst, 32)[20]).toBe(0); // VIRTIO_BLK_S_OK after the 20-byte id
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  }, 60_000);

  test("seed 31337 against PackedVirtqueue itself: random rings, completions and rewinds; every used id was in flight once", async () => {
    const { PackedVirtqueue } = await import("../../src/packed_virtqueue.ts");
    const { GuestMemory, MemoryRegion } = await import("../../src/memory.ts");
    const ram = new GuestRam(1 << 20);
    cleanup.push(() => ram.dispose());
    const mem = new GuestMemory();
    mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
    const r = rng(31337);
    for (let i = 0x40000; i < ram.size; i += 4) ram.dv.setUint32(i, r(2) ? r(0xffffffff) : r(16), true);
    let broken = 0;
    for (let ringNo = 0; ringNo < 40; ringNo++) {
      const size = 1 + r(20);
      const d = new PackedDriverQueue(ram, 0, size, r(2) === 0);
      cleanup.push(() => d.dispose());
      const vq = new PackedVirtqueue(mem, {
        index: 0, size, packed: true, descGpa: d.desc, availGpa: d.driverEvent, usedGpa: d.deviceEvent,
        eventIdx: d.eventIdx, indirect: r(4) !== 0, nextAvail: 0x8000, kickFd: -1, callFd: -1, errFd: -1,
      });
      const held: number[] = [];
      const completed = new Set<number>();
      for (let round = 0; round < 20 && !vq.broken; round++) {
        // Hostile or well-formed, the driver only ever writes slots the device gave back.
        while (d.numFree > 0 && r(3) !== 0) {
          const n = Math.min(d.numFree, 1 + r(3));
          const hostile = r(3) === 0;
          const id = r(size + 2);
          const descs = Array.from({ length: n }, (_, i) => ({
            gpa: hostile && r(2) ? r(0xffffffff) * 4096 : 0x40000 + r(0x40000),
            len: hostile ? r(1 << 16) : 1 + r(256),
            flags: hostile ? r(8) : (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) | (i === n - 1 ? VIRTQ_DESC_F_WRITE : 0),
            id,
          }));
          if (hostile) descs[n - 1]!.flags &= ~VIRTQ_DESC_F_NEXT;
          d.addRaw(descs, { kick: false, track: null });
        }
        for (let c = vq.pop(); c !== null; c = vq.pop()) {
          expect(held.includes(c.head)).toBe(false);
          expect(c.head).toBeLessThan(size);
          held.push(c.head);
        }
        if (held.length > 0 && r(4) === 0) {
          const k = 1 + r(held.length);
          try {
            vq.rewind(k);
            held.splice(held.length - k, k);
          } catch {
            /* refused: a later chain was completed */
          }
        }
        for (let k = r(held.length + 1); k > 0; k--) {
          const id = held.splice(r(held.length), 1)[0]!;
          vq.add(id, 0);
        }
        if (r(5) === 0) vq.enableNotification();
        else if (r(5) === 0) vq.disableNotification();
        vq.flush();
        // Read used descriptors raw (hostile ids are not tracked by the driver): each names an id
        // the device had in flight, and reclaims the slots of one made-available chain.
        while (d.isUsed(d.lastUsed, d.usedWrap)) {
          const id = ram.dv.getUint16(d.desc + 16 * d.lastUsed + 12, true);
          expect(id).toBeLessThan(size);
          completed.add(id);
          d.lastUsed = (d.lastUsed + 1) % size;
          if (d.lastUsed === 0) d.usedWrap = !d.usedWrap;
          d.numFree++;
        }
        expect(vq.inFlight).toBe(held.length);
      }
      if (vq.broken) broken++;
    }
    expect(broken).toBeLessThan(40);
  }, 60_000);
});
