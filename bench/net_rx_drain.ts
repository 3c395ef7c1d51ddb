#!/usr/bin/env bun
/**
 * Receive paths of the net pair runner compared on CPU per frame, in one process, robust to a
 * loaded host: the tap's queue is filled with N frames first (an AF_PACKET socket in a throwaway
 * namespace, txqueuelen raised), then NetPairRunner (driven directly, as the unit tests do) drains
 * them into guest receive buffers; CPU time of this process over the drain / N. The driver side
 * (posting buffers, taking used entries) is in that time too, the same for every path.
 *
 *   bun bench/net_rx_drain.ts [--frames 4000] [--rounds 5] [--sizes 64,1500,65000] [--paths multishot,readv,syscall]
 *
 * Paths: multishot (one READ_MULTISHOT with provided buffers, frames copied into guest buffers),
 * readv (READV SQEs straight into held guest buffers, up to 32 per io_uring_enter), syscall (one
 * readv per frame). Each size with and without MRG_RXBUF; 65000 is one 64 KiB TSO frame (the tap
 * hands it over whole: guest TSO offloads on, 4 KiB receive buffers with MRG_RXBUF, 68 KiB without).
 */
import { openSync } from "node:fs";
import { parseArgs } from "node:util";
import { close } from "../ffi/libc.ts";
import { write } from "../ffi/io.ts";
import { signal } from "../ffi/eventfd.ts";
import * as tun from "../ffi/tap.ts";
import { IoUring, closeRingHandle, type RingHandle } from "../ffi/io_uring.ts";
import { NetNamespace, netnsAvailable } from "../test/support/netns.ts";
import { GuestRam, DriverQueue } from "../test/support/frontend.ts";
import { EventLoop } from "../src/event_loop.ts";
import { GuestMemory, MemoryRegion } from "../src/memory.ts";
import { COMMON_FEATURES } from "../src/device.ts";
import { NetPairRunner } from "../devices/net/pair_runner.ts";
import { NetShared, PairStat, RX_PROMISC } from "../devices/net/shared.ts";
import { TX_BATCH } from "../devices/net/uring_tx.ts";
import { setupRxRing } from "../devices/net/rx_multishot.ts";
import {
  VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_HDR_F, VIRTIO_NET_HDR_GSO,
} from "../devices/net/virtio_net.ts";
import { fmt, median, spreadPct, table } from "./lib/stats.ts";
import { packetSocket } from "../test/support/packet_socket.ts";

type Path = "multishot" | "readv" | "syscall";
const MAC = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const HDR = 12;

const { values: a } = parseArgs({
  args: process.argv.slice(2),
  options: {
    frames: { type: "string", default: "4000" },
    rounds: { type: "string", default: "5" },
    sizes: { type: "string", default: "64,1500,65000" },
    paths: { type: "string", default: "multishot,readv,syscall" },
  },
});
const FRAMES = Number(a.frames);
const ROUNDS = Number(a.rounds);
const sizes = a.sizes!.split(",").map(Number);
const paths = a.paths!.split(",") as Path[];
if (!netnsAvailable()) throw new Error("needs root, /dev/net/tun and iproute2");


/** An Ethernet/IPv4/UDP (or TCP for TSO) frame of `len` bytes to our MAC. */
function frame(len: number, tcp: boolean): Uint8Array {
  const f = new Uint8Array(len);
  f.set(MAC, 0);
  f.set([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc], 6);
  f[12] = 0x08;
  const v = new DataView(f.buffer);
  f[14] = 0x45;
  v.setUint16(16, len - 14);
  f[22] = 64;
  f[23] = tcp ? 6 : 17;
  f.set([10, 77, 0, 1], 26);
  f.set([10, 77, 0, 2], 30);
  if (tcp) {
    f[46] = 0x50;
    f[47] = 0x18;
  } else v.setUint16(38, len - 34);
  return f;
}

const ns = NetNamespace.create();
const TAP = "nbd0";
try {
  ns.addTap(TAP, { vnetHdr: true });
  ns.exec(["ip", "link", "set", TAP, "txqueuelen", "100000"]);
  const tapFd = ns.enter(() => {
    const fd = tun.openTunDevice(true);
    tun.tunSetIff(fd, TAP, tun.IFF.TAP | tun.IFF.NO_PI | tun.IFF.VNET_HDR);
    tun.tunSetVnetHdrSize(fd, HDR);
    return fd;
  });
  const ps = ns.enter(() => packetSocket(TAP));
  const gso = ns.enter(() => packetSocket(TAP, true));
  const rows: string[][] = [];
  const results: Record<string, number[]> = {};
  for (const size of sizes) {
    for (const mrg of [true, false]) {
      const tso = size > 1514;
      const frames = tso ? Math.max(200, Math.floor(FRAMES / 20)) : FRAMES;
      for (let round = 0; round < ROUNDS; round++) {
        const order = round % 2 === 0 ? paths : [...paths].reverse();
        for (const path of order) {
          const key = `${size}|${mrg}|${path}`;
          const ns_ = drain(tapFd, tso ? gso : ps, size, tso, mrg, path, frames);
          (results[key] ??= []).push(ns_);
        }
      }
      for (const path of paths) {
        const r = results[`${size}|${mrg}|${path}`]!;
        rows.push([`${size}B${tso ? " TSO" : ""}`, mrg ? "on" : "off", path, fmt(median(r), 0), `${fmt(spreadPct(r), 0)}%`, r.map((x) => fmt(x, 0)).join(" ")]);
      }
    }
  }
  console.log(`\nrx drain: ${FRAMES} frames queued in the tap (TSO: ${Math.max(200, Math.floor(FRAMES / 20))}), then drained; CPU of this process per frame, ${ROUNDS} rounds`);
  console.log(table(["frame", "MRG_RXBUF", "path", "ns CPU/frame (median)", "spread", "rounds"], rows));
  close(ps);
  close(gso);
  close(tapFd);
} finally {
  ns.destroy();
}

function drain(tapFd: number, inject: number, size: number, tso: boolean, mrg: boolean, path: Path, n: number): number {
  const ram = new GuestRam(1 << 26);
  const mem = new GuestMemory();
  const loop = new EventLoop();
  const shared = new NetShared();
  const txRing: RingHandle | null = path === "syscall" ? null : IoUring.setupHandle(TX_BATCH);
  const rxRing: RingHandle | null = path === "multishot" ? setupRxRing() : null;
  const fd2 = openSync(`/proc/self/fd/${ram.fd}`, "r+");
  mem.add(MemoryRegion.map({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, fd2));
  shared.rxMode = RX_PROMISC;
  shared.mtu = 1500;
  shared.bigFrames = tso;
  const runner = new NetPairRunner({ fds: [tapFd], shared: shared.data, rings: [txRing], rxRings: [rxRing] }, loop);
  const rx = new DriverQueue(ram, 0, 256);
  const bufLen = mrg ? (tso ? 4096 : 2048) : 68 * 1024;
  const slots = tso && !mrg ? 64 : 256;
  const gpas: number[] = [];
  for (let i = 0; i < slots; i++) gpas.push(ram.alloc(bufLen));
  let free = [...gpas.keys()];
  const byHead = new Map<number, number>();
  const post = () => {
    let k = 0;
    while (free.length > 0 && k < 255) {
      const slot = free.pop()!;
      byHead.set(rx.addChain([{ gpa: gpas[slot]!, len: bufLen, write: true }], { kick: false }), slot);
      k++;
    }
    if (k > 0) signal(rx.kick);
  };
  try {
    // Fill the tap's queue (the runner is not reading yet).
    const f = frame(size, tso);
    const pkt = tso ? new Uint8Array(10 + size) : f;
    if (tso) {
      const v = new DataView(pkt.buffer);
      pkt[0] = VIRTIO_NET_HDR_F.NEEDS_CSUM;
      pkt[1] = VIRTIO_NET_HDR_GSO.TCPV4;
      v.setUint16(2, 54, true);
      v.setUint16(4, 1448, true);
      v.setUint16(6, 34, true);
      v.setUint16(8, 16, true);
      pkt.set(f, 10);
    }
    const features = COMMON_FEATURES | (mrg ? VIRTIO_NET_F_MRG_RXBUF : 0n) | (tso ? VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 : 0n);
    if (tso) tun.tunSetOffload(tapFd, tun.TUN_F.CSUM | tun.TUN_F.TSO4);
    else tun.tunSetOffload(tapFd, 0);
    post();
    runner.start(
      { index: 0, size: rx.size, descGpa: rx.desc, availGpa: rx.avail, usedGpa: rx.used, eventIdx: false, indirect: true, nextAvail: 0, kickFd: rx.kick, callFd: rx.call, errFd: -1 },
      mem,
      features,
    );
    let done = 0;
    const phase = (count: number): number => {
      // The loop does not turn while the tap fills (a multishot read may take up to its buffer
      // count meanwhile, in this thread: charged to the injection, not the drain).
      for (let i = 0; i < count; i++) if (write(inject, pkt, pkt.length) !== pkt.length) throw new Error(`inject: frame ${i} refused`);
      done += count;
      const c0 = process.cpuUsage();
      const end = Date.now() + 30_000;
      while (shared.stat(0, PairStat.RxFrames) + shared.stat(0, PairStat.RxDropped) < done) {
        if (Date.now() > end) throw new Error(`${path}: ${shared.stat(0, PairStat.RxFrames)} of ${done} frames in 30 s`);
        loop.runOnce(10);
        for (const u of rx.takeUsed()) {
          free.push(byHead.get(u.id)!);
          rx.recycle(u.id);
        }
        if (free.length >= 32) post();
      }
      const c1 = process.cpuUsage(c0);
      return c1.user + c1.system;
    };
    phase(Math.min(n, 1000)); // warm-up: JIT, first touches of buffers
    const us = phase(n);
    if (shared.stat(0, PairStat.RxDropped) > 0) throw new Error(`${path}: ${shared.stat(0, PairStat.RxDropped)} frames dropped`);
    return (us * 1000) / n;
  } finally {
    runner.stop(0);
    runner.dispose();
    loop.dispose();
    mem.clear();
    ram.dispose();
    rx.dispose();
    if (txRing !== null) closeRingHandle(txRing);
    if (rxRing !== null) closeRingHandle(rxRing);
    free = [];
  }
}
