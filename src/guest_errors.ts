// One rate-limited logger for errors a guest (or a front-end) can cause. A hostile guest can make
// such errors at line rate; logging each would turn the log into the attack. The first few are
// logged as they come, then at most one line per interval says how many were suppressed. Every
// error is counted, so tests and stats see them all.
import { log } from "./log.ts";
import { metrics, type SharedCounter } from "./metrics.ts";

/** Rings marked broken by a guest (any thread, any device). */
export function ringsBroken(): SharedCounter {
  return metrics().sharedCounter("vhost_rings_broken", "Rings stopped because the guest broke them (until reset)");
}

const BURST = 8;
const INTERVAL_MS = 10_000;

/**
 * Logs the first few messages as they come, then at most one line per interval saying how many
 * were suppressed: for any error that can repeat at line rate (a guest's, or a failing host disk's).
 */
export class RateLimitedLog {
  private logged = 0;
  private suppressed = 0;
  private windowStart = 0;

  constructor(private readonly label: string, private readonly level: "warn" | "debug" = "warn", private readonly what = "errors") {}

  report(message: string): void {
    if (this.logged < BURST) {
      this.logged++;
      log[this.level](`${this.label}: ${message}`);
      if (this.logged === BURST) log[this.level](`${this.label}: further ${this.what} are rate-limited`);
      this.windowStart = Date.now();
      return;
    }
    this.suppressed++;
    const now = Date.now();
    if (now - this.windowStart >= INTERVAL_MS) {
      log[this.level](`${this.label}: ${message} (${this.suppressed - 1} similar ${this.what} suppressed)`);
      this.suppressed = 0;
      this.windowStart = now;
    }
  }
}

/** Errors a guest or front-end caused: counted (every one, for tests and metrics), logged rate-limited. */
export class GuestErrorLog {
  /** Every error reported, logged or not. */
  count = 0;
  private readonly log: RateLimitedLog;
  private readonly counted: SharedCounter;

  constructor(label: string, level: "warn" | "debug" = "warn") {
    this.log = new RateLimitedLog(label, level, "guest errors");
    this.counted = metrics().sharedCounter("vhost_guest_errors", "Errors the guest (or the front-end) caused, by where they were seen", { source: label });
  }

  report(message: string): void {
    this.count++;
    this.counted.inc();
    this.log.report(message);
  }
}
