// Interrupt coalescing for a busy queue. Every used-ring notification costs the guest an
// interrupt (dear under TCG, where the guest's CPU is the bottleneck); under load, completions a
// few microseconds apart can share one. After a flush the decision to notify is taken when a short
// timer expires, but only while the driver has several requests outstanding: a driver waiting on
// one or two requests (QD1) is notified at once, so its latency does not grow.
import type { EventLoop, Timer } from "./event_loop.ts";
import type { Virtqueue } from "./virtqueue.ts";

/** More requests outstanding than this, and the queue counts as busy. */
const BUSY_OUTSTANDING = 4;

export class NotifyCoalescer {
  private pending: Timer | null = null;

  constructor(private readonly loop: EventLoop, private readonly queue: Virtqueue, private readonly delayUs: number) {
    queue.notifyLater = () => this.schedule();
  }

  private schedule(): void {
    if (this.pending !== null) return;
    if (this.queue.driverOutstanding() <= BUSY_OUTSTANDING) {
      this.queue.notifyIfNeeded();
      return;
    }
    this.pending = this.loop.timer(this.delayUs, this.fire);
  }

  /** Bound once: scheduling allocates only the timer. */
  private readonly fire = (): void => {
    this.pending = null;
    this.queue.notifyIfNeeded();
  };

  /** Sends what is pending now and stops coalescing (the queue is stopping). */
  dispose(): void {
    if (this.pending !== null) {
      this.pending.cancel();
      this.pending = null;
      this.queue.notifyIfNeeded();
    }
    this.queue.notifyLater = null;
  }
}
