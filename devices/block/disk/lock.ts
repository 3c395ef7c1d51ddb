// Image locking, compatible with QEMU's (block/file-posix.c, raw_apply_lock_bytes and
// raw_check_lock_bytes): so that two of ours, or ours and QEMU / qemu-storage-daemon / qemu-img /
// qemu-io, never write one image at once. QEMU describes what a user of an image does with
// permission bits (consistent read, write, write-unchanged, resize) and locks, with shared OFD
// locks (F_RDLCK), byte 100+i for each permission i it holds and byte 200+i for each permission i
// it does not let others hold. Before using an image it checks, for each permission it wants,
// that nobody holds byte 200+i, and for each it does not share, that nobody holds byte 100+i.
// We take what a QEMU guest disk takes: read-write holds consistent-read and write and shares
// consistent-read and write-unchanged (so a second writer, or a reader that wants the data to stay
// consistent, is refused, and so are we if either is there); read-only holds consistent-read only,
// shares the same (any number of readers; no writer).
import { ofdSetLock, ofdTestLock, F } from "../../../ffi/lock.ts";
import { errnoName } from "../../../ffi/libc.ts";

const PERM_BASE = 100;
const SHARED_BASE = 200;

/** QEMU's BLK_PERM_* bits (include/block/block-common.h); bit i is lock byte base + i. */
const PERM_CONSISTENT_READ = 0x1;
const PERM_WRITE = 0x2;
const PERM_WRITE_UNCHANGED = 0x4;
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"];

export interface ImagePermissions {
  /** What we do with the image. */
  perm: number;
  /** What we let others do at the same time. */
  shared: number;
}

/** A guest disk's permissions, as QEMU takes them (share-rw=off). */
export function imagePermissions(readOnly: boolean): ImagePermissions {
  return {
    perm: PERM_CONSISTENT_READ | (readOnly ? 0 : PERM_WRITE),
    shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
  };
}

export class ImageLockError extends Error {}

/** QEMU's lock bytes span [base, base + PERM_BITS) for each base. */
const PERM_BITS = 4;

/**
 * Ours only, past QEMU's bytes (and libvirt's byte 0), so that two of our backends on one image
 * hand it over as QEMU's inactive images let a migration do: the destination backend starts while
 * the source holds the image, and serves once the source's device stopped. SERVING is held by one
 * of ours whose device runs (some ring started); IDLE by one of ours that holds the image while
 * its device does not run (not started yet, VM stopped, migrated away). Each holds QEMU's bytes as
 * well, so QEMU, qemu-storage-daemon and qemu-img are refused throughout. One of ours may take the
 * image over from an IDLE one when no other of ours is SERVING: never two of ours serve at once.
 */
const SERVING_BYTE = 300;
const IDLE_BYTE = 301;

/** Where an image lock stands: held (device not running), held and serving, waiting for another of
 * ours to stop (holding nothing yet), or not locking (--no-lock). */
export type ImageLockState = "idle" | "serving" | "waiting" | "off";

/** Drops QEMU's lock bytes on this open file description. */
function unlockPermBytes(fd: number): void {
  ofdSetLock(fd, F.UNLCK, PERM_BASE, PERM_BITS);
  ofdSetLock(fd, F.UNLCK, SHARED_BASE, PERM_BITS);
}

/** Takes QEMU's lock bytes for `p` on `fd` (the image's open file description: the locks last as
 * long as it is open). They are shared locks: this fails only against an exclusive one. */
function takePermBytes(fd: number, path: string, p: ImagePermissions): void {
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    const bytes: number[] = [];
    if ((p.perm & bit) !== 0) bytes.push(PERM_BASE + i);
    if ((p.shared & bit) === 0) bytes.push(SHARED_BASE + i);
    for (const b of bytes) {
      const r = ofdSetLock(fd, F.RDLCK, b, 1);
      if (r < 0) {
        unlockPermBytes(fd);
        throw new ImageLockError(`${path}: cannot lock byte ${b} (${errnoName(-r)}); is another process using the image?`);
      }
    }
  }
}

function inUse(path: string, conflict: string): ImageLockError {
  return new ImageLockError(`${path} is in use by another process (${conflict}); stop it first, or give --no-lock if you know both may use it`);
}

/** Only one of ours, not serving, holds what conflicts: it may be taken over. */
function idleOursOnly(fd: number): boolean {
  return held(fd, IDLE_BYTE) && !held(fd, SERVING_BYTE);
}

/**
 * The lock of one open image (its fd's open file description). acquire() at start-up: held, or
 * refused with an ImageLockError when another process uses the image, unless that process is one
 * of ours ("waiting": a migration destination, or a backend started after another). activate()
 * before serving takes the image (over from an idle one of ours) or throws; suspend() when the
 * device stops marks it idle, so another of ours may take it over.
 */
export class ImageLock {
  private constructor(private readonly fd: number, private readonly path: string, private readonly p: ImagePermissions, private state: ImageLockState) {}

  /** Locks `fd` (throws when the image is in use by another process that is not ours). */
  static acquire(fd: number, path: string, p: ImagePermissions): ImageLock {
    takePermBytes(fd, path, p);
    const conflict = findConflict(fd, p);
    if (conflict === null) {
      ofdSetLock(fd, F.RDLCK, IDLE_BYTE, 1);
      return new ImageLock(fd, path, p, "idle");
    }
    unlockPermBytes(fd);
    if (!held(fd, SERVING_BYTE) && !held(fd, IDLE_BYTE)) throw inUse(path, conflict);
    return new ImageLock(fd, path, p, "waiting");
  }

  /** The lock of a resource acquired elsewhere (the state acquire() left), or of --no-lock ("off"). */
  static adopt(fd: number, path: string, p: ImagePermissions, state: ImageLockState): ImageLock {
    return new ImageLock(fd, path, p, state);
  }

  get current(): ImageLockState {
    return this.state;
  }

  /** Before serving: makes sure no other process uses the image (taking it over from an idle one
   * of ours); throws an ImageLockError naming the conflict otherwise. */
  activate(): void {
    if (this.state === "serving" || this.state === "off") return;
    if (this.state === "waiting") takePermBytes(this.fd, this.path, this.p);
    const conflict = findConflict(this.fd, this.p);
    if (conflict !== null && !idleOursOnly(this.fd)) {
      if (this.state === "waiting") unlockPermBytes(this.fd);
      throw inUse(this.path, conflict);
    }
    ofdSetLock(this.fd, F.RDLCK, SERVING_BYTE, 1);
    ofdSetLock(this.fd, F.UNLCK, IDLE_BYTE, 1);
    this.state = "serving";
  }

  /** The device stopped (every ring): still held, but another of ours may take it over. */
  suspend(): void {
    if (this.state !== "serving") return;
    ofdSetLock(this.fd, F.RDLCK, IDLE_BYTE, 1);
    ofdSetLock(this.fd, F.UNLCK, SERVING_BYTE, 1);
    this.state = "idle";
  }
}

/** Describes the first conflict with another user of the image, or null. */
function findConflict(fd: number, p: ImagePermissions): string | null {
  // A writer holds byte 100+write: name that first, it is what the user most needs to hear.
  if ((p.shared & PERM_WRITE) === 0 && held(fd, PERM_BASE + 1)) return "write lock held";
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    if ((p.perm & bit) !== 0 && held(fd, SHARED_BASE + i)) return `it does not share "${PERM_NAMES[i]}" access, which we need`;
    if ((p.shared & bit) === 0 && held(fd, PERM_BASE + i)) return `"${PERM_NAMES[i]}" lock held`;
  }
  return null;
}

/** Whether another open file description holds a lock on byte `b` (F_OFD_GETLK reports only others'). */
function held(fd: number, b: number): boolean {
  const t = ofdTestLock(fd, F.WRLCK, b, 1);
  if (t < 0) throw new ImageLockError(`cannot test lock byte ${b}: ${errnoName(-t)}`);
  return t !== F.UNLCK;
}
