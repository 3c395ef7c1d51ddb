// Every device counts what it did into the process's metrics (the test process's buffer, handed to
// the device's threads): the counters equal the I/O the test drove, and the exposition they make
// is what the Prometheus parser reads.
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BackendUnderTest, GuestRam, Vmm, type BufferSpec } from "../support/frontend.ts";
import { Disk, disposeDisks, makeImage, SECTOR } from "../support/block_disk.ts";
import { SndDriver } from "../support/snd_driver.ts";
import { metrics } from "../../src/metrics.ts";
import { parseExposition, sampleValue } from "../support/metrics_parse.ts";
import { VIRTIO_BLK_T, VIRTIO_BLK_S } from "../../devices/block/config.ts";
import * as P from "../../devices/snd/protocol.ts";

const cleanups: (() => unknown)[] = [];
afterEach(async () => {
  disposeDisks();
  while (cleanups.length > 0) await cleanups.pop()!();
});

/** The value now minus the value when `before` was taken (other tests in this process count too). */
function delta(before: Map<string, number>, name: string, labels: Record<string, string | number> = {}): number {
  const key = `${name}${JSON.stringify(labels)}`;
  return (metrics().read(name, labels) ?? 0) - (before.get(key) ?? 0);
}
function snapshot(series: [string, Record<string, string | number>][]): Map<string, number> {
  return new Map(series.map(([n, l]) => [`${n}${JSON.stringify(l)}`, metrics().read(n, l) ?? 0]));
}

describe("device metrics", () => {
  test("block: requests by type, bytes, errors, in flight back to 0, latency histogram", async () => {
    const q0 = { queue: 0 };
    const watched: [string, Record<string, string | number>][] = [
      ["vhost_block_requests", { queue: 0, type: "read" }], ["vhost_block_requests", { queue: 0, type: "write" }],
      ["vhost_block_requests", { queue: 0, type: "flush" }], ["vhost_block_requests", { queue: 0, type: "get_id" }],
      ["vhost_block_read_bytes", q0], ["vhost_block_written_bytes", q0], ["vhost_block_errors", { queue: 0, status: "ioerr" }],
      ["vhost_block_request_seconds", q0], ["vhost_sessions", {}],
    ];
    metrics().timeLatencies(); // as the metrics endpoint does (queues set up from now on time requests)
    const d = await Disk.start({ file: makeImage() });
    const before = snapshot(watched);
    for (let i = 0; i < 5; i++) await d.write(i * 8, new Uint8Array(8 * SECTOR).fill(i + 1));
    for (let i = 0; i < 3; i++) await d.read(i * 8, 8);
    expect((await d.one({ type: VIRTIO_BLK_T.FLUSH })).status).toBe(VIRTIO_BLK_S.OK);
    expect((await d.one({ type: VIRTIO_BLK_T.GET_ID, inLen: 20 })).status).toBe(VIRTIO_BLK_S.OK);
    // A read past the end of the disk: an error.
    expect((await d.one({ type: 0, sector: 1n << 40n, inLen: SECTOR })).status).toBe(VIRTIO_BLK_S.IOERR);
    expect(delta(before, "vhost_block_requests", { queue: 0, type: "write" })).toBe(5);
    expect(delta(before, "vhost_block_requests", { queue: 0, type: "read" })).toBe(4);
    expect(delta(before, "vhost_block_requests", { queue: 0, type: "flush" })).toBe(1);
    expect(delta(before, "vhost_block_requests", { queue: 0, type: "get_id" })).toBe(1);
    expect(delta(before, "vhost_block_written_bytes", q0)).toBe(5 * 8 * SECTOR);
    expect(delta(before, "vhost_block_read_bytes", q0)).toBe(3 * 8 * SECTOR);
    expect(delta(before, "vhost_block_errors", { queue: 0, status: "ioerr" })).toBe(1);
    expect(delta(before, "vhost_block_request_seconds", q0)).toBe(11); // one observation per request
    expect(metrics().read("vhost_block_in_flight", q0)).toBe(0);
    const p = parseExposition(metrics().render(true), "openmetrics");
    expect(sampleValue(p, "vhost_block_request_seconds_count", { queue: "0" })).toBe(metrics().read("vhost_block_request_seconds", q0));
    expect(sampleValue(p, "vhost_block_in_flight", { queue: "0" })).toBe(0);
  });

  test("console: bytes each way per port", async () => {
    const dir = mkdtempSync(join(tmpdir(), "ops-con-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const input = join(dir, "in.bin");
    writeFileSync(input, new Uint8Array(5000).fill(7));
    const watched: [string, Record<string, string | number>][] = [
      ["vhost_console_bytes", { port: 0, direction: "in" }], ["vhost_console_bytes", { port: 0, direction: "out" }],
    ];
    const before = snapshot(watched);
    const backend = new BackendUnderTest("console", { "output-file": join(dir, "out"), "input-file": input });
    cleanups.push(() => backend.stop());
    await backend.ready;
    const ram = new GuestRam(16 << 20);
    cleanups.push(() => ram.dispose());
    const vmm = new Vmm(backend, ram);
    cleanups.push(() => vmm.dispose());
    vmm.activate(2);
    const [rx, tx] = [vmm.queues[0]!, vmm.queues[1]!];
    const out = new TextEncoder().encode("x".repeat(3000));
    const gpa = ram.alloc(out.length);
    ram.bytes(gpa, out.length).set(out);
    tx.addChain([{ gpa, len: out.length }] as BufferSpec[]);
    await tx.waitUsed(1);
    let got = 0;
    for (let i = 0; i < 4; i++) rx.addChain([{ gpa: ram.alloc(2048), len: 2048, write: true }]);
    const end = Date.now() + 5000;
    while (got < 5000 && Date.now() < end) {
      for (const u of rx.takeUsed()) got += u.len;
      await Bun.sleep(5);
    }
    expect(got).toBe(5000);
    expect(delta(before, "vhost_console_bytes", { port: 0, direction: "out" })).toBe(3000);
    expect(delta(before, "vhost_console_bytes", { port: 0, direction: "in" })).toBe(5000);
  });

  test("snd: periods played per stream", async () => {
    const before = snapshot([["vhost_snd_periods", { stream: 0, direction: "output" }]]);
    const backend = new BackendUnderTest("snd", {});
    cleanups.push(() => backend.stop());
    await backend.ready;
    const ram = new GuestRam(32 << 20);
    cleanups.push(() => ram.dispose());
    const vmm = new Vmm(backend, ram);
    cleanups.push(() => vmm.dispose());
    const drv = new SndDriver(vmm, ram);
    drv.activate();
    const period = 480 * 4;
    expect(await drv.setParams(0, { bufferBytes: 4 * period, periodBytes: period })).toBe(P.S_OK);
    expect(await drv.pcm(P.R_PCM_PREPARE, 0)).toBe(P.S_OK);
    await drv.play(0, new Uint8Array(6 * period), period);
    expect(delta(before, "vhost_snd_periods", { stream: 0, direction: "output" })).toBe(6);
  });
});
