/**
 * Smoke test of the e2e rig itself, against vhost-user backends that are not ours: if this fails, the
 * problem is the rig (setup.sh, kernel, initramfs, QEMU), not the backend under development.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail, waitForPath, type Rig } from "./rig.ts";

let rig: Rig & { qemuConsole: string };
let dir: string;
const daemons: Subprocess[] = [];

beforeAll(async () => {
  rig = await ensureRig({ consoleQemu: true });
  dir = mkdtempSync(join(tmpdir(), "e2e-rig-test-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const d of daemons) d.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("e2e rig", () => {
  test("guest writes and reads back /dev/vda through qemu-storage-daemon's vhost-user-blk", async () => {
    const img = join(dir, "disk.img");
    const sock = join(dir, "blk.sock");
    writeFileSync(img, Buffer.alloc(16 << 20)); // 16 MiB of zeros
    const qsd = Bun.spawn(
      [
        rig.qemuStorageDaemon,
        "--blockdev", `driver=file,node-name=f,filename=${img}`,
        "--export", `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock},writable=on`,
      ],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    daemons.push(qsd);
    await waitForPath(sock);

    // 1 MiB pattern at offset 1 MiB; drop the guest page cache so the read really goes to the backend.
    const line = "e2e-pattern-0123456789abcdef\n";
    const r = await bootGuest({
      command: `
set -e
test -b /dev/vda
yes '${line.trimEnd()}' | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip=256 count=256 2>/dev/null
md5sum /tmp/pat /tmp/back
cmp /tmp/pat /tmp/back
echo readback-ok
`,
      devices: ["-chardev", `socket,id=c,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=c"],
    });
    console.log(
      `[rig] boot-to-command ${r.bootToCommandMs?.toFixed(0)} ms, QEMU start-to-exit ${r.durationMs.toFixed(0)} ms`,
    );
    const why = `exit ${r.exitStatus}, qemu ${r.qemuExitCode}\nstderr:\n${r.stderr}\nserial:\n${tail(r.serial, 30)}`;
    expect(r.exitStatus, why).toBe(0);
    expect(r.serial).toContain("readback-ok");
    expect(r.bootToCommandMs).not.toBeNull();

    qsd.kill("SIGTERM");
    await qsd.exited;
    const want = Buffer.from(line.repeat(Math.ceil((1 << 20) / line.length))).subarray(0, 1 << 20);
    const disk = readFileSync(img);
    expect(disk.subarray(1 << 20, 2 << 20).equals(want)).toBe(true);
    expect(disk.subarray(0, 1 << 20).every((b) => b === 0)).toBe(true);
  }, 120_000);

  test("patched QEMU lets users create vhost-user-device-pci; stock QEMU does not", async () => {
    const list = async (qemu: string) => {
      const p = Bun.spawn([qemu, "-device", "help"], { stdout: "pipe", stderr: "pipe" });
      const out = await new Response(p.stdout).text();
      await p.exited;
      return out;
    };
    // `-device help` lists only user-creatable devices.
    expect(await list(rig.qemuConsole)).toContain('name "vhost-user-device-pci"');
    expect(await list(rig.qemu)).not.toContain('name "vhost-user-device-pci"');

    // Creating it: stock QEMU rejects the driver outright; the patched one gets as far as realize
    // (which fails here only because there is no backend on the other end).
    const create = async (qemu: string) => {
      const p = Bun.spawn(
        [
          qemu, "-L", "/usr/share/qemu", "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu",
          "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none", "-S",
          "-chardev", "null,id=c",
          "-device", "vhost-user-device-pci,chardev=c,virtio-id=3,num_vqs=2,config_size=0",
        ],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
      );
      const timer = setTimeout(() => p.kill("SIGKILL"), 10_000);
      const err = await new Response(p.stderr).text();
      await p.exited;
      clearTimeout(timer);
      return err;
    };
    expect(await create(rig.qemu)).toContain("pluggable device type");
    const patched = await create(rig.qemuConsole);
    expect(patched).not.toContain("pluggable device type");
    expect(patched).toContain("vhost_backend_init failed");
  }, 60_000);
});
