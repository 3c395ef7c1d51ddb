// The engine for backends that consume or produce instantly (null, file): the Pacer decides on
// the host clock when each held buffer is played or filled, one loop timer armed at its next
// deadline. Output PCM is read from the guest and handed to the host at the moment it "plays";
// capture data is taken from the host when the buffer "fills", so both sides see real-time order.
import { nowUs, type Timer } from "../../../src/event_loop.ts";
import { Pacer } from "../pacing.ts";
import * as P from "../protocol.ts";
import type { EngineContext, HeldBuffer, StreamEngine } from "./host.ts";

export interface PacedIo {
  /** Output: one buffer's PCM, gain applied, at its play time. */
  write?(pcm: Uint8Array): void;
  /** Input: fill `dst` completely (silence where there is no data). */
  read?(dst: Uint8Array): void;
  /** Fixes what the host keeps (file headers) after RELEASE. */
  close?(): void;
}

export class PacedEngine implements StreamEngine {
  private pacer: Pacer<HeldBuffer>;
  private timer: Timer | null = null;
  private running = false;
  private attached = true;

  constructor(
    private readonly ctx: EngineContext,
    private readonly direction: P.Direction,
    private readonly bytesPerSecond: number,
    private readonly periodBytes: number,
    private readonly io: PacedIo,
  ) {
    this.pacer = this.newPacer();
  }

  private newPacer(): Pacer<HeldBuffer> {
    return new Pacer<HeldBuffer>({ direction: this.direction, bytesPerSecond: this.bytesPerSecond, periodBytes: this.periodBytes });
  }

  push(b: HeldBuffer): void {
    this.pacer.onBuffer(b, b.bytes, nowUs());
    this.arm();
  }

  start(): void {
    this.running = true;
    if (this.attached) this.pacer.start(nowUs());
    this.arm();
  }

  stop(): void {
    this.running = false;
    const r = this.pacer.stop(nowUs());
    this.deliver(r.completions, false);
    this.arm();
  }

  release(): void {
    this.running = false;
    this.cancel();
    for (const c of this.pacer.release(nowUs())) this.ctx.complete(c.token, 0, null);
    this.ctx.flush();
  }

  detach(): HeldBuffer[] {
    this.cancel();
    this.attached = false;
    const held = this.pacer.release(nowUs()).map((c) => c.token);
    this.pacer = this.newPacer();
    return held;
  }

  attach(): void {
    if (this.attached) return;
    this.attached = true;
    if (this.running) this.pacer.start(nowUs());
    this.arm();
  }

  close(): void {
    this.cancel();
    this.io.close?.();
  }

  private cancel(): void {
    this.timer?.cancel();
    this.timer = null;
  }

  private arm(): void {
    this.cancel();
    const at = this.pacer.nextDeadline();
    if (at === null) return;
    this.timer = this.ctx.loop.timer(at - nowUs(), () => {
      this.timer = null;
      this.tick();
    });
  }

  private tick(): void {
    const r = this.pacer.advance(nowUs());
    this.deliver(r.completions, r.xrun);
    this.arm();
  }

  private deliver(completions: { token: HeldBuffer; latencyBytes: number }[], xrun: boolean): void {
    for (const c of completions) {
      if (this.direction === P.D_OUTPUT) {
        this.io.write?.(this.ctx.pcmOf(c.token));
        this.ctx.complete(c.token, c.latencyBytes, null);
      } else {
        const data = new Uint8Array(c.token.bytes);
        this.io.read?.(data);
        this.ctx.complete(c.token, 0, data);
      }
    }
    if (xrun) this.ctx.xrun();
    if (completions.length > 0 || xrun) this.ctx.flush();
  }
}
