// Files generated at build time from the device definitions (build.ts writes them under dist/):
// the man page, bash and zsh completion, and QEMU's backend description files. Nothing here is
// kept by hand: a device's options appear in all of them because they come from its definition.
import type { ArgDef, ArgsDef } from "citty";
import { DEVICES } from "./registry.ts";
import { COMMON_ARGS } from "./main.ts";
import { backendDescription, describable } from "../src/capabilities.ts";
import type { DeviceDefinition } from "../src/device.ts";
import pkg from "../package.json" with { type: "json" };

/** One option as the generators see it. */
export interface OptionInfo {
  name: string;
  type: "string" | "boolean" | "enum" | "positional" | undefined;
  valueHint: string | undefined;
  description: string;
  default: unknown;
  /** Values to complete (from an enum or a `a|b|c` hint). */
  choices: string[] | undefined;
  /** The value is a path. */
  path: boolean;
}

function optionInfo(name: string, a: ArgDef): OptionInfo {
  const hint = "valueHint" in a ? a.valueHint : undefined;
  const choices = a.type === "enum" && a.options ? [...a.options] : hint !== undefined && /^[a-z0-9-]+(\|[a-z0-9-]+)+$/.test(hint) ? hint.split("|") : undefined;
  return {
    name, type: a.type, valueHint: hint, description: a.description ?? "", default: "default" in a ? a.default : undefined, choices,
    path: hint !== undefined && /PATH|FILE|DIR/.test(hint) && !hint.includes("|"),
  };
}

/** Every option of a device: the common ones, then its own. */
export function deviceOptionList(def: DeviceDefinition): OptionInfo[] {
  const all = { ...COMMON_ARGS, ...(def.args as ArgsDef) } as ArgsDef;
  return Object.entries(all).map(([n, a]) => optionInfo(n, a));
}

const devices = (): DeviceDefinition[] => Object.values(DEVICES);

// ---- man page (troff, man(7) macros) ----

function roff(text: string): string {
  return text.replace(/\\/g, "\\e").replace(/-/g, "\\-").replace(/^([.'])/gm, "\\&$1");
}

function manOptions(list: OptionInfo[]): string[] {
  const out: string[] = [];
  for (const o of list) {
    if (o.type === "positional") continue;
    const flag = `\\fB\\-\\-${roff(o.name)}\\fR`;
    const value = o.type === "boolean" ? "" : ` \\fI${roff(o.valueHint ?? "VALUE")}\\fR`;
    out.push(".TP", `${flag}${value}${o.type === "boolean" ? `, \\fB\\-\\-no\\-${roff(o.name)}\\fR` : ""}`);
    let desc = o.description;
    if (o.default !== undefined && o.default !== "" && o.type !== "boolean") desc += ` (default: ${String(o.default)})`;
    out.push(roff(desc));
  }
  return out;
}

/** backend(1). */
export function manPage(): string {
  const date = new Date(Number(process.env.SOURCE_DATE_EPOCH ?? 0) * 1000 || Date.now()).toISOString().slice(0, 10);
  const common = Object.entries(COMMON_ARGS as ArgsDef).map(([n, a]) => optionInfo(n, a));
  const out: string[] = [
    `.TH BACKEND 1 "${date}" "backend ${pkg.version}" "User Commands"`,
    ".SH NAME",
    "backend \\- vhost\\-user device backends (console, block, net, sound)",
    ".SH SYNOPSIS",
    ...devices().map((d) => `.B backend device ${d.name}\n.RI [ OPTIONS ]\n.br`),
    ".B vhost\\-user\\-\\fITYPE\\fR",
    ".RI [ OPTIONS ]",
    ".SH DESCRIPTION",
    roff("Serves one virtio device to a virtual machine monitor (QEMU, crosvm, cloud-hypervisor) over the vhost-user protocol. The monitor connects to the unix socket, shares guest memory, and the backend processes the guest's virtqueues. One front-end is served at a time; when it disconnects the device is reset and the next one is accepted."),
    ".PP",
    roff("Installed under a vhost-user name (QEMU's convention: a link vhost-user-block, vhost-user-console or vhost-user-net to the binary) it serves that device, as 'backend device TYPE'."),
    ".SH COMMON OPTIONS",
    roff("Every device takes these. On/off options also take --NAME=on|off (true|false, 1|0); --no-NAME turns one off; the last one given wins."),
    ...manOptions(common),
  ];
  for (const d of devices()) {
    out.push(`.SH DEVICE: ${d.name.toUpperCase()}`, roff(d.description), ".PP", "Options:");
    out.push(...manOptions(Object.entries(d.args as ArgsDef).map(([n, a]) => optionInfo(n, a))));
    out.push(".PP", "Example:", ".PP", ".RS", ".nf", roff(["backend", "device", d.name, ...d.example].join(" ")), ".fi", ".RE");
  }
  out.push(
    ".SH SIGNALS",
    ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR, \\fBSIGHUP\\fR", roff("Stop: the device is shut down, the socket file (if the backend created it) removed, exit status 0."),
    ...devices().flatMap((d) => Object.entries(d.hostSignals ?? {}).flatMap(([sig, ev]) => [".TP", `\\fB${sig}\\fR`, roff(`${d.name}: ${ev}`)])),
    ".SH ENVIRONMENT",
    ".TP", "\\fBNOTIFY_SOCKET\\fR", roff("sd_notify(3): READY=1 once the socket listens, STOPPING=1 on shutdown (for Type=notify units)."),
    ".TP", "\\fBJOURNAL_STREAM\\fR", roff("When it names stderr (journald), log lines start with their syslog priority (<3> error ... <7> debug) and carry no time."),
    ".TP", "\\fBLISTEN_FDS\\fR, \\fBLISTEN_PID\\fR", roff("systemd socket activation: with no socket option, the listening socket passed as fd 3 is served."),
    ".SH LOGS",
    roff("On a terminal, short colored lines. Otherwise one line per event with no escape codes: 'TIME LEVEL DEVICE[SESSION]: MESSAGE KEY=VALUE...' (--log-format text) or one JSON object per line with time, level, device, session, message and fields (--log-format json)."),
    ".SH METRICS",
    roff("With --metrics unix:PATH or HOST:PORT the backend answers HTTP GETs with its counters in the Prometheus text format, or OpenMetrics when asked (Accept: application/openmetrics-text): sessions, messages, refused messages and peers, guest errors, broken rings, and each device's own (block requests, bytes, latency; net packets, bytes, drops; sound periods, xruns; console bytes)."),
    ".SH FILES",
    ".TP", "\\fI/usr/share/qemu/vhost\\-user/50\\-backend\\-\\fRTYPE\\fI.json\\fR", roff("Backend description files for management software (QEMU's docs/interop/vhost-user.json)."),
    ".SH EXIT STATUS",
    roff("0 when stopped by a signal or when a --fd session ends; 1 on a usage error or a failure."),
    ".SH SEE ALSO",
    "\\fBqemu\\-system\\-x86_64\\fR(1), \\fBcrosvm\\fR(1), \\fBsystemd.socket\\fR(5), \\fBsd_notify\\fR(3)",
  );
  return out.join("\n") + "\n";
}

// ---- shell completion ----

function shellWords(words: readonly string[]): string {
  return words.map((w) => w.replace(/[^A-Za-z0-9_,.:=+@%/-]/g, "\\$&")).join(" ");
}

/** bash completion for `backend` and the vhost-user-TYPE names. */
export function bashCompletion(): string {
  const lines: string[] = [
    "# bash completion for backend (generated from the device definitions by build.ts)",
    "_backend_device_options() {",
    '  local dev="$1" prev="$2" cur="$3"',
    '  case "$dev" in',
  ];
  for (const d of devices()) {
    const opts = deviceOptionList(d).filter((o) => o.type !== "positional");
    const flags = opts.flatMap((o) => (o.type === "boolean" ? [`--${o.name}`, `--no-${o.name}`] : [`--${o.name}`]));
    lines.push(`    ${d.name})`, '      case "$prev" in');
    for (const o of opts) {
      if (o.choices) lines.push(`        --${o.name}) COMPREPLY=($(compgen -W "${shellWords(o.choices)}" -- "$cur")); return ;;`);
      else if (o.path) lines.push(`        --${o.name}) COMPREPLY=($(compgen -f -- "$cur")); return ;;`);
      else if (o.type !== "boolean") lines.push(`        --${o.name}) return ;;`);
    }
    lines.push("      esac", `      COMPREPLY=($(compgen -W "${shellWords(flags)}" -- "$cur"))`, "      ;;");
  }
  lines.push(
    "  esac",
    "}",
    "_backend() {",
    '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" dev',
    '  case "${COMP_WORDS[0]##*/}" in',
    ...devices().filter((d) => describable(d.capabilities)).map((d) => `    vhost-user-${d.capabilities.type}) _backend_device_options ${d.name} "$prev" "$cur"; return ;;`),
    "  esac",
    "  if [ \"$COMP_CWORD\" -eq 1 ]; then COMPREPLY=($(compgen -W \"device --help --version\" -- \"$cur\")); return; fi",
    `  if [ "$COMP_CWORD" -eq 2 ]; then COMPREPLY=($(compgen -W "${shellWords(devices().map((d) => d.name))}" -- "$cur")); return; fi`,
    '  dev="${COMP_WORDS[2]}"',
    '  _backend_device_options "$dev" "$prev" "$cur"',
    "}",
    `complete -F _backend backend ${devices().filter((d) => describable(d.capabilities)).map((d) => `vhost-user-${d.capabilities.type}`).join(" ")}`,
  );
  return lines.join("\n") + "\n";
}

function zshQuote(s: string): string {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

/** zsh completion (_backend). */
export function zshCompletion(): string {
  const lines: string[] = [`#compdef backend ${devices().filter((d) => describable(d.capabilities)).map((d) => `vhost-user-${d.capabilities.type}`).join(" ")}`, "# zsh completion for backend (generated from the device definitions by build.ts)", ""];
  for (const d of devices()) {
    lines.push(`_backend_${d.name}() {`, "  _arguments -s \\");
    for (const o of deviceOptionList(d)) {
      if (o.type === "positional") continue;
      const desc = o.description.replace(/[[\]:\\]/g, " ").slice(0, 100);
      if (o.type === "boolean") {
        lines.push(`    ${zshQuote(`--${o.name}[${desc}]`)} \\`, `    ${zshQuote(`--no-${o.name}[turn --${o.name} off]`)} \\`);
      } else {
        const action = o.choices ? `(${o.choices.join(" ")})` : o.path ? "_files" : " ";
        lines.push(`    ${zshQuote(`--${o.name}=[${desc}]:${(o.valueHint ?? "value").replace(/:/g, " ")}:${action}`)} \\`);
      }
    }
    lines.push("    && return 0", "}", "");
  }
  lines.push(
    "_backend() {",
    "  case ${service} in",
    ...devices().filter((d) => describable(d.capabilities)).map((d) => `    vhost-user-${d.capabilities.type}) _backend_${d.name}; return ;;`),
    "  esac",
    "  if (( CURRENT == 2 )); then _values command device; return; fi",
    `  if (( CURRENT == 3 )); then _values device ${devices().map((d) => d.name).join(" ")}; return; fi`,
    "  local dev=${words[3]}",
    "  shift 2 words; (( CURRENT -= 2 ))",
    '  case $dev in',
    ...devices().map((d) => `    ${d.name}) _backend_${d.name} ;;`),
    "  esac",
    "}",
    "",
    '_backend "$@"',
  );
  return lines.join("\n") + "\n";
}

// ---- QEMU backend description files ----

/**
 * `50-backend-<device>.json` for /usr/share/qemu/vhost-user/ (or /etc/qemu/vhost-user/), for the
 * devices whose type QEMU's schema lists; `binary` is where the vhost-user-<type> link lives.
 */
export function descriptionFiles(libexecDir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const d of devices()) {
    if (!describable(d.capabilities)) continue;
    const desc = backendDescription(d.capabilities, `backend ${d.name}: ${d.description}`, `${libexecDir}/vhost-user-${d.capabilities.type}`, pkg.version);
    out[`50-backend-${d.name}.json`] = JSON.stringify(desc, null, 2) + "\n";
  }
  return out;
}
