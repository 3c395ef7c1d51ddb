// Starts our backend for e2e tests: the compiled dist/backend when it exists (what users run),
// else the sources through bun. Waits until the socket is listening.
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { waitForPath } from "./rig.ts";

const ROOT = join(import.meta.dir, "../..");
const BINARY = join(ROOT, "dist/backend");

export function backendCommand(): string[] {
  if (process.env.E2E_FROM_SOURCE !== "1" && existsSync(BINARY)) return [BINARY];
  return [process.execPath, join(ROOT, "app/main.ts")];
}

export interface RunningBackend {
  proc: Subprocess<"ignore" | "pipe", "pipe", "pipe">;
  socket: string;
  /** SIGTERM, then the exit code (0 expected) and what it logged. */
  stop(): Promise<{ code: number | null; stderr: string }>;
}

export async function startBackend(
  device: string,
  socket: string,
  args: string[],
  opts: { stdin?: "pipe" | "ignore"; env?: Record<string, string> } = {},
): Promise<RunningBackend> {
  const proc = Bun.spawn([...backendCommand(), "device", device, "--socket", socket, ...args], {
    stdin: opts.stdin ?? "ignore",
    // Extra variables on top of ours (e.g. test-only switches such as VHOST_BACKEND_TEST_NO_DIRTY_LOG).
    env: opts.env ? { ...process.env, ...opts.env } : undefined,
    stdout: "pipe",
    stderr: "pipe",
  });
  try {
    await waitForPath(socket, 15_000);
  } catch (e) {
    proc.kill("SIGKILL");
    throw new Error(`backend did not create ${socket}: ${await new Response(proc.stderr).text()}`);
  }
  return {
    proc,
    socket,
    async stop() {
      proc.kill("SIGTERM");
      const code = await proc.exited;
      return { code, stderr: await new Response(proc.stderr).text() };
    },
  };
}
