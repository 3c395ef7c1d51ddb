// One console port: its host input source and output sink, its receive and transmit queues, and
// the input that is waiting for receive buffers.
//
// Output is never lost to a slow sink: when the sink would block, the chain being written goes back
// to the ring (undoPop) and `txSkip` remembers how much of it already went out; the rest of the ring
// waits until the sink is writable again. Input that arrives while the guest has no receive buffer
// posted (or has not opened the port) waits in `pending`, up to PENDING_INPUT_CAP; past that the
// port stops reading its source, so the kernel (pipe, terminal) holds the rest.
import { metrics, type Counter } from "../../src/metrics.ts";
import { EPOLLIN } from "../../ffi/epoll.ts";
import { EAGAIN, SysError } from "../../ffi/libc.ts";
import type { Buf } from "../../ffi/io.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import type { DescriptorChain } from "../../src/chain.ts";
import type { RingPosition } from "../../src/ring.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { QueuePair, processQueue, fillQueue } from "../../src/queue_serving.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import { log } from "../../src/log.ts";
import { ByteQueue } from "./byte_queue.ts";
import type { InputSource, OutputSink } from "./host_io.ts";

/** Input held for the guest per port; also the most a restored state may carry. */
export const PENDING_INPUT_CAP = 1 << 20;
/** Emergency-write bytes (EMERG_WRITE) held while the sink is busy. */
export const HOST_OUTPUT_CAP = 4096;
const READ_CHUNK = 65536;
/** Sources that never block (regular files) are read ahead this far, not to the cap. */
const READ_AHEAD = 65536;

/** A port's part of the device state: plain data. */
export interface PortState {
  /** Host input read but not yet delivered to the guest. */
  pendingInput: Uint8Array;
  /** The driver acknowledged PORT_ADD (multiport). */
  guestReady: boolean;
  /** A guest program has the port open (multiport): input is delivered only then. */
  guestOpen: boolean;
  /** Bytes of the transmit chain at the head of the ring that already reached the sink. */
  txSkip: number;
  /** Emergency-write bytes not yet written to the sink. */
  hostOutput: Uint8Array;
}

export class ConsolePort {
  private readonly queues: QueuePair;
  readonly pending = new ByteQueue();
  private readonly hostOutput = new ByteQueue();
  private txSkip = 0;
  guestReady = false;
  guestOpen = false;
  /** With MULTIPORT the driver drops data for ports no program has open: hold input until then. */
  gated = false;
  private inputEnded: boolean;
  private inputWatched = false;
  /** The input is read directly (it never blocks, or epoll refuses it: EPERM for /dev/null). */
  private inputDirect = false;
  private waitingWritable = false;
  private outputBroken = false;
  private readonly guestErrors: GuestErrorLog;
  private readonly scratch = new Uint8Array(READ_CHUNK);
  private readonly label: string;
  /** --metrics: bytes host → guest ("in") and guest → host ("out"). */
  private readonly bytesIn: Counter;
  private readonly bytesOut: Counter;

  constructor(
    readonly id: number,
    readonly name: string | null,
    private readonly loop: EventLoop,
    readonly input: InputSource | null,
    private readonly output: OutputSink | null,
  ) {
    this.label = `console port ${id}${name !== null ? ` (${name})` : ""}`;
    this.queues = new QueuePair(loop, () => this.deliver(), () => this.drainOutput());
    this.guestErrors = new GuestErrorLog(this.label);
    this.bytesIn = metrics().counter("vhost_console_bytes", "Bytes through a console port: in (host to guest), out (guest to host)", { port: id, direction: "in" });
    this.bytesOut = metrics().counter("vhost_console_bytes", "Bytes through a console port: in (host to guest), out (guest to host)", { port: id, direction: "out" });
    this.inputEnded = input === null;
  }

  /** Port 0 is the console (hvc0); the others are generic ports (/dev/vportNpM). */
  get isConsole(): boolean {
    return this.id === 0;
  }

  /** Starts reading the host input; called once the event loop runs. */
  startInput(): void {
    const input = this.input;
    if (input === null || this.inputEnded) return;
    this.inputDirect = !input.pollable;
    if (input.pollable) {
      try {
        this.loop.add(input.fd, EPOLLIN, () => this.onReadable());
        this.inputWatched = true;
      } catch (e) {
        if (!(e instanceof SysError && e.errno === 1 /* EPERM: never blocks */)) throw e;
        this.inputDirect = true;
      }
    }
    if (this.inputDirect) this.deliver();
  }

  // ---- input: host → guest ----

  private endInput(why: string): void {
    if (this.inputEnded) return;
    log.info(`${this.label}: input ${why}; the port stays up`);
    this.inputEnded = true;
    if (this.inputWatched) this.loop.remove(this.input!.fd);
    this.inputWatched = false;
  }

  /** Reads `max` bytes at most into `pending`; false when the source has nothing more now. */
  private readSome(max: number): boolean {
    const n = this.readInput(Math.min(max, READ_CHUNK));
    if (n <= 0) return false;
    this.pending.push(this.scratch.subarray(0, n));
    return true;
  }

  private readInput(len: number): number {
    try {
      const n = this.input!.read(this.scratch, len);
      if (n === 0) this.endInput("reached end of file");
      else if (n > 0) this.bytesIn.inc(n);
      return n;
    } catch (e) {
      this.endInput(`failed (${(e as Error).message})`);
      return 0;
    }
  }

  private onReadable(): void {
    while (!this.inputEnded && this.pending.length < PENDING_INPUT_CAP) {
      if (!this.readSome(PENDING_INPUT_CAP - this.pending.length)) break;
    }
    if (this.pending.length >= PENDING_INPUT_CAP) this.watchInput(false);
    this.deliver();
  }

  /** Pauses or resumes reading a pollable source (back-pressure while `pending` is full). */
  private watchInput(on: boolean): void {
    if (on === this.inputWatched || this.inputEnded || this.inputDirect || this.input === null) return;
    if (on) this.loop.add(this.input.fd, EPOLLIN, () => this.onReadable());
    else this.loop.remove(this.input.fd);
    this.inputWatched = on;
  }

  private canReceive(): boolean {
    return !this.gated || this.guestOpen;
  }

  /** Moves pending input into the receive queue's buffers, as far as buffers go. */
  deliver(): void {
    const q = this.queues.rx.queue;
    if (q !== null && this.canReceive()) fillQueue(q, () => this.hasInput(), (chain) => this.fillChain(q, chain));
    if (this.pending.length < PENDING_INPUT_CAP / 2) this.watchInput(true);
  }

  /** Input is waiting (a source that never blocks is read ahead here, a bounded amount). */
  private hasInput(): boolean {
    if (this.inputDirect) {
      while (!this.inputEnded && this.pending.length < READ_AHEAD && this.readSome(READ_AHEAD)) {
        /* read ahead */
      }
    }
    return this.pending.length > 0;
  }

  private fillChain(q: Virtqueue, chain: DescriptorChain): boolean {
    if (chain.writableLen === 0) {
      this.guestError(`receive queue: chain ${chain.head} has no device-writable buffer; completed empty`);
      q.add(chain.head, 0);
      return true;
    }
    q.add(chain.head, this.pending.drainInto(chain));
    return true;
  }

  // ---- output: guest → host ----

  /** Writes to the sink; a sink that failed (EPIPE, EIO...) takes everything and drops it. */
  private sinkWrite(buf: Buf, len: number): number {
    if (this.output === null || this.outputBroken || len === 0) return len;
    try {
      const n = this.output.write(buf, len);
      if (n > 0) this.bytesOut.inc(n);
      return n === 0 ? -EAGAIN : n;
    } catch (e) {
      log.warn(`${this.label}: writing to ${this.output.what} failed (${(e as Error).message}); guest output is dropped from now on`);
      this.outputBroken = true;
      return len;
    }
  }

  /**
   * Writes the chain's readable bytes from `txSkip` on, as far as the sink and the turn's budget
   * allow; on "blocked" or "budget", txSkip says how far it got.
   */
  private writeChain(chain: DescriptorChain): "done" | "blocked" | "budget" {
    const budget = this.queues.tx.budget;
    let skip = this.txSkip;
    let pos = 0;
    for (const seg of chain.readable) {
      if (skip >= seg.len) {
        skip -= seg.len;
        pos += seg.len;
        continue;
      }
      // seg.addr..+len was checked against the memory table when the chain was walked.
      let off = skip;
      skip = 0;
      while (off < seg.len) {
        const allowed = budget.bytesLeft();
        if (allowed === 0) {
          this.txSkip = pos + off;
          return "budget";
        }
        const n = this.sinkWrite(seg.addr + off, Math.min(seg.len - off, allowed));
        if (n === -EAGAIN) {
          this.txSkip = pos + off;
          return "blocked";
        }
        budget.spendBytes(n);
        off += n;
      }
      pos += seg.len;
    }
    return "done";
  }

  /** Writes held emergency bytes; false when the sink is full. */
  private flushHostOutput(): boolean {
    while (this.hostOutput.length > 0) {
      const front = this.hostOutput.front();
      const n = this.sinkWrite(front, front.length);
      if (n === -EAGAIN) return false;
      this.hostOutput.consume(n);
    }
    return true;
  }

  /** Moves guest output to the sink until the ring is empty or the sink is full. */
  drainOutput(): void {
    if (this.waitingWritable) return;
    // Emergency bytes go out between chains, never inside one.
    if (this.txSkip === 0 && !this.flushHostOutput()) return this.waitWritable();
    const q = this.queues.tx.queue;
    if (q === null) return;
    let stop: "blocked" | "budget" | null = null;
    processQueue(q, (chain) => {
      const r = this.writeChain(chain);
      if (r !== "done") {
        // Back to the ring: the chain is popped again (and skipped up to txSkip) once writable,
        // or in the next turn.
        q.undoPop();
        stop = r;
        return false;
      }
      this.txSkip = 0;
      q.add(chain.head, 0);
      return true;
    }, undefined, this.queues.tx.budget);
    if (stop === "blocked") this.waitWritable();
    else if (stop === "budget") this.queues.tx.budget.yieldTurn();
  }

  private waitWritable(): void {
    const fd = this.output!.fd;
    this.waitingWritable = true;
    try {
      this.loop.watch(fd, {
        writable: () => {
          this.loop.remove(fd);
          this.waitingWritable = false;
          this.drainOutput();
        },
      });
    } catch (e) {
      log.warn(`${this.label}: cannot wait for ${this.output!.what} (${(e as Error).message}); guest output is dropped from now on`);
      this.waitingWritable = false;
      this.outputBroken = true;
      this.loop.defer(() => this.drainOutput());
    }
  }

  /** A byte the driver wrote to emerg_wr. */
  emergencyWrite(byte: number): void {
    if (this.hostOutput.length >= HOST_OUTPUT_CAP) {
      this.guestError("emergency write while the output is full; byte dropped");
      return;
    }
    this.hostOutput.push(Uint8Array.of(byte));
    this.loop.defer(() => this.drainOutput());
  }

  // ---- queues ----

  /** Serves ring `q` as this port's receive (even index) or transmit (odd) queue. */
  startQueue(q: Virtqueue): void {
    this.queues.member(q.index).start(q);
  }

  /** Nothing is held across event-loop turns, so there is never an in-flight chain to finish. */
  stopQueue(index: number): RingPosition | null {
    return this.queues.member(index).stop();
  }

  /** Device reset: the guest's view of the port is gone; host input and output are kept. */
  reset(): void {
    this.guestReady = false;
    this.guestOpen = false;
    this.gated = false;
    this.txSkip = 0;
  }

  private guestError(message: string): void {
    this.guestErrors.report(message);
  }

  // ---- state ----

  snapshot(): PortState {
    return {
      pendingInput: this.pending.toBytes(),
      guestReady: this.guestReady,
      guestOpen: this.guestOpen,
      txSkip: this.txSkip,
      hostOutput: this.hostOutput.toBytes(),
    };
  }

  /** Throws if `s` is not a port state this port can take. */
  static check(s: unknown, what: string): PortState {
    if (typeof s !== "object" || s === null) throw new Error(`${what} is not a map`);
    const p = s as Record<string, unknown>;
    if (!(p.pendingInput instanceof Uint8Array) || p.pendingInput.length > PENDING_INPUT_CAP) {
      throw new Error(`${what}.pendingInput is not a byte string of at most ${PENDING_INPUT_CAP} bytes`);
    }
    if (!(p.hostOutput instanceof Uint8Array) || p.hostOutput.length > HOST_OUTPUT_CAP) {
      throw new Error(`${what}.hostOutput is not a byte string of at most ${HOST_OUTPUT_CAP} bytes`);
    }
    if (typeof p.guestReady !== "boolean" || typeof p.guestOpen !== "boolean") throw new Error(`${what}: guestReady/guestOpen are not booleans`);
    if (typeof p.txSkip !== "number" || !Number.isInteger(p.txSkip) || p.txSkip < 0 || p.txSkip > 0xffff_ffff) {
      throw new Error(`${what}.txSkip is not an integer in 0..2^32-1`);
    }
    return p as unknown as PortState;
  }

  /** Applies a checked state. Restored input goes before any input this process has read since. */
  restore(s: PortState): void {
    this.pending.unshift(s.pendingInput);
    this.hostOutput.unshift(s.hostOutput);
    this.guestReady = s.guestReady;
    this.guestOpen = s.guestOpen;
    this.txSkip = s.txSkip;
    if (this.pending.length >= PENDING_INPUT_CAP) this.watchInput(false);
  }

  /** Process exit: stops watching host fds, restores the terminal, closes what we opened. */
  dispose(): void {
    this.queues.stop();
    if (this.inputWatched) this.loop.remove(this.input!.fd);
    this.inputWatched = false;
    if (this.waitingWritable) this.loop.remove(this.output!.fd);
    this.waitingWritable = false;
    this.input?.close();
    this.output?.close();
  }
}
