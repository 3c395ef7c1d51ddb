// Interrupt coalescing for a busy queue. Every used-ring notification costs the guest an
// interrupt (dear under TCG, where the guest's CPU is the bottleneck); under load, completions a
// few microseconds apart can share one. After a flush the decision to notify is taken when a short
// timer expires, but only while the driver has several requests outstanding: a driver waiting on
// one or two requests (QD1) is notified at once, so its latency does not grow.
import { EPOLLIN } from "../ffi/epoll.ts";
import { timerfd, armTimer, clearTimer } from "../ffi/timerfd.ts";
import { close } from "../ffi/libc.ts";
import type { EventLoop } from "./event_loop.ts";
import type { Virtqueue } from "./virtqueue.ts";

/** More requests outstanding than this, and the queue counts as busy. */
const BUSY_OUTSTANDING = 4;

export class NotifyCoalescer {
  private readonly fd = timerfd();
  private armed = false;

  constructor(private readonly loop: EventLoop, private readonly queue: Virtqueue, private readonly delayUs: number) {
    loop.add(this.fd, EPOLLIN, () => {
      clearTimer(this.fd);
      this.fire();
    });
    queue.notifyLater = () => this.schedule();
  }

  private schedule(): void {
    if (this.armed) return;
    if (this.queue.driverOutstanding() <= BUSY_OUTSTANDING) {
      this.queue.notifyIfNeeded();
      return;
    }
    this.armed = true;
    armTimer(this.fd, this.delayUs);
  }

  private fire(): void {
    this.armed = false;
    this.queue.notifyIfNeeded();
  }

  /** Sends what is pending now and stops coalescing (the queue is stopping). */
  dispose(): void {
    if (this.armed) {
      armTimer(this.fd, 0);
      this.armed = false;
      this.queue.notifyIfNeeded();
    }
    this.queue.notifyLater = null;
    this.loop.remove(this.fd);
    close(this.fd);
  }
}
