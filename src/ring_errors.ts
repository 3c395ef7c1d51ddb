// What both ring layouts (split_virtqueue.ts, packed_virtqueue.ts) do alike when the guest gets a
// ring wrong: count and log the error rate-limited, and for a protocol violation stop the ring
// until reset and tell the front-end through the error eventfd.
import { signal } from "../ffi/eventfd.ts";
import { GuestErrorLog, ringsBroken } from "./guest_errors.ts";

export abstract class RingErrors {
  /** Set when the guest broke the ring protocol; the queue does nothing more until reset. */
  broken = false;
  /** The front-end's error eventfd (-1: none). */
  errFd: number;
  private readonly errorLog: GuestErrorLog;

  constructor(index: number, errFd: number) {
    this.errFd = errFd;
    this.errorLog = new GuestErrorLog(`queue ${index}`);
  }

  /** Guest-caused ring errors so far (logged rate-limited). */
  get errors(): number {
    return this.errorLog.count;
  }

  protected guestError(message: string): void {
    this.errorLog.report(message);
  }

  /** Marks the ring unusable and tells the front-end through the error eventfd. */
  protected breakRing(message: string): void {
    this.guestError(`${message}; queue stopped until reset`);
    this.broken = true;
    ringsBroken().inc();
    if (this.errFd >= 0) signal(this.errFd);
  }
}
