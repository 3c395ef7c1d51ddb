// Live migration (normal mode, dirty-page logging) of a QEMU guest served by our backends: source
// QEMU + backend A, destination QEMU (-incoming unix:...) + backend B, a second process, on the same
// image. QMP drives the migration; the guest's command keeps running across it and reports on the
// destination's serial console.
//
// What makes a missing dirty log visible: data the backend DMAs into guest pages that QEMU already
// sent is lost on the destination unless the backend marks those pages. The guest reads a region of
// known content (written by the host into the image) into fresh page-cache pages after the first
// RAM pass, while fio with verify keeps I/O going; after the switchover it checksums the cached
// region (no disk reads: pgpgin is checked) and fio's last runs verify what was written and read
// across the switchover. The same scenario with VHOST_BACKEND_TEST_NO_DIRTY_LOG=1 must fail.
//
// Migration parameters while the guest reads: max-bandwidth 64 MiB/s and downtime-limit 1 ms, and the
// guest keeps rewriting 8 MiB of tmpfs until its reads are done, so QEMU cannot converge before and
// keeps doing dirty-sync iterations; then the limits are lifted and it completes.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ensureRig, SETUP_TIMEOUT_MS, tail, waitForPath } from "./rig.ts";
import { backendCommand, startBackend, type RunningBackend } from "./backend.ts";
import { NetNamespace, netnsAvailable } from "../support/netns.ts";
import { FIO_STOP, fioVerifyLoop, startMigration, startVm, summarize, waitMigration, writeGuestCommand, type MigrationInfo, type Vm } from "./migrate_rig.ts";

const MiB = 1 << 20;
/** Region of known content at the start of the disk, checked in chunks. */
const KNOWN_MIB = 64;
const CHUNK_MIB = 2;
/** fio's region: past the known one. */
const FIO_OFFSET_MIB = 128;
const IMAGE_MIB = 192;

/**
 * Debian's kernel zeroes every page it allocates (CONFIG_INIT_ON_ALLOC_DEFAULT_ON): the CPU's zeroing
 * of a fresh page-cache page, just before the backend's DMA into it, makes QEMU send the page again
 * anyway, which hides a backend that does not log. Off, the backend's write is the only one.
 */
const GUEST_CMDLINE = "init_on_alloc=0";

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch (e) {
      console.error(`cleanup: ${(e as Error).message}`);
    }
  }
});

beforeAll(async () => {
  await ensureRig();
}, SETUP_TIMEOUT_MS);

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "e2e-mig-"));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** An image with KNOWN_MIB of random data at offset 0; returns the md5 of each CHUNK_MIB chunk. */
function knownImage(path: string): string[] {
  const fd = openSync(path, "w");
  ftruncateSync(fd, IMAGE_MIB * MiB);
  const sums: string[] = [];
  for (let c = 0; c < KNOWN_MIB / CHUNK_MIB; c++) {
    const data = randomBytes(CHUNK_MIB * MiB);
    writeSync(fd, data, 0, data.length, c * CHUNK_MIB * MiB);
    sums.push(createHash("md5").update(data).digest("hex"));
  }
  closeSync(fd);
  return sums;
}

async function backend(name: string, dir: string, img: string, env?: Record<string, string>): Promise<RunningBackend> {
  const b = await startBackend("block", join(dir, `${name}.sock`), ["--file", img], { env });
  cleanups.push(() => {
    if (b.proc.exitCode === null) b.proc.kill("SIGKILL");
  });
  return b;
}

async function vm(o: Parameters<typeof startVm>[0]): Promise<Vm> {
  const v = await startVm(o);
  cleanups.push(() => v.kill());
  return v;
}

function blkDevices(sock: string): string[] {
  return ["-chardev", `socket,id=blk0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"];
}

const FIO_LOOP = fioVerifyLoop(FIO_OFFSET_MIB);

/**
 * The guest side. Exit status bits: 1 an md5 mismatch in the cached region, 2 fio reported an error,
 * 4 fio did not finish (I/O hung), 8 the check read from disk instead of the page cache.
 */
function blockGuestScript(sums: string[]): string {
  const chunks = KNOWN_MIB / CHUNK_MIB;
  return `
# Held open throughout: the last close of a block device drops its page cache (kill_bdev).
exec 3</dev/vda
echo 3 > /proc/sys/vm/drop_caches
${FIO_LOOP}# Rewrites 8 MiB of tmpfs over and over: more dirty RAM per iteration than the throttled
# migration can send, so it cannot converge before the reads below are done.
( while [ ! -e /tmp/stop-dirtying ]; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=8 conv=notrunc 2>/dev/null; done ) &
sleep 1
echo E2E-MIG-READY
read go                # the host: the first RAM pass is done
# Buffered reads: the backend DMAs the known region into fresh page-cache pages.
dd if=/dev/vda of=/dev/null bs=1M count=${KNOWN_MIB} 2>/dev/null
touch /tmp/stop-dirtying
echo E2E-READ-DONE
read go                # the host, on the destination: migration completed
echo "E2E-ON-DESTINATION"
rc=0
${FIO_STOP}# The cached region's checksums, from the page cache (pgpgin shows any disk read).
in0=$(awk '/^pgpgin /{print $2}' /proc/vmstat)
bad=0
n=0
for want in ${sums.join(" ")}; do
  got=$(dd if=/dev/vda bs=${CHUNK_MIB}M skip=$n count=1 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || { bad=$((bad+1)); [ $bad -gt 3 ] || echo "E2E-MD5-MISMATCH chunk=$n got=$got"; }
  n=$((n+1))
done
in1=$(awk '/^pgpgin /{print $2}' /proc/vmstat)
echo "E2E-MD5 chunks=${chunks} bad=$bad pgpgin-kib=$((in1-in0))"
[ $bad -eq 0 ] || rc=$((rc|1))
[ $((in1-in0)) -lt 4096 ] || rc=$((rc|8))
exit $rc
`;
}

const ms = (t: number) => `${(t / 1000).toFixed(1)} s`;

interface BlockRun {
  exitStatus: number | null;
  serial: string;
  info: MigrationInfo;
  md5: string | null;
}

/** Source + destination with backends A and B on one image; the guest reads during a throttled migration.
 * With `qcow2`, the backends serve a qcow2 overlay of the image: fio allocates clusters in it and goes
 * on writing after the switchover, so the source must hand its metadata over. */
async function blockMigration(label: string, env?: Record<string, string>, qcow2 = false): Promise<BlockRun> {
  const dir = tempDir();
  const base = join(dir, "disk.img");
  const sums = knownImage(base);
  const img = qcow2 ? join(dir, "disk.qcow2") : base;
  if (qcow2) {
    const r = Bun.spawnSync(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img]);
    if (r.exitCode !== 0) throw new Error(`qemu-img create: ${r.stderr.toString()}`);
  }
  const a = await backend("a", dir, img, env);
  const b = await backend("b", dir, img, env);
  const cmdFile = writeGuestCommand(dir, blockGuestScript(sums));
  const src = await vm({ name: "src", dir, cmdFile, devices: blkDevices(a.socket), kernelCmdline: GUEST_CMDLINE });
  const dst = await vm({ name: "dst", dir, cmdFile, devices: blkDevices(b.socket), incoming: true, kernelCmdline: GUEST_CMDLINE });
  const fail = (msg: string): never => {
    throw new Error(`${label}: ${msg}\n${src.describe()}\n${dst.describe()}`);
  };
  const t0 = performance.now();
  await src.waitSerial("E2E-MIG-READY", 120_000);
  const tReady = performance.now();
  await startMigration(src.qmp, dst.incomingUri!, { "max-bandwidth": 64 * MiB, "downtime-limit": 1 });
  let info = await waitMigration(src.qmp, (i) => (i.ram?.["dirty-sync-count"] ?? 0) >= 2, 120_000);
  if (info.status !== "active") fail(`migration ${info.status} before the guest's reads: ${JSON.stringify(info)}`);
  src.send("go\n");
  // The reads run during the migration. One that converges by itself meanwhile (likelier when the
  // backend does not log: nothing re-dirties the pages the reads fill) pauses the source mid-read,
  // and the destination finishes them; the source's serial then never shows READ-DONE.
  const readsDone = () => src.serial().includes("E2E-READ-DONE");
  info = await waitMigration(src.qmp, (i) => readsDone() || i.status === "completed", 60_000);
  let syncs = info.ram?.["dirty-sync-count"] ?? 0;
  let iterations = syncs;
  if (info.status !== "completed") {
    // One more dirty-bitmap sync with the reads in it (or, now that the guest stopped dirtying, the
    // migration converges by itself: the reads are done either way), then the limits are lifted.
    syncs = (await waitMigration(src.qmp, () => true, 5_000)).ram!["dirty-sync-count"];
    info = await waitMigration(src.qmp, (i) => i.ram!["dirty-sync-count"] > syncs, 60_000);
    // "device": converged by itself and saving device state (the VM stopped), on its way to completed.
    if (!["active", "device", "completed"].includes(info.status)) fail(`migration ${info.status}: ${JSON.stringify(info)}`);
    iterations = info.ram!["dirty-sync-count"];
    if (info.status === "active") await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": 1024 * MiB, "downtime-limit": 300 });
  }
  info = await waitMigration(src.qmp, (i) => i.status === "completed", 120_000);
  console.log(summarize(`${label} (dirty-sync-count ${syncs} after the reads, limits lifted at ${iterations})`, info) + `; QEMU start to guest ready ${ms(tReady - t0)}`);
  if (info.status !== "completed") fail(`migration ${info.status}: ${JSON.stringify(info)}`);
  // The source is paused (postmigrate); the guest goes on at the destination.
  dst.send("go\n");
  const done = await dst.finished(120_000);
  await src.qmp.execute("quit").catch(() => {});
  await src.finished(30_000);
  const stopA = await a.stop();
  const stopB = await b.stop();
  if (done.exitStatus !== 0 && env === undefined) {
    console.error(`${label}: guest exit ${done.exitStatus}\n${dst.describe()}\n--- backend A:\n${tail(stopA.stderr, 15)}\n--- backend B:\n${tail(stopB.stderr, 15)}`);
  }
  expect(stopA.code).toBe(0);
  expect(stopB.code).toBe(0);
  // Backend A logged while the migration ran (LOG_ALL on), and stopped for the switchover.
  expect(stopA.stderr).toContain("dirty logging on");
  const md5 = /E2E-MD5 .*/.exec(done.serial)?.[0] ?? null;
  const fio = done.serial.match(/^E2E-FIO-\w+.*$/gm)?.join(" ") ?? "no fio line";
  console.log(`${label}: guest exit ${done.exitStatus}; ${md5 ?? "no md5 line"}; ${fio}; ${done.serial.match(/^E2E-MD5-MISMATCH.*$/gm)?.join(" ") ?? ""}`);
  if (qcow2) {
    // Both backends wrote the image's metadata in turn: it must be consistent (no leak either).
    const chk = Bun.spawnSync(["qemu-img", "check", img]);
    if (chk.exitCode !== 0) fail(`qemu-img check ${chk.exitCode}: ${chk.stdout.toString()}${chk.stderr.toString()}`);
  }
  return { exitStatus: done.exitStatus, serial: done.serial, info, md5 };
}

describe("live migration with dirty-page logging", () => {
  test("block: fio verify and page-cache reads across a throttled migration between two backend processes", async () => {
    const r = await blockMigration("block, logging");
    expect(r.serial).toContain("E2E-ON-DESTINATION");
    expect(r.serial).toMatch(/E2E-FIO-OK runs=\d+/);
    expect(r.md5).toMatch(/bad=0 /);
    expect(r.exitStatus).toBe(0);
  }, 240_000);

  test("block on a qcow2 overlay: the same; fio allocates clusters in the overlay and writes on across the switchover (metadata handed over); qemu-img check clean", async () => {
    const r = await blockMigration("block, qcow2 overlay", undefined, true);
    expect(r.serial).toContain("E2E-ON-DESTINATION");
    expect(r.serial).toMatch(/E2E-FIO-OK runs=\d+/);
    expect(r.md5).toMatch(/bad=0 /);
    expect(r.exitStatus).toBe(0);
  }, 240_000);

  test("block: the same scenario with a backend that does not log (VHOST_BACKEND_TEST_NO_DIRTY_LOG=1) fails", async () => {
    const r = await blockMigration("block, NOT logging", { VHOST_BACKEND_TEST_NO_DIRTY_LOG: "1" });
    // Stale pages on the destination: md5 mismatches, or fio errors, or I/O that never completes.
    expect(r.exitStatus).not.toBe(0);
  }, 240_000);
});

describe("live migration at QEMU's default parameters (numbers)", () => {
  test("block: an idle guest A→B, then the same guest under fio B→C (a destination backend becomes a source)", async () => {
    const dir = tempDir();
    const img = join(dir, "disk.img");
    knownImage(img);
    const cmdFile = writeGuestCommand(dir, `
exec 3</dev/vda
rc=0
echo E2E-MIG-READY
read go                # on B: the idle migration completed
${FIO_LOOP}sleep 2
echo E2E-LOAD-RUNNING
read go                # on C: the migration under load completed
echo E2E-ON-C
${FIO_STOP}exit $rc
`);
    const [ba, bb, bc] = [await backend("a", dir, img), await backend("b", dir, img), await backend("c", dir, img)];
    const a = await vm({ name: "a", dir, cmdFile, devices: blkDevices(ba.socket) });
    const b = await vm({ name: "b", dir, cmdFile, devices: blkDevices(bb.socket), incoming: true });
    await a.waitSerial("E2E-MIG-READY", 120_000);
    await Bun.sleep(500);
    await startMigration(a.qmp, b.incomingUri!);
    const idle = await waitMigration(a.qmp, (i) => i.status === "completed", 120_000);
    console.log(summarize("block, idle guest, default parameters", idle));
    expect(idle.status).toBe("completed");
    await a.qmp.execute("quit").catch(() => {});
    await a.finished(30_000);
    b.send("go\n");
    await b.waitSerial("E2E-LOAD-RUNNING", 60_000);
    const c = await vm({ name: "c", dir, cmdFile, devices: blkDevices(bc.socket), incoming: true });
    await startMigration(b.qmp, c.incomingUri!);
    const loaded = await waitMigration(b.qmp, (i) => i.status === "completed", 120_000);
    console.log(summarize("block, guest under fio, default parameters", loaded));
    expect(loaded.status).toBe("completed");
    c.send("go\n");
    const done = await c.finished(120_000);
    await b.qmp.execute("quit").catch(() => {});
    await b.finished(30_000);
    const stopped = await Promise.all([ba.stop(), bb.stop(), bc.stop()]);
    if (done.exitStatus !== 0) console.error(`guest exit ${done.exitStatus}\n${c.describe()}\n${stopped.map((s) => tail(s.stderr, 10)).join("\n---\n")}`);
    expect(done.serial).toContain("E2E-ON-C");
    expect(done.serial).toMatch(/E2E-FIO-OK runs=\d+/);
    expect(done.exitStatus).toBe(0);
    expect(stopped.map((s) => s.code)).toEqual([0, 0, 0]);
    // B served the guest after the first migration and logged during the second.
    expect(stopped[1]!.stderr).toContain("dirty logging on");
  }, 240_000);
});

// ---------------------------------------------------------------------------------------------
// Net: each QEMU has its own backend process, both attached to one multi_queue tap in a namespace
// (a single-queue tap takes one fd: the destination's backend could not attach while the source's
// runs). The guest pings the host every 10 ms across the migration. With guest_announce=off QEMU
// asks the destination's backend to announce the guest (SEND_RARP; with GUEST_ANNOUNCE the guest
// sends gratuitous ARPs itself and QEMU skips SEND_RARP: net/vhost-user.c vhost_user_migration_done).

const HOST_IP = "10.98.0.1";
const GUEST_IP = "10.98.0.2";
const GUEST_MAC = "52:54:00:4d:19:02";
const TAP = "vhumig0";

interface NetBackend {
  socket: string;
  log(): string;
  stop(): Promise<{ code: number | null; log: string }>;
}

async function netBackend(ns: NetNamespace, dir: string, name: string): Promise<NetBackend> {
  const socket = join(dir, `${name}.sock`);
  const proc = Bun.spawn(["ip", "netns", "exec", ns.name, ...backendCommand(), "device", "net", "--socket", socket, "--tap-name", TAP], {
    stdin: "ignore",
    stdout: "ignore",
    stderr: "pipe",
  });
  let logged = "";
  const logDone = (async () => {
    const dec = new TextDecoder();
    for await (const c of proc.stderr) logged += dec.decode(c, { stream: true });
    return logged;
  })();
  cleanups.push(async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    await proc.exited;
  });
  try {
    await waitForPath(socket, 15_000);
  } catch {
    proc.kill("SIGKILL");
    throw new Error(`net backend ${name} did not create ${socket}: ${await logDone}`);
  }
  return {
    socket,
    log: () => logged,
    async stop() {
      proc.kill("SIGTERM");
      const code = await proc.exited;
      return { code, log: await logDone };
    },
  };
}

function netDevices(sock: string): string[] {
  return [
    "-chardev", `socket,id=n0,path=${sock}`,
    "-netdev", "vhost-user,id=net0,chardev=n0,queues=1",
    "-device", `virtio-net-pci,netdev=net0,romfile=,mac=${GUEST_MAC},guest_announce=off`,
  ];
}

describe.skipIf(!netnsAvailable())("live migration: net", () => {
  test("net: a guest→host ping every 10 ms survives the migration to a second backend on the same multi_queue tap; SEND_RARP reaches the tap", async () => {
    const dir = tempDir();
    const ns = NetNamespace.create();
    cleanups.push(() => ns.destroy());
    ns.addTap(TAP, { vnetHdr: true, multiQueue: true, address: `${HOST_IP}/24` });
    // Registered after the namespace, so they end (closing their tap fds) before it goes.
    const ba = await netBackend(ns, dir, "a");
    const bb = await netBackend(ns, dir, "b");
    const cmdFile = writeGuestCommand(dir, `
ip link set eth0 up
ip addr add ${GUEST_IP}/24 dev eth0
i=0; until ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 20 ] || { echo "E2E-NET: host unreachable"; exit 9; }; done
ping -q -i 0.01 ${HOST_IP} >/tmp/ping.out 2>&1 &
pid=$!
sleep 2
echo E2E-MIG-READY
read go                # on the destination
echo E2E-ON-DESTINATION
sleep 2
kill -INT $pid; wait $pid
sed -n 's/^\\([0-9]* packets transmitted.*\\)/E2E-PING \\1/p' /tmp/ping.out
ping -c 3 -i 0.2 -W 2 ${HOST_IP} >/dev/null || { echo "E2E-NET: no replies after the migration"; exit 5; }
echo E2E-NET-OK
`);
    const src = await vm({ name: "src", dir, cmdFile, devices: netDevices(ba.socket), smp: 1 });
    const dst = await vm({ name: "dst", dir, cmdFile, devices: netDevices(bb.socket), smp: 1, incoming: true });
    await src.waitSerial("E2E-MIG-READY", 120_000);
    // RARP frames (ethertype 0x8035) on the tap, from the destination's backend.
    const dump = Bun.spawn(["ip", "netns", "exec", ns.name, "tcpdump", "-i", TAP, "-l", "-n", "-e", "-c", "1", "ether", "proto", "0x8035"], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    cleanups.push(() => {
      if (dump.exitCode === null) dump.kill("SIGKILL");
    });
    const dumpOut = new Response(dump.stdout).text();
    let dumpErr = "";
    void (async () => {
      const dec = new TextDecoder();
      for await (const c of dump.stderr) dumpErr += dec.decode(c, { stream: true });
    })();
    for (let i = 0; i < 200 && !dumpErr.includes("listening"); i++) await Bun.sleep(50);
    await startMigration(src.qmp, dst.incomingUri!);
    const info = await waitMigration(src.qmp, (i) => i.status === "completed", 120_000);
    console.log(summarize("net, guest pinging the host every 10 ms, default parameters", info));
    expect(info.status).toBe("completed");
    await src.qmp.execute("quit").catch(() => {});
    await src.finished(30_000);
    dst.send("go\n");
    const done = await dst.finished(120_000);
    const killer = setTimeout(() => dump.kill("SIGKILL"), 10_000);
    await dump.exited;
    clearTimeout(killer);
    const rarp = await dumpOut;
    const [sa, sb] = [await ba.stop(), await bb.stop()];
    const ping = /E2E-PING (\d+) packets transmitted, (\d+) received.*/.exec(done.serial);
    console.log(`net: ${ping?.[0] ?? "no ping summary"}; tcpdump: ${rarp.trim() || "(no RARP)"}`);
    if (done.exitStatus !== 0) console.error(`${dst.describe()}\n--- backend A:\n${tail(sa.log, 10)}\n--- backend B:\n${tail(sb.log, 10)}`);
    expect(done.exitStatus).toBe(0);
    expect(done.serial).toContain("E2E-NET-OK");
    expect(ping).not.toBeNull();
    const [sent, got] = [Number(ping![1]), Number(ping![2])];
    // A few pings are lost in the downtime and while the tap's flow steering moves to B's queue.
    expect(got).toBeGreaterThan(sent * 0.9);
    expect(rarp.toLowerCase()).toContain(GUEST_MAC);
    expect(sb.log).toContain(`announced ${GUEST_MAC}`);
    expect(sa.log).toContain("dirty logging on");
    expect([sa.code, sb.code]).toEqual([0, 0]);
  }, 240_000);
});

