// `--help` and usage errors: our own renderer for citty commands. citty's pads every option line to
// the longest description (hundreds of columns); this one wraps descriptions to the terminal width
// (80 columns when stdout is not a terminal), keeps an option on one line where it fits, and ends
// a device's help with an example command line.
import type { ArgDef, ArgsDef, CommandDef } from "citty";

/** What a command's help shows beyond its citty definition. */
export interface UsageExtras {
  /** Arguments after the command's path, e.g. ["--socket", "/run/vm/disk.sock", "--file", "disk.img"]. */
  example?: readonly string[];
  /** Paragraphs printed after the options. */
  notes?: readonly string[];
}

const extras = new WeakMap<object, UsageExtras>();

/** Attaches help extras to a command (returns the command, so it wraps a defineCommand call). */
export function withUsage<T extends object>(cmd: T, more: UsageExtras): T {
  extras.set(cmd, more);
  return cmd;
}

/** The width help wraps to: the terminal's columns, 80 when stdout is not a terminal. */
export function helpWidth(): number {
  const cols = process.stdout.isTTY ? process.stdout.columns : undefined;
  return cols !== undefined && cols > 0 ? cols : 80;
}

type AnyCommand = CommandDef<any>;

async function resolve<T>(v: T | Promise<T> | (() => T) | (() => Promise<T>) | undefined): Promise<T | undefined> {
  return typeof v === "function" ? await (v as () => T | Promise<T>)() : await v;
}

/** The names from `root` down to `target` (["backend", "device", "block"]), or null. */
async function pathTo(root: AnyCommand, target: AnyCommand, path: string[]): Promise<string[] | null> {
  if (root === target) return path;
  const subs = (await resolve(root.subCommands)) ?? {};
  for (const [name, sub] of Object.entries(subs)) {
    const found = await pathTo((await resolve(sub)) as AnyCommand, target, [...path, name]);
    if (found) return found;
  }
  return null;
}

// ---- text layout ----

/** Greedy word wrap to `width` columns; a word longer than a line is split (after a comma if it has one). */
export function wrap(text: string, width: number): string[] {
  const w = Math.max(width, 10);
  const lines: string[] = [];
  let line = "";
  for (let word of text.split(/\s+/).filter((x) => x !== "")) {
    while (word.length > w) {
      const comma = word.lastIndexOf(",", w - 1);
      const cut = comma > 0 ? comma + 1 : w;
      if (line !== "") lines.push(line);
      lines.push(word.slice(0, cut));
      line = "";
      word = word.slice(cut);
    }
    if (line === "") line = word;
    else if (line.length + 1 + word.length <= w) line += ` ${word}`;
    else {
      lines.push(line);
      line = word;
    }
  }
  if (line !== "") lines.push(line);
  return lines;
}

/** Two columns: labels, and descriptions wrapped beside them (or under them when the label is long or the terminal narrow). */
function columns(rows: [string, string][], width: number): string[] {
  const indent = 2;
  const gap = 2;
  const cap = Math.max(12, Math.floor(width * 0.4));
  const labelWidth = Math.min(cap, Math.max(0, ...rows.map(([l]) => l.length)));
  const descCol = indent + labelWidth + gap;
  const stacked = width - descCol < 30;
  const out: string[] = [];
  for (const [label, desc] of rows) {
    const labelLines = wrap(label, width - indent);
    if (stacked) {
      out.push(...labelLines.map((l) => " ".repeat(indent) + l));
      out.push(...wrap(desc, width - indent - 4).map((l) => " ".repeat(indent + 4) + l));
      continue;
    }
    const descLines = wrap(desc, width - descCol);
    if (labelLines.length === 1 && label.length <= labelWidth) {
      out.push(" ".repeat(indent) + label.padEnd(labelWidth + gap) + (descLines[0] ?? ""));
      out.push(...descLines.slice(1).map((l) => " ".repeat(descCol) + l));
    } else {
      out.push(...labelLines.map((l) => " ".repeat(indent) + l));
      out.push(...descLines.map((l) => " ".repeat(descCol) + l));
    }
  }
  return out.map((l) => l.trimEnd());
}

/** Quotes an argument for a POSIX shell when it needs it. */
function shellWord(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** A command line wrapped between arguments with ` \` continuations; an option stays with its value. */
export function commandLine(words: readonly string[], width: number, indent = 2): string[] {
  const groups: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = shellWord(words[i]!);
    const next = words[i + 1];
    if (w.startsWith("--") && !w.includes("=") && next !== undefined && !next.startsWith("-")) {
      groups.push(`${w} ${shellWord(next)}`);
      i++;
    } else groups.push(w);
  }
  const lines: string[] = [];
  let line = " ".repeat(indent);
  let lineHasWord = false;
  for (const g of groups) {
    if (lineHasWord && line.length + 1 + g.length + 2 > width) {
      lines.push(`${line} \\`);
      line = " ".repeat(indent + 4);
      lineHasWord = false;
    }
    line += (lineHasWord ? " " : "") + g;
    lineHasWord = true;
  }
  lines.push(line);
  return lines;
}

// ---- options ----

function valueHint(name: string, def: ArgDef): string {
  if (def.valueHint) return def.valueHint;
  if (def.type === "enum" && def.options?.length) return def.options.join("|");
  if (typeof def.default === "string" && /^[0-9]+$/.test(def.default)) return "N";
  return name.toUpperCase().replace(/-/g, "_");
}

function optionRows(args: ArgsDef): [string, string][] {
  const rows: [string, string][] = [];
  for (const [name, def] of Object.entries(args)) {
    if (def.type === "positional") {
      rows.push([name.toUpperCase(), def.description ?? ""]);
      continue;
    }
    const aliases = [("alias" in def ? def.alias : undefined) ?? []].flat().map((a) => (a.length === 1 ? `-${a}` : `--${a}`));
    const flags = [...aliases, `--${name}`].join(", ");
    let desc = def.description ?? "";
    if (def.required) desc += " (required)";
    if (def.type === "boolean") {
      if (def.default === true) desc += " (default: on)";
      rows.push([flags, desc]);
      if (def.default === true || "negativeDescription" in def) {
        const neg = (def as { negativeDescription?: string }).negativeDescription;
        rows.push([`--no-${name}`, neg ?? `Turn --${name} off`]);
      }
      continue;
    }
    if (def.default !== undefined && def.default !== "") desc += ` (default: ${String(def.default)})`;
    rows.push([`${flags} ${valueHint(name, def)}`, desc]);
  }
  return rows;
}

const BOOLEAN_RULE = "On/off options also take --NAME=on|off (true|false, 1|0); --no-NAME turns one off. The last one given wins.";

/** The help text of `cmd` (reached from `root`), `width` columns wide at most. */
export async function renderUsage(root: AnyCommand, cmd: AnyCommand, width = helpWidth()): Promise<string> {
  const meta = (await resolve(cmd.meta)) ?? {};
  const rootMeta = (await resolve(root.meta)) ?? {};
  const path = (await pathTo(root, cmd, [rootMeta.name ?? "backend"])) ?? [meta.name ?? "backend"];
  const name = path.join(" ");
  const args = ((await resolve(cmd.args)) ?? {}) as ArgsDef;
  const subs = (await resolve(cmd.subCommands)) ?? {};
  const more = extras.get(cmd) ?? {};
  const out: string[] = [];

  const title = cmd === root && rootMeta.version ? `${name} ${rootMeta.version}` : name;
  out.push(...wrap(`${title}: ${meta.description ?? ""}`, width), "");

  const subRows: [string, string][] = [];
  for (const [subName, sub] of Object.entries(subs)) {
    const subMeta = (await resolve(((await resolve(sub)) as AnyCommand).meta)) ?? {};
    if (subMeta.hidden) continue;
    subRows.push([subName, subMeta.description ?? ""]);
  }
  const hasOptions = Object.keys(args).length > 0;
  const usage = [name, ...(subRows.length > 0 ? ["<COMMAND>"] : []), ...(hasOptions ? ["[OPTIONS]"] : [])];
  out.push(...wrap(`Usage: ${usage.join(" ")}`, width), "");

  if (subRows.length > 0) out.push("Commands:", ...columns(subRows, width), "");
  if (hasOptions) {
    out.push("Options:", ...columns(optionRows(args), width), "");
    if (Object.values(args).some((a) => a.type === "boolean")) out.push(...wrap(BOOLEAN_RULE, width), "");
  }
  for (const note of more.notes ?? []) out.push(...wrap(note, width), "");
  if (more.example) out.push("Example:", ...commandLine([...path, ...more.example], width), "");
  if (subRows.length > 0) out.push(...wrap(`Run '${name} <COMMAND> --help' for a command's options.`, width), "");
  while (out.at(-1) === "") out.pop();
  return out.join("\n");
}

/** A showUsage for citty's runMain: `--help` and usage errors print our rendering. */
export function usagePrinter(root: AnyCommand): (cmd: AnyCommand, parent?: AnyCommand) => Promise<void> {
  return async (cmd) => {
    console.log(`${await renderUsage(root, cmd)}\n`);
  };
}
