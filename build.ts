// Builds the single executable `dist/backend` with `bun build --compile`, and the files generated
// from the device definitions (app/generated_files.ts): the man page, bash and zsh completion, and
// QEMU's backend description files. The device worker (and any other Worker entry) must be listed
// as extra entry points so the binary embeds them. `--bytecode` ships JSC bytecode instead of source
// for the runtime to parse at every start: start-to-listening 2.5-3x faster (bench:startup).
//
//   bun build.ts [--libexecdir DIR]   # where the vhost-user-<type> links go (default /usr/local/libexec)
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { bashCompletion, descriptionFiles, manPage, zshCompletion } from "./app/generated_files.ts";

const flag = process.argv.indexOf("--libexecdir");
const libexecDir = flag > 0 ? process.argv[flag + 1]! : "/usr/local/libexec";

const entries = ["app/main.ts", "app/device_worker.ts", "app/queue_worker.ts"];
mkdirSync("dist", { recursive: true });
const proc = Bun.spawnSync(
  [process.execPath, "build", "--compile", "--bytecode", "--minify-syntax", "--sourcemap", ...entries, "--outfile", "dist/backend"],
  { stdout: "inherit", stderr: "inherit" },
);
if (proc.exitCode !== 0) process.exit(proc.exitCode ?? 1);

const files: Record<string, string> = {
  "share/man/man1/backend.1": manPage(),
  "share/bash-completion/completions/backend": bashCompletion(),
  "share/zsh/site-functions/_backend": zshCompletion(),
  ...Object.fromEntries(Object.entries(descriptionFiles(libexecDir)).map(([name, text]) => [`share/qemu/vhost-user/${name}`, text])),
};
for (const [path, text] of Object.entries(files)) {
  const to = join("dist", path);
  mkdirSync(dirname(to), { recursive: true });
  writeFileSync(to, text);
}
console.log(`built dist/backend and ${Object.keys(files).map((f) => `dist/${f}`).join(", ")}`);
