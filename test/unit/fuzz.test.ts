// Seeded fuzzing of the two untrusted inputs: front-end messages and guest rings. The backend must
// answer or drop the connection, never crash or hang, and keep serving afterwards.
import { describe, test, expect, afterEach } from "bun:test";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, FrontendConnection, Req } from "../support/frontend.ts";
import { eventfd, signal } from "../../ffi/eventfd.ts";
import { close } from "../../ffi/libc.ts";
import { HEADER_SIZE } from "../../src/protocol/constants.ts";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;

/** xorshift32: reproducible random numbers (the seed is in the test name). */
function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

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
