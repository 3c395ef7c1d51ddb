// Open-file-description byte-range locks (fcntl F_OFD_SETLK / F_OFD_GETLK, Linux 3.15+): owned by
// the open file description, not the process, so they conflict between two opens in one process
// too, and go away when its last fd closes. QEMU's image locking uses them (block/file-posix.c).
import { ptr } from "bun:ffi";
import { libc, errno } from "./libc.ts";
import { SEEK_SET } from "./io.ts";

/** fcntl commands, and struct flock's l_type values (<fcntl.h> F_*). */
export const F = {
  OFD_GETLK: 36,
  OFD_SETLK: 37,
  RDLCK: 0,
  WRLCK: 1,
  UNLCK: 2,
} as const;

/** struct flock (x86_64): l_type i16, l_whence i16, pad, l_start i64 @8, l_len i64 @16, l_pid i32 @24. */
const FLOCK_SIZE = 32;

function flock(type: number, start: number, len: number): { bytes: Uint8Array; view: DataView } {
  const bytes = new Uint8Array(FLOCK_SIZE);
  const view = new DataView(bytes.buffer);
  view.setInt16(0, type, true);
  view.setInt16(2, SEEK_SET, true);
  view.setBigInt64(8, BigInt(start), true);
  view.setBigInt64(16, BigInt(len), true);
  return { bytes, view }; // l_pid 0, as OFD locks require
}

/** Takes (F.RDLCK/F.WRLCK) or drops (F.UNLCK) a lock on [start, start+len), without waiting.
 * Returns 0, or -errno (EAGAIN or EACCES: another open file description holds a conflicting lock). */
export function ofdSetLock(fd: number, type: number, start: number, len: number): number {
  const { bytes } = flock(type, start, len);
  return libc.fcntl(fd, F.OFD_SETLK, ptr(bytes)) < 0 ? -errno() : 0;
}

/** The type of a lock another open file description holds that would conflict with taking `type`
 * on [start, start+len) (F.RDLCK or F.WRLCK), F.UNLCK when none would, or -errno. */
export function ofdTestLock(fd: number, type: number, start: number, len: number): number {
  const { bytes, view } = flock(type, start, len);
  if (libc.fcntl(fd, F.OFD_GETLK, ptr(bytes)) < 0) return -errno();
  return view.getInt16(0, true);
}
