// A forged or stale inflight region must not be replayed (issue 16, item 3). A new backend given a
// region (SET_INFLIGHT_FD) replays the heads it marks in flight: a region that does not fit the
// ring — heads in flight while the driver has nothing outstanding, more of them than it has
// outstanding, heads the available ring never held where the last backend popped — would execute
// stale chains (a write hitting the disk), publish completions the guest never asked for and skip
// its real requests. Such a region is refused as a whole: nothing replayed, the ring continues
// from its own indices, the region starts over.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { toArrayBuffer } from "bun:ffi";
import { mkdtempSync, rmSync, writeFileSync, truncateSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GuestRam, DriverQueue, Req } from "../support/frontend.ts";
import { PackedDriverQueue } from "../support/packed_driver.ts";
import {
  SpawnedBackend, GuestMemfd, GuestSpace, Ring, Bump, HostileFront, blkRequest,
  BLK_T_IN, BLK_T_OUT, BLK_S_OK, MiB, MFD_ALLOW_SEALING, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
} from "../support/hostile.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { SplitVirtqueue } from "../../src/split_virtqueue.ts";
import { PackedVirtqueue } from "../../src/packed_virtqueue.ts";
import { type VirtqueueConfig } from "../../src/ring.ts";
import { InflightRegion, queueRegionSize, type InflightShare } from "../../src/inflight.ts";
import { inflightBytes } from "../../src/protocol/codec.ts";
import { memfdCreate, mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MFD_CLOEXEC } from "../../ffi/mem.ts";
import { ftruncate } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { setLogLevel } from "../../src/log.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

const SIZE = 16;

/** What a region says about one queue, written as libvhost-user's layout (see src/inflight.ts). */
function forge(bytes: Uint8Array, ringSize: number, usedIdx: number, inflight: { head: number; counter: number }[]): void {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  bytes.fill(0);
  v.setUint16(8, 1, true); // version
  v.setUint16(10, ringSize, true); // desc_num
  v.setUint16(14, usedIdx, true);
  for (const { head, counter } of inflight) {
    v.setUint8(16 + 16 * head, 1);
    v.setUint32(16 + 16 * head + 8, counter, true);
  }
}

function inflightHeads(bytes: Uint8Array, ringSize: number): number[] {
  return Array.from({ length: ringSize }, (_, h) => h).filter((h) => bytes[16 + 16 * h] === 1);
}

// ---- the split ring, in process ----

describe("split ring: a region that does not fit the ring is not replayed", () => {
  let ram: GuestRam;
  let mem: GuestMemory;
  let dq: DriverQueue;
  let region: InflightRegion;
  let regionFd: number;
  let regionBytes: Uint8Array;

  beforeEach(() => {
    ram = new GuestRam(1 << 20);
    mem = new GuestMemory();
    mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
    dq = new DriverQueue(ram, 0, SIZE);
    ({ region, fd: regionFd } = InflightRegion.allocate(1, SIZE));
    regionBytes = new Uint8Array(toArrayBuffer(region.host as never, 0, region.size));
  });
  afterEach(() => {
    region.unmap();
    close(regionFd);
    dq.dispose();
    ram.dispose();
  });

  function ring(nextAvail: number, inflight: InflightShare | null = region.queue(0)): VirtqueueConfig {
    return {
      index: 0, size: SIZE, descGpa: dq.desc, availGpa: dq.avail, usedGpa: dq.used, eventIdx: false, indirect: true,
      nextAvail, kickFd: dq.kick, callFd: dq.call, errFd: -1, inflight,
    };
  }

  function request(): number {
    return dq.addChain([{ gpa: ram.alloc(64), len: 64, write: true }], { kick: false });
  }

  /** `n` requests made available and completed by a backend without a region; returns their heads. */
  function history(n: number): number[] {
    const heads = Array.from({ length: n }, () => request());
    const q = new SplitVirtqueue(mem, ring(0, null));
    for (let i = 0; i < n; i++) q.add(q.pop()!.head, 64);
    q.flush();
    for (const u of dq.takeUsed()) dq.recycle(u.id);
    return heads;
  }

  /** Pops everything, completes it, publishes; returns the heads in pop order. */
  function drain(q: SplitVirtqueue): number[] {
    const popped: number[] = [];
    for (let c = q.pop(); c !== null; c = q.pop()) popped.push(c.head);
    for (const h of popped) q.add(h, 64);
    q.flush();
    return popped;
  }

  test("the audit's region: the driver has nothing outstanding (used == avail), a head marked in flight: nothing replayed, nothing completed, the next real request served", () => {
    const old = history(3); // used == avail == 3; the chain at head old[1] is stale
    forge(regionBytes, SIZE, 3, [{ head: old[1]!, counter: 7 }]);
    const q = new SplitVirtqueue(mem, ring(3));
    expect(q.pop()).toBeNull();
    q.flush();
    expect(dq.usedIdx()).toBe(3); // no completion the guest did not ask for
    const real = request();
    expect(drain(q)).toEqual([real]);
    expect(dq.takeUsed().map((u) => u.id)).toEqual([real]);
    // The region started over: a backend after this one replays nothing either.
    expect(inflightHeads(regionBytes, SIZE)).toEqual([]);
  });

  test("a head that was not in the available ring where the last backend popped: refused, the real request is served", () => {
    const old = history(3);
    const real = request(); // avail 4, used 3: one request outstanding
    const stranger = [0, 1, 2, 3, 4, 5].find((h) => !old.includes(h) && h !== real)!;
    forge(regionBytes, SIZE, 3, [{ head: stranger, counter: 9 }]);
    const q = new SplitVirtqueue(mem, ring(3));
    expect(drain(q)).toEqual([real]);
    expect(dq.takeUsed().map((u) => u.id)).toEqual([real]);
  });

  test("more heads in flight than the driver has outstanding (avail - used): refused, each real request served once", () => {
    history(3);
    const real = request(); // one outstanding
    const other = request(); // ...then two: the region claims three
    forge(regionBytes, SIZE, 3, [{ head: real, counter: 1 }, { head: other, counter: 2 }, { head: 9, counter: 3 }]);
    const q = new SplitVirtqueue(mem, ring(3));
    expect(drain(q)).toEqual([real, other]);
    expect(dq.takeUsed().map((u) => u.id)).toEqual([real, other]);
  });

  test("a head the driver made available twice: replayed once, completed once, the second entry is skipped", () => {
    history(3);
    const real = request();
    dq.publish(real, false); // the same head again (a driver bug): avail 5, used 3
    forge(regionBytes, SIZE, 3, [{ head: real, counter: 4 }]);
    const q = new SplitVirtqueue(mem, ring(3));
    expect(drain(q)).toEqual([real]);
    expect(dq.takeUsed().map((u) => u.id)).toEqual([real]);
  });

  test("a region that fits is still replayed: completed out of order, the others in pop order, then the ring", () => {
    const heads = Array.from({ length: 5 }, () => request());
    const a = new SplitVirtqueue(mem, ring(0));
    const popped = [a.pop()!, a.pop()!, a.pop()!, a.pop()!];
    a.add(popped[2]!.head, 64);
    a.add(popped[0]!.head, 64);
    a.flush(); // used 2; heads[1] (slot 1, before the used index) and heads[3] in flight
    const b = new SplitVirtqueue(mem, ring(2));
    expect(drain(b)).toEqual([heads[1]!, heads[3]!, heads[4]!]);
  });
});

// ---- the packed ring ----

describe("packed ring: a region naming chains the driver does not have outstanding is not replayed", () => {
  test("the audit's region on a packed ring: a used buffer id marked in flight while the driver has nothing outstanding: refused, nothing popped or completed", () => {
    const ram = new GuestRam(1 << 20);
    const mem = new GuestMemory();
    mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
    const pd = new PackedDriverQueue(ram, 0, SIZE);
    const { region, fd } = InflightRegion.allocate(1, SIZE, "packed");
    try {
      const bytes = new Uint8Array(toArrayBuffer(region.host as never, 0, region.size));
      const config = (nextAvail: number): VirtqueueConfig => ({
        index: 0, size: SIZE, packed: true, descGpa: pd.desc, availGpa: pd.driverEvent, usedGpa: pd.deviceEvent,
        eventIdx: false, indirect: true, nextAvail, kickFd: pd.kick, callFd: pd.call, errFd: -1, inflight: region.queue(0),
      });
      const id = pd.addChain([{ gpa: ram.alloc(64), len: 64, write: true }], { kick: false });
      const a = new PackedVirtqueue(mem, config(0x8000));
      a.add(a.pop()!.head, 64);
      a.flush();
      expect(pd.takeUsed().map((u) => u.id)).toEqual([id]);
      // Forged: the chain just answered marked in flight again (its copy and head as a pop leaves them).
      const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const head = 0; // the entry the chain took (the first free one), back on the free list
      v.setUint8(32 + 32 * head, 1);
      v.setUint16(32 + 32 * head + 4, head, true); // last
      v.setUint16(32 + 32 * head + 6, 1, true); // num
      v.setUint16(12, 1, true); // free_head
      v.setUint16(14, 1, true); // old_free_head
      const before = Uint8Array.from(bytes);
      expect(() => new PackedVirtqueue(mem, config(pd.availPos))).toThrow(/not made available by the driver/);
      expect(Buffer.compare(bytes, before)).toBe(0); // the region untouched
      expect(pd.takeUsed()).toEqual([]); // no completion the guest did not ask for
    } finally {
      region.unmap();
      close(fd);
      pd.dispose();
      ram.dispose();
    }
  });
});

// ---- the audit's case end to end: a block backend given a forged region ----

describe("block backend given a forged region (issue 16, item 3)", () => {
  const cleanups: (() => void | Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) {
      try {
        await c();
      } catch {
        /* keep cleaning */
      }
    }
  });

  test("a stale write chain marked in flight while the guest submitted nothing: not executed, no completion, the guest's first request served", async () => {
    const RING = 64;
    const dir = mkdtempSync(join(tmpdir(), "vhu-audit-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = join(dir, "disk.img");
    writeFileSync(image, "");
    truncateSync(image, 8 * MiB);
    const b = await SpawnedBackend.start("block", ["--file", image, "--num-queues", "1", "--queue-size", String(RING), "--threads", "0"]);
    cleanups.push(() => b.kill());
    const mem = new GuestMemfd(16 * MiB, { sealing: true });
    cleanups.push(() => mem.dispose());
    const space = GuestSpace.of({ mem, gpa: 0 });
    const q = Ring.at(space, 0, RING, 0x10000);
    cleanups.push(() => q.dispose());
    const bump = new Bump(1 * MiB, 16 * MiB);
    // Leftovers in the descriptor table: a write of 4 KiB of 0x5a to sector 8 at head 5, never
    // made available now (avail == used == 0).
    const hdr = bump.alloc(16);
    const hv = space.view(hdr, 16);
    hv.setUint32(0, BLK_T_OUT, true);
    hv.setUint32(8, 8, true);
    const data = bump.alloc(4096, 512);
    space.bytes(data, 4096).fill(0x5a);
    const status = bump.alloc(1, 1);
    q.writeDesc(q.desc, 5, hdr, 16, VIRTQ_DESC_F_NEXT, 6);
    q.writeDesc(q.desc, 6, data, 4096, VIRTQ_DESC_F_NEXT, 7);
    q.writeDesc(q.desc, 7, status, 1, VIRTQ_DESC_F_WRITE, 0);
    const regionFd = memfdCreate("forged-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    cleanups.push(() => close(regionFd));
    const regionSize = queueRegionSize(RING);
    ftruncate(regionFd, regionSize);
    const host = mmap(regionSize, PROT_READ | PROT_WRITE, MAP_SHARED, regionFd, 0);
    cleanups.push(() => munmap(host, regionSize));
    forge(new Uint8Array(toArrayBuffer(host as never, 0, regionSize)), RING, 0, [{ head: 5, counter: 1 }]);

    const f = new HostileFront(b.socketPath, 2000);
    cleanups.push(() => f.close());
    f.handshake();
    expect(f.setMemTable(space)).toBe(0n);
    expect(f.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(regionSize, 0, 1, RING), [regionFd])).toBe(0n);
    f.startRing(q);
    await Bun.sleep(100);
    expect(q.usedIdx()).toBe(0); // no completion the guest did not ask for
    // The guest's first real request: a read of sector 8, which must still be zeros.
    const r = blkRequest(space, q, bump, BLK_T_IN, 8, bump.alloc(4096, 512), 4096);
    const used = await q.waitUsed(1, 2000);
    expect(used.map((u) => u.id)).toEqual([r.head]);
    expect(space.bytes(r.status, 1)[0]).toBe(BLK_S_OK);
    expect(space.bytes(r.data, 4096).every((x) => x === 0)).toBe(true);
    expect(readFileSync(image).subarray(8 * 512, 9 * 512).every((x) => x === 0)).toBe(true);
    expect(b.status()).toBe("running");
  }, 15_000);
});
