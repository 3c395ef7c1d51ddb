// sd_notify: READY=1 / STOPPING=1 datagrams to a NOTIFY_SOCKET the test owns (a path and an
// abstract name), nothing without one, no throw when the manager is gone.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bindUnixDatagram } from "../../ffi/socket.ts";
import { read } from "../../ffi/io.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { notifyReady, notifyStopping, sdNotify } from "../../src/sd_notify.ts";
import { setLogLevel } from "../../src/log.ts";

setLogLevel(process.env.TEST_LOG_LEVEL ?? "silent");
const dir = mkdtempSync(join(tmpdir(), "ops-notify-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Every datagram waiting on `fd`, as text. */
function drain(fd: number): string[] {
  const out: string[] = [];
  const buf = new Uint8Array(4096);
  for (;;) {
    const n = read(fd, buf, buf.length);
    if (n === -EAGAIN) return out;
    out.push(new TextDecoder().decode(buf.subarray(0, n)));
  }
}

describe("sd_notify", () => {
  test("READY=1 with status and MAINPID, then STOPPING=1, to a socket path", () => {
    const path = join(dir, "notify.sock");
    const fd = bindUnixDatagram(path);
    try {
      const env = { NOTIFY_SOCKET: path };
      expect(notifyReady("listening on /tmp/blk.sock (block)", env)).toBe(true);
      expect(notifyStopping(env)).toBe(true);
      const got = drain(fd);
      expect(got).toEqual([`READY=1\nSTATUS=listening on /tmp/blk.sock (block)\nMAINPID=${process.pid}`, "STOPPING=1"]);
    } finally {
      close(fd);
    }
  });

  test("an abstract socket name (@...), as systemd gives it", () => {
    const name = `@ops-notify-test-${process.pid}-${Date.now()}`;
    const fd = bindUnixDatagram(name);
    try {
      expect(sdNotify("READY=1", { NOTIFY_SOCKET: name })).toBe(true);
      expect(drain(fd)).toEqual(["READY=1"]);
      // The name is exactly the bytes after '@': a longer or shorter one is another socket.
      expect(sdNotify("READY=1", { NOTIFY_SOCKET: `${name}x` })).toBe(false);
    } finally {
      close(fd);
    }
  });

  test("no NOTIFY_SOCKET: nothing sent; a vanished manager: false, no throw", () => {
    expect(sdNotify("READY=1", {})).toBe(false);
    expect(sdNotify("READY=1", { NOTIFY_SOCKET: join(dir, "nobody.sock") })).toBe(false);
    expect(sdNotify("READY=1", { NOTIFY_SOCKET: "vsock:2:1234" })).toBe(false);
  });
});
