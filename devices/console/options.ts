// `backend device console` options: parsed and checked once in the main thread (so mistakes fail
// before the socket exists) and again in the worker, which gets the same plain object.
import { existsSync } from "node:fs";
import { MAX_EXTRA_PORTS } from "./config.ts";
import { PORT_NAME_MAX } from "./control.ts";
import { booleanOption, parseBoolean } from "../../src/cli_args.ts";

/** Where one port's guest output goes and its guest input comes from. */
export interface PortEndpointOptions {
  /** null: stdout for port 0, discarded for other ports (unless syslog). */
  outputFile: string | null;
  /** null: stdin for port 0, no input for other ports. */
  inputFile: string | null;
  syslog: boolean;
}

export interface ExtraPortOptions extends PortEndpointOptions {
  name: string | null;
}

export interface ConsoleOptions {
  port0: PortEndpointOptions;
  /** Ports 1..N (MULTIPORT when there is at least one). */
  ports: ExtraPortOptions[];
  /** The front-end exposes the config space: offer SIZE and EMERG_WRITE. */
  configSpace: boolean;
  syslogSocket: string;
}

export const DEFAULT_SYSLOG_SOCKET = "/dev/log";
const PORT_NAME_RE = new RegExp(`^[A-Za-z0-9][A-Za-z0-9._-]{0,${PORT_NAME_MAX - 1}}$`);

function str(v: unknown, what: string): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== "string" || v === "") throw new Error(`${what} needs a value`);
  return v;
}

function checkEndpoints(e: PortEndpointOptions, what: string): void {
  if (e.syslog && e.outputFile !== null) throw new Error(`${what}: syslog and an output file exclude each other`);
}

/** `name=NAME,output-file=PATH,input-file=PATH,syslog` (every key optional; paths without commas). */
export function parsePortSpec(spec: string, index: number): ExtraPortOptions {
  const what = `--port ${JSON.stringify(spec)}`;
  const p: ExtraPortOptions = { name: null, outputFile: null, inputFile: null, syslog: false };
  const seen = new Set<string>();
  for (const item of spec.split(",")) {
    if (item === "") continue;
    const eq = item.indexOf("=");
    const key = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? null : item.slice(eq + 1);
    if (seen.has(key)) throw new Error(`${what}: '${key}' given twice`);
    seen.add(key);
    const need = (): string => {
      if (value === null || value === "") throw new Error(`${what}: '${key}' needs a value`);
      return value;
    };
    switch (key) {
      case "name":
        p.name = need();
        if (!PORT_NAME_RE.test(p.name)) {
          throw new Error(`${what}: port name must be 1-${PORT_NAME_MAX} characters of A-Z a-z 0-9 . _ - (not starting with . _ -)`);
        }
        break;
      case "output-file":
        p.outputFile = need();
        break;
      case "input-file":
        p.inputFile = need();
        break;
      case "syslog":
        p.syslog = value === null || parseBoolean(value, `${what}: syslog`);
        break;
      default:
        throw new Error(`${what}: unknown key '${key}' (known: name, output-file, input-file, syslog)`);
    }
  }
  checkEndpoints(p, `port ${index}`);
  return p;
}

/** Parses the raw (citty) options; throws a message meant for the command line user. */
export function parseConsoleOptions(raw: Record<string, unknown>): ConsoleOptions {
  const port0: PortEndpointOptions = {
    outputFile: str(raw["output-file"], "--output-file"),
    inputFile: str(raw["input-file"], "--input-file"),
    syslog: booleanOption(raw, "syslog", false),
  };
  checkEndpoints(port0, "--syslog/--output-file");
  const specs = raw.port === undefined ? [] : Array.isArray(raw.port) ? raw.port : [raw.port];
  if (specs.length > MAX_EXTRA_PORTS) throw new Error(`at most ${MAX_EXTRA_PORTS} --port options`);
  const ports = specs.map((s, i) => {
    if (typeof s !== "string") throw new Error("--port needs a value");
    return parsePortSpec(s, i + 1);
  });
  const names = ports.map((p) => p.name).filter((n) => n !== null);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup !== undefined) throw new Error(`two ports are named '${dup}'`);
  return {
    port0,
    ports,
    configSpace: booleanOption(raw, "config-space", false) || ports.length > 0,
    syslogSocket: str(raw["syslog-socket"], "--syslog-socket") ?? DEFAULT_SYSLOG_SOCKET,
  };
}

/** Checks what can be checked before the worker opens anything: input files must exist. */
export function checkPaths(o: ConsoleOptions): void {
  const inputs = [o.port0.inputFile, ...o.ports.map((p) => p.inputFile)];
  for (const path of inputs) if (path !== null && !existsSync(path)) throw new Error(`input file ${path} does not exist`);
}

