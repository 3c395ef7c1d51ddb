// The whole lockdown in a compiled binary (test/support/sandbox_probe_main.ts, built here with
// `bun build --compile`): acquire, namespaces, capabilities, no_new_privs, Landlock, re-exec with
// a kept fd, seccomp with TSYNC, then escape probes from the main thread and from a Worker started
// after the lockdown. Every probe must be denied under --sandbox auto and must succeed under
// --sandbox none (so each check is one that can fail).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, chmodSync, writeFileSync } from "node:fs";
import { constants } from "node:os";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PROBES, type ProbeName } from "../../src/sandbox/probe.ts";
import { landlockAbi } from "../../ffi/landlock.ts";

const SIGSYS = 31;
let dir = "";
let bin = "";
const servers: Server[] = [];
let target = { unixPath: "", abstractName: `vhost-sandbox-probe-${process.pid}`, tmpDir: tmpdir() };

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "sandbox-exec-"));
  chmodSync(dir, 0o755);
  bin = join(dir, "probe");
  const build = Bun.spawnSync([process.execPath, "build", "--compile", "test/support/sandbox_probe_main.ts", "test/support/sandbox_probe_worker.ts", "--outfile", bin], { stderr: "pipe" });
  if (build.exitCode !== 0) throw new Error(`build failed: ${build.stderr.toString()}`);
  target = { ...target, unixPath: join(dir, "peer.sock") };
  writeFileSync(join(dir, "kept.log"), "");
  chmodSync(join(dir, "kept.log"), 0o666); // the unprivileged runs append too
  // Real peers, so that a refusal is the sandbox's and not an absent listener's.
  for (const path of [target.unixPath, `\0${target.abstractName}`]) {
    const s = createServer((c) => c.destroy());
    await new Promise<void>((resolve) => s.listen(path, resolve));
    servers.push(s);
  }
});

afterAll(() => {
  for (const s of servers) s.close();
  rmSync(dir, { recursive: true, force: true });
});

interface Run {
  exitCode: number | null;
  signal: number | null;
  out: any;
  stderr: string;
}

function run(args: string[], prefix: string[] = []): Run {
  const p = Bun.spawnSync([...prefix, bin, ...args], {
    env: { ...process.env, SANDBOX_PROBE_TARGET: JSON.stringify(target), SANDBOX_PROBE_KEEP: join(dir, "kept.log") },
    stdout: "pipe",
    stderr: "pipe",
    timeout: 30000,
  });
  const text = p.stdout.toString().trim();
  let out: any = null;
  try {
    out = text === "" ? null : JSON.parse(text.split("\n").pop()!);
  } catch {
    out = { raw: text };
  }
  return { exitCode: p.exitCode, signal: p.signalCode === null ? null : (constants.signals as Record<string, number>)[p.signalCode ?? ""] ?? -1, out, stderr: p.stderr.toString() };
}

/** "denied" when the probe was refused (an errno, or the filter killed the process), "allowed" when it worked. */
function verdict(probe: ProbeName, r: Run): "denied" | "allowed" | string {
  if (r.signal === SIGSYS) return "denied";
  if (probe === "exec-true" && r.exitCode === 0 && r.out === null) return "allowed"; // /bin/true replaced the process
  const res = r.out?.results?.[0];
  if (res === undefined) return `no result (exit ${r.exitCode}, signal ${r.signal}): ${r.stderr.slice(-400)}`;
  if (res.allowed) return "allowed";
  // Only the sandbox's answers count as denials: EACCES (Landlock), EPERM (seccomp errno, scopes),
  // ENOENT and EROFS (the empty root: the path is not there, or its directory is read-only).
  return /EACCES|EPERM|ENOENT|EROFS/.test(res.detail) ? "denied" : `failed otherwise: ${res.detail}`;
}

describe.each(["main", "worker"])("probes on the %s thread", (where) => {
  test.each([...PROBES])("%s: denied with --sandbox auto, allowed with none", (probe) => {
    expect(`${probe}: ${verdict(probe, run(["auto", probe, where]))}`).toBe(`${probe}: denied`);
    expect(`${probe}: ${verdict(probe, run(["none", probe, where]))}`).toBe(`${probe}: allowed`);
  });
});

test("every thread: NoNewPrivs 1, Seccomp 2, CapEff 0, after a Worker started; the kept fd serves", () => {
  const r = run(["auto", "status", "worker"]);
  expect(r.exitCode).toBe(0);
  expect(r.out.threads.length).toBeGreaterThan(1);
  for (const t of r.out.threads) expect({ tid: t.tid, noNewPrivs: t.noNewPrivs, seccomp: t.seccomp, capEff: t.capEff }).toEqual({ tid: t.tid, noNewPrivs: 1, seccomp: 2, capEff: "0" });
  expect(r.out.applied).toEqual(expect.arrayContaining(["no_new_privs", "capabilities", "seccomp", "namespaces(mnt,net,ipc,uts)"]));
  if (landlockAbi() >= 1) expect(r.out.applied.some((l: string) => l.startsWith("landlock("))).toBe(true);
  expect(readFileSync(join(dir, "kept.log"), "utf8")).toContain("served by");
  // And none of it without the sandbox.
  const off = run(["none", "status", "worker"]);
  expect(off.out.threads.every((t: any) => t.seccomp === 0 && t.noNewPrivs === 0)).toBe(true);
});

test("strict fails at startup when a layer cannot be applied (not root: no namespaces); auto carries on and says so", () => {
  const nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
  const strict = run(["strict", "status"], nobody);
  expect(strict.exitCode).not.toBe(0);
  expect(strict.stderr).toContain("--sandbox strict: namespaces: not root");
  const auto = run(["auto", "status"], nobody);
  expect(auto.exitCode).toBe(0);
  expect(auto.out.missing).toEqual(expect.arrayContaining(["namespaces: not root"]));
  for (const t of auto.out.threads) expect([t.noNewPrivs, t.seccomp, t.capEff]).toEqual([1, 2, "0"]);
  // As root on a kernel with every layer (Landlock ABI 6 for the scopes), strict starts.
  const strictRoot = run(["strict", "status"]);
  if (landlockAbi() >= 6) expect(strictRoot.exitCode).toBe(0);
  else expect(strictRoot.stderr).toContain("--sandbox strict: landlock");
});

test("as root the filesystem is an empty root: /etc/passwd is absent (ENOENT); without root Landlock alone refuses it (EACCES)", () => {
  const asRoot = run(["auto", "open-passwd"]);
  expect(asRoot.out.applied.some((l: string) => l.startsWith("empty root("))).toBe(true);
  expect(asRoot.out.results[0].detail).toBe("open(/etc/passwd): ENOENT");
  const nobody = run(["auto", "open-passwd"], ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]);
  expect(nobody.out.missing).toEqual(expect.arrayContaining([expect.stringContaining("empty mount namespace (not root")]));
  if (landlockAbi() >= 1) expect(nobody.out.results[0].detail).toBe("open(/etc/passwd): EACCES");
  expect(run(["none", "open-passwd"]).out.results[0].allowed).toBe(true);
});
