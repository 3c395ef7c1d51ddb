// The split virtqueue against hostile guests: every malformed chain is refused without touching
// memory outside the table, loops end, and notification suppression follows EVENT_IDX.
import { describe, test, expect, beforeEach, afterEach } from "bun:test";
import { GuestRam, DriverQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT } from "../support/frontend.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { SplitVirtqueue, SplitVirtqueue as Virtqueue } from "../../src/split_virtqueue.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import { drain } from "../../ffi/eventfd.ts";
import { setLogLevel } from "../../src/log.ts";
import { xorshift } from "../support/random.ts";
import { EventLoop } from "../../src/event_loop.ts";
import { NotifyCoalescer } from "../../src/notify_coalescer.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

let ram: GuestRam;
let mem: GuestMemory;
let dq: DriverQueue;

function queue(opts: { eventIdx?: boolean; indirect?: boolean; size?: number } = {}): Virtqueue {
  dq = new DriverQueue(ram, 0, opts.size ?? 16);
  return new SplitVirtqueue(mem, {
    index: 0, size: dq.size, descGpa: dq.desc, availGpa: dq.avail, usedGpa: dq.used,
    eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? true, nextAvail: 0,
    kickFd: dq.kick, callFd: dq.call, errFd: -1,
  });
}

beforeEach(() => {
  ram = new GuestRam(1 << 20);
  mem = new GuestMemory();
  mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
});

afterEach(() => {
  dq.dispose();
  ram.dispose();
});

describe("descriptor chains", () => {
  test("direct and indirect chains give readable then writable segments with host addresses", () => {
    const q = queue();
    const a = ram.alloc(5);
    ram.bytes(a, 5).set(Buffer.from("hello"));
    const b = ram.alloc(8);
    dq.addChain([{ gpa: a, len: 5 }, { gpa: b, len: 8, write: true }], { kick: false });
    dq.addChain([{ gpa: a, len: 5 }, { gpa: b, len: 8, write: true }], { indirect: true, kick: false });
    for (let i = 0; i < 2; i++) {
      const c = q.pop()!;
      expect(c.readableLen).toBe(5);
      expect(c.writableLen).toBe(8);
      expect(c.readable[0]!.addr).toBe(ram.host + a);
      const got = new Uint8Array(5);
      expect(new ChainReader(c).read(got)).toBe(5);
      expect(Buffer.from(got).toString()).toBe("hello");
      expect(new ChainWriter(c).write(Buffer.from("0123456789"))).toBe(8);
      q.add(c.head, 8);
    }
    expect(q.pop()).toBeNull();
    q.flush();
    expect(dq.takeUsed().map((u) => u.len)).toEqual([8, 8]);
    expect(Buffer.from(ram.bytes(b, 8)).toString()).toBe("01234567");
  });

  const bad: [string, (q: DriverQueue) => number][] = [
    ["a loop", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 1);
      d.writeDesc(d.desc, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0);
      return 0;
    }],
    ["next index out of the table", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 99);
      return 0;
    }],
    ["a buffer outside guest memory", (d) => {
      d.writeDesc(d.desc, 0, (1 << 20) - 2, 4, 0, 0);
      return 0;
    }],
    ["an address beyond 2^53", (d) => {
      d.writeDesc(d.desc, 0, 2 ** 60, 4, 0, 0);
      return 0;
    }],
    ["a readable buffer after a writable one", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
      d.writeDesc(d.desc, 1, 0x8000, 4, 0, 0);
      return 0;
    }],
    ["nested indirect tables", (d) => {
      const t = d.ram.alloc(32, 16);
      d.writeDesc(t, 0, t, 32, VIRTQ_DESC_F_INDIRECT, 0);
      d.writeDesc(d.desc, 0, t, 32, VIRTQ_DESC_F_INDIRECT, 0);
      return 0;
    }],
    ["an indirect table with a bad length", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT, 0);
      return 0;
    }],
    ["an indirect table larger than 1024 entries", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 16 * 1025, VIRTQ_DESC_F_INDIRECT, 0);
      return 0;
    }],
    ["an indirect descriptor with NEXT", (d) => {
      d.writeDesc(d.desc, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
      return 0;
    }],
    ["a loop inside an indirect table", (d) => {
      const t = d.ram.alloc(32, 16);
      d.writeDesc(t, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 1);
      d.writeDesc(t, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0);
      d.writeDesc(d.desc, 0, t, 32, VIRTQ_DESC_F_INDIRECT, 0);
      return 0;
    }],
  ];
  for (const [name, build] of bad) {
    test(`${name} is completed with length 0 and the next chain still works`, () => {
      const q = queue();
      dq.publish(build(dq), false);
      const good = ram.alloc(4);
      dq.writeDesc(dq.desc, 5, good, 4, 0, 0);
      dq.publish(5, false);
      const c = q.pop()!;
      expect(c.head).toBe(5);
      q.add(c.head, 0);
      q.flush();
      expect(dq.takeUsed()).toEqual([{ id: 0, len: 0 }, { id: 5, len: 0 }]);
      expect(q.errors).toBe(1);
    });
  }

  test("a head popped again (after its completion) gives a chain of exactly its new buffers, in the same object", () => {
    // The ring reuses one chain object per head (no allocation per request): what a reuse keeps
    // must never show through, whatever the earlier chains of that head held.
    const q = queue({ size: 8 });
    const r = xorshift(7);
    const objects = new Map<number, object>();
    let reused = 0;
    for (let round = 0; round < 40; round++) {
      const nr = 1 + r(3);
      const nw = r(3);
      const bufs: { gpa: number; len: number; write?: boolean }[] = [];
      for (let i = 0; i < nr + nw; i++) {
        const len = 1 + r(300);
        bufs.push({ gpa: ram.alloc(len), len, write: i >= nr });
      }
      dq.addChain(bufs, { indirect: r(2) === 1, kick: false });
      const c = q.pop()!;
      expect(c.readable.map((g) => [g.addr, g.len])).toEqual(bufs.slice(0, nr).map((b) => [ram.host + b.gpa, b.len]));
      expect(c.writable.map((g) => [g.addr, g.len])).toEqual(bufs.slice(nr).map((b) => [ram.host + b.gpa, b.len]));
      expect(c.readableLen).toBe(bufs.slice(0, nr).reduce((a, b) => a + b.len, 0));
      expect(c.writableLen).toBe(bufs.slice(nr).reduce((a, b) => a + b.len, 0));
      for (const g of [...c.readable, ...c.writable]) expect(g.offset).toBe(g.addr - ram.host);
      if (objects.get(c.head) === c) reused++;
      objects.set(c.head, c);
      q.add(c.head, 0);
      q.flush();
      for (const u of dq.takeUsed()) dq.recycle(u.id);
    }
    expect(reused).toBeGreaterThan(30);
  });

  test("indirect tables that are not 4-byte aligned are read right, whatever their size, and aligned ones after them", () => {
    const q = queue();
    const data = ram.alloc(4096);
    ram.bytes(data, 4096).forEach((_, i, a) => (a[i] = i & 0xff));
    const chains = [
      { misalign: 2, parts: [7, 9, 300] },
      { misalign: 6, parts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }, // larger than the first: the copy grows
      { misalign: 1, parts: [16] },
      { misalign: 0, parts: [40, 24] },
    ];
    for (const c of chains) {
      let off = 0;
      const bufs = c.parts.map((len, i) => {
        const b = { gpa: data + off, len, write: i === c.parts.length - 1 };
        off += len;
        return b;
      });
      dq.addChain(bufs, { indirect: true, kick: false, misalign: c.misalign });
    }
    for (const c of chains) {
      const chain = q.pop()!;
      expect(chain.readable.map((s) => s.len)).toEqual(c.parts.slice(0, -1));
      expect(chain.writable.map((s) => s.len)).toEqual(c.parts.slice(-1));
      const want = c.parts.slice(0, -1).reduce((a, b) => a + b, 0);
      const got = new Uint8Array(want);
      expect(new ChainReader(chain).read(got)).toBe(want);
      expect([...got]).toEqual(Array.from({ length: want }, (_, i) => i & 0xff));
      q.add(chain.head, 0);
    }
    expect(q.errors).toBe(0);
  });

  test("an indirect table may be longer than a small ring (Linux sizes it by seg_max)", () => {
    const q = queue({ size: 4 });
    const bufs = Array.from({ length: 10 }, () => ({ gpa: ram.alloc(512), len: 512 }));
    dq.addChain(bufs, { indirect: true, kick: false });
    const c = q.pop()!;
    expect(c.readable.length).toBe(10);
    expect(c.readableLen).toBe(5120);
  });

  test("indirect descriptors are refused when INDIRECT_DESC was not negotiated", () => {
    const q = queue({ indirect: false });
    dq.addChain([{ gpa: 0x8000, len: 4 }], { indirect: true, kick: false });
    expect(q.pop()).toBeNull();
    q.flush();
    expect(dq.takeUsed()).toEqual([{ id: 0, len: 0 }]);
  });

  test("a head index beyond the queue is skipped, not completed", () => {
    const q = queue();
    dq.publish(40, false);
    expect(q.pop()).toBeNull();
    q.flush();
    expect(dq.takeUsed()).toEqual([]);
    expect(q.errors).toBe(1);
  });

  test("an available index that jumps past the queue size breaks the ring", () => {
    const q = queue();
    Atomics.store(ram.u16, (dq.avail >> 1) + 1, 1000);
    expect(q.pop()).toBeNull();
    expect(q.broken).toBe(true);
  });

  test("rings outside guest memory or misaligned are refused at start", () => {
    dq = new DriverQueue(ram, 0, 16);
    const base = { index: 0, size: 16, eventIdx: false, indirect: true, nextAvail: 0, kickFd: -1, callFd: -1, errFd: -1 };
    expect(() => new SplitVirtqueue(mem, { ...base, descGpa: (1 << 20) - 64, availGpa: dq.avail, usedGpa: dq.used })).toThrow(/outside/);
    expect(() => new SplitVirtqueue(mem, { ...base, descGpa: dq.desc + 8, availGpa: dq.avail, usedGpa: dq.used })).toThrow(/aligned/);
    expect(() => new SplitVirtqueue(mem, { ...base, size: 12, descGpa: dq.desc, availGpa: dq.avail, usedGpa: dq.used })).toThrow(/power of 2/);
  });
});

describe("notifications", () => {
  test("without EVENT_IDX: NO_INTERRUPT suppresses calls, NO_NOTIFY is set while processing", () => {
    const q = queue();
    dq.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    q.disableNotification();
    expect(ram.u16[dq.used >> 1]).toBe(1);
    const c = q.pop()!;
    q.add(c.head, 0);
    q.flush();
    expect(drain(dq.call)).toBe(1);
    expect(q.enableNotification()).toBe(false);
    expect(ram.u16[dq.used >> 1]).toBe(0);
    ram.u16[dq.avail >> 1] = 1; // VIRTQ_AVAIL_F_NO_INTERRUPT
    dq.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(dq.call)).toBe(0);
  });

  test("with EVENT_IDX: calls only when used_event is crossed; avail_event tracks our position", () => {
    const q = queue({ eventIdx: true });
    const complete = () => {
      const c = q.pop()!;
      q.add(c.head, 0);
      q.flush();
    };
    dq.setUsedEvent(0);
    for (let i = 0; i < 4; i++) dq.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    complete(); // first completion always notifies
    expect(drain(dq.call)).toBe(1);
    dq.setUsedEvent(2); // driver wants a call once used idx passes 2
    complete(); // used idx 2: event 2 not yet crossed
    expect(drain(dq.call)).toBe(0);
    complete(); // used idx 3: crossed
    expect(drain(dq.call)).toBe(1);
    expect(q.enableNotification()).toBe(true); // one chain still pending
    expect(dq.availEvent()).toBe(3);
    complete();
    expect(q.enableNotification()).toBe(false);
    expect(dq.availEvent()).toBe(4);
  });
});

describe("notification coalescing", () => {
  function busyQueue(outstanding: number) {
    const q = queue({ eventIdx: true });
    for (let i = 0; i < outstanding; i++) dq.addChain([{ gpa: 0x8000, len: 4 }], { kick: false });
    dq.setUsedEvent(0); // the driver wants a call at the next used entry
    return q;
  }

  test("a driver waiting on few requests is notified at once", () => {
    const loop = new EventLoop();
    const q = busyQueue(2);
    const c = new NotifyCoalescer(loop, q, 1000);
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(dq.call)).toBe(1);
    c.dispose();
    loop.dispose();
  });

  test("a busy driver's notification waits for the window, then comes once", () => {
    const loop = new EventLoop();
    const q = busyQueue(10);
    const c = new NotifyCoalescer(loop, q, 200);
    for (let i = 0; i < 3; i++) {
      q.add(q.pop()!.head, 0);
      q.flush();
    }
    expect(drain(dq.call)).toBe(0);
    let calls = 0;
    for (let i = 0; i < 50 && calls === 0; i++) {
      loop.runOnce(10);
      calls += drain(dq.call);
    }
    expect(calls).toBe(1);
    expect(dq.takeUsed().length).toBe(3);
    c.dispose();
    loop.dispose();
  });

  test("stopping sends a held notification", () => {
    const loop = new EventLoop();
    const q = busyQueue(10);
    const c = new NotifyCoalescer(loop, q, 1_000_000);
    q.add(q.pop()!.head, 0);
    q.flush();
    expect(drain(dq.call)).toBe(0);
    c.dispose();
    expect(drain(dq.call)).toBe(1);
    loop.dispose();
  });
});
