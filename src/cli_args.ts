// Command-line helpers citty lacks: repeatable options, one boolean rule for every device, and
// systemd socket activation.

/**
 * Every value of a repeatable option in `argv`. citty (through node:util parseArgs without
 * `multiple`) keeps only the last one; the command line still has them all.
 */
export function repeatedOption(argv: readonly string[], name: string): string[] {
  const out: string[] = [];
  const flagName = `--${name}`;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") break;
    if (a === flagName && i + 1 < argv.length) out.push(argv[++i]!);
    else if (a.startsWith(`${flagName}=`)) out.push(a.slice(flagName.length + 1));
  }
  return out;
}

// ---- booleans ----
//
// The one rule for every boolean option of every device: `--x` is true, `--no-x` is false,
// `--x=true|on|1` and `--x=false|off|0` say it explicitly, anything else is an error; the last
// one given wins. citty alone turns every `--x=VALUE` but `--x=false` into true (so `--x=off`
// meant on), which is why main.ts re-reads booleans from argv with booleanFromArgv().

const TRUE_WORDS = ["true", "on", "1"];
const FALSE_WORDS = ["false", "off", "0"];

/** `true|on|1` or `false|off|0`; throws naming `what` (e.g. "--read-only") otherwise. */
export function parseBoolean(text: string, what: string): boolean {
  const t = text.toLowerCase();
  if (TRUE_WORDS.includes(t)) return true;
  if (FALSE_WORDS.includes(t)) return false;
  throw new Error(`${what}: '${text}' is not a boolean (true/false, on/off, 1/0)`);
}

/**
 * The boolean option `name` from parsed options (what the device's validate() and create() get):
 * `dflt` when absent, a boolean as it is, a string by parseBoolean().
 */
export function booleanOption(raw: Record<string, unknown>, name: string, dflt: boolean): boolean {
  const v = raw[name];
  if (v === undefined || v === null) return dflt;
  if (typeof v === "boolean") return v;
  return parseBoolean(String(v), `--${name}`);
}

/**
 * The boolean option `name` as the command line gives it (`--x`, `--no-x`, `--x=VALUE`, the last
 * one winning), or undefined when it is not there. Throws on a VALUE the rule does not accept.
 */
export function booleanFromArgv(argv: readonly string[], name: string): boolean | undefined {
  let out: boolean | undefined;
  const flagName = `--${name}`;
  for (const a of argv) {
    if (a === "--") break;
    if (a === flagName) out = true;
    else if (a === `--no-${name}`) out = false;
    else if (a.startsWith(`${flagName}=`)) out = parseBoolean(a.slice(flagName.length + 1), flagName);
  }
  return out;
}

// ---- systemd socket activation (sd_listen_fds(3)) ----

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
export const SD_LISTEN_FDS_START = 3;

/**
 * sd_listen_fds(unset=1): how many sockets systemd passed to this process, from fd 3 on; 0 when
 * neither LISTEN_FDS nor LISTEN_PID is set. Throws when they are set but not for us (LISTEN_PID is
 * another process: the variables leaked through a fork) or malformed. Like sd_listen_fds with
 * unset, it removes LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from `env` whatever it finds.
 */
export function systemdListenFds(env: Record<string, string | undefined>, pid: number): number {
  const fds = env.LISTEN_FDS;
  const listenPid = env.LISTEN_PID;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (fds === undefined && listenPid === undefined) return 0;
  if (listenPid === undefined) throw new Error("LISTEN_FDS is set but LISTEN_PID is not: not started by systemd socket activation");
  if (!/^[0-9]+$/.test(listenPid) || Number(listenPid) !== pid) {
    throw new Error(`LISTEN_PID=${listenPid} is not this process (pid ${pid}): the sockets were passed to another process`);
  }
  if (fds === undefined || !/^[0-9]+$/.test(fds)) throw new Error(`LISTEN_FDS=${fds ?? ""} is not a number of sockets`);
  return Number(fds);
}

/**
 * The integer option `name` (decimal digits only) in min..max, `dflt` when absent; throws naming
 * the option otherwise.
 */
export function intOption(raw: Record<string, unknown>, name: string, dflt: number, min: number, max: number): number {
  const v = raw[name];
  if (v === undefined || v === null || v === "") return dflt;
  const n = typeof v === "number" ? v : /^[0-9]+$/.test(String(v)) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) throw new Error(`--${name}: '${String(v)}' is not an integer in ${min}..${max}`);
  return n;
}

const OPTION_ERRNO_REASONS: Record<string, string> = {
  EBADF: "not an open file descriptor",
  ENOTSOCK: "not a socket",
  EACCES: "permission denied",
  EPERM: "not permitted",
  ENOENT: "no such file or directory (or its directory does not exist)",
  EISDIR: "is a directory",
  ENOTDIR: "a component of the path is not a directory",
  EADDRINUSE: "already in use",
  EROFS: "read-only file system",
  ENXIO: "no such device",
};

/**
 * An error from a system call made for an option, said in the option's terms
 * (`--output-file /tmp: is a directory`, `--fd 9: not an open file descriptor`).
 */
export function optionError(option: string, e: unknown, reasons: Readonly<Record<string, string>> = {}): Error {
  const code = (e as { code?: unknown })?.code;
  if (typeof code !== "string" || !(e instanceof Error)) return e as Error;
  return new Error(`${option}: ${reasons[code] ?? OPTION_ERRNO_REASONS[code] ?? e.message}`);
}
