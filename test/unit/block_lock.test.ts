// Image locking (devices/block/disk/lock.ts): QEMU's OFD byte-range locks, so that two of ours, or
// ours and qemu-io / qemu-img / qemu-storage-daemon, never write one image at once; --read-only
// shares with readers; --no-lock takes none. Two of ours hand an image over as a migration needs:
// the second waits while the first serves, and serves once the first's device stopped.
import { describe, test, expect, afterEach } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { spawn, spawnSync, type Subprocess } from "bun";
import { makeImage, tempDir, disposeDisks, Disk, SECTOR } from "../support/block_disk.ts";
import { acquireBlockDisk } from "../../devices/block/acquire.ts";
import { parseBlockOptions } from "../../devices/block/options.ts";
import { RawDisk } from "../../devices/block/disk/raw.ts";
import type { BlockDiskResource } from "../../devices/block/disk/open.ts";
import { VIRTIO_BLK_T } from "../../devices/block/config.ts";

const opened: RawDisk[] = [];
const daemons: Subprocess[] = [];
afterEach(async () => {
  for (const d of opened.splice(0)) d.close();
  for (const p of daemons.splice(0)) {
    p.kill();
    await p.exited;
  }
  await disposeDisks();
});

/** What the device thread holds: the acquired resource and its owning disk. */
function acquire(path: string, extra: Record<string, unknown> = {}): RawDisk {
  const resource: BlockDiskResource = acquireBlockDisk(parseBlockOptions({ file: path, ...extra }));
  if (resource.kind !== "raw") throw new Error(`${path} was opened as ${resource.kind}`);
  const disk = new RawDisk(resource, true);
  opened.push(disk);
  return disk;
}

/** qemu-io on the image: exit status and output. */
function qemuIo(path: string, command: string, readOnly = false): { ok: boolean; out: string } {
  const r = spawnSync(["qemu-io", "-f", "raw", ...(readOnly ? ["-r"] : []), "-c", command, path]);
  const out = r.stdout.toString() + r.stderr.toString();
  return { ok: r.exitCode === 0 && !/Failed|error/i.test(out), out };
}

const IN_USE = /is in use by another process \(write lock held\)/;

describe("block image lock: against QEMU's tools", () => {
  test("qemu-io cannot write (nor read consistently) an image we hold read-write, in use or not", () => {
    const path = makeImage(1 << 20);
    const disk = acquire(path);
    let w = qemuIo(path, "write 0 512");
    expect(w.ok).toBe(false);
    expect(w.out).toMatch(/Failed to get "write" lock/);
    expect(qemuIo(path, "read 0 512", true).ok).toBe(true); // a reader that lets others write (qemu-io -r) may
    disk.activate(); // serving
    w = qemuIo(path, "write 0 512");
    expect(w.ok).toBe(false);
    disk.suspend(); // the device stopped: still ours
    expect(qemuIo(path, "write 0 512").ok).toBe(false);
    disk.close();
    expect(qemuIo(path, "write 0 512").ok).toBe(true); // gone with the fd
  });

  test("--read-only shares the image with readers, not with a writer; --no-lock takes nothing", () => {
    const path = makeImage(1 << 20);
    const ro = acquire(path, { "read-only": true });
    ro.activate();
    expect(qemuIo(path, "read 0 512", true).ok).toBe(true);
    expect(qemuIo(path, "write 0 512").ok).toBe(false);
    const ro2 = acquire(path, { "read-only": true }); // two readers
    ro2.activate();
    ro.close();
    ro2.close();
    const unlocked = acquire(path, { lock: false });
    unlocked.activate();
    expect(qemuIo(path, "write 0 512").ok).toBe(true);
  });

  test("we refuse an image that qemu-storage-daemon serves read-write, and say so", async () => {
    const path = makeImage(1 << 20);
    const sock = join(tempDir(), "qsd.sock");
    const qsd = spawn([
      "qemu-storage-daemon",
      "--blockdev", `driver=file,node-name=f,filename=${path}`,
      "--export", `type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=${sock},writable=on`,
    ], { stdout: "ignore", stderr: "pipe" });
    daemons.push(qsd);
    const deadline = Date.now() + 10_000;
    while (!existsSync(sock)) {
      if (Date.now() > deadline || qsd.exitCode !== null) throw new Error(`qemu-storage-daemon did not start: ${await new Response(qsd.stderr).text()}`);
      await Bun.sleep(20);
    }
    expect(() => acquire(path)).toThrow(IN_USE);
    expect(() => acquire(path, { "read-only": true })).toThrow(IN_USE);
    expect(acquire(path, { lock: false }).size).toBe(1 << 20); // --no-lock: the user knows better
    qsd.kill();
    await qsd.exited;
    acquire(path).activate(); // free again
  });
});

describe("block image lock: two of ours", () => {
  test("never both serving: the second waits, serves only once the first's device stopped, and then the first cannot resume", () => {
    const path = makeImage(1 << 20);
    const a = acquire(path);
    a.activate();
    const b = acquire(path); // starts (a migration destination starts while the source serves)...
    expect(() => b.activate()).toThrow(IN_USE); // ...but does not serve while the first does
    expect(qemuIo(path, "write 0 512").ok).toBe(false);
    a.suspend(); // the source's device stopped (end of migration)
    b.activate(); // the destination takes over
    expect(() => a.activate()).toThrow(IN_USE); // the source cannot serve again behind its back
    expect(qemuIo(path, "write 0 512").ok).toBe(false);
    b.suspend();
    a.activate(); // the image can go back the same way (a failed migration)
    a.close();
    b.close();
    expect(qemuIo(path, "write 0 512").ok).toBe(true);
  });

  test("a second backend on a served image: its rings do not start, the first keeps serving", async () => {
    const path = makeImage(1 << 20);
    const first = await Disk.start({ file: path });
    const data = new Uint8Array(4096).fill(7);
    await first.write(0, data);
    const second = await Disk.start({ file: path }); // the rings it is given stay stopped
    second.add(second.q(), { type: VIRTIO_BLK_T.IN, sector: 0, inLen: 4096 }, true);
    await Bun.sleep(200);
    expect(second.q().usedIdx()).toBe(0); // nothing served
    expect(await first.read(0, 4096 / SECTOR)).toEqual(data);
  });
});
