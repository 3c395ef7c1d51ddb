// The backend as a service manager and an operator meet it: Type=notify with a NOTIFY_SOCKET the
// test owns, SIGHUP, machine logs (no escape codes anywhere, priorities under journald), metrics
// counted and scraped, who may connect (--allow-uid, --socket-mode, --socket-group), errors that
// name the option, and a stop during startup that leaves no socket file.
import { afterAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync, openSync, closeSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FrontendConnection, Req } from "../support/frontend.ts";
import { bindUnixDatagram } from "../../ffi/socket.ts";
import { read } from "../../ffi/io.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { parseExposition } from "../support/metrics_parse.ts";

const MAIN = join(import.meta.dir, "../../app/main.ts");
const dir = mkdtempSync(join(tmpdir(), "ops-cli-"));
chmodSync(dir, 0o755); // the other-uid peer must reach the socket
const image = join(dir, "disk.img");
writeFileSync(image, new Uint8Array(1 << 20));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function waitFor(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out");
    await Bun.sleep(10);
  }
}

function datagrams(fd: number): string[] {
  const out: string[] = [];
  const buf = new Uint8Array(4096);
  for (;;) {
    const n = read(fd, buf, buf.length);
    if (n === -EAGAIN) return out;
    out.push(new TextDecoder().decode(buf.subarray(0, n)));
  }
}

/** A backend whose stderr goes to a file (not a terminal), so the test can check every byte. */
function backend(args: string[], env: Record<string, string> = {}, name = "b") {
  const errPath = join(dir, `${name}.stderr`);
  const fd = openSync(errPath, "w");
  const st = statSync(errPath, { bigint: true });
  const journal = `${st.dev}:${st.ino}`;
  const e = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v.replace("{stderr}", journal)]));
  const p = Bun.spawn([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: fd, env: { ...process.env, ...e } });
  closeSync(fd);
  return { p, stderr: () => readFileSync(errPath, "utf8") };
}

describe("service manager", () => {
  test("Type=notify: READY=1 once listening (status says where), STOPPING=1 on SIGHUP, socket removed, exit 0", async () => {
    const sock = join(dir, "notify.sock");
    const notify = join(dir, "notify.dgram");
    const nfd = bindUnixDatagram(notify);
    const b = backend(["device", "block", "--socket", sock, "--file", image], { NOTIFY_SOCKET: notify, JOURNAL_STREAM: "" });
    try {
      let got: string[] = [];
      await waitFor(() => (got.push(...datagrams(nfd)), got.length > 0));
      expect(existsSync(sock)).toBe(true); // READY only once the socket listens
      expect(got[0]).toMatch(new RegExp(`^READY=1\nSTATUS=listening on ${sock} \\(block, \\d+ queues, features 0x[0-9a-f]+\\)\nMAINPID=${b.p.pid}$`));
      const c = new FrontendConnection(sock);
      expect(c.requestU64(Req.GET_FEATURES) > 0n).toBe(true);
      close(c.fd);
      b.p.kill("SIGHUP");
      expect(await b.p.exited).toBe(0);
      got = datagrams(nfd);
      expect(got).toEqual(["STOPPING=1"]);
      expect(existsSync(sock)).toBe(false);
      const err = b.stderr();
      expect(err).toContain(`info block: listening on ${sock} (block,`);
      expect(err).toContain("SIGHUP: shutting down");
      expect(err).toMatch(/info block\[1\]: front-end connected \(session 1\) pid=\d+ uid=\d+ gid=\d+/);
      expect(err).toMatch(/info block\[1\]: session 1 summary seconds=[0-9.]+ messages=1\b/);
      expect(err).not.toContain("\x1b");
      expect(err).not.toMatch(/\n\n/);
    } finally {
      b.p.kill("SIGKILL");
      close(nfd);
    }
  });

  test("a stop during startup leaves no socket file behind (no sandbox)", async () => {
    // SIGTERM at many points of startup: the socket file never outlives the process.
    for (const delay of [5, 20, 40, 60, 80, 120]) {
      const sock = join(dir, `early-${delay}.sock`);
      const b = backend(["device", "block", "--socket", sock, "--file", image, "--sandbox", "none"]);
      await Bun.sleep(delay);
      b.p.kill("SIGTERM");
      await b.p.exited;
      expect(existsSync(sock)).toBe(false);
      expect(readdirSync(dir).filter((f) => f.startsWith(`.early-${delay}.`))).toEqual([]);
    }
  });

  test("a stop just after the sandbox's re-exec (run from sources) stops the backend and leaves no socket file behind", async () => {
    // The re-exec'd image is running once its environment holds the hand-over; from sources it then
    // loads its modules for 100 ms or more, with Bun's event loop turning (and delivering signals)
    // in between. Before app/sandbox_entry.ts, a stop there killed the process by the default
    // action (exit by SIGTERM) and left the bound socket (.NAME.PID.tmp).
    for (const after of [0, 5, 20, 50, 100]) {
      const sock = join(dir, `reexec-${after}.sock`);
      const b = backend(["device", "block", "--socket", sock, "--file", image], {}, `reexec-${after}`);
      const environ = `/proc/${b.p.pid}/environ`;
      await waitFor(() => {
        try {
          return readFileSync(environ, "latin1").includes("\0VHOST_BACKEND_SANDBOX=");
        } catch {
          return false;
        }
      }, 20_000);
      if (after > 0) await Bun.sleep(after);
      b.p.kill("SIGTERM");
      await b.p.exited;
      expect({ after, code: b.p.exitCode, signal: b.p.signalCode, left: readdirSync(dir).filter((f) => f.includes(`reexec-${after}.sock`)) }).toEqual({ after, code: 0, signal: null, left: [] });
    }
  });

  test("under journald (JOURNAL_STREAM names stderr): every line starts with its syslog priority", async () => {
    const sock = join(dir, "journal.sock");
    const b = backend(["device", "block", "--socket", sock, "--file", image], { JOURNAL_STREAM: "{stderr}" }, "journal");
    await waitFor(() => b.stderr().includes("listening on"));
    b.p.kill("SIGTERM");
    await b.p.exited;
    const lines = b.stderr().trimEnd().split("\n");
    for (const l of lines) expect(l).toMatch(/^<[0-7]>(info|warn|error|debug) block/);
    expect(lines.some((l) => l.startsWith(`<6>info block: listening on ${sock}`))).toBe(true);
  });

  test("--log-format json: one object per line", async () => {
    const sock = join(dir, "json.sock");
    const b = backend(["device", "block", "--socket", sock, "--file", image, "--log-format", "json"], {}, "json");
    await waitFor(() => b.stderr().includes("listening on"));
    b.p.kill("SIGTERM");
    await b.p.exited;
    const events = b.stderr().trimEnd().split("\n").map((l) => JSON.parse(l));
    expect(events.find((e) => e.message.startsWith("listening on"))).toMatchObject({ level: "info", device: "block", session: null });
  });
});

describe("logs and errors", () => {
  function run(args: string[]) {
    const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env: { ...process.env, JOURNAL_STREAM: "" } });
    return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
  }

  test("usage errors from the CLI library: one log line, no escape codes", () => {
    const r = run(["frobnicate"]);
    expect(r.code).toBe(1);
    expect(r.err).not.toContain("\x1b");
    expect(r.err.trimEnd().split("\n")).toHaveLength(1);
    expect(r.err).toMatch(/error Unknown command frobnicate\n$/);
  });

  test("libasound's own stderr chatter becomes one debug line of our log", () => {
    const conf = join(dir, "asound.conf");
    writeFileSync(conf, "pcm.null { type null }\n");
    const args = ["device", "snd", "--socket", join(dir, "alsa.sock"), "--backend", "alsa", "--streams", "out=1,in=0", "--alsa-playback", "no_such_pcm"];
    const env = { ...process.env, ALSA_CONFIG_PATH: conf, JOURNAL_STREAM: "" };
    const info = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", env });
    expect(info.exitCode).toBe(1);
    expect(info.stderr.toString()).not.toContain("ALSA lib");
    expect(info.stderr.toString().trimEnd().split("\n")).toEqual([expect.stringMatching(/error snd: --alsa-playback no_such_pcm: .*no_such_pcm/)]);
    const debug = Bun.spawnSync([process.execPath, MAIN, ...args, "--log-level", "debug"], { stdout: "pipe", stderr: "pipe", env });
    expect(debug.stderr.toString()).not.toContain("ALSA lib");
    expect(debug.stderr.toString()).toMatch(/debug snd: ALSA: pcm\.c:\d+ \(snd_pcm_open_noupdate\): Unknown PCM no_such_pcm\n/);
  });

  test("errors name the option", () => {
    const long = join(dir, "x".repeat(120));
    const cases: [string[], RegExp][] = [
      [["device", "block", "--fd", "97", "--file", image], /--fd 97: not an open file descriptor/],
      [["device", "console", "--socket", join(dir, "c.sock"), "--output-file", dir], new RegExp(`--output-file ${dir}: is a directory`)],
      [["device", "block", "--socket", long, "--file", image], /--socket \S+: 1\d\d bytes, longer than the 107 a unix socket path may have: .* --fd/],
      [["device", "block", "--socket", join(dir, "nodir", "s.sock"), "--file", image], /--socket \S+: its directory does not exist/],
      [["device", "block", "--socket", join(dir, "m.sock"), "--file", image, "--socket-mode", "888"], /--socket-mode 888: not an octal mode/],
      [["device", "block", "--fd", "0", "--file", image, "--socket-mode", "0600"], /--socket-mode: only for a socket the backend creates/],
      [["device", "block", "--socket", join(dir, "g.sock"), "--file", image, "--socket-group", "no-such-group-xyz"], /--socket-group no-such-group-xyz: no such group/],
      [["device", "block", "--socket", join(dir, "u.sock"), "--file", image, "--allow-uid", "root,nosuchuserxyz"], /--allow-uid root,nosuchuserxyz: no such user 'nosuchuserxyz'/],
      [["device", "block", "--socket", join(dir, "l.sock"), "--file", image, "--log-format", "xml"], /--log-format xml: unknown format/],
      [["device", "block", "--socket", join(dir, "mm.sock"), "--file", image, "--metrics", "nowhere"], /--metrics nowhere: not an address/],
    ];
    for (const [args, want] of cases) {
      const r = run(args);
      expect(r.code).toBe(1);
      expect(r.err).toMatch(want);
      expect(r.err).not.toContain("\x1b");
    }
    expect(existsSync(join(dir, "m.sock"))).toBe(false);
  });
});

describe("who may connect", () => {
  test("--socket-mode and --socket-group set the socket file's permissions before anyone can connect", async () => {
    const sock = join(dir, "perm.sock");
    const b = backend(["device", "block", "--socket", sock, "--file", image, "--socket-mode", "0660", "--socket-group", "nogroup"]);
    try {
      await waitFor(() => b.stderr().includes("listening on"));
      const st = statSync(sock);
      expect(st.mode & 0o777).toBe(0o660);
      expect(st.gid).toBe(65534);
    } finally {
      b.p.kill("SIGTERM");
      await b.p.exited;
    }
  });

  test("--allow-uid: a front-end of another uid is refused (logged, counted, dropped); an allowed one is served", async () => {
    const sock = join(dir, "allow.sock");
    const msock = join(dir, "allow-metrics.sock");
    const me = process.getuid!();
    const b = backend(["device", "block", "--socket", sock, "--file", image, "--socket-mode", "0666", "--allow-uid", String(me), "--metrics", `unix:${msock}`, "--sandbox", "none"]);
    try {
      await waitFor(() => b.stderr().includes("listening on"));
      // nobody connects and waits to be served: the backend closes the connection at once.
      const other = Bun.spawnSync(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
        `import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(${JSON.stringify(sock)})\ns.settimeout(5)\nprint(len(s.recv(16)))`]);
      expect(other.stderr.toString()).toBe("");
      expect(other.stdout.toString().trim()).toBe("0"); // EOF: dropped
      await waitFor(() => b.stderr().includes("refused a front-end"));
      expect(b.stderr()).toMatch(/warn block: refused a front-end: uid 65534 gid 65534 is not in --allow-uid\/--allow-gid pid=\d+ uid=65534 gid=65534/);
      const c = new FrontendConnection(sock);
      expect(c.requestU64(Req.GET_FEATURES) > 0n).toBe(true);
      const text = await (await fetch("http://localhost/metrics", { unix: msock, headers: { accept: "application/openmetrics-text" } })).text();
      const p = parseExposition(text, "openmetrics");
      const v = (n: string) => p.samples.find(([name]) => name === n)?.[2];
      expect(v("vhost_peers_refused_total")).toBe(1);
      expect(v("vhost_sessions_total")).toBe(1);
      expect(v("vhost_messages_total")).toBe(1);
      close(c.fd);
    } finally {
      b.p.kill("SIGTERM");
      await b.p.exited;
    }
    expect(existsSync(msock)).toBe(false);
  });

  test("under the sandbox (its re-exec'd image), names given to --allow-uid and --socket-group still work: looked up before it", async () => {
    const sock = join(dir, "names.sock");
    const b = backend(["device", "block", "--socket", sock, "--file", image, "--socket-mode", "0660", "--socket-group", "nogroup", "--allow-uid", "nobody,root"], {}, "names");
    try {
      await waitFor(() => b.stderr().includes("listening on"));
      expect(statSync(sock).gid).toBe(65534);
      const c = new FrontendConnection(sock); // root: allowed
      expect(c.requestU64(Req.GET_FEATURES) > 0n).toBe(true);
      close(c.fd);
    } finally {
      b.p.kill("SIGTERM");
      await b.p.exited;
    }
  });

  test("a second front-end waiting is said once", async () => {
    const sock = join(dir, "second.sock");
    const b = backend(["device", "block", "--socket", sock, "--file", image], {}, "second");
    try {
      await waitFor(() => b.stderr().includes("listening on"));
      const first = new FrontendConnection(sock);
      first.requestU64(Req.GET_FEATURES);
      const second = new FrontendConnection(sock); // sits in the backlog
      await waitFor(() => b.stderr().includes("another front-end is waiting"));
      expect(b.stderr().match(/another front-end is waiting/g)).toHaveLength(1);
      close(first.fd);
      await waitFor(() => b.stderr().includes("session 2"));
      expect(second.requestU64(Req.GET_FEATURES) > 0n).toBe(true);
      close(second.fd);
    } finally {
      b.p.kill("SIGTERM");
      await b.p.exited;
    }
  });
});
