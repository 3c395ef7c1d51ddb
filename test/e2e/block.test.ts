// Our block backend serving a real Linux guest in QEMU (vhost-user-blk-pci).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, statSync, readFileSync, openSync, writeSync, closeSync, ftruncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";

let dir: string;
const running: RunningBackend[] = [];

beforeAll(async () => {
  await ensureRig(); // installs QEMU, the guest kernel and initramfs on first use
  dir = mkdtempSync(join(tmpdir(), "e2e-block-"));
}, SETUP_TIMEOUT_MS);

afterAll(async () => {
  for (const b of running) b.proc.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function image(name: string, mib: number): string {
  const p = join(dir, name);
  const fd = openSync(p, "w");
  ftruncateSync(fd, mib << 20);
  closeSync(fd);
  return p;
}

/** Boots a guest with one of our block devices and runs `command`; asserts a clean backend exit. */
async function withDisk(name: string, args: string[], command: string, qemuDeviceOpts = "", timeoutMs = 240_000, memoryMiB?: number) {
  const sock = join(dir, `${name}.sock`);
  const backend = await startBackend("block", sock, args);
  running.push(backend);
  const r = await bootGuest({
    command,
    devices: ["-chardev", `socket,id=blk0,path=${sock}`, "-device", `vhost-user-blk-pci,chardev=blk0${qemuDeviceOpts}`],
    extraArgs: ["-smp", "2"],
    timeoutMs,
    memoryMiB,
  });
  const stopped = await backend.stop();
  if (r.exitStatus !== 0) {
    console.error(`guest serial:\n${tail(r.serial, 40)}\nqemu stderr:\n${tail(r.stderr, 20)}\nbackend:\n${tail(stopped.stderr, 20)}`);
  }
  expect(stopped.code).toBe(0);
  return r;
}

describe("block device in a QEMU guest", () => {
  test("fio random writes verify with crc32c", async () => {
    const img = image("fio.img", 128);
    const r = await withDisk("fio", ["--file", img], `
set -e
test "$(cat /sys/block/vda/size)" = "262144"
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=48M --ioengine=libaio --direct=1 \\
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out
fio --name=mixed --filename=/dev/vda --rw=randrw --bsrange=512-64k --size=16M --offset=64M --ioengine=libaio --direct=1 \\
    --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >>/tmp/fio.out
echo fio-ok
`);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("fio-ok");
  }, 300_000);

  test("-m 6G (q35 puts a region of exactly 4 GiB at 4 GiB): fio verify through rings and buffers anywhere in it", async () => {
    const img = image("fio6g.img", 128);
    const r = await withDisk("fio6g", ["--file", img], `
set -e
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio --direct=1 \\
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out
fio --name=big --filename=/dev/vda --rw=write --bs=1M --size=32M --offset=64M --ioengine=libaio --direct=1 \\
    --iodepth=4 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >>/tmp/fio.out
echo fio-ok
`, "", 240_000, 6144);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("fio-ok");
  }, 300_000);

  test("packed ring (packed=on): fio verify and ext2 through VIRTIO_F_RING_PACKED", async () => {
    const img = image("packed.img", 128);
    const r = await withDisk("packed", ["--file", img], `
set -e
# Bit 34 (VIRTIO_F_RING_PACKED) of the negotiated features: the driver really runs a packed ring.
test "$(cut -c35 /sys/block/vda/device/features)" = 1
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio --direct=1 \\
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out
fio --name=mixed --filename=/dev/vda --rw=randrw --bsrange=512-128k --size=16M --offset=64M --ioengine=libaio --direct=1 \\
    --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >>/tmp/fio.out
mke2fs -q -F /dev/vda
mkdir -p /mnt && mount -t ext2 /dev/vda /mnt
head -c 3000000 /dev/urandom >/mnt/f && sync && md5sum /mnt/f >/tmp/sum
umount /mnt && echo 3 >/proc/sys/vm/drop_caches && mount -t ext2 /dev/vda /mnt && md5sum -c /tmp/sum
echo packed-ok
`, ",packed=on", 240_000);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("packed-ok");
  }, 300_000);

  test("ext2 filesystem: mkfs, files, remount, checksums", async () => {
    const img = image("fs.img", 64);
    const r = await withDisk("fs", ["--file", img], `
set -e
mke2fs -q -F -t ext2 /dev/vda
mkdir -p /mnt
mount -t ext2 /dev/vda /mnt
for i in 1 2 3 4 5; do head -c $((i * 300000)) /dev/urandom > /mnt/file$i; done
mkdir /mnt/dir && echo hello > /mnt/dir/greeting
(cd /mnt && md5sum file* dir/greeting) > /tmp/sums
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 /dev/vda /mnt
(cd /mnt && md5sum -c /tmp/sums)
umount /mnt
echo fs-ok
`);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("fs-ok");
    // The filesystem is on the host image too: ext2 magic at offset 1024+56.
    const sb = readFileSync(img).subarray(1024 + 56, 1024 + 58);
    expect(sb[0]).toBe(0x53);
    expect(sb[1]).toBe(0xef);
  }, 300_000);

  test("blkdiscard frees space in the image and reads back zeros", async () => {
    const img = image("discard.img", 64);
    const r = await withDisk("discard", ["--file", img], `
set -e
test "$(cat /sys/block/vda/queue/discard_max_bytes)" != "0"
dd if=/dev/urandom of=/dev/vda bs=1M count=32 oflag=direct 2>/dev/null
sync
blkdiscard -o 0 -l 16777216 /dev/vda
echo 3 > /proc/sys/vm/drop_caches
test "$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)" = "0"
test "$(dd if=/dev/vda bs=1M skip=16 count=16 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c)" != "0"
echo discard-ok
`);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("discard-ok");
    // 32 MiB were written, 16 MiB punched out: about 16 MiB stay allocated.
    const allocated = statSync(img).blocks * 512;
    expect(allocated).toBeLessThan(20 << 20);
    expect(allocated).toBeGreaterThanOrEqual(16 << 20);
  }, 300_000);

  test("a read-only disk refuses writes", async () => {
    const img = image("ro.img", 16);
    const fd = openSync(img, "r+");
    writeSync(fd, Buffer.from("read-only-marker"), 0, 16, 0);
    closeSync(fd);
    const r = await withDisk("ro", ["--file", img, "--read-only"], `
test "$(cat /sys/block/vda/ro)" = "1" || exit 3
head -c 16 /dev/vda | grep -q read-only-marker || exit 4
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then exit 5; fi
echo ro-ok
`);
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("ro-ok");
    expect(readFileSync(img).subarray(0, 16).toString()).toBe("read-only-marker");
  }, 300_000);

  test("two queues with two fio jobs", async () => {
    const img = image("mq.img", 128);
    const r = await withDisk("mq", ["--file", img, "--num-queues", "2"], `
set -e
test "$(ls /sys/block/vda/mq | wc -l)" = "2"
fio --name=mq --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --numjobs=2 --offset_increment=48M \\
    --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    --cpus_allowed_policy=split --cpus_allowed=0-1 --group_reporting --output-format=terse >/tmp/fio.out
echo mq-ok
`, ",num-queues=2");
    expect(r.exitStatus).toBe(0);
    expect(r.serial).toContain("mq-ok");
  }, 300_000);

  test("one backend serves consecutive VMs: data from the first boot is there in the second", async () => {
    const img = image("reuse.img", 32);
    const sock = join(dir, "reuse.sock");
    const backend = await startBackend("block", sock, ["--file", img]);
    running.push(backend);
    const boot = (command: string) =>
      bootGuest({ command, devices: ["-chardev", `socket,id=blk0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=blk0"], timeoutMs: 240_000 });
    const first = await boot(`
set -e
printf 'written-by-vm-1' | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null
echo first-ok
`);
    expect(first.exitStatus).toBe(0);
    const second = await boot(`
set -e
dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | grep -q written-by-vm-1
echo second-ok
`);
    expect(second.exitStatus).toBe(0);
    expect(second.serial).toContain("second-ok");
    const stopped = await backend.stop();
    expect(stopped.code).toBe(0);
    expect(stopped.stderr).toContain("session 2");
  }, 300_000);

  test("a VM killed in the middle of I/O leaves the backend serving the next one", async () => {
    const img = image("killed.img", 64);
    const sock = join(dir, "killed.sock");
    const backend = await startBackend("block", sock, ["--file", img]);
    running.push(backend);
    const devices = ["-chardev", `socket,id=blk0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=blk0"];
    // fio runs far longer than the boot is allowed: the rig kills QEMU while I/O is in flight.
    await expect(bootGuest({
      command: "fio --name=busy --filename=/dev/vda --rw=randrw --bs=4k --size=32M --ioengine=libaio --direct=1 --iodepth=32 --time_based --runtime=600",
      devices,
      timeoutMs: 15_000,
    })).rejects.toThrow();
    const next = await bootGuest({ command: "dd if=/dev/vda of=/dev/null bs=1M count=8 2>/dev/null && echo next-ok", devices, timeoutMs: 240_000 });
    expect(next.exitStatus).toBe(0);
    expect(next.serial).toContain("next-ok");
    expect((await backend.stop()).code).toBe(0);
  }, 300_000);
});
