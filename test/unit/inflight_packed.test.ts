// Inflight tracking on packed rings (src/inflight_packed.ts): a backend that dies with chains in
// flight leaves a region from which the next process resubmits exactly the unanswered ones, in
// pop order, and resumes the ring where it really stood, although the front-end's base is stale
// (QEMU gives a reconnected backend the base of the last ring start: it has no used index in
// guest memory to read). Wherever between two steps the crash hits, nothing is answered twice or
// lost; a region that does not add up is refused without a crash or a hang.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { toArrayBuffer } from "bun:ffi";
import { GuestRam, BackendUnderTest, Vmm, Req, RING_PACKED, memTable, type BufferSpec } from "../support/frontend.ts";
import { PackedDriverQueue, startPackedQueue } from "../support/packed_driver.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { PackedVirtqueue } from "../../src/packed_virtqueue.ts";
import { checkRing } from "../../src/open_virtqueue.ts";
import { type VirtqueueConfig } from "../../src/ring.ts";
import { InflightRegion, queueRegionSize } from "../../src/inflight.ts";
import { InflightError, planPackedRecovery } from "../../src/inflight_packed.ts";
import { inflightBytes } from "../../src/protocol/codec.ts";
import { fstat } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { setLogLevel } from "../../src/log.ts";
import { xorshift } from "../support/random.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

const WRAP = 1 << 15;
/** What QEMU gives at the first start of a packed ring, and again after every crash until a clean stop. */
const QEMU_FIRST_BASE = 0x8000 + 0x8000 * 0x10000;

let ram: GuestRam;
let mem: GuestMemory;
let pd: PackedDriverQueue;
let region: InflightRegion;
let regionFd: number;
let bytes: Uint8Array;

function setup(size: number): void {
  pd = new PackedDriverQueue(ram, 0, size);
  ({ region, fd: regionFd } = InflightRegion.allocate(1, size, "packed"));
  bytes = new Uint8Array(toArrayBuffer(region.host as never, 0, region.size));
}

function config(nextAvail = QEMU_FIRST_BASE): VirtqueueConfig {
  return {
    index: 0, size: pd.size, packed: true, descGpa: pd.desc, availGpa: pd.driverEvent, usedGpa: pd.deviceEvent,
    eventIdx: false, indirect: true, nextAvail, kickFd: pd.kick, callFd: pd.call, errFd: -1, inflight: region.queue(0),
  };
}

function queue(nextAvail = QEMU_FIRST_BASE): PackedVirtqueue {
  return new PackedVirtqueue(mem, config(nextAvail));
}

/** `n` one-buffer requests (or `descs` buffers each); returns their ids. */
function requests(n: number, descs = 1): number[] {
  return Array.from({ length: n }, () => {
    const bufs: BufferSpec[] = Array.from({ length: descs }, (_, i) => ({ gpa: ram.alloc(64), len: 64, write: i === descs - 1 }));
    return pd.addChain(bufs, { kick: false });
  });
}

function popAll(q: PackedVirtqueue): number[] {
  const out: number[] = [];
  for (let c = q.pop(); c !== null; c = q.pop()) out.push(c.head);
  return out;
}

function used(): number[] {
  return pd.takeUsed().map((u) => u.id);
}

beforeEach(() => {
  ram = new GuestRam(4 << 20);
  mem = new GuestMemory();
  mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
});

afterEach(() => {
  region?.unmap();
  if (regionFd >= 0) close(regionFd);
  regionFd = -1;
  pd?.dispose();
  pd = undefined as unknown as PackedDriverQueue;
  ram.dispose();
});

describe("packed inflight region: resubmission after a crash", () => {
  test("a fresh region replays nothing and keeps the front-end's base; GET_INFLIGHT_FD's sizes", () => {
    setup(16);
    requests(2);
    const q = queue(5 | WRAP);
    expect(q.position()).toEqual({ nextAvail: 5 | WRAP, nextUsed: 5 | WRAP });
    expect(new DataView(bytes.buffer, bytes.byteOffset).getUint16(10, true)).toBe(16); // desc_num
    // 32-byte header and 32-byte entries, rounded to 64 (DPDK's size).
    expect(queueRegionSize(128, "packed")).toBe(4160);
    expect(queueRegionSize(5, "packed")).toBe(192);
  });

  test("completed out of order, the backend dies: the next resubmits the unanswered ones in pop order, the ring continues from where the region says", () => {
    setup(16);
    const ids = requests(5, 3); // 15 of 16 descriptors
    const a = queue();
    expect(popAll(a)).toEqual(ids);
    a.add(ids[2]!, 1);
    a.add(ids[0]!, 1);
    a.flush();
    expect(used()).toEqual([ids[2]!, ids[0]!]);
    a.add(ids[4]!, 1); // written, not published: the driver never saw it
    // kill -9. QEMU restarts the ring at the base of its last start (index 0, both counters set).
    const b = queue();
    expect(popAll(b)).toEqual([ids[1]!, ids[3]!, ids[4]!]);
    expect(b.position()).toEqual({ nextAvail: 15 | WRAP, nextUsed: 6 | WRAP });
    for (const id of [ids[4]!, ids[1]!, ids[3]!]) b.add(id, 1);
    b.flush();
    expect(used()).toEqual([ids[4]!, ids[1]!, ids[3]!]);
    // The ring goes on, across the wrap.
    const more = requests(4, 2);
    expect(popAll(b)).toEqual(more);
    for (const id of more) b.add(id, 2);
    b.flush();
    expect(used()).toEqual(more);
    expect(pd.inFlight.size).toBe(0);
    expect(b.position().nextUsed).toBe(b.position().nextAvail);
  });

  test("a crash right around a wrap: chains straddling the end of the ring, the used side wrapped, the available side not yet", () => {
    setup(8);
    // Move both sides to slot 6 of the first lap.
    const warm = requests(3, 2);
    const a = queue();
    popAll(a);
    for (const id of warm) a.add(id, 1);
    a.flush();
    used();
    // A (3 descriptors: slots 6, 7, 0 of the next lap), B (2: slots 1, 2), C (1: slot 3).
    const [A] = requests(1, 3);
    const [B] = requests(1, 2);
    const [C] = requests(1, 1);
    expect(popAll(a)).toEqual([A!, B!, C!]);
    a.add(B!, 1); // its used descriptor goes to slot 6 (over A's first descriptor)
    a.flush();
    expect(used()).toEqual([B!]);
    a.add(C!, 1);
    const b = queue();
    expect(b.position()).toEqual({ nextAvail: 4, nextUsed: 0 }); // used wrapped to the second lap; 4 in flight after it
    expect(popAll(b)).toEqual([A!, C!]);
    b.add(A!, 3);
    b.add(C!, 3);
    b.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.slot])).toEqual([[A!, 0], [C!, 3]]);
    const [D] = requests(1, 3);
    expect(popAll(b)).toEqual([D!]);
    b.add(D!, 1);
    b.flush();
    expect(used()).toEqual([D!]);
    expect(b.position()).toEqual({ nextAvail: 7, nextUsed: 7 });
  });

  test("the saved copy is what is resubmitted: slots of a chain in flight overwritten by used descriptors do not matter", () => {
    setup(8);
    const data = ram.alloc(16);
    ram.bytes(data, 5).set(Buffer.from("hello"));
    const out = ram.alloc(16);
    const A = pd.addChain([{ gpa: data, len: 5 }, { gpa: out, len: 16, write: true }], { kick: false });
    const [B, C] = requests(2);
    const a = queue();
    popAll(a);
    a.add(B!, 1);
    a.add(C!, 1);
    a.flush(); // used descriptors in slots 0 and 1: both of A's descriptors are gone from the ring
    used();
    const b = queue();
    const c = b.pop()!;
    expect(c.head).toBe(A);
    expect(c.readableLen).toBe(5);
    expect(c.writableLen).toBe(16);
    expect(c.readable[0]!.addr).toBe(ram.host + data);
    expect(c.writable[0]!.addr).toBe(ram.host + out);
  });

  test("indirect chains are resubmitted from their table", () => {
    setup(8);
    const A = pd.addChain([{ gpa: ram.alloc(8), len: 8 }, { gpa: ram.alloc(8), len: 8, write: true }], { indirect: true, kick: false });
    const a = queue();
    popAll(a);
    const b = queue();
    const c = b.pop()!;
    expect([c.head, c.readableLen, c.writableLen]).toEqual([A, 8, 8]);
  });

  test("a chain given back (rewind) before the crash is resubmitted once; a resubmitted one given back is handed out again first", () => {
    setup(16);
    const ids = requests(3);
    const a = queue();
    expect(popAll(a)).toEqual(ids);
    a.rewind(1); // ids[2] back: the device could not start it
    const b = queue();
    expect(b.pop()!.head).toBe(ids[0]!);
    b.undoPop();
    expect(popAll(b)).toEqual(ids);
    for (const id of ids) b.add(id, 1);
    b.flush();
    expect(used()).toEqual(ids);
    const more = requests(2);
    expect(popAll(b)).toEqual(more);
  });

  test("a clean stop and restart with the same region: the stop's position and the region agree", () => {
    setup(16);
    const ids = requests(3);
    const a = queue();
    popAll(a);
    for (const id of ids) a.add(id, 1);
    a.flush();
    used();
    const pos = a.position();
    const b = queue(pos.nextAvail);
    expect(b.position()).toEqual(pos);
    const more = requests(2);
    expect(popAll(b)).toEqual(more);
  });

  test("a malformed chain in the region is completed empty, the others are resubmitted", () => {
    setup(8);
    const [A, B] = requests(2);
    const a = queue();
    popAll(a);
    // The saved address of A's buffer: entry 0 (A's head), addr at +24. Out of guest memory now.
    new DataView(bytes.buffer, bytes.byteOffset).setUint32(32 + 24 + 4, 0x100, true);
    const b = queue();
    expect(popAll(b)).toEqual([B!]);
    b.add(B!, 1);
    b.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual([[A!, 0], [B!, 1]]);
    expect(b.errors).toBe(1);
  });
});

// ---- a crash between any two steps ----

class Crash extends Error {}

type Step = "take" | "popped" | "released" | "releasedAll" | "cleared" | "commit";
const STEPS: Step[] = ["take", "popped", "released", "releasedAll", "cleared", "commit"];

/** Makes queue `q` die at the `nth` call of `step` (before it, or just after it). */
function crashAt(q: PackedVirtqueue, step: Step, nth: number, after: boolean): void {
  const rg = (q as unknown as { inflight: Record<Step, (...a: unknown[]) => unknown> }).inflight;
  const orig = rg[step]!.bind(rg);
  let calls = 0;
  rg[step] = (...args: unknown[]) => {
    if (++calls === nth) {
      if (after) orig(...args);
      throw new Crash(`${after ? "after" : "before"} ${step} #${nth}`);
    }
    return orig(...args);
  };
}

/** Makes queue `q` die in its next flush after storing the used flags of all but `keep` first ones of the batch (a partial publication). */
function crashMidPublication(q: PackedVirtqueue, keep: number): void {
  const qi = q as unknown as { inflight: { releasedAll: () => void }; pendingUsed: { slot: number; flags: number }[]; ringU16: Uint16Array; ringFlags0: number };
  const batch = qi.pendingUsed;
  const orig = qi.inflight.releasedAll.bind(qi.inflight);
  qi.inflight.releasedAll = () => {
    orig();
    for (let i = batch.length - 1; i >= keep; i--) Atomics.store(qi.ringU16, qi.ringFlags0 + batch[i]!.slot * 8, batch[i]!.flags);
    throw new Crash("mid-publication");
  };
}

const rng = xorshift;

/**
 * A driver and a device backend that is killed over and over: requests of 1..3 descriptors (some
 * indirect), completed out of order, batches of any size, a crash injected at a random step of
 * the protocol (or a clean one between two calls). Each request must be answered exactly once,
 * with the length its own backend gave it.
 */
function crashLoop(size: number, seed: number, rounds: number): { crashes: number; resubmitted: number; answered: number } {
  setup(size);
  const r = rng(seed);
  const bufs = Array.from({ length: 3 }, () => ram.alloc(64));
  const outstanding = new Set<number>();
  let submitted = 0;
  let answered = 0;
  let q = queue();
  let held: number[] = [];
  let crashes = 0;
  let resubmitted = 0;
  let armed = false;
  const restart = () => {
    crashes++;
    q = queue(); // QEMU's stale base, every time
    held = [];
    armed = false;
  };
  const take = () => {
    for (const u of pd.takeUsed()) {
      expect(outstanding.has(u.id)).toBe(true); // never answered twice (ids are reused only once answered)
      outstanding.delete(u.id);
      answered++;
      expect(u.len).toBe(u.id + 1);
    }
  };
  const attempt = (f: () => void) => {
    try {
      f();
    } catch (e) {
      if (!(e instanceof Crash)) throw e;
      restart();
    }
  };
  for (let step = 0; step < rounds; step++) {
    const op = r(100);
    if (op < 30) {
      const n = 1 + r(3);
      const indirect = r(4) === 0;
      if (pd.numFree >= (indirect ? 1 : n)) {
        const id = pd.addChain(Array.from({ length: n }, (_, i) => ({ gpa: bufs[i]!, len: 64, write: i === n - 1 })), { kick: false, indirect });
        outstanding.add(id);
        submitted++;
      }
    } else if (op < 55) {
      attempt(() => {
        const before = q.inFlight;
        const c = q.pop();
        if (c === null) return;
        if (before === 0 && crashes > 0) resubmitted++;
        if (r(10) === 0) q.undoPop();
        else held.push(c.head);
      });
    } else if (op < 80) {
      if (held.length === 0) continue;
      const id = held.splice(r(held.length), 1)[0]!;
      q.add(id, id + 1);
    } else if (op < 95) {
      attempt(() => {
        if (!armed && r(3) === 0) {
          armed = true;
          if (r(4) === 0) crashMidPublication(q, 1 + r(2));
          else crashAt(q, STEPS[r(STEPS.length)]!, 1 + r(3), r(2) === 0);
        }
        q.flush();
      });
      take();
    } else {
      restart(); // killed between two calls
    }
  }
  // The last backend serves everything left.
  for (let i = 0; i < 50 && outstanding.size > 0; i++) {
    attempt(() => {
      for (let c = q.pop(); c !== null; c = q.pop()) held.push(c.head);
      for (const id of held) q.add(id, id + 1);
      held = [];
      q.flush();
    });
    take();
  }
  expect([...outstanding]).toEqual([]);
  expect(answered).toBe(submitted);
  return { crashes, resubmitted, answered };
}

describe("packed inflight region: a crash at any step", () => {
  for (const step of STEPS) {
    for (const after of [false, true]) {
      test(`killed ${after ? "just after" : "just before"} ${step}: every request answered once`, () => {
        setup(16);
        const ids = requests(4, 2);
        const a = queue();
        expect(popAll(a)).toEqual(ids);
        a.add(ids[1]!, ids[1]! + 1);
        a.add(ids[3]!, ids[3]! + 1);
        crashAt(a, step, 1, after);
        const seen = new Map<number, number>();
        const count = () => {
          for (const u of pd.takeUsed()) {
            seen.set(u.id, (seen.get(u.id) ?? 0) + 1);
            expect(u.len).toBe(u.id + 1);
          }
        };
        let died = false;
        try {
          a.flush();
          count();
          // take and popped run in pop: two more requests.
          requests(2, 1);
          for (let c = a.pop(); c !== null; c = a.pop()) void c;
        } catch (e) {
          if (!(e instanceof Crash)) throw e;
          died = true;
        }
        expect(died).toBe(true);
        count();
        const b = queue();
        for (let round = 0; round < 3; round++) {
          const got = popAll(b);
          for (const id of got) b.add(id, id + 1);
          b.flush();
          count();
        }
        expect(pd.inFlight.size).toBe(0); // every request answered...
        for (const [, n] of seen) expect(n).toBe(1); // ...once
        expect(seen.size).toBe(ids.length + (step === "take" || step === "popped" ? 2 : 0));
      });
    }
  }

  test("killed mid-publication (the batch's later used flags stored, its first not): rolled back, and the driver never takes a stale flag for a completion", () => {
    setup(16);
    const [X] = requests(1, 3);
    const [Y] = requests(1, 1);
    const a = queue();
    popAll(a);
    a.add(X!, 1); // used at slot 0
    a.add(Y!, 2); // used at slot 3
    crashMidPublication(a, 1); // Y's flags at slot 3 stored, X's at slot 0 not
    expect(() => a.flush()).toThrow(Crash);
    expect(used()).toEqual([]);
    const b = queue();
    expect(popAll(b)).toEqual([X!, Y!]);
    b.add(X!, 1);
    b.flush();
    // The driver moves on to slot 3, where the dead backend had flagged Y used: Y is not done yet.
    expect(used()).toEqual([X!]);
    b.add(Y!, 2);
    b.flush();
    expect(pd.takeUsed().map((u) => [u.id, u.len])).toEqual([[Y!, 2]]);
  });

  test("killed after the publication, before the region caught up: the batch is committed, not resubmitted", () => {
    setup(16);
    const ids = requests(3, 2);
    const a = queue();
    popAll(a);
    a.add(ids[2]!, 1);
    a.add(ids[0]!, 1);
    crashAt(a, "cleared", 1, false);
    expect(() => a.flush()).toThrow(Crash);
    expect(used()).toEqual([ids[2]!, ids[0]!]);
    const b = queue();
    expect(popAll(b)).toEqual([ids[1]!]);
    expect(b.position()).toEqual({ nextAvail: 6 | WRAP, nextUsed: 4 | WRAP });
  });

  for (const [size, seed] of [[8, 1], [16, 7], [5, 3], [64, 11], [3, 5]] as const) {
    test(`killed again and again at random steps (ring of ${size}, seed ${seed}): each request answered exactly once`, () => {
      const s = crashLoop(size, seed, 6000);
      expect(s.crashes).toBeGreaterThan(50);
      expect(s.resubmitted).toBeGreaterThan(10);
      expect(s.answered).toBeGreaterThan(300);
    });
  }
});

// ---- regions that do not add up ----

describe("packed inflight region: corrupt regions are refused", () => {
  const H = (dv: DataView) => ({
    set8: (o: number, v: number) => dv.setUint8(o, v),
    set16: (o: number, v: number) => dv.setUint16(o, v, true),
    e16: (e: number, f: number, v: number) => dv.setUint16(32 + 32 * e + f, v, true),
  });

  /** A region left by a backend with two chains in flight: A (2 descriptors), B (1). */
  function leave(): { A: number; B: number } {
    setup(8);
    const [A] = requests(1, 2);
    const [B] = requests(1, 1);
    popAll(queue());
    return { A: A!, B: B! };
  }

  const cases: [string, (h: ReturnType<typeof H>) => void, RegExp][] = [
    ["desc_num not the ring's", (h) => h.set16(10, 9), /ring of 9 descriptors, the ring has 8/],
    ["desc_num beyond the region", (h) => h.set16(10, 4000), /ring of 4000/],
    ["an unknown version", (h) => h.set16(8, 7), /version 7/],
    ["free_head out of range", (h) => (h.set16(12, 9), h.set16(14, 9)), /free list head 9/],
    ["used_idx out of range", (h) => (h.set16(16, 8), h.set16(18, 8)), /used index 8/],
    ["a free entry's next out of range", (h) => h.e16(3, 2, 200), /free list reaches entry 200/],
    ["a cycle in the free list", (h) => h.e16(7, 2, 3), /free list loops at entry 3/],
    ["a chain's next out of range", (h) => h.e16(0, 2, 77), /reaches entry 77/],
    ["a chain's last that is not its end", (h) => h.e16(0, 4, 5), /ends at entry 1, its head says 5/],
    ["a chain of 0 descriptors", (h) => h.e16(0, 6, 0), /of 0 descriptors/],
    ["a chain longer than the ring", (h) => h.e16(0, 6, 9), /of 9 descriptors/],
    ["a chain running into the free list", (h) => h.e16(0, 6, 4), /entry 3, which is free/],
    ["a chain running into another", (h) => h.e16(0, 6, 3), /ends at entry 2, its head says 1/],
    ["a chain looping onto itself", (h) => (h.e16(0, 6, 3), h.e16(1, 2, 0)), /runs into entry 0, which is already in a chain/],
    ["two chains with one buffer id", (h) => h.e16(2, 16, 0), /two chains in flight have buffer id 0/],
    ["a buffer id beyond the ring", (h) => h.e16(2, 16, 8), /buffer id 8/],
    ["a wrap counter that is not 0 or 1", (h) => h.set8(21, 2), /wrap counter/],
  ];
  for (const [name, corrupt, why] of cases) {
    test(`${name}: refused with a clear error; the ring is not started; nothing hangs`, () => {
      leave();
      const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      if (name === "desc_num beyond the region") {
        // A ring that claims more than the region holds is refused before the region is read.
        expect(() => new PackedVirtqueue(mem, { ...config(), size: 4000 })).toThrow();
        return;
      }
      corrupt(H(dv));
      expect(() => planPackedRecovery(region.queue(0)!, 8, () => 0)).toThrow(why);
      expect(() => planPackedRecovery(region.queue(0)!, 8, () => 0)).toThrow(InflightError);
      expect(() => checkRing(mem, config())).toThrow(why);
      expect(() => queue()).toThrow(why);
    });
  }

  test("a split-layout region is not used for a packed ring", () => {
    setup(8);
    const split = InflightRegion.allocate(1, 8, "split");
    try {
      expect(() => new PackedVirtqueue(mem, { ...config(), inflight: split.region.queue(0) })).toThrow(/split layout for a packed ring/);
    } finally {
      split.region.unmap();
      close(split.fd);
    }
  });

  test("a region whose every entry says in flight, its links a cycle, its free list empty: refused, no hang", () => {
    setup(8);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    dv.setUint16(8, 1, true);
    dv.setUint16(10, 8, true);
    dv.setUint16(12, 8, true);
    dv.setUint16(14, 8, true);
    for (let e = 0; e < 8; e++) {
      dv.setUint8(32 + 32 * e, 1);
      dv.setUint16(32 + 32 * e + 2, (e + 1) % 4, true); // next: cycles of 4
      dv.setUint16(32 + 32 * e + 6, 8, true); // num 8
      dv.setUint16(32 + 32 * e + 4, 7, true);
    }
    expect(() => queue()).toThrow(/runs into entry 0, which is already in a chain/);
  });
});

// ---- through the handler ----

describe("packed inflight region through the handler", () => {
  const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;

  test("GET_INFLIGHT_FD after a packed ring was acked gives a packed-layout region; a forged one makes the ring not start, the session goes on", async () => {
    const backend = new BackendUnderTest("echo", {}, ECHO);
    await backend.ready;
    const vmm = new Vmm(backend, ram);
    try {
      // RING_PACKED acked (QEMU sends SET_FEATURES before GET_INFLIGHT_FD).
      const { features } = vmm.handshake(vmm.conn.requestU64(Req.GET_FEATURES));
      expect(features & RING_PACKED).toBe(RING_PACKED);
      const r = vmm.conn.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 2, 128));
      expect(r.fds.length).toBe(1);
      const size = Number(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true));
      expect(size).toBe(2 * queueRegionSize(128, "packed"));
      expect(fstat(r.fds[0]!).size).toBe(size);
      close(r.fds[0]!);
      // A region whose queue 0 names a chain of 0 descriptors.
      setup(16);
      const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      dv.setUint16(8, 1, true);
      dv.setUint16(10, 16, true);
      dv.setUint16(12, 16, true);
      dv.setUint16(14, 16, true);
      dv.setUint8(32, 1);
      expect(vmm.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(region.size, 0, 1, 16), [regionFd])).toBe(0n);
      expect(vmm.conn.ack(Req.SET_MEM_TABLE, memTable([{ gpa: 0, size: ram.size, uaddr: ram.uaddr, offset: 0 }]), [ram.fd])).toBe(0n);
      startPackedQueue(vmm, pd);
      pd.addChain([{ gpa: ram.alloc(8), len: 8, write: true }]);
      await Bun.sleep(100);
      expect(pd.takeUsed()).toEqual([]); // not started
      expect(vmm.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n); // still serving
    } finally {
      vmm.dispose();
      await backend.stop();
    }
  });
});
