// timerfd(2): one-shot timers with microsecond resolution that wake an epoll loop.
import { libc, check } from "./libc.ts";
import { drain } from "./eventfd.ts";

const CLOCK_MONOTONIC = 1;
const TFD_NONBLOCK = 0o4000;
const TFD_CLOEXEC = 0o2000000;

export function timerfd(): number {
  return check(libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC), "timerfd_create");
}

const spec = new BigInt64Array(4); // struct itimerspec { interval {sec, nsec}, value {sec, nsec} }

/** Arms a one-shot expiry `us` microseconds from now (0 disarms). */
export function armTimer(fd: number, us: number): void {
  spec[0] = 0n;
  spec[1] = 0n;
  spec[2] = BigInt(Math.floor(us / 1e6));
  spec[3] = BigInt((us % 1e6) * 1000);
  check(libc.timerfd_settime(fd, 0, spec, null), "timerfd_settime");
}

/** Clears an expiry (the 8-byte expiration count); 0 if none was pending. */
export const clearTimer = drain;
