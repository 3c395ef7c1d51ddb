// The process-wide logger, one instance per thread (threads get the settings main chose).
//
// Two audiences. On a terminal: short colored lines for a person. Anywhere else (a pipe, a file,
// journald): one line per event, no colors, glyphs or blank lines, in `text` (time level
// device[session]: message key=value...) or `json` (one object per line). Under journald (stderr
// is the stream JOURNAL_STREAM names) each line starts with the syslog priority `<N>`, which
// journald turns into the entry's priority, and the time is left to journald.
import { fstatSync, writeSync } from "node:fs";
import { isatty } from "node:tty";

export const LOG_LEVELS: Record<string, number> = {
  silent: -999, fatal: 0, error: 0, warn: 1, info: 3, debug: 4, trace: 5,
};
export const LOG_FORMATS = ["text", "json"] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];
type Level = "fatal" | "error" | "warn" | "info" | "debug" | "trace";

const LEVEL_VALUE: Record<Level, number> = { fatal: 0, error: 0, warn: 1, info: 3, debug: 4, trace: 5 };
/** syslog priorities (sd-daemon.h): crit, err, warning, info, debug. */
const SYSLOG_PRIORITY: Record<Level, number> = { fatal: 2, error: 3, warn: 4, info: 6, debug: 7, trace: 7 };
const TTY_COLOR: Record<Level, string> = { fatal: "\x1b[41;97m", error: "\x1b[31m", warn: "\x1b[33m", info: "\x1b[36m", debug: "\x1b[90m", trace: "\x1b[90m" };

/** What another thread needs to log the same way as this one. */
export interface LogSettings {
  level: string;
  format: LogFormat;
  device?: string;
}

/** Where stderr goes, as far as the log's shape is concerned. */
export interface LogSink {
  /** stderr is a terminal: human lines, colors. */
  tty: boolean;
  /** stderr is the journald stream JOURNAL_STREAM names: `<N>` priority prefixes, no time. */
  journal: boolean;
  write(line: string): void;
}

/** Whether fd 2 is the stream named by JOURNAL_STREAM ("DEV:INO", systemd.exec(5)). */
export function stderrIsJournal(env: Record<string, string | undefined> = process.env, fd = 2): boolean {
  const want = env.JOURNAL_STREAM;
  if (!want) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return want === `${st.dev}:${st.ino}`;
  } catch {
    return false;
  }
}

function stderrSink(): LogSink {
  return {
    tty: isatty(2),
    journal: stderrIsJournal(),
    write(line) {
      try {
        writeSync(2, line); // one write per line: lines from threads never interleave
      } catch {
        // stderr closed or full (EAGAIN on a non-blocking pipe): a lost log line beats a crash
      }
    },
  };
}

// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]/g;
/** Removes ANSI escape sequences (colors and cursor moves libraries put in their messages). */
export function stripAnsi(s: string): string {
  return s.replace(ANSI, "");
}

/** One line: escapes and color codes removed, newlines and other control characters escaped. */
function oneLine(s: string): string {
  // eslint-disable-next-line no-control-regex
  return stripAnsi(s).trim().replace(/[\x00-\x1f\x7f]/g, (c) => (c === "\n" ? "\\n" : c === "\t" ? " " : `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`));
}

function isFields(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !(v instanceof Error) && Object.getPrototypeOf(v) === Object.prototype;
}

function describe(v: unknown): string {
  if (typeof v === "string") return v;
  if (v instanceof Error) return v.message;
  try {
    return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? x.toString() : x)) ?? String(v);
  } catch {
    return String(v);
  }
}

function fieldText(v: unknown): string {
  const s = typeof v === "string" ? v : describe(v);
  return /^[^\s"=]*$/.test(s) && s !== "" ? s : JSON.stringify(s);
}

export class Logger {
  level = LEVEL_VALUE.info;
  format: LogFormat = "text";
  device: string | undefined;
  /** The current front-end session's number (1, 2... per process), when one is connected. */
  session: number | undefined;

  constructor(private sink: LogSink = stderrSink()) {}

  /** Replaces where lines go (tests). */
  setSink(sink: LogSink): void {
    this.sink = sink;
  }

  fatal(...args: unknown[]): void { this.emit("fatal", args); }
  error(...args: unknown[]): void { this.emit("error", args); }
  warn(...args: unknown[]): void { this.emit("warn", args); }
  info(...args: unknown[]): void { this.emit("info", args); }
  debug(...args: unknown[]): void { this.emit("debug", args); }
  trace(...args: unknown[]): void { this.emit("trace", args); }

  /**
   * Logs `args` joined by spaces (Errors by their message). A plain object as the last argument
   * is the event's fields: `key=value` in text, `fields` in json.
   */
  private emit(level: Level, args: unknown[]): void {
    if (LEVEL_VALUE[level] > this.level) return;
    let fields: Record<string, unknown> | undefined;
    if (args.length > 1 && isFields(args.at(-1))) fields = args.pop() as Record<string, unknown>;
    else if (args.length === 1 && isFields(args[0])) fields = args.pop() as Record<string, unknown>;
    const message = args.map(describe).join(" ");
    this.sink.write(this.render(level, message, fields, new Date()) + "\n");
  }

  /** The line for one event, without its newline. */
  render(level: Level, message: string, fields: Record<string, unknown> | undefined, time: Date): string {
    const { tty, journal } = this.sink;
    const prefix = journal ? `<${SYSLOG_PRIORITY[level]}>` : "";
    const where = this.device === undefined ? "" : this.session === undefined ? this.device : `${this.device}[${this.session}]`;
    if (this.format === "json") {
      const o: Record<string, unknown> = { time: time.toISOString(), level, device: this.device ?? null, session: this.session ?? null, message: stripAnsi(message) };
      if (fields !== undefined) o.fields = fields;
      return prefix + JSON.stringify(o, (_k, x) => (typeof x === "bigint" ? x.toString() : typeof x === "string" ? stripAnsi(x) : x));
    }
    const kv = fields === undefined ? "" : Object.entries(fields).map(([k, v]) => ` ${k}=${fieldText(v)}`).join("");
    if (tty) {
      const label = `${TTY_COLOR[level]}${level.padEnd(5)}\x1b[0m`;
      // A person reads this: multi-line messages (stack traces) stay readable.
      return `${label} ${where === "" ? "" : `\x1b[2m${where}\x1b[0m `}${message}${oneLine(kv)}`;
    }
    const head = journal ? `${level}` : `${time.toISOString()} ${level}`;
    return oneLine(`${prefix}${head} ${where === "" ? "" : `${where}: `}${message}${kv}`);
  }
}

export const log = new Logger();

/** Sets the level by name ("info", "debug"...); unknown names throw. */
export function setLogLevel(name: string): void {
  const level = LOG_LEVELS[name];
  if (level === undefined) throw new Error(`--log-level ${name}: unknown level (one of ${Object.keys(LOG_LEVELS).join(", ")})`);
  log.level = level;
}

/** Sets the format by name; unknown names throw. */
export function setLogFormat(name: string): void {
  if (!(LOG_FORMATS as readonly string[]).includes(name)) throw new Error(`--log-format ${name}: unknown format (one of ${LOG_FORMATS.join(", ")})`);
  log.format = name as LogFormat;
}

/** The name of the current level (to hand the same level to other threads). */
export function logLevelName(): string {
  return Object.entries(LOG_LEVELS).find(([, v]) => v === log.level)?.[0] ?? "info";
}

/** This thread's settings, for another thread's applyLogSettings. */
export function logSettings(): LogSettings {
  return { level: logLevelName(), format: log.format, device: log.device };
}

export function applyLogSettings(s: LogSettings): void {
  setLogLevel(s.level);
  setLogFormat(s.format);
  log.device = s.device;
}
