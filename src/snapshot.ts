// The device-state blob of SET_DEVICE_STATE_FD: a versioned CBOR envelope around the device's own
// state, plus the non-blocking pipe transfers that move it. Transfers run on the event loop, so a
// front-end that is slow to drain (or fill) the pipe never blocks the control path.
import { Encoder } from "cbor-x";
import { EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP } from "../ffi/epoll.ts";
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

/** Writes `data` into a pipe as it drains, then closes it. */
export class StateWriter {
  done = false;
  error: string | null = null;
  private off = 0;

  constructor(private readonly loop: EventLoop, private readonly fd: number, private readonly data: Uint8Array) {
    setNonBlocking(fd);
    loop.add(fd, EPOLLOUT, (ev) => this.pump(ev));
  }

  private pump(events: number): void {
    try {
      while (this.off < this.data.length) {
        const n = write(this.fd, this.data.subarray(this.off), this.data.length - this.off);
        if (n === -EAGAIN) return;
        this.off += n;
      }
      this.finish(null);
    } catch (e) {
      this.finish(`writing device state: ${(e as Error).message}`);
    }
    void events;
  }

  private finish(error: string | null): void {
    this.error = error;
    this.done = true;
    this.loop.remove(this.fd);
    close(this.fd);
  }

  cancel(): void {
    if (!this.done) this.finish("transfer cancelled");
  }
}

/** Reads a pipe to EOF into memory. */
export class StateReader {
  done = false;
  error: string | null = null;
  private chunks: Uint8Array[] = [];
  private total = 0;
  private readonly buf = new Uint8Array(65536);

  constructor(private readonly loop: EventLoop, private readonly fd: number) {
    setNonBlocking(fd);
    loop.add(fd, EPOLLIN, (ev) => {
      if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) this.pump();
    });
  }

  /** Reads what is there; returns true once EOF (or an error) ended the transfer. */
  pump(): boolean {
    if (this.done) return true;
    try {
      for (;;) {
        const n = read(this.fd, this.buf, this.buf.length);
        if (n === -EAGAIN) return false;
        if (n === 0) {
          this.finish(null);
          return true;
        }
        this.total += n;
        if (this.total > MAX_STATE_BYTES) {
          this.finish(`device state larger than ${MAX_STATE_BYTES} bytes`);
          return true;
        }
        this.chunks.push(this.buf.slice(0, n));
      }
    } catch (e) {
      this.finish(`reading device state: ${(e as Error).message}`);
      return true;
    }
  }

  bytes(): Uint8Array {
    const out = new Uint8Array(this.total);
    let o = 0;
    for (const c of this.chunks) {
      out.set(c, o);
      o += c.length;
    }
    return out;
  }

  private finish(error: string | null): void {
    this.error = error;
    this.done = true;
    this.loop.remove(this.fd);
    close(this.fd);
  }

  cancel(): void {
    if (!this.done) this.finish("transfer cancelled");
  }
}
