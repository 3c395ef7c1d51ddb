// The common handler, driven by our in-process front-end through a real socket and a real worker:
// the lifecycle crosvm's handler test walks, then one test per rejection rule.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { socketPair } from "../../ffi/socket.ts";
import { BackendUnderTest, FrontendConnection, GuestRam, Vmm, DriverQueue, Req, RING_PACKED, u64, vringState, vringAddr, memTable, memRegion, configPayload, deviceStateFd, pipe } from "../support/frontend.ts";
import { close } from "../../ffi/libc.ts";
import { eventfd } from "../../ffi/eventfd.ts";
import { HANDLER_PROTOCOL_FEATURES, F_PROTOCOL_FEATURES, F_LOG_ALL } from "../../src/protocol/constants.ts";
import { COMMON_FEATURES } from "../../src/device.ts";
import { decodeEnvelope, encodeEnvelope } from "../../src/snapshot.ts";

const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;

let backend: BackendUnderTest;
let ram: GuestRam;
let vmm: Vmm;

beforeEach(async () => {
  backend = new BackendUnderTest("echo", {}, ECHO);
  await backend.ready;
  ram = new GuestRam(8 << 20);
  vmm = new Vmm(backend, ram);
});

afterEach(async () => {
  vmm.dispose();
  await backend.stop();
  ram.dispose();
});

/** Sends `text` on queue q and returns what the device echoed. */
async function echo(q: DriverQueue, text: string, indirect = false): Promise<string> {
  const src = ram.alloc(text.length);
  ram.bytes(src, text.length).set(Buffer.from(text));
  const dst = ram.alloc(256);
  const head = q.addChain([{ gpa: src, len: text.length }, { gpa: dst, len: 256, write: true }], { indirect });
  const [u] = await q.waitUsed(1);
  expect(u!.id).toBe(head);
  return Buffer.from(ram.bytes(dst, u!.len)).toString();
}

describe("negotiation", () => {
  test("offers device features plus PROTOCOL_FEATURES, and the handler's protocol features", () => {
    expect(vmm.conn.requestU64(Req.GET_FEATURES)).toBe(COMMON_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL | RING_PACKED);
    expect(vmm.conn.requestU64(Req.GET_PROTOCOL_FEATURES)).toBe(HANDLER_PROTOCOL_FEATURES);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
    expect(vmm.conn.requestU64(Req.GET_MAX_MEM_SLOTS)).toBe(509n);
  });

  test("refuses features that were not offered", () => {
    vmm.conn.send(Req.SET_PROTOCOL_FEATURES, u64(HANDLER_PROTOCOL_FEATURES));
    vmm.conn.send(Req.SET_OWNER);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(1n << 5n))).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(COMMON_FEATURES))).toBe(0n);
  });

  test("refuses protocol features that were not offered", () => {
    vmm.conn.send(Req.SET_PROTOCOL_FEATURES, u64(HANDLER_PROTOCOL_FEATURES));
    expect(vmm.conn.ack(Req.SET_PROTOCOL_FEATURES, u64(1n << 8n /* PAGEFAULT (postcopy) */))).not.toBe(0n);
  });

  test("refuses SET_FEATURES and memory before SET_OWNER, and a second SET_OWNER", () => {
    vmm.conn.send(Req.SET_PROTOCOL_FEATURES, u64(HANDLER_PROTOCOL_FEATURES));
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(COMMON_FEATURES))).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_MEM_TABLE, memTable([{ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 0 }]), [ram.fd])).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_OWNER)).toBe(0n);
    expect(vmm.conn.ack(Req.SET_OWNER)).not.toBe(0n);
  });

  test("status round-trips", () => {
    vmm.handshake();
    expect(vmm.conn.ack(Req.SET_STATUS, u64(0x0f))).toBe(0n);
    expect(vmm.conn.requestU64(Req.GET_STATUS)).toBe(0x0fn);
    expect(vmm.conn.ack(Req.SET_STATUS, u64(0x1ff))).not.toBe(0n);
  });
});

describe("lifecycle", () => {
  test("handshake, activate, reset, re-activate, sleep, snapshot, wake, restore into a fresh backend", async () => {
    vmm.activate(2);
    const [q0, q1] = vmm.queues as [DriverQueue, DriverQueue];
    expect(await echo(q0, "hello")).toBe("hello");
    expect(await echo(q1, "indirect", true)).toBe("indirect");

    // RESET_DEVICE: rings stop, device state goes back to power-on, ownership and memory stay.
    expect(vmm.conn.ack(Req.RESET_DEVICE)).toBe(0n);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(COMMON_FEATURES | F_PROTOCOL_FEATURES))).toBe(0n);
    vmm.queues = [new DriverQueue(ram, 0, 32), new DriverQueue(ram, 1, 32)];
    for (const q of vmm.queues) vmm.startQueue(q);
    const [r0, r1] = vmm.queues as [DriverQueue, DriverQueue];
    expect(await echo(r0, "again")).toBe("again");
    expect(await echo(r1, "and again")).toBe("and again");

    // Sleep: GET_VRING_BASE stops every ring and reports where it stopped.
    expect(vmm.conn.ack(Req.SET_CONFIG, configPayload(8, 8, 0, Buffer.from("CONFIG!!")))).toBe(0n);
    expect(vmm.stopAll()).toEqual([1, 1]);
    // A stopped ring is not processed: this request must wait.
    const src = ram.alloc(4);
    ram.bytes(src, 4).set(Buffer.from("wait"));
    const dst = ram.alloc(64);
    r0.addChain([{ gpa: src, len: 4 }, { gpa: dst, len: 64, write: true }]);
    await Bun.sleep(50);
    expect(r0.takeUsed()).toEqual([]);

    const blob = await vmm.saveState();
    expect(blob.length).toBeGreaterThan(20);

    // Wake: restart ring 0 at its base; the pending request completes.
    vmm.startQueue(r0, 1);
    const done = await r0.waitUsed(1);
    expect(Buffer.from(ram.bytes(dst, done[0]!.len)).toString()).toBe("wait");

    // Restore into a fresh backend process-equivalent (new worker), then wake it.
    const fresh = new BackendUnderTest("echo", {}, ECHO);
    await fresh.ready;
    const vmm2 = new Vmm(fresh, ram);
    try {
      vmm2.handshake();
      vmm2.setMemTable();
      expect(await vmm2.loadState(blob)).toBe(0n);
      const cfg = vmm2.conn.request(Req.GET_CONFIG, configPayload(8, 8));
      expect(Buffer.from(cfg.payload.subarray(12)).toString()).toBe("CONFIG!!");
      const w0 = new DriverQueue(ram, 0, 16);
      vmm2.queues = [w0];
      vmm2.startQueue(w0);
      expect(await echo(w0, "restored")).toBe("restored");
    } finally {
      vmm2.dispose();
      await fresh.stop();
    }
  });

  test("rings start disabled when PROTOCOL_FEATURES is acked, enabled otherwise", async () => {
    vmm.handshake();
    vmm.setMemTable();
    const q = new DriverQueue(ram, 0, 16);
    vmm.queues = [q];
    const c = vmm.conn;
    c.ack(Req.SET_VRING_NUM, vringState(0, 16));
    c.ack(Req.SET_VRING_ADDR, vringAddr(0, ram.va(q.desc), ram.va(q.used), ram.va(q.avail)));
    c.ack(Req.SET_VRING_CALL, u64(0), [q.call]);
    c.ack(Req.SET_VRING_KICK, u64(0), [q.kick]);
    const src = ram.alloc(2);
    const dst = ram.alloc(16);
    q.addChain([{ gpa: src, len: 2 }, { gpa: dst, len: 16, write: true }]);
    await Bun.sleep(50);
    expect(q.takeUsed()).toEqual([]); // disabled: not processed
    expect(c.ack(Req.SET_VRING_ENABLE, vringState(0, 1))).toBe(0n);
    expect((await q.waitUsed(1)).length).toBe(1);

    // Without PROTOCOL_FEATURES (legacy front-end) the ring runs as soon as it is kicked.
    vmm.reconnect();
    await Bun.sleep(20);
    vmm.handshake(COMMON_FEATURES);
    vmm.setMemTable();
    const q2 = new DriverQueue(ram, 1, 16);
    vmm.queues.push(q2);
    vmm.conn.ack(Req.SET_VRING_NUM, vringState(1, 16));
    vmm.conn.ack(Req.SET_VRING_ADDR, vringAddr(1, ram.va(q2.desc), ram.va(q2.used), ram.va(q2.avail)));
    vmm.conn.ack(Req.SET_VRING_CALL, u64(1), [q2.call]);
    vmm.conn.ack(Req.SET_VRING_KICK, u64(1), [q2.kick]);
    expect(await echo(q2, "legacy")).toBe("legacy");
  });

  test("a front-end that disconnects leaves the backend serving the next one", async () => {
    vmm.activate(1);
    expect(await echo(vmm.queues[0]!, "first")).toBe("first");
    vmm.reconnect();
    await Bun.sleep(20);
    vmm.activate(1);
    expect(await echo(vmm.queues[0]!, "second")).toBe("second");
  });

  test("memory can be given as ADD_MEM_REG regions and removed with REM_MEM_REG", async () => {
    vmm.handshake();
    const half = ram.size / 2;
    // Two regions backed by the same memfd at different offsets, as QEMU splits RAM.
    expect(vmm.conn.ack(Req.ADD_MEM_REG, memRegion({ gpa: 0, size: half, uaddr: ram.uaddr, offset: 0 }), [ram.fd])).toBe(0n);
    expect(vmm.conn.ack(Req.ADD_MEM_REG, memRegion({ gpa: half, size: half, uaddr: ram.uaddr + half, offset: half }), [ram.fd])).toBe(0n);
    // Overlapping region refused.
    expect(vmm.conn.ack(Req.ADD_MEM_REG, memRegion({ gpa: 4096, size: 4096, uaddr: 0x1000, offset: 0 }), [ram.fd])).not.toBe(0n);
    const q = new DriverQueue(ram, 0, 16);
    vmm.queues = [q];
    vmm.startQueue(q);
    expect(await echo(q, "regions")).toBe("regions");
    expect(vmm.conn.ack(Req.REM_MEM_REG, memRegion({ gpa: half, size: half, uaddr: ram.uaddr + half, offset: half }))).toBe(0n);
    expect(vmm.conn.ack(Req.REM_MEM_REG, memRegion({ gpa: half, size: half, uaddr: ram.uaddr + half, offset: half }))).not.toBe(0n);
    expect(await echo(q, "still")).toBe("still");
  });

  test("config space reads, refuses out-of-range and read-only writes, and signals changes", () => {
    vmm.handshake();
    const be = eventfd();
    const c = vmm.conn;
    const r = c.request(Req.GET_CONFIG, configPayload(0, 8));
    expect(Buffer.from(r.payload.subarray(12)).toString()).toBe("echodev1");
    const bad = c.request(Req.GET_CONFIG, configPayload(12, 8));
    expect(new DataView(bad.payload.buffer).getUint32(4, true)).toBe(0); // size 0 = error
    expect(c.ack(Req.SET_CONFIG, configPayload(0, 4, 0, Buffer.from("XXXX")))).not.toBe(0n);
    expect(c.ack(Req.SET_CONFIG, configPayload(8, 4, 0, Buffer.from("abcd")))).toBe(0n);
    close(be);
  });
});

describe("framing", () => {
  test("a request that arrives a byte at a time is reassembled, fds with its first byte", async () => {
    vmm.handshake();
    const payload = memTable([{ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 0 }]);
    const msg = new Uint8Array(12 + payload.length);
    const v = new DataView(msg.buffer);
    v.setUint32(0, Req.SET_MEM_TABLE, true);
    v.setUint32(4, 0x1 | 0x8, true);
    v.setUint32(8, payload.length, true);
    msg.set(payload, 12);
    vmm.conn.sendRaw(msg.subarray(0, 1), [ram.fd]);
    for (let i = 1; i < msg.length; i++) {
      vmm.conn.sendRaw(msg.subarray(i, i + 1));
      if (i % 50 === 0) await Bun.sleep(1);
    }
    const r = vmm.conn.recv();
    expect(r.code).toBe(Req.SET_MEM_TABLE);
    expect(new DataView(r.payload.buffer).getBigUint64(0, true)).toBe(0n);
    const q = new DriverQueue(ram, 0, 16);
    vmm.queues = [q];
    vmm.startQueue(q);
    expect(await echo(q, "reassembled")).toBe("reassembled");
  });

  test("config changes are announced on the backend channel", () => {
    vmm.handshake();
    const [ours, theirs] = socketPair();
    expect(vmm.conn.ack(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs])).toBe(0n);
    close(theirs);
    expect(vmm.conn.ack(Req.SET_CONFIG, configPayload(8, 2, 0, Buffer.from("hi")))).toBe(0n);
    const backendChannel = new FrontendConnection(ours);
    const m = backendChannel.recv();
    expect(m.code).toBe(2); // BACKEND_CONFIG_CHANGE_MSG
    expect(m.flags & 0x3).toBe(1);
    expect(m.payload.length).toBe(0);
    backendChannel.close();
  });
});

describe("rejections", () => {
  test("wrong payload size is refused and the session goes on", () => {
    vmm.handshake();
    expect(vmm.conn.ack(Req.SET_VRING_NUM, new Uint8Array(4))).not.toBe(0n);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test("fds on a request that carries none are closed and the request refused", () => {
    vmm.handshake();
    const fd = eventfd();
    expect(vmm.conn.ack(Req.SET_VRING_NUM, vringState(0, 16), [fd])).not.toBe(0n);
    close(fd);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test("missing fds are refused", () => {
    vmm.handshake();
    expect(vmm.conn.ack(Req.SET_MEM_TABLE, memTable([{ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 0 }]))).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_VRING_KICK, u64(0))).not.toBe(0n);
  });

  test("unknown and unsupported requests get an error reply", () => {
    vmm.handshake();
    expect(vmm.conn.ack(99, new Uint8Array(0))).not.toBe(0n);
    expect(vmm.conn.ack(Req.SEND_RARP, u64(0))).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_VRING_ENDIAN, vringState(0, 1))).not.toBe(0n);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test("queue index, size and ring addresses are checked", () => {
    vmm.handshake();
    vmm.setMemTable();
    const c = vmm.conn;
    expect(c.ack(Req.SET_VRING_NUM, vringState(7, 16))).not.toBe(0n);
    expect(c.ack(Req.SET_VRING_NUM, vringState(0, 100))).not.toBe(0n);
    expect(c.ack(Req.SET_VRING_NUM, vringState(0, 65536))).not.toBe(0n);
    expect(c.ack(Req.SET_VRING_BASE, vringState(0, 70000))).not.toBe(0n);
    expect(c.ack(Req.SET_VRING_ENABLE, vringState(0, 2))).not.toBe(0n);
    expect(c.ack(Req.SET_VRING_KICK, u64(1n << 9n))).not.toBe(0n); // reserved bits
    // No error value exists for GET_VRING_BASE: the session is dropped (test/unit/audit_session_end.test.ts).
    expect(() => c.request(Req.GET_VRING_BASE, vringState(9, 0))).toThrow(/closed/);
  });

  test("bad version, reply flag or oversize payload drop the connection only", async () => {
    for (const [flags, size] of [[0x2, 0], [0x5, 0], [0x1 | 0x10, 0], [0x1, 5000]] as const) {
      const m = new Uint8Array(12);
      const v = new DataView(m.buffer);
      v.setUint32(0, Req.GET_FEATURES, true);
      v.setUint32(4, flags, true);
      v.setUint32(8, size, true);
      vmm.conn.sendRaw(m);
      expect(() => vmm.conn.recv()).toThrow(/closed/);
      vmm.reconnect();
      await Bun.sleep(10);
      expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
    }
  });

  test("memory regions that overflow or extend past their file are refused", () => {
    vmm.handshake();
    expect(vmm.conn.ack(Req.SET_MEM_TABLE, memTable([{ gpa: 0, size: ram.size * 2, uaddr: ram.uaddr, offset: 0 }]), [ram.fd])).not.toBe(0n);
    expect(vmm.conn.ack(Req.ADD_MEM_REG, memRegion({ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 4096 }), [ram.fd])).not.toBe(0n);
    const t = memTable([{ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 0 }]);
    new DataView(t.buffer).setBigUint64(8, 0xffff_ffff_ffff_f000n, true);
    expect(vmm.conn.ack(Req.SET_MEM_TABLE, t, [ram.fd])).not.toBe(0n);
    expect(vmm.conn.ack(Req.SET_MEM_TABLE, memTable([]), [])).not.toBe(0n);
  });

  test("device state transfer rules: stopped rings, phase 0, one at a time, corrupt blobs refused", async () => {
    vmm.activate(1);
    const c = vmm.conn;
    // Rings running: refused.
    let [r, w] = pipe();
    expect(c.requestU64(Req.SET_DEVICE_STATE_FD, deviceStateFd(0), [w]) & 0xffn).not.toBe(0n);
    close(r);
    close(w);
    vmm.stopAll();
    // Unknown phase: refused.
    [r, w] = pipe();
    expect(c.requestU64(Req.SET_DEVICE_STATE_FD, deviceStateFd(0, 1), [w]) & 0xffn).not.toBe(0n);
    close(r);
    close(w);
    // CHECK without a transfer: error.
    expect(c.requestU64(Req.CHECK_DEVICE_STATE)).not.toBe(0n);
    // Corrupt and mismatched blobs: refused by CHECK_DEVICE_STATE, device stays usable.
    expect(await vmm.loadState(new Uint8Array([1, 2, 3, 4]))).not.toBe(0n);
    const good = await vmm.saveState();
    expect(await vmm.loadState(Buffer.from(Buffer.from(good).toString("latin1").replace("echo", "ecHo"), "latin1"))).not.toBe(0n);
    // The envelope owns the negotiated features: bits this device does not offer are refused there.
    const env = decodeEnvelope(good, "echo", 0x3f);
    expect(await vmm.loadState(encodeEnvelope({ ...env, ackedFeatures: (BigInt(env.ackedFeatures) | (1n << 5n)).toString() }))).not.toBe(0n);
    expect(await vmm.loadState(good)).toBe(0n);
    vmm.startQueue(vmm.queues[0]!, 0);
    expect(await echo(vmm.queues[0]!, "usable")).toBe("usable");
  });
});

describe("queue threads", () => {
  test("queues served in threads of their own: echo, stop with position, restart, memory change", async () => {
    const threaded = new BackendUnderTest("echo", { threaded: true }, ECHO);
    await threaded.ready;
    const v = new Vmm(threaded, ram);
    try {
      v.activate(2, 32);
      const [q0, q1] = v.queues as [DriverQueue, DriverQueue];
      for (let i = 0; i < 20; i++) {
        expect(await echo(q0, `zero ${i}`)).toBe(`zero ${i}`);
        expect(await echo(q1, `one ${i}`, true)).toBe(`one ${i}`);
      }
      expect(v.stopAll()).toEqual([20, 20]);
      v.startQueue(q0, 20);
      expect(await echo(q0, "after restart")).toBe("after restart");
      // A new memory table pauses and resumes the ring in its thread.
      v.setMemTable();
      expect(await echo(q0, "after mem table")).toBe("after mem table");
      // Swapping the call fd while running restarts the ring with the new fd.
      expect(v.conn.ack(Req.SET_VRING_CALL, u64(0), [q0.call])).toBe(0n);
      expect(await echo(q0, "after call swap")).toBe("after call swap");
    } finally {
      v.dispose();
      await threaded.stop();
    }
  });
});
