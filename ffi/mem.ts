// mmap/munmap and memfd_create.
import { libc, check, errno, SysError } from "./libc.ts";

export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x8000;
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;

const MAP_FAILED = 2 ** 64 - 1; // (void*)-1 arrives as a rounded float

/** mmap(2); returns the host address as a number. */
export function mmap(len: number, prot: number, flags: number, fd: number, offset: number): number {
  const p = libc.mmap(null, len, prot, flags, fd, offset) as unknown as number | null;
  if (p === null || p === 0 || p >= MAP_FAILED - 4096) throw new SysError("mmap", errno());
  return p;
}

export function munmap(addr: number, len: number): void {
  check(libc.munmap(addr as never, len), "munmap");
}

export function memfdCreate(name: string, flags = MFD_CLOEXEC): number {
  return check(libc.memfd_create(Buffer.from(name + "\0"), flags), "memfd_create");
}
