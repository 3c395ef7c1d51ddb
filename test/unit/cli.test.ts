// The command line as a user meets it: help, capabilities, option errors, signals, --fd, systemd
// socket activation, the boolean rule.
import { describe, test, expect } from "bun:test";
import { mkdtempSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FrontendConnection, Req } from "../support/frontend.ts";
import { listenUnix, socketPair } from "../../ffi/socket.ts";
import { close } from "../../ffi/libc.ts";
import { DEVICES } from "../../app/registry.ts";
import { capabilitiesJson } from "../../src/capabilities.ts";
import { booleanFromArgv, booleanOption, parseBoolean, systemdListenFds } from "../../src/cli_args.ts";
import { commandLine, wrap } from "../../app/help.ts";
import echoDevice from "../support/echo_device.ts";

const MAIN = join(import.meta.dir, "../../app/main.ts");

function run(args: string[]) {
  const p = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: p.exitCode, out: p.stdout.toString(), err: p.stderr.toString() };
}

/** Runs `args` with `fd3` as the child's fd 3 and LISTEN_FDS/LISTEN_PID as systemd sets them: the
 * pid is only known in the child, so a shell exports its own $$ and execs the backend. */
function spawnActivated(args: string[], fd3: number | "ignore", env: Record<string, string> = { LISTEN_FDS: "1" }) {
  return Bun.spawn(["sh", "-c", 'export LISTEN_PID=$$; exec "$0" "$@"', process.execPath, MAIN, ...args], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe", fd3],
  });
}

const VIRTIO_BLK_F_RO = 1n << 5n;

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

  test("a device's --help fits 80 columns, lists every option and ends with its example", () => {
    for (const def of Object.values(DEVICES)) {
      const r = run(["device", def.name, "--help"]);
      expect(r.code).toBe(0);
      const lines = r.out.split("\n");
      for (const line of lines) expect(line.length).toBeLessThanOrEqual(80);
      for (const name of ["socket", "socket-path", "fd", "print-capabilities", "log-level", ...Object.keys(def.args)]) {
        expect(r.out).toMatch(new RegExp(`^  --${name}\\b`, "m"));
      }
      const example = lines.slice(lines.indexOf("Example:") + 1).join(" ").replace(/\\ +/g, "").replace(/ +/g, " ").trim();
      expect(example).toBe(["backend", "device", def.name, ...def.example].join(" "));
    }
    const d = run(["device", "--help"]);
    expect(d.code).toBe(0);
    for (const line of d.out.split("\n")) expect(line.length).toBeLessThanOrEqual(80);
    for (const name of Object.keys(DEVICES)) expect(d.out).toMatch(new RegExp(`^  ${name}\\b`, "m"));
  });

  test("help text wraps to any width and keeps an option with its value", () => {
    for (const w of [20, 40, 80]) {
      for (const l of wrap("a ".repeat(50) + "name=NAME,output-file=PATH,input-file=PATH,syslog " + "x".repeat(100), w)) {
        expect(l.length).toBeLessThanOrEqual(w);
      }
    }
    expect(commandLine(["backend", "device", "block", "--socket", "/run/vm/disk.sock", "--file", "my disk.img"], 40)).toEqual([
      "  backend device block \\",
      "      --socket /run/vm/disk.sock \\",
      "      --file 'my disk.img'",
    ]);
  });

  test("usage errors print the help and fail", () => {
    const r = run(["device", "nosuch"]);
    expect(r.code).toBe(1);
    expect(r.out).toContain("Usage: backend device <COMMAND>");
    expect(r.err).toContain("nosuch");
  });

  test("one definition per device: the registry key is its name, capabilities come from it", () => {
    for (const [key, def] of Object.entries(DEVICES)) {
      expect(def.name).toBe(key);
      expect(Number.isInteger(def.virtioId) && def.virtioId > 0).toBe(true);
      const r = run(["device", key, "--print-capabilities"]);
      expect(r.code).toBe(0);
      expect(JSON.parse(r.out)).toEqual(JSON.parse(capabilitiesJson(def.capabilities)));
      // The example uses only options the device has.
      const known = new Set(["socket", "socket-path", "fd", "print-capabilities", "log-level", ...Object.keys(def.args)]);
      for (const a of def.example) if (a.startsWith("--")) expect(known.has(a.slice(2).split("=")[0]!.replace(/^no-/, ""))).toBe(true);
    }
    expect(DEVICES.block!.virtioId).toBe(2);
    expect(DEVICES.console!.virtioId).toBe(3);
    expect(JSON.parse(run(["device", "block", "--print-capabilities"]).out)).toEqual({ type: "block", features: ["read-only"] });
    expect(echoDevice.virtioId).toBe(0x3f); // the test device is a full definition too
  });

  test("unknown options, stray words and empty values are refused, naming the word and the closest option", () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-cli-"));
    try {
      const img = join(dir, "disk.img");
      Bun.spawnSync(["truncate", "-s", "1M", img]);
      const sock = join(dir, "s.sock");
      // Each of these used to start serving (with the option ignored); a backend that starts is
      // killed by the timeout and fails the exit-code check.
      const refuse = (args: string[], message: string) => {
        const p = Bun.spawnSync([process.execPath, MAIN, "device", "block", ...args], { stdout: "pipe", stderr: "pipe", timeout: 8000 });
        expect({ args, code: p.exitCode }).toEqual({ args, code: 1 });
        expect(p.stderr.toString()).toContain(message);
        expect(existsSync(sock)).toBe(false);
      };
      refuse(["--socket", sock, "--file", img, "--readonly"], "unknown option --readonly (did you mean --read-only?)");
      refuse(["--socket", sock, "--file", img, "--num-queue", "4"], "unknown option --num-queue (did you mean --num-queues?)");
      refuse(["--socket", sock, "--file", img, "--frobnicate"], "unknown option --frobnicate");
      refuse(["--socket", sock, "--file", img, "-r"], "unknown option -r");
      refuse(["--socket", sock, "--file", img, "extra"], "unexpected argument 'extra'");
      refuse(["--socket", sock, "--file", img, "--", "extra"], "unexpected argument 'extra'");
      refuse(["--file", img, "--socket", ""], "--socket: the value is empty");
      refuse(["--file", img, "--socket="], "--socket: the value is empty");
      refuse(["--file", img, "--socket"], "--socket needs a value");
      refuse(["--socket", "--file", img], "--socket needs a value");
      refuse(["--socket", sock, "--file", img, "--no-num-queues"], "--num-queues takes a value");
      for (const name of ["console", "net", "snd"]) {
        const p = Bun.spawnSync([process.execPath, MAIN, "device", name, "--socket", sock, "--bogus-option"], { stdout: "pipe", stderr: "pipe", timeout: 8000 });
        expect(p.exitCode).toBe(1);
        expect(p.stderr.toString()).toContain("unknown option --bogus-option");
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a socket a running backend listens on is never taken over; a stale socket file is replaced", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-cli-"));
    const sock = join(dir, "s.sock");
    const first = Bun.spawn([process.execPath, MAIN, "device", "console", "--socket", sock, "--output-file", join(dir, "out")], { stdout: "pipe", stderr: "pipe" });
    try {
      await waitFor(() => existsSync(sock));
      const second = Bun.spawnSync([process.execPath, MAIN, "device", "console", "--socket", sock, "--output-file", join(dir, "out2")], { stdout: "pipe", stderr: "pipe", timeout: 8000 });
      expect(second.exitCode).toBe(1);
      expect(second.stderr.toString()).toContain(`${sock} is in use by a running backend`);
      // The first one still answers on its path.
      const c = new FrontendConnection(sock);
      expect(c.requestU64(Req.GET_FEATURES) > 0n).toBe(true);
      close(c.fd);
    } finally {
      first.kill("SIGTERM");
      await first.exited;
    }
    // A socket file nobody listens on (a backend killed with SIGKILL leaves one) is replaced.
    close(listenUnix(sock, 1));
    const third = Bun.spawn([process.execPath, MAIN, "device", "console", "--socket", sock, "--output-file", join(dir, "out3")], { stdout: "pipe", stderr: "pipe" });
    try {
      await waitFor(() => {
        try {
          close(new FrontendConnection(sock).fd);
          return true;
        } catch {
          return false;
        }
      });
    } finally {
      third.kill("SIGTERM");
      await third.exited;
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("one boolean rule: --x, --no-x, --x=true|false|on|off|1|0, the last one wins", () => {
    for (const t of ["true", "on", "1", "ON"]) expect(parseBoolean(t, "--x")).toBe(true);
    for (const f of ["false", "off", "0", "Off"]) expect(parseBoolean(f, "--x")).toBe(false);
    for (const bad of ["", "yes", "2", "maybe"]) expect(() => parseBoolean(bad, "--x")).toThrow("--x: '" + bad + "' is not a boolean");
    expect(booleanFromArgv(["--file", "a"], "read-only")).toBeUndefined();
    expect(booleanFromArgv(["--read-only"], "read-only")).toBe(true);
    expect(booleanFromArgv(["--no-read-only"], "read-only")).toBe(false);
    expect(booleanFromArgv(["--read-only=off"], "read-only")).toBe(false);
    expect(booleanFromArgv(["--read-only=1"], "read-only")).toBe(true);
    expect(booleanFromArgv(["--read-only", "--no-read-only"], "read-only")).toBe(false);
    expect(booleanFromArgv(["--no-read-only", "--read-only=on"], "read-only")).toBe(true);
    expect(booleanFromArgv(["--", "--read-only"], "read-only")).toBeUndefined();
    expect(() => booleanFromArgv(["--read-only=maybe"], "read-only")).toThrow("not a boolean");
    expect(booleanOption({}, "sparse", true)).toBe(true);
    expect(booleanOption({ sparse: false }, "sparse", true)).toBe(false);
    expect(booleanOption({ sparse: "off" }, "sparse", true)).toBe(false);
    expect(() => booleanOption({ sparse: "nope" }, "sparse", true)).toThrow("--sparse: 'nope' is not a boolean");

    const r = run(["device", "console", "--socket", "/tmp/never.sock", "--config-space=perhaps"]);
    expect(r.code).toBe(1);
    expect(r.err).toContain("--config-space: 'perhaps' is not a boolean");
  });

  test("--read-only=off serves read-write and --read-only=on read-only (citty alone read both as on)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-cli-"));
    try {
      const img = join(dir, "disk.img");
      await Bun.write(img, new Uint8Array(1 << 20));
      for (const [value, ro] of [["off", false], ["on", true]] as const) {
        const sock = join(dir, `blk-${value}.sock`);
        const p = Bun.spawn([process.execPath, MAIN, "device", "block", "--socket", sock, "--file", img, `--read-only=${value}`, "--num-queues", "1"], {
          stdout: "pipe", stderr: "pipe", stdin: "ignore",
        });
        await waitFor(() => existsSync(sock));
        const c = new FrontendConnection(sock);
        expect((c.requestU64(Req.GET_FEATURES) & VIRTIO_BLK_F_RO) !== 0n).toBe(ro);
        c.close();
        p.kill("SIGTERM");
        expect(await p.exited).toBe(0);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
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

  test("socket activation: serves the listening socket systemd passes as fd 3 (LISTEN_FDS, LISTEN_PID)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "vhu-cli-"));
    try {
      const sock = join(dir, "disk.sock");
      const img = join(dir, "disk.img");
      await Bun.write(img, new Uint8Array(1 << 20));
      const listenFd = listenUnix(sock, 4);
      const p = spawnActivated(["device", "block", "--file", img, "--num-queues", "1"], listenFd);
      close(listenFd);
      const c = new FrontendConnection(sock, 10_000);
      const features = c.requestU64(Req.GET_FEATURES);
      expect(features & (1n << 32n)).toBe(1n << 32n); // VIRTIO_F_VERSION_1
      c.close();
      p.kill("SIGTERM");
      expect(await p.exited).toBe(0);
      expect(existsSync(sock)).toBe(true); // the socket unit's path belongs to systemd
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("socket activation: LISTEN_PID of another process is refused", async () => {
    const p = Bun.spawn([process.execPath, MAIN, "device", "console", "--output-file", "/dev/null"], {
      env: { ...process.env, LISTEN_FDS: "1", LISTEN_PID: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    expect(await p.exited).toBe(1);
    expect(await new Response(p.stderr).text()).toContain("LISTEN_PID=1 is not this process");
  });

  test("socket activation: fd 3 must be one listening unix socket", async () => {
    const cases: [number | "ignore", Record<string, string>, string][] = [];
    const [a, b] = socketPair();
    cases.push([a, { LISTEN_FDS: "1" }, "is a connected socket, not a listening one"]);
    cases.push(["ignore", { LISTEN_FDS: "1" }, "fd 3 from systemd (LISTEN_FDS) is not a socket"]);
    cases.push([a, { LISTEN_FDS: "2" }, "systemd passed 2 sockets"]);
    try {
      for (const [fd3, env, message] of cases) {
        const p = spawnActivated(["device", "console", "--output-file", "/dev/null"], fd3, env);
        expect(await p.exited).toBe(1);
        expect(await new Response(p.stderr).text()).toContain(message);
      }
    } finally {
      close(a);
      close(b);
    }
  });

  test("socket activation reads and unsets LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES like sd_listen_fds(unset=1)", () => {
    const env: Record<string, string | undefined> = { LISTEN_PID: "42", LISTEN_FDS: "1", LISTEN_FDNAMES: "disk", HOME: "/root" };
    expect(systemdListenFds(env, 42)).toBe(1);
    expect(env).toEqual({ HOME: "/root" });
    expect(systemdListenFds({}, 42)).toBe(0);
    const wrong: Record<string, string | undefined> = { LISTEN_PID: "41", LISTEN_FDS: "1" };
    expect(() => systemdListenFds(wrong, 42)).toThrow("LISTEN_PID=41 is not this process");
    expect(wrong).toEqual({}); // unset even when they were not for us
    expect(() => systemdListenFds({ LISTEN_FDS: "1" }, 42)).toThrow("LISTEN_PID is not");
    expect(() => systemdListenFds({ LISTEN_PID: "42", LISTEN_FDS: "x" }, 42)).toThrow("LISTEN_FDS=x");
  });
});
