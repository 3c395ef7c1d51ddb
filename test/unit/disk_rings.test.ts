// Block's io_urings are set up in acquire with an opcode allow-list (IORING_REGISTER_RESTRICTIONS):
// seccomp cannot see what an SQE does, so a ring is what a compromised process could use to open
// files or sockets behind the sandbox's back. A restricted ring refuses every other opcode
// (-EACCES in the CQE) and every other register call; the same SQE on an unrestricted ring opens
// the file (the check can fail). And the iovec cursor the engine continues short transfers with.
import { describe, test, expect, afterEach } from "bun:test";
import { ptr } from "bun:ffi";
import { mkdtempSync, writeFileSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IoUring, IORING_OP, closeRingHandle, type RingHandle } from "../../ffi/io_uring.ts";
import { IovecArray } from "../../ffi/io.ts";
import { libc, errno, close } from "../../ffi/libc.ts";
import { eventfd } from "../../ffi/eventfd.ts";
import { acquireDiskRings, DISK_RING_RESTRICTIONS } from "../../devices/block/disk/uring_queue.ts";
import { acquireRawDisk, closeRawDiskResource } from "../../devices/block/disk/raw.ts";
import { openPairRings, NET_RING_RESTRICTIONS } from "../../devices/net/uring_tx.ts";

const EACCES = 13;
const AT_FDCWD = -100;
const SYS_io_uring_register = 427;
const IORING_REGISTER_FILES = 2;
const IORING_REGISTER_PROBE = 8;

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

function secretFile(): string {
  const dir = mkdtempSync(join(tmpdir(), "disk-rings-"));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "secret");
  writeFileSync(path, "not for the guest");
  return path;
}

/** Fds of this process that point at `path`. */
function fdsOn(path: string): number[] {
  const found: number[] = [];
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === path) found.push(Number(fd));
    } catch {
      // closed meanwhile
    }
  }
  return found;
}

/** Submits one OPENAT of `path` (read-only) on `ring` and returns its CQE's result. */
function openThrough(ring: IoUring, path: string): number {
  const name = Buffer.from(path + "\0");
  expect(ring.prep(IORING_OP.OPENAT, AT_FDCWD, ptr(name), 0, 0, 7, 0, 0 /* O_RDONLY */)).toBe(true);
  ring.submit(1);
  let res = NaN;
  expect(ring.reap((userData, r) => {
    expect(userData).toBe(7);
    res = r;
  })).toBe(1);
  return res;
}

function diskRing(): RingHandle {
  const rings = acquireDiskRings(1, 8, "test");
  expect(rings).not.toBeNull();
  const h = rings![0]!;
  cleanups.push(() => closeRingHandle(h));
  return h;
}

describe("block's rings are restricted to what a disk queue submits", () => {
  test("an OPENAT SQE on a block ring fails with -EACCES and opens nothing; on an unrestricted ring it opens the file", () => {
    const path = secretFile();
    const ring = IoUring.attach(diskRing());
    try {
      expect(openThrough(ring, path)).toBe(-EACCES);
      expect(fdsOn(path)).toEqual([]);
    } finally {
      ring.close();
    }
    // The control: the same SQE on a ring set up without restrictions opens it.
    const open = IoUring.setup(8);
    try {
      const fd = openThrough(open, path);
      expect(fd).toBeGreaterThanOrEqual(0);
      expect(fdsOn(path)).toEqual([fd]);
      close(fd);
    } finally {
      open.close();
    }
  });

  test("what a disk queue does still works: a READV, and registering and unregistering its eventfd", () => {
    const path = secretFile();
    const resource = acquireRawDisk(path, { readOnly: true, direct: false, aio: "io_uring", lock: false, queues: 2, queueSize: 16 });
    cleanups.push(() => closeRawDiskResource(resource));
    expect(resource.aio).toBe("io_uring");
    expect(resource.rings.length).toBe(2);
    const ring = IoUring.attach(resource.rings[1]!);
    try {
      expect(ring.entries).toBe(16);
      const buf = new Uint8Array(64);
      const iov = new IovecArray(1);
      iov.push(ptr(buf), buf.length);
      expect(ring.prep(IORING_OP.READV, resource.fd, iov.ptr, 1, 0, 1)).toBe(true);
      ring.submit(1);
      let res = NaN;
      ring.reap((_u, r) => void (res = r));
      expect(res).toBe("not for the guest".length);
      expect(Buffer.from(buf.subarray(0, res)).toString()).toBe("not for the guest");
      const efd = eventfd();
      cleanups.push(() => close(efd));
      ring.registerEventfd(efd);
      ring.unregisterEventfd();
      ring.registerEventfd(efd); // again: the next start of the queue does this
      ring.unregisterEventfd();
    } finally {
      ring.close();
    }
  });

  test("register calls outside the allow-list fail with EACCES", () => {
    const h = diskRing();
    const files = new Int32Array([0]);
    for (const op of [IORING_REGISTER_FILES, IORING_REGISTER_PROBE]) {
      expect(DISK_RING_RESTRICTIONS.registerOps).not.toContain(op);
      const r = Number(libc.syscall(SYS_io_uring_register, h.fd, op, ptr(files), 1, 0, 0, 0));
      expect(r).toBe(-1);
      expect(errno()).toBe(EACCES);
    }
  });

  test("a ring handle is plain JSON (it crosses the sandbox's re-exec so) and attaches after a round trip", () => {
    const h = diskRing();
    const back = JSON.parse(JSON.stringify(h)) as RingHandle;
    expect(back).toEqual(h);
    const ring = IoUring.attach(back);
    expect(ring.entries).toBe(8);
    ring.close();
  });
});

describe("net's rings likewise (WRITE, WRITEV and READV only)", () => {
  test("an OPENAT SQE on a pair's ring fails with -EACCES; no register call is allowed", () => {
    const path = secretFile();
    const { rings } = openPairRings(1, "uring");
    const h = rings[0]!;
    cleanups.push(() => closeRingHandle(h));
    const ring = IoUring.attach(h);
    try {
      expect(openThrough(ring, path)).toBe(-EACCES);
      expect(fdsOn(path)).toEqual([]);
    } finally {
      ring.close();
    }
    expect(NET_RING_RESTRICTIONS.registerOps).toEqual([]);
    const efd = eventfd();
    cleanups.push(() => close(efd));
    const again = IoUring.attach(h);
    try {
      expect(() => again.registerEventfd(efd)).toThrow(/EACCES/);
    } finally {
      again.close();
    }
  });
});

describe("IovecArray.advance (a short transfer continues from where it stopped)", () => {
  const segs = (iov: IovecArray): [number, number][] => {
    const v = new DataView(iov.bytes.buffer);
    return Array.from({ length: iov.count }, (_, i) => [Number(v.getBigUint64(16 * i, true)), Number(v.getBigUint64(16 * i + 8, true))]);
  };
  test("within the first segment, at a boundary, across several, past the end; 64-bit bases", () => {
    const make = () => {
      const iov = new IovecArray(4);
      iov.push(0x1_0000_1000, 100);
      iov.push(0x2000, 50);
      iov.push(0x3000, 10);
      return iov;
    };
    let iov = make();
    iov.advance(30);
    expect(segs(iov)).toEqual([[0x1_0000_1000 + 30, 70], [0x2000, 50], [0x3000, 10]]);
    iov = make();
    iov.advance(100);
    expect(segs(iov)).toEqual([[0x2000, 50], [0x3000, 10]]);
    iov = make();
    iov.advance(155);
    expect(segs(iov)).toEqual([[0x3000 + 5, 5]]);
    iov = make();
    iov.advance(160);
    expect(segs(iov)).toEqual([]);
    iov = make();
    iov.advance(0);
    expect(segs(iov)).toEqual([[0x1_0000_1000, 100], [0x2000, 50], [0x3000, 10]]);
    // Pushing after an advance appends after what is left.
    iov = make();
    iov.advance(120);
    iov.push(0x4000, 1);
    expect(segs(iov)).toEqual([[0x2000 + 20, 30], [0x3000, 10], [0x4000, 1]]);
  });
});
