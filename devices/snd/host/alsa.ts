// `--backend alsa`: each prepared stream opens a host ALSA PCM (non-blocking) configured to the
// guest's format, rate, channels, period and buffer. Timing comes from ALSA, not the Pacer: its
// poll descriptors are watched with loop.watch while there is work, a tx buffer completes once
// ALSA has taken all its frames, an rx buffer once ALSA has filled it. (ALSA's `null` PCM takes
// frames instantly, so over it the guest runs as fast as it sends.) Underruns and overruns are
// recovered with snd_pcm_recover and reported as XRUN.
import * as A from "../../../ffi/alsa.ts";
import { EPOLLIN, EPOLLOUT } from "../../../ffi/epoll.ts";
import { hostCaps, frameBytes, rateHz, type PcmCaps } from "../formats.ts";
import * as P from "../protocol.ts";
import type { PcmParams } from "../stream.ts";
import type { SndOptions, SndStreamSpec } from "../options.ts";
import type { EngineContext, HeldBuffer, HostStreamState, SndHost, StreamEngine } from "./host.ts";
import { log } from "../../../src/log.ts";

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
  const hw = A.hwParamsMalloc();
  try {
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
  } finally {
    A.hwParamsFree(hw);
  }
  const sw = A.swParamsMalloc();
  try {
    A.alsaCheck(s.snd_pcm_sw_params_current(pcm, sw), "sw_params_current");
    const period = BigInt(p.periodBytes / frame);
    A.alsaCheck(s.snd_pcm_sw_params_set_start_threshold(pcm, sw, period), "set_start_threshold");
    A.alsaCheck(s.snd_pcm_sw_params_set_avail_min(pcm, sw, period), "set_avail_min");
    A.alsaCheck(s.snd_pcm_sw_params(pcm, sw), "sw_params");
  } finally {
    A.swParamsFree(sw);
  }
  A.alsaCheck(s.snd_pcm_prepare(pcm), "snd_pcm_prepare");
}

interface Pending {
  held: HeldBuffer;
  /** Output: the PCM (read from the guest when first written); input: what was captured so far. */
  data: Uint8Array | null;
  done: number;
}

class AlsaEngine implements StreamEngine {
  private readonly pcm: A.PcmHandle;
  private readonly frame: number;
  private readonly pollfds: Uint8Array;
  private readonly pollCount: number;
  private readonly fds: number[] = [];
  private readonly queue: Pending[] = [];
  private running = false;
  private attached = true;
  private closed = false;
  private readonly output: boolean;

  constructor(private readonly ctx: EngineContext, direction: P.Direction, device: string, p: PcmParams) {
    this.output = direction === P.D_OUTPUT;
    this.frame = frameBytes(p.format, p.channels);
    this.pcm = A.pcmOpen(device, this.output ? A.SND_PCM_STREAM_PLAYBACK : A.SND_PCM_STREAM_CAPTURE, A.SND_PCM_NONBLOCK);
    try {
      configure(this.pcm, p, this.frame);
      const pd = A.pollDescriptors(this.pcm);
      this.pollfds = pd.fds;
      this.pollCount = pd.count;
      const dv = new DataView(pd.fds.buffer);
      for (let i = 0; i < pd.count; i++) {
        const fd = dv.getInt32(i * A.POLLFD_BYTES, true);
        if (this.fds.includes(fd)) continue;
        this.fds.push(fd);
        const h = (events: number) => this.onPoll(fd, events);
        ctx.loop.watch(fd, { readable: h, writable: h }, { readable: false, writable: false });
      }
    } catch (e) {
      for (const fd of this.fds) ctx.loop.remove(fd);
      A.pcmClose(this.pcm);
      throw e;
    }
  }

  push(b: HeldBuffer): void {
    this.queue.push({ held: b, data: null, done: 0 });
    this.service();
  }

  start(): void {
    this.running = true;
    if (!this.output) A.alsa().snd_pcm_start(this.pcm);
    this.service();
  }

  stop(): void {
    this.running = false;
    A.alsa().snd_pcm_drop(this.pcm);
    A.alsa().snd_pcm_prepare(this.pcm);
    this.updateInterest();
  }

  release(): void {
    this.running = false;
    A.alsa().snd_pcm_drop(this.pcm);
    for (const q of this.queue.splice(0)) this.ctx.complete(q.held, 0, null);
    this.ctx.flush();
    this.updateInterest();
  }

  detach(): HeldBuffer[] {
    this.attached = false;
    A.alsa().snd_pcm_drop(this.pcm);
    A.alsa().snd_pcm_prepare(this.pcm);
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
    for (const fd of this.fds) this.ctx.loop.remove(fd);
    A.pcmClose(this.pcm);
  }

  private updateInterest(): void {
    if (this.closed) return;
    const want = this.running && this.attached && this.queue.length > 0;
    for (const fd of this.fds) this.ctx.loop.setInterest(fd, { readable: want && !this.output, writable: want && this.output });
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
    let completed = false;
    const s = A.alsa();
    while (this.running && this.attached && this.queue.length > 0) {
      const q = this.queue[0]!;
      q.data ??= this.output ? this.ctx.pcmOf(q.held) : new Uint8Array(q.held.bytes);
      const left = q.data.subarray(q.done);
      const frames = Math.floor(left.length / this.frame);
      let r = frames === 0 ? 0 : this.output ? A.writei(this.pcm, left, frames) : A.readi(this.pcm, left, frames);
      if (r === -A.EAGAIN) break;
      if (r < 0) {
        if (s.snd_pcm_recover(this.pcm, r, 1) < 0) {
          log.warn(`snd alsa: ${A.strerror(r)}; stream stopped`);
          this.running = false;
          break;
        }
        this.ctx.xrun();
        completed = true;
        if (!this.output) s.snd_pcm_start(this.pcm);
        continue;
      }
      q.done += r * this.frame;
      if (frames === 0 || q.done + this.frame > q.data.length) {
        this.queue.shift();
        let latency = 0;
        if (this.output) {
          try {
            latency = Math.max(0, A.delay(this.pcm)) * this.frame;
          } catch {
            latency = 0;
          }
        }
        this.ctx.complete(q.held, latency, this.output ? null : q.data);
        completed = true;
      }
      if (this.output && s.snd_pcm_state(this.pcm) === A.SND_PCM_STATE_PREPARED) s.snd_pcm_start(this.pcm);
    }
    if (completed) this.ctx.flush();
    this.updateInterest();
  }
}

export class AlsaHost implements SndHost {
  readonly kind = "alsa";

  constructor(private readonly o: SndOptions) {}

  caps(_s: SndStreamSpec): PcmCaps {
    // ALSA's plug layer converts; S24_3 is left out as the null and file backends leave it out.
    return hostCaps();
  }

  open(s: SndStreamSpec, params: PcmParams, ctx: EngineContext): StreamEngine {
    return new AlsaEngine(ctx, s.direction, s.direction === P.D_OUTPUT ? this.o.alsaPlayback : this.o.alsaCapture, params);
  }

  suspend(): void {}

  snapshot(): HostStreamState[] {
    return this.o.streams.map(() => null);
  }

  restore(_s: unknown): void {}

  dispose(): void {}
}
