// Every device served by the real entry point (`bun app/main.ts device ...`) under the default
// --sandbox auto: once the device thread is up, the test-only probe entry (app/sandbox.ts,
// VHOST_BACKEND_SANDBOX_PROBE) tries one escape; every one must be denied, and every thread must
// show NoNewPrivs 1, Seccomp 2, CapEff 0. With --sandbox none the same probes succeed (each check
// can fail). net runs under `ip netns exec` on a tap in a throwaway namespace, one probe at a time
// (a single-queue tap takes one backend).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { constants, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { PROBES, type ProbeName } from "../../src/sandbox/probe.ts";
import { NetNamespace, netnsAvailable } from "../support/netns.ts";

const MAIN = join(import.meta.dir, "../../app/main.ts");
const SIGSYS = constants.signals.SIGSYS;
let dir = "";
const servers: Server[] = [];
let target = { unixPath: "", abstractName: `vhost-sandbox-backend-${process.pid}`, tmpDir: tmpdir() };

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "sandbox-backend-"));
  writeFileSync(join(dir, "disk.img"), new Uint8Array(1 << 20));
  mkdirSync(join(dir, "wav"));
  target = { ...target, unixPath: join(dir, "peer.sock") };
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

const DEVICES: Record<string, () => string[]> = {
  console: () => [],
  block: () => ["--file", join(dir, "disk.img")],
  snd: () => ["--backend", "file", "--playback-file", join(dir, "wav", "out-{stream}.wav")],
};

let n = 0;
async function probe(device: string, mode: string, name: ProbeName | "status", args = DEVICES[device]?.() ?? [], prefix: string[] = []): Promise<{ verdict: string; out: any }> {
  const sock = join(dir, `${device}-${n++}.sock`);
  const p = Bun.spawn([...prefix, process.execPath, MAIN, "device", device, "--socket", sock, "--sandbox", mode, ...args], {
    env: { ...process.env, VHOST_BACKEND_SANDBOX_PROBE: JSON.stringify({ probe: name, ...target }) },
    stdout: "pipe",
    stderr: "pipe",
  });
  const timer = setTimeout(() => p.kill("SIGKILL"), 30000);
  const [stdout, stderr] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text()]);
  await p.exited;
  clearTimeout(timer);
  const line = stdout.split("\n").find((l) => l.startsWith("sandbox-probe: "));
  const out = line === undefined ? null : JSON.parse(line.slice("sandbox-probe: ".length));
  if (p.signalCode === "SIGSYS" || p.exitCode === 128 + SIGSYS) return { verdict: "denied", out };
  if (name === "exec-true" && out === null && p.exitCode === 0) return { verdict: "allowed", out }; // /bin/true replaced it
  const res = out?.results?.[0];
  if (name === "status") return { verdict: out === null ? `no output: ${stderr.slice(-300)}` : "status", out };
  if (res === undefined) return { verdict: `no result (exit ${p.exitCode}, ${p.signalCode}): ${stderr.slice(-300)}`, out };
  if (res.allowed) return { verdict: "allowed", out };
  // EACCES (Landlock), EPERM (seccomp errno, scopes), ENOENT and EROFS (the empty root).
  return { verdict: /EACCES|EPERM|ENOENT|EROFS/.test(res.detail) ? "denied" : `failed otherwise: ${res.detail}`, out };
}

/**
 * What a device's declaration allows on purpose: nothing the probes try. (Block and net declare
 * the io_uring group, but their rings are set up and restricted in acquire: io_uring_setup kills.)
 */
const DECLARED: Record<string, readonly ProbeName[]> = {};

describe.each(Object.keys(DEVICES))("%s under --sandbox auto", (device) => {
  test("every escape probe is denied (but what the device declared)", async () => {
    const verdicts = await Promise.all(PROBES.map(async (p) => `${p}: ${(await probe(device, "auto", p)).verdict}`));
    expect(verdicts).toEqual(PROBES.map((p) => `${p}: ${DECLARED[device]?.includes(p) ? "allowed" : "denied"}`));
  });

  test("every thread: NoNewPrivs 1, Seccomp 2, CapEff 0 (device and queue threads up)", async () => {
    const { verdict, out } = await probe(device, "auto", "status");
    expect(verdict).toBe("status");
    expect(out.threads.length).toBeGreaterThan(2);
    for (const t of out.threads) expect(`${t.tid}: ${t.noNewPrivs} ${t.seccomp} ${t.capEff}`).toBe(`${t.tid}: 1 2 0`);
  });
});

test("as root the serving process's root holds only what it needs: the binary, its libraries, /etc's two files, /dev's three, the sources, the socket's directory", async () => {
  // The socket right in the temporary directory, the root's build directory's parent: that bind
  // carried the build directory's mount into the new root, which then could not remove it, and
  // every start left an empty directory in /tmp. Building the root must leave nothing behind.
  const sock = join(tmpdir(), `root-view-${process.pid}.sock`);
  const buildDirs = () => readdirSync(tmpdir()).filter((n) => n.startsWith("vhost-backend-root-")).sort();
  const before = buildDirs();
  // The compiled binary when it is built (what users run; from sources the directory happened to go).
  const bin = join(import.meta.dir, "../../dist/backend");
  const argv = existsSync(bin) ? [bin] : [process.execPath, MAIN];
  const p = Bun.spawn([...argv, "device", "console", "--socket", sock], { stdout: "ignore", stderr: "pipe", cwd: tmpdir() });
  try {
    const deadline = Date.now() + 30000;
    while (!existsSync(sock) && Date.now() < deadline) await Bun.sleep(20);
    expect(existsSync(sock)).toBe(true);
    const top = (path: string) => path.split("/")[1]!;
    const hostLinks = ["lib", "lib64"].filter((l) => lstatSync(`/${l}`, { throwIfNoEntry: false }) !== undefined);
    const expected = new Set(["dev", "etc", "proc", "sys", "usr", ...hostLinks, top(argv[0]!), ...(argv.length > 1 ? [top(join(import.meta.dir, "../.."))] : []), top(dir)]);
    const root = `/proc/${p.pid}/root`;
    expect(readdirSync(root).sort()).toEqual([...expected].sort());
    expect(readdirSync(`${root}/etc`).sort()).toEqual(["ld.so.cache", "localtime"]);
    expect(readdirSync(`${root}/dev`).sort()).toEqual(["null", "urandom", "zero"]);
    expect(existsSync(`${root}/etc/passwd`)).toBe(false);
    // The sources only when run from them (the compiled binary bound its build tree too, when that
    // existed on the host: its modules' import.meta.url names it).
    // (The socket's directory is bound whole: a checkout inside it, such as CI's clone in /tmp, is
    // visible through that bind whatever the binary is.)
    const sources = join(import.meta.dir, "../../app");
    if (!sources.startsWith(`${dirname(sock)}/`)) expect(existsSync(`${root}${sources}`)).toBe(argv.length > 1);
    expect(existsSync(`${root}${sock}`)).toBe(true);
  } finally {
    p.kill("SIGTERM");
    await p.exited;
  }
  expect(existsSync(sock)).toBe(false); // removed at exit, from inside
  expect(buildDirs()).toEqual(before);
});

test.skipIf(Bun.spawnSync(["strace", "-V"], { stdout: "ignore", stderr: "ignore" }).exitCode !== 0)(
  "run from sources, the re-exec'd image does not look for Bun's transpiler cache (it is outside the sandbox)",
  async () => {
    // Bun looks up every module it transpiles in its runtime transpiler cache (~/.bun/install/cache/@t@)
    // and tries to create the directory: inside the sandbox about 200 failed calls at each start.
    const log = join(dir, "transpiler-cache.strace");
    const env: Record<string, string | undefined> = { ...process.env, VHOST_BACKEND_SANDBOX_PROBE: JSON.stringify({ probe: "status", ...target }) };
    delete env.BUN_RUNTIME_TRANSPILER_CACHE_PATH;
    const p = Bun.spawn(["strace", "-f", "-qq", "-e", "trace=execve,open,openat,mkdir,mkdirat", "-o", log, process.execPath, MAIN, "device", "block", "--socket", join(dir, "tcache.sock"), "--file", join(dir, "disk.img")], {
      env, stdout: "pipe", stderr: "pipe",
    });
    const timer = setTimeout(() => p.kill("SIGKILL"), 60000);
    const stdout = await new Response(p.stdout).text();
    await p.exited;
    clearTimeout(timer);
    expect(stdout).toContain("sandbox-probe: "); // it served, sandboxed
    const lines = readFileSync(log, "utf8").split("\n");
    const reexec = lines.findLastIndex((l) => / execve\(.*\) = 0$/.test(l));
    expect(reexec).toBeGreaterThan(0); // the first image's execve and the sandbox's
    expect(lines.slice(reexec).filter((l) => l.includes("/@t@")).slice(0, 3)).toEqual([]);
  },
);

test("profiled (BUN_JSC_useJITDump), a sandboxed backend writes its JITDump file and serves", async () => {
  // JSC opens the dump file in the re-exec'd image as it starts, and aborts when it cannot: perf
  // could not name JIT-compiled JavaScript in a sandboxed backend.
  const dumps = mkdtempSync(join(dir, "jitdump-"));
  const sock = join(dir, "jitdump.sock");
  const bin = join(import.meta.dir, "../../dist/backend");
  const argv = existsSync(bin) ? [bin] : [process.execPath, MAIN];
  const p = Bun.spawn([...argv, "device", "console", "--socket", sock, "--sandbox", "auto"], {
    env: { ...process.env, BUN_JSC_useJITDump: "1", BUN_JSC_jitDumpDirectory: dumps }, stdout: "ignore", stderr: "pipe",
  });
  const stderr = new Response(p.stderr).text();
  const deadline = Date.now() + 30000;
  while (!existsSync(sock) && p.exitCode === null && Date.now() < deadline) await Bun.sleep(20);
  await Bun.sleep(500); // the socket is renamed into place just before "listening" is logged
  p.kill("SIGTERM");
  await p.exited;
  const err = await stderr;
  expect(err).toContain("listening on");
  expect(err).toContain("sandbox: namespaces");
  expect(p.exitCode).toBe(0);
  expect(readdirSync(dumps).filter((n) => /^jit-\d+-\d+\.dump$/.test(n)).length).toBeGreaterThan(0);
});

const BIN = join(import.meta.dir, "../../dist/backend");
test.skipIf(!existsSync(BIN) || process.getuid?.() !== 0).each(["auto", "none"])(
  "the compiled binary serves with its build tree absent (--sandbox %s): device and queue threads start from the embedded files",
  async (mode) => {
    // Built with --bytecode, the binary's modules carry their source paths as import.meta.url: Worker
    // entries taken from it named the build tree, and the device thread failed to start
    // ("ModuleNotFound ... (entry point)") wherever the sources were not at that path.
    const app = join(import.meta.dir, "../../app");
    const sock = join(dir, `hidden-${mode}.sock`);
    const p = Bun.spawn(["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', app, BIN, "device", "block", "--socket", sock, "--file", join(dir, "disk.img"), "--threads", "1", "--sandbox", mode], {
      stdout: "ignore", stderr: "pipe",
    });
    const stderr = new Response(p.stderr).text();
    const deadline = Date.now() + 20000;
    while (!existsSync(sock) && p.exitCode === null && Date.now() < deadline) await Bun.sleep(20);
    await Bun.sleep(300); // the queue thread starts beside the device thread
    p.kill("SIGTERM");
    await p.exited;
    const err = await stderr;
    expect(err.split("\n").filter((l) => / (error|fatal) /.test(l))).toEqual([]);
    expect(err).toContain("listening on");
    expect(p.exitCode).toBe(0);
  },
);

test("with --sandbox none the same probes succeed and no thread is confined", async () => {
  const verdicts: string[] = [];
  for (const p of PROBES) verdicts.push(`${p}: ${(await probe("console", "none", p)).verdict}`); // one at a time: one tracer per parent
  expect(verdicts).toEqual(PROBES.map((p) => `${p}: allowed`));
  const { out } = await probe("block", "none", "status");
  expect(out.threads.every((t: any) => t.seccomp === 0 && t.noNewPrivs === 0)).toBe(true);
});

describe.skipIf(!netnsAvailable())("net under --sandbox auto (its tap in a namespace)", () => {
  let ns: NetNamespace | null = null;
  let tap = "";
  beforeAll(() => {
    ns = NetNamespace.create();
    tap = ns.addTap("vhusbx0");
  });
  afterAll(() => ns?.destroy());
  const net = (mode: string, name: ProbeName | "status") => probe("net", mode, name, ["--tap-name", tap], ["ip", "netns", "exec", ns!.name]);

  test("every escape probe is denied; every thread NoNewPrivs 1, Seccomp 2, and only CAP_NET_ADMIN (NET_SET_MTU)", async () => {
    const verdicts: string[] = [];
    for (const p of PROBES) verdicts.push(`${p}: ${(await net("auto", p)).verdict}`);
    // net's rings are set up in acquire: io_uring_setup is denied here too.
    expect(verdicts).toEqual(PROBES.map((p) => `${p}: denied`));
    const { out } = await net("auto", "status");
    for (const t of out.threads) expect(`${t.tid}: ${t.noNewPrivs} ${t.seccomp} ${t.capEff}`).toBe(`${t.tid}: 1 2 1000`);
    const off = await net("none", "open-shadow");
    expect(off.verdict).toBe("allowed");
  });
});
