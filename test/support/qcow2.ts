// qcow2 test helpers: qemu-img / qemu-io (the independent implementation the tests trust), temp
// directories, and byte-buffer reads and writes through the engine.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { ImageFile } from "../../devices/block/disk/qcow2/file.ts";
import { bufferIov } from "../../devices/block/disk/iov_memory.ts";
import { openQcow2 } from "../../devices/block/disk/qcow2/open.ts";
import type { Qcow2Image } from "../../devices/block/disk/qcow2/qcow2.ts";
import { rng } from "./random.ts";

export function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export const qemuImg = (...args: string[]) => run("qemu-img", args);
export const qemuIo = (...args: string[]) => run("qemu-io", args);

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  raw: string;
}

/** `qemu-img check`: corruptions and leaks found (exit codes 2/3 are findings, not failures). */
export function check(path: string): CheckResult {
  const r = spawnSync("qemu-img", ["check", "--output=json", path], { encoding: "utf8" });
  if (r.status !== 0 && r.status !== 2 && r.status !== 3) throw new Error(`qemu-img check failed (${r.status}): ${r.stderr}`);
  const j = JSON.parse(r.stdout) as Record<string, number>;
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j["check-errors"] ?? 0, raw: r.stdout + r.stderr };
}

/** `qemu-img compare` of a qcow2 image against a raw file: true if the guest sees the same bytes. */
export function sameAsRaw(qcow2: string, raw: string): boolean {
  const r = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", qcow2, raw], { encoding: "utf8" });
  if (r.status !== 0 && r.status !== 1) throw new Error(`qemu-img compare failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r.status === 0;
}

const dirs: string[] = [];
export function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "qcow2-test-"));
  dirs.push(d);
  return d;
}
export function cleanupDirs(): void {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

export function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

export function open(path: string, readOnly = false): Qcow2Image {
  return openQcow2(ImageFile.open(path, readOnly), readOnly);
}

export function readAt(img: Qcow2Image, offset: number, len: number): Uint8Array {
  const buf = new Uint8Array(len);
  img.readv(bufferIov(buf), offset, len);
  return buf;
}

export function writeAt(img: Qcow2Image, offset: number, data: Uint8Array): void {
  img.writev(bufferIov(data), offset, data.length);
}

/** Where two buffers first differ, or -1. */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

export { rng };

export function randomBytes(r: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i += 4) {
    const x = (r() * 2 ** 32) >>> 0;
    b[i] = x;
    b[i + 1] = x >>> 8;
    b[i + 2] = x >>> 16;
    b[i + 3] = x >>> 24;
  }
  return b;
}

export type Op =
  | { op: "write"; offset: number; data: Uint8Array }
  | { op: "read"; offset: number; len: number }
  | { op: "discard"; offset: number; len: number }
  | { op: "zeroes"; offset: number; len: number; unmap: boolean }
  | { op: "flush" };

/** A deterministic stream of requests over a `size`-byte disk, sector-aligned, some cluster-aligned. */
export function* ops(seed: number, size: number, cs: number, mix = { write: 45, read: 25, discard: 10, zeroes: 10, flush: 10 }): Generator<Op> {
  const r = rng(seed);
  const total = mix.write + mix.read + mix.discard + mix.zeroes + mix.flush;
  const range = (): [number, number] => {
    const aligned = r() < 0.4;
    const unit = aligned ? cs : 512;
    const maxLen = Math.min(size, 3 * Math.max(cs, 4096), 256 * 1024);
    let len = Math.max(unit, Math.floor((r() * maxLen) / unit) * unit);
    len = Math.min(len, Math.floor(size / unit) * unit);
    const offset = Math.floor((r() * (size - len)) / unit) * unit;
    return [offset, len];
  };
  for (;;) {
    let x = r() * total;
    const [offset, len] = range();
    if ((x -= mix.write) < 0) yield { op: "write", offset, data: randomBytes(r, len) };
    else if ((x -= mix.read) < 0) yield { op: "read", offset, len };
    else if ((x -= mix.discard) < 0) yield { op: "discard", offset, len };
    else if ((x -= mix.zeroes) < 0) yield { op: "zeroes", offset, len, unmap: r() < 0.5 };
    else yield { op: "flush" };
  }
}

/**
 * What the engine must make the model look like after `op`. Discard deallocates whole clusters
 * only; they then read as zeroes unless the image is v2 over a backing file (it cannot say "zero"
 * there and leaves them).
 */
export function applyToModel(model: Uint8Array, op: Op, cs: number, discardZeroes: boolean): void {
  switch (op.op) {
    case "write":
      model.set(op.data, op.offset);
      break;
    case "zeroes":
      model.fill(0, op.offset, op.offset + op.len);
      break;
    case "discard": {
      if (!discardZeroes) break;
      const first = Math.ceil(op.offset / cs) * cs;
      const end = Math.floor((op.offset + op.len) / cs) * cs;
      if (end > first) model.fill(0, first, end);
      break;
    }
  }
}

export function applyToImage(img: Qcow2Image, op: Op): Uint8Array | null {
  switch (op.op) {
    case "write":
      writeAt(img, op.offset, op.data);
      return null;
    case "read":
      return readAt(img, op.offset, op.len);
    case "discard":
      img.discard(op.offset, op.len);
      return null;
    case "zeroes":
      img.writeZeroes(op.offset, op.len, op.unmap);
      return null;
    case "flush":
      img.flush();
      return null;
  }
}
