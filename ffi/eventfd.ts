// eventfd(2): kick/call/err notifiers and our own wake-up fds.
import { libc, check, checkAllow, EAGAIN, EINTR } from "./libc.ts";

export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;

const counter = new BigUint64Array(1);
const one = new BigUint64Array([1n]);

export function eventfd(flags = EFD_NONBLOCK | EFD_CLOEXEC): number {
  return check(libc.eventfd(0, flags), "eventfd");
}

/** Adds 1 to the counter. A full counter (EAGAIN) already means "signalled", so it is ignored. */
export function signal(fd: number): void {
  for (;;) {
    const r = checkAllow(libc.write(fd, one, 8), "eventfd write", EAGAIN, EINTR);
    if (r !== -EINTR) return;
  }
}

/** Reads and resets the counter; returns 0 when it was already zero (non-blocking fd). */
export function drain(fd: number): number {
  for (;;) {
    const r = checkAllow(libc.read(fd, counter, 8), "eventfd read", EAGAIN, EINTR);
    if (r === -EINTR) continue;
    return r === 8 ? Number(counter[0]) : 0;
  }
}
