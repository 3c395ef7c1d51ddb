// The Prometheus project's own exposition parsers (python3-prometheus-client, installed by
// test/e2e/setup.sh), for tests that check what the backend exports.
import { join } from "node:path";

const PARSER = join(import.meta.dir, "metrics_parse.py");
const PYTHON = "/usr/bin/python3";

export type ParsedExposition = { families: [string, string, string][]; samples: [string, Record<string, string>, number][] };

/** Parses `text` strictly as OpenMetrics 1.0 or as the text format 0.0.4; throws with the parser's message if it refuses. */
export function parseExposition(text: string, format: "openmetrics" | "prometheus"): ParsedExposition {
  const r = Bun.spawnSync([PYTHON, PARSER, format], { stdin: new TextEncoder().encode(text) });
  if (r.exitCode !== 0) throw new Error(`the ${format} parser refused the exposition: ${r.stderr.toString().trim().split("\n").at(-1)}\n${text}`);
  return JSON.parse(r.stdout.toString()) as ParsedExposition;
}

/** One sample's value, by name and exact labels. */
export function sampleValue(p: ParsedExposition, name: string, labels: Record<string, string> = {}): number | undefined {
  const want = JSON.stringify(Object.entries(labels).sort());
  return p.samples.find(([n, l]) => n === name && JSON.stringify(Object.entries(l).sort()) === want)?.[2];
}
