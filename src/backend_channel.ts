// The back-end → front-end channel (SET_BACKEND_REQ_FD). We only send notifications that need no
// reply (CONFIG_CHANGE_MSG); whatever the front-end sends back is read and dropped so the socket
// cannot fill up, and the channel closes itself when the front-end closes its end.
import { EPOLLIN } from "../ffi/epoll.ts";
import { read } from "../ffi/io.ts";
import { close, EAGAIN } from "../ffi/libc.ts";
import { MsgIo } from "../ffi/socket.ts";
import { BackendReq, HEADER_SIZE, VERSION } from "./protocol/constants.ts";
import { encodeHeader } from "./protocol/codec.ts";
import type { EventLoop } from "./event_loop.ts";
import { log } from "./log.ts";

export class BackendChannel {
  private readonly io = new MsgIo();
  private readonly sink = new Uint8Array(4096);
  private open = true;

  constructor(private readonly loop: EventLoop, private readonly fd: number) {
    loop.add(fd, EPOLLIN, () => this.drain());
  }

  private drain(): void {
    try {
      for (;;) {
        const n = read(this.fd, this.sink, this.sink.length);
        if (n === -EAGAIN) return;
        if (n === 0) break;
      }
    } catch {
      /* a broken channel is a closed one */
    }
    this.close();
  }

  /** BACKEND_CONFIG_CHANGE_MSG: the front-end re-reads the config space. */
  configChanged(): boolean {
    if (!this.open) return false;
    try {
      return this.io.send(this.fd, encodeHeader(BackendReq.CONFIG_CHANGE_MSG, VERSION, 0), HEADER_SIZE) === HEADER_SIZE;
    } catch (e) {
      log.warn(`config change message failed: ${(e as Error).message}`);
      return false;
    }
  }

  close(): void {
    if (!this.open) return;
    this.open = false;
    this.loop.remove(this.fd);
    close(this.fd);
  }
}
