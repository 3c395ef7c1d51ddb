// The compiled single binary, as users get it: help, capabilities, and a device served from it.
import { capabilitiesJson } from "../../src/capabilities.ts";
import { beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FrontendConnection, Req } from "../support/frontend.ts";
import { waitForPath } from "./rig.ts";
import { DEVICES } from "../../app/registry.ts";

const ROOT = join(import.meta.dir, "../..");
const BINARY = join(ROOT, "dist/backend");
const plain = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, "");

beforeAll(() => {
  if (!existsSync(BINARY)) {
    const b = Bun.spawnSync([process.execPath, "run", "build"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    if (b.exitCode !== 0) throw new Error(`build failed: ${b.stderr.toString()}`);
  }
}, 120_000);

function run(args: string[]) {
  const p = Bun.spawnSync([BINARY, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode, out: plain(p.stdout.toString() + p.stderr.toString()) };
}

describe("dist/backend", () => {
  test("--help lists the devices", () => {
    const r = run(["--help"]);
    expect(r.code).toBe(0);
    expect(r.out).toContain("device");
    const d = run(["device", "--help"]);
    expect(d.out).toContain("block");
    expect(d.out).toContain("console");
  });

  test("--print-capabilities prints the spec's JSON, from each device's definition", () => {
    const blk = run(["device", "block", "--print-capabilities"]);
    expect(blk.code).toBe(0);
    expect(JSON.parse(blk.out)).toEqual({ type: "block", features: ["read-only"] });
    const con = JSON.parse(run(["device", "console", "--print-capabilities"]).out);
    expect(con.type).toBe("console");
    for (const def of Object.values(DEVICES)) {
      expect(JSON.parse(run(["device", def.name, "--print-capabilities"]).out)).toEqual(JSON.parse(capabilitiesJson(def.capabilities)));
    }
  });

  test("installed as vhost-user-<type> (QEMU's naming convention), it serves that device", () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-link-"));
    try {
      for (const def of Object.values(DEVICES)) {
        const link = join(dir, `vhost-user-${def.capabilities.type}`);
        symlinkSync(BINARY, link);
        const p = Bun.spawnSync([link, "--print-capabilities"], { stdout: "pipe", stderr: "pipe" });
        expect(p.exitCode).toBe(0);
        expect(JSON.parse(p.stdout.toString())).toEqual(JSON.parse(capabilitiesJson(def.capabilities)));
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the build generates the man page, completion and QEMU's description files", () => {
    for (const f of ["share/man/man1/backend.1", "share/bash-completion/completions/backend", "share/zsh/site-functions/_backend", "share/qemu/vhost-user/50-backend-block.json"]) {
      expect(existsSync(join(ROOT, "dist", f))).toBe(true);
    }
  });

  test("a device's --help fits 80 columns and ends with its example", () => {
    for (const def of Object.values(DEVICES)) {
      const r = run(["device", def.name, "--help"]);
      expect(r.code).toBe(0);
      for (const line of r.out.split("\n")) expect(line.length).toBeLessThanOrEqual(80);
      for (const name of Object.keys(def.args)) expect(r.out).toContain(`--${name}`);
      expect(r.out).toContain("Example:");
      expect(r.out).toContain(`backend device ${def.name} ${def.example[0] ?? ""}`.trimEnd());
    }
  });

  test("serves a device from its embedded worker, then exits 0 on SIGTERM", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-bin-"));
    try {
      const sock = join(dir, "blk.sock");
      const img = join(dir, "disk.img");
      await Bun.write(img, new Uint8Array(1 << 20));
      const p = Bun.spawn([BINARY, "device", "block", "--socket", sock, "--file", img, "--num-queues", "2"], { stdout: "pipe", stderr: "pipe" });
      await waitForPath(sock, 10_000);
      const c = new FrontendConnection(sock);
      expect(c.requestU64(Req.GET_QUEUE_NUM)).toBe(2n);
      c.close();
      p.kill("SIGTERM");
      expect(await p.exited).toBe(0);
      expect(existsSync(sock)).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
