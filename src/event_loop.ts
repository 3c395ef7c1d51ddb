// One epoll loop per worker thread. It owns the thread: handlers run to completion, and after each
// batch of events the loop yields to Bun's own event loop (setImmediate) so the worker's
// `onmessage` can run. A blocking epoll_wait in a Worker wakes in ~2 µs, measured here.
import { Epoll, EPOLLIN } from "../ffi/epoll.ts";
import { eventfd, signal, drain } from "../ffi/eventfd.ts";
import { close } from "../ffi/libc.ts";
import { log } from "./log.ts";

export type FdHandler = (events: number) => void;

export class EventLoop {
  private readonly epoll = new Epoll(64);
  private readonly handlers = new Map<number, FdHandler>();
  private readonly deferred: (() => void)[] = [];
  private nextTurnTasks: (() => void)[] = [];
  /** Counts loop turns (one epoll_wait and what it dispatched); per-turn budgets key on it. */
  turn = 0;
  /** Written by other threads (after a postMessage) to wake the loop so messages get handled. */
  readonly wakeFd = eventfd();
  private stopped = false;

  constructor() {
    this.add(this.wakeFd, EPOLLIN, () => drain(this.wakeFd));
  }

  add(fd: number, events: number, handler: FdHandler): void {
    this.epoll.add(fd, events);
    this.handlers.set(fd, handler);
  }

  modify(fd: number, events: number): void {
    this.epoll.modify(fd, events);
  }

  /** Stops watching `fd`. Must be called before the fd is closed. */
  remove(fd: number): void {
    if (this.handlers.delete(fd)) this.epoll.remove(fd);
  }

  watching(fd: number): boolean {
    return this.handlers.has(fd);
  }

  /**
   * Runs `fn` once the current batch of events has been handled: the place to coalesce work such
   * as one used-ring notification per batch of completions.
   */
  defer(fn: () => void): void {
    this.deferred.push(fn);
  }

  /**
   * Runs `fn` in the next turn, after the fds that are ready by then have been served: where a
   * queue that used up its work budget continues, so the control socket and other queues get
   * their turn in between.
   */
  nextTurn(fn: () => void): void {
    this.nextTurnTasks.push(fn);
  }

  /** Waits once (up to timeoutMs) and dispatches what is ready. */
  runOnce(timeoutMs: number): void {
    const carried = this.nextTurnTasks;
    if (carried.length > 0) this.nextTurnTasks = [];
    const n = this.epoll.wait(this.deferred.length > 0 || carried.length > 0 ? 0 : timeoutMs);
    this.turn++;
    for (let i = 0; i < n; i++) {
      const fd = this.epoll.readyFd(i);
      const handler = this.handlers.get(fd); // a handler earlier in the batch may have removed it
      if (handler === undefined) continue;
      try {
        handler(this.epoll.readyEvents(i));
      } catch (e) {
        // Last line of defence: a handler bug must not take the whole backend down.
        log.error(`event handler for fd ${fd} failed:`, e);
      }
    }
    for (const fn of carried) {
      try {
        fn();
      } catch (e) {
        log.error("task continued from the previous turn failed:", e);
      }
    }
    this.runDeferred();
  }

  private runDeferred(): void {
    while (this.deferred.length > 0) {
      const batch = this.deferred.splice(0);
      for (const fn of batch) {
        try {
          fn();
        } catch (e) {
          log.error("deferred task failed:", e);
        }
      }
    }
  }

  /** Runs until stop(); yields to Bun's event loop between batches. */
  run(): void {
    const step = () => {
      if (this.stopped) return;
      this.runOnce(-1);
      setImmediate(step);
    };
    step();
  }

  /** Wakes the loop from another thread (or a signal handler on this one). */
  wake(): void {
    signal(this.wakeFd);
  }

  stop(): void {
    this.stopped = true;
    this.wake();
  }

  dispose(): void {
    this.remove(this.wakeFd);
    close(this.wakeFd);
    close(this.epoll.fd);
  }
}
