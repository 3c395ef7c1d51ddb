// Our block backend serving a qcow2 overlay of an ext4 base image to a real Linux guest in QEMU:
// the base's files read through the overlay, new files and fio's verify written into it, the
// base file unchanged, `qemu-img check` clean, and a second boot finds everything the first wrote.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync, mkdirSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { spawnSync } from "node:child_process";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";

let dir: string;
const running: RunningBackend[] = [];

beforeAll(async () => {
  await ensureRig();
  dir = mkdtempSync(join(tmpdir(), "e2e-qcow2-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const b of running) b.proc.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

const sha = (p: string) => createHash("sha256").update(readFileSync(p)).digest("hex");

async function boot(name: string, args: string[], command: string) {
  const sock = join(dir, `${name}.sock`);
  const backend = await startBackend("block", sock, args);
  running.push(backend);
  const r = await bootGuest({
    command,
    devices: ["-chardev", `socket,id=blk0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"],
    extraArgs: ["-smp", "2"],
    timeoutMs: 280_000,
  });
  const stopped = await backend.stop();
  if (r.exitStatus !== 0) {
    console.error(`guest serial:\n${tail(r.serial, 40)}\nqemu stderr:\n${tail(r.stderr, 20)}\nbackend:\n${tail(stopped.stderr, 20)}`);
  }
  expect(stopped.code).toBe(0);
  return { ...r, backendLog: stopped.stderr };
}

test("a guest on a qcow2 overlay of an ext4 base: base files read back, fio verify and new files written, base unchanged, check clean, a second boot sees it all", async () => {
  // The base: ext4 with files, made on the host.
  const src = join(dir, "src");
  mkdirSync(src);
  for (let i = 1; i <= 4; i++) {
    const b = new Uint8Array(i * 700_000);
    for (let o = 0; o < b.length; o += 65536) crypto.getRandomValues(b.subarray(o, o + 65536));
    writeFileSync(join(src, `base${i}`), b);
  }
  const sums = run("sh", ["-c", `cd ${src} && md5sum base*`]);
  const base = join(dir, "base.raw");
  run("mke2fs", ["-q", "-F", "-t", "ext4", "-d", src, base, "160M"]);
  const overlay = join(dir, "overlay.qcow2");
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw", "-F", "raw", overlay]);
  const baseHash = sha(base);

  const first = await boot("first", ["--file", overlay, "--num-queues", "2"], `
set -e
test "$(cat /sys/block/vda/size)" = "$((160 * 2048))"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt
cat > /tmp/base.sums <<'EOF'
${sums.trim()}
EOF
(cd /mnt && md5sum -c /tmp/base.sums)
fio --name=verify --filename=/mnt/fio.dat --size=40M --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \\
    --iodepth=16 --numjobs=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >/tmp/fio.out
for i in 1 2 3; do head -c $((i * 500000)) /dev/urandom > /mnt/new$i; done
rm /mnt/base2
(cd /mnt && md5sum new* base1 base3 base4) > /mnt/sums
sync
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
(cd /mnt && md5sum -c sums)
umount /mnt
echo first-ok
`);
  expect(first.exitStatus).toBe(0);
  expect(first.serial).toContain("first-ok");
  expect(first.backendLog).toContain("qcow2");
  expect(sha(base)).toBe(baseHash);
  const chk = JSON.parse(spawnSync("qemu-img", ["check", "--output=json", overlay], { encoding: "utf8" }).stdout) as Record<string, number>;
  expect(chk.corruptions ?? 0).toBe(0);
  expect(chk.leaks ?? 0).toBe(0);

  const second = await boot("second", ["--file", overlay, "--format", "qcow2"], `
set -e
mkdir -p /mnt
mount -t ext4 -o ro /dev/vda /mnt
(cd /mnt && md5sum -c sums)
test ! -e /mnt/base2
umount /mnt
echo second-ok
`);
  expect(second.exitStatus).toBe(0);
  expect(second.serial).toContain("second-ok");
  expect(sha(base)).toBe(baseHash);
}, 600_000);
