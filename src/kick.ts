// Helpers every device uses to run a queue: watching its kick eventfd and the standard
// "drain, re-enable notifications, re-check" loop that cannot lose a kick.
import { EPOLLIN } from "../ffi/epoll.ts";
import { drain } from "../ffi/eventfd.ts";
import type { EventLoop } from "./event_loop.ts";
import type { DescriptorChain, Virtqueue } from "./virtqueue.ts";

/**
 * Calls `onKick` whenever the driver kicks `queue`, and once right away (buffers may have been
 * made available before the ring started). Returns the function that stops watching.
 */
export function watchKick(loop: EventLoop, queue: Virtqueue, onKick: () => void): () => void {
  const fd = queue.kickFd;
  loop.add(fd, EPOLLIN, () => {
    drain(fd);
    onKick();
  });
  loop.defer(() => {
    if (loop.watching(fd)) onKick();
  });
  return () => loop.remove(fd);
}

/**
 * Pops and handles every available chain. `handle` returns false when the device cannot take more
 * now (it must then have put the chain back with undoPop, and call this again later). Used entries
 * are published once, at the end, after `beforePublish` (where an asynchronous device submits the
 * batch's I/O and adds the completions that are ready already, so they share the notification).
 */
export function processQueue(queue: Virtqueue, handle: (chain: DescriptorChain) => boolean, beforePublish?: () => void): void {
  try {
    for (;;) {
      queue.disableNotification();
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        if (!handle(chain)) return;
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
 * A queue a device holds between startQueue and stopQueue, with its kicks watched meanwhile.
 * `queue` is null while the ring is stopped.
 */
export class WatchedQueue {
  queue: Virtqueue | null = null;
  private unwatch: (() => void) | null = null;

  constructor(private readonly loop: EventLoop, private readonly onKick: () => void) {}

  start(q: Virtqueue): void {
    this.stop();
    this.queue = q;
    this.unwatch = watchKick(this.loop, q, this.onKick);
  }

  stop(): void {
    this.unwatch?.();
    this.unwatch = null;
    this.queue = null;
  }
}
