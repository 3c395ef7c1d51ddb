// Stop + migrate-to-file + restore of a guest whose virtio-console is our backend, attached through
// the generic vhost-user-device-pci of the patched QEMU (test/e2e/setup.sh, qemu-console step:
// test/e2e/qemu-patches/vhost-user-base-migration.patch gives vhost-user-base devices vhost-user-fs's
// back-end state migration through SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE).
//
// The destination runs a NEW backend process (same --output-file, opened for append): what the old
// one held (input typed while the VM was stopped, the output position) reaches it only through the
// device state QEMU carries in the migration file.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { FileSink, Subprocess } from "bun";
import { ensureRig, SETUP_TIMEOUT_MS, tail, waitForPath, type Rig } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";
import { Qmp } from "./migrate_rig.ts";

let rig: Rig & { qemuConsole: string };
let dir: string;
const backends: RunningBackend[] = [];
const vms: ConsoleVm[] = [];

beforeAll(async () => {
  rig = await ensureRig({ consoleQemu: true });
  dir = mkdtempSync(join(tmpdir(), "e2e-console-migration-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const v of vms) v.kill();
  for (const b of backends) b.proc.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const EXIT_MARKER = /^E2E-EXIT-STATUS=(\d+)$/m;

interface ConsoleVm {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  qmp: Qmp | null;
  serial(): string;
  stderr(): string;
  waitSerial(pattern: string, timeoutMs: number): Promise<void>;
  /** QEMU's exit code (killed after timeoutMs). */
  exited(timeoutMs: number): Promise<number | null>;
  describe(): string;
  kill(): void;
}

/**
 * The patched QEMU with our console as vhost-user-device-pci (console.test.ts's layout), a QMP
 * socket, and `-incoming file:PATH` when restoring. Source and destination get the same argv apart
 * from the backend socket, the QMP socket and -incoming.
 */
async function startConsoleVm(name: string, sock: string, cmdFile: string, incoming?: string, opts: { qmp?: boolean } = {}): Promise<ConsoleVm> {
  const qmpPath = join(dir, `${name}.qmp`);
  const argv = [
    rig.qemuConsole,
    ...rig.firmwareDirs.flatMap((d) => ["-L", d]),
    "-accel", "tcg,thread=multi",
    "-cpu", "max",
    "-m", "512M",
    "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
    "-machine", "q35,memory-backend=mem",
    "-nographic",
    "-no-reboot",
    "-nic", "none",
    "-kernel", rig.kernel,
    "-initrd", rig.initramfs,
    "-append", "console=ttyS0 quiet panic=-1 no_timer_check",
    "-fw_cfg", `name=opt/cmd,file=${cmdFile}`,
    "-chardev", `socket,id=c0,path=${sock}`,
    "-device", "vhost-user-device-pci,chardev=c0,virtio-id=3,num_vqs=2,config_size=0",
    ...(opts.qmp === false ? [] : ["-qmp", `unix:${qmpPath},server=on,wait=off`]),
    ...(incoming ? ["-incoming", `file:${incoming}`] : []),
  ];
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  let serial = "";
  let stderr = "";
  const watchers = new Set<() => void>();
  const outDone = (async () => {
    const d = new TextDecoder();
    for await (const b of proc.stdout) {
      serial += d.decode(b, { stream: true }).replace(/\r/g, "");
      for (const w of watchers) w();
    }
  })();
  const errDone = (async () => {
    const d = new TextDecoder();
    for await (const b of proc.stderr) stderr += d.decode(b, { stream: true });
  })();
  const exited = proc.exited.then(async (code) => {
    await Promise.all([outDone, errDone]);
    for (const w of watchers) w();
    return code;
  });
  const describe = () => `--- ${name} serial (tail):\n${tail(serial, 25)}\n--- ${name} qemu stderr:\n${tail(stderr, 15)}`;
  const vm: ConsoleVm = {
    proc,
    qmp: null,
    serial: () => serial,
    stderr: () => stderr,
    waitSerial(pattern, timeoutMs) {
      return new Promise<void>((resolve, reject) => {
        const done = (err?: Error) => {
          clearTimeout(timer);
          watchers.delete(check);
          err ? reject(err) : resolve();
        };
        const check = () => {
          if (serial.includes(pattern)) done();
          else if (proc.exitCode !== null || proc.signalCode !== null) done(new Error(`QEMU ${name} exited before ${pattern}\n${describe()}`));
        };
        const timer = setTimeout(() => done(new Error(`timed out waiting for ${pattern} on ${name}\n${describe()}`)), timeoutMs);
        watchers.add(check);
        check();
      });
    },
    async exited(timeoutMs) {
      const t = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      const code = await exited;
      clearTimeout(t);
      vm.qmp?.close();
      return code;
    },
    describe,
    kill() {
      vm.qmp?.close();
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    },
  };
  vms.push(vm);
  if (opts.qmp !== false) {
    try {
      vm.qmp = await Promise.race([
        Qmp.connect(qmpPath),
        exited.then((c) => Promise.reject(new Error(`QEMU ${name} exited (${c}) before QMP\n${describe()}`))),
      ]);
    } catch (e) {
      vm.kill();
      throw e;
    }
  }
  return vm;
}

async function consoleBackend(name: string, out: string): Promise<RunningBackend> {
  // stdin is the console's host input ("typed" by the test).
  const b = await startBackend("console", join(dir, `${name}.sock`), ["--log-level", "info", "--output-file", out], { stdin: "pipe" });
  backends.push(b);
  return b;
}

function typeInput(b: RunningBackend, text: string): void {
  const stdin = b.proc.stdin as FileSink;
  stdin.write(text);
  void stdin.flush();
}

/** Polls QMP until the predicate holds on `cmd`'s answer. */
async function pollQmp<T>(qmp: Qmp, cmd: string, until: (r: T) => boolean, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await qmp.execute<T>(cmd);
    if (until(r)) return r;
    if (Date.now() > deadline) throw new Error(`${cmd} still ${JSON.stringify(r)} after ${timeoutMs} ms`);
    await Bun.sleep(50);
  }
}

/** stop + migrate to `file` + quit on the source; returns once QEMU has exited. */
async function saveToFile(vm: ConsoleVm, file: string, mode: "normal" | "cpr-reboot", beforeSave?: () => Promise<void>): Promise<void> {
  const qmp = vm.qmp!;
  await qmp.execute("stop");
  await beforeSave?.();
  if (mode !== "normal") await qmp.execute("migrate-set-parameters", { mode });
  await qmp.execute("migrate", { uri: `file:${file}` });
  const info = await pollQmp<{ status: string; "error-desc"?: string }>(qmp, "query-migrate", (i) => ["completed", "failed", "cancelled"].includes(i.status), 60_000);
  if (info.status !== "completed") throw new Error(`migration to file ${info.status}: ${info["error-desc"] ?? ""}\n${vm.describe()}`);
  await qmp.execute("quit").catch(() => {}); // the connection may close before the answer
  expect(await vm.exited(30_000)).toBe(0);
}

/** Restores from `file` (-incoming file:) and resumes with cont. */
async function restoreFromFile(name: string, sock: string, cmdFile: string, file: string): Promise<ConsoleVm> {
  const vm = await startConsoleVm(name, sock, cmdFile, file);
  // The source was stopped when saved, so the destination stays paused after loading.
  await pollQmp<{ status: string }>(vm.qmp!, "query-status", (s) => s.status !== "inmigrate", 60_000);
  const st = await vm.qmp!.execute<{ status: string }>("query-status");
  if (st.status !== "paused") throw new Error(`destination is ${st.status} after loading, not paused\n${vm.describe()}`);
  await vm.qmp!.execute("cont");
  return vm;
}

/**
 * Locates the console back-end's state in a migration stream: the patched QEMU's subsection
 * "vhost-user-device-backend" (version_id be32), then vhost_save_backend_state's chunks (be32 length
 * + bytes, ending with a 0 length). Our backend's state fits in one chunk.
 */
function backendStateRange(file: Uint8Array): { start: number; length: number } {
  // QEMU_VM_SUBSECTION (5), the name's length, the name (the JSON description at the end of the
  // stream names it too, without this header).
  const name = Buffer.from("vhost-user-device-backend");
  const header = Buffer.concat([Buffer.from([5, name.length]), name]);
  const at = Buffer.from(file.buffer, file.byteOffset, file.byteLength).indexOf(header);
  if (at < 0) throw new Error("no vhost-user-device-backend subsection in the migration file");
  const v = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const p = at + header.length + 4; // skip version_id
  const length = v.getUint32(p);
  const start = p + 4;
  if (length === 0 || start + length + 4 > file.length) throw new Error(`implausible back-end state chunk of ${length} bytes`);
  if (v.getUint32(start + length) !== 0) throw new Error("back-end state is not a single chunk");
  return { start, length };
}

describe("console device: stop + migrate to file + restore with a new backend process", () => {
  for (const mode of ["normal", "cpr-reboot"] as const) {
    test(`mode ${mode}: output continues without loss or duplication, input typed while stopped reaches the guest`, async () => {
      const out = join(dir, `${mode}.out`);
      const stateFile = join(dir, `${mode}.state`);
      const n1 = 400; // written before and (the rest) after the restore, at ~30 lines/s
      const n2 = 500;
      // Typed while the VM is stopped: into the old backend (so it must travel in the device
      // state), then into the new one before the destination QEMU starts.
      const inOld = "typed-into-the-old-backend;";
      const inNew = "typed-into-the-new-backend;";
      const cmdFile = join(dir, `${mode}.sh`);
      writeFileSync(
        cmdFile,
        `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
echo E2E-WRITING
i=1
while [ $i -le ${n1} ]; do echo "line $i" >&3; i=$((i+1)); sleep 0.03; done
echo E2E-READING
got=$(head -c ${inOld.length + inNew.length} <&3)
echo "E2E-GOT $got"
echo "input: $got" >&3
while [ $i -le ${n2} ]; do echo "line $i" >&3; i=$((i+1)); done
echo E2E-DONE
`,
      );

      const oldBackend = await consoleBackend(`${mode}-old`, out);
      const src = await startConsoleVm(`${mode}-src`, oldBackend.socket, cmdFile);
      await src.waitSerial("E2E-WRITING", 120_000);
      const lines = () => readFileSync(out, "utf8").split("\n").length - 1;
      for (const deadline = Date.now() + 60_000; lines() < 60; ) {
        if (Date.now() > deadline) throw new Error(`guest output stalled at ${lines()} lines\n${src.describe()}`);
        await Bun.sleep(50);
      }
      await saveToFile(src, stateFile, mode, async () => {
        typeInput(oldBackend, inOld);
        await Bun.sleep(300); // let the backend read it (the rings are stopped: it stays pending)
      });
      const linesAtSave = lines();
      expect(src.serial()).not.toContain("E2E-READING"); // saved mid-write
      const oldStopped = await oldBackend.stop();
      if (oldStopped.code !== 0) console.error(`old backend:\n${tail(oldStopped.stderr, 20)}`);
      expect(oldStopped.code).toBe(0);

      // The pending input is in the saved back-end state, not anywhere else.
      const saved = readFileSync(stateFile);
      const range = backendStateRange(saved);
      expect(saved.subarray(range.start, range.start + range.length).includes(Buffer.from(inOld))).toBe(true);

      const newBackend = await consoleBackend(`${mode}-new`, out);
      typeInput(newBackend, inNew);
      await Bun.sleep(300);
      const dst = await restoreFromFile(`${mode}-dst`, newBackend.socket, cmdFile, stateFile);
      const code = await dst.exited(180_000);
      const newStopped = await newBackend.stop();
      const m = EXIT_MARKER.exec(dst.serial());
      if (m?.[1] !== "0" || newStopped.code !== 0) console.error(`${dst.describe()}\n--- new backend:\n${tail(newStopped.stderr, 20)}`);
      expect(m?.[1]).toBe("0");
      expect(code).toBe(0);
      expect(newStopped.code).toBe(0);
      expect(newStopped.stderr).toContain("device state restored");
      expect(dst.serial()).toContain(`E2E-GOT ${inOld}${inNew}`);

      const expected: string[] = [];
      for (let i = 1; i <= n1; i++) expected.push(`line ${i}`);
      expected.push(`input: ${inOld}${inNew}`);
      for (let i = n1 + 1; i <= n2; i++) expected.push(`line ${i}`);
      const got = readFileSync(out, "utf8");
      expect(got).toBe(expected.join("\n") + "\n");
      console.log(`[console-migration] ${mode}: saved after ${linesAtSave} of ${n1} lines; back-end state ${range.length} bytes in a ${(saved.length / 1024).toFixed(0)} KiB file`);
    }, 420_000);
  }

  test("a back-end without DEVICE_STATE (qemu-storage-daemon's vhost-user-blk) keeps vhost-user-device unmigratable", async () => {
    const sock = join(dir, "qsd.sock");
    const img = join(dir, "qsd.img");
    writeFileSync(img, new Uint8Array(1 << 20));
    const qsd = Bun.spawn([rig.qemuStorageDaemon, "--blockdev", `driver=file,node-name=f,filename=${img}`,
      "--export", `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock}`], { stdout: "pipe", stderr: "pipe" });
    try {
      await waitForPath(sock, 15_000);
      const qmpPath = join(dir, "nods.qmp");
      const qemu = Bun.spawn([rig.qemuConsole, ...rig.firmwareDirs.flatMap((d) => ["-L", d]), "-S", "-display", "none", "-nic", "none",
        "-m", "256M", "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "q35,memory-backend=mem",
        "-chardev", `socket,id=c0,path=${sock}`, "-device", "vhost-user-device-pci,chardev=c0,virtio-id=2,num_vqs=1,config_size=0",
        "-qmp", `unix:${qmpPath},server=on,wait=off`], { stdout: "pipe", stderr: "pipe" });
      try {
        const qmp = await Qmp.connect(qmpPath);
        // Every mode is blocked (upstream's unmigratable = 1 blocked them all too).
        for (const mode of ["normal", "cpr-reboot"]) {
          await qmp.execute("migrate-set-parameters", { mode });
          const err = await qmp.execute("migrate", { uri: `file:${join(dir, "nods.state")}` }).then(() => null, (e: Error) => e.message);
          expect(err).toContain("Migration disabled: vhost-user back-end of vhost-user-device does not support VHOST_USER_PROTOCOL_F_DEVICE_STATE");
        }
        await qmp.execute("quit").catch(() => {});
        qmp.close();
        expect(await qemu.exited).toBe(0);
      } finally {
        qemu.kill("SIGKILL");
      }
    } finally {
      qsd.kill("SIGKILL");
    }
  }, 60_000);

  test("a corrupt or truncated back-end state fails the load cleanly; the backend keeps serving", async () => {
    const out = join(dir, "corrupt.out");
    const stateFile = join(dir, "corrupt.state");
    const cmdFile = join(dir, "corrupt.sh");
    writeFileSync(
      cmdFile,
      `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
echo before-save >&3
echo E2E-SAVE-ME
got=$(head -c 3 <&3)
echo "after-restore:$got" >&3
`,
    );
    const oldBackend = await consoleBackend("corrupt-old", out);
    const src = await startConsoleVm("corrupt-src", oldBackend.socket, cmdFile);
    await src.waitSerial("E2E-SAVE-ME", 120_000);
    await saveToFile(src, stateFile, "normal");
    expect((await oldBackend.stop()).code).toBe(0);

    const good = readFileSync(stateFile);
    const { start, length } = backendStateRange(good);
    // Every byte of the back-end's blob inverted (the stream's framing intact): the backend refuses it.
    const flipped = Buffer.from(good);
    for (let i = start; i < start + length; i++) flipped[i]! ^= 0xff;
    writeFileSync(join(dir, "flipped.state"), flipped);
    // Cut off in the middle of the blob: QEMU cannot read the state.
    copyFileSync(stateFile, join(dir, "truncated.state"));
    truncateSync(join(dir, "truncated.state"), start + Math.floor(length / 2));

    const backend = await consoleBackend("corrupt-new", out);
    for (const bad of ["flipped", "truncated"]) {
      const vm = await startConsoleVm(`corrupt-dst-${bad}`, backend.socket, cmdFile, join(dir, `${bad}.state`), { qmp: false });
      const code = await vm.exited(60_000);
      if (code === 0 || !vm.stderr().includes("Error loading back-end state")) console.error(vm.describe());
      expect(code).not.toBe(0);
      expect(vm.proc.signalCode).toBeNull(); // an orderly exit, not a crash or our timeout kill
      // vhost_load_backend_state's error, prefixed by the patch with the virtio device and its path.
      expect(vm.stderr()).toMatch(/Error loading back-end state of virtio-serial device \S+virtio-backend: /);
      expect(vm.stderr()).toContain("error while loading state for instance 0x0 of device '0000:00:02.0/vhost-user-device'");
      expect(vm.stderr()).toContain("load of migration failed");
      expect(backend.proc.exitCode).toBeNull(); // still serving
      console.log(`[console-migration] ${bad}: ${vm.stderr().split("\n").find((l) => l.includes("back-end state"))}`);
    }

    // The same backend then takes the intact state and the guest carries on,
    const dst = await restoreFromFile("corrupt-dst-good", backend.socket, cmdFile, stateFile);
    typeInput(backend, "xyz");
    expect(await dst.exited(120_000)).toBe(0);
    expect(EXIT_MARKER.exec(dst.serial())?.[1]).toBe("0");
    // and afterwards serves a freshly booted guest.
    const freshCmd = join(dir, "fresh.sh");
    writeFileSync(freshCmd, "set -e\nexec 3<>/dev/hvc0\nstty raw -echo <&3\necho fresh-boot >&3\n");
    const fresh = await startConsoleVm("fresh", backend.socket, freshCmd, undefined, { qmp: false });
    expect(await fresh.exited(120_000)).toBe(0);
    expect(EXIT_MARKER.exec(fresh.serial())?.[1]).toBe("0");
    const stopped = await backend.stop();
    if (stopped.code !== 0) console.error(tail(stopped.stderr, 30));
    expect(stopped.code).toBe(0);
    expect(stopped.stderr).toContain("CHECK_DEVICE_STATE"); // the refusal of the flipped state, logged
    expect(readFileSync(out, "utf8")).toBe("before-save\nafter-restore:xyz\nfresh-boot\n");
  }, 480_000);
});
