// The packed virtqueue (virtio 1.2 §2.8) against a driver that lays its ring out as Linux does
// (test/support/packed_driver.ts): chains in and out of order, both wrap counters over many
// rings, indirect tables, hostile chains, rewind, event suppression both ways, ring positions
// (GET/SET_VRING_BASE's index | wrap << 15) and dirty logging.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { GuestRam, Req, BackendUnderTest, Vmm, RING_PACKED, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT } from "../support/frontend.ts";
import {
  PackedDriverQueue, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_ENABLE,
  VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, startPackedQueue, getVringBase,
} from "../support/packed_driver.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { PackedVirtqueue } from "../../src/packed_virtqueue.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import { type VirtqueueConfig } from "../../src/ring.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import { eventfd, drain } from "../../ffi/eventfd.ts";
import { close } from "../../ffi/libc.ts";
import { setLogLevel } from "../../src/log.ts";
import { xorshift } from "../support/random.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

const WRAP = 1 << 15;
let ram: GuestRam;
let mem: GuestMemory;
let pd: PackedDriverQueue;
let errFd = -1;

function config(opts: { eventIdx?: boolean; indirect?: boolean; nextAvail?: number; nextUsed?: number; log?: VirtqueueConfig["log"] } = {}): VirtqueueConfig {
  return {
    index: 0, size: pd.size, packed: true, descGpa: pd.desc, availGpa: pd.driverEvent, usedGpa: pd.deviceEvent,
    eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? true, nextAvail: opts.nextAvail ?? 0x8000, nextUsed: opts.nextUsed,
    kickFd: pd.kick, callFd: pd.call, errFd, log: opts.log,
  };
}

function queue(opts: { eventIdx?: boolean; indirect?: boolean; size?: number; nextAvail?: number; nextUsed?: number; log?: VirtqueueConfig["log"] } = {}): PackedVirtqueue {
  pd = new PackedDriverQueue(ram, 0, opts.size ?? 16, opts.eventIdx ?? false);
  return new PackedVirtqueue(mem, config(opts));
}

beforeEach(() => {
  ram = new GuestRam(1 << 20);
  mem = new GuestMemory();
  mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
  errFd = eventfd();
});

afterEach(() => {
  pd?.dispose();
  pd = undefined as unknown as PackedDriverQueue; // never disposed twice (its fds get reused)
  ram.dispose();
  close(errFd);
});

const rng = xorshift;

describe("packed ring: chains", () => {
  test("openVirtqueue picks the packed layout", () => {
    pd = new PackedDriverQueue(ram, 0, 8);
    expect(openVirtqueue(mem, config())).toBeInstanceOf(PackedVirtqueue);
  });

  test("direct and indirect chains give readable then writable segments; used descriptors carry id, length, flags", () => {
    const q = queue();
    const a = ram.alloc(5);
    ram.bytes(a, 5).set(Buffer.from("hello"));
    const b = ram.alloc(8);
    const ids = [
      pd.addChain([{ gpa: a, len: 2 }, { gpa: a + 2, len: 3 }, { gpa: b, len: 8, write: true }], { kick: false }),
      pd.addChain([{ gpa: a, len: 5 }, { gpa: b, len: 8, write: true }], { indirect: true, kick: false }),
    ];
    for (let i = 0; i < 2; i++) {
      const c = q.pop()!;
      expect(c.head).toBe(ids[i]!);
      expect(c.readableLen).toBe(5);
      expect(c.writableLen).toBe(8);
      expect(c.readable[0]!.addr).toBe(ram.host + a);
      const got = new Uint8Array(5);
      expect(new ChainReader(c).read(got)).toBe(5);
      expect(Buffer.from(got).toString()).toBe("hello");
      expect(new ChainWriter(c).write(Buffer.from("0123456789"))).toBe(8);
      q.add(c.head, i === 0 ? 8 : 0);
    }
    expect(q.pop()).toBeNull();
    expect(pd.takeUsed()).toEqual([]); // nothing visible before flush
    q.flush();
    const used = pd.takeUsed();
    expect(used.map((u) => [u.id, u.len, u.slot])).toEqual([[ids[0]!, 8, 0], [ids[1]!, 0, 3]]);
    const both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
    expect(used[0]!.flags).toBe(both | VIRTQ_DESC_F_WRITE);
    expect(used[1]!.flags).toBe(both);
    expect(Buffer.from(ram.bytes(b, 8)).toString()).toBe("01234567");
    expect(q.inFlight).toBe(0);
    expect(pd.numFree).toBe(16);
  });

  test("out-of-order completion: used descriptors in completion order, each skipping its chain's slots", () => {
    const q = queue({ size: 8 });
    const buf = ram.alloc(64);
    const A = pd.addChain([{ gpa: buf, len: 4 }, { gpa: buf, len: 4 }, { gpa: buf, len: 4, write: true }], { kick: false });
    const B = pd.addChain([{ gpa: buf, len: 4, write: true }], { kick: false });
    const C = pd.addChain([{ gpa: buf, len: 4 }, { gpa: buf, len: 4, write: true }], { kick: false });
    const [a, b, c] = [q.pop()!, q.pop()!, q.pop()!];
    expect([a.head, b.head, c.head]).toEqual([A, B, C]);
    q.add(B, 1);
    q.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len, u.slot])).toEqual([[B, 1, 0]]);
    q.add(C, 2);
    q.add(A, 3);
    q.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len, u.slot])).toEqual([[C, 2, 1], [A, 3, 3]]);
    expect(q.position()).toEqual({ nextAvail: 6 | WRAP, nextUsed: 6 | WRAP });
  });

  test("flush publishes a batch with its first descriptor last", () => {
    const q = queue({ size: 8 });
    const buf = ram.alloc(16);
    for (let i = 0; i < 3; i++) pd.addChain([{ gpa: buf, len: 4, write: true }], { kick: false });
    for (let i = 0; i < 3; i++) q.add(q.pop()!.head, 4);
    // Before flush: id and len are written, but no slot is used yet.
    for (let s = 0; s < 3; s++) expect(pd.isUsed(s, true)).toBe(false);
    q.flush();
    expect(pd.takeUsed().length).toBe(3);
  });

  for (const size of [4, 5, 16, 256]) {
    test(`both wrap counters over many rings (size ${size}, chains of 1..3 descriptors, random completion order)`, () => {
      const q = queue({ size, eventIdx: true });
      const r = rng(7 + size);
      const bufs = Array.from({ length: 8 }, () => ram.alloc(64));
      const expected = new Map<number, number>();
      const held: number[] = [];
      let completed = 0;
      let flips = 0;
      let lastWrap = true;
      for (let round = 0; round < 80 + 3 * size; round++) {
        // The driver adds what fits.
        for (let k = r(4); k > 0; k--) {
          const n = 1 + r(3);
          if (n > pd.numFree) break;
          const parts = Array.from({ length: n }, (_, i) => ({ gpa: bufs[r(8)]!, len: 1 + r(64), write: i === n - 1 }));
          const id = pd.addChain(parts, { kick: false, indirect: r(5) === 0 });
          expected.set(id, parts[n - 1]!.len);
        }
        for (let c = q.pop(); c !== null; c = q.pop()) {
          expect(expected.has(c.head)).toBe(true);
          held.push(c.head);
        }
        // Complete a random part of what is held, in random order.
        for (let k = r(held.length + 1); k > 0; k--) {
          const id = held.splice(r(held.length), 1)[0]!;
          q.add(id, expected.get(id)!);
        }
        q.flush();
        for (const u of pd.takeUsed()) {
          expect(u.len).toBe(expected.get(u.id)!);
          expected.delete(u.id);
          completed++;
        }
        if (pd.availWrap !== lastWrap) flips++;
        lastWrap = pd.availWrap;
      }
      for (const id of held.splice(0)) q.add(id, expected.get(id)!);
      q.flush();
      completed += pd.takeUsed().length;
      expect(flips).toBeGreaterThan(3);
      expect(completed).toBeGreaterThan(3 * size);
      expect(q.errors).toBe(0);
      expect(q.inFlight).toBe(0);
      expect(pd.numFree).toBe(size);
      expect(q.position()).toEqual({ nextAvail: pd.availPos, nextUsed: pd.usedPos });
    });
  }

  test("a chain may straddle the end of the ring", () => {
    const q = queue({ size: 4 });
    const buf = ram.alloc(64);
    for (let i = 0; i < 3; i++) pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    for (let i = 0; i < 3; i++) q.add(q.pop()!.head, 0);
    q.flush();
    pd.takeUsed();
    const id = pd.addChain([{ gpa: buf, len: 1 }, { gpa: buf, len: 2 }, { gpa: buf + 8, len: 3, write: true }], { kick: false });
    const c = q.pop()!;
    expect([c.head, c.readableLen, c.writableLen]).toEqual([id, 3, 3]);
    q.add(id, 3);
    q.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.slot])).toEqual([[id, 3]]);
    expect(q.position()).toEqual({ nextAvail: 2, nextUsed: 2 });
  });

  test("indirect tables that are not 4-byte aligned are read right, whatever their size", () => {
    const q = queue();
    const data = ram.alloc(1024);
    ram.bytes(data, 1024).forEach((_, i, a) => (a[i] = (i * 7) & 0xff));
    const chains = [
      { misalign: 2, parts: [5, 11, 64] },
      { misalign: 10, parts: [1, 2, 3, 4, 5, 6, 7, 8, 9] },
      { misalign: 0, parts: [32, 8] },
    ];
    const ids = chains.map((c) => {
      let off = 0;
      const bufs = c.parts.map((len, i) => {
        const b = { gpa: data + off, len, write: i === c.parts.length - 1 };
        off += len;
        return b;
      });
      return pd.addChain(bufs, { indirect: true, kick: false, misalign: c.misalign });
    });
    chains.forEach((c, k) => {
      const chain = q.pop()!;
      expect(chain.head).toBe(ids[k]!);
      expect(chain.readable.map((s) => s.len)).toEqual(c.parts.slice(0, -1));
      expect(chain.writable.map((s) => s.len)).toEqual(c.parts.slice(-1));
      const want = c.parts.slice(0, -1).reduce((a, b) => a + b, 0);
      const got = new Uint8Array(want);
      expect(new ChainReader(chain).read(got)).toBe(want);
      expect([...got]).toEqual(Array.from({ length: want }, (_, i) => (i * 7) & 0xff));
      q.add(chain.head, 0);
    });
    expect(q.errors).toBe(0);
  });

  test("an indirect table may be longer than a small ring; refused without INDIRECT_DESC", () => {
    const q = queue({ size: 4 });
    const bufs = Array.from({ length: 10 }, (_, i) => ({ gpa: ram.alloc(512), len: 512, write: i >= 6 }));
    const id = pd.addChain(bufs, { indirect: true, kick: false });
    const c = q.pop()!;
    expect([c.head, c.readable.length, c.readableLen, c.writable.length]).toEqual([id, 6, 3072, 4]);
    pd.dispose();
    const q2 = queue({ size: 4, indirect: false });
    const id2 = pd.addChain([{ gpa: 0x8000, len: 4 }], { indirect: true, kick: false });
    expect(q2.pop()).toBeNull();
    q2.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual([[id2, 0]]);
    expect(q2.errors).toBe(1);
    expect(q.errors).toBe(0);
  });
});

describe("packed ring: hostile chains", () => {
  // Each builds raw descriptors (the driver adds the AVAIL/USED bits) and says what must happen.
  const ID = 3;
  const bad: [string, "completed" | "skipped", (d: PackedDriverQueue) => { descs: { gpa: number; len: number; flags: number; id: number }[]; track: number | null }][] = [
    ["a buffer outside guest memory", "completed", () => ({ descs: [{ gpa: (1 << 20) - 2, len: 4, flags: 0, id: ID }], track: ID })],
    ["an address beyond 2^53", "completed", () => ({ descs: [{ gpa: 2 ** 60, len: 4, flags: 0, id: ID }], track: ID })],
    ["a readable buffer after a writable one", "completed", () => ({
      descs: [{ gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, id: ID }, { gpa: 0x8000, len: 4, flags: 0, id: ID }], track: ID,
    })],
    ["a bad buffer in the middle of a chain", "completed", () => ({
      descs: [{ gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, id: ID }, { gpa: 2 ** 40, len: 4, flags: VIRTQ_DESC_F_NEXT, id: ID }, { gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_WRITE, id: ID }], track: ID,
    })],
    ["nested indirect tables", "completed", (d) => {
      const t = d.ram.alloc(32, 16);
      d.writeDesc(t, 0, t, 32, 0, VIRTQ_DESC_F_INDIRECT);
      return { descs: [{ gpa: t, len: 32, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID };
    }],
    ["an indirect table with a bad length", "completed", () => ({ descs: [{ gpa: 0x8000, len: 24, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID })],
    ["an indirect table larger than 1024 entries", "completed", () => ({ descs: [{ gpa: 0x8000, len: 16 * 1025, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID })],
    ["an indirect table outside guest memory", "completed", () => ({ descs: [{ gpa: (1 << 20) - 16, len: 64, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID })],
    ["an indirect descriptor with NEXT", "completed", () => ({
      descs: [{ gpa: 0x8000, len: 16, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, id: ID }, { gpa: 0x8000, len: 4, flags: 0, id: ID }], track: ID,
    })],
    ["an indirect descriptor after a direct one", "completed", () => ({
      descs: [{ gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, id: ID }, { gpa: 0x8000, len: 16, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID,
    })],
    ["a bad buffer inside an indirect table", "completed", (d) => {
      const t = d.ram.alloc(32, 16);
      d.writeDesc(t, 0, 0x8000, 4, 0, 0);
      d.writeDesc(t, 1, 2 ** 50, 4, 0, VIRTQ_DESC_F_WRITE);
      return { descs: [{ gpa: t, len: 32, flags: VIRTQ_DESC_F_INDIRECT, id: ID }], track: ID };
    }],
    ["a buffer id beyond the queue", "skipped", () => ({ descs: [{ gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, id: 99 }, { gpa: 0x8000, len: 4, flags: 0, id: 16 }], track: null })],
  ];
  for (const [name, outcome, build] of bad) {
    test(`${name} is ${outcome === "completed" ? "completed with length 0" : "skipped"} and the next chain still works`, () => {
      const q = queue();
      const { descs, track } = build(pd);
      pd.addRaw(descs, { kick: false, track });
      const good = ram.alloc(4);
      const id = pd.addChain([{ gpa: good, len: 4 }], { kick: false });
      const c = q.pop()!;
      expect(c.head).toBe(id);
      q.add(c.head, 0);
      q.flush();
      expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual(outcome === "completed" ? [[ID, 0], [id, 0]] : [[id, 0]]);
      expect(q.errors).toBe(1);
      expect(q.broken).toBe(false);
      expect(q.position().nextAvail).toBe(pd.availPos);
    });
  }

  test("a buffer id already in flight is skipped, never completed twice", () => {
    const q = queue();
    const buf = ram.alloc(8);
    const first = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    expect(q.pop()!.head).toBe(first);
    pd.addRaw([{ gpa: buf, len: 4, flags: 0, id: first }], { kick: false, track: null }); // the same id again
    const next = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    expect(q.pop()!.head).toBe(next);
    expect(q.errors).toBe(1);
    q.add(first, 1);
    q.add(next, 2);
    expect(() => q.add(first, 1)).toThrow(/not in flight/);
    q.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual([[first, 1], [next, 2]]);
  });

  test("a chain longer than the ring (NEXT on every descriptor: a loop) breaks the ring and signals the error fd", () => {
    const q = queue({ size: 4 });
    // Every slot available and chained: the walk comes back to where it started.
    pd.addRaw(Array.from({ length: 4 }, () => ({ gpa: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, id: 0 })), { kick: false, track: null });
    expect(q.pop()).toBeNull();
    expect(q.broken).toBe(true);
    expect(q.pending()).toBe(0);
    expect(q.enableNotification()).toBe(false);
    expect(drain(errFd)).toBe(1);
    expect(q.pop()).toBeNull();
  });

  test("descriptors with the wrong wrap bits are not available", () => {
    const q = queue({ size: 4 });
    // AVAIL and USED both set under wrap 1: that is a used descriptor, not an available one.
    pd.addRaw([{ gpa: 0x8000, len: 4, flags: 0, id: 0 }], { kick: false, track: null, headFlagsOverride: VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED });
    expect(q.pending()).toBe(0);
    expect(q.pop()).toBeNull();
    // Neither bit set: available only under wrap 0.
    Atomics.store(ram.u16, pd.desc / 2 + 7, 0);
    expect(q.pop()).toBeNull();
    expect(q.errors).toBe(0);
  });

  test("rings outside guest memory or misaligned are refused; sizes need not be powers of 2", () => {
    pd = new PackedDriverQueue(ram, 0, 12);
    const base = config();
    expect(() => new PackedVirtqueue(mem, { ...base, descGpa: (1 << 20) - 64 })).toThrow(/outside/);
    expect(() => new PackedVirtqueue(mem, { ...base, descGpa: pd.desc + 8 })).toThrow(/aligned/);
    expect(() => new PackedVirtqueue(mem, { ...base, availGpa: pd.driverEvent + 2 })).toThrow(/aligned/);
    expect(() => new PackedVirtqueue(mem, { ...base, usedGpa: 1 << 20 })).toThrow(/outside/);
    expect(() => new PackedVirtqueue(mem, { ...base, size: 0 })).toThrow(/size/);
    expect(new PackedVirtqueue(mem, base).size).toBe(12);
  });
});

describe("packed ring: rewind and completion", () => {
  test("rewind(n) hands the last n chains out again, in order; a stop reports the first of them", () => {
    const q = queue({ size: 8 });
    const buf = ram.alloc(16);
    const ids = Array.from({ length: 4 }, (_, i) => pd.addChain(Array.from({ length: 1 + (i % 2) }, () => ({ gpa: buf, len: 4 })), { kick: false }));
    const popped = ids.map(() => q.pop()!.head);
    expect(popped).toEqual(ids);
    q.add(ids[0]!, 0);
    q.rewind(2);
    expect(q.inFlight).toBe(1);
    expect(q.pending()).toBe(1);
    expect(q.nextAvail).toBe(3 | WRAP); // ids[2] starts at slot 3 (1 + 2 descriptors before it)
    expect(q.pop()!.head).toBe(ids[2]!);
    q.undoPop();
    expect([q.pop()!.head, q.pop()!.head, q.pop()]).toEqual([ids[2]!, ids[3]!, null]);
    expect(q.nextAvail).toBe(6 | WRAP);
    for (const id of [ids[3]!, ids[1]!, ids[2]!]) q.add(id, 0);
    q.flush();
    expect(pd.takeUsed().map((u) => u.id)).toEqual([ids[0]!, ids[3]!, ids[1]!, ids[2]!]);
  });

  test("a queue rebuilt at a stop's position serves the rewound chains from the ring", () => {
    let q = queue({ size: 8 });
    const buf = ram.alloc(16);
    const a = pd.addChain([{ gpa: buf, len: 4 }, { gpa: buf, len: 4 }], { kick: false });
    const b = pd.addChain([{ gpa: buf, len: 3 }, { gpa: buf, len: 4, write: true }], { kick: false });
    q.pop();
    q.pop();
    q.add(a, 0);
    q.flush();
    q.rewind(1);
    const pos = q.position();
    expect(pos).toEqual({ nextAvail: 2 | WRAP, nextUsed: 2 | WRAP });
    q = new PackedVirtqueue(mem, config({ nextAvail: pos.nextAvail, nextUsed: pos.nextUsed }));
    const c = q.pop()!;
    expect([c.head, c.readableLen, c.writableLen]).toEqual([b, 3, 4]);
    q.add(b, 4);
    q.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual([[a, 0], [b, 4]]);
  });

  test("rewind is refused past a chain completed after it, or past what is in flight; nothing changes", () => {
    const q = queue({ size: 8 });
    const buf = ram.alloc(16);
    const a = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    const b = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    q.pop();
    q.pop();
    q.add(b, 0);
    expect(() => q.rewind(1)).toThrow(/completed/);
    expect(() => q.rewind(2)).toThrow(/in flight/);
    expect(q.inFlight).toBe(1);
    q.add(a, 0);
    q.flush();
    expect(pd.takeUsed().map((u) => u.id)).toEqual([b, a]);
    expect(() => q.undoPop()).toThrow();
  });

  test("rewind passes over a malformed chain the queue completed itself", () => {
    const q = queue({ size: 8 });
    const buf = ram.alloc(16);
    const a = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    pd.addRaw([{ gpa: 2 ** 40, len: 4, flags: 0, id: 5 }], { kick: false, track: 5 });
    const c = pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    expect(q.pop()!.head).toBe(a);
    expect(q.pop()!.head).toBe(c);
    q.rewind(1);
    expect(q.pop()!.head).toBe(c);
    q.add(c, 0);
    q.add(a, 0);
    q.flush();
    expect(pd.takeUsed().map((u) => u.id)).toEqual([5, c, a]);
  });

  test("completing a buffer twice, or one never popped, is refused and never shown to the driver", () => {
    const q = queue();
    const id = pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    expect(() => q.add(id, 0)).toThrow(/not in flight/); // not popped yet
    q.pop();
    q.add(id, 0);
    expect(() => q.add(id, 0)).toThrow(/not in flight/);
    expect(() => q.add(999, 0)).toThrow(/not in flight/);
    expect(() => q.add(-1, 0)).toThrow(/not in flight/);
    q.flush();
    expect(pd.takeUsed().length).toBe(1);
    expect(pd.takeUsed().length).toBe(0);
  });
});

describe("packed ring: event suppression", () => {
  test("without EVENT_IDX: the device enables and disables kicks; the driver's flags decide calls", () => {
    const q = queue();
    q.disableNotification();
    expect(pd.deviceEventArea().flags).toBe(VRING_PACKED_EVENT_FLAG_DISABLE);
    pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: "auto" });
    expect(pd.kicks).toBe(0);
    expect(q.enableNotification()).toBe(true); // a chain arrived while kicks were off
    expect(pd.deviceEventArea().flags).toBe(VRING_PACKED_EVENT_FLAG_ENABLE);
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(pd.call)).toBe(1);
    expect(q.enableNotification()).toBe(false);
    pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: "auto" });
    expect(pd.kicks).toBe(1);
    pd.disableCb();
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(pd.call)).toBe(0);
    pd.enableCb();
    expect(ram.u16[pd.driverEvent / 2 + 1]).toBe(VRING_PACKED_EVENT_FLAG_ENABLE);
    pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(pd.call)).toBe(1);
  });

  test("EVENT_IDX, kicks: the device asks for a kick at its next descriptor, across wraps", () => {
    const q = queue({ size: 4, eventIdx: true });
    const buf = ram.alloc(16);
    for (let round = 0; round < 10; round++) {
      expect(q.enableNotification()).toBe(false);
      const area = pd.deviceEventArea();
      expect(area.flags).toBe(VRING_PACKED_EVENT_FLAG_DESC);
      expect(area.offWrap).toBe(pd.availPos);
      const before = pd.kicks;
      pd.addChain([{ gpa: buf, len: 4 }], { kick: "auto" });
      expect(pd.kicks).toBe(before + 1); // the descriptor the device waits for
      pd.addChain([{ gpa: buf, len: 4 }, { gpa: buf, len: 4 }], { kick: "auto" });
      expect(pd.kicks).toBe(before + 1); // not re-armed: no kick
      for (let c = q.pop(); c !== null; c = q.pop()) q.add(c.head, 0);
      q.flush();
      pd.takeUsed();
    }
    expect(q.position().nextAvail).toBe(pd.availPos);
  });

  test("EVENT_IDX, calls: only when the used side reaches the driver's off_wrap, across wraps", () => {
    const q = queue({ size: 4, eventIdx: true });
    const buf = ram.alloc(16);
    const one = () => {
      pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
      q.add(q.pop()!.head, 0);
      q.flush();
      pd.takeUsed();
      return drain(pd.call);
    };
    pd.enableCb();
    expect(one()).toBe(1); // the first completion always notifies; used now at 1
    pd.enableCbDelayed(2); // a call when the used descriptor at slot 3 is written
    expect([one(), one(), one()]).toEqual([0, 0, 1]);
    // Used side at 0, wrap 0. Ask for slot 2 of the next lap (wrap 1): not before 2 more laps' worth.
    expect(pd.usedPos).toBe(0);
    pd.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 2 | WRAP);
    expect([one(), one(), one(), one()]).toEqual([0, 0, 0, 0]); // 0..3 of wrap 0
    expect([one(), one(), one()]).toEqual([0, 0, 1]); // slots 0, 1, 2 of wrap 1
    // A batch that wraps the used side: slots 3 (wrap 1), 0, 1 (wrap 0); the event at 0 wrap 0 lies in it.
    pd.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 0);
    for (let i = 0; i < 3; i++) pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    for (let c = q.pop(); c !== null; c = q.pop()) q.add(c.head, 0);
    q.flush();
    expect(pd.takeUsed().length).toBe(3);
    expect(drain(pd.call)).toBe(1);
    // The same batch shape with the event one slot beyond it: no call.
    pd.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 1 | WRAP);
    for (let i = 0; i < 3; i++) pd.addChain([{ gpa: buf, len: 4 }], { kick: false });
    for (let c = q.pop(); c !== null; c = q.pop()) q.add(c.head, 0);
    q.flush();
    expect(pd.takeUsed().length).toBe(3);
    expect(pd.usedPos).toBe(1 | WRAP);
    expect(drain(pd.call)).toBe(0);
    pd.disableCb();
    expect(one()).toBe(0);
    pd.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
    expect(one()).toBe(1);
  });
});

describe("packed ring: positions", () => {
  test("a fresh ring is 0x8000; positions are index | wrap << 15 on both sides", () => {
    const q = queue({ size: 8 });
    expect(q.position()).toEqual({ nextAvail: WRAP, nextUsed: WRAP });
    for (let i = 0; i < 10; i++) {
      pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
      q.add(q.pop()!.head, 0);
      q.flush();
      expect(pd.takeUsed().length).toBe(1);
    }
    expect(q.position()).toEqual({ nextAvail: 2, nextUsed: 2 });
    expect(pd.availPos).toBe(2);
  });

  test("SET_VRING_BASE's value: index 0 with the counter clear is not a fresh ring", () => {
    pd = new PackedDriverQueue(ram, 0, 8);
    // The driver stands at slot 0 after one lap: it writes AVAIL clear, USED set.
    pd.availWrap = false;
    pd.usedWrap = false;
    // What the last lap left: every slot used under wrap 1.
    for (let s = 0; s < 8; s++) ram.u16[pd.desc / 2 + s * 8 + 7] = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
    const q = new PackedVirtqueue(mem, config({ nextAvail: 0 }));
    expect(q.position()).toEqual({ nextAvail: 0, nextUsed: 0 });
    const id = pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    expect(q.pop()!.head).toBe(id);
    q.add(id, 0);
    q.flush();
    expect(pd.takeUsed().map((u) => u.id)).toEqual([id]);
  });

  test("QEMU's 32-bit base carries the used side in bits 16-31", () => {
    pd = new PackedDriverQueue(ram, 0, 8);
    pd.nextAvail = 5;
    pd.availWrap = false;
    const q = new PackedVirtqueue(mem, config({ nextAvail: 5 + (3 | WRAP) * 0x10000 }));
    expect(q.position()).toEqual({ nextAvail: 5, nextUsed: 3 | WRAP });
    const id = pd.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    q.add(q.pop()!.head, 7);
    q.flush();
    const dv = ram.dv;
    expect([dv.getUint16(pd.desc + 16 * 3 + 12, true), dv.getUint32(pd.desc + 16 * 3 + 8, true)]).toEqual([id, 7]);
    expect(pd.flagsAt(3) & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)).toBe(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED);
  });
});

describe("packed ring: dirty logging", () => {
  test("completions mark the written bytes, the used descriptor and the device event area", () => {
    const logRam = new GuestRam(4096);
    try {
      const PAGE = 4096;
      // Ring, areas and buffers on pages of their own.
      ram.alloc(1, PAGE);
      const q = queue({ size: 8, eventIdx: true, log: { host: logRam.host, size: 32 } });
      const src = ram.alloc(100, PAGE);
      const dst1 = ram.alloc(PAGE, PAGE);
      const dst2 = ram.alloc(PAGE, PAGE);
      const untouched = ram.alloc(PAGE, PAGE);
      const dirty = (gpa: number) => (logRam.u8[Math.floor(gpa / PAGE) >> 3]! & (1 << (Math.floor(gpa / PAGE) & 7))) !== 0;
      const pages = () => Array.from({ length: 256 }, (_, p) => p).filter((p) => dirty(p * PAGE));
      pd.addChain([{ gpa: src, len: 100 }, { gpa: dst1, len: PAGE, write: true }, { gpa: dst2, len: PAGE, write: true }], { kick: false });
      pd.addChain([{ gpa: untouched, len: PAGE, write: true }], { kick: false });
      const c = q.pop()!;
      const c2 = q.pop()!;
      expect(pages()).toEqual([]);
      q.add(c.head, PAGE + 10); // into dst2
      q.add(c2.head, 0); // nothing written
      q.flush();
      expect(dirty(dst1)).toBe(true);
      expect(dirty(dst2)).toBe(true);
      expect(dirty(untouched)).toBe(false);
      expect(dirty(src)).toBe(false);
      expect(dirty(pd.desc)).toBe(true);
      logRam.u8.fill(0);
      q.enableNotification();
      expect(pages()).toEqual([Math.floor(pd.deviceEvent / PAGE)]);
      logRam.u8.fill(0);
      q.disableNotification();
      expect(pages()).toEqual([Math.floor(pd.deviceEvent / PAGE)]);
    } finally {
      logRam.dispose();
    }
  });
});

describe("packed ring through the handler (echo device in a worker)", () => {
  const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;
  for (const threaded of [false, true]) {
    test(`RING_PACKED is offered and negotiated; echo over wraps; GET_VRING_BASE is index | wrap << 15; restarts continue (threaded ${threaded})`, async () => {
      const backend = new BackendUnderTest("echo", { threaded }, ECHO);
      await backend.ready;
      const guest = new GuestRam(1 << 20);
      const vmm = new Vmm(backend, guest);
      const q = new PackedDriverQueue(guest, 1, 6, true); // not a power of 2
      try {
        const offered = vmm.conn.requestU64(Req.GET_FEATURES);
        expect(offered & RING_PACKED).toBe(RING_PACKED);
        vmm.handshake(offered); // everything, packed included
        vmm.setMemTable();
        startPackedQueue(vmm, q, null); // no SET_VRING_BASE: a fresh ring (index 0, counters set)
        const bufs = Array.from({ length: 4 }, () => ({ src: guest.alloc(64), dst: guest.alloc(64) }));
        let n = 0;
        const echo = async (count: number) => {
          for (let i = 0; i < count; i++) {
            const b = bufs[i % bufs.length]!;
            const text = `req-${n++}`;
            guest.bytes(b.src, text.length).set(Buffer.from(text));
            const id = q.addChain([{ gpa: b.src, len: text.length }, { gpa: b.dst, len: 64, write: true }], { kick: "auto" });
            const used = await q.waitUsed(1);
            expect(used.map((u) => [u.id, u.len])).toEqual([[id, text.length]]);
            expect(Buffer.from(guest.bytes(b.dst, text.length)).toString()).toBe(text);
          }
        };
        await echo(8); // 16 descriptors in a ring of 6: the counters flipped twice
        expect(q.kicks).toBeGreaterThan(0);
        expect(q.availPos).toBe(4 | WRAP);
        expect(getVringBase(vmm, 1)).toBe(4 | WRAP);
        startPackedQueue(vmm, q, 4 | WRAP);
        await echo(1); // slots 4, 5: index 0 of an odd lap
        expect(getVringBase(vmm, 1)).toBe(0);
        startPackedQueue(vmm, q, 0); // base 0 is not a fresh ring
        await echo(5);
        expect(getVringBase(vmm, 1)).toBe(q.availPos);
        expect(q.availPos).toBe(4 | WRAP); // 10 more descriptors from index 0 of an odd lap
      } finally {
        vmm.dispose();
        q.dispose();
        await backend.stop();
        guest.dispose();
      }
    });
  }
});
