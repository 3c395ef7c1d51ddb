// Helpers every device uses to run a queue: watching its kick eventfd, the standard
// "drain, re-enable notifications, re-check" loop that cannot lose a kick, and the per-turn work
// budget that keeps one busy (or hostile) queue from holding the thread.
import { EPOLLIN, EPOLLHUP, EPOLLERR } from "../ffi/epoll.ts";
import { drain } from "../ffi/eventfd.ts";
import type { EventLoop } from "./event_loop.ts";
import type { DescriptorChain } from "./chain.ts";
import type { RingPosition } from "./ring.ts";
import type { Virtqueue } from "./virtqueue.ts";
import { log } from "./log.ts";

/**
 * Calls `onKick` whenever the driver kicks `queue`, and once right away (buffers may have been
 * made available before the ring started). Returns the function that stops watching.
 *
 * The first pass is deferred; it runs only if this very watch is still live (not merely if the
 * fd is watched: a stopped queue's fd number may be watched again by the queue that replaced it,
 * over another memory table). A kick fd that hangs up or fails (a pipe whose writer closed, a fd
 * that is not readable) is dropped from the loop: level-triggered, it would otherwise be ready
 * forever and spin the thread.
 */
export function watchKick(loop: EventLoop, queue: Virtqueue, onKick: () => void): () => void {
  const fd = queue.kickFd;
  let live = true;
  let watched = true;
  const unwatchFd = () => {
    if (watched) loop.remove(fd);
    watched = false;
  };
  loop.add(fd, EPOLLIN, (events) => {
    let readable = true;
    try {
      drain(fd);
    } catch (e) {
      readable = false;
      log.warn(`queue ${queue.index}: kick fd ${fd} cannot be read (${(e as Error).message}); no longer watched`);
    }
    if (readable && events & (EPOLLHUP | EPOLLERR)) {
      readable = false;
      log.warn(`queue ${queue.index}: kick fd ${fd} hung up; no longer watched (the ring is served again after a new SET_VRING_KICK)`);
    }
    if (!readable) unwatchFd();
    onKick();
  });
  loop.defer(() => {
    if (live) onKick();
  });
  return () => {
    live = false;
    unwatchFd();
  };
}

/** Chains and bytes one queue may process per event-loop turn before it yields the thread. */
export const TURN_BUDGET_CHAINS = 256;
export const TURN_BUDGET_BYTES = 8 << 20;

/**
 * A queue's work allowance for the current loop turn. A request's declared size counts (a 1 GiB
 * chain of aliased descriptors is 1 GiB of work), so a few milliseconds of work at most stand
 * between two looks at the control socket. When it runs out, `resume` is scheduled for the next
 * turn (once), and the queue continues there.
 */
export class TurnBudget {
  private turn = -1;
  private chains = 0;
  private bytes = 0;
  private resumeScheduled = false;

  constructor(private readonly loop: EventLoop, private readonly resume: () => void) {}

  private refresh(): void {
    if (this.turn === this.loop.turn) return;
    this.turn = this.loop.turn;
    this.chains = TURN_BUDGET_CHAINS;
    this.bytes = TURN_BUDGET_BYTES;
  }

  get exhausted(): boolean {
    this.refresh();
    return this.chains <= 0 || this.bytes <= 0;
  }

  /** Bytes that may still be moved in this turn. */
  bytesLeft(): number {
    this.refresh();
    return Math.max(0, this.bytes);
  }

  /** Counts one chain of `bytes` declared bytes. */
  spendChain(bytes: number): void {
    this.refresh();
    this.chains--;
    this.bytes -= bytes;
  }

  spendBytes(bytes: number): void {
    this.refresh();
    this.bytes -= bytes;
  }

  /** Continues the queue in the next turn (at most one continuation is pending). */
  yieldTurn(): void {
    if (this.resumeScheduled) return;
    this.resumeScheduled = true;
    this.loop.nextTurn(() => {
      this.resumeScheduled = false;
      this.resume();
    });
  }
}

/**
 * Pops and handles every available chain. `handle` returns false when the device cannot take more
 * now (it must then have put the chain back with undoPop, and call this again later). Used entries
 * are published once, at the end, after `beforePublish` (where an asynchronous device submits the
 * batch's I/O and adds the completions that are ready already, so they share the notification).
 * With a `budget`, processing stops when the turn's allowance is spent and continues next turn.
 */
export function processQueue(
  queue: Virtqueue,
  handle: (chain: DescriptorChain) => boolean,
  beforePublish?: () => void,
  budget?: TurnBudget,
): void {
  try {
    for (;;) {
      queue.disableNotification();
      for (;;) {
        if (budget !== undefined && budget.exhausted) {
          // Notifications stay off: the continuation is already scheduled and re-arms at its end.
          budget.yieldTurn();
          return;
        }
        const chain = queue.pop();
        if (chain === null) break;
        if (!handle(chain)) return;
        // Counted once handled: a handler that works through a huge chain in pieces spends its
        // bytes as it goes (spendBytes) and returns false when the turn's allowance is gone.
        budget?.spendChain(chain.readableLen + chain.writableLen);
      }
      if (!queue.enableNotification()) return;
    }
  } finally {
    try {
      beforePublish?.();
    } finally {
      queue.flush();
    }
  }
}

/**
 * Fills the driver's receive buffers while there is something to put in them: the standard
 * "disable notifications, fill, re-enable, re-check, publish once" loop (a buffer the driver adds
 * between the last pop and the re-enable would otherwise wait for a kick that never comes).
 * `hasData` says whether there is more to deliver (and may read ahead to find out); `fill` puts
 * data into the chain and completes it, or returns false after rewinding it (it cannot be used
 * now). Returns true when it stopped for want of buffers while data remained.
 */
export function fillQueue(queue: Virtqueue, hasData: () => boolean, fill: (chain: DescriptorChain) => boolean, budget?: TurnBudget): boolean {
  try {
    for (;;) {
      queue.disableNotification();
      for (;;) {
        if (!hasData()) return false;
        if (budget !== undefined && budget.exhausted) {
          budget.yieldTurn();
          return false;
        }
        const chain = queue.pop();
        if (chain === null) break;
        if (!fill(chain)) return false;
        budget?.spendChain(chain.writableLen);
      }
      if (!queue.enableNotification()) return hasData();
    }
  } finally {
    queue.flush();
  }
}

/**
 * A queue a device holds between startQueue and stopQueue, with its kicks watched meanwhile and
 * a work budget per turn. `queue` is null while the ring is stopped.
 */
export class WatchedQueue {
  queue: Virtqueue | null = null;
  private unwatch: (() => void) | null = null;
  /** Continues `onKick` in the next turn when it stopped for the budget. */
  readonly budget: TurnBudget;

  constructor(private readonly loop: EventLoop, private readonly onKick: () => void) {
    this.budget = new TurnBudget(loop, () => {
      if (this.queue !== null) this.onKick();
    });
  }

  start(q: Virtqueue): void {
    this.stop();
    this.queue = q;
    this.unwatch = watchKick(this.loop, q, this.onKick);
  }

  /** Stops watching; returns where the ring stopped (null if it was not running). */
  stop(): RingPosition | null {
    const q = this.queue;
    this.unwatch?.();
    this.unwatch = null;
    this.queue = null;
    if (q === null) return null;
    q.flush();
    return q.position();
  }
}

/**
 * The receive and transmit queues of one data path (a console port, the console's control
 * channel, a net queue pair): `onRx` runs when the driver adds receive buffers, `onTx` when it
 * sends. Which of the pair a ring is follows from its index's parity (receive even).
 */
export class QueuePair {
  readonly rx: WatchedQueue;
  readonly tx: WatchedQueue;

  constructor(loop: EventLoop, onRx: () => void, onTx: () => void) {
    this.rx = new WatchedQueue(loop, onRx);
    this.tx = new WatchedQueue(loop, onTx);
  }

  /** The pair member serving ring `index` (even: receive, odd: transmit). */
  member(index: number): WatchedQueue {
    return index % 2 === 0 ? this.rx : this.tx;
  }

  stop(): void {
    this.rx.stop();
    this.tx.stop();
  }
}
