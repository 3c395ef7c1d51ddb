// The console device through our in-process front-end: a real worker behind a real socket, guest
// rings in a shared memfd, and real host endpoints (files, FIFOs, a pty, a datagram socket).
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, Req, configPayload, RING_PACKED, type BufferSpec } from "../support/frontend.ts";
import { open, read, write, ioctl, fcntl, tcgetattr, O_RDONLY, O_WRONLY, O_RDWR, O_NONBLOCK } from "../../ffi/io.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { socketPair, setTimeouts } from "../../ffi/socket.ts";
import { bindUnixDatagram } from "../../ffi/socket.ts";
import { COMMON_FEATURES } from "../../src/device.ts";
import { F_PROTOCOL_FEATURES, F_LOG_ALL, HEADER_SIZE, BackendReq } from "../../src/protocol/constants.ts";
import { VIRTIO_CONSOLE_F_SIZE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_EMERG_WRITE } from "../../devices/console/config.ts";
import {
  VIRTIO_CONSOLE,
} from "../../devices/console/control.ts";
import { parseConsoleOptions } from "../../devices/console/options.ts";
import { repeatedOption } from "../../src/cli_args.ts";

const MiB = 1 << 20;
const O_NOCTTY = 0o400;
const FIONREAD = 0x541b;
const F_GETPIPE_SZ = 1032;

let dir: string;
const cleanups: (() => void | Promise<void>)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "console-test-"));
});

afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
  rmSync(dir, { recursive: true, force: true });
});

interface Session {
  backend: BackendUnderTest;
  ram: GuestRam;
  vmm: Vmm;
}

/** A console backend with `options` and a VMM connected to it (not yet negotiated). */
async function session(options: Record<string, unknown>, ram?: GuestRam): Promise<Session> {
  const backend = new BackendUnderTest("console", options);
  cleanups.push(() => backend.stop());
  await backend.ready;
  if (ram === undefined) {
    ram = new GuestRam(32 * MiB);
    const r = ram;
    cleanups.push(() => r.dispose());
  }
  const vmm = new Vmm(backend, ram);
  cleanups.push(() => vmm.dispose());
  return { backend, ram, vmm };
}

function path(name: string): string {
  return join(dir, name);
}

function mkfifo(p: string): void {
  const r = Bun.spawnSync(["mkfifo", p]);
  if (r.exitCode !== 0) throw new Error(`mkfifo ${p} failed`);
}

function sha(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Copies `data` into fresh guest memory and sends it on `q` as chains of `chunk` bytes. */
function sendOutput(ram: GuestRam, q: DriverQueue, data: Uint8Array, chunk: number, opts: { split?: boolean; indirect?: boolean } = {}): number {
  let chains = 0;
  for (let off = 0; off < data.length; off += chunk) {
    const piece = data.subarray(off, Math.min(off + chunk, data.length));
    const gpa = ram.alloc(piece.length);
    ram.bytes(gpa, piece.length).set(piece);
    // Odd chains are split over two descriptors, to exercise multi-buffer chains.
    const bufs: BufferSpec[] =
      opts.split && chains % 2 === 1 && piece.length > 1
        ? [{ gpa, len: piece.length >> 1 }, { gpa: gpa + (piece.length >> 1), len: piece.length - (piece.length >> 1) }]
        : [{ gpa, len: piece.length }];
    q.addChain(bufs, { indirect: opts.indirect && chains % 3 === 0 });
    chains++;
  }
  return chains;
}

/** Keeps `inFlight` receive buffers posted on `q` and collects `total` bytes in ring order. */
async function receive(ram: GuestRam, q: DriverQueue, total: number, bufLen = 4096, inFlight = 16, timeoutMs = 10_000): Promise<Uint8Array> {
  const out = new Uint8Array(total);
  let got = 0;
  const free = Array.from({ length: inFlight }, () => ram.alloc(bufLen));
  const posted = new Map<number, number>();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    while (free.length > 0) {
      const gpa = free.pop()!;
      posted.set(q.addChain([{ gpa, len: bufLen, write: true }]), gpa);
    }
    for (const u of q.takeUsed()) {
      q.recycle(u.id);
      const gpa = posted.get(u.id)!;
      posted.delete(u.id);
      if (got + u.len > total) throw new Error(`received ${got + u.len} bytes, expected ${total}`);
      out.set(ram.bytes(gpa, u.len), got);
      got += u.len;
      free.push(gpa);
    }
    if (got === total) return out;
    if (Date.now() > deadline) throw new Error(`queue ${q.index}: ${got}/${total} bytes after ${timeoutMs} ms`);
    await Bun.sleep(1);
  }
}

/** Waits until `predicate` holds (a condition, not a timing assertion). */
async function until(predicate: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(2);
  }
}

function fileSize(p: string): number {
  return existsSync(p) ? Bun.file(p).size : 0;
}

/** Writes all of `data` into a non-blocking fd, waiting while it is full. */
async function writeAll(fd: number, data: Uint8Array, timeoutMs = 10_000): Promise<void> {
  let off = 0;
  const deadline = Date.now() + timeoutMs;
  while (off < data.length) {
    const n = write(fd, data.subarray(off), data.length - off);
    if (n === -EAGAIN) {
      if (Date.now() > deadline) throw new Error(`write stalled at ${off}/${data.length}`);
      await Bun.sleep(1);
      continue;
    }
    off += n;
  }
}

/** Reads exactly `total` bytes from a non-blocking fd. */
async function readExactly(fd: number, total: number, timeoutMs = 10_000): Promise<Uint8Array> {
  const out = new Uint8Array(total);
  let got = 0;
  const deadline = Date.now() + timeoutMs;
  while (got < total) {
    const n = read(fd, out.subarray(got), total - got);
    if (n === -EAGAIN || n === 0) {
      if (Date.now() > deadline) throw new Error(`read stalled at ${got}/${total}`);
      await Bun.sleep(1);
      continue;
    }
    got += n;
  }
  return out;
}

function ctrl(id: number, event: number, value: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  return b;
}

interface CtrlMsg {
  id: number;
  event: number;
  value: number;
  extra: Uint8Array;
}

/** The control receiveq side of a driver: posted buffers, and the messages they came back with. */
class ControlReceiver {
  private posted = new Map<number, number>();
  readonly messages: CtrlMsg[] = [];
  constructor(private readonly ram: GuestRam, private readonly q: DriverQueue, count = 16) {
    for (let i = 0; i < count; i++) this.post();
  }
  private post(): void {
    const gpa = this.ram.alloc(256);
    this.posted.set(this.q.addChain([{ gpa, len: 256, write: true }]), gpa);
  }
  async waitFor(count: number): Promise<CtrlMsg[]> {
    await until(() => {
      for (const u of this.q.takeUsed()) {
        this.q.recycle(u.id);
        const b = this.ram.bytes(this.posted.get(u.id)!, u.len).slice();
        this.posted.delete(u.id);
        const v = new DataView(b.buffer);
        this.messages.push({ id: v.getUint32(0, true), event: v.getUint16(4, true), value: v.getUint16(6, true), extra: b.subarray(8) });
        this.post();
      }
      return this.messages.length >= count;
    }, `${count} control messages (have ${this.messages.length})`);
    return this.messages.splice(0, count);
  }
}

function sendCtrl(ram: GuestRam, q: DriverQueue, msg: Uint8Array): void {
  const gpa = ram.alloc(msg.length);
  ram.bytes(gpa, msg.length).set(msg);
  q.addChain([{ gpa, len: msg.length }]);
}

/** A pseudo-terminal pair: our master fd, the slave's path, and a slave fd to inspect its mode. */
function openPty(cols: number, rows: number): { master: number; slave: string; slaveFd: number; resize(c: number, r: number): void } {
  const master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_NONBLOCK);
  ioctl(master, 0x40045431 /* TIOCSPTLCK */, new Uint8Array(4)); // unlock
  const n = new Uint8Array(4);
  ioctl(master, 0x80045430 /* TIOCGPTN */, n);
  const slave = `/dev/pts/${new DataView(n.buffer).getUint32(0, true)}`;
  const resize = (c: number, r: number) => {
    const ws = new Uint8Array(8);
    const v = new DataView(ws.buffer);
    v.setUint16(0, r, true);
    v.setUint16(2, c, true);
    ioctl(master, 0x5414 /* TIOCSWINSZ */, ws);
  };
  resize(cols, rows);
  const slaveFd = open(slave, O_RDWR | O_NOCTTY | O_NONBLOCK);
  return { master, slave, slaveFd, resize };
}

const ICANON = 0o2;
function lflag(fd: number): number {
  return new DataView(tcgetattr(fd).buffer).getUint32(12, true);
}

// ---------------------------------------------------------------------------------------------

describe("options", () => {
  test("port specs, exclusions and repeated --port recovery", () => {
    const o = parseConsoleOptions({ port: ["name=log,output-file=/tmp/a", "input-file=/tmp/b,syslog"], "output-file": "/tmp/c" });
    expect(o.ports).toEqual([
      { name: "log", outputFile: "/tmp/a", inputFile: null, syslog: false },
      { name: null, outputFile: null, inputFile: "/tmp/b", syslog: true },
    ]);
    expect(o.configSpace).toBe(true);
    expect(parseConsoleOptions({}).configSpace).toBe(false);
    expect(() => parseConsoleOptions({ syslog: true, "output-file": "x" })).toThrow(/exclude/);
    expect(() => parseConsoleOptions({ port: "name=a b" })).toThrow(/port name/);
    expect(() => parseConsoleOptions({ port: "colour=red" })).toThrow(/unknown key/);
    expect(() => parseConsoleOptions({ port: ["name=x", "name=x"] })).toThrow(/two ports/);
    expect(repeatedOption(["bun", "main.ts", "device", "console", "--port", "name=a", "--socket", "s", "--port=name=b"], "port")).toEqual(["name=a", "name=b"]);
  });
});

describe("single port", () => {
  test("offers ring features only by default (QEMU config_size=0), two queues", async () => {
    const { vmm } = await session({ "output-file": path("out"), "input-file": "/dev/null" });
    expect(vmm.conn.requestU64(Req.GET_FEATURES)).toBe(COMMON_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL | RING_PACKED);
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  });

  test("guest output reaches --output-file byte-exact: text, then 1 MiB of random data", async () => {
    const out = path("out.log");
    writeFileSync(out, "existing line\n"); // appended to, not truncated
    const { vmm, ram } = await session({ "output-file": out, "input-file": "/dev/null" });
    vmm.activate(2);
    const tx = vmm.queues[1]!;
    const text = Buffer.from("Linux version 6.12 ...\r\nhello from the guest\r\n");
    sendOutput(ram, tx, text, 16);
    await tx.waitUsed(Math.ceil(text.length / 16));
    expect(readFileSync(out, "utf8")).toBe("existing line\n" + text.toString());

    const data = randomBytes(MiB);
    const chains = sendOutput(ram, tx, data, 32 * 1024, { split: true, indirect: true });
    let done = 0;
    while (done < chains) done += (await tx.waitUsed(Math.min(8, chains - done))).length;
    const file = readFileSync(out);
    expect(file.length).toBe(14 + text.length + MiB);
    expect(sha(file.subarray(14 + text.length))).toBe(sha(data));
  });

  test("input from a regular --input-file reaches the receive queue byte-exact", async () => {
    const input = path("in.bin");
    const data = randomBytes(300 * 1024);
    writeFileSync(input, data);
    const { vmm, ram } = await session({ "output-file": path("out"), "input-file": input });
    vmm.activate(2);
    const got = await receive(ram, vmm.queues[0]!, data.length, 4096, 16);
    expect(sha(got)).toBe(sha(data));
  });

  test("input from a FIFO written after start, before any receive buffer exists, is kept and delivered", async () => {
    const fifo = path("in.fifo");
    mkfifo(fifo);
    const out = path("out");
    const { vmm, ram } = await session({ "output-file": out, "input-file": fifo });
    // The device holds the read end, so this open does not wait; 512 KiB is 8 pipes' worth: the
    // writes can only finish because the device keeps reading into its pending buffer.
    const w = open(fifo, O_WRONLY | O_NONBLOCK);
    const data = randomBytes(512 * 1024);
    await writeAll(w, data);
    close(w); // EOF: ends input, not the device
    vmm.activate(2);
    const got = await receive(ram, vmm.queues[0]!, data.length, 8192, 16);
    expect(sha(got)).toBe(sha(data));
    // Still a working device after input EOF.
    sendOutput(ram, vmm.queues[1]!, Buffer.from("still here\n"), 64);
    await vmm.queues[1]!.waitUsed(1);
    expect(readFileSync(out, "utf8")).toBe("still here\n");
  });

  test("back-pressure: output to a FIFO nobody reads stays in the ring, then arrives whole", async () => {
    const fifo = path("out.fifo");
    mkfifo(fifo);
    const { vmm, ram } = await session({ "output-file": fifo, "input-file": "/dev/null" });
    vmm.activate(2, 64);
    const tx = vmm.queues[1]!;
    const data = randomBytes(MiB);
    const chunk = 64 * 1024;
    const chains = sendOutput(ram, tx, data, chunk);
    // The device can take at most one pipe's worth before it has to stop and leave the rest.
    await until(() => tx.usedIdx() >= 1, "the first chain to complete");
    const r = open(fifo, O_RDONLY | O_NONBLOCK);
    cleanups.push(() => close(r));
    const capacity = fcntl(r, F_GETPIPE_SZ);
    expect(tx.usedIdx() * chunk).toBeLessThanOrEqual(capacity);
    expect(tx.usedIdx()).toBeLessThan(chains);
    // A reader arrives: everything comes out, in order, nothing lost.
    const got = await readExactly(r, data.length);
    expect(sha(got)).toBe(sha(data));
    await until(() => tx.usedIdx() === chains, "every chain to complete");
  });

  test("syslog output: one message per line to the syslog socket", async () => {
    const sock = path("log.sock");
    const s = bindUnixDatagram(sock);
    cleanups.push(() => close(s));
    const { vmm, ram } = await session({ syslog: true, "syslog-socket": sock, "input-file": "/dev/null" });
    vmm.activate(2);
    sendOutput(ram, vmm.queues[1]!, Buffer.from("first line\r\nsecond "), 64);
    sendOutput(ram, vmm.queues[1]!, Buffer.from("line\nunfinished"), 64);
    await vmm.queues[1]!.waitUsed(2);
    const buf = new Uint8Array(2048);
    const msgs: string[] = [];
    await until(() => {
      const n = read(s, buf, buf.length);
      if (n > 0) msgs.push(Buffer.from(buf.subarray(0, n)).toString());
      return msgs.length === 2;
    }, "two syslog messages");
    expect(msgs[0]).toMatch(/^<14>\w{3} [ \d]\d \d\d:\d\d:\d\d console\[\d+\]: first line$/);
    expect(msgs[1]).toMatch(/console\[\d+\]: second line$/);
  });

  test("malformed chains are completed and the device keeps working", async () => {
    const input = path("in");
    writeFileSync(input, "input!");
    const out = path("out");
    const { vmm, ram } = await session({ "output-file": out, "input-file": input });
    vmm.activate(2);
    const [rx, tx] = vmm.queues as [DriverQueue, DriverQueue];
    // A device-readable buffer on the receive queue: nothing can be written into it.
    const ro = ram.alloc(64);
    const h1 = rx.addChain([{ gpa: ro, len: 64 }]);
    expect(await rx.waitUsed(1)).toEqual([{ id: h1, len: 0 }]);
    // A transmit buffer outside guest memory, and one that is device-writable only.
    const h2 = tx.addChain([{ gpa: ram.size + 0x10000, len: 64 }]);
    const wo = ram.alloc(64);
    const h3 = tx.addChain([{ gpa: wo, len: 64, write: true }]);
    const used = await tx.waitUsed(2);
    expect(used).toEqual([{ id: h2, len: 0 }, { id: h3, len: 0 }]);
    // A receive chain crossing the end of guest memory is refused as a whole.
    const h4 = rx.addChain([{ gpa: ram.size - 16, len: 64, write: true }]);
    expect(await rx.waitUsed(1)).toEqual([{ id: h4, len: 0 }]);
    // Still delivering and printing.
    expect(Buffer.from(await receive(ram, rx, 6)).toString()).toBe("input!");
    sendOutput(ram, tx, Buffer.from("fine\n"), 64);
    await tx.waitUsed(1);
    expect(readFileSync(out, "utf8")).toBe("fine\n");
  });
});

describe("config space features", () => {
  test("SIZE from a terminal: raw mode, config change on resize, GET_CONFIG shows it; EMERG_WRITE", async () => {
    const pty = openPty(100, 30);
    cleanups.push(() => {
      close(pty.slaveFd);
      close(pty.master);
    });
    expect(lflag(pty.slaveFd) & ICANON).not.toBe(0);
    const out = path("out");
    const { vmm, ram, backend } = await session({ "output-file": out, "input-file": pty.slave, "config-space": true });
    // The device put the terminal in raw mode.
    expect(lflag(pty.slaveFd) & ICANON).toBe(0);
    const offered = vmm.conn.requestU64(Req.GET_FEATURES);
    expect(offered & VIRTIO_CONSOLE_F_SIZE).toBe(VIRTIO_CONSOLE_F_SIZE);
    expect(offered & VIRTIO_CONSOLE_F_EMERG_WRITE).toBe(VIRTIO_CONSOLE_F_EMERG_WRITE);
    expect(offered & VIRTIO_CONSOLE_F_MULTIPORT).toBe(0n);

    const [ours, theirs] = socketPair();
    cleanups.push(() => close(ours));
    setTimeouts(ours, 5000);
    vmm.handshake();
    expect(vmm.conn.ack(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs])).toBe(0n);
    close(theirs);
    vmm.setMemTable();
    const config = () => {
      const r = vmm.conn.request(Req.GET_CONFIG, configPayload(0, 12));
      const v = new DataView(r.payload.buffer, r.payload.byteOffset + 12);
      return { cols: v.getUint16(0, true), rows: v.getUint16(2, true), maxNrPorts: v.getUint32(4, true) };
    };
    expect(config()).toEqual({ cols: 100, rows: 30, maxNrPorts: 1 });
    const nextBackendMessage = () => {
      const h = new Uint8Array(HEADER_SIZE);
      const n = read(ours, h, HEADER_SIZE); // blocking, with the socket timeout
      expect(n).toBe(HEADER_SIZE);
      return new DataView(h.buffer).getUint32(0, true);
    };

    vmm.queues = [new DriverQueue(ram, 0, 64), new DriverQueue(ram, 1, 64)];
    for (const q of vmm.queues) vmm.startQueue(q);
    // The driver learns the first size from a config change once it is up.
    expect(nextBackendMessage()).toBe(BackendReq.CONFIG_CHANGE_MSG);

    pty.resize(132, 43);
    backend.hostEvent("resize");
    expect(nextBackendMessage()).toBe(BackendReq.CONFIG_CHANGE_MSG);
    expect(config()).toEqual({ cols: 132, rows: 43, maxNrPorts: 1 });

    // Raw mode: keystrokes arrive one by one, without waiting for a newline.
    write(pty.master, Buffer.from("ls\x03"), 3);
    expect(Buffer.from(await receive(ram, vmm.queues[0]!, 3)).toString()).toBe("ls\x03");

    // EMERG_WRITE: a character written to emerg_wr goes to port 0's output.
    const ch = new Uint8Array(4);
    new DataView(ch.buffer).setUint32(0, 0x21, true);
    expect(vmm.conn.ack(Req.SET_CONFIG, configPayload(8, 4, 0, ch))).toBe(0n);
    expect(vmm.conn.ack(Req.SET_CONFIG, configPayload(0, 2, 0, new Uint8Array(2)))).not.toBe(0n); // cols is read-only
    await until(() => fileSize(out) === 1, "the emergency character");
    expect(readFileSync(out, "utf8")).toBe("!");

    // The terminal mode comes back when the backend stops.
    await backend.stop();
    await until(() => (lflag(pty.slaveFd) & ICANON) !== 0, "the terminal mode to be restored");
  });

  test("without a terminal, --config-space offers EMERG_WRITE but not SIZE", async () => {
    const { vmm } = await session({ "output-file": path("out"), "input-file": "/dev/null", "config-space": true });
    expect(vmm.conn.requestU64(Req.GET_FEATURES)).toBe(COMMON_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL | RING_PACKED | VIRTIO_CONSOLE_F_EMERG_WRITE);
  });
});

describe("multiport", () => {
  test("control handshake, names, per-port output files, input held until the port is opened", async () => {
    const out0 = path("out0");
    const out1 = path("log.out");
    const in1 = path("in1");
    writeFileSync(in1, "to port 1");
    const { vmm, ram } = await session({
      "output-file": out0,
      "input-file": "/dev/null",
      port: [`name=log,output-file=${out1},input-file=${in1}`, "name=sink"],
    });
    const offered = vmm.conn.requestU64(Req.GET_FEATURES);
    expect(offered & VIRTIO_CONSOLE_F_MULTIPORT).toBe(VIRTIO_CONSOLE_F_MULTIPORT);
    expect(offered & VIRTIO_CONSOLE_F_SIZE).toBe(0n); // no terminal
    expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(8n);
    vmm.activate(8);
    const r = vmm.conn.request(Req.GET_CONFIG, configPayload(0, 12));
    expect(new DataView(r.payload.buffer).getUint32(12 + 4, true)).toBe(3); // max_nr_ports

    const q = vmm.queues;
    const control = new ControlReceiver(ram, q[2]!);
    sendCtrl(ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.DEVICE_READY, 1));
    const adds = await control.waitFor(3);
    expect(adds.map((m) => [m.id, m.event])).toEqual([[0, VIRTIO_CONSOLE.PORT_ADD], [1, VIRTIO_CONSOLE.PORT_ADD], [2, VIRTIO_CONSOLE.PORT_ADD]]);

    sendCtrl(ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.PORT_READY, 1));
    const port0 = await control.waitFor(2);
    expect(port0.map((m) => [m.id, m.event, m.value])).toEqual([[0, VIRTIO_CONSOLE.CONSOLE_PORT, 1], [0, VIRTIO_CONSOLE.PORT_OPEN, 1]]);
    sendCtrl(ram, q[3]!, ctrl(1, VIRTIO_CONSOLE.PORT_READY, 1));
    const port1 = await control.waitFor(2);
    expect(port1.map((m) => [m.id, m.event, m.value])).toEqual([[1, VIRTIO_CONSOLE.PORT_NAME, 1], [1, VIRTIO_CONSOLE.PORT_OPEN, 1]]);
    expect(Buffer.from(port1[0]!.extra).toString()).toBe("log");
    sendCtrl(ram, q[3]!, ctrl(2, VIRTIO_CONSOLE.PORT_READY, 1));
    expect((await control.waitFor(2)).map((m) => [m.id, m.event])).toEqual([[2, VIRTIO_CONSOLE.PORT_NAME], [2, VIRTIO_CONSOLE.PORT_OPEN]]);
    // A short control message, and one for a port that does not exist: ignored, completed.
    sendCtrl(ram, q[3]!, new Uint8Array(3));
    sendCtrl(ram, q[3]!, ctrl(9, VIRTIO_CONSOLE.PORT_OPEN, 1));
    await until(() => q[3]!.usedIdx() === 6, "the control transmitq to drain");

    // Input for port 1 waits until a guest program opens the port (Linux drops it otherwise). The
    // buffer is kicked before the next control message, so the device has seen it by the time the
    // control round trip ends: it is still unused then.
    const rx1 = q[4]!;
    const buf = ram.alloc(64);
    const head = rx1.addChain([{ gpa: buf, len: 64, write: true }]);
    sendCtrl(ram, q[3]!, ctrl(1, VIRTIO_CONSOLE.PORT_READY, 1)); // a repeated PORT_READY: answered again
    expect((await control.waitFor(2)).map((m) => m.event)).toEqual([VIRTIO_CONSOLE.PORT_NAME, VIRTIO_CONSOLE.PORT_OPEN]);
    expect(rx1.usedIdx()).toBe(0);
    sendCtrl(ram, q[3]!, ctrl(1, VIRTIO_CONSOLE.PORT_OPEN, 1));
    const [u] = await rx1.waitUsed(1);
    expect(u).toEqual({ id: head, len: 9 });
    expect(Buffer.from(ram.bytes(buf, 9)).toString()).toBe("to port 1");

    // Output of each port goes to its own file; port 2 has none and discards.
    sendOutput(ram, q[5]!, Buffer.from("port one\n"), 64);
    sendOutput(ram, q[1]!, Buffer.from("port zero\n"), 64);
    sendOutput(ram, q[7]!, Buffer.from("nowhere\n"), 64);
    await q[5]!.waitUsed(1);
    await q[1]!.waitUsed(1);
    await q[7]!.waitUsed(1);
    expect(readFileSync(out1, "utf8")).toBe("port one\n");
    expect(readFileSync(out0, "utf8")).toBe("port zero\n");
  });

  test("RESIZE goes to the console port over the control queue", async () => {
    const pty = openPty(80, 24);
    cleanups.push(() => {
      close(pty.slaveFd);
      close(pty.master);
    });
    const { vmm, ram, backend } = await session({ "output-file": path("out"), "input-file": pty.slave, port: ["name=x"] });
    expect(vmm.conn.requestU64(Req.GET_FEATURES) & VIRTIO_CONSOLE_F_SIZE).toBe(VIRTIO_CONSOLE_F_SIZE);
    vmm.activate(6);
    const q = vmm.queues;
    const control = new ControlReceiver(ram, q[2]!);
    sendCtrl(ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.DEVICE_READY, 1));
    await control.waitFor(2);
    sendCtrl(ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.PORT_READY, 1));
    const msgs = await control.waitFor(3);
    expect(msgs.map((m) => m.event)).toEqual([VIRTIO_CONSOLE.CONSOLE_PORT, VIRTIO_CONSOLE.PORT_OPEN, VIRTIO_CONSOLE.RESIZE]);
    const size = (m: CtrlMsg) => {
      const v = new DataView(m.extra.buffer, m.extra.byteOffset, 4);
      return [v.getUint16(0, true), v.getUint16(2, true)]; // cols, rows (the spec's order)
    };
    expect(size(msgs[2]!)).toEqual([80, 24]);
    pty.resize(120, 50);
    backend.hostEvent("resize");
    const [resize] = await control.waitFor(1);
    expect(resize!.event).toBe(VIRTIO_CONSOLE.RESIZE);
    expect(size(resize!)).toEqual([120, 50]);
  });
});

describe("snapshot", () => {
  test("pending input and port state survive a restore into a fresh backend", async () => {
    const fifo = path("in.fifo");
    mkfifo(fifo);
    const out = path("out");
    const a = await session({ "output-file": out, "input-file": fifo, port: ["name=p1"] });
    a.vmm.activate(6);
    const q = a.vmm.queues;
    const control = new ControlReceiver(a.ram, q[2]!);
    sendCtrl(a.ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.DEVICE_READY, 1));
    await control.waitFor(2);
    sendCtrl(a.ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.PORT_READY, 1));
    sendCtrl(a.ram, q[3]!, ctrl(0, VIRTIO_CONSOLE.PORT_OPEN, 1)); // the guest's hvc opens port 0
    await control.waitFor(2);
    // Input arrives while the guest has no receive buffer posted.
    const w = open(fifo, O_WRONLY | O_NONBLOCK);
    const data = randomBytes(200 * 1024);
    await writeAll(w, data);
    await until(() => {
      const n = new Uint8Array(4);
      ioctl(w, FIONREAD, n);
      return new DataView(n.buffer).getUint32(0, true) === 0;
    }, "the device to read the FIFO empty");
    close(w);

    const bases = a.vmm.stopAll();
    const blob = await a.vmm.saveState();
    await a.backend.stop();

    // A fresh backend process with the same port layout (and no input of its own).
    const b = await session({ "output-file": out, "input-file": "/dev/null", port: ["name=p1"] }, a.ram);
    b.vmm.handshake();
    b.vmm.setMemTable();
    expect(await b.vmm.loadState(blob)).toBe(0n);
    b.vmm.queues = q;
    q.forEach((dq, i) => b.vmm.startQueue(dq, bases[i]));
    const got = await receive(a.ram, q[0]!, data.length, 4096, 32);
    expect(sha(got)).toBe(sha(data));
    // Output continues in the new process.
    sendOutput(a.ram, q[1]!, Buffer.from("after restore\n"), 64);
    await q[1]!.waitUsed(1);
    expect(readFileSync(out, "utf8")).toBe("after restore\n");
  });

  test("a partly written chain continues exactly where it stopped, in the new process", async () => {
    const fifo = path("out.fifo");
    mkfifo(fifo);
    const a = await session({ "output-file": fifo, "input-file": "/dev/null" });
    a.vmm.activate(2);
    const tx = a.vmm.queues[1]!;
    const data = randomBytes(256 * 1024);
    const chunk = 40 * 1024; // does not divide the pipe: one chain is cut in the middle
    const chains = sendOutput(a.ram, tx, data, chunk);
    const r = open(fifo, O_RDONLY | O_NONBLOCK);
    cleanups.push(() => close(r));
    const capacity = fcntl(r, F_GETPIPE_SZ);
    await until(() => {
      const n = new Uint8Array(4);
      ioctl(r, FIONREAD, n);
      return new DataView(n.buffer).getUint32(0, true) === capacity;
    }, "the pipe to fill");
    const bases = a.vmm.stopAll();
    expect(bases[1]).toBe(Math.floor(capacity / chunk));
    const blob = await a.vmm.saveState();
    await a.backend.stop();
    const first = await readExactly(r, capacity);

    const out = path("rest");
    const b = await session({ "output-file": out, "input-file": "/dev/null" }, a.ram);
    b.vmm.handshake();
    b.vmm.setMemTable();
    expect(await b.vmm.loadState(blob)).toBe(0n);
    b.vmm.queues = a.vmm.queues;
    b.vmm.startQueue(tx, bases[1]);
    await until(() => tx.usedIdx() === chains, "every chain to complete");
    const rest = readFileSync(out);
    expect(sha(Buffer.concat([first, rest]))).toBe(sha(data));
  });

  test("restore refuses a state with a different port layout", async () => {
    const a = await session({ "output-file": path("a"), "input-file": "/dev/null", port: ["name=one"] });
    a.vmm.activate(6);
    a.vmm.stopAll();
    const blob = await a.vmm.saveState();
    const b = await session({ "output-file": path("b"), "input-file": "/dev/null", port: ["name=two"] });
    b.vmm.handshake();
    b.vmm.setMemTable();
    expect(await b.vmm.loadState(blob)).not.toBe(0n);
    const c = await session({ "output-file": path("c"), "input-file": "/dev/null" });
    c.vmm.handshake(COMMON_FEATURES | F_PROTOCOL_FEATURES);
    c.vmm.setMemTable();
    expect(await c.vmm.loadState(blob)).not.toBe(0n);
  });
});
