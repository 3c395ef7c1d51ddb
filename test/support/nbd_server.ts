// NBD servers for the tests: qemu-nbd or nbdkit, started on a unix socket in a temp dir, stopped,
// restarted on the same socket (an outage), over an image file the test reads directly.
import { spawn, spawnSync, type Subprocess } from "bun";
import { existsSync, mkdtempSync, rmSync, writeFileSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectBlocking } from "../../devices/block/disk/nbd_connection.ts";
import { closeHandle, libnbdUnavailable } from "../../ffi/nbd.ts";
import type { NetNamespace } from "./netns.ts";

/** Why the NBD tests cannot run here, or null (libnbd0, qemu-nbd and nbdkit from setup.sh). */
export function nbdTestsUnavailable(): string | null {
  const lib = libnbdUnavailable();
  if (lib !== null) return lib;
  for (const tool of ["qemu-nbd", "nbdkit"]) {
    if (spawnSync(["sh", "-c", `command -v ${tool}`]).exitCode !== 0) return `${tool} is not installed (test/e2e/setup.sh installs it)`;
  }
  return null;
}

export interface NbdServerOptions {
  /** "qemu-nbd" (default) or "nbdkit" (with its file plugin, for filters). */
  server?: "qemu-nbd" | "nbdkit";
  exportName?: string;
  readOnly?: boolean;
  /** nbdkit filters and their parameters: ["--filter=fua", "fuamode=none"]... */
  nbdkitArgs?: string[];
  /** Listen on TCP 127.0.0.1:PORT (qemu-nbd) instead of the unix socket. */
  tcpPort?: number;
  /** With tcpPort: the address to listen on (and to name in the URI) instead of 127.0.0.1 (localhost). */
  tcpHost?: string;
  /** Run the server inside this network namespace (a storage "host" of its own). */
  netns?: NetNamespace;
  /** Size of a new sparse image (when no content is given). */
  size?: number;
  content?: Uint8Array;
}

const servers: NbdServer[] = [];

export class NbdServer {
  readonly dir: string;
  readonly socket: string;
  readonly image: string;
  readonly exportName: string;
  private proc: Subprocess | null = null;

  constructor(readonly options: NbdServerOptions = {}) {
    this.dir = mkdtempSync(join(tmpdir(), "nbd-test-"));
    this.socket = join(this.dir, "nbd.sock");
    this.image = join(this.dir, "disk.img");
    this.exportName = options.exportName ?? "disk";
    if (options.content !== undefined) writeFileSync(this.image, options.content);
    else {
      writeFileSync(this.image, "");
      truncateSync(this.image, options.size ?? 8 << 20);
    }
    servers.push(this);
  }

  get uri(): string {
    if (this.options.tcpPort !== undefined) return `nbd://${this.options.tcpHost ?? "localhost"}:${this.options.tcpPort}/${this.exportName}`;
    return `nbd+unix:///${this.exportName}?socket=${this.socket}`;
  }

  get running(): boolean {
    return this.proc !== null;
  }

  /** Starts the server and waits until it accepts a client (a connection is made and closed). */
  async start(): Promise<void> {
    if (this.proc !== null) throw new Error("already running");
    rmSync(this.socket, { force: true });
    const o = this.options;
    const cmd = (o.server ?? "qemu-nbd") === "qemu-nbd"
      ? ["qemu-nbd", "-f", "raw", ...(o.tcpPort !== undefined ? ["-b", o.tcpHost ?? "127.0.0.1", "-p", String(o.tcpPort)] : ["-k", this.socket]), "-x", this.exportName, "-e", "64", "-t", "--discard=unmap", "--cache=writeback", ...(o.readOnly ? ["-r"] : []), this.image]
      : ["nbdkit", "-f", "-U", this.socket, "-e", this.exportName, ...(o.readOnly ? ["-r"] : []), ...(o.nbdkitArgs?.filter((a) => a.startsWith("--")) ?? []), "file", this.image, ...(o.nbdkitArgs?.filter((a) => !a.startsWith("--")) ?? [])];
    // `ip netns exec` execs the server: the pid is the server's.
    this.proc = spawn(o.netns !== undefined ? ["ip", "netns", "exec", o.netns.name, ...cmd] : cmd, { stdout: "ignore", stderr: "pipe" });
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (o.tcpPort !== undefined || existsSync(this.socket)) {
        try {
          const probe = () => closeHandle(connectBlocking(this.uri));
          if (o.netns !== undefined) o.netns.enter(probe);
          else probe();
          return;
        } catch {
          // not accepting yet
        }
      }
      if (this.proc.exitCode !== null || Date.now() > deadline) {
        const err = this.proc.stderr instanceof ReadableStream ? await new Response(this.proc.stderr).text() : "";
        this.proc = null;
        throw new Error(`${cmd[0]} did not start: ${err}`);
      }
      await Bun.sleep(20);
    }
  }

  /** Kills the server (SIGKILL: an abrupt outage; the image keeps what it acknowledged). */
  async stop(): Promise<void> {
    const p = this.proc;
    if (p === null) return;
    this.proc = null;
    p.kill("SIGKILL");
    await p.exited;
    rmSync(this.socket, { force: true });
  }

  async dispose(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Stops every server the tests started (afterEach / afterAll). */
export async function disposeNbdServers(): Promise<void> {
  for (const s of servers.splice(0)) await s.dispose();
}
