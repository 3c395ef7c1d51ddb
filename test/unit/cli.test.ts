// The command line as a user meets it: help, capabilities, option errors, signals, --fd.
import { describe, test, expect } from "bun:test";
import { mkdtempSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FrontendConnection, Req } from "../support/frontend.ts";
import { socketPair } from "../../ffi/socket.ts";
import { close } from "../../ffi/libc.ts";

const MAIN = join(import.meta.dir, "../../src/main.ts");

function run(args: string[]) {
  const p = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode, out: p.stdout.toString(), err: p.stderr.toString() };
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out");
    await Bun.sleep(10);
  }
}

describe("cli", () => {
  test("--help lists the device command", () => {
    const r = run(["--help"]);
    expect(r.code).toBe(0);
    expect(r.out + r.err).toContain("device");
  });

  test("exactly one socket source is required", () => {
    const r = run(["device", "console"]);
    expect(r.code).toBe(1);
    expect(r.out + r.err).toContain("exactly one of --socket");
  });

  test("an unknown log level is an error", () => {
    const r = run(["device", "console", "--socket", "/tmp/x.sock", "--log-level", "loud"]);
    expect(r.code).toBe(1);
  });

  test("SIGTERM stops the backend, removes its socket and exits 0", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-cli-"));
    const sock = join(dir, "console.sock");
    const p = Bun.spawn([process.execPath, MAIN, "device", "console", "--socket", sock, "--output-file", join(dir, "out")], {
      stdout: "pipe", stderr: "pipe", stdin: "ignore",
    });
    await waitFor(() => existsSync(sock));
    const c = new FrontendConnection(sock);
    expect(c.requestU64(Req.GET_QUEUE_NUM)).toBeGreaterThan(0n);
    c.close();
    p.kill("SIGTERM");
    expect(await p.exited).toBe(0);
    expect(existsSync(sock)).toBe(false);
  });

  test("--fd serves an inherited connected socket and exits when it closes", async () => {
    const [ours, theirs] = socketPair();
    const p = Bun.spawn([process.execPath, MAIN, "device", "console", "--fd", "3", "--output-file", "/dev/null"], {
      stdio: ["ignore", "pipe", "pipe", theirs],
    });
    close(theirs);
    const c = new FrontendConnection(ours);
    expect(c.requestU64(Req.GET_QUEUE_NUM)).toBeGreaterThan(0n);
    close(ours);
    expect(await p.exited).toBe(0);
  });
});
