// Files a front-end shares that are shorter than it claims (issue 16, items 1 and 2). Touching a
// mapped page past the end of its file raises SIGBUS, which kills the process: the dirty log
// (SET_LOG_BASE) and the inflight region (SET_INFLIGHT_FD) must be refused unless the fd's real
// size covers what is mapped. The backend runs in a subprocess (test/support/hostile.ts), so a
// SIGBUS kills it, not the test runner, and shows as its status.
import { describe, test, expect, afterEach } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  SpawnedBackend, GuestMemfd, GuestSpace, Ring, Bump, HostileFront, blkRequest, pattern,
  BLK_T_IN, BLK_T_OUT, BLK_S_OK, MiB, MFD_ALLOW_SEALING,
} from "../support/hostile.ts";
import { Req } from "../support/frontend.ts";
import { memfdCreate, MFD_CLOEXEC } from "../../ffi/mem.ts";
import { ftruncate } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";
import { inflightBytes } from "../../src/protocol/codec.ts";
import { queueRegionSize } from "../../src/inflight.ts";

const RING = 64;
const PAGE = 4096;

let cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* keep cleaning */
    }
  }
});
const later = (fn: () => void | Promise<void>) => cleanups.push(fn);

async function attemptAsync(fn: () => Promise<unknown>): Promise<string> {
  try {
    await fn();
    return "ok";
  } catch (e) {
    return (e as Error).message;
  }
}

/** A block backend in a subprocess and 256 MiB of (sparse) guest memory at GPA 0. */
async function blockRig(): Promise<{ b: SpawnedBackend; space: GuestSpace }> {
  const dir = mkdtempSync(join(tmpdir(), "vhu-audit-"));
  later(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, "disk.img");
  writeFileSync(image, "");
  truncateSync(image, 8 * MiB);
  const b = await SpawnedBackend.start("block", ["--file", image, "--num-queues", "1", "--queue-size", String(RING), "--threads", "0"]);
  later(() => b.kill());
  const mem = new GuestMemfd(256 * MiB, { sealing: true });
  later(() => mem.dispose());
  return { b, space: GuestSpace.of({ mem, gpa: 0 }) };
}

/** A session on `b`: every feature (LOG_ALL included), the memory table, ring 0 laid out (not started). */
function open(b: SpawnedBackend, space: GuestSpace): { f: HostileFront; q: Ring } {
  const f = new HostileFront(b.socketPath, 2000);
  later(() => f.close());
  f.handshake();
  if (f.setMemTable(space) !== 0n) throw new Error("SET_MEM_TABLE refused");
  const q = Ring.at(space, 0, RING, 0x10000);
  later(() => q.dispose());
  return { f, q };
}

/** A write then a read back of 4 KiB at sector `sector`, the read's buffer at `dataGpa`. */
async function writeRead(space: GuestSpace, q: Ring, bump: Bump, sector: number, dataGpa: number): Promise<void> {
  const data = pattern(sector + 1, PAGE);
  const w = blkRequest(space, q, bump, BLK_T_OUT, sector, bump.alloc(PAGE, 512), PAGE, { out: data });
  await q.waitUsed(1, 2000);
  if (space.bytes(w.status, 1)[0] !== BLK_S_OK) throw new Error("block write failed");
  const r = blkRequest(space, q, bump, BLK_T_IN, sector, dataGpa, PAGE);
  await q.waitUsed(1, 2000);
  if (space.bytes(r.status, 1)[0] !== BLK_S_OK) throw new Error("block read failed");
  if (Buffer.compare(space.bytes(dataGpa, PAGE), data) !== 0) throw new Error("block read returned other bytes");
}

/** A memfd of `bytes` bytes (sealable or not). */
function file(bytes: number, sealing = true): number {
  const fd = memfdCreate("audit-short", MFD_CLOEXEC | (sealing ? MFD_ALLOW_SEALING : 0));
  later(() => close(fd));
  ftruncate(fd, bytes);
  return fd;
}

interface ShortCase {
  name: string;
  /** The file's real size. */
  fileBytes: number;
  /** What the front-end claims. */
  size: number;
  offset: number;
}

// ---- 1. the dirty log ----

// The read's buffer is at 200 MiB: its page's bit is in the bitmap's second 4 KiB page (byte 6400),
// so a log whose file holds only the first page is cut exactly where the backend would write.
const LOGGED_READ_GPA = 200 * MiB;
const LOG_CASES: ShortCase[] = [
  { name: "a 0-byte file", fileBytes: 0, size: 2 * PAGE, offset: 0 },
  { name: "an offset past the end of the file", fileBytes: 2 * PAGE, size: 2 * PAGE, offset: 4 * PAGE },
  { name: "a file shorter than the size claimed", fileBytes: PAGE, size: 2 * PAGE, offset: 0 },
];

describe("SET_LOG_BASE with a file shorter than claimed (issue 16, item 1)", () => {
  for (const c of LOG_CASES) {
    test(`${c.name}: refused with an error reply; logging I/O and a later session are served`, async () => {
      const { b, space } = await blockRig();
      const { f, q } = open(b, space);
      const payload = new Uint8Array(16);
      const v = new DataView(payload.buffer);
      v.setBigUint64(0, BigInt(c.size), true);
      v.setBigUint64(8, BigInt(c.offset), true);
      const reply = f.conn.requestU64(Req.SET_LOG_BASE, payload, [file(c.fileBytes)]);
      // LOG_ALL is acked (handshake takes every feature): a mapped log would be written now.
      f.startRing(q);
      const io = await attemptAsync(() => writeRead(space, q, new Bump(1 * MiB, 2 * MiB), 64, LOGGED_READ_GPA));
      const status = await b.settle(100);
      expect({ refused: reply !== 0n, io, status }).toEqual({ refused: true, io: "ok", status: "running" });
      f.close();
      const next = open(b, space);
      next.f.startRing(next.q);
      expect(await attemptAsync(() => writeRead(space, next.q, new Bump(2 * MiB, 3 * MiB), 128, 3 * MiB))).toBe("ok");
    }, 15_000);
  }

  test("a log that fits its file is mapped and sealed against shrinking", async () => {
    const { b, space } = await blockRig();
    const { f, q } = open(b, space);
    const fd = file(2 * PAGE);
    const payload = new Uint8Array(16);
    new DataView(payload.buffer).setBigUint64(0, BigInt(2 * PAGE), true);
    expect(f.conn.requestU64(Req.SET_LOG_BASE, payload, [fd])).toBe(0n);
    let shrink = "succeeded";
    try {
      ftruncate(fd, 0);
    } catch (e) {
      shrink = (e as { code?: string }).code ?? String(e);
    }
    f.startRing(q);
    const io = shrink === "succeeded" ? "not tried" : await attemptAsync(() => writeRead(space, q, new Bump(1 * MiB, 2 * MiB), 64, LOGGED_READ_GPA));
    expect({ shrink, io, status: await b.settle(100) }).toEqual({ shrink: "EPERM", io: "ok", status: "running" });
  }, 15_000);
});

// ---- 2. the inflight region ----

/** One queue's region for a ring of 1024 is 16448 bytes: 5 pages, of which a 4 KiB file holds one. */
const INFLIGHT_CASES: (ShortCase & { queueSize: number })[] = [
  { name: "a 0-byte file", fileBytes: 0, size: queueRegionSize(RING), offset: 0, queueSize: RING },
  { name: "an offset past the end of the file", fileBytes: 2 * PAGE, size: PAGE, offset: 4 * PAGE, queueSize: RING },
  { name: "a file shorter than the size claimed", fileBytes: PAGE, size: queueRegionSize(1024), offset: 0, queueSize: 1024 },
];

describe("SET_INFLIGHT_FD with a file shorter than claimed (issue 16, item 2)", () => {
  for (const c of INFLIGHT_CASES) {
    test(`${c.name}: refused with an error reply; the ring and a later session are served`, async () => {
      const { b, space } = await blockRig();
      const { f, q } = open(b, space);
      const reply = f.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(c.size, c.offset, 1, c.queueSize), [file(c.fileBytes)]);
      // Starting the ring reads (and initialises) its part of the region.
      const io = await attemptAsync(async () => {
        f.startRing(q);
        await writeRead(space, q, new Bump(1 * MiB, 2 * MiB), 64, 3 * MiB);
      });
      const status = await b.settle(100);
      expect({ refused: reply !== 0n, io, status }).toEqual({ refused: true, io: "ok", status: "running" });
      f.close();
      const next = open(b, space);
      next.f.startRing(next.q);
      expect(await attemptAsync(() => writeRead(space, next.q, new Bump(2 * MiB, 3 * MiB), 128, 4 * MiB))).toBe("ok");
    }, 15_000);
  }

  test("a region that fits its file is adopted and sealed against shrinking", async () => {
    const { b, space } = await blockRig();
    const { f, q } = open(b, space);
    const fd = file(queueRegionSize(RING));
    expect(f.conn.ack(Req.SET_INFLIGHT_FD, inflightBytes(queueRegionSize(RING), 0, 1, RING), [fd])).toBe(0n);
    let shrink = "succeeded";
    try {
      ftruncate(fd, 0);
    } catch (e) {
      shrink = (e as { code?: string }).code ?? String(e);
    }
    const io = await attemptAsync(async () => {
      f.startRing(q);
      await writeRead(space, q, new Bump(1 * MiB, 2 * MiB), 64, 3 * MiB);
    });
    expect({ shrink, io, status: await b.settle(100) }).toEqual({ shrink: "EPERM", io: "ok", status: "running" });
  }, 15_000);
});

test("the region GET_INFLIGHT_FD allocates is sealed against shrinking (the next backend relies on its size)", async () => {
  const { b, space } = await blockRig();
  const { f } = open(b, space);
  const r = f.conn.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 1, RING));
  expect(r.fds.length).toBe(1);
  later(() => close(r.fds[0]!));
  let shrink = "succeeded";
  try {
    ftruncate(r.fds[0]!, 0);
  } catch (e) {
    shrink = (e as { code?: string }).code ?? String(e);
  }
  expect(shrink).toBe("EPERM");
}, 15_000);
