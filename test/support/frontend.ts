// An in-process vhost-user front-end (the VMM side) for tests: guest memory in a memfd, the driver
// side of split rings, eventfds for kicks and calls, and a blocking client of the backend socket.
// The backend runs in a real device thread (app/device_worker.ts), exactly as in the binary: its
// options parsed and its resources acquired here first, as app/main.ts does.
import { threadSettings } from "../../src/thread_settings.ts";
import { toArrayBuffer } from "bun:ffi";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { memfdCreate, mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED } from "../../ffi/mem.ts";
import { ftruncate, pipe, read, write, setNonBlocking } from "../../ffi/io.ts";
import { listenUnix, connectUnix, MsgIo, setTimeouts } from "../../ffi/socket.ts";
import { eventfd, drain, signal } from "../../ffi/eventfd.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { u64Bytes, vringStateBytes } from "../../src/protocol/codec.ts";
import { Req, HEADER_SIZE, FLAG_REPLY, FLAG_NEED_REPLY, VERSION, reqName } from "../../src/protocol/constants.ts";
import type { FromWorker, ToWorker } from "../../src/device_thread.ts";
import type { DeviceDefinition } from "../../src/device.ts";
import { DEVICES } from "../../app/registry.ts";

/** VIRTIO_F_RING_PACKED (bit 34). */
export const RING_PACKED = 1n << 34n;

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;

/** Guest RAM: one memfd shared with the backend, mapped here too. */
export class GuestRam {
  readonly fd: number;
  readonly host: number;
  readonly u8: Uint8Array;
  readonly dv: DataView;
  readonly u16: Uint16Array;
  /** The "VMM virtual address" we claim for GPA 0 (only used for ring address translation). */
  readonly uaddr = 0x7f00_0000_0000;
  private next = 0x1000; // bump allocator; page 0 stays unused so GPA 0 is never a valid buffer

  constructor(readonly size: number, readonly gpaBase = 0) {
    this.fd = memfdCreate("guest-ram");
    ftruncate(this.fd, size);
    this.host = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, this.fd, 0);
    const ab = toArrayBuffer(this.host as never, 0, size);
    this.u8 = new Uint8Array(ab);
    this.dv = new DataView(ab);
    this.u16 = new Uint16Array(ab);
  }

  /** Allocates `len` bytes aligned to `align`; returns the GPA. */
  alloc(len: number, align = 16): number {
    this.next = Math.ceil(this.next / align) * align;
    const off = this.next;
    this.next += len;
    if (this.next > this.size) throw new Error("guest RAM exhausted");
    return this.gpaBase + off;
  }

  bytes(gpa: number, len: number): Uint8Array {
    return this.u8.subarray(gpa - this.gpaBase, gpa - this.gpaBase + len);
  }

  va(gpa: number): number {
    return this.uaddr + (gpa - this.gpaBase);
  }

  dispose(): void {
    munmap(this.host, this.size);
    close(this.fd);
  }
}

export interface BufferSpec {
  gpa: number;
  len: number;
  write?: boolean;
}

/** The driver side of one split virtqueue. */
export class DriverQueue {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  readonly kick = eventfd();
  readonly call = eventfd();
  availIdx = 0;
  usedSeen = 0;
  private freeDesc: number[] = [];

  constructor(readonly ram: GuestRam, readonly index: number, readonly size: number) {
    this.desc = ram.alloc(16 * size, 16);
    this.avail = ram.alloc(6 + 2 * size, 2);
    this.used = ram.alloc(6 + 8 * size, 4);
    this.freeDesc = Array.from({ length: size }, (_, i) => i);
  }

  private o(gpa: number): number {
    return gpa - this.ram.gpaBase;
  }

  writeDesc(tableGpa: number, i: number, gpa: number, len: number, flags: number, next: number): void {
    const o = this.o(tableGpa) + 16 * i;
    const dv = this.ram.dv;
    dv.setUint32(o, gpa % 0x1_0000_0000, true);
    dv.setUint32(o + 4, Math.floor(gpa / 0x1_0000_0000), true);
    dv.setUint32(o + 8, len, true);
    dv.setUint16(o + 12, flags, true);
    dv.setUint16(o + 14, next, true);
  }

  /** Chains `bufs` into the descriptor table (or an indirect table) and makes the chain available. */
  addChain(bufs: BufferSpec[], opts: { indirect?: boolean; kick?: boolean; misalign?: number } = {}): number {
    let head: number;
    if (opts.indirect) {
      // `misalign`: the table starts that many bytes past a 16-byte boundary (the spec asks no alignment of it).
      const table = this.ram.alloc(16 * bufs.length + (opts.misalign ?? 0), 16) + (opts.misalign ?? 0);
      bufs.forEach((b, i) => this.writeDesc(table, i, b.gpa, b.len, (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F_NEXT : 0), i + 1));
      head = this.takeDesc();
      this.writeDesc(this.desc, head, table, 16 * bufs.length, VIRTQ_DESC_F_INDIRECT, 0);
    } else {
      const ids = bufs.map(() => this.takeDesc());
      bufs.forEach((b, i) => this.writeDesc(this.desc, ids[i]!, b.gpa, b.len, (b.write ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VIRTQ_DESC_F_NEXT : 0), ids[i + 1] ?? 0));
      head = ids[0]!;
    }
    this.publish(head, opts.kick ?? true);
    return head;
  }

  /** Puts `head` in the available ring and (optionally) kicks. For hand-made (hostile) chains too. */
  publish(head: number, kick = true): void {
    const ring = this.o(this.avail) / 2 + 2;
    this.ram.u16[ring + (this.availIdx % this.size)] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    Atomics.store(this.ram.u16, this.o(this.avail) / 2 + 1, this.availIdx);
    if (kick) signal(this.kick);
  }

  private takeDesc(): number {
    const d = this.freeDesc.shift();
    if (d === undefined) throw new Error("descriptor table full");
    return d;
  }

  /** Returns descriptors of a completed chain to the free list (direct chains). */
  recycle(head: number): void {
    let i = head;
    for (let n = 0; n < this.size; n++) {
      this.freeDesc.push(i);
      const o = this.o(this.desc) + 16 * i;
      const flags = this.ram.dv.getUint16(o + 12, true);
      if (!(flags & VIRTQ_DESC_F_NEXT)) break;
      i = this.ram.dv.getUint16(o + 14, true);
    }
  }

  usedIdx(): number {
    return Atomics.load(this.ram.u16, this.o(this.used) / 2 + 1);
  }

  /** Used elements published since the last call. */
  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const idx = this.usedIdx();
    while (this.usedSeen !== idx) {
      const o = this.o(this.used) + 4 + 8 * (this.usedSeen % this.size);
      out.push({ id: this.ram.dv.getUint32(o, true), len: this.ram.dv.getUint32(o + 4, true) });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }

  /** Waits until `count` used elements arrived (polling guest memory), or throws after `timeoutMs`. */
  async waitUsed(count: number, timeoutMs = 5000): Promise<{ id: number; len: number }[]> {
    const got: { id: number; len: number }[] = [];
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (const u of this.takeUsed()) {
        got.push(u);
        this.recycle(u.id);
      }
      if (got.length >= count) return got;
      if (Date.now() > deadline) throw new Error(`queue ${this.index}: ${got.length}/${count} used elements after ${timeoutMs} ms`);
      await Bun.sleep(1);
    }
  }

  /** Number of call notifications since the last read (0 if none). */
  calls(): number {
    return drain(this.call);
  }

  /** Sets avail->flags (NO_INTERRUPT) or used_event, as a driver would. */
  setUsedEvent(v: number): void {
    this.ram.u16[this.o(this.avail) / 2 + 2 + this.size] = v;
  }
  availEvent(): number {
    return this.ram.u16[this.o(this.used) / 2 + 2 + 4 * this.size]!;
  }

  dispose(): void {
    close(this.kick);
    close(this.call);
  }
}

export interface Reply {
  code: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
}

/** The backend under test: a real device worker behind a real listening unix socket. */
export class BackendUnderTest {
  readonly dir = mkdtempSync(join(tmpdir(), "vhu-test-"));
  readonly socketPath = join(this.dir, "sock");
  readonly worker: Worker;
  private wakeFd = -1;
  readonly ready: Promise<void>;
  finished = false;

  constructor(device: string, options: Record<string, unknown> = {}, module?: string) {
    const listenFd = listenUnix(this.socketPath, 4);
    const worker = new Worker(new URL("../../app/device_worker.ts", import.meta.url).href);
    this.worker = worker;
    const started = new Promise<void>((resolve, reject) => {
      this.worker.onmessage = (ev: MessageEvent<FromWorker>) => {
        const m = ev.data;
        if (m.type === "ready") {
          this.wakeFd = m.wakeFd;
          resolve();
        } else if (m.type === "fatal") reject(new Error(m.message));
        else if (m.type === "finished") this.finished = true;
        else if (m.type === "stopped") this.stopped?.();
      };
    });
    this.ready = (async () => {
      const def = module !== undefined ? ((await import(module)).default as DeviceDefinition) : DEVICES[device];
      if (def === undefined) throw new Error(`unknown device '${device}'`);
      const parsed = def.parse(options);
      const start: ToWorker = {
        type: "start", device, module, options: parsed, resources: def.acquire?.(parsed), listenFd,
        queueThreadEntry: new URL("../../app/queue_worker.ts", import.meta.url).href,
        logLevel: process.env.TEST_LOG_LEVEL ?? "silent",
        // The test's own metrics buffer: what the device's threads count is read here.
        settings: { ...threadSettings(), log: { ...threadSettings().log, level: process.env.TEST_LOG_LEVEL ?? "silent" } },
      };
      worker.postMessage(start);
      await started;
    })();
  }

  hostEvent(name: string): void {
    this.worker.postMessage({ type: "host-event", name } satisfies ToWorker);
    signal(this.wakeFd);
  }

  /** Set while stop() waits for the device thread to say it released everything. */
  private stopped: (() => void) | null = null;

  async stop(): Promise<void> {
    // Wait for the thread's "stopped" (it has closed its fds, so an image's locks are gone) rather
    // than a fixed pause: on a loaded machine 20 ms was not enough and a test's next qemu-img
    // found the image still locked. A thread that never answers is terminated after 5 s.
    const stopped = new Promise<void>((resolve) => (this.stopped = resolve));
    this.worker.postMessage({ type: "stop" } satisfies ToWorker);
    if (this.wakeFd >= 0) signal(this.wakeFd);
    await Promise.race([stopped, Bun.sleep(this.wakeFd >= 0 ? 5000 : 20)]);
    this.worker.terminate();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The VMM's end of the vhost-user socket: blocking, with a timeout so a silent backend fails a test. */
export class FrontendConnection {
  readonly fd: number;
  private readonly io = new MsgIo();
  private readonly buf = new Uint8Array(HEADER_SIZE + 4096);

  /** Connects to `target` (a socket path) or adopts an already-connected socket fd. */
  constructor(target: string | number, timeoutMs = 5000) {
    this.fd = typeof target === "number" ? target : connectUnix(target);
    setTimeouts(this.fd, timeoutMs);
  }

  sendRaw(bytes: Uint8Array, fds: number[] = []): void {
    const n = this.io.send(this.fd, bytes, bytes.length, fds);
    if (n !== bytes.length) throw new Error(`short send ${n}/${bytes.length}`);
  }

  send(code: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = [], needReply = false): void {
    const msg = new Uint8Array(HEADER_SIZE + payload.length);
    const v = new DataView(msg.buffer);
    v.setUint32(0, code, true);
    v.setUint32(4, VERSION | (needReply ? FLAG_NEED_REPLY : 0), true);
    v.setUint32(8, payload.length, true);
    msg.set(payload, HEADER_SIZE);
    this.sendRaw(msg, fds);
  }

  private recvExact(len: number, fds: number[]): Uint8Array {
    let got = 0;
    while (got < len) {
      const r = this.io.recv(this.fd, this.buf, got, len - got);
      fds.push(...r.fds);
      if (r.n === -EAGAIN) throw new Error("timed out waiting for a reply");
      if (r.n === 0) throw new Error("backend closed the connection");
      got += r.n;
    }
    return this.buf.slice(0, len);
  }

  recv(): Reply {
    const fds: number[] = [];
    const h = new DataView(this.recvExact(HEADER_SIZE, fds).buffer);
    const size = h.getUint32(8, true);
    const payload = size > 0 ? this.recvExact(size, fds) : new Uint8Array(0);
    return { code: h.getUint32(0, true), flags: h.getUint32(4, true), payload, fds };
  }

  /** Sends a request and reads its reply, checking the reply header. */
  request(code: number, payload?: Uint8Array, fds?: number[], needReply = false): Reply {
    this.send(code, payload, fds, needReply);
    const r = this.recv();
    if (r.code !== code) throw new Error(`reply to ${reqName(code)} came as ${reqName(r.code)}`);
    if ((r.flags & 0x3) !== VERSION || !(r.flags & FLAG_REPLY)) throw new Error(`bad reply flags 0x${r.flags.toString(16)}`);
    return r;
  }

  requestU64(code: number, payload?: Uint8Array, fds?: number[]): bigint {
    const r = this.request(code, payload, fds);
    if (r.payload.length !== 8) throw new Error(`${reqName(code)}: reply of ${r.payload.length} bytes`);
    return new DataView(r.payload.buffer).getBigUint64(0, true);
  }

  /** Sends with NEED_REPLY and returns the ack value (0 = success). */
  ack(code: number, payload?: Uint8Array, fds?: number[]): bigint {
    const r = this.request(code, payload, fds, true);
    return new DataView(r.payload.buffer).getBigUint64(0, true);
  }

  close(): void {
    close(this.fd);
  }
}

// ---- payload builders (the backend's own encoders where the layout is the same) ----

export const u64 = u64Bytes;
export const vringState = vringStateBytes;

export function vringAddr(index: number, desc: number, used: number, avail: number, flags = 0, log = 0): Uint8Array {
  const b = new Uint8Array(40);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, flags, true);
  v.setBigUint64(8, BigInt(desc), true);
  v.setBigUint64(16, BigInt(used), true);
  v.setBigUint64(24, BigInt(avail), true);
  v.setBigUint64(32, BigInt(log), true);
  return b;
}

export function memTable(regions: { gpa: number; size: number; uaddr: number; offset: number }[]): Uint8Array {
  const b = new Uint8Array(8 + 32 * regions.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => {
    const o = 8 + 32 * i;
    v.setBigUint64(o, BigInt(r.gpa), true);
    v.setBigUint64(o + 8, BigInt(r.size), true);
    v.setBigUint64(o + 16, BigInt(r.uaddr), true);
    v.setBigUint64(o + 24, BigInt(r.offset), true);
  });
  return b;
}

export function memRegion(r: { gpa: number; size: number; uaddr: number; offset: number }): Uint8Array {
  const t = memTable([r]);
  t.fill(0, 0, 8); // ADD/REM_MEM_REG: u64 padding, then the region
  return t;
}

export function configPayload(offset: number, size: number, flags = 0, data?: Uint8Array): Uint8Array {
  const b = new Uint8Array(12 + size);
  const v = new DataView(b.buffer);
  v.setUint32(0, offset, true);
  v.setUint32(4, size, true);
  v.setUint32(8, flags, true);
  if (data) b.set(data, 12);
  return b;
}

export function deviceStateFd(direction: number, phase = 0): Uint8Array {
  return vringState(direction, phase);
}

/** Reads a whole pipe (the backend writes device state into it) until EOF. */
export async function readPipe(fd: number, timeoutMs = 5000): Promise<Uint8Array> {
  setNonBlocking(fd);
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(65536);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const n = read(fd, buf, buf.length);
    if (n === 0) break;
    if (n === -EAGAIN) {
      if (Date.now() > deadline) throw new Error("device state pipe: timed out");
      await Bun.sleep(1);
      continue;
    }
    chunks.push(buf.slice(0, n));
  }
  close(fd);
  return Buffer.concat(chunks);
}

/** Writes `data` into a pipe's write end and closes it (what a VMM does on load). */
export async function writePipe(fd: number, data: Uint8Array, timeoutMs = 5000): Promise<void> {
  setNonBlocking(fd);
  let off = 0;
  const deadline = Date.now() + timeoutMs;
  while (off < data.length) {
    const n = write(fd, data.subarray(off), data.length - off);
    if (n === -EAGAIN) {
      if (Date.now() > deadline) throw new Error("device state pipe: timed out");
      await Bun.sleep(1);
      continue;
    }
    off += n;
  }
  close(fd);
}

export { pipe, Req };

/**
 * A VMM session with the usual handshake, memory table and rings, like QEMU's vhost_dev_start.
 * Tests drive the individual steps where they need to, or call `activate` for all of it.
 */
export class Vmm {
  conn: FrontendConnection;
  queues: DriverQueue[] = [];

  constructor(readonly backend: { socketPath: string }, readonly ram: GuestRam) {
    this.conn = new FrontendConnection(backend.socketPath);
  }

  reconnect(): void {
    this.conn.close();
    this.conn = new FrontendConnection(this.backend.socketPath);
  }

  /** GET_FEATURES/SET_OWNER/protocol negotiation/SET_FEATURES; returns the acked feature set. */
  handshake(want?: bigint, protocol?: bigint): { features: bigint; protocol: bigint } {
    const c = this.conn;
    const offered = c.requestU64(Req.GET_FEATURES);
    const offeredProto = c.requestU64(Req.GET_PROTOCOL_FEATURES);
    const proto = protocol ?? offeredProto;
    c.send(Req.SET_PROTOCOL_FEATURES, u64(proto));
    c.send(Req.SET_OWNER);
    // This driver builds split rings: it takes every offered feature but VIRTIO_F_RING_PACKED
    // unless told otherwise (a real driver acks packed only when it lays its rings out so).
    const features = want ?? offered & ~RING_PACKED;
    if (c.ack(Req.SET_FEATURES, u64(features)) !== 0n) throw new Error("SET_FEATURES refused");
    return { features, protocol: proto };
  }

  setMemTable(): void {
    const r = this.conn.ack(Req.SET_MEM_TABLE, memTable([{ gpa: this.ram.gpaBase, size: this.ram.size, uaddr: this.ram.uaddr, offset: 0 }]), [this.ram.fd]);
    if (r !== 0n) throw new Error("SET_MEM_TABLE refused");
  }

  /** Sets up queue `index` (size, base, addresses, call, kick) and enables it. */
  startQueue(q: DriverQueue, base = 0): void {
    const c = this.conn;
    const ok = (v: bigint, what: string) => {
      if (v !== 0n) throw new Error(`${what} refused`);
    };
    ok(c.ack(Req.SET_VRING_NUM, vringState(q.index, q.size)), "SET_VRING_NUM");
    ok(c.ack(Req.SET_VRING_BASE, vringState(q.index, base)), "SET_VRING_BASE");
    ok(c.ack(Req.SET_VRING_ADDR, vringAddr(q.index, this.ram.va(q.desc), this.ram.va(q.used), this.ram.va(q.avail))), "SET_VRING_ADDR");
    ok(c.ack(Req.SET_VRING_CALL, u64(q.index), [q.call]), "SET_VRING_CALL");
    ok(c.ack(Req.SET_VRING_KICK, u64(q.index), [q.kick]), "SET_VRING_KICK");
    ok(c.ack(Req.SET_VRING_ENABLE, vringState(q.index, 1)), "SET_VRING_ENABLE");
  }

  /** Full start: handshake, memory, and `count` queues of `size`. */
  activate(count: number, size = 64, want?: bigint): void {
    this.handshake(want);
    this.setMemTable();
    this.queues = Array.from({ length: count }, (_, i) => new DriverQueue(this.ram, i, size));
    for (const q of this.queues) this.startQueue(q);
  }

  /** GET_VRING_BASE on every queue (what QEMU does on stop); returns the bases. */
  stopAll(): number[] {
    return this.queues.map((q) => {
      const r = this.conn.request(Req.GET_VRING_BASE, vringState(q.index, 0));
      return new DataView(r.payload.buffer).getUint32(4, true);
    });
  }

  /** Saves device state through a pipe (SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE). */
  async saveState(): Promise<Uint8Array> {
    const [r, w] = pipe();
    const reply = this.conn.requestU64(Req.SET_DEVICE_STATE_FD, deviceStateFd(0), [w]);
    close(w);
    if ((reply & 0xffn) !== 0n) {
      close(r);
      throw new Error(`SET_DEVICE_STATE_FD(save) refused: ${reply}`);
    }
    const blob = await readPipe(r);
    const check = this.conn.requestU64(Req.CHECK_DEVICE_STATE);
    if (check !== 0n) throw new Error("CHECK_DEVICE_STATE after save failed");
    return blob;
  }

  /** Loads device state; returns CHECK_DEVICE_STATE's answer (0 = restored). */
  async loadState(blob: Uint8Array): Promise<bigint> {
    const [r, w] = pipe();
    const reply = this.conn.requestU64(Req.SET_DEVICE_STATE_FD, deviceStateFd(1), [r]);
    close(r);
    if ((reply & 0xffn) !== 0n) {
      close(w);
      return reply;
    }
    await writePipe(w, blob);
    return this.conn.requestU64(Req.CHECK_DEVICE_STATE);
  }

  dispose(): void {
    this.conn.close();
    for (const q of this.queues) q.dispose();
  }
}
