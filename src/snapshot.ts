// The device-state blob of SET_DEVICE_STATE_FD: a versioned CBOR envelope around the device's own
// state, plus the non-blocking pipe transfers that move it. Transfers run on the event loop, so a
// front-end that is slow to drain (or fill) the pipe never blocks the control path.
import { Encoder } from "cbor-x";
import { EPOLLIN, EPOLLOUT } from "../ffi/epoll.ts";
import { read, write, setNonBlocking } from "../ffi/io.ts";
import { close, EAGAIN } from "../ffi/libc.ts";
import type { EventLoop } from "./event_loop.ts";

export const SNAPSHOT_FORMAT_VERSION = 1;
/** A device state larger than this is refused rather than buffered. */
export const MAX_STATE_BYTES = 64 * 1024 * 1024;

export interface Envelope {
  formatVersion: number;
  device: string;
  virtioId: number;
  /** Decimal strings: CBOR integers beyond 2^53 would not survive a JS round trip. */
  ackedFeatures: string;
  ackedProtocolFeatures: string;
  state: unknown;
}

const cbor = new Encoder({ useRecords: false, mapsAsObjects: true });

export function encodeEnvelope(e: Envelope): Uint8Array {
  return cbor.encode(e);
}

/** Decodes and checks an envelope; throws a clear error for anything that is not one of ours. */
export function decodeEnvelope(bytes: Uint8Array, expectDevice: string, expectVirtioId: number): Envelope {
  let e: unknown;
  try {
    e = cbor.decode(bytes.slice()); // copy: decoded byte strings would alias the input buffer
  } catch (err) {
    throw new Error(`device state is not valid CBOR: ${(err as Error).message}`);
  }
  if (typeof e !== "object" || e === null) throw new Error("device state is not a CBOR map");
  const env = e as Record<string, unknown>;
  if (env.formatVersion !== SNAPSHOT_FORMAT_VERSION) {
    throw new Error(`device state format version ${String(env.formatVersion)}, this backend reads ${SNAPSHOT_FORMAT_VERSION}`);
  }
  if (env.device !== expectDevice || env.virtioId !== expectVirtioId) {
    throw new Error(`device state is for device '${String(env.device)}' (virtio id ${String(env.virtioId)}), not '${expectDevice}'`);
  }
  for (const k of ["ackedFeatures", "ackedProtocolFeatures"] as const) {
    if (typeof env[k] !== "string" || !/^[0-9]{1,20}$/.test(env[k] as string)) throw new Error(`device state field ${k} is malformed`);
  }
  if (!("state" in env)) throw new Error("device state has no device section");
  return env as unknown as Envelope;
}

/** One end of a state pipe, pumped by the event loop until done; closed when it ends. */
abstract class PipeTransfer {
  done = false;
  error: string | null = null;

  constructor(protected readonly loop: EventLoop, protected readonly fd: number, events: number) {
    setNonBlocking(fd);
    loop.add(fd, events, () => this.pump());
  }

  /** Moves what can be moved now; returns true once the transfer has ended. */
  abstract pump(): boolean;

  protected finish(error: string | null): true {
    this.error = error;
    this.done = true;
    this.loop.remove(this.fd);
    close(this.fd);
    return true;
  }

  cancel(): void {
    if (!this.done) this.finish("transfer cancelled");
  }
}

/** Writes `data` into a pipe as it drains, then closes it. */
export class StateWriter extends PipeTransfer {
  private off = 0;

  constructor(loop: EventLoop, fd: number, private readonly data: Uint8Array) {
    super(loop, fd, EPOLLOUT);
  }

  pump(): boolean {
    if (this.done) return true;
    try {
      while (this.off < this.data.length) {
        const n = write(this.fd, this.data.subarray(this.off), this.data.length - this.off);
        if (n === -EAGAIN) return false;
        this.off += n;
      }
      return this.finish(null);
    } catch (e) {
      return this.finish(`writing device state: ${(e as Error).message}`);
    }
  }
}

/** Reads a pipe to EOF into memory. */
export class StateReader extends PipeTransfer {
  private chunks: Uint8Array[] = [];
  private total = 0;
  private readonly buf = new Uint8Array(65536);

  constructor(loop: EventLoop, fd: number) {
    super(loop, fd, EPOLLIN);
  }

  pump(): boolean {
    if (this.done) return true;
    try {
      for (;;) {
        const n = read(this.fd, this.buf, this.buf.length);
        if (n === -EAGAIN) return false;
        if (n === 0) return this.finish(null);
        this.total += n;
        if (this.total > MAX_STATE_BYTES) return this.finish(`device state larger than ${MAX_STATE_BYTES} bytes`);
        this.chunks.push(this.buf.slice(0, n));
      }
    } catch (e) {
      return this.finish(`reading device state: ${(e as Error).message}`);
    }
  }

  bytes(): Uint8Array {
    return Buffer.concat(this.chunks, this.total);
  }
}

/**
 * The one device-state transfer a session may have at a time (SET_DEVICE_STATE_FD starts it,
 * CHECK_DEVICE_STATE finishes it).
 */
export class StateTransfer {
  private current: StateWriter | StateReader | null = null;

  constructor(private readonly loop: EventLoop) {}

  /** A transfer was started and has not ended yet. */
  get busy(): boolean {
    return this.current !== null && !this.current.done;
  }

  save(fd: number, blob: Uint8Array): void {
    this.cancel();
    this.current = new StateWriter(this.loop, fd, blob);
  }

  load(fd: number): void {
    this.cancel();
    this.current = new StateReader(this.loop, fd);
  }

  /**
   * Ends the transfer: returns the loaded bytes, or null after a completed save. Throws a clear
   * error when there was none, or it did not complete.
   */
  finish(): Uint8Array | null {
    const t = this.current;
    this.current = null;
    if (t === null) throw new Error("no transfer took place");
    if (t instanceof StateWriter) {
      if (!t.done) {
        t.cancel();
        throw new Error("the front-end did not read the whole state");
      }
      if (t.error) throw new Error(t.error);
      return null;
    }
    if (!t.pump()) {
      t.cancel();
      throw new Error("the state pipe was not closed by the front-end");
    }
    if (t.error) throw new Error(t.error);
    return t.bytes();
  }

  cancel(): void {
    this.current?.cancel();
    this.current = null;
  }
}
