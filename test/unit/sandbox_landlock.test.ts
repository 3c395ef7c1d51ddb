// Landlock rules from declarations (src/sandbox/landlock.ts), and one real restriction in a child
// process: a declared directory is writable, its sibling is not, reads follow the read grant.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ACCESS_FS, landlockAbi } from "../../ffi/landlock.ts";
import { rightsFor, removalGrants, tcpPorts, declaredGrants } from "../../src/sandbox/landlock.ts";
import { NO_HOST_ACCESS } from "../../src/host_access.ts";

describe("rights from declarations", () => {
  test("read, write, create map to Landlock rights; device ioctls come with read or write", () => {
    expect(rightsFor(["read"])).toBe(ACCESS_FS.READ_FILE | ACCESS_FS.READ_DIR | ACCESS_FS.IOCTL_DEV);
    expect(rightsFor(["write"]) & ACCESS_FS.MAKE_REG).toBe(0n);
    expect(rightsFor(["create"]) & ACCESS_FS.MAKE_REG).toBe(ACCESS_FS.MAKE_REG);
    expect(rightsFor(["read"]) & (ACCESS_FS.WRITE_FILE | ACCESS_FS.EXECUTE | ACCESS_FS.MAKE_SOCK)).toBe(0n);
    expect(rightsFor([])).toBe(0n);
  });

  test("the socket's directory: removing and renaming sockets only", () => {
    expect(removalGrants(["/run/vm/disk.sock"])).toEqual([{ path: "/run/vm", access: ACCESS_FS.REMOVE_FILE | ACCESS_FS.MAKE_SOCK, source: "runtime" }]);
  });

  test("TCP endpoints give their ports; an endpoint without one is refused", () => {
    expect(tcpPorts({ ...NO_HOST_ACCESS, tcp: ["nbd.example:10809", "[::1]:6789"] })).toEqual([10809, 6789]);
    expect(() => tcpPorts({ ...NO_HOST_ACCESS, tcp: ["nbd.example"] })).toThrow(/no port/);
  });
});

test.skipIf(landlockAbi() < 1)("a child restricted to a declared directory writes there and nowhere else", () => {
  const dir = mkdtempSync(join(tmpdir(), "sandbox-landlock-"));
  try {
    mkdirSync(join(dir, "allowed"));
    mkdirSync(join(dir, "other"));
    writeFileSync(join(dir, "other", "secret"), "s");
    const grants = declaredGrants({ ...NO_HOST_ACCESS, paths: [{ path: join(dir, "allowed"), rights: ["create", "write"], directory: true }] });
    const script = `
      import { applyLandlock, runtimeGrants } from ${JSON.stringify(join(import.meta.dir, "../../src/sandbox/landlock.ts"))};
      import { prctl, PR } from ${JSON.stringify(join(import.meta.dir, "../../ffi/seccomp.ts"))};
      import { writeFileSync, readFileSync } from "node:fs";
      prctl(PR.SET_NO_NEW_PRIVS, 1);
      const g = ${JSON.stringify(grants, (_k, v) => (typeof v === "bigint" ? `${v}n` : v))}.map((x) => ({ ...x, access: BigInt(x.access.slice(0, -1)) }));
      applyLandlock([...runtimeGrants({ execPath: process.execPath, pid: process.pid }), ...g], []);
      const tryIt = (f) => { try { f(); return "ok"; } catch (e) { return e.code; } };
      console.log(JSON.stringify({
        create: tryIt(() => writeFileSync(${JSON.stringify(join(dir, "allowed", "new"))}, "x")),
        other: tryIt(() => writeFileSync(${JSON.stringify(join(dir, "other", "new"))}, "x")),
        read: tryIt(() => readFileSync(${JSON.stringify(join(dir, "other", "secret"))})),
      }));`;
    writeFileSync(join(dir, "child.ts"), script);
    const p = Bun.spawnSync([process.execPath, join(dir, "child.ts")], { stdout: "pipe", stderr: "pipe", cwd: import.meta.dir });
    // The child's own source is outside its grants once restricted, but it was read before.
    expect(p.stderr.toString()).toBe("");
    expect(JSON.parse(p.stdout.toString())).toEqual({ create: "ok", other: "EACCES", read: "EACCES" });
    expect(existsSync(join(dir, "allowed", "new"))).toBe(true);
    expect(existsSync(join(dir, "other", "new"))).toBe(false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
