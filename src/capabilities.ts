// `--print-capabilities` (vhost-user spec, "Backend program conventions"): a JSON object with the
// backend type and its optional features.
const TYPES: Record<string, string> = { console: "console", block: "blk", net: "net", snd: "sound" };
const FEATURES: Record<string, string[]> = {
  block: ["blk-file", "read-only"],
};

export function capabilities(device: string): { type: string; features: string[] } {
  return { type: TYPES[device] ?? device, features: FEATURES[device] ?? [] };
}
