// Inflight tracking (INFLIGHT_SHMFD): a backend that dies with requests in flight leaves a region
// the next backend process replays from — the heads still in flight, in their original order, and
// none that reached the used ring, wherever between two stores the crash hit.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { GuestRam, DriverQueue, BackendUnderTest, Vmm, Req } from "../support/frontend.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { SplitVirtqueue } from "../../src/split_virtqueue.ts";
import { type VirtqueueConfig } from "../../src/ring.ts";
import { InflightRegion, queueRegionSize } from "../../src/inflight.ts";
import { inflightBytes } from "../../src/protocol/codec.ts";
import { fstat } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { setLogLevel } from "../../src/log.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

const SIZE = 16;
let ram: GuestRam;
let mem: GuestMemory;
let dq: DriverQueue;
let region: InflightRegion;
let regionFd: number;

function ring(nextAvail = 0): VirtqueueConfig {
  return {
    index: 0, size: SIZE, descGpa: dq.desc, availGpa: dq.avail, usedGpa: dq.used, eventIdx: false, indirect: true,
    nextAvail, kickFd: dq.kick, callFd: dq.call, errFd: -1, inflight: region.queue(0),
  };
}

/** Makes `n` one-buffer requests available; returns their heads in order. */
function requests(n: number): number[] {
  return Array.from({ length: n }, () => dq.addChain([{ gpa: ram.alloc(64), len: 64, write: true }], { kick: false }));
}

beforeEach(() => {
  ram = new GuestRam(1 << 20);
  mem = new GuestMemory();
  mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
  dq = new DriverQueue(ram, 0, SIZE);
  ({ region, fd: regionFd } = InflightRegion.allocate(1, SIZE));
});

afterEach(() => {
  region.unmap();
  close(regionFd);
  dq.dispose();
  ram.dispose();
});

describe("inflight region", () => {
  test("a fresh region replays nothing and keeps the front-end's base", () => {
    requests(2);
    const q = new SplitVirtqueue(mem, ring(0));
    expect(q.nextAvail).toBe(0);
    expect(q.pop()).not.toBeNull();
  });

  test("requests completed out of order: the new process replays the others, in pop order, then continues the ring", () => {
    const heads = requests(5);
    const a = new SplitVirtqueue(mem, ring(0));
    const popped = [a.pop()!, a.pop()!, a.pop()!, a.pop()!];
    a.add(popped[2]!.head, 64); // completes the third first (io_uring on a real disk does)
    a.add(popped[0]!.head, 64);
    a.flush();
    // kill -9 here: the front-end restarts the ring from its used index (2).
    expect(dq.usedIdx()).toBe(2);
    const b = new SplitVirtqueue(mem, ring(2));
    expect(b.pop()!.head).toBe(heads[1]!);
    expect(b.pop()!.head).toBe(heads[3]!);
    expect(b.pop()!.head).toBe(heads[4]!); // never popped before: taken from the ring after the replay
    expect(b.pop()).toBeNull();
    expect(b.nextAvail).toBe(5);
  });

  test("a crash after the used index was stored but before the batch was cleared: the batch is not replayed", () => {
    const heads = requests(3);
    const a = new SplitVirtqueue(mem, ring(0));
    const c0 = a.pop()!;
    const c1 = a.pop()!;
    a.pop();
    a.add(c1.head, 64);
    a.add(c0.head, 64);
    // The process dies between the used-index store and clearing the batch's flags.
    (a as unknown as { inflightRegion: { published: () => void } }).inflightRegion.published = () => {};
    a.flush();
    const b = new SplitVirtqueue(mem, ring(2));
    expect(b.pop()!.head).toBe(heads[2]!);
    expect(b.pop()).toBeNull();
  });

  test("a crash before the used index was stored: the completions are replayed (the driver never saw them)", () => {
    const heads = requests(2);
    const a = new SplitVirtqueue(mem, ring(0));
    const c0 = a.pop()!;
    a.pop();
    a.add(c0.head, 64); // written to the used ring, not published: the process dies here
    const b = new SplitVirtqueue(mem, ring(0));
    expect(b.pop()!.head).toBe(heads[0]!);
    expect(b.pop()!.head).toBe(heads[1]!);
    expect(b.pop()).toBeNull();
  });

  test("a rewound chain is not in flight; a replayed one rewinds back into the replay", () => {
    const heads = requests(3);
    const a = new SplitVirtqueue(mem, ring(0));
    a.pop();
    a.pop();
    a.rewind(1);
    const b = new SplitVirtqueue(mem, ring(0));
    expect(b.pop()!.head).toBe(heads[0]!); // replayed
    b.rewind(1);
    expect(b.pop()!.head).toBe(heads[0]!); // replayed again after the rewind
    expect(b.pop()!.head).toBe(heads[1]!); // from the ring
    expect(b.pop()!.head).toBe(heads[2]!);
  });

  test("a region sized for smaller rings is refused, and one of another ring size starts fresh", () => {
    const small = InflightRegion.allocate(1, 8);
    try {
      expect(() => new SplitVirtqueue(mem, { ...ring(0), inflight: small.region.queue(0) })).toThrow(/inflight region/);
    } finally {
      small.region.unmap();
      close(small.fd);
    }
  });
});

describe("GET_INFLIGHT_FD / SET_INFLIGHT_FD", () => {
  const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;

  test("the backend allocates the region and gives its fd; a later backend adopts it; bad sizes are refused", async () => {
    const backend = new BackendUnderTest("echo", {}, ECHO);
    await backend.ready;
    const vmm = new Vmm(backend, ram);
    try {
      vmm.handshake();
      const r = vmm.conn.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 2, 128));
      expect(r.fds.length).toBe(1);
      const v = new DataView(r.payload.buffer, r.payload.byteOffset);
      const size = Number(v.getBigUint64(0, true));
      expect(size).toBe(2 * queueRegionSize(128));
      expect(fstat(r.fds[0]!).size).toBe(size);
      expect(vmm.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(size, 0, 2, 128), [r.fds[0]!])).toBe(0n);
      // Too small for what it claims, or more queues than the device has: refused, session goes on.
      expect(vmm.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(64, 0, 2, 128), [regionFd])).not.toBe(0n);
      expect(vmm.conn.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 9, 128)).fds.length).toBe(0);
      expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
    } finally {
      vmm.dispose();
      await backend.stop();
    }
  });
});
