/**
 * E2E rig for live migration: long-lived QEMU guests driven over QMP, with the serial console
 * readable while the guest runs and writable (the guest's stdin), and a migration driver.
 *
 *   const dir = ...; const cmd = writeGuestCommand(dir, script);
 *   const src = await startVm({ name: "src", dir, cmdFile: cmd, devices: [...] });
 *   const dst = await startVm({ name: "dst", dir, cmdFile: cmd, devices: [...], incoming: true });
 *   await src.waitSerial("READY", 60_000);
 *   await startMigration(src.qmp, dst.incomingUri!, { "max-bandwidth": 64 << 20 });
 *   const info = await waitMigration(src.qmp, (i) => i.status === "completed", 60_000);
 *   dst.send("go\n");                                   // the guest's `read` returns, on the destination
 *   const done = await dst.finished(60_000);            // E2E-EXIT-STATUS from the destination's serial
 *
 * Both QEMUs get the same argv (kernel, initramfs, fw_cfg command: the destination's RAM is
 * overwritten by the migration, but QEMU requires the same devices) apart from the device sockets,
 * the QMP socket and -incoming. The guest's /init (test/e2e/setup.sh) runs the fw_cfg command with
 * /dev/console (ttyS0) as stdin/stdout, so a `read` in the command waits for a line the host writes
 * to QEMU's stdin (-nographic muxes the serial port onto stdio, serial first).
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { ensureRig, tail, waitForPath } from "./rig.ts";

const EXIT_MARKER = /^E2E-EXIT-STATUS=(\d+)$/m;

// ---------------------------------------------------------------------------------------------
// QMP

/** A minimal QMP client: one command at a time is enough for tests; events are collected. */
export class Qmp {
  readonly events: { event: string; data?: unknown; timestamp?: unknown }[] = [];
  private buf = "";
  private waiting: { resolve(v: unknown): void; reject(e: Error): void; cmd: string }[] = [];
  private closed = false;
  private greeted!: () => void;
  private readonly greeting = new Promise<void>((r) => (this.greeted = r));
  private sock!: Awaited<ReturnType<typeof Bun.connect>>;

  private constructor(readonly path: string) {}

  static async connect(path: string, timeoutMs = 15_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    await waitForPath(path, timeoutMs);
    const q = new Qmp(path);
    // QEMU binds its QMP socket before it listens on it: a connect in between is refused (CI saw
    // it on a loaded machine). Retry until the deadline.
    for (;;) {
      try {
        q.sock = await Bun.connect({
          unix: path,
          socket: {
            data: (_s, chunk) => q.onData(chunk.toString()),
            close: () => q.onClose(),
            error: () => q.onClose(),
          },
        });
        break;
      } catch (e) {
        if ((e as { code?: string }).code !== "ECONNREFUSED" || Date.now() > deadline) throw e;
        await Bun.sleep(20);
      }
    }
    await q.greeting;
    await q.execute("qmp_capabilities");
    return q;
  }

  private onData(text: string): void {
    this.buf += text;
    for (let nl = this.buf.indexOf("\n"); nl >= 0; nl = this.buf.indexOf("\n")) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line === "") continue;
      const msg = JSON.parse(line) as Record<string, unknown>;
      if ("QMP" in msg) this.greeted();
      else if ("event" in msg) this.events.push(msg as never);
      else {
        const w = this.waiting.shift();
        if (w === undefined) continue;
        if ("error" in msg) w.reject(new Error(`QMP ${w.cmd}: ${JSON.stringify(msg.error)}`));
        else w.resolve(msg.return);
      }
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.reject(new Error(`QMP ${w.cmd}: connection closed`));
  }

  /** Runs one command; resolves with its "return" value, rejects with its "error". */
  execute<T = any>(cmd: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new Error(`QMP ${cmd}: connection closed`));
    return new Promise<T>((resolve, reject) => {
      this.waiting.push({ resolve: resolve as (v: unknown) => void, reject, cmd });
      this.sock.write(JSON.stringify(args === undefined ? { execute: cmd } : { execute: cmd, arguments: args }) + "\n");
    });
  }

  close(): void {
    if (!this.closed) this.sock.end();
    this.onClose();
  }
}

// ---------------------------------------------------------------------------------------------
// Guests

export interface VmOptions {
  /** Names the QMP and incoming sockets in `dir`. */
  name: string;
  dir: string;
  /** The guest command file (writeGuestCommand), shared by source and destination. */
  cmdFile: string;
  /** Device args (identical across source and destination apart from socket paths). */
  devices: string[];
  memoryMiB?: number;
  smp?: number;
  /** Start as a migration destination listening on unix:<dir>/<name>.incoming (true), or on this URI (e.g. tcp:ADDR:PORT). */
  incoming?: boolean | string;
  /** argv prefix QEMU runs under, e.g. ["ip", "netns", "exec", NS] (a "host" of its own; it execs QEMU, so the pid is QEMU's). */
  launcher?: string[];
  extraArgs?: string[];
  /** Appended to the kernel command line. */
  kernelCmdline?: string;
  /** Kill QEMU after this long whatever happens (a hung guest must not hang the test file). */
  timeoutMs?: number;
}

export interface Vm {
  name: string;
  proc: Subprocess<"pipe", "pipe", "pipe">;
  argv: string[];
  qmp: Qmp;
  /** `unix:PATH` this destination listens on (null for a source). */
  incomingUri: string | null;
  /** Serial output so far (\r removed). */
  serial(): string;
  stderr(): string;
  /** Resolves once `pattern` appears in the serial output; rejects on timeout or QEMU exit. */
  waitSerial(pattern: string | RegExp, timeoutMs: number): Promise<void>;
  /** Writes to the guest's serial console (its stdin). */
  send(text: string): void;
  /** Waits until QEMU exits (killing it after timeoutMs); the guest's exit status if it reported one. */
  finished(timeoutMs: number): Promise<{ exitStatus: number | null; qemuExitCode: number | null; serial: string; stderr: string }>;
  /** Last lines of serial and stderr, for failure messages. */
  describe(): string;
  kill(): void;
}

const live = new Set<Subprocess>();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

/** Writes the guest command where both QEMUs' -fw_cfg can read it. */
export function writeGuestCommand(dir: string, script: string, name = "cmd.sh"): string {
  const p = join(dir, name);
  writeFileSync(p, script.endsWith("\n") ? script : script + "\n");
  return p;
}

export async function startVm(o: VmOptions): Promise<Vm> {
  const rig = await ensureRig();
  const mem = o.memoryMiB ?? 512;
  const qmpPath = join(o.dir, `${o.name}.qmp`);
  const incomingPath = join(o.dir, `${o.name}.incoming`);
  const incomingUri = typeof o.incoming === "string" ? o.incoming : o.incoming ? `unix:${incomingPath}` : null;
  const argv = [
    ...(o.launcher ?? []),
    rig.qemu,
    ...rig.firmwareDirs.flatMap((d) => ["-L", d]),
    "-accel", "tcg,thread=multi",
    "-cpu", "max",
    "-smp", String(o.smp ?? 2),
    "-m", `${mem}M`,
    "-object", `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    "-machine", "q35,memory-backend=mem",
    "-nographic",
    "-no-reboot",
    "-nic", "none",
    "-kernel", rig.kernel,
    "-initrd", rig.initramfs,
    "-append", `console=ttyS0 quiet panic=-1 no_timer_check ${o.kernelCmdline ?? ""}`.trim(),
    "-fw_cfg", `name=opt/cmd,file=${o.cmdFile}`,
    "-qmp", `unix:${qmpPath},server=on,wait=off`,
    ...(incomingUri !== null ? ["-incoming", incomingUri] : []),
    ...o.devices,
    ...(o.extraArgs ?? []),
  ];
  const proc = Bun.spawn(argv, { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
  live.add(proc);
  const killTimer = setTimeout(() => proc.kill("SIGKILL"), o.timeoutMs ?? 240_000);
  let serial = "";
  let stderr = "";
  const watchers = new Set<() => void>();
  const echo = process.env.E2E_SERIAL === "1";
  const dec = new TextDecoder();
  const outDone = (async () => {
    for await (const b of proc.stdout) {
      const chunk = dec.decode(b, { stream: true }).replace(/\r/g, "");
      serial += chunk;
      if (echo) process.stderr.write(`[${o.name}] ${chunk}`);
      for (const w of watchers) w();
    }
  })();
  const errDone = (async () => {
    const d = new TextDecoder();
    for await (const b of proc.stderr) stderr += d.decode(b, { stream: true });
  })();
  const exited = proc.exited.then(async (code) => {
    clearTimeout(killTimer);
    live.delete(proc);
    await Promise.all([outDone, errDone]);
    for (const w of watchers) w();
    return code;
  });
  const describe = () => `--- ${o.name} serial (tail):\n${tail(serial, 30)}\n--- ${o.name} qemu stderr:\n${tail(stderr, 15)}`;
  let qmp: Qmp;
  try {
    qmp = await Promise.race([
      Qmp.connect(qmpPath),
      exited.then((c) => Promise.reject(new Error(`QEMU ${o.name} exited (${c}) before QMP\n${stderr}`))),
    ]);
  } catch (e) {
    proc.kill("SIGKILL");
    throw e;
  }
  return {
    name: o.name,
    proc,
    argv,
    qmp,
    incomingUri,
    serial: () => serial,
    stderr: () => stderr,
    waitSerial(pattern, timeoutMs) {
      const has = () => (typeof pattern === "string" ? serial.includes(pattern) : pattern.test(serial));
      return new Promise<void>((resolve, reject) => {
        const done = (err?: Error) => {
          clearTimeout(timer);
          watchers.delete(check);
          if (err) reject(err);
          else resolve();
        };
        const check = () => {
          if (has()) done();
          else if (proc.exitCode !== null || proc.signalCode !== null) done(new Error(`QEMU ${o.name} exited before serial showed ${pattern}\n${describe()}`));
        };
        const timer = setTimeout(() => done(new Error(`timed out after ${timeoutMs} ms waiting for ${pattern} on ${o.name}'s serial\n${describe()}`)), timeoutMs);
        watchers.add(check);
        check();
      });
    },
    send(text) {
      proc.stdin.write(text);
      proc.stdin.flush();
    },
    async finished(timeoutMs) {
      const t = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      const qemuExitCode = await exited;
      clearTimeout(t);
      qmp.close();
      const m = EXIT_MARKER.exec(serial);
      return { exitStatus: m ? Number(m[1]) : null, qemuExitCode, serial, stderr };
    },
    describe,
    kill() {
      qmp.close();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Migration

/** The parts of query-migrate the tests look at (times in ms). */
export interface MigrationInfo {
  status: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "setup-time"?: number;
  "error-desc"?: string;
  ram?: { transferred: number; "dirty-sync-count": number; "dirty-pages-rate": number; remaining: number; total: number; duplicate: number; normal: number; mbps: number };
}

/** Sets migration parameters (migrate-set-parameters) and starts `migrate` to `uri`. */
export async function startMigration(src: Qmp, uri: string, params: Record<string, unknown> = {}): Promise<void> {
  if (Object.keys(params).length > 0) await src.execute("migrate-set-parameters", params);
  await src.execute("migrate", { uri });
}

/**
 * Polls query-migrate until `until(info)` holds, or the migration ends (completed, failed,
 * cancelled: returned as is, so callers check `status`), or throws after timeoutMs — also when
 * QEMU stops answering: its main loop waits for the big lock while the migration thread holds it,
 * e.g. blocked on a vhost-user reply (GET_VRING_BASE) that a backend never sends.
 */
export async function waitMigration(src: Qmp, until: (i: MigrationInfo) => boolean, timeoutMs: number, pollMs = 50): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const answerMs = Math.max(0, deadline - Date.now()) + 1000;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const unanswered = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`QMP query-migrate: QEMU did not answer within ${answerMs} ms (its main loop is blocked: a device stop waiting for a vhost-user reply?)`)), answerMs);
    });
    const info = await Promise.race([src.execute<MigrationInfo>("query-migrate"), unanswered]).finally(() => clearTimeout(timer));
    if (until(info) || ["completed", "failed", "cancelled"].includes(info.status)) return info;
    if (Date.now() > deadline) throw new Error(`migration still ${info.status} after ${timeoutMs} ms: ${JSON.stringify(info)}`);
    await Bun.sleep(pollMs);
  }
}

/** One line for the test log: downtime, total time, bytes, dirty-sync iterations. */
export function summarize(label: string, i: MigrationInfo): string {
  const mib = i.ram ? (i.ram.transferred / 2 ** 20).toFixed(1) : "?";
  return `${label}: status=${i.status} downtime=${i.downtime ?? "?"} ms total-time=${i["total-time"] ?? "?"} ms setup=${i["setup-time"] ?? "?"} ms transferred=${mib} MiB dirty-sync-count=${i.ram?.["dirty-sync-count"] ?? "?"}`;
}

// ---------------------------------------------------------------------------------------------
// Guest script pieces

/** fio with verify in the background on /dev/vda, one 16 MiB randwrite+verify run after another (at `offsetMiB`) until FIO_STOP. */
export function fioVerifyLoop(offsetMiB: number): string {
  return `# fio with verify, one 16 MiB randwrite+verify run after another until told to stop.
(
  i=0
  while [ ! -e /tmp/stop ]; do
    i=$((i+1))
    if ! fio --name=mig --filename=/dev/vda --offset=${offsetMiB}M --size=16M --rw=randwrite --bs=4k \\
        --ioengine=libaio --direct=1 --invalidate=0 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 \\
        --output=/tmp/fio.out >/dev/null 2>&1; then
      echo "E2E-FIO-FAIL run=$i: $(grep -m1 -iE 'bad|mismatch|error' /tmp/fio.out)"; tail -n 15 /tmp/fio.out; echo fail > /tmp/fio.result; exit 1
    fi
  done
  echo "E2E-FIO-OK runs=$i"; echo ok > /tmp/fio.result
) &
`;
}

/** Stops fioVerifyLoop after its current run (waiting at most 60 s); sets bit 2 of $rc on an error, 4 if it hung. */
export const FIO_STOP = `touch /tmp/stop
t=0
while [ ! -e /tmp/fio.result ] && [ $t -lt 600 ]; do sleep 0.1; t=$((t+1)); done
if [ ! -e /tmp/fio.result ]; then echo "E2E-FIO-HUNG"; rc=$((rc|4)); elif [ "$(cat /tmp/fio.result)" != ok ]; then rc=$((rc|2)); fi
`;
