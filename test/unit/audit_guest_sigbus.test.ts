// A front-end truncates the file behind a mapped guest region that could not be sealed (a memfd
// created without MFD_ALLOW_SEALING) while I/O runs (issue 16, item 5). The access to the lost pages
// raises SIGBUS in the backend; it must survive it: drop that front-end and serve the next. A SIGBUS
// anywhere else must still crash it. The backend runs in a subprocess (test/support/hostile.ts).
import { describe, test, expect, afterEach } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  SpawnedBackend, GuestMemfd, GuestSpace, Ring, Bump, HostileFront, blkRequest, pattern, eventually,
  BLK_T_IN, BLK_T_OUT, BLK_S_OK, MiB,
} from "../support/hostile.ts";
import { signal } from "../../ffi/eventfd.ts";
import { ftruncate } from "../../ffi/io.ts";
import { memfdCreate, MFD_CLOEXEC } from "../../ffi/mem.ts";
import { close } from "../../ffi/libc.ts";
import { Req, u64 } from "../support/frontend.ts";

const RING = 64;
const PAGE = 4096;

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

async function attemptAsync(fn: () => Promise<unknown>): Promise<string> {
  try {
    await fn();
    return "ok";
  } catch (e) {
    return (e as Error).message;
  }
}

async function blockBackend(threads: number): Promise<SpawnedBackend> {
  const dir = mkdtempSync(join(tmpdir(), "vhu-audit-"));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, "disk.img");
  writeFileSync(image, "");
  truncateSync(image, 8 * MiB);
  const b = await SpawnedBackend.start("block", ["--file", image, "--num-queues", "1", "--queue-size", String(RING), "--threads", String(threads)], { logLevel: "warn" });
  cleanups.push(() => b.kill());
  return b;
}

interface Session {
  f: HostileFront;
  q: Ring;
  mem: GuestMemfd;
  space: GuestSpace;
  bump: Bump;
}

/** A session with 16 MiB of guest memory in a memfd (sealable or not), its ring started. */
function open(b: SpawnedBackend, sealing: boolean): Session {
  const mem = new GuestMemfd(16 * MiB, { sealing });
  cleanups.push(() => mem.dispose());
  const space = GuestSpace.of({ mem, gpa: 0 });
  const f = new HostileFront(b.socketPath, 2000);
  cleanups.push(() => f.close());
  f.handshake(~(1n << 26n)); // no LOG_ALL
  if (f.setMemTable(space) !== 0n) throw new Error("SET_MEM_TABLE refused");
  const q = Ring.at(space, 0, RING, 0x10000);
  cleanups.push(() => q.dispose());
  f.startRing(q);
  return { f, q, mem, space, bump: new Bump(1 * MiB, 16 * MiB) };
}

let serial = 0;
async function writeRead(s: Session): Promise<void> {
  const n = ++serial;
  const data = pattern(n, PAGE);
  const w = blkRequest(s.space, s.q, s.bump, BLK_T_OUT, n * 8, s.bump.alloc(PAGE, 512), PAGE, { out: data });
  await s.q.waitUsed(1, 2000);
  if (s.space.bytes(w.status, 1)[0] !== BLK_S_OK) throw new Error("block write failed");
  const r = blkRequest(s.space, s.q, s.bump, BLK_T_IN, n * 8, s.bump.alloc(PAGE, 512), PAGE);
  await s.q.waitUsed(1, 2000);
  if (s.space.bytes(r.status, 1)[0] !== BLK_S_OK) throw new Error("block read failed");
  if (Buffer.compare(s.space.bytes(r.data, PAGE), data) !== 0) throw new Error("block read returned other bytes");
}

/** Requests queued (not kicked) so the backend reads the ring and the buffers once it is kicked. */
function queueReads(s: Session, n: number): void {
  for (let i = 0; i < n; i++) blkRequest(s.space, s.q, s.bump, BLK_T_IN, i * 8, s.bump.alloc(PAGE, 512), PAGE, { kick: false });
}

/** Whether the backend closed the session's connection (a request fails with "closed"). */
function closedByBackend(s: Session): boolean {
  try {
    s.f.featuresLatency(500);
    return false;
  } catch (e) {
    return /closed|EPIPE|ECONNRESET/.test((e as Error).message);
  }
}

describe("guest memory truncated under the backend, unsealable (issue 16, item 5)", () => {
  for (const threads of [0, 1]) {
    test(`block --threads ${threads}: the SIGBUS is survived, that front-end dropped, the next one served`, async () => {
      const b = await blockBackend(threads);
      const s = open(b, false);
      expect(await attemptAsync(() => writeRead(s))).toBe("ok");
      queueReads(s, 8);
      // Our own views of the memfd point past its end after this: never touched again.
      s.mem.unmapAll();
      ftruncate(s.mem.fd, 0);
      signal(s.q.kick); // the backend reads the ring: the lost pages
      const status = await b.settle(300);
      const dropped = status === "running" && (await eventually(() => closedByBackend(s), 2000));
      expect({ status, dropped }).toEqual({ status: "running", dropped: true });
      expect(b.stderr).toMatch(/truncat/i);
      const next = open(b, false);
      expect(await attemptAsync(() => writeRead(next))).toBe("ok");
      expect(b.status()).toBe("running");
    }, 20_000);
  }

  test("a SIGBUS that is not a fault in guest memory (sent with kill) still kills the backend", async () => {
    const b = await blockBackend(0);
    const s = open(b, false); // the handler is installed by now
    expect(await attemptAsync(() => writeRead(s))).toBe("ok");
    process.kill(b.pid, "SIGBUS");
    expect(await b.settle(3000)).not.toBe("running");
  }, 20_000);
});

test("a real SIGBUS outside guest memory (an unsealable dirty log truncated under the backend) still kills it", async () => {
  const b = await blockBackend(0);
  const s = open(b, false);
  const logFd = memfdCreate("unsealable-log", MFD_CLOEXEC);
  cleanups.push(() => close(logFd));
  ftruncate(logFd, 2 * PAGE);
  const payload = new Uint8Array(16);
  new DataView(payload.buffer).setBigUint64(0, BigInt(2 * PAGE), true);
  expect(s.f.conn.requestU64(Req.SET_LOG_BASE, payload, [logFd])).toBe(0n);
  expect(s.f.conn.ack(Req.SET_FEATURES, u64(s.f.features | (1n << 26n)))).toBe(0n);
  ftruncate(logFd, 0);
  await attemptAsync(() => writeRead(s)); // the first logged write into the log's lost page
  expect(await b.settle(3000)).not.toBe("running");
}, 20_000);
