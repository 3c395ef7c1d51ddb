// The event queue (eventq): jack plug changes, XRUNs and CTL_NOTIFYs wait here until the driver
// has posted a buffer for them. The backlog is bounded (a guest that never posts event buffers
// cannot grow it without end): past the limit the oldest events are dropped, as a full hardware
// FIFO would. Event buffers are popped only when an event is ready, so none is ever held.
import type { EventLoop } from "../../src/event_loop.ts";
import { WatchedQueue, fillQueue } from "../../src/queue_serving.ts";
import { ChainWriter } from "../../src/chain.ts";
import type { GuestErrorLog } from "../../src/guest_errors.ts";
import * as P from "./protocol.ts";

export const MAX_PENDING_EVENTS = 256;

export class SndEventQueue {
  readonly ws: WatchedQueue;
  private pending: P.SndEvent[] = [];
  dropped = 0;

  constructor(loop: EventLoop, private readonly errors: GuestErrorLog) {
    this.ws = new WatchedQueue(loop, () => this.deliver());
  }

  push(e: P.SndEvent): void {
    this.pending.push(e);
    if (this.pending.length > MAX_PENDING_EVENTS) {
      this.pending.shift();
      this.dropped++;
    }
    this.deliver();
  }

  get backlog(): readonly P.SndEvent[] {
    return this.pending;
  }

  deliver(): void {
    const q = this.ws.queue;
    if (q === null) return;
    fillQueue(
      q,
      () => this.pending.length > 0,
      (chain) => {
        if (chain.writableLen < P.EVENT_BYTES) {
          this.errors.report(`eventq: buffer of ${chain.writableLen} writable bytes, an event needs ${P.EVENT_BYTES}; returned empty`);
          q.add(chain.head, 0);
          return true;
        }
        const w = new ChainWriter(chain);
        w.write(P.encodeEvent(this.pending.shift()!));
        q.add(chain.head, w.written);
        return true;
      },
      this.ws.budget,
    );
  }

  reset(): void {
    this.pending = [];
  }

  snapshot(): P.SndEvent[] {
    return this.pending.map((e) => ({ ...e }));
  }

  static check(s: unknown): P.SndEvent[] {
    if (!Array.isArray(s) || s.length > MAX_PENDING_EVENTS) throw new Error("snd state: events is not a list of at most 256");
    return s.map((e, i) => {
      const o = e as { code?: unknown; data?: unknown };
      if (!Number.isInteger(o.code) || !Number.isInteger(o.data)) throw new Error(`snd state: event ${i} is malformed`);
      return { code: o.code as number, data: o.data as number };
    });
  }

  restore(events: P.SndEvent[]): void {
    this.pending = events;
  }
}
