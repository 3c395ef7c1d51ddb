/**
 * E2E rig: boots a throw-away QEMU guest that runs one shell command against vhost-user devices.
 *
 *   const rig = await ensureRig();                       // in beforeAll, with SETUP_TIMEOUT_MS
 *   const r = await bootGuest({
 *     command: "dd if=/dev/vda bs=4k count=1 | md5sum",
 *     devices: ["-chardev", `socket,id=c0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=c0"],
 *   });
 *   expect(r.exitStatus).toBe(0);
 *
 * The guest is the bookworm-backports 6.12 kernel + a busybox initramfs built by setup.sh. Its /init
 * loads virtio_blk/virtio_net/virtio_snd/ext4 (virtio_pci and virtio_console are built in), runs the
 * command with /bin/sh (dash; busybox applets, fio, mke2fs, blkdiscard on PATH) in /tmp, prints
 * `E2E-EXIT-STATUS=<n>` on the serial console and powers off. One QEMU process per command keeps tests
 * independent and makes "the guest finished" == "QEMU exited".
 *
 * Environment: E2E_CACHE (cache dir, default /var/cache/vhost-backend-e2e), E2E_SKIP_SETUP=1 (trust
 * $E2E_CACHE/rig.json from an earlier setup.sh run instead of running it), E2E_SERIAL=1 (echo guest
 * serial output to stderr while it runs).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface Rig {
  cacheDir: string;
  /** bzImage of the guest kernel (bookworm-backports linux-image-amd64, extracted, not installed). */
  kernel: string;
  kernelVersion: string;
  /** The guest kernel's /lib/modules/<version> tree on the host (with modules.dep). */
  modulesDir: string;
  /** Uncompressed cpio (uncompressed saves ~1 s per boot under TCG). */
  initramfs: string;
  /** Stock QEMU 10 from bookworm-backports. */
  qemu: string;
  qemuStorageDaemon: string;
  /** QEMU 10.0.2 built with user-creatable vhost-user-device(-pci); null unless requested. */
  qemuConsole: string | null;
  /** Firmware search path, passed as -L (the patched build's compiled-in path has no firmware). */
  firmwareDirs: string[];
}

/** A cold setup.sh (apt + kernel + QEMU build) takes minutes: use this as the beforeAll timeout. */
export const SETUP_TIMEOUT_MS = 15 * 60_000;

const SETUP_SH = join(import.meta.dir, "setup.sh");
const EXIT_MARKER = /^E2E-EXIT-STATUS=(\d+)$/m;
const UP_MARKER = "E2E-GUEST-UP";

// One setup.sh run per process and mode; "all" (with the QEMU build) also satisfies "base".
let basePromise: Promise<Rig> | undefined;
let allPromise: Promise<Rig> | undefined;

export function ensureRig(opts: { consoleQemu: true }): Promise<Rig & { qemuConsole: string }>;
export function ensureRig(opts?: { consoleQemu?: boolean }): Promise<Rig>;
export function ensureRig(opts: { consoleQemu?: boolean } = {}): Promise<Rig> {
  if (opts.consoleQemu) {
    allPromise ??= runSetup("all");
    return allPromise;
  }
  basePromise ??= allPromise ?? runSetup("base");
  return basePromise;
}

async function runSetup(mode: "all" | "base"): Promise<Rig> {
  const cacheDir = process.env.E2E_CACHE ?? "/var/cache/vhost-backend-e2e";
  if (process.env.E2E_SKIP_SETUP === "1") {
    const rig = JSON.parse(readFileSync(join(cacheDir, "rig.json"), "utf8")) as Rig;
    if (mode === "all" && !rig.qemuConsole) throw new Error("E2E_SKIP_SETUP=1 but rig.json has no qemuConsole");
    return rig;
  }
  const dir = mkdtempSync(join(tmpdir(), "e2e-setup-"));
  const json = join(dir, "rig.json");
  const logPath = join(tmpdir(), `vhost-backend-e2e-setup-${process.pid}-${mode}.log`);
  // Output goes to a file, not the test output: a warm run is quiet, a failing one is reported below.
  // (One shell redirect, so stdout and stderr share a file offset and do not overwrite each other.)
  const proc = Bun.spawn(["bash", "-c", 'exec bash "$0" "$1" >"$2" 2>&1', SETUP_SH, mode, logPath], {
    env: { ...process.env, E2E_CACHE: cacheDir, E2E_RIG_JSON: json },
    stdin: "ignore",
  });
  const code = await proc.exited;
  try {
    if (code !== 0) {
      const log = existsSync(logPath) ? readFileSync(logPath, "utf8") : "";
      throw new Error(`test/e2e/setup.sh ${mode} failed (exit ${code}); log ${logPath}:\n${tail(log, 40)}`);
    }
    rmSync(logPath, { force: true });
    return JSON.parse(readFileSync(json, "utf8")) as Rig;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface BootOptions {
  /** Shell script run in the guest by /bin/sh (dash) in /tmp; its stdout/stderr go to `serial`. */
  command: string;
  /** Extra QEMU args for the devices under test, e.g. ["-chardev", "socket,...", "-device", "..."]. */
  devices?: string[];
  /** Guest RAM, also the size of the shared memfd backend vhost-user needs. Default 512. */
  memoryMiB?: number;
  /** QEMU binary; default the stock one (pass rig.qemuConsole for vhost-user-device-pci). */
  qemu?: string;
  /** Kill QEMU and throw after this long. Default 60 s (boot alone is ~3 s under TCG). */
  timeoutMs?: number;
  /** Appended to the kernel command line. */
  kernelCmdline?: string;
  /** Any other QEMU args (e.g. -qmp, -smp). */
  extraArgs?: string[];
  /** Called with each chunk of serial output as it arrives (for long-running guests). */
  onSerial?: (chunk: string) => void;
}

export interface BootResult {
  /** Exit status of the guest command, or null if the guest never reported one (QEMU failed, panic). */
  exitStatus: number | null;
  /** Everything on the serial console (BIOS noise, kernel messages, the command's output), \n-separated. */
  serial: string;
  /** QEMU's stderr (device/realize errors land here). */
  stderr: string;
  /** QEMU's own exit code. */
  qemuExitCode: number | null;
  /** Wall time from spawning QEMU to its exit. */
  durationMs: number;
  /** Wall time from spawning QEMU until /init was about to run the command; null if never reached. */
  bootToCommandMs: number | null;
  /** The full argv QEMU was started with (for failure messages). */
  argv: string[];
}

// QEMU processes still running, killed if the test process exits early (failed assertion, ^C).
const live = new Set<{ kill(sig?: number | NodeJS.Signals): void }>();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

export async function bootGuest(opts: BootOptions): Promise<BootResult> {
  const rig = await ensureRig();
  const mem = opts.memoryMiB ?? 512;
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const dir = mkdtempSync(join(tmpdir(), "e2e-guest-"));
  const cmdFile = join(dir, "cmd.sh");
  // fw_cfg carries the command verbatim (no quoting or size issues as with the kernel command line).
  writeFileSync(cmdFile, opts.command.endsWith("\n") ? opts.command : opts.command + "\n");

  const argv = [
    opts.qemu ?? rig.qemu,
    ...rig.firmwareDirs.flatMap((d) => ["-L", d]),
    // /dev/kvm here is a paravirtual KVM that cannot run stock kernels: always TCG.
    "-accel", "tcg,thread=multi",
    "-cpu", "max",
    "-m", `${mem}M`,
    // vhost-user backends mmap guest RAM: it must be a shareable fd.
    "-object", `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    "-machine", "q35,memory-backend=mem",
    "-nographic",
    "-no-reboot",
    // No default NIC: saves the iPXE option ROM at boot and keeps eth0 for the device under test.
    "-nic", "none",
    "-kernel", rig.kernel,
    "-initrd", rig.initramfs,
    // panic=-1 + -no-reboot: a crashing guest ends QEMU at once instead of waiting for the timeout.
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss its
    // ticks and panic ("IO-APIC + timer doesn't work!"); the check proves nothing about our device.
    "-append", `console=ttyS0 quiet panic=-1 no_timer_check ${opts.kernelCmdline ?? ""}`.trim(),
    "-fw_cfg", `name=opt/cmd,file=${cmdFile}`,
    ...(opts.devices ?? []),
    ...(opts.extraArgs ?? []),
  ];

  const start = performance.now();
  let bootToCommandMs: number | null = null;
  let serial = "";
  const echo = process.env.E2E_SERIAL === "1";
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  live.add(proc);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGKILL");
  }, timeoutMs);

  try {
    const stderrP = new Response(proc.stderr).text();
    const decoder = new TextDecoder();
    for await (const bytes of proc.stdout) {
      const chunk = decoder.decode(bytes, { stream: true }).replace(/\r/g, "");
      serial += chunk;
      if (bootToCommandMs === null && serial.includes(UP_MARKER)) bootToCommandMs = performance.now() - start;
      if (echo) process.stderr.write(chunk);
      opts.onSerial?.(chunk);
    }
    const qemuExitCode = await proc.exited;
    const stderr = await stderrP;
    const durationMs = performance.now() - start;
    if (timedOut) {
      throw new Error(
        `guest timed out after ${timeoutMs} ms\nargv: ${argv.join(" ")}\n` +
          `stderr:\n${tail(stderr, 20)}\nserial tail:\n${tail(serial, 40)}`,
      );
    }
    const m = EXIT_MARKER.exec(serial);
    return {
      exitStatus: m ? Number(m[1]) : null,
      serial,
      stderr,
      qemuExitCode,
      durationMs,
      bootToCommandMs,
      argv,
    };
  } finally {
    clearTimeout(timer);
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    live.delete(proc);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Waits until a unix socket (or any file) exists: backends must listen before QEMU connects. */
export async function waitForPath(path: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${path}`);
    await Bun.sleep(20);
  }
}

export function tail(text: string, lines: number): string {
  return text.split("\n").slice(-lines).join("\n");
}
