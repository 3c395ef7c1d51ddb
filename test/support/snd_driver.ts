// The driver side of a virtio-snd device for tests (what Linux's virtio-snd driver does on its
// four rings), over the in-process front-end's Vmm/DriverQueue, plus a backend started as a
// subprocess (`bun app/main.ts device snd ...`) for tests that need their own C environment
// (ALSA_CONFIG_PATH, PULSE_SERVER: Bun's process.env does not reach libasound's getenv).
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { GuestRam, Vmm, DriverQueue } from "./frontend.ts";
import * as P from "../../devices/snd/protocol.ts";

export function u32(b: Uint8Array, off = 0): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off, true);
}

export interface Done {
  id: number;
  len: number;
  at: number;
  status: number;
  latency: number;
  data: Uint8Array;
}

export interface StreamParams {
  bufferBytes: number;
  periodBytes: number;
  features: number;
  channels: number;
  format: number;
  rate: number;
}

/** 48 kHz S16 stereo, 10 ms periods, 4 periods of buffer. */
export const DEFAULT_PARAMS: StreamParams = { bufferBytes: 4 * 1920, periodBytes: 1920, features: 0, channels: 2, format: P.FMT_S16, rate: P.RATE_48000 };

/** Four rings, request helpers, and the tx/rx chains in flight with their buffers. */
export class SndDriver {
  ctrl!: DriverQueue;
  event!: DriverQueue;
  tx!: DriverQueue;
  rx!: DriverQueue;
  /** head → where its status (and, for rx, data) lives. */
  private inflight = new Map<string, { status: number; data: number; bytes: number }>();
  private eventBufs = new Map<number, number>();
  events: P.SndEvent[] = [];

  constructor(readonly vmm: Vmm, readonly ram: GuestRam) {}

  activate(want?: bigint, queueSize = 64): bigint {
    const f = this.vmm.handshake(want).features;
    this.vmm.setMemTable();
    this.vmm.queues = [0, 1, 2, 3].map((i) => new DriverQueue(this.ram, i, queueSize));
    for (const q of this.vmm.queues) this.vmm.startQueue(q);
    this.bind();
    return f;
  }

  /** Names the four rings of vmm.queues (after a test set them up itself). */
  bind(): void {
    [this.ctrl, this.event, this.tx, this.rx] = this.vmm.queues as [DriverQueue, DriverQueue, DriverQueue, DriverQueue];
  }

  put(bytes: Uint8Array): number {
    const gpa = this.ram.alloc(Math.max(1, bytes.length));
    this.ram.bytes(gpa, bytes.length).set(bytes);
    return gpa;
  }

  /** One control request; returns the device-written bytes. */
  async request(req: Uint8Array, replyLen = P.HDR_BYTES, timeoutMs = 5000): Promise<Uint8Array> {
    const reply = this.ram.alloc(Math.max(1, replyLen));
    const bufs: { gpa: number; len: number; write?: boolean }[] = [{ gpa: this.put(req), len: req.length }];
    if (replyLen > 0) bufs.push({ gpa: reply, len: replyLen, write: true });
    this.ctrl.addChain(bufs);
    const [u] = await this.ctrl.waitUsed(1, timeoutMs);
    return this.ram.bytes(reply, u!.len).slice();
  }

  async status(req: Uint8Array): Promise<number> {
    return u32(await this.request(req));
  }

  async setParams(streamId: number, o: Partial<StreamParams> = {}): Promise<number> {
    return this.status(P.encodePcmSetParams({ streamId, ...DEFAULT_PARAMS, ...o }));
  }

  async pcm(code: P.PcmCode, streamId: number): Promise<number> {
    return this.status(P.encodePcmHdr(code, streamId));
  }

  /** One tx chain: header + PCM (indirect: one descriptor in the ring), then a `statusLen`-byte status (0: none). */
  sendTx(streamId: number, pcm: Uint8Array, statusLen = P.PCM_STATUS_BYTES, indirect = false): number {
    const data = new Uint8Array(4 + pcm.length);
    data.set(P.encodePcmXfer(streamId));
    data.set(pcm, 4);
    const status = this.ram.alloc(Math.max(1, statusLen));
    const head = this.tx.addChain([{ gpa: this.put(data), len: data.length }, ...(statusLen > 0 ? [{ gpa: status, len: statusLen, write: true }] : [])], { indirect });
    this.inflight.set(`2/${head}`, { status, data: 0, bytes: 0 });
    return head;
  }

  /** One rx chain: header, then room for `bytes` and the status. */
  postRx(streamId: number, bytes: number): number {
    const buf = this.ram.alloc(bytes + P.PCM_STATUS_BYTES);
    const head = this.rx.addChain([{ gpa: this.put(P.encodePcmXfer(streamId)), len: 4 }, { gpa: buf, len: bytes + P.PCM_STATUS_BYTES, write: true }]);
    this.inflight.set(`3/${head}`, { status: buf + bytes, data: buf, bytes });
    return head;
  }

  /** Completed tx/rx chains since the last call. */
  takeIo(q: DriverQueue): Done[] {
    const now = performance.now();
    return q.takeUsed().map((u) => {
      q.recycle(u.id);
      const key = `${q.index}/${u.id}`;
      const f = this.inflight.get(key)!;
      this.inflight.delete(key);
      const st = u.len >= 8 ? this.ram.bytes(f.status, 8) : new Uint8Array(8);
      return { id: u.id, len: u.len, at: now, status: u32(st), latency: u32(st, 4), data: this.ram.bytes(f.data, Math.max(0, Math.min(f.bytes, u.len - 8))).slice() };
    });
  }

  async waitIo(q: DriverQueue, count: number, timeoutMs = 5000): Promise<Done[]> {
    const got: Done[] = [];
    const deadline = Date.now() + timeoutMs;
    while (got.length < count) {
      got.push(...this.takeIo(q));
      if (got.length >= count) break;
      if (Date.now() > deadline) throw new Error(`queue ${q.index}: ${got.length}/${count} completions after ${timeoutMs} ms`);
      await Bun.sleep(0.5);
    }
    return got;
  }

  /** Posts `n` event buffers. */
  postEvents(n: number): void {
    for (let i = 0; i < n; i++) {
      const gpa = this.ram.alloc(P.EVENT_BYTES);
      this.eventBufs.set(this.event.addChain([{ gpa, len: P.EVENT_BYTES, write: true }]), gpa);
    }
  }

  /** Events delivered so far (each used buffer is posted again). */
  collectEvents(): P.SndEvent[] {
    for (const u of this.event.takeUsed()) {
      this.event.recycle(u.id);
      this.events.push(P.decodeEvent(this.ram.bytes(this.eventBufs.get(u.id)!, 8)));
      this.eventBufs.delete(u.id);
      this.postEvents(1);
    }
    return this.events;
  }

  async waitEvent(pred: (e: P.SndEvent) => boolean, timeoutMs = 3000): Promise<P.SndEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = this.collectEvents().find(pred);
      if (e) return e;
      if (Date.now() > deadline) throw new Error(`no such event; got ${JSON.stringify(this.events)}`);
      await Bun.sleep(1);
    }
  }

  /**
   * Plays `pcm` (a whole number of periods) on `streamId` as Linux does: `inFlight` periods queued
   * before START, then one more per completion. Returns the completions in order.
   */
  async play(streamId: number, pcm: Uint8Array, periodBytes: number, opts: { inFlight?: number; timeoutMs?: number } = {}): Promise<Done[]> {
    const periods = pcm.length / periodBytes;
    const chunk = (i: number) => pcm.subarray(i * periodBytes, (i + 1) * periodBytes);
    let sent = 0;
    for (; sent < Math.min(opts.inFlight ?? 4, periods); sent++) this.sendTx(streamId, chunk(sent));
    const st = await this.pcm(P.R_PCM_START, streamId);
    if (st !== P.S_OK) throw new Error(`PCM_START: status 0x${st.toString(16)}`);
    const done: Done[] = [];
    while (done.length < periods) {
      const got = await this.waitIo(this.tx, 1, opts.timeoutMs ?? 5000);
      done.push(...got);
      for (let i = 0; i < got.length && sent < periods; i++, sent++) this.sendTx(streamId, chunk(sent));
    }
    return done;
  }

  /** Records `periods` periods on `streamId`: `inFlight` rx buffers before START, one more per completion. */
  async record(streamId: number, periods: number, periodBytes: number, opts: { inFlight?: number; timeoutMs?: number } = {}): Promise<Done[]> {
    let posted = 0;
    for (; posted < Math.min(opts.inFlight ?? 4, periods); posted++) this.postRx(streamId, periodBytes);
    const st = await this.pcm(P.R_PCM_START, streamId);
    if (st !== P.S_OK) throw new Error(`PCM_START: status 0x${st.toString(16)}`);
    const done: Done[] = [];
    while (done.length < periods) {
      const got = await this.waitIo(this.rx, 1, opts.timeoutMs ?? 5000);
      done.push(...got);
      for (let i = 0; i < got.length && posted < periods; i++, posted++) this.postRx(streamId, periodBytes);
    }
    return done;
  }
}

const ROOT = join(import.meta.dir, "../..");

/** `backend device snd` as a child process (from the sources), with its own environment. */
export class SndSubprocess {
  readonly proc: Subprocess<"ignore", "pipe", "pipe">;
  private stderrText: Promise<string>;

  constructor(readonly socketPath: string, args: string[], env: Record<string, string>) {
    // --sandbox none: the ALSA declaration (devices/snd/host_access.ts) does not cover what these
    // plugins touch yet (the file plugin's output files, /dev/full for the null PCM, PulseAudio's
    // client files): issue 17. Callers that pass --sandbox themselves decide.
    const sandbox = args.some((a) => a.startsWith("--sandbox")) ? [] : ["--sandbox", "none"];
    this.proc = Bun.spawn([process.execPath, join(ROOT, "app/main.ts"), "device", "snd", "--socket", socketPath, ...sandbox, ...args], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...(process.env as Record<string, string>), ...env },
    });
    this.stderrText = new Response(this.proc.stderr).text();
  }

  /** Waits for the socket (or the process to die, with its stderr). */
  async ready(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!existsSync(this.socketPath)) {
      if (this.proc.exitCode !== null || Date.now() > deadline) {
        this.proc.kill("SIGKILL");
        throw new Error(`snd backend did not listen on ${this.socketPath} (exit ${this.proc.exitCode}): ${await this.stderrText}`);
      }
      await Bun.sleep(10);
    }
  }

  /** SIGTERM (SIGKILL after 3 s); the exit code and stderr. */
  async stop(): Promise<{ code: number | null; stderr: string }> {
    if (this.proc.exitCode === null) {
      this.proc.kill("SIGTERM");
      const t = setTimeout(() => this.proc.kill("SIGKILL"), 3000);
      await this.proc.exited;
      clearTimeout(t);
    }
    return { code: this.proc.exitCode, stderr: await this.stderrText };
  }
}
