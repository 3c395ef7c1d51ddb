// Device state moved between two backend processes, as a VMM does across a restart or migration:
// save from one process (SET_DEVICE_STATE_FD), restore into a freshly started one, continue.
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GuestRam, Vmm, DriverQueue } from "../support/frontend.ts";
import { startBackend, type RunningBackend } from "./backend.ts";

let dir: string;
const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

function setup() {
  dir = mkdtempSync(join(tmpdir(), "vhu-snap-"));
  cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
  const ram = new GuestRam(4 << 20);
  cleanup.push(() => ram.dispose());
  return ram;
}

async function backend(device: string, name: string, args: string[]): Promise<RunningBackend> {
  const b = await startBackend(device, join(dir, `${name}.sock`), args);
  cleanup.push(() => b.proc.kill("SIGKILL"));
  return b;
}

describe("snapshot across processes", () => {
  test("console: pending input and output position survive into a new process", async () => {
    const ram = setup();
    const input = join(dir, "input");
    writeFileSync(input, "typed before the snapshot\n");
    const a = await backend("console", "a", ["--input-file", input, "--output-file", join(dir, "out-a")]);
    const vmmA = new Vmm({ socketPath: a.socket }, ram);
    vmmA.activate(2, 16);
    // Guest output through process A.
    const [, txA] = vmmA.queues as [DriverQueue, DriverQueue];
    const msg = ram.alloc(6);
    ram.bytes(msg, 6).set(Buffer.from("hello\n"));
    txA.addChain([{ gpa: msg, len: 6 }]);
    await txA.waitUsed(1);
    await Bun.sleep(50); // the input file is read while no receive buffer is posted: it stays pending
    vmmA.stopAll();
    const blob = await vmmA.saveState();
    vmmA.dispose();
    expect((await a.stop()).code).toBe(0);
    expect(readFileSync(join(dir, "out-a"), "utf8")).toBe("hello\n");

    const b = await backend("console", "b", ["--input-file", "/dev/null", "--output-file", join(dir, "out-b")]);
    const vmmB = new Vmm({ socketPath: b.socket }, ram);
    vmmB.handshake();
    vmmB.setMemTable();
    expect(await vmmB.loadState(blob)).toBe(0n);
    const rx = new DriverQueue(ram, 0, 16);
    const tx = new DriverQueue(ram, 1, 16);
    vmmB.queues = [rx, tx];
    vmmB.startQueue(rx);
    vmmB.startQueue(tx);
    const buf = ram.alloc(128);
    rx.addChain([{ gpa: buf, len: 128, write: true }]);
    const [u] = await rx.waitUsed(1);
    expect(Buffer.from(ram.bytes(buf, u!.len)).toString()).toBe("typed before the snapshot\n");
    const more = ram.alloc(6);
    ram.bytes(more, 6).set(Buffer.from("world\n"));
    tx.addChain([{ gpa: more, len: 6 }]);
    await tx.waitUsed(1);
    vmmB.dispose();
    expect((await b.stop()).code).toBe(0);
    expect(readFileSync(join(dir, "out-b"), "utf8")).toBe("world\n");
  }, 30_000);

  test("block: restore into a new process on the same image; a resized image is refused", async () => {
    const ram = setup();
    const img = join(dir, "disk.img");
    writeFileSync(img, new Uint8Array(1 << 20));
    const a = await backend("block", "a", ["--file", img, "--num-queues", "1"]);
    const vmmA = new Vmm({ socketPath: a.socket }, ram);
    vmmA.activate(1, 16);
    vmmA.stopAll();
    const blob = await vmmA.saveState();
    vmmA.dispose();
    expect((await a.stop()).code).toBe(0);

    const b = await backend("block", "b", ["--file", img, "--num-queues", "1"]);
    const vmmB = new Vmm({ socketPath: b.socket }, ram);
    vmmB.handshake();
    expect(await vmmB.loadState(blob)).toBe(0n);
    vmmB.dispose();
    expect((await b.stop()).code).toBe(0);

    writeFileSync(img, new Uint8Array(2 << 20)); // resized on the host
    const c = await backend("block", "c", ["--file", img, "--num-queues", "1"]);
    const vmmC = new Vmm({ socketPath: c.socket }, ram);
    vmmC.handshake();
    expect(await vmmC.loadState(blob)).not.toBe(0n);
    // Refused, and still usable.
    vmmC.setMemTable();
    vmmC.dispose();
    const stopped = await c.stop();
    expect(stopped.code).toBe(0);
    expect(stopped.stderr).toContain("restore refused");
  }, 30_000);
});
