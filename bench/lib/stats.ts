// Small statistics and table helpers for the benches.

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function min(xs: number[]): number {
  return xs.length ? Math.min(...xs) : NaN;
}

export function max(xs: number[]): number {
  return xs.length ? Math.max(...xs) : NaN;
}

/** (max-min)/median, as a percentage: how much the samples swing. */
export function spreadPct(xs: number[]): number {
  const m = median(xs);
  return xs.length && m ? ((max(xs) - min(xs)) / m) * 100 : NaN;
}

export function fmtInt(x: number): string {
  return Number.isFinite(x) ? Math.round(x).toLocaleString("en-US") : "-";
}

export function fmt(x: number, digits = 2): string {
  return Number.isFinite(x) ? x.toFixed(digits) : "-";
}

/** Renders rows as a left/right-aligned text table (first column left, the rest right). */
export function table(header: string[], rows: string[][]): string {
  const all = [header, ...rows];
  const w = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) =>
    r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join("  ").trimEnd();
  return [line(header), w.map((n) => "-".repeat(n)).join("  "), ...rows.map(line)].join("\n");
}
