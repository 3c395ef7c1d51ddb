// The net device end to end against real taps in a throwaway network namespace: frames both ways
// byte-exact, mergeable receive buffers with 64 KiB GSO frames (and the bounce-buffer tail when the
// guest has too few buffers), one chain per frame without MRG_RXBUF, offloads reaching the tap,
// the control queue, hostile chains, snapshot/restore, SEND_RARP, NET_SET_MTU, two queue pairs in
// a subprocess; and NetPairRunner driven directly (a full pipe for EAGAIN back-pressure, a
// datagram socket pair for receive starvation). Needs root (skipped otherwise).
//
// The backend's worker thread is not in the namespace: each test opens its tap fd in the
// namespace (ns.enter) and passes it as `tap-fd`.
import { describe, test, expect, beforeAll, afterAll } from "bun:test";
import { openSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { libc, check, close, EAGAIN } from "../../ffi/libc.ts";
import { read, write, pipe, fcntl, F_SETPIPE_SZ, O_CLOEXEC, O_NONBLOCK } from "../../ffi/io.ts";
import { signal } from "../../ffi/eventfd.ts";
import * as tun from "../../ffi/tap.ts";
import { NetNamespace, netnsAvailable, sh } from "../support/netns.ts";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, Req, u64, vringState, configPayload, RING_PACKED } from "../support/frontend.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { COMMON_FEATURES } from "../../src/device.ts";
import { decodeEnvelope, encodeEnvelope } from "../../src/snapshot.ts";
import { NetPairRunner, MAX_TX_FRAME } from "../../devices/net/pair_runner.ts";
import { NetShared, PairStat, RX_PROMISC } from "../../devices/net/shared.ts";
import { metrics } from "../../src/metrics.ts";
import { openPairRings } from "../../devices/net/uring_tx.ts";
import { closeRingHandle, type RingHandle } from "../../ffi/io_uring.ts";
import { setupRxRing } from "../../devices/net/rx_multishot.ts";
import { rarpFrame } from "../../devices/net/tap.ts";
import {
  decodeNetHdr, VIRTIO_NET_HDR_SIZE, VIRTIO_NET_OK, VIRTIO_NET_ERR, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM, GUEST_OFFLOAD_FEATURES, VIRTIO_NET_F_MQ,
  VIRTIO_NET_HDR_F, VIRTIO_NET_HDR_GSO, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_NOBCAST,
  VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
  VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_S, VIRTIO_NET_F_GUEST_TSO6,
} from "../../devices/net/virtio_net.ts";
import { packetSocket, TEST_ETHERTYPE } from "../support/packet_socket.ts";
import { AF, SOCK } from "../../ffi/socket.ts";

const AVAILABLE = netnsAvailable();
const HAVE_ETHTOOL = AVAILABLE && sh(["ethtool", "--version"], true).code === 0;
/** Every device test runs on both transmit paths: io_uring batches and one writev per frame. */
const IO_PATHS = ["uring", "syscall"] as const;
const MAIN = join(import.meta.dir, "../../app/main.ts");

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const HDR = VIRTIO_NET_HDR_SIZE;

const GUEST_MAC = "02:00:00:00:00:42";
const OTHER_MAC = "02:00:00:00:00:99";
const PEER_MAC = "02:00:00:00:aa:01";
const BROADCAST = "ff:ff:ff:ff:ff:ff";

/** Any MAC (unicast, multicast or broadcast) as bytes. */
const mac = (s: string) => Uint8Array.from(s.split(":").map((h) => parseInt(h, 16)));
const eq = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));
const ethertypeAt = (p: Uint8Array, off = 0) => (p[off + 12]! << 8) | p[off + 13]!;

/** A frame of our own ethertype: `dst`, a peer source, `tag` then a pattern, `len` bytes in all. */
function frame(tag: string, dst = BROADCAST, len = 100): Uint8Array {
  const f = new Uint8Array(len);
  f.set(mac(dst), 0);
  f.set(mac(PEER_MAC), 6);
  new DataView(f.buffer).setUint16(12, TEST_ETHERTYPE);
  const t = Buffer.from(`${tag}|`);
  f.set(t.subarray(0, Math.max(0, len - 14)), 14);
  for (let i = 14 + t.length; i < len; i++) f[i] = (i * 7) & 0xff;
  return f;
}
const tagOf = (f: Uint8Array, off = 0) => Buffer.from(f.subarray(off + 14, off + 14 + 40)).toString("latin1").split("|")[0]!;

function ipChecksum(b: Uint8Array, off: number, len: number): number {
  let s = 0;
  for (let i = 0; i < len; i += 2) s += (b[off + i]! << 8) | b[off + i + 1]!;
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** An IPv4 frame to the guest: TCP with `payload` bytes (a GSO super-frame when large) or UDP from `port`. */
function ipFrame(proto: "tcp" | "udp", payload: number, port = 1234, dst = GUEST_MAC): Uint8Array {
  const l4 = proto === "tcp" ? 20 : 8;
  const f = new Uint8Array(14 + 20 + l4 + payload);
  const v = new DataView(f.buffer);
  f.set(mac(dst), 0);
  f.set(mac(PEER_MAC), 6);
  v.setUint16(12, 0x0800);
  f[14] = 0x45;
  v.setUint16(16, f.length - 14);
  v.setUint16(18, port);
  f[22] = 64;
  f[23] = proto === "tcp" ? 6 : 17;
  f.set([10, 77, 0, 1], 26);
  f.set([10, 77, 0, 2], 30);
  v.setUint16(24, ipChecksum(f, 14, 20));
  v.setUint16(34, port);
  v.setUint16(36, 5001);
  if (proto === "tcp") {
    v.setUint32(38, 1000);
    f[46] = 0x50;
    f[47] = 0x18;
    v.setUint16(48, 65535);
  } else v.setUint16(38, 8 + payload);
  for (let i = 14 + 20 + l4; i < f.length; i++) f[i] = (i ^ port) & 0xff;
  return f;
}

function ethtool(ns: NetNamespace, dev: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of ns.exec(["ethtool", "-k", dev]).out.split("\n")) {
    const m = /^\s*([a-z0-9_-]+): (on|off)/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(2);
  }
}

/** Reads frames from a non-blocking fd until `match` accepts one; returns it. */
async function capture(fd: number, match: (p: Uint8Array) => boolean, ms = 3000): Promise<Uint8Array> {
  const buf = new Uint8Array(70000);
  const end = Date.now() + ms;
  for (;;) {
    for (;;) {
      const n = read(fd, buf, buf.length);
      if (n === -EAGAIN) break;
      const p = buf.slice(0, n);
      if (match(p)) return p;
    }
    if (Date.now() > end) throw new Error("timed out waiting for a frame");
    await Bun.sleep(2);
  }
}

/** Every frame of ours (TEST_ETHERTYPE) `fd` sees within `ms`. */
async function collect(fd: number, ms: number): Promise<Uint8Array[]> {
  const buf = new Uint8Array(70000);
  const out: Uint8Array[] = [];
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const n = read(fd, buf, buf.length);
    if (n === -EAGAIN) {
      await Bun.sleep(2);
      continue;
    }
    if (ethertypeAt(buf) === TEST_ETHERTYPE) out.push(buf.slice(0, n));
  }
  return out;
}

interface Used {
  id: number;
  len: number;
  bytes: Uint8Array;
}

/** The driver side of one net device: its queues, the tap it sits on, a packet socket on that tap. */
class Rig {
  readonly ram = new GuestRam(1 << 24);
  vmm!: Vmm;
  rx!: DriverQueue;
  tx!: DriverQueue;
  ctrl!: DriverQueue;
  offered = 0n;
  acked = 0n;
  /** Captures every frame on the tap (both directions). */
  ps: number;
  private gsoFd = -1;
  private readonly rxBufs = new Map<number, { gpa: number; len: number }>();
  private readonly usedBacklog = new Map<number, Used[]>();

  private constructor(readonly ns: NetNamespace, readonly tap: string, readonly tapFd: number, readonly backend: BackendUnderTest) {
    this.ps = ns.enter(() => packetSocket(tap));
  }

  /** A fresh tap `name` and a backend on it; `features` picks the acked set from the offered one (default: all). */
  static async create(ns: NetNamespace, name: string, o: { features?: (offered: bigint) => bigint; activate?: boolean; options?: Record<string, unknown> } = {}): Promise<Rig> {
    ns.addTap(name);
    const tapFd = ns.enter(() => {
      const fd = tun.openTunDevice(true);
      tun.tunSetIff(fd, name, tun.IFF.TAP | tun.IFF.NO_PI | tun.IFF.VNET_HDR);
      return fd;
    });
    const b = new BackendUnderTest("net", { "tap-fd": String(tapFd), mac: GUEST_MAC, ...o.options });
    await b.ready;
    const r = new Rig(ns, name, tapFd, b);
    r.vmm = new Vmm(b, r.ram);
    r.offered = r.vmm.conn.requestU64(Req.GET_FEATURES) & ~RING_PACKED; // this driver builds split rings
    if (o.activate ?? true) r.activate(o.features?.(r.offered) ?? r.offered);
    return r;
  }

  activate(features: bigint): void {
    this.acked = features;
    this.vmm.activate(3, 256, features);
    [this.rx, this.tx, this.ctrl] = this.vmm.queues as [DriverQueue, DriverQueue, DriverQueue];
  }

  /** Sends each frame behind `hdr` (default: a zeroed header) as one chain; one kick for all. */
  send(frames: Uint8Array[], hdr: Uint8Array = new Uint8Array(HDR)): void {
    for (const f of frames) {
      const g = this.ram.alloc(hdr.length + f.length);
      this.ram.bytes(g, hdr.length).set(hdr);
      this.ram.bytes(g + hdr.length, f.length).set(f);
      this.tx.addChain([{ gpa: g, len: hdr.length + f.length }], { kick: false });
    }
    signal(this.tx.kick);
  }

  /** Posts `n` receive chains of `len` bytes each; one kick for all. Returns their heads. */
  post(n: number, len = 2048, q = this.rx): number[] {
    const heads: number[] = [];
    for (let i = 0; i < n; i++) {
      const gpa = this.ram.alloc(len);
      this.ram.bytes(gpa, len).fill(0xee);
      const head = q.addChain([{ gpa, len, write: true }], { kick: false });
      this.rxBufs.set(q.index * 65536 + head, { gpa, len });
      heads.push(head);
    }
    signal(q.kick);
    return heads;
  }

  /** Waits for the next `n` used receive chains; returns them with the bytes the device wrote. */
  async received(n: number, q = this.rx): Promise<Used[]> {
    const ready = this.usedBacklog.get(q.index) ?? [];
    this.usedBacklog.set(q.index, ready);
    if (ready.length < n) {
      // waitUsed returns everything published so far: keep what goes beyond `n` for the next call.
      for (const u of await q.waitUsed(n - ready.length)) {
        const b = this.rxBufs.get(q.index * 65536 + u.id);
        ready.push({ ...u, bytes: b === undefined ? new Uint8Array(0) : this.ram.bytes(b.gpa, Math.min(u.len, b.len)).slice() });
      }
    }
    return ready.splice(0, n);
  }

  /** Injects a frame into the tap from the namespace's side (it becomes readable on the tap fd). */
  inject(f: Uint8Array): void {
    expect(write(this.ps, f, f.length)).toBe(f.length);
  }

  /** Injects a GSO frame (one super-frame the tap hands over whole when the guest's offloads allow it). */
  injectTso(f: Uint8Array, gsoSize = 1448): void {
    if (this.gsoFd < 0) this.gsoFd = this.ns.enter(() => packetSocket(this.tap, true));
    const pkt = new Uint8Array(10 + f.length);
    const v = new DataView(pkt.buffer);
    pkt[0] = VIRTIO_NET_HDR_F.NEEDS_CSUM;
    pkt[1] = VIRTIO_NET_HDR_GSO.TCPV4;
    v.setUint16(2, 54, true);
    v.setUint16(4, gsoSize, true);
    v.setUint16(6, 34, true);
    v.setUint16(8, 16, true);
    pkt.set(f, 10);
    expect(write(this.gsoFd, pkt, pkt.length)).toBe(pkt.length);
  }

  /** Sends one control command (class, command, data) and returns the device's ack byte. */
  async command(cls: number, cmd: number, data: Uint8Array = new Uint8Array(0), q = this.ctrl): Promise<number> {
    const g = this.ram.alloc(2 + data.length);
    this.ram.bytes(g, 2).set([cls, cmd]);
    this.ram.bytes(g + 2, data.length).set(data);
    const ack = this.ram.alloc(1);
    this.ram.bytes(ack, 1)[0] = 0xee;
    q.addChain([{ gpa: g, len: 2 + data.length }, { gpa: ack, len: 1, write: true }]);
    const [u] = await q.waitUsed(1);
    expect(u!.len).toBe(1);
    return this.ram.bytes(ack, 1)[0]!;
  }

  config(): { mac: Uint8Array; status: number; pairs: number; mtu: number } {
    const r = this.vmm.conn.request(Req.GET_CONFIG, configPayload(0, 12));
    const d = r.payload.subarray(12);
    const v = new DataView(d.buffer, d.byteOffset, 12);
    return { mac: d.slice(0, 6), status: v.getUint16(6, true), pairs: v.getUint16(8, true), mtu: v.getUint16(10, true) };
  }

  /** Asserts the queue publishes nothing for `ms`. */
  async quiet(q: DriverQueue, ms = 150): Promise<void> {
    const before = q.usedIdx();
    await Bun.sleep(ms);
    expect(q.usedIdx()).toBe(before);
  }

  async dispose(): Promise<void> {
    this.vmm.dispose();
    this.ram.dispose();
    close(this.ps);
    if (this.gsoFd >= 0) close(this.gsoFd);
    await this.backend.stop(); // the device closes the tap fd
    sh(["ip", "-n", this.ns.name, "link", "del", this.tap], true);
  }
}

const macTable = (unicast: string[], multicast: string[]) => {
  const b = new Uint8Array(8 + 6 * (unicast.length + multicast.length));
  const v = new DataView(b.buffer);
  v.setUint32(0, unicast.length, true);
  unicast.forEach((m, i) => b.set(mac(m), 4 + 6 * i));
  const o = 4 + 6 * unicast.length;
  v.setUint32(o, multicast.length, true);
  multicast.forEach((m, i) => b.set(mac(m), o + 4 + 6 * i));
  return b;
};
const le64 = (v: bigint) => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
};
const le16 = (v: number) => Uint8Array.of(v & 0xff, v >> 8);

for (const io of IO_PATHS)
describe.skipIf(!AVAILABLE)(`net device (taps in a network namespace), --net-io ${io}`, () => {
  let ns: NetNamespace;
  let seq = 0;
  const rigs: Rig[] = [];
  const rig = async (o?: Parameters<typeof Rig.create>[2]) => {
    const r = await Rig.create(ns, `vhut${seq++}`, { ...o, options: { "net-io": io, ...o?.options } });
    rigs.push(r);
    return r;
  };

  beforeAll(() => {
    ns = NetNamespace.create();
  });
  afterAll(async () => {
    for (const r of rigs.splice(0)) await r.dispose().catch(() => {});
    ns?.destroy();
  });

  test("transmit: several chains per kick reach the tap byte-exact, in order, with one call for the batch", async () => {
    const r = await rig();
    const frames = [frame("tx-0", OTHER_MAC, 60), frame("tx-1", BROADCAST, 1514), frame("tx-2", OTHER_MAC, 300), frame("tx-3", BROADCAST, 61)];
    r.tx.calls();
    r.send(frames);
    const used = await r.tx.waitUsed(frames.length);
    expect(used.map((u) => u.len)).toEqual([0, 0, 0, 0]);
    const got: Uint8Array[] = [];
    for (let i = 0; i < frames.length; i++) got.push(await capture(r.ps, (p) => ethertypeAt(p) === TEST_ETHERTYPE));
    got.forEach((g, i) => expect(eq(g, frames[i]!)).toBe(true));
    expect(r.tx.calls()).toBe(1);
  });

  test("receive: frames injected into the tap arrive behind a 12-byte header, num_buffers 1, used length exact", async () => {
    const r = await rig();
    const heads = r.post(8, 2048);
    await r.quiet(r.rx, 50); // buffers alone complete nothing
    const frames = [frame("rx-0", GUEST_MAC, 60), frame("rx-1", BROADCAST, 1514), frame("rx-2", GUEST_MAC, 777)];
    r.rx.calls();
    for (const f of frames) r.inject(f);
    const used = await r.received(3);
    used.forEach((u, i) => {
      expect(u.id).toBe(heads[i]!); // in the order the driver posted them
      expect(u.len).toBe(HDR + frames[i]!.length);
      expect(Array.from(u.bytes.subarray(0, 10))).toEqual(new Array(10).fill(0));
      expect(decodeNetHdr(u.bytes).numBuffers).toBe(1);
      expect(eq(u.bytes.subarray(HDR), frames[i]!)).toBe(true);
    });
    // The backend signals the call eventfd just after publishing the used entries: wait for it.
    let calls = 0;
    for (const end = Date.now() + 2000; calls === 0 && Date.now() < end; await Bun.sleep(2)) calls += r.rx.calls();
    expect(calls).toBeGreaterThanOrEqual(1);
    // The five buffers left serve later frames.
    r.inject(frame("rx-3", GUEST_MAC, 200));
    const [u] = await r.received(1);
    expect(u!.id).toBe(heads[3]!);
    expect(tagOf(u!.bytes, HDR)).toBe("rx-3");
  });

  test("MRG_RXBUF: a 64 KiB TSO frame spans several chains; num_buffers, lengths and bytes add up; spare chains go back", async () => {
    const r = await rig(); // all offered: MRG_RXBUF, GUEST_CSUM|GUEST_TSO4 pushed to the tap
    expect(r.acked & (VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4)).toBe(VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4);
    const heads = r.post(24, 4096);
    const big = ipFrame("tcp", 64000);
    expect(big.length).toBeGreaterThan(60 * 1024);
    r.injectTso(big);
    const chains = Math.ceil((HDR + big.length) / 4096);
    const used = await r.received(chains);
    expect(used.map((u) => u.id)).toEqual(heads.slice(0, chains));
    const h = decodeNetHdr(used[0]!.bytes);
    expect(h.numBuffers).toBe(chains);
    expect(h.gsoType).toBe(VIRTIO_NET_HDR_GSO.TCPV4);
    expect(h.gsoSize).toBe(1448);
    expect(h.flags & VIRTIO_NET_HDR_F.NEEDS_CSUM).toBe(VIRTIO_NET_HDR_F.NEEDS_CSUM);
    expect(used.reduce((s, u) => s + u.len, 0)).toBe(HDR + big.length);
    used.slice(0, -1).forEach((u) => expect(u.len).toBe(4096));
    const whole = Buffer.concat(used.map((u) => u.bytes)).subarray(HDR);
    expect(new DataView(whole.buffer, whole.byteOffset).getUint16(16)).toBe(whole.length - 14); // IP total length
    expect(eq(whole, big)).toBe(true);
    // The chains that frame did not need were put back, in order: the next frame takes the next one.
    const small = frame("after-big", GUEST_MAC, 90);
    r.inject(small);
    const [u] = await r.received(1);
    expect(u!.id).toBe(heads[chains]!);
    expect(eq(u!.bytes.subarray(HDR), small)).toBe(true);
  });

  test("MRG_RXBUF with too few buffers: the frame waits (its tail in the bounce buffer) and arrives whole once more buffers come", async () => {
    const r = await rig();
    const first = r.post(4, 4096); // 16 KiB: a quarter of the frame
    const big = ipFrame("tcp", 64000, 4321);
    r.injectTso(big);
    await r.quiet(r.rx, 200); // nothing completed: no partial frame, no truncation
    const more = r.post(20, 4096);
    const chains = Math.ceil((HDR + big.length) / 4096);
    const used = await r.received(chains);
    expect(used.map((u) => u.id)).toEqual([...first, ...more].slice(0, chains));
    expect(decodeNetHdr(used[0]!.bytes).numBuffers).toBe(chains);
    expect(used.reduce((s, u) => s + u.len, 0)).toBe(HDR + big.length);
    expect(eq(Buffer.concat(used.map((u) => u.bytes)).subarray(HDR), big)).toBe(true);
    // And the ring goes on with the chains left.
    const small = frame("after-tail", GUEST_MAC, 64);
    r.inject(small);
    const [u] = await r.received(1);
    expect(u!.id).toBe(more[chains - 4]!);
    expect(eq(u!.bytes.subarray(HDR), small)).toBe(true);
  });

  test("without MRG_RXBUF: one chain per frame (num_buffers 1); a frame larger than the buffer is dropped, never truncated", async () => {
    const r = await rig({ features: (f) => f & ~VIRTIO_NET_F_MRG_RXBUF });
    expect(r.acked & VIRTIO_NET_F_MRG_RXBUF).toBe(0n);
    const heads = r.post(1, 1000);
    r.inject(frame("too-big", GUEST_MAC, 1200)); // 1212 bytes with the header: does not fit 1000
    r.inject(frame("fits", GUEST_MAC, 600));
    const [u] = await r.received(1);
    expect(u!.id).toBe(heads[0]!);
    expect(u!.len).toBe(HDR + 600);
    expect(tagOf(u!.bytes, HDR)).toBe("fits");
    expect(decodeNetHdr(u!.bytes).numBuffers).toBe(1);
    // A big TSO frame with big buffers: still one chain.
    const bigHeads = r.post(2, 65562);
    const big = ipFrame("tcp", 64000);
    r.injectTso(big);
    const [b] = await r.received(1);
    expect(b!.id).toBe(bigHeads[0]!);
    expect(b!.len).toBe(HDR + big.length);
    expect(decodeNetHdr(b!.bytes).numBuffers).toBe(1);
    expect(eq(b!.bytes.subarray(HDR), big)).toBe(true);
  });

  test.skipIf(!HAVE_ETHTOOL)("receive offloads reach the tap: SET_FEATURES, then CTRL_GUEST_OFFLOADS_SET through the control queue", async () => {
    const r = await rig({ features: (f) => f & ~(GUEST_OFFLOAD_FEATURES & ~(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4)) });
    let k = ethtool(ns, r.tap);
    expect([k["tx-checksumming"], k["tx-tcp-segmentation"], k["tx-tcp6-segmentation"]]).toEqual(["on", "on", "off"]);
    expect(await r.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(VIRTIO_NET_F_GUEST_CSUM))).toBe(VIRTIO_NET_OK);
    k = ethtool(ns, r.tap);
    expect([k["tx-checksumming"], k["tx-tcp-segmentation"]]).toEqual(["on", "off"]);
    expect(await r.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(0n))).toBe(VIRTIO_NET_OK);
    expect(ethtool(ns, r.tap)["tx-checksumming"]).toBe("off");
    // Beyond what was negotiated (TSO6), or malformed: refused, nothing changes.
    expect(await r.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6))).toBe(VIRTIO_NET_ERR);
    expect(await r.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(VIRTIO_NET_F_GUEST_CSUM).subarray(0, 7))).toBe(VIRTIO_NET_ERR);
    expect(ethtool(ns, r.tap)["tx-checksumming"]).toBe("off");
    expect(await r.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4))).toBe(VIRTIO_NET_OK);
    k = ethtool(ns, r.tap);
    expect([k["tx-checksumming"], k["tx-tcp-segmentation"]]).toEqual(["on", "on"]);
  });

  test("control queue: RX_PROMISC off with MAC_TABLE_SET filters; NOBCAST; MAC_ADDR_SET; malformed commands fail and the queue goes on", async () => {
    const r = await rig();
    r.post(64, 2048);
    /** Injects frames to `dsts` then a marker that passes; returns the tags that arrived before the marker. */
    const through = async (dsts: (string | Uint8Array)[], marker: string): Promise<string[]> => {
      dsts.forEach((d, i) => {
        const f = frame(`f${i}`, typeof d === "string" ? d : OTHER_MAC, 80);
        if (typeof d !== "string") f.set(d, 0);
        r.inject(f);
      });
      r.inject(frame("marker", marker, 80));
      const tags: string[] = [];
      for (;;) {
        const [u] = await r.received(1);
        const t = tagOf(u!.bytes, HDR);
        if (t === "marker") return tags;
        tags.push(t);
      }
    };
    const MCAST = "01:00:5e:00:00:fb";
    const MCAST2 = "01:00:5e:00:00:fc";
    // Promiscuous (the reset state): everything passes.
    expect(await through([OTHER_MAC, GUEST_MAC, BROADCAST], GUEST_MAC)).toEqual(["f0", "f1", "f2"]);
    expect(await r.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, Uint8Array.of(0))).toBe(VIRTIO_NET_OK);
    expect(await r.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, macTable(["02:00:00:00:00:77"], [MCAST]))).toBe(VIRTIO_NET_OK);
    expect(await through([OTHER_MAC, GUEST_MAC, BROADCAST, "02:00:00:00:00:77", MCAST, MCAST2], GUEST_MAC)).toEqual(["f1", "f2", "f3", "f4"]);
    expect(await r.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, Uint8Array.of(1))).toBe(VIRTIO_NET_OK);
    expect(await through([BROADCAST, GUEST_MAC], GUEST_MAC)).toEqual(["f1"]);
    // MAC_ADDR_SET: the new address passes, the old one no longer does; the config space follows.
    const NEW_MAC = "02:00:00:00:00:55";
    expect(await r.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, mac(NEW_MAC))).toBe(VIRTIO_NET_OK);
    expect(Array.from(r.config().mac)).toEqual(Array.from(mac(NEW_MAC)));
    expect(await through([GUEST_MAC, NEW_MAC], NEW_MAC)).toEqual(["f1"]);
    // Malformed: each fails with VIRTIO_NET_ERR and changes nothing.
    expect(await r.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, mac(OTHER_MAC).subarray(0, 5))).toBe(VIRTIO_NET_ERR);
    expect(await r.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, macTable([OTHER_MAC], []).subarray(0, 9))).toBe(VIRTIO_NET_ERR);
    const tooMany = new Uint8Array(8);
    new DataView(tooMany.buffer).setUint32(0, 65, true);
    expect(await r.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, tooMany)).toBe(VIRTIO_NET_ERR);
    expect(await r.command(VIRTIO_NET_CTRL_RX, 6, Uint8Array.of(1))).toBe(VIRTIO_NET_ERR); // no such RX command
    expect(await r.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, Uint8Array.of(1, 1))).toBe(VIRTIO_NET_ERR);
    expect(await r.command(99, 0)).toBe(VIRTIO_NET_ERR);
    expect(await r.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, le16(1))).toBe(VIRTIO_NET_ERR); // MQ not offered with one pair
    // A command shorter than class + code: ERR. A chain with no ack byte: completed with 0.
    const g = r.ram.alloc(1);
    const ack = r.ram.alloc(1);
    r.ram.bytes(ack, 1)[0] = 0xee;
    r.ctrl.addChain([{ gpa: g, len: 1 }, { gpa: ack, len: 1, write: true }]);
    expect((await r.ctrl.waitUsed(1))[0]!.len).toBe(1);
    expect(r.ram.bytes(ack, 1)[0]).toBe(VIRTIO_NET_ERR);
    r.ctrl.addChain([{ gpa: g, len: 1 }]);
    expect((await r.ctrl.waitUsed(1))[0]!.len).toBe(0);
    // The filter is as the good commands left it, and the queue still works.
    expect(await through([OTHER_MAC, "02:00:00:00:00:77", NEW_MAC], NEW_MAC)).toEqual(["f1", "f2"]);
    expect(await r.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, Uint8Array.of(1))).toBe(VIRTIO_NET_OK);
    expect(await through([OTHER_MAC], NEW_MAC)).toEqual(["f0"]);
    // ANNOUNCE_ACK (GUEST_ANNOUNCE negotiated).
    expect(await r.command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)).toBe(VIRTIO_NET_OK);
    expect(await r.command(VIRTIO_NET_CTRL_ANNOUNCE, 1)).toBe(VIRTIO_NET_ERR);
  });

  test("hostile transmit chains are dropped (completed), the ring goes on, and nothing outside guest memory is touched", async () => {
    const r = await rig({ features: (f) => f & ~VIRTIO_NET_F_HOST_TSO4 });
    expect(r.acked & VIRTIO_NET_F_CSUM).toBe(VIRTIO_NET_F_CSUM);
    const hdr = (gso: number, flags = 0) => {
      const h = new Uint8Array(HDR);
      h[0] = flags;
      h[1] = gso;
      return h;
    };
    const tooBig = frame("too-big", BROADCAST, MAX_TX_FRAME + 1);
    const ok = (tag: string) => frame(tag, BROADCAST, 100);
    let chains = 0;
    const put = (bufs: { gpa: number; len: number }[]) => {
      r.tx.addChain(bufs, { kick: false });
      chains++;
    };
    const at = (bytes: Uint8Array) => {
      const g = r.ram.alloc(bytes.length);
      r.ram.bytes(g, bytes.length).set(bytes);
      return g;
    };
    // Over 65550 bytes of frame (in two descriptors).
    const bigGpa = at(Buffer.concat([hdr(0), tooBig]));
    put([{ gpa: bigGpa, len: 40000 }, { gpa: bigGpa + 40000, len: HDR + tooBig.length - 40000 }]);
    put([{ gpa: at(Buffer.concat([hdr(7), ok("gso-7")])), len: HDR + 100 }]); // unknown gso_type
    put([{ gpa: at(Buffer.concat([hdr(VIRTIO_NET_HDR_GSO.TCPV4, 1), ok("tso-not-negotiated")])), len: HDR + 100 }]);
    put([{ gpa: at(hdr(0)), len: HDR }]); // header only
    put([{ gpa: at(hdr(0).subarray(0, 5)), len: 5 }]); // shorter than the header
    put([{ gpa: r.ram.size + 0x10000, len: HDR + 100 }]); // outside guest memory
    put([{ gpa: r.ram.size - 50, len: HDR + 100 }]); // runs off the end of guest memory
    put([{ gpa: at(Buffer.concat([hdr(0), ok("good")])), len: HDR + 100 }]);
    signal(r.tx.kick);
    const used = await r.tx.waitUsed(chains);
    expect(used.every((u) => u.len === 0)).toBe(true);
    const seen = await collect(r.ps, 200);
    expect(seen.map((p) => tagOf(p))).toEqual(["good"]);
    // Receive buffers under 12 bytes (and outside memory) are completed empty; the frame goes to the next good one.
    const tiny = r.ram.alloc(5);
    const t1 = r.rx.addChain([{ gpa: tiny, len: 5, write: true }], { kick: false });
    const t2 = r.rx.addChain([{ gpa: r.ram.size + 0x10000, len: 2048, write: true }], { kick: false });
    const [good] = r.post(1, 2048);
    r.inject(frame("after-hostile-rx", GUEST_MAC, 100));
    const rused = await r.received(3);
    expect(rused.find((u) => u.id === t1)!.len).toBe(0);
    expect(rused.find((u) => u.id === t2)!.len).toBe(0);
    const g = rused.find((u) => u.id === good)!;
    expect(g.len).toBe(HDR + 100);
    expect(tagOf(g.bytes, HDR)).toBe("after-hostile-rx");
    // Transmit still works.
    r.send([ok("still-good")]);
    await r.tx.waitUsed(1);
    expect(tagOf(await capture(r.ps, (p) => ethertypeAt(p) === TEST_ETHERTYPE))).toBe("still-good");
  });

  test("receive starvation on a real tap: frames wait in the tap's queue while there are no buffers, then arrive in order", async () => {
    const r = await rig();
    const frames = [0, 1, 2, 3].map((i) => frame(`held-${i}`, GUEST_MAC, 100 + i));
    for (const f of frames) r.inject(f);
    await Bun.sleep(100);
    const heads = r.post(4, 2048);
    const used = await r.received(4);
    expect(used.map((u) => u.id)).toEqual(heads);
    used.forEach((u, i) => expect(eq(u.bytes.subarray(HDR), frames[i]!)).toBe(true));
  });

  test("SEND_RARP puts a RARP frame for the given MAC on the tap; NET_SET_MTU sets the config space MTU", async () => {
    const r = await rig();
    const m = mac("52:54:00:12:34:56");
    const payload = new Uint8Array(8);
    payload.set(m);
    expect(r.vmm.conn.ack(Req.SEND_RARP, payload)).toBe(0n);
    const rarp = await capture(r.ps, (p) => ethertypeAt(p) === 0x8035);
    expect(eq(rarp, rarpFrame(m))).toBe(true);
    expect(Array.from(rarp.subarray(6, 12))).toEqual(Array.from(m));
    expect(r.config().mtu).toBe(1500);
    expect(r.vmm.conn.ack(Req.NET_SET_MTU, u64(9000n))).toBe(0n);
    expect(r.config().mtu).toBe(9000);
    expect(r.vmm.conn.ack(Req.NET_SET_MTU, u64(67n))).not.toBe(0n);
    expect(r.config().mtu).toBe(9000);
  });

  test("snapshot: MAC, filter and offloads set through the control queue come back in a fresh backend; a corrupt state is refused", async () => {
    const a = await rig();
    const NEW_MAC = "02:00:00:00:00:66";
    const UNI = "02:00:00:00:00:77";
    expect(await a.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, mac(NEW_MAC))).toBe(VIRTIO_NET_OK);
    expect(await a.command(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, Uint8Array.of(0))).toBe(VIRTIO_NET_OK);
    expect(await a.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, macTable([UNI], []))).toBe(VIRTIO_NET_OK);
    // Checksum offload only, though TSO4 was negotiated too.
    expect(await a.command(VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64(VIRTIO_NET_F_GUEST_CSUM))).toBe(VIRTIO_NET_OK);
    if (HAVE_ETHTOOL) expect([ethtool(ns, a.tap)["tx-checksumming"], ethtool(ns, a.tap)["tx-tcp-segmentation"]]).toEqual(["on", "off"]);
    a.vmm.stopAll();
    const blob = await a.vmm.saveState();

    const b = await rig({ activate: false });
    b.vmm.handshake(a.acked);
    b.vmm.setMemTable();
    // Corrupt: truncated CBOR, then a well-formed state of another shape (a 5-byte MAC, 2 queue pairs).
    expect(await b.vmm.loadState(blob.subarray(0, blob.length - 7))).not.toBe(0n);
    const env = decodeEnvelope(blob, "net", 1);
    const state = env.state as Record<string, unknown>;
    expect(await b.vmm.loadState(encodeEnvelope({ ...env, state: { ...state, mac: new Uint8Array(5) } }))).not.toBe(0n);
    expect(await b.vmm.loadState(encodeEnvelope({ ...env, state: { ...state, queuePairs: 2 } }))).not.toBe(0n);
    expect(Array.from(b.config().mac)).toEqual(Array.from(mac(GUEST_MAC))); // nothing applied
    expect(await b.vmm.loadState(blob)).toBe(0n);
    const cfg = b.config();
    expect(Array.from(cfg.mac)).toEqual(Array.from(mac(NEW_MAC)));
    expect(cfg.status).toBe(VIRTIO_NET_S.LINK_UP | VIRTIO_NET_S.ANNOUNCE); // asked to announce itself after the move
    if (HAVE_ETHTOOL) {
      const k = ethtool(ns, b.tap);
      expect([k["tx-checksumming"], k["tx-tcp-segmentation"]]).toEqual(["on", "off"]);
    }
    // The rings start again, and the filter is the saved one.
    b.vmm.queues = [0, 1, 2].map((i) => new DriverQueue(b.ram, i, 256));
    b.vmm.queues.forEach((q) => b.vmm.startQueue(q));
    [b.rx, b.tx, b.ctrl] = b.vmm.queues as [DriverQueue, DriverQueue, DriverQueue];
    b.post(8);
    for (const [tag, dst] of [["other", OTHER_MAC], ["uni", UNI], ["old", GUEST_MAC], ["new", NEW_MAC]]) b.inject(frame(tag!, dst, 80));
    const used = await b.received(2);
    expect(used.map((u) => tagOf(u.bytes, HDR))).toEqual(["uni", "new"]);
    await b.quiet(b.rx, 50);
    expect(await b.command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)).toBe(VIRTIO_NET_OK);
    expect(b.config().status).toBe(VIRTIO_NET_S.LINK_UP);
    b.send([frame("after-restore", BROADCAST, 70)]);
    await b.tx.waitUsed(1);
    expect(tagOf(await capture(b.ps, (p) => ethertypeAt(p) === TEST_ETHERTYPE))).toBe("after-restore");
  });

  test("two queue pairs (a subprocess under `ip netns exec` on a multi_queue tap): both transmit queues send, flows spread over both receive queues, MQ_VQ_PAIRS_SET bounds", async () => {
    const tap = ns.addTap("vhutmq", { multiQueue: true });
    const dir = mkdtempSync(join(tmpdir(), "vhu-net-mq-"));
    const sock = join(dir, "net.sock");
    const proc = Bun.spawn(["ip", "netns", "exec", ns.name, process.execPath, MAIN, "device", "net", "--socket", sock, "--tap-name", tap, "--queue-pairs", "2", "--mac", GUEST_MAC, "--net-io", io], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const ram = new GuestRam(1 << 23);
    const ps = ns.enter(() => packetSocket(tap));
    let vmm: Vmm | null = null;
    try {
      await until(() => existsSync(sock) || proc.exitCode !== null, "the backend's socket");
      expect(proc.exitCode).toBeNull();
      vmm = new Vmm({ socketPath: sock }, ram);
      const offered = vmm.conn.requestU64(Req.GET_FEATURES) & ~RING_PACKED;
      expect(offered & VIRTIO_NET_F_MQ).toBe(VIRTIO_NET_F_MQ);
      vmm.activate(5, 256, offered);
      const [rx0, tx0, rx1, tx1, ctrl] = vmm.queues as [DriverQueue, DriverQueue, DriverQueue, DriverQueue, DriverQueue];
      const bufs = new Map<string, number>();
      const post = (q: DriverQueue, n: number) => {
        for (let i = 0; i < n; i++) {
          const gpa = ram.alloc(2048);
          bufs.set(`${q.index}:${q.addChain([{ gpa, len: 2048, write: true }], { kick: false })}`, gpa);
        }
        signal(q.kick);
      };
      // Transmit on both queues.
      for (const [q, tag] of [[tx0, "pair-0"], [tx1, "pair-1"]] as const) {
        const f = frame(tag, BROADCAST, 90);
        const g = ram.alloc(HDR + f.length);
        ram.bytes(g + HDR, f.length).set(f);
        q.addChain([{ gpa: g, len: HDR + f.length }]);
      }
      await tx0.waitUsed(1);
      await tx1.waitUsed(1);
      const seen = new Set<string>();
      while (seen.size < 2) seen.add(tagOf(await capture(ps, (p) => ethertypeAt(p) === TEST_ETHERTYPE)));
      expect([...seen].sort()).toEqual(["pair-0", "pair-1"]);
      // Receive: 32 UDP flows; the tap steers each flow to one queue, by its hash.
      post(rx0, 40);
      post(rx1, 40);
      const flows = Array.from({ length: 32 }, (_, i) => ipFrame("udp", 64, 2000 + i));
      for (const f of flows) expect(write(ps, f, f.length)).toBe(f.length);
      const got: Record<number, Uint8Array[]> = { 0: [], 2: [] };
      await until(() => {
        for (const q of [rx0, rx1]) for (const u of q.takeUsed()) got[q.index]!.push(ram.bytes(bufs.get(`${q.index}:${u.id}`)!, u.len).slice());
        return got[0]!.length + got[2]!.length >= flows.length;
      }, "32 flows to arrive");
      expect(got[0]!.length).toBeGreaterThan(0);
      expect(got[2]!.length).toBeGreaterThan(0);
      const arrived = [...got[0]!, ...got[2]!].map((b) => Buffer.from(b.subarray(HDR)).toString("hex")).sort();
      expect(arrived).toEqual(flows.map((f) => Buffer.from(f).toString("hex")).sort());
      // MQ_VQ_PAIRS_SET on the control queue (index 4): 1..2.
      const cmd = async (n: number) => {
        const g = ram.alloc(4);
        ram.bytes(g, 4).set([VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, n & 0xff, n >> 8]);
        const ack = ram.alloc(1);
        ctrl.addChain([{ gpa: g, len: 4 }, { gpa: ack, len: 1, write: true }]);
        await ctrl.waitUsed(1);
        return ram.bytes(ack, 1)[0];
      };
      expect(await cmd(0)).toBe(VIRTIO_NET_ERR);
      expect(await cmd(3)).toBe(VIRTIO_NET_ERR);
      expect(await cmd(2)).toBe(VIRTIO_NET_OK);
      expect(await cmd(1)).toBe(VIRTIO_NET_OK);
      // One active pair: the device queues nothing on the second receive queue (virtio 1.2
      // §5.1.6.5.5); the tap steers every flow to the first.
      const flows2 = Array.from({ length: 32 }, (_, i) => ipFrame("udp", 64, 3000 + i));
      post(rx0, 40);
      for (const f of flows2) expect(write(ps, f, f.length)).toBe(f.length);
      const after: Record<number, number> = { 0: 0, 2: 0 };
      await until(() => {
        for (const q of [rx0, rx1]) after[q.index]! += q.takeUsed().length;
        return after[0]! + after[2]! >= flows2.length;
      }, "32 more flows to arrive", 2000).catch(() => {});
      expect(after).toEqual({ 0: flows2.length, 2: 0 });
      // Two pairs again: both queues carry flows.
      expect(await cmd(2)).toBe(VIRTIO_NET_OK);
      const flows3 = Array.from({ length: 32 }, (_, i) => ipFrame("udp", 64, 4000 + i));
      post(rx0, 40);
      for (const f of flows3) expect(write(ps, f, f.length)).toBe(f.length);
      const again: Record<number, number> = { 0: 0, 2: 0 };
      await until(() => {
        for (const q of [rx0, rx1]) again[q.index]! += q.takeUsed().length;
        return again[0]! + again[2]! >= flows3.length;
      }, "32 flows over two pairs again");
      expect(again[0]).toBeGreaterThan(0);
      expect(again[2]).toBeGreaterThan(0);
      // NET_SET_MTU reaches the tap (the backend is in its namespace).
      expect(vmm.conn.ack(Req.NET_SET_MTU, u64(9000n))).toBe(0n);
      expect(ns.exec(["ip", "link", "show", tap]).out).toContain("mtu 9000");
    } finally {
      vmm?.dispose();
      close(ps);
      proc.kill();
      await proc.exited;
      ram.dispose();
      rmSync(dir, { recursive: true, force: true });
      sh(["ip", "-n", ns.name, "link", "del", tap], true);
    }
  });
  test("--queue-pairs 4, a driver using 1 then 2 pairs (rings enabled through SET_VRING_ENABLE, as QEMU does): a flood of 64 flows arrives whole on the pairs served", async () => {
    const tap = ns.addTap("vhutmq4", { multiQueue: true });
    const dir = mkdtempSync(join(tmpdir(), "vhu-net-mq4-"));
    const sock = join(dir, "net.sock");
    const proc = Bun.spawn(["ip", "netns", "exec", ns.name, process.execPath, MAIN, "device", "net", "--socket", sock, "--tap-name", tap, "--queue-pairs", "4", "--mac", GUEST_MAC, "--net-io", io], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const ram = new GuestRam(1 << 24);
    const ps = ns.enter(() => packetSocket(tap));
    let vmm: Vmm | null = null;
    try {
      await until(() => existsSync(sock) || proc.exitCode !== null, "the backend's socket");
      expect(proc.exitCode).toBeNull();
      vmm = new Vmm({ socketPath: sock }, ram);
      const offered = vmm.conn.requestU64(Req.GET_FEATURES) & ~RING_PACKED;
      vmm.handshake(offered);
      vmm.setMemTable();
      // The pairs' rings; QEMU serves the control queue itself, so the backend never sees VQ_PAIRS_SET.
      const queues = Array.from({ length: 8 }, (_, i) => new DriverQueue(ram, i, 256));
      vmm.queues = queues;
      const bufs = new Map<string, number>();
      const post = (q: DriverQueue, n: number) => {
        for (let i = 0; i < n; i++) {
          const gpa = ram.alloc(2048);
          bufs.set(`${q.index}:${q.addChain([{ gpa, len: 2048, write: true }], { kick: false })}`, gpa);
        }
        signal(q.kick);
      };
      let port = 2000;
      /** Floods 64 UDP flows into the tap; returns how many arrived on each receive queue of `served`, byte-exact. */
      const flood = async (served: DriverQueue[]): Promise<number[]> => {
        const flows = Array.from({ length: 64 }, () => ipFrame("udp", 64, port++));
        for (const f of flows) expect(write(ps, f, f.length)).toBe(f.length);
        const got = served.map(() => [] as string[]);
        await until(() => {
          served.forEach((q, i) => {
            for (const u of q.takeUsed()) got[i]!.push(Buffer.from(ram.bytes(bufs.get(`${q.index}:${u.id}`)! + HDR, u.len - HDR)).toString("hex"));
          });
          return got.flat().length >= flows.length;
        }, "64 flows", 3000).catch(() => {});
        const all = got.flat().sort();
        expect(all.length).toBe(flows.length); // nothing lost on a tap queue no pair serves
        expect(all).toEqual(flows.map((f) => Buffer.from(f).toString("hex")).sort());
        return got.map((g) => g.length);
      };
      const [rx0, tx0, rx1, tx1] = queues as [DriverQueue, DriverQueue, DriverQueue, DriverQueue];
      // One pair: the virtio default, and a guest with one vCPU.
      vmm.startQueue(rx0);
      vmm.startQueue(tx0);
      post(rx0, 100);
      expect(await flood([rx0])).toEqual([64]);
      // Two pairs (`ethtool -L combined 2`): flows spread over both, none lost.
      vmm.startQueue(rx1);
      vmm.startQueue(tx1);
      post(rx1, 100);
      post(rx0, 64);
      const two = await flood([rx0, rx1]);
      expect(two[0]).toBeGreaterThan(0);
      expect(two[1]).toBeGreaterThan(0);
      // Both pairs transmit.
      for (const [q, tag] of [[tx0, "mq4-0"], [tx1, "mq4-1"]] as const) {
        const f = frame(tag, BROADCAST, 90);
        const g = ram.alloc(HDR + f.length);
        ram.bytes(g + HDR, f.length).set(f);
        q.addChain([{ gpa: g, len: HDR + f.length }]);
        await q.waitUsed(1);
        expect(tagOf(await capture(ps, (p) => ethertypeAt(p) === TEST_ETHERTYPE))).toBe(tag);
      }
      // Back to one pair: QEMU disables the second pair's rings; every flow comes to the first.
      for (const i of [2, 3]) expect(vmm.conn.ack(Req.SET_VRING_ENABLE, vringState(i, 0))).toBe(0n);
      post(rx0, 64);
      expect(await flood([rx0])).toEqual([64]);
    } finally {
      vmm?.dispose();
      close(ps);
      proc.kill();
      await proc.exited;
      ram.dispose();
      rmSync(dir, { recursive: true, force: true });
      sh(["ip", "-n", ns.name, "link", "del", tap], true);
    }
  });
});

/** NetPairRunner on this thread over a loop the test turns, with a pipe or socket pair as the "tap". */
class DirectRunner {
  readonly ram = new GuestRam(1 << 22);
  readonly mem = new GuestMemory();
  readonly loop = new EventLoop();
  readonly shared = new NetShared();
  readonly runner: NetPairRunner;

  /**
   * With io "uring", transmit goes through an io_uring of its own and receive through another (a
   * multishot read); with "uring-readv", receive takes READV batches on the transmit ring (kernels
   * before 6.7). Closed by dispose.
   */
  readonly txRing: RingHandle | null;
  readonly rxRing: RingHandle | null;

  constructor(fd: number, io: "uring" | "uring-readv" | "syscall" = "syscall") {
    this.txRing = io !== "syscall" ? openPairRings(1, "uring").rings[0]! : null;
    this.rxRing = io === "uring" ? setupRxRing() : null;
    // MemoryRegion.map closes the fd it is given: map a second fd of the memfd.
    const fd2 = openSync(`/proc/self/fd/${this.ram.fd}`, "r+");
    this.mem.add(MemoryRegion.map({ gpa: 0, size: this.ram.size, uaddr: this.ram.uaddr, mmapOffset: 0 }, fd2));
    this.shared.rxMode = RX_PROMISC; // what the device sets at reset
    this.shared.mtu = 1500;
    this.runner = new NetPairRunner({ fds: [fd], shared: this.shared.data, rings: [this.txRing], rxRings: [this.rxRing] }, this.loop);
  }

  start(q: DriverQueue, features: bigint): void {
    this.runner.start(
      { index: q.index, size: q.size, descGpa: q.desc, availGpa: q.avail, usedGpa: q.used, eventIdx: false, indirect: true, nextAvail: 0, kickFd: q.kick, callFd: q.call, errFd: -1 },
      this.mem,
      features,
    );
  }

  /** Turns the loop until `cond` holds. */
  turnUntil(cond: () => boolean, what: string, ms = 3000): void {
    const end = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      this.loop.runOnce(10);
    }
  }

  /** Loop turns taken in `ms` of idling (a busy loop would take thousands). */
  idleTurns(ms: number): number {
    const t0 = this.loop.turn;
    const end = Date.now() + ms;
    while (Date.now() < end) this.loop.runOnce(50);
    return this.loop.turn - t0;
  }

  /** Adds one transmit chain per frame (a zeroed header, then the frame); one kick for all. */
  send(tx: DriverQueue, frames: Uint8Array[]): void {
    frames.forEach((f, i) => {
      const g = this.ram.alloc(HDR + f.length);
      this.ram.bytes(g, HDR).fill(0);
      this.ram.bytes(g + HDR, f.length).set(f);
      tx.addChain([{ gpa: g, len: HDR + f.length }], { kick: i === frames.length - 1 });
    });
  }

  dispose(): void {
    this.runner.dispose();
    this.loop.dispose();
    this.mem.clear();
    this.ram.dispose();
    if (this.txRing !== null) closeRingHandle(this.txRing);
    if (this.rxRing !== null) closeRingHandle(this.rxRing);
  }
}

/** Deltas of --metrics series (this process's registry: the runners below count into it) since the call. */
function metricsFrom(...series: [string, Record<string, string | number>][]): () => number[] {
  const at = series.map(([n, l]) => metrics().read(n, l) ?? 0);
  return () => series.map(([n, l], i) => (metrics().read(n, l) ?? 0) - at[i]!);
}

for (const io of [...IO_PATHS, "uring-readv"] as const)
describe(`NetPairRunner, driven directly, ${io}`, () => {
  test("frames in one buffer and frames split over several (header apart, frame in two) go out whole, in order, in one batch", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    const d = new DirectRunner(ours, io);
    const tx = new DriverQueue(d.ram, 1, 64);
    const sent: Uint8Array[] = [];
    try {
      d.start(tx, COMMON_FEATURES);
      for (let i = 0; i < 12; i++) {
        const f = frame(`mixed-${i}`, BROADCAST, 60 + 37 * i);
        const whole = new Uint8Array(HDR + f.length);
        whole.set(f, HDR);
        sent.push(whole);
        const g = d.ram.alloc(whole.length);
        d.ram.bytes(g, whole.length).set(whole);
        // Every third frame in one buffer (a WRITE); the others as header + two pieces (a WRITEV).
        const cut = HDR + 20;
        const bufs = i % 3 === 0 ? [{ gpa: g, len: whole.length }] : [{ gpa: g, len: HDR }, { gpa: g + HDR, len: cut - HDR }, { gpa: g + cut, len: whole.length - cut }];
        tx.addChain(bufs, { kick: i === 11 });
      }
      const got: Uint8Array[] = [];
      const buf = new Uint8Array(4096);
      d.turnUntil(() => {
        for (;;) {
          const n = read(peer, buf, buf.length);
          if (n === -EAGAIN) break;
          got.push(buf.slice(0, n));
        }
        return got.length >= 12;
      }, "twelve frames");
      expect(got.map((g) => Buffer.from(g).toString("hex"))).toEqual(sent.map((w) => Buffer.from(w).toString("hex")));
      expect(tx.usedIdx()).toBe(12);
    } finally {
      d.dispose();
      tx.dispose();
      close(ours);
      close(peer);
    }
  });

  test("EAGAIN in the middle of a batch: the frames the tap took complete, the rest wait for EPOLLOUT and go out in order, each once", () => {
    const [pr, pw] = pipe(O_CLOEXEC | O_NONBLOCK);
    fcntl(pw, F_SETPIPE_SZ, 4096); // one page: four 1012-byte frames fit, the fifth finds it full
    const d = new DirectRunner(pw, io);
    const tx = new DriverQueue(d.ram, 1, 64);
    try {
      d.start(tx, COMMON_FEATURES);
      const frames = Array.from({ length: 10 }, (_, i) => frame(`batch-${i}`, BROADCAST, 1000));
      d.send(tx, frames);
      d.turnUntil(() => d.shared.stat(0, PairStat.TxBlocked) === 1, "the tap to fill up");
      expect(d.idleTurns(200)).toBeLessThan(15); // waiting on EPOLLOUT, not polling
      expect(tx.usedIdx()).toBe(4);
      const out: string[] = [];
      const buf = new Uint8Array(8192);
      const readPipe = () => {
        for (;;) {
          const n = read(pr, buf, buf.length);
          if (n === -EAGAIN) return;
          expect(n % (HDR + 1000)).toBe(0);
          for (let o = 0; o < n; o += HDR + 1000) out.push(tagOf(buf, o + HDR));
        }
      };
      readPipe();
      expect(out).toEqual(["batch-0", "batch-1", "batch-2", "batch-3"]);
      // Room again, a few frames at a time: the rest follow, in order.
      d.turnUntil(() => {
        readPipe();
        return tx.usedIdx() === 10 && out.length === 10;
      }, "the waiting frames");
      readPipe();
      expect(out).toEqual(frames.map((_, i) => `batch-${i}`));
      const used = tx.takeUsed();
      expect(new Set(used.map((u) => u.id)).size).toBe(10); // each chain completed once
      expect(d.shared.stat(0, PairStat.TxFrames)).toBe(10);
      expect(d.shared.stat(0, PairStat.TxDropped)).toBe(0);
    } finally {
      d.dispose();
      tx.dispose();
      close(pr);
      close(pw);
    }
  });

  test("batches across the ring's wrap and beyond one batch, to a datagram 'tap' that fills up every few frames: every frame once, in order", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    // A small send buffer: a few frames in flight fill it (EAGAIN mid-batch, again and again).
    check(libc.setsockopt(ours, SOL_SOCKET, SO_SNDBUF, new Int32Array([4096]), 4), "SO_SNDBUF");
    const d = new DirectRunner(ours, io);
    const tx = new DriverQueue(d.ram, 1, 128);
    try {
      d.start(tx, COMMON_FEATURES);
      const got: string[] = [];
      const buf = new Uint8Array(4096);
      let sent = 0;
      // 100 frames (past the 64-frame batch), then 100 more: the avail ring (128) and the io_uring SQ (64) wrap mid-batch.
      for (const count of [100, 100, 60]) {
        const frames = Array.from({ length: count }, (_, i) => frame(`wrap-${sent + i}`, BROADCAST, 64 + ((sent + i) % 50)));
        d.send(tx, frames);
        sent += count;
        d.turnUntil(() => {
          for (;;) {
            const n = read(peer, buf, buf.length);
            if (n === -EAGAIN) break;
            got.push(tagOf(buf, HDR));
          }
          for (const u of tx.takeUsed()) tx.recycle(u.id);
          return got.length === sent;
        }, `${sent} frames`);
      }
      expect(got).toEqual(Array.from({ length: sent }, (_, i) => `wrap-${i}`));
      expect(d.shared.stat(0, PairStat.TxFrames)).toBe(sent);
      expect(d.shared.stat(0, PairStat.TxBlocked)).toBeGreaterThan(10); // the send buffer kept filling up
    } finally {
      d.dispose();
      tx.dispose();
      close(ours);
      close(peer);
    }
  });

  test("receive runs out of guest buffers in the middle of a batch: what fits arrives, the rest waits in the tap, then arrives in order", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    const d = new DirectRunner(ours, io);
    const rx = new DriverQueue(d.ram, 0, 64);
    const bufs = new Map<number, number>();
    const post = (n: number) => {
      for (let i = 0; i < n; i++) {
        const gpa = d.ram.alloc(2048);
        bufs.set(rx.addChain([{ gpa, len: 2048, write: true }], { kick: i === n - 1 }), gpa);
      }
    };
    try {
      d.start(rx, COMMON_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
      const frames = Array.from({ length: 40 }, (_, i) => frame(`mid-${i}`, GUEST_MAC, 60 + i * 20));
      for (const f of frames) {
        const pkt = new Uint8Array(HDR + f.length);
        pkt.set(f, HDR);
        expect(write(peer, pkt, pkt.length)).toBe(pkt.length);
      }
      post(12);
      d.turnUntil(() => rx.usedIdx() === 12 && d.shared.stat(0, PairStat.RxStalls) >= 1, "12 frames, then a stall");
      const got: Uint8Array[] = [];
      const take = () => {
        for (const u of rx.takeUsed()) got.push(d.ram.bytes(bufs.get(u.id)!, u.len).slice());
      };
      take();
      expect(d.idleTurns(100)).toBeLessThan(10); // starved: not reading the tap meanwhile
      post(30);
      d.turnUntil(() => rx.usedIdx() === 40, "the other 28");
      take();
      expect(got.map((g) => tagOf(g, HDR))).toEqual(frames.map((_, i) => `mid-${i}`));
      got.forEach((g, i) => {
        expect(decodeNetHdr(g).numBuffers).toBe(1);
        expect(eq(g.subarray(HDR), frames[i]!)).toBe(true);
      });
      expect(d.shared.stat(0, PairStat.RxFrames)).toBe(40);
    } finally {
      d.dispose();
      rx.dispose();
      close(ours);
      close(peer);
    }
  });

  test("more frames than the receive path reads ahead (the multishot read's 64 buffers) while the guest has few buffers: all arrive, in order, each once", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    check(libc.setsockopt(peer, SOL_SOCKET, SO_SNDBUF, new Int32Array([1 << 20]), 4), "SO_SNDBUF");
    const d = new DirectRunner(ours, io);
    const rx = new DriverQueue(d.ram, 0, 64);
    const gpaOf = new Map<number, number>();
    const post = (n: number) => {
      for (let i = 0; i < n; i++) {
        const gpa = d.ram.alloc(256);
        gpaOf.set(rx.addChain([{ gpa, len: 256, write: true }], { kick: i === n - 1 }), gpa);
      }
    };
    const got: string[] = [];
    const take = () => {
      for (const u of rx.takeUsed()) {
        const b = d.ram.bytes(gpaOf.get(u.id)!, u.len);
        expect(decodeNetHdr(b).numBuffers).toBe(1);
        got.push(tagOf(b, HDR));
        rx.recycle(u.id);
      }
    };
    try {
      d.start(rx, COMMON_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
      const total = 150;
      for (let i = 0; i < total; i++) {
        const f = frame(`ahead-${i}`, GUEST_MAC, 60 + (i % 7) * 20);
        const pkt = new Uint8Array(HDR + f.length);
        pkt.set(f, HDR);
        expect(write(peer, pkt, pkt.length)).toBe(pkt.length);
      }
      post(10);
      d.turnUntil(() => rx.usedIdx() === 10, "the first 10 frames");
      expect(d.idleTurns(100)).toBeLessThan(10); // starved: waiting for buffers, not spinning
      take();
      // Buffers a few at a time: the frames read ahead come first, then those left in the socket.
      d.turnUntil(() => {
        take();
        if (got.length < total && rx.usedIdx() === got.length) post(Math.min(20, total - got.length));
        return got.length === total;
      }, "every frame", 10000);
      expect(got).toEqual(Array.from({ length: total }, (_, i) => `ahead-${i}`));
      expect(d.shared.stat(0, PairStat.RxFrames)).toBe(total);
      expect(d.shared.stat(0, PairStat.RxDropped)).toBe(0);
    } finally {
      d.dispose();
      rx.dispose();
      close(ours);
      close(peer);
    }
  });

  test("a filtered frame inside a receive batch: the others arrive in order; at stop every chain is completed once or given back", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    const d = new DirectRunner(ours, io);
    const rx = new DriverQueue(d.ram, 0, 64);
    try {
      d.shared.rxMode = 0; // not promiscuous: only our MAC (and broadcast)
      d.shared.mac = mac(GUEST_MAC);
      d.start(rx, COMMON_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
      const heads: number[] = [];
      const gpas = new Map<number, number>();
      for (let i = 0; i < 8; i++) {
        const gpa = d.ram.alloc(2048);
        const h = rx.addChain([{ gpa, len: 2048, write: true }], { kick: false });
        heads.push(h);
        gpas.set(h, gpa);
      }
      const tags = ["a", "x", "b", "y", "c"];
      for (const t of tags) {
        const f = frame(t, t === "x" || t === "y" ? OTHER_MAC : GUEST_MAC, 90);
        const pkt = new Uint8Array(HDR + f.length);
        pkt.set(f, HDR);
        write(peer, pkt, pkt.length);
      }
      signal(rx.kick);
      d.turnUntil(() => rx.usedIdx() === 3, "three frames");
      const used = rx.takeUsed();
      expect(used.map((u) => tagOf(d.ram.bytes(gpas.get(u.id)!, u.len), HDR))).toEqual(["a", "b", "c"]);
      expect(d.shared.stat(0, PairStat.RxFiltered)).toBe(2);
      const pos = d.runner.stop(0)!;
      const after = rx.takeUsed();
      expect(pos.nextUsed).toBe(3 + after.length);
      after.forEach((u) => expect(u.len).toBe(0)); // completed empty (the driver drops them)
      // Every posted chain exactly once: completed, or at/after nextAvail for the next start.
      const completed = [...used, ...after].map((u) => u.id);
      const givenBack = heads.slice(pos.nextAvail);
      expect(new Set(completed).size).toBe(completed.length);
      expect([...completed, ...givenBack].sort((x, y) => x - y)).toEqual([...heads].sort((x, y) => x - y));
    } finally {
      d.dispose();
      rx.dispose();
      close(ours);
      close(peer);
    }
  });

  test("EAGAIN back-pressure: a full 'tap' keeps the chain pending without spinning; EPOLLOUT sends and completes it", () => {
    const [pr, pw] = pipe(O_CLOEXEC | O_NONBLOCK);
    fcntl(pw, F_SETPIPE_SZ, 4096);
    const filler = new Uint8Array(4096);
    while (write(pw, filler, filler.length) !== -EAGAIN);
    while (write(pw, filler, 1) !== -EAGAIN);
    const d = new DirectRunner(pw, io);
    const tx = new DriverQueue(d.ram, 1, 64);
    const m = metricsFrom(["vhost_net_tap_eagain", { pair: 0 }], ["vhost_net_frames", { pair: 0, direction: "tx" }], ["vhost_net_bytes", { pair: 0, direction: "tx" }]);
    try {
      d.start(tx, COMMON_FEATURES);
      const f = frame("blocked", BROADCAST, 200);
      const g = d.ram.alloc(HDR + f.length);
      d.ram.bytes(g + HDR, f.length).set(f);
      tx.addChain([{ gpa: g, len: HDR + f.length }]);
      d.turnUntil(() => d.shared.stat(0, PairStat.TxBlocked) === 1, "the write to block");
      expect(d.idleTurns(300)).toBeLessThan(20); // waiting on EPOLLOUT, not polling
      expect(tx.usedIdx()).toBe(0);
      expect(d.shared.stat(0, PairStat.TxBlocked)).toBe(1); // not retried meanwhile
      expect(d.shared.stat(0, PairStat.TxFrames)).toBe(0);
      // Drain the pipe: the frame goes out and the chain completes.
      const buf = new Uint8Array(8192);
      while (read(pr, buf, buf.length) > 0);
      d.turnUntil(() => tx.usedIdx() === 1, "the chain to complete");
      expect(d.shared.stat(0, PairStat.TxFrames)).toBe(1);
      expect(tx.calls()).toBe(1);
      const n = read(pr, buf, buf.length);
      expect(n).toBe(HDR + f.length);
      expect(eq(buf.subarray(HDR, n), f)).toBe(true);
      // Writable interest is dropped again: an always-writable pipe does not spin the loop.
      expect(d.idleTurns(200)).toBeLessThan(15);
      // More chains go straight through.
      tx.addChain([{ gpa: g, len: HDR + f.length }], { kick: false });
      tx.addChain([{ gpa: g, len: HDR + f.length }]);
      d.turnUntil(() => tx.usedIdx() === 3, "two more chains");
      expect(read(pr, buf, buf.length)).toBe(2 * (HDR + f.length)); // a pipe is a byte stream
      // --metrics counted the same: the EAGAINs, three frames of HDR + 200 bytes.
      expect(m()).toEqual([d.shared.stat(0, PairStat.TxBlocked), 3, 3 * (HDR + f.length)]);
    } finally {
      d.dispose();
      tx.dispose();
      close(pr);
      close(pw);
    }
  });

  test("receive starvation: no buffers → one stall, nothing read; buffers + kick → the held frames arrive in order", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    const d = new DirectRunner(ours, io);
    const rx = new DriverQueue(d.ram, 0, 64);
    const m = metricsFrom(["vhost_net_rx_stalls", { pair: 0 }], ["vhost_net_frames", { pair: 0, direction: "rx" }], ["vhost_net_bytes", { pair: 0, direction: "rx" }]);
    try {
      d.start(rx, COMMON_FEATURES | VIRTIO_NET_F_MRG_RXBUF);
      d.turnUntil(() => d.shared.stat(0, PairStat.RxStalls) === 1, "the first stall");
      const frames = [0, 1, 2].map((i) => frame(`starved-${i}`, GUEST_MAC, 100 + 10 * i));
      for (const f of frames) {
        const pkt = new Uint8Array(HDR + f.length);
        pkt.set(f, HDR);
        expect(write(peer, pkt, pkt.length)).toBe(pkt.length);
      }
      expect(d.idleTurns(200)).toBeLessThan(15); // the readable socket is not watched while starved
      expect(d.shared.stat(0, PairStat.RxStalls)).toBe(1);
      expect(d.shared.stat(0, PairStat.RxFrames)).toBe(0);
      const bufs: number[] = [];
      for (let i = 0; i < 3; i++) {
        const gpa = d.ram.alloc(2048);
        bufs.push(gpa);
        rx.addChain([{ gpa, len: 2048, write: true }], { kick: i === 2 });
      }
      d.turnUntil(() => rx.usedIdx() === 3, "the held frames");
      const used = rx.takeUsed();
      used.forEach((u, i) => {
        expect(u.len).toBe(HDR + frames[i]!.length);
        const b = d.ram.bytes(bufs[u.id]!, u.len);
        expect(decodeNetHdr(b).numBuffers).toBe(1);
        expect(eq(b.subarray(HDR), frames[i]!)).toBe(true);
      });
      expect(d.shared.stat(0, PairStat.RxFrames)).toBe(3);
      // Out of buffers again: the next frame stalls the queue once more and waits.
      const f = frame("later", GUEST_MAC, 80);
      const pkt = new Uint8Array(HDR + f.length);
      pkt.set(f, HDR);
      write(peer, pkt, pkt.length);
      d.turnUntil(() => d.shared.stat(0, PairStat.RxStalls) === 2, "the second stall");
      const gpa = d.ram.alloc(2048);
      const head = rx.addChain([{ gpa, len: 2048, write: true }]);
      d.turnUntil(() => rx.usedIdx() === 4, "the frame after the second stall");
      expect(rx.takeUsed()).toEqual([{ id: head, len: HDR + f.length }]);
      expect(eq(d.ram.bytes(gpa + HDR, f.length), f)).toBe(true);
      // --metrics counted the same: the stalls, four frames and their bytes (header included).
      expect(m()).toEqual([d.shared.stat(0, PairStat.RxStalls), 4, frames.reduce((a, x) => a + HDR + x.length, 0) + HDR + f.length]);
    } finally {
      d.dispose();
      rx.dispose();
      close(ours);
      close(peer);
    }
  });
});

describe("transmit io_uring fallback", () => {
  test("--net-io auto falls back to writev where io_uring is refused; --net-io uring says so and fails; syscall sets none up", () => {
    const saved = process.env.BACKEND_NO_IO_URING;
    try {
      const ok = openPairRings(2, "auto");
      expect(ok.refused).toBeNull();
      expect(ok.rings.every((r) => r !== null)).toBe(true);
      ok.rings.forEach((r) => closeRingHandle(r!));
      expect(openPairRings(2, "syscall")).toEqual({ rings: [null, null], refused: null });
      process.env.BACKEND_NO_IO_URING = "1";
      const refused = openPairRings(2, "auto");
      expect(refused.rings).toEqual([null, null]);
      expect(refused.refused).toMatch(/ENOSYS/);
      expect(() => openPairRings(2, "uring")).toThrow(/--net-io uring: io_uring is not available here .*use --net-io syscall or auto/);
    } finally {
      if (saved === undefined) delete process.env.BACKEND_NO_IO_URING;
      else process.env.BACKEND_NO_IO_URING = saved;
    }
  });

  test("a ring that fails mid-session: the batch it held and every later frame go out with writev, in order", () => {
    const sv = new Int32Array(2);
    check(libc.socketpair(AF.UNIX, SOCK.DGRAM | SOCK.NONBLOCK | SOCK.CLOEXEC, 0, sv), "socketpair");
    const [ours, peer] = [sv[0]!, sv[1]!];
    const d = new DirectRunner(ours, "uring");
    const tx = new DriverQueue(d.ram, 1, 64);
    const buf = new Uint8Array(4096);
    const got: string[] = [];
    const take = () => {
      for (;;) {
        const n = read(peer, buf, buf.length);
        if (n === -EAGAIN) return;
        got.push(tagOf(buf, HDR));
      }
    };
    try {
      d.start(tx, COMMON_FEATURES);
      d.send(tx, [frame("ring-0"), frame("ring-1")]);
      d.turnUntil(() => (take(), got.length === 2), "frames through the ring");
      // The ring's fd goes away under it: io_uring_enter fails (EBADF).
      close(d.txRing!.fd);
      d.send(tx, [0, 1, 2, 3, 4, 5].map((i) => frame(`after-${i}`)));
      d.turnUntil(() => (take(), got.length === 8), "frames after the ring failed");
      expect(got).toEqual(["ring-0", "ring-1", ...[0, 1, 2, 3, 4, 5].map((i) => `after-${i}`)]);
      expect(tx.usedIdx()).toBe(8);
      d.send(tx, [frame("later")]);
      d.turnUntil(() => (take(), got.length === 9), "one more");
    } finally {
      (d as { txRing: RingHandle | null }).txRing = null; // its fd is closed already
      d.dispose();
      tx.dispose();
      close(ours);
      close(peer);
    }
  });
});
