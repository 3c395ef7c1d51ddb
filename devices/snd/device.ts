// The virtio-snd device (virtio id 25): control queue 0, event queue 1, tx queue 2, rx queue 3,
// all served in the device thread. Streams, jacks, channel maps and controls answer on the
// control queue; PCM chains are held by each prepared stream's engine (host/*.ts) until their
// period is played or captured, so the guest's period interrupts come at the stream's rate. A
// ring that stops gives its held chains back (rewound, so the next owner of the ring serves them
// again) or, when that is impossible, completes them: GET_VRING_BASE's answer is always final.
import { COMMON_FEATURES, type DeviceContext, type VhostUserDevice } from "../../src/device.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { type VirtqueueConfig, type RingPosition } from "../../src/ring.ts";
import type { DescriptorChain } from "../../src/chain.ts";
import type { GuestMemory } from "../../src/memory.ts";
import { WatchedQueue, processQueue } from "../../src/queue_serving.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import { log } from "../../src/log.ts";
import * as P from "./protocol.ts";
import { PcmStream } from "./stream.ts";
import { SndJacks } from "./jacks.ts";
import { SndControls, applyGain } from "./controls.ts";
import { buildChmaps } from "./chmap.ts";
import type { SndOptions } from "./options.ts";
import { SndEventQueue } from "./events.ts";
import { handleControlChain, type ControlTarget } from "./control_queue.ts";
import { completeIo, readTxPcm, xferHead } from "./pcm_io.ts";
import { openHost, type SndHost, type StreamEngine, type HeldBuffer, type EngineContext } from "./host/index.ts";
import { metrics, type Counter } from "../../src/metrics.ts";

export const VIRTIO_ID_SOUND = 25;
export const SND_STATE_VERSION = 1;

interface SndState {
  version: number;
  directions: number[];
  streams: ReturnType<PcmStream["snapshot"]>[];
  jacks: ReturnType<SndJacks["snapshot"]> | null;
  controls: number[] | null;
  host: unknown;
  events: P.SndEvent[];
}

function directionsOf(o: SndOptions): { direction: P.Direction; nid: number }[] {
  const out: { direction: P.Direction; nid: number }[] = [];
  for (const d of [P.D_OUTPUT, P.D_INPUT] as const) {
    const first = o.streams.find((s) => s.direction === d);
    if (first) out.push({ direction: d, nid: first.nid });
  }
  return out;
}

export class SndDevice implements VhostUserDevice, ControlTarget {
  readonly host: SndHost;
  readonly streams: PcmStream[];
  private readonly engines: (StreamEngine | null)[];
  private readonly directions: Uint8Array;
  private jacks: SndJacks | null;
  private controls: SndControls | null;
  private readonly chmaps: P.ChmapInfo[];
  private readonly offered: bigint;
  private acked = 0n;
  readonly errors = new GuestErrorLog("snd");
  private readonly exported: { periods: Counter; xruns: Counter }[] = [];
  private readonly control: WatchedQueue;
  private readonly events: SndEventQueue;
  private readonly tx: WatchedQueue;
  private readonly rx: WatchedQueue;
  private readonly engineCtx: EngineContext;

  constructor(private readonly o: SndOptions, ctx: DeviceContext) {
    this.host = openHost(o);
    this.streams = o.streams.map((s) => new PcmStream(s.id, s.direction, s.nid, this.host.caps(s)));
    this.engines = o.streams.map(() => null);
    this.directions = Uint8Array.from(o.streams.map((s) => s.direction));
    this.jacks = o.jacks ? new SndJacks(directionsOf(o)) : null;
    this.controls = o.controls ? new SndControls(directionsOf(o)) : null;
    this.chmaps = buildChmaps(this.streams.map((s) => ({ nid: s.nid, direction: s.direction, channelsMin: s.caps.channelsMin, channelsMax: s.caps.channelsMax })));
    this.offered = COMMON_FEATURES | (o.controls ? P.VIRTIO_SND_F_CTLS_BIT : 0n);
    const loop = ctx.loop;
    this.control = new WatchedQueue(loop, () => this.serveControl());
    this.events = new SndEventQueue(loop, this.errors);
    this.tx = new WatchedQueue(loop, () => this.serveIo(P.D_OUTPUT));
    this.rx = new WatchedQueue(loop, () => this.serveIo(P.D_INPUT));
    this.engineCtx = {
      loop,
      pcmOf: (b) => {
        const data = readTxPcm(b.chain, b.bytes);
        this.applyGain(b.streamId, data);
        return data;
      },
      complete: (b, latency, data) => this.completeHeld(b, latency, data),
      xrun: () => {},
      flush: () => {
        this.tx.queue?.flush();
        this.rx.queue?.flush();
      },
    };
  }

  // ---- virtio device basics ----

  maxQueues(): number {
    return P.NUM_QUEUES;
  }

  features(): bigint {
    return this.offered;
  }

  ackFeatures(features: bigint): void {
    this.acked = features;
  }

  protocolFeatures(): bigint {
    return 0n;
  }

  private get ctlsOffered(): boolean {
    return (this.offered & P.VIRTIO_SND_F_CTLS_BIT) !== 0n;
  }

  private configBytes(): Uint8Array {
    return P.encodeConfig({ jacks: this.jacks?.count ?? 0, streams: this.streams.length, chmaps: this.chmaps.length, controls: this.controls?.count ?? 0 }, this.ctlsOffered);
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    const c = this.configBytes();
    if (offset < 0 || size < 0 || offset + size > c.length) return null;
    return c.slice(offset, offset + size);
  }

  writeConfig(): boolean {
    return false; // every field is read-only
  }

  // ---- rings ----

  private watched(index: number): WatchedQueue | null {
    switch (index) {
      case P.VQ_CONTROL: return this.control;
      case P.VQ_EVENT: return this.events.ws;
      case P.VQ_TX: return this.tx;
      case P.VQ_RX: return this.rx;
      default: return null;
    }
  }

  startQueue(ring: VirtqueueConfig, mem: GuestMemory): void {
    const ws = this.watched(ring.index);
    if (ws === null) return;
    ws.start(openVirtqueue(mem, ring));
    const dir = ring.index === P.VQ_TX ? P.D_OUTPUT : ring.index === P.VQ_RX ? P.D_INPUT : null;
    if (dir !== null) this.enginesOf(dir).forEach((e) => e.attach());
  }

  stopQueue(index: number): RingPosition | null {
    const ws = this.watched(index);
    if (ws === null) return null;
    const dir = index === P.VQ_TX ? P.D_OUTPUT : index === P.VQ_RX ? P.D_INPUT : null;
    if (dir !== null && ws.queue !== null) this.giveBackHeld(ws.queue, dir);
    return ws.stop();
  }

  private enginesOf(dir: P.Direction): StreamEngine[] {
    return this.engines.filter((e, i): e is StreamEngine => e !== null && this.directions[i] === dir);
  }

  /**
   * Takes every held chain of `dir` back from the engines. They are the ring's latest pops when
   * no chain completed after them: rewound, the next owner of the ring serves them again (nothing
   * lost, nothing played twice). Otherwise they complete now (tx unplayed, rx without data).
   */
  private giveBackHeld(q: Virtqueue, dir: P.Direction): void {
    const held = this.enginesOf(dir).flatMap((e) => e.detach());
    if (held.length === 0) return;
    if (q.inFlight === held.length) {
      try {
        q.rewind(held.length);
        return;
      } catch {
        // fall through: complete them
      }
    }
    log.warn(`snd: queue ${q.index} stopped with ${held.length} held buffers that cannot be rewound; completed now`);
    for (const b of held) completeIo(q, b.chain, P.S_OK, 0, null);
    q.flush();
  }

  // ---- control queue ----

  private serveControl(): void {
    const q = this.control.queue;
    if (q === null) return;
    processQueue(q, (chain) => {
      handleControlChain(q, chain, this, this.errors);
      return true;
    }, undefined, this.control.budget);
  }

  limits(): P.SndLimits {
    const ctls = (this.acked & P.VIRTIO_SND_F_CTLS_BIT) !== 0n && this.controls !== null;
    return { jacks: this.jacks?.count ?? 0, streams: this.streams.length, chmaps: this.chmaps.length, controls: ctls ? this.controls!.count : null };
  }

  execute(r: P.SndRequest, writableBytes: number): Uint8Array {
    switch (r.kind) {
      case "query":
        return this.query(r);
      case "jack_remap": {
        const res = this.jacks!.remap(r.jackId, r.association, r.sequence);
        return this.status(res.status, res.error);
      }
      case "set_params":
        return this.setParams(r);
      case "pcm":
        return this.pcmCommand(r.streamId, r.code);
      case "ctl":
      case "ctl_write":
      case "ctl_tlv": {
        const out = this.controls!.handle(r, writableBytes);
        if (out.error) this.errors.report(`controlq: ${out.error}`);
        if (out.status === P.S_OK && r.kind === "ctl_write") {
          // Linux relays the notification to every mixer in the guest, the writer included.
          this.events.push(out.event ?? P.ctlNotifyEvent(r.controlId, 1 << P.CTL_EVT_MASK_VALUE));
        }
        return out.reply;
      }
    }
  }

  private status(s: P.SndStatus, error?: string): Uint8Array {
    if (error) this.errors.report(`controlq: ${error}`);
    return P.encodeHdr(s);
  }

  private query(r: P.QueryInfo): Uint8Array {
    const items: Uint8Array[] = [];
    for (let i = r.startId; i < r.startId + r.count; i++) {
      switch (r.code) {
        case P.R_JACK_INFO: items.push(P.encodeJackInfo(this.jacks!.info(i))); break;
        case P.R_PCM_INFO: items.push(P.encodePcmInfo(this.streams[i]!.info())); break;
        case P.R_CHMAP_INFO: items.push(P.encodeChmapInfo(this.chmaps[i]!)); break;
        case P.R_CTL_INFO: items.push(P.encodeCtlInfo(this.controls!.info(i), r.size)); break;
      }
    }
    return P.encodeQueryReply(items, r.size);
  }

  private setParams(r: P.PcmSetParams): Uint8Array {
    const s = this.streams[r.streamId]!;
    const res = s.setParams({ bufferBytes: r.bufferBytes, periodBytes: r.periodBytes, features: r.features, channels: r.channels, format: r.format, rate: r.rate });
    if (res.status === P.S_OK) this.closeEngine(r.streamId); // new parameters: PREPARE opens anew
    return this.status(res.status, res.error);
  }

  private pcmCommand(id: number, code: P.PcmCode): Uint8Array {
    const s = this.streams[id]!;
    const before = s.state;
    const res = s.command(code);
    if (res.status !== P.S_OK) return this.status(res.status, res.error);
    switch (code) {
      case P.R_PCM_PREPARE:
        if (this.engines[id] === null) {
          try {
            this.engines[id] = this.host.open(this.o.streams[id]!, s.params!, this.engineCtxFor(id));
          } catch (e) {
            s.state = before;
            log.warn(`snd stream ${id}: cannot open the host side: ${(e as Error).message}`);
            return P.encodeHdr(P.S_IO_ERR);
          }
        }
        break;
      case P.R_PCM_START:
        this.engines[id]?.start();
        break;
      case P.R_PCM_STOP:
        this.engines[id]?.stop();
        break;
      case P.R_PCM_RELEASE:
        this.closeEngine(id);
        break;
    }
    return P.encodeHdr(P.S_OK);
  }

  /** The engine context with this stream's XRUN reporting (only if it negotiated EVT_XRUNS). */
  private engineCtxFor(id: number): EngineContext {
    return {
      ...this.engineCtx,
      xrun: () => {
        this.streamMetrics(id).xruns.inc();
        const p = this.streams[id]!.params;
        if (p !== null && (p.features & (1 << P.PCM_F_EVT_XRUNS)) !== 0) this.events.push({ code: P.EVT_PCM_XRUN, data: id });
      },
    };
  }

  /** Completes what the engine holds (RELEASE semantics) and lets its host side go. */
  private closeEngine(id: number): void {
    const e = this.engines[id];
    if (!e) return;
    this.engines[id] = null;
    e.release();
    e.close();
  }

  // ---- PCM data ----

  private serveIo(dir: P.Direction): void {
    const ws = dir === P.D_OUTPUT ? this.tx : this.rx;
    const q = ws.queue;
    if (q === null) return;
    processQueue(q, (chain) => {
      this.takeIo(q, chain, dir);
      return true;
    }, undefined, ws.budget);
  }

  private takeIo(q: Virtqueue, chain: DescriptorChain, dir: P.Direction): void {
    const head = xferHead(chain);
    const d = dir === P.D_OUTPUT
      ? P.decodeTxXfer(head, chain.readableLen, chain.writableLen, this.directions)
      : P.decodeRxXfer(head, chain.readableLen, chain.writableLen, this.directions);
    if (!d.ok) return this.refuseIo(q, chain, d.error);
    const { streamId, dataBytes } = d.value;
    const s = this.streams[streamId]!;
    const engine = this.engines[streamId];
    if (!s.acceptsIo() || !engine) return this.refuseIo(q, chain, `stream ${streamId}: I/O in state ${s.state}`);
    if (dataBytes > s.params!.bufferBytes) return this.refuseIo(q, chain, `stream ${streamId}: ${dataBytes}-byte buffer, larger than the negotiated ${s.params!.bufferBytes}`);
    engine.push({ chain, streamId, bytes: dataBytes });
  }

  private refuseIo(q: Virtqueue, chain: DescriptorChain, error: string): void {
    this.errors.report(`queue ${q.index}: ${error}`);
    completeIo(q, chain, P.S_BAD_MSG, 0, null);
  }

  private completeHeld(b: HeldBuffer, latencyBytes: number, data: Uint8Array | null): void {
    const q = this.directions[b.streamId] === P.D_OUTPUT ? this.tx.queue : this.rx.queue;
    if (q === null) {
      log.error(`snd stream ${b.streamId}: completion with its ring stopped (dropped)`);
      return;
    }
    if (data !== null) this.applyGain(b.streamId, data);
    completeIo(q, b.chain, P.S_OK, latencyBytes, data);
    this.streamMetrics(b.streamId).periods.inc();
  }

  /** --metrics series of a stream: buffers (periods) played or captured, XRUNs. */
  private streamMetrics(id: number): { periods: Counter; xruns: Counter } {
    return (this.exported[id] ??= {
      periods: metrics().counter("vhost_snd_periods", "PCM buffers (periods) played or captured", { stream: id, direction: this.directions[id] === P.D_OUTPUT ? "output" : "input" }),
      xruns: metrics().counter("vhost_snd_xruns", "Underruns (output) and overruns (input)", { stream: id }),
    });
  }

  private applyGain(id: number, data: Uint8Array): void {
    if (this.controls === null) return;
    const s = this.streams[id]!;
    if (s.params) applyGain(data, s.params.format, this.controls.gain(s.direction));
  }

  // ---- host events: jacks ----

  /** `jack-plug[:ID]`, `jack-unplug[:ID]` (every jack without an id). */
  hostEvent(name: string): void {
    const m = /^jack-(plug|unplug)(?::(\d+))?$/.exec(name);
    if (!m || this.jacks === null) return;
    const ids = m[2] !== undefined ? [Number(m[2])] : this.jacks.jacks.map((j) => j.id);
    for (const id of ids) {
      if (id >= this.jacks.count) continue;
      const e = this.jacks.setConnected(id, m[1] === "plug");
      if (e) this.events.push(e);
    }
  }

  // ---- lifecycle ----

  reset(): void {
    this.engines.forEach((_, i) => this.closeEngine(i));
    for (const s of this.streams) s.reset();
    this.events.reset();
    this.jacks = this.o.jacks ? new SndJacks(directionsOf(this.o)) : null;
    this.controls = this.o.controls ? new SndControls(directionsOf(this.o)) : null;
    this.acked = 0n;
  }

  enterSuspendedState(): void {
    this.host.suspend();
  }

  snapshot(): SndState {
    this.host.suspend();
    return {
      version: SND_STATE_VERSION,
      directions: Array.from(this.directions),
      streams: this.streams.map((s) => s.snapshot()),
      jacks: this.jacks?.snapshot() ?? null,
      controls: this.controls?.snapshot() ?? null,
      host: this.host.snapshot(),
      events: this.events.snapshot(),
    };
  }

  restore(state: unknown, ackedFeatures: bigint): void {
    if (typeof state !== "object" || state === null) throw new Error("snd state is not a map");
    const s = state as Partial<SndState>;
    if (s.version !== SND_STATE_VERSION) throw new Error(`snd state version ${String(s.version)}, this backend reads ${SND_STATE_VERSION}`);
    if (!Array.isArray(s.directions) || s.directions.join() !== Array.from(this.directions).join()) {
      throw new Error(`snd state has streams ${JSON.stringify(s.directions)} (directions), this device ${JSON.stringify(Array.from(this.directions))}`);
    }
    if (!Array.isArray(s.streams) || s.streams.length !== this.streams.length) throw new Error("snd state: stream list does not match");
    // Everything is checked on scratch copies first, so a refused state changes nothing.
    const streams = this.streams.map((cur, i) => {
      const scratch = new PcmStream(cur.id, cur.direction, cur.nid, cur.caps);
      scratch.restore(s.streams![i]);
      return scratch;
    });
    let jacks: SndJacks | null = null;
    if (this.o.jacks) {
      jacks = new SndJacks(directionsOf(this.o));
      jacks.restore(s.jacks);
    } else if (s.jacks !== null) throw new Error("snd state has jacks, this device none");
    let controls: SndControls | null = null;
    if (this.o.controls) {
      controls = new SndControls(directionsOf(this.o));
      controls.restore(s.controls);
    } else if (s.controls !== null) throw new Error("snd state has controls, this device none");
    const events = SndEventQueue.check(s.events);
    this.host.restore(s.host);
    // Apply.
    this.ackFeatures(ackedFeatures);
    this.engines.forEach((_, i) => this.closeEngine(i));
    streams.forEach((scratch, i) => this.streams[i]!.restore(scratch.snapshot()));
    this.jacks = jacks;
    this.controls = controls;
    this.events.restore(events);
    for (const st of this.streams) {
      if (!st.acceptsIo()) continue;
      try {
        const e = this.host.open(this.o.streams[st.id]!, st.params!, this.engineCtxFor(st.id));
        this.engines[st.id] = e;
        e.detach(); // the rings are stopped: the clock starts when the stream's ring does
        if (st.state === "running") e.start();
      } catch (err) {
        log.warn(`snd stream ${st.id}: cannot reopen the host side after restore: ${(err as Error).message}; the stream is back to its parameters`);
        st.state = "params";
      }
    }
  }

  dispose(): void {
    this.engines.forEach((e) => e?.close());
    this.host.dispose();
  }
}
