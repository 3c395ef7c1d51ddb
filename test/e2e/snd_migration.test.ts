// Stop + migrate-to-file + restore of a guest playing through our snd backend (vhost-user-snd-pci of
// the patched QEMU, test/e2e/setup.sh qemu-console step: test/e2e/qemu-patches/
// vhost-user-base-migration.patch gives vhost-user-snd vhost-user-fs's back-end state migration
// through SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE).
//
// The guest plays a known WAV with aplay to hw:0,0; about 2 s in, the VM is stopped, saved to a file
// and QEMU quits; the old backend gets SIGTERM (the WAV header it leaves must be right), and a NEW
// backend process with the same --playback-file serves the destination QEMU (-incoming file:, cont).
// The stream was running when saved, so the new backend reopens the saved WAV in append mode and
// aplay finishes on the destination: the final WAV holds exactly the played PCM.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, statSync, writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import type { Subprocess } from "bun";
import { ensureRig, SETUP_TIMEOUT_MS, tail, type Rig } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";
import { Qmp } from "./migrate_rig.ts";
import { WavWriter, readWavInfo } from "../../devices/snd/wav.ts";
import * as P from "../../devices/snd/protocol.ts";

let rig: Rig & { qemuConsole: string };
let dir: string;
const backends: RunningBackend[] = [];
const vms: SndVm[] = [];

beforeAll(async () => {
  rig = await ensureRig({ consoleQemu: true });
  dir = mkdtempSync(join(tmpdir(), "e2e-snd-migration-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const v of vms) v.kill();
  for (const b of backends) b.proc.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const EXIT_MARKER = /^E2E-EXIT-STATUS=(\d+)$/m;
const FORMAT = { format: P.FMT_S16, channels: 2, rateHz: 48000 };
const BYTES_PER_SECOND = 48000 * 4;
const WAV_HEADER_BYTES = 44; // what WavWriter writes for PCM S16

interface SndVm {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  qmp: Qmp;
  serial(): string;
  waitSerial(pattern: string, timeoutMs: number): Promise<void>;
  exited(timeoutMs: number): Promise<number | null>;
  describe(): string;
  kill(): void;
}

/** The patched QEMU with our snd as vhost-user-snd-pci; the same argv for source and destination apart from sockets and -incoming. */
async function startSndVm(name: string, sock: string, cmdFile: string, wav: string, incoming?: string): Promise<SndVm> {
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
    "-fw_cfg", `name=opt/wav,file=${wav}`,
    "-chardev", `socket,id=s0,path=${sock}`,
    "-device", "vhost-user-snd-pci,chardev=s0",
    "-qmp", `unix:${qmpPath},server=on,wait=off`,
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
  const vm: SndVm = {
    proc,
    qmp: null as unknown as Qmp,
    serial: () => serial,
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
  try {
    vm.qmp = await Promise.race([
      Qmp.connect(qmpPath),
      exited.then((c) => Promise.reject(new Error(`QEMU ${name} exited (${c}) before QMP\n${describe()}`))),
    ]);
  } catch (e) {
    vm.kill();
    throw e;
  }
  return vm;
}

async function pollQmp<T>(qmp: Qmp, cmd: string, until: (r: T) => boolean, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await qmp.execute<T>(cmd);
    if (until(r)) return r;
    if (Date.now() > deadline) throw new Error(`${cmd} still ${JSON.stringify(r)} after ${timeoutMs} ms`);
    await Bun.sleep(50);
  }
}

/** Data bytes of a WAV (from its size on disk: the header is only rewritten on suspend/exit). */
function dataOnDisk(path: string): number {
  try {
    return Math.max(0, statSync(path).size - WAV_HEADER_BYTES);
  } catch {
    return 0;
  }
}

/** Length of the run of zero bytes in `b` starting at `from`. */
function zeroRun(b: Uint8Array, from: number): number {
  let i = from;
  while (i < b.length && b[i] === 0) i++;
  return i - from;
}

describe("snd device: stop + migrate to file + restore with a new backend process", () => {
  test("aplay started on the source finishes on the destination; the WAV holds the played PCM exactly once", async () => {
    const seconds = 6;
    const play = new Uint8Array(randomBytes(seconds * BYTES_PER_SECOND));
    // Random PCM has no long zero runs: a gap of silence in the output is unambiguous.
    expect(zeroRun(play, 0)).toBeLessThan(8);
    const playWav = join(dir, "play.wav");
    const w = WavWriter.open(playWav, FORMAT);
    w.write(play);
    w.finalize();
    const out = join(dir, "out.wav");
    const stateFile = join(dir, "vm.state");
    const cmdFile = join(dir, "cmd.sh");
    writeFileSync(
      cmdFile,
      [
        "set -e",
        "cp /sys/firmware/qemu_fw_cfg/by_name/opt/wav/raw /tmp/play.wav",
        "aplay -q -D hw:0,0 /tmp/play.wav & pid=$!",
        // The period aplay negotiated (the silence allowed below), read while it plays.
        "while ! grep -q period_size /proc/asound/card0/pcm0p/sub0/hw_params 2>/dev/null; do sleep 0.05; done",
        'echo "E2E-PERIOD-FRAMES=$(sed -n \'s/^period_size: //p\' /proc/asound/card0/pcm0p/sub0/hw_params)"',
        "echo E2E-PLAYING",
        "rc=0; wait $pid || rc=$?",
        'echo "E2E-APLAY-RC=$rc"',
        'test "$rc" = 0',
        "",
      ].join("\n"),
    );
    const args = ["--log-level", "info", "--backend", "file", "--playback-file", out];

    const oldBackend = await startBackend("snd", join(dir, "old.sock"), args);
    backends.push(oldBackend);
    const src = await startSndVm("src", oldBackend.socket, cmdFile, playWav);
    await src.waitSerial("E2E-PLAYING", 120_000);
    for (const deadline = Date.now() + 60_000; dataOnDisk(out) < 2 * BYTES_PER_SECOND; ) {
      if (Date.now() > deadline) throw new Error(`playback stalled at ${dataOnDisk(out)} bytes\n${src.describe()}`);
      await Bun.sleep(20);
    }

    // stop + migrate to file + quit on the source.
    await src.qmp.execute("stop");
    await src.qmp.execute("migrate", { uri: `file:${stateFile}` });
    const info = await pollQmp<{ status: string; "error-desc"?: string }>(src.qmp, "query-migrate", (i) => ["completed", "failed", "cancelled"].includes(i.status), 60_000);
    if (info.status !== "completed") throw new Error(`migration to file ${info.status}: ${info["error-desc"] ?? ""}\n${src.describe()}`);
    await src.qmp.execute("quit").catch(() => {});
    expect(await src.exited(30_000)).toBe(0);
    expect(src.serial()).not.toContain("E2E-APLAY-RC"); // saved mid-playback

    const oldStopped = await oldBackend.stop();
    if (oldStopped.code !== 0) console.error(`old backend:\n${tail(oldStopped.stderr, 20)}`);
    expect(oldStopped.code).toBe(0);
    // The old backend's WAV: a consistent header for what it played, a prefix of the played PCM.
    const atSave = readWavInfo(out);
    expect(atSave).toMatchObject({ format: P.FMT_S16, channels: 2, rateHz: 48000, sizeWasStale: false, dataOffset: WAV_HEADER_BYTES });
    expect(statSync(out).size).toBe(atSave.dataOffset + atSave.dataBytes);
    const savedBytes = atSave.dataBytes;
    expect(savedBytes).toBeGreaterThanOrEqual(2 * BYTES_PER_SECOND);
    expect(savedBytes).toBeLessThan(play.length);
    const before = readFileSync(out).subarray(atSave.dataOffset);
    expect(Buffer.from(before).equals(Buffer.from(play.subarray(0, savedBytes)))).toBe(true);

    // A new backend process (no --playback-append: the restored state makes it continue the file).
    const newBackend = await startBackend("snd", join(dir, "new.sock"), args);
    backends.push(newBackend);
    const dst = await startSndVm("dst", newBackend.socket, cmdFile, playWav, stateFile);
    await pollQmp<{ status: string }>(dst.qmp, "query-status", (s) => s.status !== "inmigrate", 60_000);
    const st = await dst.qmp.execute<{ status: string }>("query-status");
    if (st.status !== "paused") throw new Error(`destination is ${st.status} after loading, not paused\n${dst.describe()}`);
    await dst.qmp.execute("cont");
    const code = await dst.exited(90_000);
    const newStopped = await newBackend.stop();
    const rc = /E2E-APLAY-RC=(\d+)/.exec(dst.serial());
    const m = EXIT_MARKER.exec(dst.serial());
    if (rc?.[1] !== "0" || m?.[1] !== "0" || newStopped.code !== 0) console.error(`${dst.describe()}\n--- new backend:\n${tail(newStopped.stderr, 20)}`);
    expect(rc?.[1]).toBe("0");
    expect(m?.[1]).toBe("0");
    expect(code).toBe(0);
    expect(newStopped.code).toBe(0);
    expect(newStopped.stderr).toContain("device state restored");
    // The stream reopened its file after the restore, and the held buffers went back to the ring
    // (rewound at GET_VRING_BASE) rather than being completed unplayed.
    for (const b of [oldStopped, newStopped]) {
      expect(b.stderr).not.toContain("cannot reopen the host side");
      expect(b.stderr).not.toContain("cannot be rewound");
    }

    // The final WAV: right sizes in the header, the played PCM, at most one period of silence at
    // the snapshot point and at the end.
    const final = readWavInfo(out);
    expect(final).toMatchObject({ format: P.FMT_S16, channels: 2, rateHz: 48000, sizeWasStale: false, dataOffset: WAV_HEADER_BYTES });
    const file = readFileSync(out);
    expect(file.length).toBe(final.dataOffset + final.dataBytes + (final.dataBytes & 1));
    expect(file.readUInt32LE(4)).toBe(file.length - 8);
    expect(file.readUInt32LE(40)).toBe(final.dataBytes);
    const data = file.subarray(final.dataOffset, final.dataOffset + final.dataBytes);
    expect(Buffer.from(data.subarray(0, savedBytes)).equals(Buffer.from(play.subarray(0, savedBytes)))).toBe(true);
    // Silence inserted where the new backend took over (zeros that are not the played PCM's own).
    let gap = 0;
    while (gap < data.length - savedBytes && data[savedBytes + gap] === 0 && play[savedBytes + gap] !== 0) gap++;
    gap -= gap % 4;
    const rest = data.subarray(savedBytes + gap);
    const remaining = play.subarray(savedBytes);
    const restMatches = Buffer.from(rest.subarray(0, remaining.length)).equals(Buffer.from(remaining));
    if (!restMatches) {
      let i = 0;
      while (i < Math.min(rest.length, remaining.length) && rest[i] === remaining[i]) i++;
      console.error(`[snd-migration] after the snapshot point (+${gap} silence) the output diverges at byte ${savedBytes + gap + i} (${i} bytes matched)`);
    }
    expect(restMatches).toBe(true);
    const trailing = rest.subarray(remaining.length);
    expect(trailing.every((b) => b === 0)).toBe(true);
    const periodFrames = /E2E-PERIOD-FRAMES=(\d+)/.exec(src.serial());
    expect(periodFrames).not.toBeNull();
    const period = Number(periodFrames![1]) * 4;
    expect(period).toBeGreaterThan(0);
    console.log(
      `[snd-migration] saved after ${savedBytes} of ${play.length} PCM bytes (${(savedBytes / BYTES_PER_SECOND).toFixed(2)} s); ` +
        `silence: ${gap} bytes at the snapshot point, ${trailing.length} at the end (period ${period} bytes); WAV ${final.dataBytes} data bytes; ` +
        `state file ${(statSync(stateFile).size / 1024).toFixed(0)} KiB`,
    );
    expect(gap).toBeLessThanOrEqual(period);
    expect(trailing.length).toBeLessThanOrEqual(period);
  }, 180_000);
});
