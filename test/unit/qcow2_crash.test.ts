// SIGKILL during random writes with periodic flushes, repeated on one image: after every kill
// `qemu-img check` finds no corruption (leaked clusters are allowed), and every acknowledged write
// reads back (read by qemu-img, not by us), except where the request in progress at the kill
// overlaps it. That is more than "acknowledged before the last completed flush" (what survives a
// power loss): a killed backend loses nothing it acknowledged, so a front-end that reconnects to a
// restarted one (inflight tracking) finds the disk as it left it.
import { test, expect, afterEach } from "bun:test";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { qemuImg, check, tempDir, cleanupDirs, ops, applyToModel, rng, randomBytes, type Op } from "../support/qcow2.ts";

afterEach(cleanupDirs);

const WRITER = join(import.meta.dir, "../support/qcow2_writer.ts");

function readRaw(dir: string, img: string): Uint8Array {
  const raw = join(dir, "read.raw");
  qemuImg("convert", "-f", "qcow2", "-O", "raw", img, raw);
  return new Uint8Array(readFileSync(raw));
}

for (const c of [
  { name: "4 KiB clusters, no backing", cluster: 4096, backing: false },
  { name: "64 KiB clusters over a raw backing file", cluster: 65536, backing: true },
]) {
  test(`SIGKILL during random writes (${c.name}): check clean, every acknowledged write survives`, async () => {
    const dir = tempDir();
    const img = join(dir, "crash.qcow2");
    const size = 32 << 20;
    const args = ["create", "-q", "-f", "qcow2", "-o", `cluster_size=${c.cluster}`];
    if (c.backing) {
      writeFileSync(join(dir, "base.raw"), randomBytes(rng(9), size));
      args.push("-b", "base.raw", "-F", "raw");
    }
    qemuImg(...args, img, String(size));
    let model = readRaw(dir, img);
    const r = rng(c.cluster);
    let flushedSomething = 0;
    for (let round = 0; round < 6; round++) {
      const seed = round * 1000 + c.cluster;
      const child = Bun.spawn([process.execPath, WRITER, img, String(seed), String(size), String(c.cluster)], { stdout: "pipe", stderr: "pipe" });
      // Killed at a random moment once it is writing (its start-up time varies with the load).
      const reader = child.stdout.getReader();
      let out = "";
      const first = await reader.read();
      if (first.value) out += new TextDecoder().decode(first.value);
      await Bun.sleep(100 + Math.floor(r() * 600));
      child.kill(9);
      await child.exited;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        out += new TextDecoder().decode(value);
      }
      let lastFlush = -1;
      let lastStarted = -1;
      for (const line of out.split("\n")) {
        const [k, v] = line.split(" ");
        if (k === "F") lastFlush = Number(v);
        if (k === "S") lastStarted = Number(v);
      }
      if (lastStarted < 0) throw new Error(`writer did not start: ${await new Response(child.stderr).text()}`);
      if (lastFlush >= 0) flushedSomething++;

      const chk = check(img);
      if (chk.corruptions !== 0 || chk.checkErrors !== 0) throw new Error(`round ${round}: qemu-img check: ${chk.raw}`);

      // What must be there: the model after every request that completed (all before the last one
      // started), except where the one in progress at the kill touched it.
      const expected = model.slice();
      const uncertain = new Uint8Array(size);
      let i = 0;
      for (const op of ops(seed, size, c.cluster, { write: 70, read: 0, discard: 5, zeroes: 10, flush: 15 })) {
        if (i > lastStarted) break;
        if (i < lastStarted) applyToModel(expected, op, c.cluster, true);
        else if (op.op !== "flush") uncertain.fill(1, (op as Exclude<Op, { op: "flush" }>).offset, (op as { offset: number }).offset + ("data" in op ? op.data.length : (op as { len: number }).len));
        i++;
      }
      const actual = readRaw(dir, img);
      for (let b = 0; b < size; b++) {
        if (uncertain[b] === 0 && actual[b] !== expected[b]) {
          throw new Error(`round ${round}: byte ${b} is ${actual[b]}, expected ${expected[b]} (last flush: request ${lastFlush}, in progress: ${lastStarted})`);
        }
      }
      model = actual;
    }
    expect(flushedSomething).toBeGreaterThan(3);
    const final = check(img);
    expect(final.corruptions).toBe(0);
  }, 120_000);
}
