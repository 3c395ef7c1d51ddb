// Crash-safe reconnect: QEMU's vhost-user-blk-pci with `reconnect-ms` on its chardev survives our
// block backend being SIGKILLed in the middle of a guest's fio verify run, as long as the next
// backend process replays what the dead one had in flight (inflight tracking, src/inflight.ts).
//
// The image is on a real disk (not tmpfs) and the backend runs `--aio io_uring --direct`, so
// requests complete out of order and a kill leaves a scattered set of heads in flight. The host kills
// the backend 5 times while fio runs, each time starting a new one on the same socket path within a
// second; QEMU reconnects, sends SET_INFLIGHT_FD with the region the first backend allocated, and the
// new backend resubmits the heads still marked in flight.
//
// How many heads each kill left in flight is read from the inflight region itself: QEMU keeps the
// memfd (`/memfd:vhost-inflight`) open, so the host reads it through /proc/<qemu>/fd after the kill
// and before the restart (there is no backend log message for resubmissions). The host also uses it
// to aim: it kills only at an instant when the region shows requests in flight (SIGSTOP, look,
// SIGKILL), so every one of the 5 kills leaves requests for the next backend to resubmit.
//
// The same runs on a packed ring (packed=on, 3 kills): there the region has the packed layout, and
// QEMU gives every new backend the ring base of the first start (0x80008000: it cannot read a used
// index back from a packed ring), so the region alone says where the ring stands.
//
// The peer without inflight tracking is qemu-storage-daemon (its vhost-user-blk export does not offer
// INFLIGHT_SHMFD): the same kill leaves the guest's in-flight requests unanswered for good.
//
// Net: `-netdev vhost-user` reconnects too (QEMU takes the link down at the disconnect and up again
// once the new backend is set up); a host ping flood with a payload pattern across two kills checks
// that traffic resumes and no frame comes back altered.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail, waitForPath, type BootResult } from "./rig.ts";
import { backendCommand } from "./backend.ts";
import { inflightFdPath, killWithRequestsInFlight, readPackedRegion, readRegion, waitFor } from "./inflight_region.ts";
import { NetNamespace, netnsAvailable } from "../support/netns.ts";

const KILLS_DEFAULT = 5;
const KILLS = KILLS_DEFAULT;
/** Guest-side length of the fio loop; the kills are spread over its first part. */
const FIO_SECONDS = 40;

let dir: string;
const procs: Subprocess[] = [];

beforeAll(async () => {
  await ensureRig();
  // On the disk, not tmpfs: O_DIRECT and io_uring behave as on a real image.
  dir = mkdtempSync(join(existsSync("/var/tmp") ? "/var/tmp" : join(import.meta.dir, "../.."), "e2e-reconnect-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function image(name: string, mib: number): string {
  const p = join(dir, name);
  const fd = openSync(p, "w");
  ftruncateSync(fd, mib << 20);
  closeSync(fd);
  return p;
}

/** A host process whose stderr (and stdout) is collected as it arrives. */
interface Proc {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  log(): string;
  exited: Promise<number>;
}

function spawnLogged(argv: string[]): Proc {
  const proc = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  procs.push(proc);
  let text = "";
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const b of s) text += dec.decode(b, { stream: true });
  };
  const pumped = Promise.all([pump(proc.stdout), pump(proc.stderr)]);
  return { proc, log: () => text, exited: pumped.then(() => proc.exited) };
}

/** The QEMU process whose command line names `sock` (bootGuest does not expose its pid). */
function qemuPid(sock: string): number | null {
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const cmd = readFileSync(`/proc/${e}/cmdline`, "utf8");
      if (cmd.includes("qemu-system") && cmd.includes(`path=${sock},`)) return Number(e);
    } catch {}
  }
  return null;
}

/**
 * The guest: a loop of fio randwrite + crc32c verify rounds (different seeds, offsets and block
 * sizes) for `seconds`, a heartbeat with /sys/block/vda/inflight, then the kernel log checks.
 */
function fioLoop(seconds: number, packed = false): string {
  return `
set -e
${packed ? `# Bit 34 (VIRTIO_F_RING_PACKED) of the negotiated features: the driver really runs a packed ring.
test "$(cut -c35 /sys/block/vda/device/features)" = 1 || { echo E2E-NOT-PACKED; exit 9; }
echo E2E-PACKED` : ""}
dmesg > /tmp/dmesg.before
(while sleep 2; do echo "E2E-HEARTBEAT $(awk '{print $1 "r/" $2 "w"}' /sys/block/vda/inflight)"; done) &
hb=$!
# Reads beside the verified writes all along (another region), so completions interleave further.
fio --name=bg --filename=/dev/vda --rw=randread --bs=4k --offset=224M --size=32M --ioengine=libaio --direct=1 \\
    --iodepth=8 --time_based --runtime=${seconds} --output-format=terse >/tmp/bg.out 2>&1 &
bg=$!
echo E2E-FIO-START
end=$(( $(date +%s) + ${seconds} ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
  i=$((i + 1))
  off=$(( (i % 4) * 56 ))
  if [ $((i % 2)) = 0 ]; then bs="--bs=4k"; else bs="--bsrange=512-256k"; fi
  if ! fio --name=rc$i --filename=/dev/vda --rw=randwrite $bs --size=40M --offset=\${off}M \\
      --ioengine=libaio --direct=1 --iodepth=32 --randseed=$i \\
      --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out 2>&1; then
    cat /tmp/fio.out
    echo E2E-FIO-FAILED round=$i
    exit 7
  fi
  echo "E2E-FIO-ROUND=$i kib=$(cut -d";" -f47 /tmp/fio.out | head -1)w/$(cut -d";" -f6 /tmp/fio.out | head -1)r"
done
wait $bg || { cat /tmp/bg.out; echo E2E-BG-FIO-FAILED; exit 8; }
kill $hb
echo E2E-FIO-ROUNDS=$i bg-read-kib=$(cut -d';' -f6 /tmp/bg.out | head -1)
echo E2E-DMESG-BEGIN
dmesg | grep -i -E 'error|timeout|blk_update_request' || true
echo E2E-DMESG-END
dmesg > /tmp/dmesg.after
echo E2E-DMESG-NEW-BEGIN
diff /tmp/dmesg.before /tmp/dmesg.after | grep '^+[^+]' || true
echo E2E-DMESG-NEW-END
echo reconnect-ok
`;
}

function between(serial: string, begin: string, end: string): string[] {
  const a = serial.indexOf(`${begin}\n`);
  const b = serial.indexOf(end, a);
  if (a < 0 || b < 0) return ["<markers missing>"];
  return serial
    .slice(a + begin.length + 1, b)
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "");
}

interface KillRecord {
  atMs: number;
  /** Heads flagged in flight in the region right after the kill. */
  inflight: number;
  /** Of those, completions the dead backend had published (the used index ran ahead of the region's). */
  published: number;
  /** SET_VRING_BASE QEMU gave the new backend (the used index in guest memory). */
  base: number;
  listeningMs: number;
  /** From the kill to the new backend's "queue 0: started" (QEMU reconnected and restarted the ring). */
  ringMs: number;
}

describe("crash-safe reconnect (vhost-user-blk, reconnect-ms)", () => {
  test(`fio verify survives ${KILLS} SIGKILLs of the backend (io_uring, O_DIRECT, image on disk)`, async () => {
    await reconnectRun(image("reconnect.img", 256), ["--aio", "io_uring", "--direct"], "blk", true);
  }, 280_000);

  // The same on a packed ring (packed=on): the region has the packed layout, and QEMU gives each
  // new backend the ring base of the first start again (it cannot read a used index back from a
  // packed ring): the region alone says where the ring stands. Fewer kills, a shorter run.
  test("packed ring: fio verify survives 3 SIGKILLs of the backend (io_uring, O_DIRECT, image on disk)", async () => {
    await reconnectRun(image("reconnect-packed.img", 256), ["--aio", "io_uring", "--direct"], "blkp", true, { packed: true, kills: 3, fioSeconds: 30 });
  }, 240_000);

  // A qcow2 overlay (over a raw base): fio allocates clusters in it while the backend is killed; the
  // metadata each backend left must be whole for the next (table updates reach the file as they
  // happen), and qemu-img check finds it clean afterwards. Transfers through the page cache complete
  // at once, so kills find fewer requests in flight to resubmit than with O_DIRECT.
  test(`qcow2: fio verify survives ${KILLS} SIGKILLs of the backend serving a qcow2 overlay; qemu-img check clean`, async () => {
    const base = image("reconnect-base.img", 256);
    const img = join(dir, "reconnect.qcow2");
    const r = Bun.spawnSync(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img]);
    if (r.exitCode !== 0) throw new Error(`qemu-img create: ${r.stderr.toString()}`);
    await reconnectRun(img, ["--aio", "io_uring"], "qcow2", false);
    const chk = Bun.spawnSync(["qemu-img", "check", img]);
    if (chk.exitCode !== 0 && chk.exitCode !== 3) throw new Error(`qemu-img check: ${chk.exitCode} ${chk.stdout.toString()}${chk.stderr.toString()}`);
    expect(chk.stdout.toString()).not.toMatch(/ERROR|corrupt/i);
  }, 280_000);
});

/** Boots a guest running fioLoop on our backend and kills the backend KILLS times under it. With
 * `everyKillInFlight`, each kill must leave requests in flight for the next backend to resubmit. */
async function reconnectRun(img: string, extraArgs: string[], sockName: string, everyKillInFlight: boolean, opts: { packed?: boolean; kills?: number; fioSeconds?: number } = {}): Promise<void> {
  const packed = opts.packed ?? false;
  const KILLS = opts.kills ?? KILLS_DEFAULT;
  {
    const sock = join(dir, `${sockName}.sock`);
    const backendArgv = () => [
      ...backendCommand(), "device", "block", "--socket", sock, "--file", img, ...extraArgs,
      "--num-queues", "1", "--log-level", "debug",
    ];
    const backends: Proc[] = [spawnLogged(backendArgv())];
    await waitForPath(sock, 15_000);

    let serial = "";
    const kills: KillRecord[] = [];
    const t0 = Date.now();
    let killerError: unknown = null;
    const guest = bootGuest({
      command: fioLoop(opts.fioSeconds ?? FIO_SECONDS, packed),
      devices: [
        "-chardev", `socket,id=blk0,path=${sock},reconnect-ms=500`,
        "-device", `vhost-user-blk-pci,chardev=blk0,num-queues=1${packed ? ",packed=on" : ""}`,
      ],
      extraArgs: ["-smp", "2"],
      timeoutMs: 200_000,
      onSerial: (c) => {
        serial += c;
      },
    });
    // The killer runs beside the guest: 5 kills, each once the ring runs again and fio has had time.
    const killer = (async () => {
      await waitFor("E2E-FIO-START", () => serial.includes("E2E-FIO-START"), 120_000);
      await waitFor("the ring to start", () => backends[0]!.log().includes("queue 0: started"), 30_000);
      const pid = qemuPid(sock);
      if (pid === null) throw new Error("QEMU process not found");
      const regionPath = inflightFdPath(pid);
      if (regionPath === null) throw new Error("QEMU holds no /memfd:vhost-inflight: GET_INFLIGHT_FD never happened?");
      for (let k = 0; k < KILLS; k++) {
        await Bun.sleep(k === 0 ? 2_000 : 3_500);
        // Killed at an instant when the region shows requests in flight (see killWithRequestsInFlight).
        const victim = backends[backends.length - 1]!;
        const region = await killWithRequestsInFlight(victim.proc, victim.exited, regionPath, 6_000, packed ? readPackedRegion : readRegion);
        const killedAt = Date.now();
        // Our backend replaces a stale socket itself; removing it lets waitForPath see the new one.
        rmSync(sock, { force: true });
        const next = spawnLogged(backendArgv());
        backends.push(next);
        await waitForPath(sock, 15_000);
        const listeningMs = Date.now() - killedAt;
        await waitFor(`backend ${backends.length} to get its ring started`, () => /queue 0: started/.test(next.log()), 30_000);
        const ringMs = Date.now() - killedAt;
        // The queue (in its thread) logs where the region put the ring just after the handler's "started".
        if (packed) await waitFor(`backend ${backends.length} to recover the region`, () => /inflight region: used side/.test(next.log()), 10_000);
        // QEMU restarts the ring at the used index in guest memory; a region index behind it means
        // the dead backend's last batch was published but not yet cleared (those are not resubmitted).
        const base = Number(/queue 0: started \(size \d+, base (\d+)\)/.exec(next.log())?.[1] ?? -1);
        // A packed ring's base says nothing (QEMU's is stale): the new backend logs what it resubmits.
        const resubmitting = Number(/resubmitting (\d+) chain/.exec(next.log())?.[1] ?? 0);
        const published = packed ? region.heads.length - resubmitting : (base - region.usedIdx) & 0xffff;
        kills.push({ atMs: killedAt - t0, inflight: region.heads.length, published, base, listeningMs, ringMs });
        console.log(
          `kill ${k + 1} at ${((killedAt - t0) / 1000).toFixed(1)} s: ${region.heads.length} heads flagged in flight [${region.heads.join(",")}], ` +
            `region used_idx 0x${region.usedIdx.toString(16)}, new ring base 0x${base.toString(16)} (${published} of them published before the kill); ` +
            `new backend listening after ${listeningMs} ms, ring started after ${ringMs} ms` +
            (packed ? `; the new backend: ${/inflight region: used side.*/.exec(next.log())?.[0] ?? "(no region message)"}` : ""),
        );
      }
    })().catch((e) => {
      killerError = e;
    });

    let r: BootResult;
    try {
      r = await guest;
    } finally {
      await killer;
    }
    const last = backends[backends.length - 1]!;
    last.proc.kill("SIGTERM");
    const lastCode = await last.exited;

    const printLogs = () => {
      backends.forEach((b, i) => {
        const lines = b.log().split("\n").filter((l) => /INFLIGHT|VRING_BASE|started|stopped|error|warn/i.test(l));
        console.error(`--- backend ${i + 1} (${lines.length} lines of interest):\n${lines.slice(-30).join("\n")}`);
      });
      console.error(`guest serial:\n${tail(r.serial, 60)}\nqemu stderr:\n${tail(r.stderr, 20)}`);
    };
    const rounds = [...r.serial.matchAll(/^E2E-FIO-ROUND=(\d+) kib=(\S+)/gm)].map((m) => `${m[1]}:${m[2]}`);
    const dmesgErrors = between(r.serial, "E2E-DMESG-BEGIN", "E2E-DMESG-END");
    const dmesgNew = between(r.serial, "E2E-DMESG-NEW-BEGIN", "E2E-DMESG-NEW-END");
    console.log(`fio rounds (round:KiB written/read): ${rounds.join(" ")}`);
    console.log(`${/E2E-FIO-ROUNDS=.*/.exec(r.serial)?.[0] ?? "no E2E-FIO-ROUNDS line"}; guest in-flight every 2 s: ${[...r.serial.matchAll(/^E2E-HEARTBEAT (\S+)/gm)].map((m) => m[1]).join(" ")}`);
    console.log(`guest dmesg | grep -i -E 'error|timeout|blk_update_request': ${dmesgErrors.length === 0 ? "(empty)" : "\n" + dmesgErrors.join("\n")}`);
    console.log(`guest kernel messages during the run: ${dmesgNew.length === 0 ? "(none)" : "\n" + dmesgNew.join("\n")}`);
    const resubmitted = kills.map((k) => Math.max(0, k.inflight - k.published));
    console.log(`resubmitted heads per kill: ${resubmitted.join(", ")} (total ${resubmitted.reduce((a, n) => a + n, 0)}); guest took ${Math.round(r.durationMs)} ms`);
    for (const [i, b] of backends.entries()) {
      const setInflight = (b.log().match(/<- SET_INFLIGHT_FD/g) ?? []).length;
      const getInflight = (b.log().match(/<- GET_INFLIGHT_FD/g) ?? []).length;
      const started = b.log().match(/queue 0: started \(size \d+, base \d+\)/g) ?? [];
      console.log(`backend ${i + 1}: GET_INFLIGHT_FD×${getInflight} SET_INFLIGHT_FD×${setInflight} ${started.join("; ")}`);
    }
    if (r.exitStatus !== 0 || killerError !== null) printLogs();
    if (packed) expect(r.serial).toContain("E2E-PACKED");
    expect(killerError).toBeNull();
    expect(kills.length).toBe(KILLS);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("reconnect-ok");
    // No I/O error or timeout during the run; before it, the boot's "RAS: Correctable Errors collector
    // initialized" is the only line the pattern matches.
    expect(dmesgNew.filter((l) => /error|timeout|blk_update_request/i.test(l))).toEqual([]);
    expect(dmesgErrors.filter((l) => !/RAS: Correctable Errors collector initialized/.test(l))).toEqual([]);
    // The kills hit I/O in flight (else nothing was tested) and every new backend adopted the region.
    if (everyKillInFlight) expect(resubmitted.filter((n) => n > 0).length).toBe(KILLS);
    for (const b of backends.slice(1)) expect(b.log()).toContain("<- SET_INFLIGHT_FD");
    expect(lastCode).toBe(0);
  }
}

describe("crash-safe reconnect (vhost-user-blk, reconnect-ms), continued", () => {

  // The peer without inflight tracking: qemu-storage-daemon's vhost-user-blk export offers no
  // INFLIGHT_SHMFD, so after a crash QEMU restarts the ring at the used index in guest memory. That
  // is only right when requests complete in order (the ones in flight are then exactly those after
  // the used index). To make the daemon's completions out of order at any instant, as io_uring's are
  // in ours, its writes are throttled (500 IOPS; a throttle queues reads and writes apart) while a
  // second fio job reads unthrottled: reads complete past a dozen writes waiting in the daemon.
  // Bounded: the guest gets ~30 s after the kill and restart.
  test("without inflight tracking (qemu-storage-daemon) the same kill leaves the guest's I/O hanging", async () => {
    const rig = await ensureRig();
    const img = image("qsd.img", 64);
    const sock = join(dir, "qsd.sock");
    const qsdArgv = [
      rig.qemuStorageDaemon,
      "--object", "throttle-group,id=tg0,x-iops-write=500",
      "--blockdev", `driver=file,node-name=file0,filename=${img},cache.direct=on,aio=io_uring`,
      "--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=file0",
      "--export", `type=vhost-user-blk,id=exp0,node-name=thr0,addr.type=unix,addr.path=${sock},writable=on,num-queues=1`,
    ];
    const daemons: Proc[] = [spawnLogged(qsdArgv)];
    await waitForPath(sock, 15_000);
    let serial = "";
    let killedAt = 0;
    /** Writes in flight in the guest's last heartbeat after fio started (-1 before one came). */
    const writesInFlight = (): number => {
      const after = serial.slice(serial.indexOf("E2E-FIO-START"));
      const beats = [...after.matchAll(/E2E-HEARTBEAT \d+r\/(\d+)w/g)];
      return beats.length === 0 ? -1 : Number(beats[beats.length - 1]![1]);
    };
    const killer = (async () => {
      await waitFor("E2E-FIO-START", () => serial.includes("E2E-FIO-START"), 120_000);
      // Kill while the throttled writes queue up behind completed reads (a slow TCG guest on a
      // busy host may take a while to get there; killing before would prove nothing).
      await waitFor("writes in flight", () => writesInFlight() >= 4, 30_000).catch(() => {});
      killedAt = Date.now();
      daemons[0]!.proc.kill("SIGKILL");
      await daemons[0]!.exited;
      rmSync(sock, { force: true });
      daemons.push(spawnLogged(qsdArgv));
      await waitForPath(sock, 15_000);
    })();
    const t0 = Date.now();
    let outcome: string;
    let r: BootResult | null = null;
    try {
      r = await bootGuest({
        command: `
set -e
(while sleep 2; do echo "E2E-HEARTBEAT $(awk '{print $1 "r/" $2 "w"}' /sys/block/vda/inflight)"; done) &
echo E2E-FIO-START
fio --filename=/dev/vda --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --output-format=terse \\
    --name=w --rw=randwrite --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    --name=r --rw=randread --offset=32M --size=16M --time_based --runtime=10 >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 7; }
dmesg | grep -i -E 'error|timeout|blk_update_request' | grep -v 'RAS: Correctable' || true
echo qsd-ok
`,
        devices: [
          "-chardev", `socket,id=blk0,path=${sock},reconnect-ms=500`,
          "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1",
        ],
        extraArgs: ["-smp", "2"],
        // Boot (~5-8 s) + 3 s of fio before the kill + ~30 s after it; healthy, fio needs ~10 s.
        timeoutMs: 45_000,
        onSerial: (c) => {
          serial += c;
        },
      });
      outcome = `guest exited with status ${r.exitStatus} after ${Math.round(r.durationMs)} ms`;
    } catch (e) {
      outcome = `guest hung: ${(e as Error).message.split("\n")[0]} (${Math.round((Date.now() - killedAt) / 1000)} s after the kill)`;
    }
    await killer;
    for (const d of daemons) d.proc.kill("SIGKILL");
    const beats = serial.split("\n").filter((l) => l.startsWith("E2E-HEARTBEAT")).map((l) => l.slice("E2E-HEARTBEAT ".length).trim());
    console.log(`qemu-storage-daemon, one SIGKILL at ${((killedAt - t0) / 1000).toFixed(1)} s: ${outcome}`);
    console.log(`guest /sys/block/vda/inflight every 2 s: ${beats.join(" ")}`);
    // Without inflight tracking the guest must not come through cleanly (the value of ours).
    expect(r?.exitStatus === 0 && serial.includes("qsd-ok")).toBe(false);
  }, 120_000);
});

const HOST_IP = "10.98.0.1";
const GUEST_IP = "10.98.0.2";
const TAP = "vhr0";
const GO_PORT = 7777;

async function run(argv: string[], timeoutMs = 60_000): Promise<{ code: number | null; out: string; err: string }> {
  const p = Bun.spawn(argv, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  clearTimeout(timer);
  return { code, out, err };
}

/** iputils ping's summary and any report of a frame that came back altered or twice. */
function pingSummary(out: string): { sent: number; received: number; dups: number; wrong: string[] } {
  const m = /(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?/.exec(out);
  const wrong = out.split("\n").filter((l) => /wrong data|corrupt|checksum|bad/i.test(l));
  return { sent: Number(m?.[1] ?? -1), received: Number(m?.[2] ?? -1), dups: Number(m?.[3] ?? 0), wrong };
}

describe.skipIf(!netnsAvailable())("crash-safe reconnect (vhost-user net, reconnect-ms)", () => {
  test("a ping flood resumes after two SIGKILLs of the net backend, with no altered frame", async () => {
    const ns = NetNamespace.create();
    const nsArgv = (argv: string[]) => ["ip", "netns", "exec", ns.name, ...argv];
    const backends: Proc[] = [];
    try {
      ns.addTap(TAP, { vnetHdr: true, address: `${HOST_IP}/24` });
      const sock = join(dir, "net.sock");
      const start = async () => {
        rmSync(sock, { force: true });
        const b = spawnLogged(nsArgv([...backendCommand(), "device", "net", "--socket", sock, "--tap-name", TAP, "--log-level", "debug"]));
        backends.push(b);
        await waitForPath(sock, 15_000);
        return b;
      };
      await start();
      let serial = "";
      let hostErr: unknown = null;
      const notes: string[] = [];
      let flood = { sent: -1, received: -1, dups: 0, wrong: [] as string[] };
      let after = { sent: -1, received: -1, dups: 0, wrong: [] as string[] };
      let host: Promise<void> | null = null;
      const hostSide = async () => {
        try {
          // 1400-byte echo requests with a pattern; iputils checks each reply's payload against it.
          const floodP = run(nsArgv(["ping", "-f", "-s", "1400", "-p", "a55a0ff0", "-w", "14", GUEST_IP]), 30_000);
          for (const at of [4_000, 5_000]) {
            await Bun.sleep(at);
            const victim = backends[backends.length - 1]!;
            const t = Date.now();
            victim.proc.kill("SIGKILL");
            await victim.exited;
            const next = await start();
            await waitFor("the new net backend's rings", () => /queue 1: started/.test(next.log()), 30_000);
            notes.push(`kill ${backends.length - 1}: new backend's rings started after ${Date.now() - t} ms`);
          }
          const f = await floodP;
          flood = pingSummary(f.out + f.err);
          // Once the flood is over: traffic flows normally again (no loss at a sane rate).
          const a = await run(nsArgv(["ping", "-c", "40", "-i", "0.05", "-W", "2", "-s", "1400", "-p", "c33c", GUEST_IP]), 30_000);
          after = pingSummary(a.out + a.err);
        } catch (e) {
          hostErr = e;
        } finally {
          for (let i = 0; i < 20; i++) {
            if ((await run(nsArgv(["busybox", "nc", "-w", "2", GUEST_IP, String(GO_PORT)]), 10_000)).code === 0) break;
            await Bun.sleep(250);
          }
        }
      };
      const backendLogs = () => backends.forEach((b, i) => console.error(`--- backend ${i + 1}:\n${tail(b.log(), 15)}`));
      const r = await bootGuest({
        command: `
set -e
ip link set eth0 up
ip addr add ${GUEST_IP}/24 dev eth0
i=0; until ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 20 ] || { echo "E2E-NET: host unreachable"; exit 9; }; done
dmesg > /tmp/dmesg.before
echo E2E-NET-READY
busybox nc -l -p ${GO_PORT} </dev/null >/dev/null
ip -s link show eth0
dmesg > /tmp/dmesg.after
echo E2E-DMESG-NEW-BEGIN
diff /tmp/dmesg.before /tmp/dmesg.after | grep '^+[^+]' || true
echo E2E-DMESG-NEW-END
echo net-reconnect-ok
`,
        devices: [
          "-chardev", `socket,id=n0,path=${sock},reconnect-ms=500`,
          "-netdev", "vhost-user,id=net0,chardev=n0",
          "-device", "virtio-net-pci,netdev=net0,romfile=",
        ],
        timeoutMs: 120_000,
        onSerial: (c) => {
          serial += c;
          if (host === null && serial.includes("E2E-NET-READY\n")) host = hostSide();
        },
      }).catch((e) => {
        // A guest that never finishes (it waits for the host side's go): what the host side and
        // the backends saw is the diagnosis.
        console.error(`host side: ${hostErr === null ? "no error" : String(hostErr)}; ${notes.join("; ")}`);
        backendLogs();
        throw e;
      });
      if (host !== null) await host;
      const dmesgNew = between(r.serial, "E2E-DMESG-NEW-BEGIN", "E2E-DMESG-NEW-END");
      for (const n of notes) console.log(n);
      console.log(`flood across the kills: ${flood.sent} sent, ${flood.received} received, ${flood.dups} duplicates, ${flood.wrong.length} altered`);
      console.log(`ping after: ${after.sent} sent, ${after.received} received, ${after.dups} duplicates, ${after.wrong.length} altered`);
      console.log(`guest kernel messages during the run: ${dmesgNew.length === 0 ? "(none)" : "\n" + dmesgNew.join("\n")}`);
      if (r.exitStatus !== 0 || hostErr !== null) {
        console.error(`guest serial:\n${tail(r.serial, 40)}\nqemu stderr:\n${tail(r.stderr, 20)}`);
        backendLogs();
      }
      expect(hostErr).toBeNull();
      expect(r.exitStatus).toBe(0);
      expect(backends.length).toBe(3);
      expect(flood.wrong).toEqual([]);
      expect(after.wrong).toEqual([]);
      expect(flood.received).toBeGreaterThan(0);
      expect(after.received).toBe(after.sent);
      expect(dmesgNew.filter((l) => /error|timeout|timed out|watchdog/i.test(l))).toEqual([]);
    } finally {
      for (const b of backends) if (b.proc.exitCode === null && b.proc.signalCode === null) b.proc.kill("SIGKILL");
      await Promise.all(backends.map((b) => b.proc.exited));
      ns.destroy();
    }
  }, 150_000);
});
