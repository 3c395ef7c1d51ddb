// Our block backend serving an NBD export (qemu-nbd on a unix socket) to a real Linux guest in QEMU:
// fio verify and ext2, and the same while the NBD server is killed and restarted under the guest's
// I/O (the backend reconnects and resends; the guest sees no error).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";
import { NbdServer, disposeNbdServers } from "../support/nbd_server.ts";

const running: RunningBackend[] = [];

beforeAll(async () => {
  await ensureRig();
}, SETUP_TIMEOUT_MS);

afterAll(async () => {
  for (const b of running) b.proc.kill("SIGKILL");
  await disposeNbdServers();
});

/** Boots a guest whose disk is `server`'s export and runs `command`; `meanwhile` runs during the boot. */
async function withNbdDisk(server: NbdServer, command: string, meanwhile?: (done: () => boolean) => Promise<void>) {
  const sock = join(server.dir, "blk.sock");
  const backend = await startBackend("block", sock, ["--file", server.uri, "--num-queues", "2"]);
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
echo nbd-ok
`;

describe("block device on an NBD export in a QEMU guest", () => {
  test("fio verify and ext2", async () => {
    const server = new NbdServer({ size: 128 << 20 });
    await server.start();
    const { r } = await withNbdDisk(server, FIO_AND_EXT2);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("nbd-ok");
  }, 360_000);

  test("the same while the NBD server is killed and restarted every few seconds", async () => {
    const server = new NbdServer({ size: 128 << 20 });
    await server.start();
    let outages = 0;
    const { r, backendLog } = await withNbdDisk(server, FIO_AND_EXT2, async (done) => {
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
    expect(r.serial).toContain("nbd-ok");
    expect(outages).toBeGreaterThan(0);
    // The guest saw no I/O error.
    expect(r.serial).not.toMatch(/I\/O error|blk_update_request|Buffer I\/O/);
    // The backend saw the outages and came back from them.
    expect(backendLog).toContain("lost the connection");
    expect(backendLog).toContain("connected again");
  }, 360_000);
});
