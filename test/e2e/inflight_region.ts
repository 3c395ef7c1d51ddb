// Crash-safe reconnect helpers: the inflight region QEMU keeps for a vhost-user-blk device (the
// memfd the first backend allocated, which QEMU holds open as /memfd:vhost-inflight and hands to
// every later backend), read live from the host, and a SIGKILL aimed at an instant when that region
// shows requests in flight, so that the next backend has requests to resubmit.
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import type { Subprocess } from "bun";

export async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(20);
  }
}

/** Whether every thread of `pid` is stopped (state T after SIGSTOP). */
export function allStopped(pid: number): boolean {
  try {
    return readdirSync(`/proc/${pid}/task`).every((t) => {
      const stat = readFileSync(`/proc/${pid}/task/${t}/stat`, "utf8");
      return /^\S+ \(.*\) [tT]/.test(stat);
    });
  } catch {
    return false;
  }
}

/** QEMU's fd of the inflight region (the memfd our first backend allocated and sent it). */
export function inflightFdPath(pid: number): string | null {
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith("/memfd:vhost-inflight")) return `/proc/${pid}/fd/${fd}`;
    } catch {}
  }
  return null;
}

export interface RegionView {
  /** Heads flagged in flight, in pop order (their counters). */
  heads: number[];
  /** The used index the region says was last published. */
  usedIdx: number;
}

/** Reads one queue's split-layout region (libvhost-user's: 16-byte header, 16 bytes per head). */
export function readRegion(path: string): RegionView {
  const buf = readFileSync(path);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const descNum = dv.getUint16(10, true);
  const e: { h: number; c: number }[] = [];
  for (let h = 0; h < descNum && 16 + 16 * h + 16 <= buf.length; h++) {
    const o = 16 + 16 * h;
    if (dv.getUint8(o) === 1) e.push({ h, c: dv.getUint32(o + 8, true) + dv.getUint32(o + 12, true) * 2 ** 32 });
  }
  return { heads: e.sort((a, b) => a.c - b.c).map((x) => x.h), usedIdx: dv.getUint16(14, true) };
}

/**
 * Reads one queue's packed-layout region (src/inflight_packed.ts: 32-byte header, 32-byte entries):
 * the chains in flight (their head entries), in pop order, and the used index | wrap << 15. Only
 * at an instant between two updates (the work-in-progress fields equal the committed ones): in
 * the middle of a pop or a publication, whether a head flagged in flight still is depends on the
 * ring (what recovery decides), so none is reported and the killer looks again.
 */
export function readPackedRegion(path: string): RegionView {
  const buf = readFileSync(path);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const descNum = dv.getUint16(10, true);
  const usedIdx = dv.getUint16(16, true) | (dv.getUint8(20) << 15);
  const freeHead = dv.getUint16(12, true);
  const quiet = freeHead === dv.getUint16(14, true) && dv.getUint16(16, true) === dv.getUint16(18, true) && dv.getUint8(20) === dv.getUint8(21);
  if (!quiet || 32 + 32 * descNum > buf.length) return { heads: [], usedIdx };
  const free = new Set<number>();
  for (let e = freeHead; e < descNum && !free.has(e); e = dv.getUint16(32 + 32 * e + 2, true)) free.add(e);
  const e: { h: number; c: number }[] = [];
  for (let h = 0; h < descNum; h++) {
    const o = 32 + 32 * h;
    if (dv.getUint8(o) === 1 && !free.has(h)) e.push({ h, c: dv.getUint32(o + 8, true) + dv.getUint32(o + 12, true) * 2 ** 32 });
  }
  return { heads: e.sort((a, b) => a.c - b.c).map((x) => x.h), usedIdx };
}

/**
 * SIGKILLs `victim` (a backend) at an instant when `regionPath` shows requests in flight, or after
 * `searchMs` whatever it shows; waits until it is gone and returns the region as it left it.
 *
 * The backend may complete a request long before the TCG guest sends the next: many instants have
 * nothing in flight. So: watch the shared region (live); when it shows requests in flight, freeze
 * the backend (SIGSTOP) and look again: still in flight, it dies there (SIGKILL, the same as a
 * crash at that instant); else it goes on (SIGCONT) and the watch resumes.
 */
export async function killWithRequestsInFlight(victim: Subprocess, exited: Promise<unknown>, regionPath: string, searchMs = 6_000, read: (path: string) => RegionView = readRegion): Promise<RegionView> {
  const deadline = Date.now() + searchMs;
  let polls = 0;
  let region = read(regionPath);
  while (Date.now() < deadline) {
    if (++polls % 64 === 0) await Bun.sleep(0);
    if (read(regionPath).heads.length === 0) continue;
    victim.kill("SIGSTOP");
    await waitFor("the backend to stop", () => allStopped(victim.pid), 5_000);
    region = read(regionPath);
    if (region.heads.length > 0) break;
    victim.kill("SIGCONT");
  }
  victim.kill("SIGKILL");
  await exited;
  const dead = read(regionPath);
  if (dead.heads.join() !== region.heads.join()) throw new Error(`the region changed between SIGSTOP and SIGKILL: ${region.heads} then ${dead.heads}`);
  return dead;
}
