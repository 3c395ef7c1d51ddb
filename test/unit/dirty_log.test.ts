// Dirty-page logging (VHOST_F_LOG_ALL + LOG_SHMFD), as QEMU drives it around a live migration:
// SET_LOG_BASE with a shared bitmap, then SET_FEATURES adding LOG_ALL and SET_VRING_ADDR with
// VHOST_VRING_F_LOG while the rings run. Every page the backend writes must be marked, in the
// device thread and in queue threads alike, and nothing before logging is switched on.
import { afterEach, describe, expect, test } from "bun:test";
import { toArrayBuffer } from "bun:ffi";
import { memfdCreate, mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED } from "../../ffi/mem.ts";
import { ftruncate } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { F_LOG_ALL, F_PROTOCOL_FEATURES, ProtocolFeature, pf } from "../../src/protocol/constants.ts";
import { COMMON_FEATURES } from "../../src/device.ts";
import { BackendUnderTest, GuestRam, Vmm, Req, u64, vringAddr, type DriverQueue } from "../support/frontend.ts";

const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;
const PAGE = 4096;

/** The front-end's side of the log: a memfd bitmap, one bit per 4 KiB page. */
class LogBitmap {
  readonly fd: number;
  readonly host: number;
  readonly bits: Uint8Array;
  constructor(readonly size: number) {
    this.fd = memfdCreate("dirty-log");
    ftruncate(this.fd, size);
    this.host = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, 0);
    this.bits = new Uint8Array(toArrayBuffer(this.host as never, 0, size));
  }
  dirty(gpa: number): boolean {
    const page = Math.floor(gpa / PAGE);
    return (this.bits[page >> 3]! & (1 << (page & 7))) !== 0;
  }
  dirtyPages(): number[] {
    const out: number[] = [];
    for (let p = 0; p < this.size * 8; p++) if (this.bits[p >> 3]! & (1 << (p & 7))) out.push(p);
    return out;
  }
  clear(): void {
    this.bits.fill(0);
  }
  dispose(): void {
    munmap(this.host, this.size);
    close(this.fd);
  }
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function session(threaded: boolean) {
  const backend = new BackendUnderTest("echo", { threaded }, ECHO);
  await backend.ready;
  const ram = new GuestRam(1 << 24);
  const vmm = new Vmm(backend, ram);
  cleanups.push(() => backend.stop(), () => ram.dispose(), () => vmm.dispose());
  vmm.activate(2, 64, COMMON_FEATURES | F_PROTOCOL_FEATURES);
  return { backend, ram, vmm };
}

/** Sends one request through queue `q`: `len` readable bytes echoed into a writable buffer; returns the buffer's GPA. */
async function echo(ram: GuestRam, q: DriverQueue, len: number): Promise<number> {
  const src = ram.alloc(len, PAGE);
  ram.bytes(src, len).fill(0x5a);
  const dst = ram.alloc(len, PAGE);
  q.addChain([{ gpa: src, len }, { gpa: dst, len, write: true }]);
  await q.waitUsed(1);
  return dst;
}

/** What QEMU's vhost_dev_set_log does: log base, then LOG_ALL, then each ring's address with the log flag. */
function startLogging(vmm: Vmm, log: LogBitmap, on = true): void {
  const c = vmm.conn;
  if (on) {
    const payload = new Uint8Array(16);
    new DataView(payload.buffer).setBigUint64(0, BigInt(log.size), true);
    expect(c.requestU64(Req.SET_LOG_BASE, payload, [log.fd])).toBe(0n);
  }
  expect(c.ack(Req.SET_FEATURES, u64(COMMON_FEATURES | F_PROTOCOL_FEATURES | (on ? F_LOG_ALL : 0n)))).toBe(0n);
  for (const q of vmm.queues) {
    expect(c.ack(Req.SET_VRING_ADDR, vringAddr(q.index, vmm.ram.va(q.desc), vmm.ram.va(q.used), vmm.ram.va(q.avail), on ? 1 : 0, q.used))).toBe(0n);
  }
}

describe("dirty logging", () => {
  test("LOG_ALL and LOG_SHMFD are offered", async () => {
    const { vmm } = await session(false);
    vmm.conn.close();
    vmm.reconnect();
    expect(vmm.conn.requestU64(Req.GET_FEATURES) & F_LOG_ALL).toBe(F_LOG_ALL);
    expect(vmm.conn.requestU64(Req.GET_PROTOCOL_FEATURES) & pf(ProtocolFeature.LOG_SHMFD)).toBe(pf(ProtocolFeature.LOG_SHMFD));
  });

  for (const threaded of [false, true]) {
    test(`${threaded ? "queue threads" : "device thread"}: written buffers and the used ring are marked while logging, not before or after`, async () => {
      const { ram, vmm } = await session(threaded);
      const [q0, q1] = vmm.queues as [DriverQueue, DriverQueue];
      const log = new LogBitmap(Math.ceil(ram.size / PAGE / 8));
      cleanups.push(() => log.dispose());

      await echo(ram, q0, 100); // before logging: nothing is marked
      expect(log.dirtyPages()).toEqual([]);

      startLogging(vmm, log);
      const a = await echo(ram, q0, 3 * PAGE + 10); // spans 4 pages
      const b = await echo(ram, q1, 64);
      for (let p = 0; p < 4; p++) expect(log.dirty(a + p * PAGE)).toBe(true);
      expect(log.dirty(a + 4 * PAGE)).toBe(false); // the next page was not written
      expect(log.dirty(b)).toBe(true);
      expect(log.dirty(q0.used)).toBe(true);
      expect(log.dirty(q1.used)).toBe(true);
      // Pages only read (the request's readable buffers) are not marked.
      expect(log.dirty(a - PAGE * 4)).toBe(false);

      // Logging off again: writes are no longer marked.
      startLogging(vmm, log, false);
      log.clear();
      await echo(ram, q0, 64);
      expect(log.dirtyPages()).toEqual([]);
    });
  }

  test("a new log replaces the old one while the rings run; the old one is no longer written", async () => {
    const { ram, vmm } = await session(true);
    const [q0] = vmm.queues as [DriverQueue];
    const first = new LogBitmap(Math.ceil(ram.size / PAGE / 8));
    const second = new LogBitmap(Math.ceil(ram.size / PAGE / 8));
    cleanups.push(() => first.dispose(), () => second.dispose());
    startLogging(vmm, first);
    await echo(ram, q0, 64);
    expect(first.dirtyPages().length).toBeGreaterThan(0);
    const payload = new Uint8Array(16);
    new DataView(payload.buffer).setBigUint64(0, BigInt(second.size), true);
    expect(vmm.conn.requestU64(Req.SET_LOG_BASE, payload, [second.fd])).toBe(0n);
    // Cleared only now: a completion marks its pages just after its used entry is visible, so a
    // clear right after the echo could race the mark. Once SET_LOG_BASE is answered, nothing
    // writes the old log any more.
    first.clear();
    const c = await echo(ram, q0, 64);
    expect(second.dirty(c)).toBe(true);
    expect(first.dirtyPages()).toEqual([]);
  });

  test("SET_LOG_BASE without LOG_SHMFD, or with a bad size, is refused and the session goes on", async () => {
    const backend = new BackendUnderTest("echo", {}, ECHO);
    await backend.ready;
    const ram = new GuestRam(1 << 22);
    const vmm = new Vmm(backend, ram);
    cleanups.push(() => backend.stop(), () => ram.dispose(), () => vmm.dispose());
    vmm.handshake(COMMON_FEATURES | F_PROTOCOL_FEATURES, 1n << BigInt(ProtocolFeature.REPLY_ACK));
    const log = new LogBitmap(PAGE);
    cleanups.push(() => log.dispose());
    const payload = new Uint8Array(16);
    new DataView(payload.buffer).setBigUint64(0, BigInt(PAGE), true);
    expect(vmm.conn.requestU64(Req.SET_LOG_BASE, payload, [log.fd])).not.toBe(0n);
    vmm.reconnect();
    vmm.handshake();
    new DataView(payload.buffer).setBigUint64(0, 0n, true);
    expect(vmm.conn.requestU64(Req.SET_LOG_BASE, payload, [log.fd])).not.toBe(0n);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test("SET_FEATURES may toggle only LOG_ALL while rings run", async () => {
    const { vmm } = await session(false);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(F_PROTOCOL_FEATURES))).not.toBe(0n); // drops ring features: refused
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(COMMON_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL))).toBe(0n);
  });
});
