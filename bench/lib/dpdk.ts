// dpdk-testpmd as a process the net bench drives: the guest-less virtio front-end
// (net_virtio_user), the C vhost-user peer backend (net_vhost + net_tap) and a packet sender on the
// tap side (net_af_packet). Always interactive (-i) over a stdin pipe, which also keeps testpmd's
// stdin open (without -i it exits at EOF); stdout goes through `stdbuf -oL` so each command's output
// arrives before the next prompt instead of at exit.
import type { Subprocess } from "bun";
import { tail } from "./backends.ts";

/** testpmd flags that work here without hugepages (see /work/shared/reference/qemu-guest-facts.md). */
export function ealArgs(prefix: string, vdevs: string[]): string[] {
  return [
    // Both lcores may run on either CPU: the kernel balances them against the other processes (our
    // backend floats too). Pinned lcores of three busy-polling processes on 2 CPUs starve each other.
    "--lcores=0@(0,1),1@(0,1)",
    "--main-lcore", "0",
    "--no-huge", "--no-pci", "-m", "1024",
    "--file-prefix", prefix,
    ...vdevs.flatMap((v) => ["--vdev", v]),
  ];
}

export interface PortStats {
  rxPackets: number;
  rxMissed: number;
  rxErrors: number;
  rxNombuf: number;
  txPackets: number;
  txErrors: number;
}

const PROMPT = "testpmd> ";

export class TestPmd {
  readonly proc: Subprocess<"pipe", "pipe", "pipe">;
  private out = "";
  private prompts = 0;
  private waiters: { n: number; resolve: () => void }[] = [];

  constructor(readonly label: string, readonly argv: string[]) {
    this.proc = Bun.spawn(argv, { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    // Prompts are counted on stdout alone, across chunk boundaries (a chunk may end inside one).
    let stdout = "";
    let scanned = 0;
    const drain = async (s: ReadableStream<Uint8Array>, isStdout: boolean) => {
      const d = new TextDecoder();
      for await (const b of s) {
        const text = d.decode(b, { stream: true });
        this.out += text;
        if (!isStdout) continue;
        stdout += text;
        for (let i = stdout.indexOf(PROMPT, scanned); i >= 0; i = stdout.indexOf(PROMPT, scanned)) {
          this.prompts++;
          scanned = i + PROMPT.length;
        }
        if (scanned > 4096) {
          stdout = stdout.slice(scanned);
          scanned = 0;
        }
        this.waiters = this.waiters.filter((w) => (this.prompts >= w.n ? (w.resolve(), false) : true));
      }
    };
    void drain(this.proc.stdout, true);
    void drain(this.proc.stderr, false);
  }

  get pid(): number {
    return this.proc.pid;
  }

  output(): string {
    return this.out;
  }

  alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  assertAlive(): void {
    if (!this.alive()) {
      throw new Error(`${this.label} (testpmd pid ${this.pid}) died: exit ${this.proc.exitCode} signal ${this.proc.signalCode}\n` +
        `argv: ${this.argv.join(" ")}\noutput:\n${tail(this.out, 30)}`);
    }
  }

  private waitPrompts(n: number, timeoutMs: number, what: string): Promise<void> {
    if (this.prompts >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const w = { n, resolve: () => (clearTimeout(t), clearInterval(iv), resolve()) };
      const fail = (why: string) => {
        clearTimeout(t);
        clearInterval(iv);
        this.waiters = this.waiters.filter((x) => x !== w);
        reject(new Error(`${this.label}: ${why} waiting for ${what}\nargv: ${this.argv.join(" ")}\noutput:\n${tail(this.out, 30)}`));
      };
      const t = setTimeout(() => fail(`no prompt after ${timeoutMs} ms`), timeoutMs);
      const iv = setInterval(() => {
        if (!this.alive()) fail("testpmd exited");
      }, 100);
      this.waiters.push(w);
    });
  }

  /** Waits for the first prompt (ports configured). */
  ready(timeoutMs = 30_000): Promise<void> {
    return this.waitPrompts(1, timeoutMs, "the first prompt");
  }

  /** Runs one command; resolves with its output (up to the next prompt). */
  async command(cmd: string, timeoutMs = 15_000): Promise<string> {
    const from = this.out.length;
    const n = this.prompts + 1;
    this.proc.stdin.write(cmd + "\n");
    await this.proc.stdin.flush();
    await this.waitPrompts(n, timeoutMs, JSON.stringify(cmd));
    return this.out.slice(from);
  }

  async portStats(port: number): Promise<PortStats> {
    const text = await this.command(`show port stats ${port}`);
    const num = (re: RegExp) => {
      const m = re.exec(text);
      if (!m) throw new Error(`${this.label}: no ${re} in \`show port stats ${port}\` output:\n${text}`);
      return Number(m[1]);
    };
    return {
      rxPackets: num(/RX-packets:\s+(\d+)/),
      rxMissed: num(/RX-missed:\s+(\d+)/),
      rxErrors: num(/RX-errors:\s+(\d+)/),
      rxNombuf: num(/RX-nombuf:\s+(\d+)/),
      txPackets: num(/TX-packets:\s+(\d+)/),
      txErrors: num(/TX-errors:\s+(\d+)/),
    };
  }

  /** quit, then SIGKILL if it does not go within 5 s. */
  async stop(): Promise<void> {
    if (!this.alive()) return;
    try {
      this.proc.stdin.write("quit\n");
      await this.proc.stdin.flush();
      this.proc.stdin.end();
    } catch {
      // stdin already closed
    }
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await this.proc.exited;
    clearTimeout(t);
  }
}

/** Starts testpmd (optionally inside a network namespace) and waits for its prompt. */
export async function startTestPmd(o: {
  label: string;
  netns?: string;
  prefix: string;
  vdevs: string[];
  app: string[];
}): Promise<TestPmd> {
  const argv = [
    ...(o.netns ? ["ip", "netns", "exec", o.netns] : []),
    "stdbuf", "-oL",
    "dpdk-testpmd",
    ...ealArgs(o.prefix, o.vdevs),
    "--",
    "-i",
    "--total-num-mbufs=32768",
    "--nb-cores=1",
    ...o.app,
  ];
  const t = new TestPmd(o.label, argv);
  try {
    await t.ready();
  } catch (e) {
    t.proc.kill("SIGKILL");
    throw e;
  }
  return t;
}
