// `--backend alsa`: each prepared stream opens a host ALSA PCM (non-blocking) configured to the
// guest's format, rate, channels, period and buffer. Timing comes from ALSA, not the Pacer: its
// poll descriptors are watched with loop.watch while there is work. A tx buffer is written to
// ALSA as soon as there is room, and completes once it has been played: when snd_pcm_delay says
// its last frame has left (so the guest's drain, and the STOP after it, come after the sound, and
// STOP loses nothing: what is written but not yet played stays held and is written again at
// START). An rx buffer completes once ALSA has filled it. (ALSA's `null` PCM takes frames
// instantly and reports no delay, so output completions are also capped at real time since ALSA
// started: over `null` the guest plays at its stream's rate, as Linux needs.) Underruns and
// overruns are recovered with snd_pcm_recover and reported as XRUN.
import * as A from "../../../ffi/alsa.ts";
import { EPOLLIN, EPOLLOUT } from "../../../ffi/epoll.ts";
import { frameBytes, rateHz } from "../formats.ts";
import * as P from "../protocol.ts";
import type { PcmParams } from "../stream.ts";
import type { SndOptions, SndStreamSpec } from "../options.ts";
import type { EngineContext, HeldBuffer, StreamEngine } from "./host.ts";
import { StatelessHost } from "./stateless.ts";
import { log } from "../../../src/log.ts";
import { EPERM, SysError } from "../../../ffi/libc.ts";
import type { Timer } from "../../../src/event_loop.ts";

// libasound's own "ALSA lib ..." stderr lines become debug lines of our log (the error that
// matters is ours, which names the option and the PCM).
A.captureAlsaErrors((message) => log.debug(`ALSA: ${message}`));

const ALSA_FORMAT: Record<number, number> = {
  [P.FMT_U8]: A.SND_PCM_FORMAT_U8,
  [P.FMT_S16]: A.SND_PCM_FORMAT_S16_LE,
  [P.FMT_S24]: A.SND_PCM_FORMAT_S24_LE,
  [P.FMT_S24_3]: A.SND_PCM_FORMAT_S24_3LE,
  [P.FMT_S32]: A.SND_PCM_FORMAT_S32_LE,
  [P.FMT_FLOAT]: A.SND_PCM_FORMAT_FLOAT_LE,
};

/** Opens and closes `name` once: what validate() checks before the socket exists. */
export function probeAlsa(name: string, direction: P.Direction): void {
  const pcm = A.pcmOpen(name, direction === P.D_OUTPUT ? A.SND_PCM_STREAM_PLAYBACK : A.SND_PCM_STREAM_CAPTURE, A.SND_PCM_NONBLOCK);
  A.pcmClose(pcm);
}

function configure(pcm: A.PcmHandle, p: PcmParams, frame: number): void {
  const s = A.alsa();
  const hw = A.hwParams();
  A.alsaCheck(s.snd_pcm_hw_params_any(pcm, hw), "snd_pcm_hw_params_any");
  A.alsaCheck(s.snd_pcm_hw_params_set_access(pcm, hw, A.SND_PCM_ACCESS_RW_INTERLEAVED), "set_access");
  A.alsaCheck(s.snd_pcm_hw_params_set_format(pcm, hw, ALSA_FORMAT[p.format]!), "set_format");
  A.alsaCheck(s.snd_pcm_hw_params_set_channels(pcm, hw, p.channels), "set_channels");
  const want = rateHz(p.rate)!;
  const got = A.hwSetRateNear(pcm, hw, want);
  if (got !== want) throw new Error(`the host PCM offers ${got} Hz, not ${want} Hz`);
  A.hwSetPeriodSizeNear(pcm, hw, p.periodBytes / frame);
  A.hwSetBufferSizeNear(pcm, hw, p.bufferBytes / frame);
  A.alsaCheck(s.snd_pcm_hw_params(pcm, hw), "snd_pcm_hw_params");
  const sw = A.swParams();
  A.alsaCheck(s.snd_pcm_sw_params_current(pcm, sw), "sw_params_current");
  const period = BigInt(p.periodBytes / frame);
  A.alsaCheck(s.snd_pcm_sw_params_set_start_threshold(pcm, sw, period), "set_start_threshold");
  A.alsaCheck(s.snd_pcm_sw_params_set_avail_min(pcm, sw, period), "set_avail_min");
  A.alsaCheck(s.snd_pcm_sw_params(pcm, sw), "sw_params");
  A.alsaCheck(s.snd_pcm_prepare(pcm), "snd_pcm_prepare");
}

interface Pending {
  held: HeldBuffer;
  /** Output: the PCM (read from the guest when first written); input: what was captured so far. */
  data: Uint8Array | null;
  done: number;
  /** Output: written to ALSA in full; `end` is then the stream frame count just after it. */
  written: boolean;
  end: number;
}

class AlsaEngine implements StreamEngine {
  private readonly pcm: A.PcmHandle;
  private readonly frame: number;
  private readonly pollfds: Uint8Array;
  private readonly pollCount: number;
  private readonly fds: number[] = [];
  /**
   * What ALSA asks to wait for on each of `fds` (pollfd.events), which is not always the stream's
   * direction: plugins built on ioplug, such as `pulse`, signal a playback PCM's room with POLLIN.
   */
  private readonly fdInterest = new Map<number, { readable: boolean; writable: boolean }>();
  /**
   * Some of ALSA's poll descriptors cannot be epolled (the `null` PCM's is /dev/null: EPERM);
   * poll(2) calls such a descriptor always ready, so when ALSA says EAGAIN the engine retries on
   * a timer (a quarter period) instead of waiting for readiness.
   */
  private unpollable = false;
  private wake: Timer | null = null;
  private wakeAt = Infinity;
  private readonly retryUs: number;
  private readonly rate: number;
  /** Output: frames written since ALSA was last prepared (the stream position of the next write). */
  private writtenFrames = 0;
  /**
   * Output: when (µs, performance.now) ALSA was first seen running since it was last prepared;
   * played frames are capped at real time from then (see playedFrames).
   */
  private runningSinceUs: number | null = null;
  private readonly queue: Pending[] = [];
  private running = false;
  private attached = true;
  private closed = false;
  private readonly output: boolean;

  constructor(private readonly ctx: EngineContext, direction: P.Direction, device: string, p: PcmParams) {
    this.output = direction === P.D_OUTPUT;
    this.frame = frameBytes(p.format, p.channels);
    this.rate = rateHz(p.rate)!;
    this.retryUs = Math.max(500, Math.round((p.periodBytes / this.frame / this.rate) * 250_000));
    this.pcm = A.pcmOpen(device, this.output ? A.SND_PCM_STREAM_PLAYBACK : A.SND_PCM_STREAM_CAPTURE, A.SND_PCM_NONBLOCK);
    try {
      configure(this.pcm, p, this.frame);
      const pd = A.pollDescriptors(this.pcm);
      this.pollfds = pd.fds;
      this.pollCount = pd.count;
      const dv = new DataView(pd.fds.buffer);
      for (let i = 0; i < pd.count; i++) {
        const fd = dv.getInt32(i * A.POLLFD_BYTES, true);
        const events = dv.getInt16(i * A.POLLFD_BYTES + 4, true);
        const seen = this.fdInterest.get(fd);
        const interest = { readable: (seen?.readable ?? false) || (events & EPOLLIN) !== 0, writable: (seen?.writable ?? false) || (events & EPOLLOUT) !== 0 };
        this.fdInterest.set(fd, interest);
        if (seen || this.fds.includes(fd)) continue;
        const h = (events: number) => this.onPoll(fd, events);
        try {
          ctx.loop.watch(fd, { readable: h, writable: h }, { readable: false, writable: false });
        } catch (e) {
          if (!(e instanceof SysError && e.errno === EPERM)) throw e;
          this.unpollable = true;
          continue;
        }
        this.fds.push(fd);
      }
    } catch (e) {
      for (const fd of this.fds) ctx.loop.remove(fd);
      A.pcmClose(this.pcm);
      throw e;
    }
  }

  push(b: HeldBuffer): void {
    this.queue.push({ held: b, data: null, done: 0, written: false, end: 0 });
    this.service();
  }

  start(): void {
    this.running = true;
    if (!this.output) A.alsa().snd_pcm_start(this.pcm);
    this.service();
  }

  stop(): void {
    if (this.output && this.running && this.attached) this.completePlayed();
    this.running = false;
    this.rewind();
    this.updateInterest();
  }

  release(): void {
    this.running = false;
    A.alsa().snd_pcm_drop(this.pcm);
    this.writtenFrames = 0;
    this.runningSinceUs = null;
    for (const q of this.queue.splice(0)) this.ctx.complete(q.held, 0, null);
    this.ctx.flush();
    this.updateInterest();
  }

  detach(): HeldBuffer[] {
    if (this.output && this.running && this.attached) this.completePlayed();
    this.attached = false;
    this.rewind();
    this.updateInterest();
    return this.queue.splice(0).map((q) => q.held);
  }

  attach(): void {
    if (this.attached) return;
    this.attached = true;
    if (this.running && !this.output) A.alsa().snd_pcm_start(this.pcm);
    this.service();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.wake?.cancel();
    this.wake = null;
    for (const fd of this.fds) this.ctx.loop.remove(fd);
    A.pcmClose(this.pcm);
  }

  /** Drops what ALSA holds and prepares it again; held output buffers will be written anew. */
  private rewind(): void {
    A.alsa().snd_pcm_drop(this.pcm);
    A.alsa().snd_pcm_prepare(this.pcm);
    this.writtenFrames = 0;
    this.runningSinceUs = null;
    for (const q of this.queue) {
      q.done = 0;
      q.written = false;
    }
  }

  /**
   * Watches ALSA's descriptors while there is something to write or read, and arms the timer for
   * `waitUs` (the next written buffer's end is due to be played) or, when a descriptor cannot be
   * watched, to retry after EAGAIN.
   */
  private updateInterest(waitUs = Infinity): void {
    if (this.closed) return;
    const active = this.running && this.attached;
    const want = active && this.queue.some((q) => !q.written);
    for (const fd of this.fds) {
      const i = this.fdInterest.get(fd)!;
      this.ctx.loop.setInterest(fd, { readable: want && i.readable, writable: want && i.writable });
    }
    let us = active ? waitUs : Infinity;
    if (want && (this.unpollable || this.fds.length === 0)) us = Math.min(us, this.retryUs);
    const at = us === Infinity ? Infinity : performance.now() * 1000 + us;
    if (this.wake && at >= this.wakeAt - 200) return; // armed for sooner (or about the same time)
    this.wake?.cancel();
    this.wake = null;
    this.wakeAt = at;
    if (at === Infinity) return;
    this.wake = this.ctx.loop.timer(us, () => {
      this.wake = null;
      this.wakeAt = Infinity;
      this.service();
    });
  }

  private onPoll(fd: number, events: number): void {
    const dv = new DataView(this.pollfds.buffer);
    for (let i = 0; i < this.pollCount; i++) {
      const o = i * A.POLLFD_BYTES;
      dv.setInt16(o + 6, dv.getInt32(o, true) === fd ? events & (EPOLLIN | EPOLLOUT | 0x18) : 0, true);
    }
    try {
      A.pollRevents(this.pcm, this.pollfds, this.pollCount);
    } catch (e) {
      log.warn(`snd alsa: ${(e as Error).message}`);
    }
    this.service();
  }

  /** Moves as many frames as ALSA takes or gives now; completes the buffers that are done. */
  private service(): void {
    if (this.closed) return;
    if (this.output) this.serviceOutput();
    else this.serviceInput();
  }

  /**
   * Stream frames played so far: written minus what snd_pcm_delay says is still to be heard
   * (all of it once ALSA is not running: it ran dry, or never started), and while running never
   * more than real time (plus 1%, so a device clock a little fast is not held back) since ALSA
   * started: a PCM without a clock (`null`, or `file` over it) takes a whole buffer at once and
   * reports no delay, and a Linux guest whose buffer completes in one go sees its hw_ptr wrap to
   * where it was, no progress, and fails the write with EIO.
   */
  private playedFrames(): number {
    const s = A.alsa();
    const state = s.snd_pcm_state(this.pcm);
    if (state === A.SND_PCM_STATE_PREPARED) return 0;
    if (state !== A.SND_PCM_STATE_RUNNING && state !== A.SND_PCM_STATE_DRAINING) {
      this.runningSinceUs = null;
      return this.writtenFrames;
    }
    const now = performance.now() * 1000;
    this.runningSinceUs ??= now;
    const realTime = Math.floor(((now - this.runningSinceUs) / 1e6) * this.rate * 1.01);
    let played: number;
    try {
      played = this.writtenFrames - Math.min(this.writtenFrames, Math.max(0, A.delay(this.pcm)));
    } catch {
      played = this.writtenFrames;
    }
    return Math.min(played, realTime);
  }

  /** Completes the written buffers at the head of the queue that have been played; returns µs until the next one is due (or Infinity). */
  private completePlayed(): number {
    const played = this.playedFrames();
    const pending = this.writtenFrames - played;
    let completed = false;
    while (this.queue.length > 0 && this.queue[0]!.written && this.queue[0]!.end <= played) {
      const q = this.queue.shift()!;
      this.ctx.complete(q.held, pending * this.frame, null);
      completed = true;
    }
    if (completed) this.ctx.flush();
    const head = this.queue[0];
    if (!head?.written) return Infinity;
    // At least a millisecond: ALSA's delay moves in steps (a period, or a server's update).
    return Math.max(1000, ((head.end - played) / this.rate) * 1e6);
  }

  private serviceOutput(): void {
    const s = A.alsa();
    if (!(this.running && this.attached)) return this.updateInterest();
    for (;;) {
      const q = this.queue.find((x) => !x.written);
      if (!q) break;
      q.data ??= this.ctx.pcmOf(q.held);
      const left = q.data.subarray(q.done);
      const frames = Math.floor(left.length / this.frame);
      const r = frames === 0 ? 0 : A.writei(this.pcm, left, frames);
      if (r === -A.EAGAIN) break;
      if (r < 0) {
        // An underrun: everything written has been played. Complete it; rewrite the rest.
        const e = s.snd_pcm_recover(this.pcm, r, 1);
        const lost = this.queue.filter((x) => x.written);
        this.queue.splice(0, lost.length);
        for (const x of lost) this.ctx.complete(x.held, 0, null);
        this.writtenFrames = 0;
        this.runningSinceUs = null;
        for (const x of this.queue) {
          x.done = 0;
          x.written = false;
        }
        this.ctx.xrun();
        this.ctx.flush();
        if (e < 0) {
          log.warn(`snd alsa: ${A.strerror(r)}; stream stopped`);
          this.running = false;
          break;
        }
        continue;
      }
      q.done += r * this.frame;
      this.writtenFrames += r;
      if (frames === 0 || q.done + this.frame > q.data.length) {
        q.written = true;
        q.end = this.writtenFrames;
      }
      if (s.snd_pcm_state(this.pcm) === A.SND_PCM_STATE_PREPARED) s.snd_pcm_start(this.pcm);
    }
    // Fewer frames than the start threshold: start anyway, the guest has started.
    if (this.writtenFrames > 0 && s.snd_pcm_state(this.pcm) === A.SND_PCM_STATE_PREPARED) s.snd_pcm_start(this.pcm);
    this.updateInterest(this.completePlayed());
  }

  private serviceInput(): void {
    let completed = false;
    const s = A.alsa();
    while (this.running && this.attached && this.queue.length > 0) {
      const q = this.queue[0]!;
      q.data ??= new Uint8Array(q.held.bytes);
      const left = q.data.subarray(q.done);
      const frames = Math.floor(left.length / this.frame);
      const r = frames === 0 ? 0 : A.readi(this.pcm, left, frames);
      if (r === -A.EAGAIN) break;
      if (r < 0) {
        if (s.snd_pcm_recover(this.pcm, r, 1) < 0) {
          log.warn(`snd alsa: ${A.strerror(r)}; stream stopped`);
          this.running = false;
          break;
        }
        this.ctx.xrun();
        completed = true;
        s.snd_pcm_start(this.pcm);
        continue;
      }
      q.done += r * this.frame;
      if (frames === 0 || q.done + this.frame > q.data.length) {
        this.queue.shift();
        this.ctx.complete(q.held, 0, q.data);
        completed = true;
      }
    }
    if (completed) this.ctx.flush();
    this.updateInterest();
  }
}

/** Caps are hostCaps(): ALSA's plug layer converts; S24_3 is left out as the null and file backends leave it out. */
export class AlsaHost extends StatelessHost {
  readonly kind = "alsa";

  constructor(private readonly o: SndOptions) {
    super(o.streams.length);
  }

  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine {
    return new AlsaEngine(ctx, s.direction, s.direction === P.D_OUTPUT ? this.o.alsaPlayback : this.o.alsaCapture, params);
  }
}
