// epoll(7). `struct epoll_event` is packed on x86_64: events u32 @0, data u64 @4 (12 bytes).
import { libc, check, checkAllow, EINTR } from "./libc.ts";

export const EPOLLIN = 0x1;
export const EPOLLOUT = 0x4;
export const EPOLLERR = 0x8;
export const EPOLLHUP = 0x10;
export const EPOLLRDHUP = 0x2000;
const EPOLL_CLOEXEC = 0o2000000;
const CTL_ADD = 1;
const CTL_DEL = 2;
const CTL_MOD = 3;

export class Epoll {
  readonly fd: number;
  private readonly ev = new Uint8Array(12);
  private readonly evView = new DataView(this.ev.buffer);
  private readonly out: Uint8Array;
  private readonly outView: DataView;

  constructor(readonly maxEvents = 64) {
    this.fd = check(libc.epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
    this.out = new Uint8Array(12 * maxEvents);
    this.outView = new DataView(this.out.buffer);
  }

  private ctl(op: number, fd: number, events: number, name: string): void {
    this.evView.setUint32(0, events, true);
    this.evView.setUint32(4, fd, true); // data = the fd itself
    this.evView.setUint32(8, 0, true);
    check(libc.epoll_ctl(this.fd, op, fd, this.ev), name);
  }
  add(fd: number, events: number): void {
    this.ctl(CTL_ADD, fd, events, "epoll_ctl(ADD)");
  }
  modify(fd: number, events: number): void {
    this.ctl(CTL_MOD, fd, events, "epoll_ctl(MOD)");
  }
  remove(fd: number): void {
    libc.epoll_ctl(this.fd, CTL_DEL, fd, this.ev); // ENOENT/EBADF after close are harmless
  }

  /** Waits up to `timeoutMs` (-1 = forever); returns the number of ready entries (0 on EINTR). */
  wait(timeoutMs: number): number {
    const n = checkAllow(libc.epoll_wait(this.fd, this.out, this.maxEvents, timeoutMs), "epoll_wait", EINTR);
    return n < 0 ? 0 : n;
  }
  readyFd(i: number): number {
    return this.outView.getUint32(i * 12 + 4, true);
  }
  readyEvents(i: number): number {
    return this.outView.getUint32(i * 12, true);
  }
}
