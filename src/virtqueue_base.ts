// What both ring layouts (split_virtqueue.ts, packed_virtqueue.ts) keep alike: the description
// they were built from and the eventfds, and what they do when the guest gets a ring wrong: count
// and log the error rate-limited, and for a protocol violation stop the ring until reset and tell
// the front-end through the error eventfd. Fields only and the error path: nothing here is called
// per request.
import { signal } from "../ffi/eventfd.ts";
import { GuestErrorLog, ringsBroken } from "./guest_errors.ts";
import { MAX_INDIRECT_ENTRIES, type VirtqueueConfig } from "./ring.ts";

export abstract class VirtqueueBase {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  protected readonly indirect: boolean;
  /** Largest indirect table accepted: the ring size, or MAX_INDIRECT_ENTRIES if that is more. */
  protected readonly maxIndirect: number;
  kickFd: number;
  callFd: number;
  /** The front-end's error eventfd (-1: none). */
  errFd: number;
  /** Set when the guest broke the ring protocol; the queue does nothing more until reset. */
  broken = false;
  /** What this queue was built from (to rebuild it in another thread). */
  readonly config: VirtqueueConfig;
  private readonly errorLog: GuestErrorLog;

  constructor(c: VirtqueueConfig) {
    this.index = c.index;
    this.size = c.size;
    this.eventIdx = c.eventIdx;
    this.indirect = c.indirect;
    this.maxIndirect = Math.max(c.size, MAX_INDIRECT_ENTRIES);
    this.kickFd = c.kickFd;
    this.callFd = c.callFd;
    this.errFd = c.errFd;
    this.config = { ...c };
    this.errorLog = new GuestErrorLog(`queue ${c.index}`);
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
