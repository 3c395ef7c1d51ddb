// Logs for machines: with stderr not a terminal, one line per event, no escape codes; syslog
// priority prefixes exactly when JOURNAL_STREAM names stderr; --log-format json.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, statSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Logger, stripAnsi, type LogSink } from "../../src/log.ts";

const LOG_MODULE = join(import.meta.dir, "../../src/log.ts");

/** Runs a child that logs a few events through src/log.ts with stderr into a file; returns the file's text. */
function childLog(env: Record<string, string>, format = "text", setup = ""): { text: string; journal: string } {
  const dir = mkdtempSync(join(tmpdir(), "ops-log-"));
  const errPath = join(dir, "stderr");
  try {
    const script = `
      import { log, setLogFormat, setLogLevel } from ${JSON.stringify(LOG_MODULE)};
      setLogLevel("debug"); setLogFormat(${JSON.stringify(format)}); log.device = "block"; ${setup}
      log.info("listening on /tmp/x.sock", { features: "read-only" });
      log.warn("a\\nmulti-line\\nwarning \\x1b[36mcolored\\x1b[39m");
      log.error("failed:", new Error("boom"));
      log.debug("detail");
      log.session = 3;
      log.info("front-end connected", { pid: 42, uid: 0 });
    `;
    const fd = require("node:fs").openSync(errPath, "w");
    const ino = statSync(errPath, { bigint: true });
    const journal = `${ino.dev}:${ino.ino}`;
    const envAll = { ...process.env, ...Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v.replace("{stderr}", journal)])) };
    const r = Bun.spawnSync([process.execPath, "-e", script], { stderr: fd, stdout: "pipe", env: envAll });
    require("node:fs").closeSync(fd);
    expect(r.exitCode).toBe(0);
    return { text: readFileSync(errPath, "utf8"), journal };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("logs when stderr is not a terminal", () => {
  test("text: one line per event, no escape codes, time, level, device[session], fields", () => {
    const { text } = childLog({ JOURNAL_STREAM: "" });
    expect(text).not.toContain("\x1b");
    const lines = text.split("\n");
    expect(lines.at(-1)).toBe(""); // ends with a newline
    lines.pop();
    expect(lines).toHaveLength(5);
    for (const l of lines) {
      expect(l).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (info|warn|error|debug) block(\[3\])?: \S/);
      expect(l.trim()).toBe(l);
    }
    expect(lines[0]).toEndWith("info block: listening on /tmp/x.sock features=read-only");
    expect(lines[1]).toEndWith("warn block: a\\nmulti-line\\nwarning colored");
    expect(lines[2]).toEndWith("error block: failed: boom");
    expect(lines[4]).toEndWith("info block[3]: front-end connected pid=42 uid=0");
  });

  test("JOURNAL_STREAM naming stderr: syslog priority prefixes, no time (journald stamps it)", () => {
    const { text } = childLog({ JOURNAL_STREAM: "{stderr}" });
    const lines = text.trimEnd().split("\n");
    expect(lines.map((l) => l.slice(0, 3))).toEqual(["<6>", "<4>", "<3>", "<7>", "<6>"]);
    expect(lines[0]).toBe("<6>info block: listening on /tmp/x.sock features=read-only");
    expect(text).not.toContain("\x1b");
  });

  test("JOURNAL_STREAM naming another stream (inherited by a child whose stderr was redirected): no prefixes", () => {
    const { text } = childLog({ JOURNAL_STREAM: "8:12345" });
    expect(text).not.toMatch(/^</m);
    expect(text.trimEnd().split("\n")).toHaveLength(5);
  });

  test("json: one object per line with time, level, device, session, message, fields", () => {
    const { text } = childLog({ JOURNAL_STREAM: "" }, "json");
    expect(text).not.toContain("\x1b");
    const events = text.trimEnd().split("\n").map((l) => JSON.parse(l));
    expect(events).toHaveLength(5);
    for (const e of events) {
      expect(Object.keys(e).slice(0, 5)).toEqual(["time", "level", "device", "session", "message"]);
      expect(Number.isNaN(Date.parse(e.time))).toBe(false);
    }
    expect(events[0]).toMatchObject({ level: "info", device: "block", session: null, message: "listening on /tmp/x.sock", fields: { features: "read-only" } });
    expect(events[1].message).toBe("a\nmulti-line\nwarning colored");
    expect(events[4]).toMatchObject({ session: 3, message: "front-end connected", fields: { pid: 42, uid: 0 } });
  });

  test("json under journald: the priority prefix, then the object", () => {
    const { text } = childLog({ JOURNAL_STREAM: "{stderr}" }, "json");
    const lines = text.trimEnd().split("\n");
    expect(lines[2]!.slice(0, 3)).toBe("<3>");
    expect(JSON.parse(lines[2]!.slice(3)).level).toBe("error");
  });
});

describe("Logger", () => {
  test("levels filter; a terminal gets colors (and only a terminal)", () => {
    const lines: string[] = [];
    const sink: LogSink = { tty: true, journal: false, write: (l) => void lines.push(l) };
    const l = new Logger(sink);
    l.level = 1; // warn
    l.info("hidden");
    l.warn("shown");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain("\x1b[");
    expect(stripAnsi(lines[0]!)).toBe("warn  shown\n");
  });

  test("stripAnsi removes SGR and cursor sequences", () => {
    expect(stripAnsi("Unknown command \x1b[36mfoo\x1b[39m\x1b[2K\x1b[1G")).toBe("Unknown command foo");
  });
});
