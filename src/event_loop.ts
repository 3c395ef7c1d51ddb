// One epoll loop per worker thread. It owns the thread: handlers run to completion, and between
// turns the loop yields to Bun's own event loop (setImmediate) so the worker's `onmessage` can run.
// It does not yield after every turn: each yield costs Bun's loop a turn of its own (an
// epoll_pwait2 and its bookkeeping: one syscall in five per I/O of a QD1 block queue). It yields
// after a wake (whoever posts a message to this thread signals wakeFd), when the loop goes idle,
// and at the latest every TURNS_PER_YIELD turns; between yields it blocks at most
// UNYIELDED_WAIT_MS, so work only Bun's loop does (a worker's buffered output) waits that long at
// most. A blocking epoll_wait in a Worker wakes in ~2 µs, measured here.
//
// Besides fds it has timers: one timerfd per loop, armed for the earliest of a heap of deadlines,
// so a device may hold many timers (a sound stream's periods, a coalescing window) for one fd.
import { Epoll, EPOLLIN, EPOLLOUT, EPOLLHUP, EPOLLERR } from "../ffi/epoll.ts";
import { eventfd, signal, drain } from "../ffi/eventfd.ts";
import { timerfd, armTimer, clearTimer } from "../ffi/timerfd.ts";
import { close } from "../ffi/libc.ts";
import { log } from "./log.ts";

export type FdHandler = (events: number) => void;

/** Turns run back to back at most before the loop yields to Bun's event loop. */
export const TURNS_PER_YIELD = 64;
/** How long the loop blocks at most between yields (after a yield it blocks for as long as it takes). */
const UNYIELDED_WAIT_MS = 20;

/** Handlers for one fd by direction: readable (EPOLLIN) and writable (EPOLLOUT) separately. */
export interface FdHandlers {
  readable?: FdHandler;
  writable?: FdHandler;
}

/** A pending timer; cancel() is idempotent, and harmless after it fired. */
export interface Timer {
  cancel(): void;
}

/** One allocation per timer: the entry is its own handle. */
class TimerEntry implements Timer {
  cancelled = false;
  constructor(readonly deadline: number, readonly seq: number, readonly fn: () => void) {}
  cancel(): void {
    this.cancelled = true;
  }
}

/** Microseconds on the monotonic clock (performance.now has sub-µs resolution). */
export function nowUs(): number {
  return performance.now() * 1000;
}

export class EventLoop {
  private readonly epoll = new Epoll(64);
  private readonly handlers = new Map<number, FdHandler>();
  /** Handling a batch of readiness events (runOnce), and the fds watched since it was read. */
  private dispatching = false;
  private readonly addedInBatch = new Set<number>();
  private readonly deferred: (() => void)[] = [];
  private nextTurnTasks: (() => void)[] = [];
  /** The other of the two next-turn arrays (swapped each turn, so a turn allocates nothing). */
  private carriedTasks: (() => void)[] = [];
  /** Counts loop turns (one epoll_wait and what it dispatched); per-turn budgets key on it. */
  turn = 0;
  /** Written by other threads (after a postMessage) to wake the loop so messages get handled. */
  readonly wakeFd = eventfd();
  private stopped = false;
  /** wakeFd fired in this turn: a message may be waiting in Bun's loop. */
  private woken = false;
  private readonly timerFd = timerfd();
  private timers: TimerEntry[] = [];
  private timerSeq = 0;
  /** The deadline the timerfd is armed for, or Infinity. */
  private armedFor = Infinity;

  constructor() {
    this.add(this.wakeFd, EPOLLIN, () => {
      drain(this.wakeFd);
      this.woken = true;
    });
    this.add(this.timerFd, EPOLLIN, () => {
      clearTimer(this.timerFd);
      this.armedFor = Infinity;
      this.runTimers();
    });
  }

  /** Watches `fd` for `events` with one handler for all of them. */
  add(fd: number, events: number, handler: FdHandler): void {
    this.epoll.add(fd, events);
    this.handlers.set(fd, handler);
    if (this.dispatching) this.addedInBatch.add(fd);
  }

  /** Changes the events watched on `fd` without re-adding it. */
  modify(fd: number, events: number): void {
    this.epoll.modify(fd, events);
  }

  /**
   * Watches `fd` with a handler per direction (a tap: readable → receive, writable → transmit
   * back-pressure); interest starts at the directions given and changes with setInterest. Errors
   * and hang-ups go to both handlers, so each side learns of them.
   */
  watch(fd: number, handlers: FdHandlers, interest: { readable: boolean; writable: boolean } = { readable: handlers.readable !== undefined, writable: handlers.writable !== undefined }): void {
    const dispatch: FdHandler = (events) => {
      const failed = events & (EPOLLHUP | EPOLLERR);
      if (events & (EPOLLIN | failed)) handlers.readable?.(events);
      if (events & (EPOLLOUT | failed) && this.handlers.get(fd) === dispatch) handlers.writable?.(events);
    };
    this.add(fd, interestBits(interest), dispatch);
  }

  /** Changes which directions of a watch()ed fd wake the loop. */
  setInterest(fd: number, interest: { readable: boolean; writable: boolean }): void {
    this.epoll.modify(fd, interestBits(interest));
  }

  /** Calls `fn` once, `us` microseconds from now (on this thread, from the loop). */
  timer(us: number, fn: () => void): Timer {
    const entry = new TimerEntry(nowUs() + Math.max(0, us), this.timerSeq++, fn);
    heapPush(this.timers, entry);
    this.armTimerFd();
    return entry;
  }

  private armTimerFd(): void {
    while (this.timers.length > 0 && this.timers[0]!.cancelled) heapPop(this.timers);
    const next = this.timers[0];
    if (next === undefined || next.deadline >= this.armedFor) return;
    this.armedFor = next.deadline;
    // At least 1 µs: 0 would disarm the timerfd.
    armTimer(this.timerFd, Math.max(1, Math.ceil(next.deadline - nowUs())));
  }

  /** Runs every timer that is due, in deadline order (ties: creation order), then re-arms. */
  private runTimers(): void {
    const now = nowUs();
    while (this.timers.length > 0 && this.timers[0]!.deadline <= now) {
      const t = heapPop(this.timers)!;
      if (t.cancelled) continue;
      t.cancelled = true;
      try {
        t.fn();
      } catch (e) {
        log.error("timer failed:", e);
      }
    }
    this.armTimerFd();
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

  /** Waits once (up to timeoutMs) and dispatches what is ready; returns how many fds were ready. */
  runOnce(timeoutMs: number): number {
    // Swapped every turn: what this turn's handlers schedule runs in the next one, not this one.
    const carried = this.nextTurnTasks;
    this.nextTurnTasks = this.carriedTasks;
    this.carriedTasks = carried;
    const n = this.epoll.wait(this.deferred.length > 0 || carried.length > 0 ? 0 : timeoutMs);
    this.turn++;
    this.dispatching = true;
    for (let i = 0; i < n; i++) {
      const fd = this.epoll.readyFd(i);
      const handler = this.handlers.get(fd); // a handler earlier in the batch may have removed it
      if (handler === undefined) continue;
      // ...or closed it and watched a new fd that got the same number: this readiness was the old
      // fd's. Every watch is level-triggered, so the new fd, if ready, is reported next turn.
      if (this.addedInBatch.size > 0 && this.addedInBatch.has(fd)) continue;
      try {
        handler(this.epoll.readyEvents(i));
      } catch (e) {
        // Last line of defence: a handler bug must not take the whole backend down.
        log.error(`event handler for fd ${fd} failed:`, e);
      }
    }
    this.dispatching = false;
    this.addedInBatch.clear();
    for (let i = 0; i < carried.length; i++) {
      try {
        carried[i]!();
      } catch (e) {
        log.error("task continued from the previous turn failed:", e);
      }
    }
    carried.length = 0;
    this.runDeferred();
    return n;
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

  /** Runs until stop(), yielding to Bun's event loop as the header says. */
  run(): void {
    const step = () => {
      let timeoutMs = -1; // right after a yield: block for as long as nothing happens
      for (let turns = 0; turns < TURNS_PER_YIELD; turns++) {
        if (this.stopped) return;
        this.woken = false;
        const ready = this.runOnce(timeoutMs);
        if (this.woken || ready === 0) break; // a message may be waiting, or the loop is idle
        timeoutMs = UNYIELDED_WAIT_MS;
      }
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
    this.remove(this.timerFd);
    close(this.timerFd);
    close(this.epoll.fd);
  }
}

function interestBits(i: { readable: boolean; writable: boolean }): number {
  return (i.readable ? EPOLLIN : 0) | (i.writable ? EPOLLOUT : 0);
}

// A binary min-heap of timers by (deadline, seq).
function before(a: TimerEntry, b: TimerEntry): boolean {
  return a.deadline < b.deadline || (a.deadline === b.deadline && a.seq < b.seq);
}

function heapPush(h: TimerEntry[], e: TimerEntry): void {
  h.push(e);
  let i = h.length - 1;
  while (i > 0) {
    const p = (i - 1) >> 1;
    if (!before(h[i]!, h[p]!)) break;
    [h[i], h[p]] = [h[p]!, h[i]!];
    i = p;
  }
}

function heapPop(h: TimerEntry[]): TimerEntry | undefined {
  const top = h[0];
  const last = h.pop();
  if (h.length > 0 && last !== undefined) {
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && before(h[l]!, h[m]!)) m = l;
      if (r < h.length && before(h[r]!, h[m]!)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m]!, h[i]!];
      i = m;
    }
  }
  return top;
}
