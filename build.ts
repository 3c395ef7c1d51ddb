// Builds the single executable `dist/backend` with `bun build --compile`. The device worker (and
// any other Worker entry) must be listed as extra entry points so the binary embeds them.
import { mkdirSync } from "node:fs";

const entries = ["app/main.ts", "app/device_worker.ts", "app/queue_worker.ts"];
mkdirSync("dist", { recursive: true });
const proc = Bun.spawnSync(
  [process.execPath, "build", "--compile", "--minify-syntax", "--sourcemap", ...entries, "--outfile", "dist/backend"],
  { stdout: "inherit", stderr: "inherit" },
);
if (proc.exitCode !== 0) process.exit(proc.exitCode ?? 1);
console.log("built dist/backend");
