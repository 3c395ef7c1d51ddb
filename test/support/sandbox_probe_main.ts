// The standalone sandbox proof (test/unit/sandbox_exec.test.ts compiles it with
// `bun build --compile`): acquires a resource (a file, kept open across the re-exec), enters the
// sandbox, and in the new image runs one escape probe on the main thread or in a Worker started
// after the lockdown, then prints one JSON line. Usage: `probe MODE PROBE|status [worker]`; the
// environment gives SANDBOX_PROBE_TARGET (JSON), SANDBOX_PROBE_KEEP (a file path) and optionally
// SANDBOX_PROBE_ACCESS (a HostAccess as JSON).
import { openSync, writeSync } from "node:fs";
import { enterSandbox, parseSandboxMode, resumeSandbox, threadStatuses, type SandboxResult } from "../../src/sandbox/index.ts";
import { runProbe, type ProbeName } from "../../src/sandbox/probe.ts";
import { NO_HOST_ACCESS, type HostAccess } from "../../src/host_access.ts";

const [modeArg, probe, where] = process.argv.slice(2);
const target = JSON.parse(process.env.SANDBOX_PROBE_TARGET ?? "{}");

let sandbox: SandboxResult | null = resumeSandbox();
if (sandbox === null) {
  // Stage one: acquire, then lock down (does not return unless the mode is none).
  const keepFd = openSync(process.env.SANDBOX_PROBE_KEEP!, "a");
  const access: HostAccess = process.env.SANDBOX_PROBE_ACCESS ? JSON.parse(process.env.SANDBOX_PROBE_ACCESS) : NO_HOST_ACCESS;
  sandbox = enterSandbox({ mode: parseSandboxMode(modeArg), access, keepFds: [keepFd], resources: { keepFd } });
}
const { keepFd } = sandbox.resources as { keepFd: number };
writeSync(keepFd, `served by ${process.pid}\n`);

function report(results: unknown): void {
  console.log(JSON.stringify({ applied: sandbox!.applied, missing: sandbox!.missing, results, threads: threadStatuses().map((t) => ({ ...t, capEff: t.capEff.toString(16) })) }));
  process.exit(0);
}

if (where === "worker") {
  const worker = new Worker(new URL("./sandbox_probe_worker.ts", import.meta.url).href);
  worker.onmessage = (ev) => report(ev.data);
  worker.onerror = (ev) => {
    console.log(JSON.stringify({ workerError: ev.message }));
    process.exit(3);
  };
  worker.postMessage({ probe, target });
} else {
  report(probe === "status" ? [] : [runProbe(probe as ProbeName, target)]);
}
