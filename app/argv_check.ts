// Refuses a command line that would silently do something other than what was asked: citty
// (through node:util parseArgs in non-strict mode) drops unknown options and stray words, so
// `--readonly` (for --read-only) served a disk read-write and `--num-queue 4` served the default
// number of queues. Every word is checked against the device's option table before anything runs.

export interface OptionSpec {
  /** "boolean" options take no separate value (`--x`, `--no-x`, `--x=VALUE`); others take one. */
  type: string;
}

/** Levenshtein distance, for "did you mean". */
function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diag = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const up = row[j]!;
      row[j] = Math.min(up + 1, row[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = up;
    }
  }
  return row[b.length]!;
}

/** The known option closest to `name`, if it is close enough to be what was meant. */
export function closestOption(name: string, known: readonly string[]): string | null {
  let best: string | null = null;
  let bestD = Infinity;
  for (const k of known) {
    const d = distance(name, k);
    if (d < bestD) [best, bestD] = [k, d];
  }
  // A typo, a missing or extra dash or letter, or a prefix of a longer name.
  if (best !== null && (bestD <= Math.max(2, Math.floor(name.length / 4)) || best.startsWith(name) || name.startsWith(best))) return best;
  return null;
}

/**
 * Checks the words after `backend device <name>` against `specs` (option name → spec). Throws a
 * message naming the first offending word: an unknown option (with the closest real one), a
 * stray positional argument, an option that needs a value given none or an empty one.
 */
export function checkArgv(argv: readonly string[], specs: Readonly<Record<string, OptionSpec>>): void {
  const known = Object.keys(specs);
  const unknown = (word: string, name: string): never => {
    const near = closestOption(name, known);
    throw new Error(`unknown option ${word}${near !== null ? ` (did you mean --${near}?)` : ""}; see --help`);
  };
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i]!;
    if (word === "--") {
      if (i + 1 < argv.length) throw new Error(`unexpected argument '${argv[i + 1]}': the backend takes no positional arguments`);
      break;
    }
    if (!word.startsWith("-") || word === "-") {
      throw new Error(`unexpected argument '${word}': the backend takes no positional arguments (options are --name VALUE)`);
    }
    if (!word.startsWith("--")) unknown(word, word.replace(/^-+/, ""));
    const eq = word.indexOf("=");
    const name = word.slice(2, eq < 0 ? undefined : eq);
    const spec = specs[name];
    if (spec === undefined) {
      const negated = name.startsWith("no-") ? specs[name.slice(3)] : undefined;
      if (negated !== undefined && eq < 0) {
        if (negated.type !== "boolean") throw new Error(`${word}: --${name.slice(3)} takes a value, it is not an on/off option`);
        continue;
      }
      unknown(word, name);
    }
    if (spec!.type === "boolean") continue; // its value, if any, is checked by the boolean rule
    let value: string | undefined;
    if (eq >= 0) value = word.slice(eq + 1);
    else {
      value = argv[i + 1];
      // A following option is not this one's value (`--socket --file x`): it has none.
      if (value === undefined || (value.startsWith("--") && value.length > 2)) throw new Error(`--${name} needs a value`);
      i++;
    }
    if (value === "") throw new Error(`--${name}: the value is empty`);
  }
}
