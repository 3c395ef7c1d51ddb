// Command-line helpers citty lacks.

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
