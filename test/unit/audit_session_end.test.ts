// How a session ends (issue 16, item 8). A value request that fails and whose reply has no error
// form (GET_VRING_BASE of a queue that does not exist) must not be answered with a short reply —
// crosvm reads exactly the reply's size and would wait forever — so the session is dropped; a
// front-end that hangs up with requests unanswered is a disconnect (info), not an internal error.
// The backend runs in a subprocess at --log-level info, so what it logs is on its stderr.
import { describe, test, expect, afterEach } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SpawnedBackend, HostileFront, connectRetrying, eventually } from "../support/hostile.ts";
import { FrontendConnection, Req, vringState } from "../support/frontend.ts";
import { inflightBytes } from "../../src/protocol/codec.ts";

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

async function consoleBackend(logLevel = "info"): Promise<SpawnedBackend> {
  const dir = mkdtempSync(join(tmpdir(), "vhu-audit-"));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const b = await SpawnedBackend.start("console", ["--output-file", join(dir, "out")], { logLevel });
  cleanups.push(() => b.kill());
  return b;
}

function session(b: SpawnedBackend): HostileFront {
  const f = new HostileFront(b.socketPath, 2000);
  cleanups.push(() => f.close());
  f.handshake();
  return f;
}

/** One request as bytes (header + payload). */
function message(code: number, payload = new Uint8Array(0)): Uint8Array {
  const m = new Uint8Array(12 + payload.length);
  const v = new DataView(m.buffer);
  v.setUint32(0, code, true);
  v.setUint32(4, 1, true);
  v.setUint32(8, payload.length, true);
  m.set(payload, 12);
  return m;
}

/** "reply of N bytes", "closed" or what went wrong, for one request. */
function outcome(f: HostileFront, code: number, payload: Uint8Array): string {
  try {
    const r = f.conn.request(code, payload);
    return `reply of ${r.payload.length} bytes`;
  } catch (e) {
    return /closed/.test((e as Error).message) ? "closed" : (e as Error).message;
  }
}

/** Lines of the backend's log at a level of error or worse. */
function errorLines(stderr: string): string[] {
  return stderr.split("\n").filter((l) => /\b(ERROR|error|FATAL|fatal)\b/.test(l) && !/^\s*at /.test(l));
}

describe("a failing GET_VRING_BASE is never answered short (issue 16, item 8)", () => {
  test("of a queue that does not exist: the session is dropped, the next one is served", async () => {
    const b = await consoleBackend("warn");
    const f = session(b);
    expect(outcome(f, Req.GET_VRING_BASE, vringState(9, 0))).toBe("closed");
    const next = session(b);
    expect(next.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
    expect(b.status()).toBe("running");
  }, 15_000);

  test("with a malformed payload: the session is dropped", async () => {
    const b = await consoleBackend("warn");
    const f = session(b);
    expect(outcome(f, Req.GET_VRING_BASE, new Uint8Array(4))).toBe("closed");
    expect(session(b).conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  }, 15_000);

  test("a ring that exists answers with the whole vring state, as before", async () => {
    const b = await consoleBackend("warn");
    const f = session(b);
    const r = f.conn.request(Req.GET_VRING_BASE, vringState(1, 0));
    expect(r.payload.length).toBe(8);
  }, 15_000);

  test("a refused GET_INFLIGHT_FD answers with a whole inflight description of size 0 (QEMU: no region)", async () => {
    const b = await consoleBackend("warn");
    const f = session(b);
    const r = f.conn.request(Req.GET_INFLIGHT_FD, inflightBytes(0, 0, 9, 128));
    expect({ bytes: r.payload.length, fds: r.fds.length, size: new DataView(r.payload.buffer).getBigUint64(0, true) }).toEqual({ bytes: 24, fds: 0, size: 0n });
    expect(f.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
  }, 15_000);
});

describe("a front-end that hangs up is a disconnect, not an error (issue 16, item 8)", () => {
  test("requests sent, then the socket closed before the replies: logged at info, nothing at error", async () => {
    const b = await consoleBackend("info");
    // Many requests in one write and an immediate close: the backend's replies meet a closed
    // socket (EPIPE, or ECONNRESET when our close discarded unread replies).
    for (let round = 0; round < 5; round++) {
      const c = new FrontendConnection(connectRetrying(b.socketPath), 2000);
      const burst: Uint8Array[] = [];
      for (let i = 0; i < 200; i++) burst.push(message(Req.GET_FEATURES), message(Req.GET_QUEUE_NUM), message(Req.SET_OWNER));
      c.sendRaw(Buffer.concat(burst));
      c.close();
      await Bun.sleep(50);
    }
    const f = session(b);
    expect(f.conn.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
    f.close();
    expect(await eventually(() => (b.stderr.match(/disconnected/g) ?? []).length >= 6, 2000)).toBe(true);
    expect(errorLines(b.stderr)).toEqual([]);
    expect(b.status()).toBe("running");
  }, 15_000);
});
