// The Worker half of the sandbox proof: runs one probe on a thread started after the lockdown.
import { runProbe, type ProbeName } from "../../src/sandbox/probe.ts";

declare const self: Worker;
self.onmessage = (ev: MessageEvent<{ probe: string; target: never }>) => {
  const { probe, target } = ev.data;
  self.postMessage(probe === "status" ? [] : [runProbe(probe as ProbeName, target)]);
};
