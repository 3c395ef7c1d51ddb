// The reshaped core: ring bookkeeping (rewind, in-flight tracking), chain cursors, loop timers and
// per-direction watches, the per-turn budget, and queue threads (a runner shared by two queues,
// features reaching the thread, the ring position it hands back).
import { describe, test, expect, beforeEach, afterEach, spyOn } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GuestRam, DriverQueue, BackendUnderTest, Vmm, Req, u64, vringState, VIRTQ_DESC_F_NEXT } from "../support/frontend.ts";
import { GuestMemory, MemoryRegion } from "../../src/memory.ts";
import { SplitVirtqueue, SplitVirtqueue as Virtqueue } from "../../src/split_virtqueue.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import { EventLoop, nowUs, TURNS_PER_YIELD } from "../../src/event_loop.ts";
import { WatchedQueue, processQueue, TURN_BUDGET_CHAINS } from "../../src/queue_serving.ts";
import { COMMON_FEATURES, VIRTIO_F_EVENT_IDX } from "../../src/device.ts";
import { F_PROTOCOL_FEATURES } from "../../src/protocol/constants.ts";
import { IovecArray, pipe, read, write, readv, writev, setNonBlocking } from "../../ffi/io.ts";
import { socketPair } from "../../ffi/socket.ts";
import { eventfd, signal, drain } from "../../ffi/eventfd.ts";
import { EPOLLHUP, EPOLLIN } from "../../ffi/epoll.ts";
import { close } from "../../ffi/libc.ts";
import { setLogLevel } from "../../src/log.ts";
import {
  PAIR_FD_OPENS, PAIR_FD_CLOSES, PAIR_RUNNERS, PAIR_RUNNER_THREAD, PAIR_DEVICE_THREAD, PAIR_STARTS, PAIR_WORDS,
  pairFeatLo, pairFeatHi, pairEventIdx,
} from "../support/pair_device.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");

// ---- an in-process ring over guest RAM (as in virtqueue.test.ts) ----

let ram: GuestRam;
let mem: GuestMemory;
let dq: DriverQueue | undefined;

function queue(size = 16): Virtqueue {
  dq?.dispose();
  dq = new DriverQueue(ram, 0, size);
  return new SplitVirtqueue(mem, {
    index: 0, size: dq.size, descGpa: dq.desc, availGpa: dq.avail, usedGpa: dq.used,
    eventIdx: false, indirect: true, nextAvail: 0, kickFd: dq.kick, callFd: dq.call, errFd: -1,
  });
}

/** Makes a one-buffer readable chain available (no kick); returns its head. */
function oneChain(d: DriverQueue, len = 4): number {
  return d.addChain([{ gpa: ram.alloc(len), len }], { kick: false });
}

function ringSetup(): void {
  ram = new GuestRam(4 << 20);
  mem = new GuestMemory();
  mem.add(MemoryRegion.borrow({ gpa: 0, size: ram.size, uaddr: ram.uaddr, mmapOffset: 0 }, ram.host));
}

function ringTeardown(): void {
  dq?.dispose();
  dq = undefined;
  ram.dispose();
}

describe("ring bookkeeping", () => {
  beforeEach(ringSetup);
  afterEach(ringTeardown);

  test("rewind(n) gives back the last n pops, which come back in order; inFlight follows", () => {
    const q = queue();
    const heads = [oneChain(dq!), oneChain(dq!), oneChain(dq!)];
    const popped = [q.pop()!, q.pop()!, q.pop()!].map((c) => c.head);
    expect(popped).toEqual(heads);
    expect(q.inFlight).toBe(3);
    expect(q.position().nextAvail).toBe(3);

    q.rewind(2);
    expect(q.inFlight).toBe(1);
    expect(q.position().nextAvail).toBe(1);
    expect(q.pending()).toBe(2);
    expect(q.pop()!.head).toBe(heads[1]!);
    expect(q.pop()!.head).toBe(heads[2]!);
    expect(q.pop()).toBeNull();
    expect(q.inFlight).toBe(3);

    // The rewound chains were never completed: only real completions reach the used ring.
    q.add(heads[0]!, 0);
    q.add(heads[1]!, 0);
    q.add(heads[2]!, 0);
    q.flush();
    expect(q.inFlight).toBe(0);
    expect(dq!.takeUsed().map((u) => u.id)).toEqual(heads);
  });

  test("rewind of more than the chains popped and not completed throws", () => {
    const q = queue();
    oneChain(dq!);
    oneChain(dq!);
    q.pop();
    q.pop();
    expect(() => q.rewind(3)).toThrow(/not in flight/);

    // The last pop completed: it cannot be rewound.
    const q2 = queue();
    oneChain(dq!);
    const h = oneChain(dq!);
    q2.pop();
    q2.pop();
    q2.add(h, 0);
    expect(() => q2.rewind(1)).toThrow(/not in flight/);
    expect(q2.inFlight).toBe(1);
  });

  test("a completion is accepted once: a second add, or an add of a never-popped head, throws", () => {
    const q = queue();
    const h = oneChain(dq!);
    const other = oneChain(dq!);
    expect(q.pop()!.head).toBe(h);
    q.add(h, 7);
    expect(() => q.add(h, 7)).toThrow(/not in flight/);
    expect(() => q.add(other, 0)).toThrow(/not in flight/); // available, but never popped
    expect(() => q.add(999, 0)).toThrow(/not in flight/); // beyond the table
    expect(q.inFlight).toBe(0);
    q.flush();
    expect(dq!.usedIdx()).toBe(1);
    expect(dq!.takeUsed()).toEqual([{ id: h, len: 7 }]);
    expect(q.position().nextUsed).toBe(1);
  });

  test("a head the guest makes available again while it is in flight is skipped, not completed twice", () => {
    const q = queue();
    const h = oneChain(dq!);
    const c = q.pop()!;
    expect(c.head).toBe(h);
    dq!.publish(h, false); // the driver offers the same head again
    expect(q.pop()).toBeNull();
    expect(q.errors).toBe(1);
    expect(q.inFlight).toBe(1);
    expect(q.position().nextAvail).toBe(2); // the bad entry is consumed, not retried
    q.add(h, 3);
    expect(() => q.add(h, 3)).toThrow();
    q.flush();
    expect(dq!.takeUsed()).toEqual([{ id: h, len: 3 }]);

    // Once completed, the head may be offered again and is served normally.
    dq!.publish(h, false);
    expect(q.pop()!.head).toBe(h);
    expect(q.errors).toBe(1);
  });

  // BUG (src/virtqueue.ts rewind): rewind(n) walks back n *avail slots*, not the n last *pops*.
  // When pop() skipped an entry in between (a head beyond the table, a head already in flight, a
  // malformed chain it completed with length 0), poppedHead[] at the skipped slot is stale (here
  // the initial 0), so rewind(2) "rewinds" whatever head that stale word names. Below, the two
  // last pops are heads 0 and 1 with a bogus head 99 between them; rewind(2) clears head 0's
  // in-flight mark but leaves nextAvail at the bogus slot, so head 0 is never popped again: the
  // guest's buffer is lost (and the bogus entry is counted twice). With a malformed chain in
  // between, rewind(2) throws instead, after having rewound the first chain.
  test("rewind(n) across an entry pop() skipped gives back the chains it popped", () => {
    const q = queue();
    const h0 = oneChain(dq!);
    dq!.publish(99, false); // beyond the queue size: skipped by pop
    const h1 = oneChain(dq!);
    expect(q.pop()!.head).toBe(h0);
    expect(q.pop()!.head).toBe(h1); // skipped slot 1 on the way
    expect(q.errors).toBe(1);
    q.rewind(2); // the device gives back both chains it holds
    expect(q.inFlight).toBe(0);
    const again: number[] = [];
    for (let c = q.pop(); c !== null; c = q.pop()) again.push(c.head);
    expect(again).toEqual([h0, h1]); // actual: [h1] — head 0 is lost
  });

  test("rewind(n) across a malformed chain pop() completed does not throw", () => {
    const q = queue();
    const h0 = oneChain(dq!);
    dq!.writeDesc(dq!.desc, 9, 0x8000, 4, VIRTQ_DESC_F_NEXT, 99); // next outside the table
    dq!.publish(9, false);
    const h1 = oneChain(dq!);
    expect(q.pop()!.head).toBe(h0);
    expect(q.pop()!.head).toBe(h1); // head 9 completed with length 0 on the way
    expect(() => q.rewind(2)).not.toThrow(); // actual: throws "chain at slot 1 is not in flight"
  });
});

// ---- chain cursors ----

describe("chain reader and writer", () => {
  beforeEach(ringSetup);
  afterEach(ringTeardown);

  /** A chain of readable buffers holding `parts` and writable buffers of `wlens` bytes. */
  function chainOf(q: Virtqueue, parts: string[], wlens: number[]) {
    const rbufs = parts.map((p) => {
      const gpa = ram.alloc(p.length);
      ram.bytes(gpa, p.length).set(Buffer.from(p));
      return { gpa, len: p.length };
    });
    const wbufs = wlens.map((len) => ({ gpa: ram.alloc(len), len, write: true }));
    dq!.addChain([...rbufs, ...wbufs], { kick: false });
    const c = q.pop()!;
    return { chain: c, wbufs };
  }

  test("a header split across descriptors reads whole; skip and read continue across the boundary", () => {
    const q = queue();
    // A 12-byte header "HEADER-12345" over 3 + 5 + 4 bytes, then payload "abcdef".
    const { chain } = chainOf(q, ["HEA", "DER-1", "2345abc", "def"], []);
    const r = new ChainReader(chain);
    expect(r.remaining).toBe(18);
    const hdr = new Uint8Array(12);
    expect(r.read(hdr)).toBe(12);
    expect(Buffer.from(hdr).toString()).toBe("HEADER-12345");
    expect(r.skip(2)).toBe(2); // "ab"
    const rest = new Uint8Array(10);
    expect(r.read(rest)).toBe(4);
    expect(Buffer.from(rest.subarray(0, 4)).toString()).toBe("cdef");
    expect(r.remaining).toBe(0);
    expect(r.skip(5)).toBe(0);
    expect(r.read(rest)).toBe(0);
  });

  test("peekByte reads ahead of the cursor across descriptors without moving it; -1 outside what remains", () => {
    const q = queue();
    const { chain } = chainOf(q, ["HE", "A", "DER"], []);
    const r = new ChainReader(chain);
    expect([0, 1, 2, 3, 4, 5].map((i) => String.fromCharCode(r.peekByte(i))).join("")).toBe("HEADER");
    expect(r.peekByte(6)).toBe(-1);
    expect(r.peekByte(-1)).toBe(-1);
    expect(r.pos).toBe(0);
    r.skip(3);
    expect(String.fromCharCode(r.peekByte(0))).toBe("D");
    expect(r.peekByte(3)).toBe(-1);
  });

  test("reader iovecs point into guest memory: writev through a pipe carries the guest's bytes", () => {
    const q = queue();
    const { chain } = chainOf(q, ["xx012", "3456789", "ABCDEF"], []);
    const r = new ChainReader(chain);
    r.skip(2);
    const iov = new IovecArray(8);
    expect(r.iovecs(iov, 12)).toBe(true);
    expect(iov.count).toBe(3); // 3 bytes of the first buffer, all of the second, 2 of the third
    expect(r.pos).toBe(14);
    // Guest memory is what the iovecs name: change it after building them.
    ram.bytes(chain.readable[1]!.offset, 1)[0] = "#".charCodeAt(0);
    const [rd, wr] = pipe();
    try {
      expect(writev(wr, iov)).toBe(12);
      const got = new Uint8Array(64);
      expect(read(rd, got, 64)).toBe(12);
      expect(Buffer.from(got.subarray(0, 12)).toString()).toBe("012#456789AB");
    } finally {
      close(rd);
      close(wr);
    }
    // Asking for more than remains, or more segments than the array holds: refused, nothing moves.
    expect(r.iovecs(iov, 5)).toBe(false);
    expect(iov.count).toBe(3);
    expect(r.pos).toBe(14);
    const r2 = new ChainReader(chain);
    const small = new IovecArray(2);
    small.push(0x1000, 1);
    expect(r2.iovecs(small, 10)).toBe(false); // needs 2 more entries, 1 free
    expect(small.count).toBe(1);
    expect(r2.pos).toBe(0);
  });

  test("writer iovecs: readv from a pipe lands in the guest's writable buffers; written counts", () => {
    const q = queue();
    const { chain, wbufs } = chainOf(q, ["req"], [4, 1, 6]);
    const w = new ChainWriter(chain);
    expect(w.write(Buffer.from("hi"))).toBe(2);
    expect(w.written).toBe(2);
    const iov = new IovecArray(8);
    expect(w.iovecs(iov, 7)).toBe(true);
    expect(iov.count).toBe(3);
    expect(w.written).toBe(9);
    const [rd, wr] = pipe();
    try {
      expect(write(wr, Buffer.from("PIPEDAT"), 7)).toBe(7);
      expect(readv(rd, iov)).toBe(7);
    } finally {
      close(rd);
      close(wr);
    }
    const guest = wbufs.map((b) => Buffer.from(ram.bytes(b.gpa, b.len)).toString("latin1")).join("");
    expect(guest.slice(0, 9)).toBe("hiPIPEDAT");
    expect(w.write(Buffer.from("0123456789"))).toBe(2);
    expect(w.written).toBe(11);
    expect(w.remaining).toBe(0);
  });

  test("splitAt keeps a trailer off the data: a 1-byte last descriptor for a status", () => {
    const q = queue();
    const { chain, wbufs } = chainOf(q, ["hdr"], [8, 1]);
    const w = new ChainWriter(chain);
    const status = new ChainWriter();
    expect(w.splitAt(w.remaining - 1, status)).toBe(true);
    expect(w.remaining).toBe(8);
    expect(status.remaining).toBe(1);
    expect(w.write(Buffer.from("0123456789"))).toBe(8); // data cannot run into the status
    expect(status.writeByte(0x5a)).toBe(1);
    expect(status.writeByte(0x5b)).toBe(0); // one byte only
    expect(w.written).toBe(8);
    expect(Buffer.from(ram.bytes(wbufs[0]!.gpa, 8)).toString()).toBe("01234567");
    expect(ram.bytes(wbufs[1]!.gpa, 1)[0]).toBe(0x5a);
  });

  test("splitAt keeps a trailer off the data: status sharing a descriptor with data", () => {
    const q = queue();
    const { chain, wbufs } = chainOf(q, ["hdr"], [4, 9]);
    const guest = ram.bytes(wbufs[1]!.gpa, 10);
    guest[9] = 0xee; // the byte after the buffer must stay untouched
    const w = new ChainWriter(chain);
    const status = new ChainWriter();
    expect(w.splitAt(12, status)).toBe(true);
    const iov = new IovecArray(4);
    expect(w.iovecs(iov, 13)).toBe(false); // the status byte is not data
    expect(w.iovecs(iov, 12)).toBe(true);
    expect(iov.count).toBe(2);
    expect(w.written).toBe(12);
    status.writeByte(3);
    expect(guest[8]).toBe(3);
    expect(guest[9]).toBe(0xee);
  });

  test("splitAt is false (nothing changed) past the writable bytes left; writeByte on nothing writes nothing", () => {
    const q = queue();
    const { chain } = chainOf(q, ["only readable"], []);
    const w = new ChainWriter(chain);
    const status = new ChainWriter();
    expect(w.splitAt(-1, status)).toBe(false);
    expect(w.splitAt(1, status)).toBe(false);
    expect(w.writeByte(0)).toBe(0);
    expect(w.written).toBe(0);
    // All the writable bytes used up already: nothing left to split off either.
    const { chain: c2 } = chainOf(q, ["r"], [2]);
    const w2 = new ChainWriter(c2);
    expect(w2.write(Buffer.from("ab"))).toBe(2);
    expect(w2.splitAt(1, status)).toBe(false);
    expect(w2.splitAt(0, status)).toBe(true);
    expect(status.remaining).toBe(0);
  });
});

// ---- the event loop ----

describe("event loop", () => {
  let loop: EventLoop;
  beforeEach(() => {
    loop = new EventLoop();
  });
  afterEach(() => {
    loop.dispose();
  });

  function runUntil(done: () => boolean, ms = 1000): void {
    const limit = Date.now() + ms;
    while (!done() && Date.now() < limit) loop.runOnce(20);
  }

  test("an fd closed and watched anew (same number) by a handler earlier in the batch does not get the old fd's readiness", () => {
    const a = eventfd();
    let b = eventfd();
    const seen: string[] = [];
    loop.add(a, EPOLLIN, () => {
      drain(a);
      seen.push("a");
      // What a reconnect does: the old fd goes, a new one (nothing to read yet) takes its number.
      loop.remove(b);
      close(b);
      const fresh = eventfd();
      expect(fresh).toBe(b);
      b = fresh;
      loop.add(b, EPOLLIN, () => seen.push("new b"));
    });
    loop.add(b, EPOLLIN, () => seen.push("old b"));
    signal(a);
    signal(b); // ready after a: in the same batch, behind a's handler
    loop.runOnce(0);
    expect(seen).toEqual(["a"]);
    loop.runOnce(0);
    expect(seen).toEqual(["a"]); // the new b is not readable
    signal(b);
    loop.runOnce(0);
    expect(seen).toEqual(["a", "new b"]); // and it is watched
    loop.remove(a);
    loop.remove(b);
    close(a);
    close(b);
  });

  test("timers fire in deadline order, not before their deadline; cancelled ones never", () => {
    const fired: { name: string; late: number }[] = [];
    const make = (name: string, us: number) => {
      const deadline = nowUs() + us;
      return loop.timer(us, () => fired.push({ name, late: nowUs() - deadline }));
    };
    make("c", 30_000);
    make("a", 5_000);
    const x = make("x", 10_000);
    make("b", 15_000);
    const y = make("y", 25_000);
    x.cancel();
    y.cancel();
    y.cancel(); // idempotent
    runUntil(() => fired.length >= 3);
    loop.runOnce(40); // past y's and x's deadlines
    expect(fired.map((f) => f.name)).toEqual(["a", "b", "c"]);
    for (const f of fired) {
      expect(f.late).toBeGreaterThanOrEqual(0);
      expect(f.late).toBeLessThan(100_000);
    }
  });

  test("timers with equal deadlines fire in creation order (heap ties)", () => {
    const frozen = performance.now();
    const spy = spyOn(performance, "now").mockImplementation(() => frozen);
    const order: number[] = [];
    const delays = [3000, 1000, 3000, 2000, 1000, 3000, 2000, 1000, 3000, 1000, 2000, 3000];
    try {
      delays.forEach((d, i) => loop.timer(d, () => order.push(i)));
    } finally {
      spy.mockRestore();
    }
    runUntil(() => order.length === delays.length);
    const expected = delays.map((d, i) => ({ d, i })).sort((p, q) => p.d - q.d || p.i - q.i).map((p) => p.i);
    expect(order).toEqual(expected);
  });

  test("a cancelled earliest timer does not stop later ones; timers set in a callback fire", () => {
    const fired: string[] = [];
    const early = loop.timer(2_000, () => fired.push("early"));
    loop.timer(8_000, () => {
      fired.push("late");
      loop.timer(0, () => fired.push("from callback, 0"));
      loop.timer(5_000, () => fired.push("from callback, 5ms"));
      const t = loop.timer(1_000, () => fired.push("cancelled in callback"));
      t.cancel();
    });
    early.cancel(); // the timerfd is armed for it already
    runUntil(() => fired.length >= 3);
    loop.runOnce(10);
    expect(fired).toEqual(["late", "from callback, 0", "from callback, 5ms"]);
    // Cancel after firing is harmless.
    early.cancel();
  });

  test("one fd, two directions: separate handlers, setInterest toggles, both see a hang-up", () => {
    const [a, b] = socketPair();
    setNonBlocking(a);
    const seen: string[] = [];
    const hup: string[] = [];
    const buf = new Uint8Array(16);
    loop.watch(a, {
      readable: (ev) => {
        seen.push("r");
        if (ev & EPOLLHUP) hup.push("r");
        while (read(a, buf, 16) > 0) {
          /* drain */
        }
      },
      writable: (ev) => {
        seen.push("w");
        if (ev & EPOLLHUP) hup.push("w");
      },
    }, { readable: true, writable: true });
    try {
      loop.runOnce(0);
      expect(seen).toEqual(["w"]); // writable at once, nothing to read

      loop.setInterest(a, { readable: true, writable: false });
      seen.length = 0;
      loop.runOnce(0);
      expect(seen).toEqual([]);

      expect(write(b, Buffer.from("ping"), 4)).toBe(4);
      loop.runOnce(100);
      expect(seen).toEqual(["r"]);

      // Neither: data waits; readable again: it is delivered; both: both handlers.
      seen.length = 0;
      loop.setInterest(a, { readable: false, writable: false });
      write(b, Buffer.from("more"), 4);
      loop.runOnce(0);
      expect(seen).toEqual([]);
      loop.setInterest(a, { readable: true, writable: false });
      loop.runOnce(0);
      expect(seen).toEqual(["r"]);
      seen.length = 0;
      write(b, Buffer.from("x"), 1);
      loop.setInterest(a, { readable: true, writable: true });
      loop.runOnce(0);
      expect(seen.sort()).toEqual(["r", "w"]);

      // The peer goes away: the hang-up reaches both handlers, whatever the interest.
      loop.setInterest(a, { readable: false, writable: false });
      seen.length = 0;
      close(b);
      loop.runOnce(100);
      expect(hup.sort()).toEqual(["r", "w"]);
    } finally {
      loop.remove(a);
      close(a);
    }
  });

  // BUG (src/event_loop.ts runOnce): `carried` is swapped out only when it is non-empty, so in a
  // turn that began with no continuations `carried` IS this.nextTurnTasks, and a task a handler
  // schedules with nextTurn() during that turn is run by the `for (const fn of carried)` of the
  // same turn, before epoll is looked at again. A TurnBudget continuation then finds the budget
  // still spent, yields again into the array being iterated, and the thread spins forever: any
  // queue that spends its budget (256 chains, or 8 MiB of requests) hangs its thread. Fix:
  // `const carried = this.nextTurnTasks; this.nextTurnTasks = [];` unconditionally.
  test("nextTurn from a handler runs in the next turn, after the fds ready by then", () => {
    const fd = eventfd();
    const other = eventfd();
    const order: string[] = [];
    loop.add(fd, 1 /* EPOLLIN */, () => {
      drain(fd);
      order.push(`handler@${loop.turn}`);
      signal(other); // ready for the next turn: must be served before the continuation
      loop.nextTurn(() => {
        order.push(`continued@${loop.turn}`);
        loop.nextTurn(() => order.push(`again@${loop.turn}`));
      });
    });
    loop.add(other, 1, () => {
      drain(other);
      order.push(`other@${loop.turn}`);
    });
    try {
      signal(fd);
      const t = loop.turn;
      for (let i = 0; i < 4; i++) loop.runOnce(0);
      expect(order).toEqual([`handler@${t + 1}`, `other@${t + 2}`, `continued@${t + 2}`, `again@${t + 3}`]);
    } finally {
      loop.remove(fd);
      loop.remove(other);
      close(fd);
      close(other);
    }
  });

  describe("run(): yielding to Bun's event loop", () => {
    /** Runs `loop` with an fd that is always ready (a busy queue) while `body` runs; counts Bun loop turns. */
    async function busy(body: (stats: { bunTurns: number }) => Promise<void>): Promise<void> {
      const fd = eventfd();
      loop.add(fd, 1, () => signal(fd)); // never drained: ready at every turn
      signal(fd);
      const stats = { bunTurns: 0 };
      let counting = true;
      const tick = () => {
        stats.bunTurns++;
        if (counting) setImmediate(tick);
      };
      setImmediate(tick);
      loop.run();
      try {
        await body(stats);
      } finally {
        counting = false;
        loop.stop();
        await Bun.sleep(5);
        loop.remove(fd);
        close(fd);
      }
    }

    test("a busy loop runs many turns per turn of Bun's loop, not one", async () => {
      await busy(async (stats) => {
        const t0 = loop.turn;
        const b0 = stats.bunTurns;
        await Bun.sleep(100);
        const perYield = (loop.turn - t0) / Math.max(1, stats.bunTurns - b0);
        expect(perYield).toBeGreaterThan(TURNS_PER_YIELD / 2);
        expect(perYield).toBeLessThanOrEqual(TURNS_PER_YIELD + 1);
      });
    });

    test("a busy loop still lets Bun's timers run, and yields right after a wake (a posted message)", async () => {
      await busy(async () => {
        const fired = await Promise.race([Bun.sleep(5).then(() => true), Bun.sleep(1000).then(() => false)]);
        expect(fired).toBe(true);
        // After a wake the loop yields in that very turn: an immediate queued before the wake runs
        // within the next turn or two of ours, not TURNS_PER_YIELD turns later.
        const ran = await new Promise<number>((resolve) => {
          let at = -1;
          setImmediate(() => {
            loop.wake();
            at = loop.turn;
            setImmediate(() => resolve(loop.turn - at));
          });
        });
        expect(ran).toBeLessThanOrEqual(2);
      });
    });

    test("an idle loop blocks: a few turns in 150 ms of nothing, then the timer that ends them", async () => {
      const t0 = loop.turn;
      const turns = await new Promise<number>((resolve) => {
        loop.timer(150_000, () => resolve(loop.turn - t0));
        loop.run(); // blocks this thread until the timer: the test's own awaits cannot run meanwhile
      });
      loop.stop();
      await Bun.sleep(5);
      // At most: the bounded wait that ran out (the loop went idle), the blocking one the timer ended,
      // and slack for a wake; a loop polling every UNYIELDED_WAIT_MS would show 7 or more.
      expect(turns).toBeLessThanOrEqual(3);
    });
  });

  describe("turn budget", () => {
    beforeEach(ringSetup);
    afterEach(ringTeardown);

    test("a flooded queue yields after TURN_BUDGET_CHAINS; another fd is served between turns; all complete", () => {
      const total = 2 * TURN_BUDGET_CHAINS + 100;
      const q = queue(1024);
      const buf = ram.alloc(1);
      // Distinct heads (one head twice would be in flight twice), all over the same byte.
      for (let i = 0; i < total; i++) {
        dq!.writeDesc(dq!.desc, i, buf, 1, 0, 0);
        dq!.publish(i, false);
      }
      signal(dq!.kick);
      const other = eventfd();
      const log: string[] = [];
      const perTurn = new Map<number, number>();
      const usedAtTurnEnd: number[] = [];
      let handled = 0;
      loop.add(other, 1 /* EPOLLIN */, () => {
        drain(other);
        log.push(`other@${handled}`);
      });
      // Guard: a continuation run in the very turn it was scheduled in would re-yield forever
      // (the bug the nextTurn test below pins down); count it and drop it instead of hanging.
      let resumedSameTurn = 0;
      const nextTurn = loop.nextTurn.bind(loop);
      loop.nextTurn = (fn) => {
        const scheduledIn = loop.turn;
        nextTurn(() => {
          if (loop.turn === scheduledIn) {
            resumedSameTurn++;
            return;
          }
          fn();
        });
      };
      const watched: WatchedQueue = new WatchedQueue(loop, () => {
        processQueue(q, (chain) => {
          q.add(chain.head, 0);
          handled++;
          perTurn.set(loop.turn, (perTurn.get(loop.turn) ?? 0) + 1);
          if (handled === 10) signal(other); // becomes ready while the queue holds the thread
          return true;
        }, undefined, watched.budget);
      });
      try {
        watched.start(q);
        for (let i = 0; i < 20 && handled < total; i++) {
          loop.runOnce(0);
          usedAtTurnEnd.push(dq!.usedIdx());
        }
        expect(resumedSameTurn).toBe(0);
        expect(handled).toBe(total);
        expect(q.inFlight).toBe(0);
        expect(dq!.takeUsed().length).toBe(total);
        // Never more than the budget in one turn, so it took at least three turns.
        expect(Math.max(...perTurn.values())).toBe(TURN_BUDGET_CHAINS);
        expect(perTurn.size).toBeGreaterThanOrEqual(3);
        // Completions are published at each yield, not only at the end.
        expect(usedAtTurnEnd[0]).toBe(TURN_BUDGET_CHAINS);
        // The other fd got its turn right after the first budget ran out, before the queue went on.
        expect(log).toEqual([`other@${TURN_BUDGET_CHAINS}`]);
      } finally {
        watched.stop();
        loop.remove(other);
        close(other);
      }
    });
  });
});

// ---- queue threads through the front-end ----

const PAIR = new URL("../support/pair_device.ts", import.meta.url).href;

describe("queue threads: one runner, two queues, one host fd", () => {
  let dir: string;
  let fifo: string;
  let shared: Int32Array;
  let backend: BackendUnderTest;
  let vmm: Vmm;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), "vhu-core-"));
    fifo = join(dir, "loop.fifo");
    const mk = Bun.spawnSync(["mkfifo", fifo]);
    if (mk.exitCode !== 0) throw new Error("mkfifo failed");
    const sab = new SharedArrayBuffer(4 * PAIR_WORDS);
    shared = new Int32Array(sab);
    backend = new BackendUnderTest("pair", { path: fifo, sab }, PAIR);
    await backend.ready;
    ram = new GuestRam(8 << 20);
    vmm = new Vmm(backend, ram);
  });

  afterEach(async () => {
    vmm.dispose();
    await backend.stop();
    ram.dispose();
    rmSync(dir, { recursive: true, force: true });
  });

  const word = (i: number) => Atomics.load(shared, i);
  const featuresAt = (q: number) => (BigInt(word(pairFeatHi(q)) >>> 0) << 32n) | BigInt(word(pairFeatLo(q)) >>> 0);

  /** Posts a receive buffer on `rx`; returns its GPA. */
  function rxBuffer(rx: DriverQueue, len = 256): number {
    const gpa = ram.alloc(len);
    rx.addChain([{ gpa, len, write: true }]);
    return gpa;
  }

  /** Sends `text` on tx (split over two buffers) and waits for the tx completion. */
  async function send(tx: DriverQueue, text: string): Promise<void> {
    const half = Math.ceil(text.length / 2);
    const bufs = [text.slice(0, half), text.slice(half)].filter((s) => s.length > 0).map((s) => {
      const gpa = ram.alloc(s.length);
      ram.bytes(gpa, s.length).set(Buffer.from(s));
      return { gpa, len: s.length };
    });
    tx.addChain(bufs);
    await tx.waitUsed(1);
  }

  /** One message through the loop: tx → FIFO → rx; returns what the rx buffer got. */
  async function loopback(tx: DriverQueue, rx: DriverQueue, text: string): Promise<string> {
    const gpa = rxBuffer(rx);
    await send(tx, text);
    const [u] = await rx.waitUsed(1);
    return Buffer.from(ram.bytes(gpa, u!.len)).toString();
  }

  test("two queues on one queue thread share the runner and its one host fd (a loopback)", async () => {
    vmm.activate(2, 32);
    const [tx, rx] = vmm.queues as [DriverQueue, DriverQueue];
    for (let i = 0; i < 10; i++) expect(await loopback(tx, rx, `message ${i}`)).toBe(`message ${i}`);
    expect(word(PAIR_STARTS)).toBe(2);
    expect(word(PAIR_RUNNERS)).toBe(1);
    expect(word(PAIR_FD_OPENS)).toBe(1);
    // The runner lives in a queue thread, not in the device thread.
    expect(word(PAIR_DEVICE_THREAD)).toBeGreaterThan(0);
    expect(word(PAIR_RUNNER_THREAD)).toBeGreaterThan(0);
    expect(word(PAIR_RUNNER_THREAD)).not.toBe(word(PAIR_DEVICE_THREAD));

    // Data waiting in the fd while no receive buffer is posted arrives once one is.
    await send(tx, "buffered");
    await Bun.sleep(20);
    expect(rx.takeUsed()).toEqual([]);
    const gpa = rxBuffer(rx);
    const [u] = await rx.waitUsed(1);
    expect(Buffer.from(ram.bytes(gpa, u!.len)).toString()).toBe("buffered");

    // Restarting both rings keeps the thread, its runner and its fd.
    expect(vmm.stopAll()).toEqual([11, 11]);
    for (const q of vmm.queues) vmm.startQueue(q, 11);
    expect(await loopback(tx, rx, "after restart")).toBe("after restart");
    expect(word(PAIR_STARTS)).toBe(4);
    expect(word(PAIR_RUNNERS)).toBe(1);
    expect(word(PAIR_FD_OPENS)).toBe(1);
    expect(word(PAIR_FD_CLOSES)).toBe(0);
  });

  test("acked features reach runner.start in the queue thread, and renegotiated ones after a reset", async () => {
    const noEventIdx = COMMON_FEATURES & ~VIRTIO_F_EVENT_IDX;
    vmm.activate(2, 16, COMMON_FEATURES | F_PROTOCOL_FEATURES);
    let [tx, rx] = vmm.queues as [DriverQueue, DriverQueue];
    expect(await loopback(tx, rx, "with event idx")).toBe("with event idx");
    for (const q of [0, 1]) {
      expect(featuresAt(q)).toBe(COMMON_FEATURES); // PROTOCOL_FEATURES is the handler's, not passed on
      expect(word(pairEventIdx(q))).toBe(1);
    }

    // RESET_DEVICE, then a driver that does not take EVENT_IDX.
    expect(vmm.conn.ack(Req.RESET_DEVICE)).toBe(0n);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(noEventIdx | F_PROTOCOL_FEATURES))).toBe(0n);
    for (const q of vmm.queues) q.dispose();
    vmm.queues = [new DriverQueue(ram, 0, 16), new DriverQueue(ram, 1, 16)];
    for (const q of vmm.queues) vmm.startQueue(q);
    [tx, rx] = vmm.queues as [DriverQueue, DriverQueue];
    expect(await loopback(tx, rx, "without")).toBe("without");
    for (const q of [0, 1]) {
      expect(featuresAt(q)).toBe(noEventIdx);
      expect(word(pairEventIdx(q))).toBe(0);
    }

    // RESET_OWNER, a new owner, EVENT_IDX again (without PROTOCOL_FEATURES: rings born enabled).
    vmm.conn.send(Req.RESET_OWNER);
    vmm.conn.send(Req.SET_OWNER);
    expect(vmm.conn.ack(Req.SET_FEATURES, u64(COMMON_FEATURES))).toBe(0n);
    for (const q of vmm.queues) q.dispose();
    vmm.queues = [new DriverQueue(ram, 0, 16), new DriverQueue(ram, 1, 16)];
    for (const q of vmm.queues) vmm.startQueue(q);
    [tx, rx] = vmm.queues as [DriverQueue, DriverQueue];
    expect(await loopback(tx, rx, "again")).toBe("again");
    for (const q of [0, 1]) {
      expect(featuresAt(q)).toBe(COMMON_FEATURES);
      expect(word(pairEventIdx(q))).toBe(1);
    }
    // Still the one thread, runner and fd throughout.
    expect(word(PAIR_RUNNERS)).toBe(1);
    expect(word(PAIR_FD_OPENS)).toBe(1);
  });

  test("GET_VRING_BASE after a queue thread served the ring returns its next available index", async () => {
    vmm.activate(2, 16);
    const [tx, rx] = vmm.queues as [DriverQueue, DriverQueue];
    const bufs = [rxBuffer(rx), rxBuffer(rx), rxBuffer(rx)];
    for (const text of ["one", "two"]) {
      await send(tx, text);
      await rx.waitUsed(1);
    }
    expect(Buffer.from(ram.bytes(bufs[1]!, 3)).toString()).toBe("two");
    // tx took 2 chains; rx took 2 of its 3 buffers (the third had nothing to carry).
    const base = (i: number) => new DataView(vmm.conn.request(Req.GET_VRING_BASE, vringState(i, 0)).payload.buffer).getUint32(4, true);
    expect(base(0)).toBe(2);
    expect(base(1)).toBe(2);
    // Restarted there, the ring goes on: the next message fills the third buffer.
    vmm.startQueue(tx, 2);
    vmm.startQueue(rx, 2);
    await send(tx, "three");
    const [u] = await rx.waitUsed(1);
    expect(Buffer.from(ram.bytes(bufs[2]!, u!.len)).toString()).toBe("three");
    expect(vmm.stopAll()).toEqual([3, 3]);
  });
});
