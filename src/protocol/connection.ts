// Message framing over the non-blocking vhost-user socket: reassembles requests from partial reads,
// attaches the fds that arrived with them, and sends replies. Never reads past the message being
// assembled, so fds cannot be attributed to the wrong request.
import { MsgIo } from "../../ffi/socket.ts";
import { close, EAGAIN } from "../../ffi/libc.ts";
import { HEADER_SIZE, MAX_PAYLOAD } from "./constants.ts";
import { decodeHeader, FramingError, type Header } from "./codec.ts";

export interface RawMessage {
  header: Header;
  payload: Uint8Array;
  fds: number[];
}

export class Connection {
  private readonly io = new MsgIo();
  private readonly sendIo = new MsgIo();
  private readonly buf = new Uint8Array(HEADER_SIZE + MAX_PAYLOAD);
  private filled = 0;
  private header: Header | null = null;
  private fds: number[] = [];
  closed = false;

  constructor(readonly fd: number) {}

  /**
   * Reads what is available. Returns the complete messages, or null when the peer closed the
   * connection. Throws FramingError when the stream cannot be trusted any more.
   */
  readMessages(): RawMessage[] | null {
    const out: RawMessage[] = [];
    for (;;) {
      const want = this.header === null ? HEADER_SIZE - this.filled : HEADER_SIZE + this.header.size - this.filled;
      if (want > 0) {
        const r = this.io.recv(this.fd, this.buf, this.filled, want);
        for (const fd of r.fds) this.fds.push(fd);
        if (r.truncated) throw new FramingError("ancillary data truncated (too many fds): message fds lost");
        if (r.n === -EAGAIN) return out;
        if (r.n === 0) {
          if (this.filled > 0) throw new FramingError(`peer closed mid-message (${this.filled} bytes read)`);
          return out.length > 0 ? out : null;
        }
        this.filled += r.n;
      }
      if (this.header === null) {
        if (this.filled < HEADER_SIZE) continue;
        this.header = decodeHeader(this.buf);
      }
      if (this.filled === HEADER_SIZE + this.header.size) {
        out.push({ header: this.header, payload: this.buf.slice(HEADER_SIZE, this.filled), fds: this.fds });
        this.header = null;
        this.fds = [];
        this.filled = 0;
      }
    }
  }

  /** Sends one whole message. A peer that does not read its replies is a broken peer. */
  send(bytes: Uint8Array, fds: readonly number[] = []): void {
    let off = 0;
    let first = true;
    while (off < bytes.length) {
      const chunk = off === 0 ? bytes : bytes.subarray(off);
      const n = this.sendIo.send(this.fd, chunk, chunk.length, first ? fds : []);
      if (n === -EAGAIN) throw new FramingError("peer is not reading: reply would block");
      off += n;
      first = false;
    }
  }

  /** Closes the socket and any fds of a half-received message. */
  dispose(): void {
    for (const fd of this.fds) close(fd);
    this.fds = [];
    if (!this.closed) close(this.fd);
    this.closed = true;
  }
}
