// When each held I/O buffer of a running stream completes, on the host clock. The spec has the
// device hold a tx buffer until it is "totally consumed" and an rx buffer until it is full, so the
// guest's period interrupts (the completions) must come at the stream's rate, not as fast as the
// host can copy. This is a pure model of that clock: a loop timer drives it with
//   pacer.onBuffer(...)      a buffer arrived
//   pacer.nextDeadline()     arm the timer for then (µs, or null: nothing to wait for)
//   pacer.advance(now)       the buffers that completed by now, and whether the stream ran dry
// and it has no timers of its own, so tests give it any clock they like.
import * as P from "./protocol.ts";

export interface Completion<T> {
  token: T;
  /** The µs the buffer finished playing (or filling); release() completes at its own `now`. */
  atUs: number;
  bytes: number;
  /** Output: bytes still queued in the device after this buffer (virtio_snd_pcm_status.latency_bytes). Input: 0. */
  latencyBytes: number;
  /** False for buffers flushed by release() before the clock reached them (an rx buffer gets no data then). */
  played: boolean;
}

export interface AdvanceResult<T> {
  completions: Completion<T>[];
  /** The stream ran dry this step: output had nothing to play, input had nowhere to put frames. */
  xrun: boolean;
}

export interface PacerOptions {
  direction: P.Direction;
  /** Frame bytes × frames per second of the stream's parameters. */
  bytesPerSecond: number;
  periodBytes: number;
  /**
   * How long a running stream may sit with no buffer before it counts as an underrun (output) or
   * overrun (input). Default: one period, so a drain that ends with STOP right after the last
   * buffer does not report a spurious XRUN, and a guest a full period late does.
   */
  xrunGraceUs?: number;
}

interface Held<T> {
  token: T;
  bytes: number;
  /** Bytes not yet played/filled (less than `bytes` after a STOP in the middle of the buffer). */
  remaining: number;
  /** Segment byte count at this buffer's end; valid while running. */
  cumEnd: number;
}

export class Pacer<T> {
  readonly direction: P.Direction;
  readonly bytesPerSecond: number;
  readonly periodBytes: number;
  readonly xrunGraceUs: number;
  /** XRUNs seen since creation (for logs and tests; the event is the device's choice). */
  xruns = 0;

  private readonly queue: Held<T>[] = [];
  private running = false;
  /** µs when the current run of back-to-back data started, and bytes scheduled since then. */
  private segStartUs = 0;
  private segBytes = 0;
  /** The current dry spell was already reported. */
  private xrunReported = false;

  constructor(o: PacerOptions) {
    if (!(o.bytesPerSecond > 0) || !(o.periodBytes > 0)) throw new Error("pacer needs a positive rate and period");
    this.direction = o.direction;
    this.bytesPerSecond = o.bytesPerSecond;
    this.periodBytes = o.periodBytes;
    this.xrunGraceUs = o.xrunGraceUs ?? (o.periodBytes * 1e6) / o.bytesPerSecond;
  }

  get pending(): number {
    return this.queue.length;
  }

  get isRunning(): boolean {
    return this.running;
  }

  /** Bytes held and not yet played (output) or filled (input). */
  heldBytes(): number {
    return this.queue.reduce((n, h) => n + h.remaining, 0);
  }

  /** A buffer of `bytes` arrived at `nowUs`; it is held until the clock has consumed (or filled) it. */
  onBuffer(token: T, bytes: number, nowUs: number): void {
    const h: Held<T> = { token, bytes, remaining: bytes, cumEnd: 0 };
    if (this.running) {
      // Dry since before now: the frames of the gap are gone (silence played, input dropped);
      // this buffer starts its own run at now.
      if (this.queue.length === 0 && this.cursorUs() < nowUs) this.newSegment(nowUs);
      this.schedule(h);
    }
    this.queue.push(h);
    this.xrunReported = false;
  }

  /** START: the clock runs from `nowUs` over whatever is held (pre-buffered output, capture's ring). */
  start(nowUs: number): void {
    if (this.running) return;
    this.running = true;
    this.xrunReported = false;
    this.newSegment(nowUs);
    for (const h of this.queue) this.schedule(h);
  }

  /** STOP (pause): completes what is due, keeps the rest; a buffer caught midway keeps its remainder. */
  stop(nowUs: number): AdvanceResult<T> {
    const r = this.advance(nowUs);
    const head = this.queue[0];
    if (this.running && head) {
      const headStartUs = this.timeAt(head.cumEnd - head.remaining);
      const played = Math.floor(((nowUs - headStartUs) * this.bytesPerSecond) / 1e6);
      head.remaining -= Math.max(0, Math.min(head.remaining - 1, played));
    }
    this.running = false;
    return r;
  }

  /** RELEASE (or reset): every held buffer completes now, unplayed, as the spec requires. */
  release(nowUs: number): Completion<T>[] {
    const out = this.queue.splice(0).map((h) => ({ token: h.token, atUs: nowUs, bytes: h.bytes, latencyBytes: 0, played: false }));
    this.running = false;
    this.segBytes = 0;
    return out;
  }

  /** The next µs at which advance() has something to do, or null (stopped, or dry and already reported). */
  nextDeadline(): number | null {
    if (!this.running) return null;
    const head = this.queue[0];
    if (head) return Math.ceil(this.timeAt(head.cumEnd));
    if (this.xrunReported) return null;
    return Math.ceil(this.cursorUs() + this.xrunGraceUs);
  }

  advance(nowUs: number): AdvanceResult<T> {
    const completions: Completion<T>[] = [];
    let xrun = false;
    if (!this.running) return { completions, xrun };
    while (this.queue.length > 0) {
      const h = this.queue[0]!;
      const endUs = this.timeAt(h.cumEnd);
      if (endUs > nowUs) break;
      this.queue.shift();
      const latencyBytes = this.direction === P.D_OUTPUT ? this.segBytes - h.cumEnd : 0;
      completions.push({ token: h.token, atUs: endUs, bytes: h.bytes, latencyBytes, played: true });
    }
    if (this.queue.length === 0 && !this.xrunReported && nowUs >= this.cursorUs() + this.xrunGraceUs) {
      this.xrunReported = true;
      this.xruns++;
      xrun = true;
    }
    return { completions, xrun };
  }

  /** µs at which everything scheduled so far is consumed. */
  private cursorUs(): number {
    return this.timeAt(this.segBytes);
  }

  private timeAt(segmentBytes: number): number {
    return this.segStartUs + (segmentBytes * 1e6) / this.bytesPerSecond;
  }

  private newSegment(nowUs: number): void {
    this.segStartUs = nowUs;
    this.segBytes = 0;
  }

  private schedule(h: Held<T>): void {
    this.segBytes += h.remaining;
    h.cumEnd = this.segBytes;
  }
}
