// src/shared_record.ts: fields declared once and read/written by name, no torn multi-byte reads,
// counters from any thread, and a change that reaches a queue thread sitting in its event loop.
import { describe, test, expect } from "bun:test";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SharedRecord, i32, bool, bytes, counters } from "../../src/shared_record.ts";
import { EventLoop } from "../../src/event_loop.ts";

const SCHEMA = { mtu: i32, big: bool, mac: bytes(6), stats: counters(4), stop: bool };

describe("SharedRecord", () => {
  test("fields by name, zero at first; bytes copied out and zero-padded; counters add", () => {
    const r = SharedRecord.create(SCHEMA);
    expect([r.get("mtu"), r.get("big"), Array.from(r.get("mac"))]).toEqual([0, false, [0, 0, 0, 0, 0, 0]]);
    const v0 = r.version;
    r.set("mtu", 9000);
    r.set("big", true);
    r.set("mac", Uint8Array.of(2, 0, 0, 0, 0, 0x42));
    expect([r.get("mtu"), r.get("big"), Array.from(r.get("mac"))]).toEqual([9000, true, [2, 0, 0, 0, 0, 0x42]]);
    expect(r.version).toBe(v0 + 6); // two steps per change, even between changes
    r.set("mac", Uint8Array.of(7));
    expect(Array.from(r.get("mac"))).toEqual([7, 0, 0, 0, 0, 0]);
    const copy = r.get("mac");
    copy[0] = 99;
    expect(r.get("mac")[0]).toBe(7);
    r.count("stats", 2);
    r.count("stats", 2, 5);
    r.count("stats", 9); // out of range: ignored
    expect([r.counter("stats", 2), r.counter("stats", 0), r.counter("stats", 9)]).toEqual([6, 0, 0]);
    const view = r.countersView("stats");
    expect(view.length).toBe(4);
    Atomics.add(view, 3, 2);
    expect(r.counter("stats", 3)).toBe(2);
    // Another view of the same buffer sees it all.
    const other = SharedRecord.attach(SCHEMA, r.shared);
    expect([other.get("mtu"), other.counter("stats", 2)]).toEqual([9000, 6]);
    r.update((w) => {
      w("mtu", 1500);
      w("big", false);
      expect(r.get("mtu")).toBe(1500); // the writer reads its own writes
    });
    expect([other.get("mtu"), other.get("big")]).toEqual([1500, false]);
    expect(() => r.set("mtu", 1.5)).toThrow(/integer/);
    expect(() => r.set("mac", new Uint8Array(7))).toThrow(/at most 6 bytes/);
    expect(() => SharedRecord.attach({ mtu: i32 }, r.shared)).toThrow(/schema needs/);
    r.dispose();
  });

  test("a subscriber on the same thread is called once per turn of changes; unsubscribed, never again; slots run out loudly", () => {
    const r = SharedRecord.create(SCHEMA, 1);
    const loop = new EventLoop();
    try {
      let calls = 0;
      const off = r.subscribe(loop, () => calls++);
      expect(() => r.subscribe(loop, () => {})).toThrow(/all 1 subscriber slots are taken/);
      loop.runOnce(0);
      expect(calls).toBe(0);
      r.set("mtu", 1);
      r.set("mtu", 2);
      loop.runOnce(100);
      expect(calls).toBe(1);
      loop.runOnce(0);
      expect(calls).toBe(1);
      off();
      r.set("mtu", 3);
      loop.runOnce(0);
      expect(calls).toBe(1);
      // The slot is free again, and its stale wake-up does not reach the next subscriber.
      let later = 0;
      r.subscribe(loop, () => later++);
      loop.runOnce(0);
      expect(later).toBe(0);
    } finally {
      loop.dispose();
      r.dispose();
    }
  });

  test("a change reaches a running queue thread: woken in epoll_wait, it reads the new values, never a torn MAC", async () => {
    const dir = mkdtempSync(join(tmpdir(), "shared-record-"));
    const src = join(import.meta.dir, "../../src");
    const file = join(dir, "thread.ts");
    writeFileSync(file, `
      import { SharedRecord, i32, bool, bytes, counters } from "${src}/shared_record.ts";
      import { EventLoop } from "${src}/event_loop.ts";
      const SCHEMA = { mtu: i32, big: bool, mac: bytes(6), stats: counters(4), stop: bool };
      self.onmessage = (ev) => {
        const r = SharedRecord.attach(SCHEMA, ev.data);
        const loop = new EventLoop();
        r.subscribe(loop, () => {
          const mac = r.get("mac");
          if (mac.some((b) => b !== mac[0])) postMessage({ torn: Array.from(mac) });
          r.count("stats", 0);
          postMessage({ mtu: r.get("mtu"), big: r.get("big"), mac: mac[0] });
          if (r.get("stop")) loop.stop();
        });
        postMessage({ ready: true });
        loop.run();
      };
    `);
    const r = SharedRecord.create(SCHEMA, 2);
    const worker = new Worker(file);
    const seen: Record<string, unknown>[] = [];
    let wake: () => void = () => {};
    worker.onmessage = (ev) => {
      seen.push(ev.data);
      wake();
    };
    const next = async (pred: (m: Record<string, unknown>) => boolean) => {
      const end = Date.now() + 5000;
      for (;;) {
        const m = seen.find(pred);
        if (m !== undefined) return m;
        if (Date.now() > end) throw new Error(`no such message; seen ${JSON.stringify(seen.slice(-3))}`);
        await new Promise<void>((res) => {
          wake = res;
          setTimeout(res, 50);
        });
      }
    };
    try {
      worker.postMessage(r.shared);
      await next((m) => m.ready === true);
      await Bun.sleep(50); // the thread is now blocked in epoll_wait
      r.update((w) => {
        w("mtu", 9000);
        w("big", true);
      });
      expect(await next((m) => m.mtu === 9000)).toEqual({ mtu: 9000, big: true, mac: 0 });
      // Many MAC changes while the thread reads: each read is one whole MAC.
      for (let i = 1; i <= 200; i++) r.set("mac", new Uint8Array(6).fill(i));
      r.set("mtu", 1500);
      await next((m) => m.mtu === 1500 && m.mac === 200);
      expect(seen.filter((m) => "torn" in m)).toEqual([]);
      expect(r.counter("stats", 0)).toBeGreaterThanOrEqual(2); // counted from the thread
      r.set("stop", true);
      await next((m) => m.mtu === 1500 && m.mac === 200 && seen.length > 0);
    } finally {
      worker.terminate();
      r.dispose();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
