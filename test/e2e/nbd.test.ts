// Our block backend serving an NBD export (qemu-nbd on a unix socket) to a real Linux guest in QEMU:
// fio verify and ext2, and the same while the NBD server is killed and restarted under the guest's
// I/O (the backend reconnects and resends; the guest sees no error). The same guest on a Ceph RBD
// image of a single-node cluster (test/support/ceph_cluster.ts).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { rmSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail, waitForPath } from "./rig.ts";
import { backendCommand, startBackend, type RunningBackend } from "./backend.ts";
import { FIO_STOP, fioVerifyLoop, startMigration, startVm, summarize, waitMigration, writeGuestCommand, type Vm } from "./migrate_rig.ts";
import { inflightFdPath, killWithRequestsInFlight, waitFor } from "./inflight_region.ts";
import { NbdServer, disposeNbdServers } from "../support/nbd_server.ts";
import { CephCluster, cephTestsUnavailable } from "../support/ceph_cluster.ts";
import { NetNamespace, netnsAvailable, sh } from "../support/netns.ts";

const running: RunningBackend[] = [];

beforeAll(async () => {
  await ensureRig();
}, SETUP_TIMEOUT_MS);

afterAll(async () => {
  for (const b of running) b.proc.kill("SIGKILL");
  await disposeNbdServers();
});

/** Boots a guest whose disk is `file` (an NBD URI, an rbd: spec), served by a backend with its socket
 * in `dir`, and runs `command`; `meanwhile` runs during the boot. */
async function withNetworkDisk(dir: string, file: string, command: string, meanwhile?: (done: () => boolean) => Promise<void>) {
  const sock = join(dir, "blk.sock");
  const backend = await startBackend("block", sock, ["--file", file, "--num-queues", "2"]);
  running.push(backend);
  let finished = false;
  const side = meanwhile?.(() => finished);
  const r = await bootGuest({
    command,
    devices: ["-chardev", `socket,id=blk0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"],
    extraArgs: ["-smp", "2"],
    timeoutMs: 300_000,
  });
  finished = true;
  await side;
  const stopped = await backend.stop();
  if (r.exitStatus !== 0) {
    console.error(`guest serial:\n${tail(r.serial, 40)}\nqemu stderr:\n${tail(r.stderr, 20)}\nbackend:\n${tail(stopped.stderr, 20)}`);
  }
  expect(stopped.code).toBe(0);
  return { r, backendLog: stopped.stderr };
}

const FIO_AND_EXT2 = `
set -e
test "$(cat /sys/block/vda/size)" = "262144"
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio --direct=1 \\
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out
fio --name=mixed --filename=/dev/vda --rw=randrw --bsrange=512-128k --size=16M --offset=64M --ioengine=libaio --direct=1 \\
    --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >>/tmp/fio.out
mke2fs -q -F -t ext2 /dev/vda
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
for i in 1 2 3; do head -c $((i * 500000)) /dev/urandom > /mnt/file$i; done
(cd /mnt && md5sum file*) > /tmp/sums
umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt
(cd /mnt && md5sum -c /tmp/sums)
umount /mnt
echo disk-ok
`;

describe("block device on an NBD export in a QEMU guest", () => {
  test("fio verify and ext2", async () => {
    const server = new NbdServer({ size: 128 << 20 });
    await server.start();
    const { r } = await withNetworkDisk(server.dir, server.uri, FIO_AND_EXT2);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("disk-ok");
  }, 360_000);

  test("the same while the NBD server is killed and restarted every few seconds", async () => {
    const server = new NbdServer({ size: 128 << 20 });
    await server.start();
    let outages = 0;
    const { r, backendLog } = await withNetworkDisk(server.dir, server.uri, FIO_AND_EXT2, async (done) => {
      while (!done()) {
        await Bun.sleep(4000);
        if (done()) break;
        await server.stop();
        outages++;
        await Bun.sleep(700);
        await server.start();
      }
    });
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("disk-ok");
    expect(outages).toBeGreaterThan(0);
    // The guest saw no I/O error.
    expect(r.serial).not.toMatch(/I\/O error|blk_update_request|Buffer I\/O/);
    // The backend saw the outages and came back from them.
    expect(backendLog).toContain("lost the connection");
    expect(backendLog).toContain("connected again");
  }, 360_000);
});

describe.skipIf(cephTestsUnavailable() !== null)("block device on a Ceph RBD image in a QEMU guest", () => {
  test("fio verify and ext2", async () => {
    const cluster = await CephCluster.start();
    try {
      cluster.createPool("rbd");
      cluster.createImage("rbd", "vm", 128 << 20);
      const { r, backendLog } = await withNetworkDisk(cluster.dir, `rbd:rbd/vm:conf=${cluster.conf}`, FIO_AND_EXT2);
      expect(r.exitStatus).toBe(0);
      expect(r.serial).toContain("disk-ok");
      expect(r.serial).not.toMatch(/I\/O error|blk_update_request|Buffer I\/O/);
      expect(backendLog).toContain("RBD rbd/vm");
    } finally {
      await cluster.stop();
    }
  }, 360_000);
});

// ---------------------------------------------------------------------------------------------
// Across hosts. Three network namespaces the test creates: "storage" runs qemu-nbd on 10.99.0.1,
// behind a bridge; hosts A (10.99.0.2) and B (10.99.0.3) each reach it over a veth pair into that
// bridge. A's QEMU and backend run in A, B's in B, and both backends serve the same export over
// TCP (nbd://10.99.0.1:10809/disk): nothing is shared between A and B but the NBD server and the
// network. One guest runs fio with verify throughout: its backend on A is SIGKILLed with requests
// in flight and restarted (QEMU's reconnect-ms; the new backend resubmits them from the inflight
// region to the NBD server), the guest migrates A→B (the migration stream over TCP across the
// bridge, A's backend logging dirty pages), then B's backend is killed and restarted the same way,
// and the guest finishes on B: every fio verify passed, no I/O error in its kernel log.

const STORAGE_IP = "10.99.0.1";
const HOST_IPS = { a: "10.99.0.2", b: "10.99.0.3" } as const;
const NBD_PORT = 10809;
const MIGRATION_PORT = 4444;

interface HostBackend {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  exited: Promise<number>;
  log(): string;
}

/** Our block backend inside `ns` on `socket`, logging at debug level (ring starts, inflight messages). */
async function hostBackend(ns: NetNamespace, socket: string, uri: string): Promise<HostBackend> {
  rmSync(socket, { force: true });
  const proc = Bun.spawn(["ip", "netns", "exec", ns.name, ...backendCommand(), "device", "block", "--socket", socket, "--file", uri, "--num-queues", "1", "--log-level", "debug"], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  hostProcs.push(proc);
  let text = "";
  const pump = async (s: ReadableStream<Uint8Array>) => {
    const dec = new TextDecoder();
    for await (const b of s) text += dec.decode(b, { stream: true });
  };
  const pumped = Promise.all([pump(proc.stdout), pump(proc.stderr)]);
  const b = { proc, log: () => text, exited: pumped.then(() => proc.exited) };
  try {
    await waitForPath(socket, 15_000);
  } catch {
    proc.kill("SIGKILL");
    throw new Error(`backend in ${ns.name} did not create ${socket}:\n${tail(text, 20)}`);
  }
  return b;
}

const hostProcs: Subprocess[] = [];
const namespaces: NetNamespace[] = [];
const vms: Vm[] = [];

afterAll(() => {
  for (const v of vms) v.kill();
  for (const p of hostProcs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  for (const ns of namespaces.splice(0)) ns.destroy();
});

/** storage ⇄ bridge ⇄ hosts A and B, each over its own veth pair. */
function hostsNetwork(): { storage: NetNamespace; a: NetNamespace; b: NetNamespace } {
  const storage = NetNamespace.create();
  namespaces.push(storage);
  const a = NetNamespace.create();
  namespaces.push(a);
  const b = NetNamespace.create();
  namespaces.push(b);
  storage.exec(["ip", "link", "add", "br0", "type", "bridge"]);
  storage.exec(["ip", "addr", "add", `${STORAGE_IP}/24`, "dev", "br0"]);
  storage.exec(["ip", "link", "set", "br0", "up"]);
  for (const [name, ns] of [["a", a], ["b", b]] as const) {
    sh(["ip", "link", "add", `eth-${name}`, "netns", ns.name, "type", "veth", "peer", "name", `port-${name}`, "netns", storage.name]);
    storage.exec(["ip", "link", "set", `port-${name}`, "master", "br0", "up"]);
    ns.exec(["ip", "addr", "add", `${HOST_IPS[name]}/24`, "dev", `eth-${name}`]);
    ns.exec(["ip", "link", "set", `eth-${name}`, "up"]);
  }
  return { storage, a, b };
}

const HOSTS_GUEST = `
dmesg > /tmp/dmesg.before
${fioVerifyLoop(16)}sleep 1
echo E2E-DISK-READY
read go                # the host, on B: both kills and the migration are behind
echo E2E-ON-DESTINATION
rc=0
${FIO_STOP}dmesg > /tmp/dmesg.after
if diff /tmp/dmesg.before /tmp/dmesg.after | grep '^+[^+]' | grep -i -E 'error|timeout|timed out|blk_update_request'; then rc=$((rc|16)); fi
exit $rc
`;

/** The storage both hosts' backends serve: `file` (an NBD URI, an rbd: spec), sockets and logs in `dir`. */
interface SharedDisk {
  label: string;
  dir: string;
  file: string;
}

/** The across-hosts run (see above) on `disk`, reached from A and B over `net`. */
async function acrossHosts(net: ReturnType<typeof hostsNetwork>, disk: SharedDisk): Promise<void> {
  const dir = disk.dir;
  const uri = disk.file;
  const sockA = join(dir, "a.sock");
  const sockB = join(dir, "b.sock");
  const backends: { a: HostBackend[]; b: HostBackend[] } = { a: [await hostBackend(net.a, sockA, uri)], b: [await hostBackend(net.b, sockB, uri)] };
  const cmdFile = writeGuestCommand(dir, HOSTS_GUEST);
  const devices = (sock: string) => ["-chardev", `socket,id=blk0,path=${sock},reconnect-ms=500`, "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"];
  const src = await startVm({ name: "a", dir, cmdFile, devices: devices(sockA), launcher: ["ip", "netns", "exec", net.a.name], timeoutMs: 280_000 });
  const dst = await startVm({
    name: "b", dir, cmdFile, devices: devices(sockB), launcher: ["ip", "netns", "exec", net.b.name],
    incoming: `tcp:${HOST_IPS.b}:${MIGRATION_PORT}`, timeoutMs: 280_000,
  });
  vms.push(src, dst);
  const notes: string[] = [];
  const fail = (msg: string): never => {
    const logs = (["a", "b"] as const).flatMap((h) => backends[h].map((b, i) => `--- backend ${h}${i + 1}:\n${tail(b.log().split("\n").filter((l) => !/ <- | -> /.test(l)).join("\n"), 12)}`));
    throw new Error(`${msg}\n${notes.join("\n")}\n${src.describe()}\n${dst.describe()}\n${logs.join("\n")}`);
  };
  /** Kills host `h`'s backend with requests in flight, starts the next one, waits for its ring. */
  const crash = async (h: "a" | "b", vm: Vm) => {
    const list = backends[h];
    const victim = list[list.length - 1]!;
    await waitFor(`${h}'s ring to run`, () => victim.log().includes("queue 0: started"), 60_000).catch((e) => fail((e as Error).message));
    await Bun.sleep(2_000); // fio has requests on the shared storage all along
    const regionPath = inflightFdPath(vm.proc.pid) ?? fail(`QEMU on ${h} holds no inflight region`);
    const region = await killWithRequestsInFlight(victim.proc, victim.exited, regionPath);
    const killedAt = Date.now();
    const next = await hostBackend(h === "a" ? net.a : net.b, h === "a" ? sockA : sockB, uri);
    list.push(next);
    await waitFor(`the new backend on ${h} to get its ring started`, () => /queue 0: started/.test(next.log()), 30_000).catch((e) => fail((e as Error).message));
    const base = Number(/queue 0: started \(size \d+, base (\d+)\)/.exec(next.log())?.[1] ?? -1);
    const resubmitted = region.heads.length - ((base - region.usedIdx) & 0xffff);
    notes.push(`kill on ${h}: ${region.heads.length} heads in flight, ${resubmitted} resubmitted by the next backend (ring restarted at ${base}) ${Date.now() - killedAt} ms after the kill`);
    return { inFlight: region.heads.length, next };
  };

  await src.waitSerial("E2E-DISK-READY", 120_000);
  const killA = await crash("a", src);
  await Bun.sleep(2_000);
  await startMigration(src.qmp, dst.incomingUri!);
  // Through fail(): a migration that does not finish leaves the backends' logs in the report.
  const info = await waitMigration(src.qmp, (i) => i.status === "completed", 120_000).catch((e) => fail((e as Error).message));
  notes.push(summarize(`${disk.label} A→B over TCP, guest under fio`, info));
  if (info.status !== "completed") fail(`migration ${info.status}`);
  await src.qmp.execute("quit").catch(() => {});
  await src.finished(30_000);
  const killB = await crash("b", dst);
  await Bun.sleep(2_000);
  dst.send("go\n");
  const done = await dst.finished(120_000);
  const lastA = backends.a[backends.a.length - 1]!;
  const lastB = backends.b[backends.b.length - 1]!;
  lastA.proc.kill("SIGTERM");
  lastB.proc.kill("SIGTERM");
  const codes = [await lastA.exited, await lastB.exited];
  const fio = done.serial.match(/^E2E-FIO-\w+.*$/gm)?.join(" ") ?? "no fio line";
  notes.push(`guest exit ${done.exitStatus}; ${fio}`);
  console.log(notes.join("\n"));
  if (done.exitStatus !== 0) fail(`guest exit ${done.exitStatus}`);
  expect(done.serial).toContain("E2E-ON-DESTINATION");
  expect(done.serial).toMatch(/E2E-FIO-OK runs=\d+/);
  expect(done.exitStatus).toBe(0);
  // Each kill found requests in flight, and the next backend adopted the region QEMU kept.
  expect(killA.inFlight).toBeGreaterThan(0);
  expect(killB.inFlight).toBeGreaterThan(0);
  expect(killA.next.log()).toContain("<- SET_INFLIGHT_FD");
  expect(killB.next.log()).toContain("<- SET_INFLIGHT_FD");
  // A's second backend logged dirty pages for the migration; both last backends stop cleanly.
  expect(lastA.log()).toContain("dirty logging on");
  expect(codes).toEqual([0, 0]);
}

describe.skipIf(!netnsAvailable())("block device on an NBD export across hosts (network namespaces)", () => {
  test("fio verify runs through a backend crash on host A, live migration A→B over TCP, and a backend crash on host B", async () => {
    const net = hostsNetwork();
    const server = new NbdServer({ size: 64 << 20, tcpPort: NBD_PORT, tcpHost: STORAGE_IP, netns: net.storage });
    await server.start();
    await acrossHosts(net, { label: "NBD", dir: server.dir, file: server.uri });
  }, 300_000);
});

// The same on an RBD image: the single-node cluster runs in the storage namespace on 10.99.0.1;
// each backend's librbd takes the image's exclusive lock when it writes (from a killed backend,
// once the OSD notices it is gone: the rig's watch timeout of 5 s).
describe.skipIf(!netnsAvailable() || cephTestsUnavailable() !== null)("block device on a Ceph RBD image across hosts (network namespaces)", () => {
  test("fio verify runs through a backend crash on host A, live migration A→B over TCP, and a backend crash on host B", async () => {
    const net = hostsNetwork();
    const cluster = await CephCluster.start({ address: STORAGE_IP, netns: net.storage });
    try {
      cluster.createPool("rbd");
      cluster.createImage("rbd", "disk", 64 << 20);
      await acrossHosts(net, { label: "RBD", dir: cluster.dir, file: `rbd:rbd/disk:conf=${cluster.conf}` });
    } finally {
      await cluster.stop();
    }
  }, 300_000);
});
