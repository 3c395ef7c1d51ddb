// The socket side of a backend: accepts one front-end at a time on the listening socket, frames
// its messages, runs them through a fresh VhostUserHandler, and sends replies. A framing error or
// a disconnect ends that session only; the device is reset and the next front-end is accepted
// (crosvm exits instead).
import { EPOLLIN, EPOLLHUP, EPOLLERR } from "../ffi/epoll.ts";
import { accept, peerCredentials, type PeerCredentials } from "../ffi/socket.ts";
import { close, EAGAIN, SysError } from "../ffi/libc.ts";
import { setNonBlocking } from "../ffi/io.ts";
import { Connection } from "./protocol/connection.ts";
import { decodeMessage, encodeReply, u64Bytes, FramingError, MessageError, type Message } from "./protocol/codec.ts";
import { reqName, ProtocolFeature } from "./protocol/constants.ts";
import { VhostUserHandler, RequestError, VALUE_REPLIES, errorReply } from "./handler.ts";
import type { EventLoop } from "./event_loop.ts";
import type { VhostUserDevice, DeviceIdentity } from "./device.ts";
import { log } from "./log.ts";
import { guestFaultWakeFd, takeGuestFaults, installGuestFaultHandler } from "./guest_faults.ts";
import { drain } from "../ffi/eventfd.ts";
import { metrics, type Counter } from "./metrics.ts";

/** A send that failed because the front-end closed its end: a disconnect, not an internal error. */
function peerGone(e: unknown): boolean {
  return e instanceof SysError && (e.code === "EPIPE" || e.code === "ECONNRESET");
}

export interface ServerOptions {
  /** The served device's name and virtio id (its definition's), for snapshots. */
  identity: DeviceIdentity;
  /** A listening socket to accept front-ends on... */
  listenFd?: number;
  /** ...or one already-connected socket (the session ends the server). */
  connectedFd?: number;
  /** Called when a connected-fd session ends (there is nothing to accept afterwards). */
  onFinished?: () => void;
  /** Peers allowed to connect (SO_PEERCRED): a peer matching either list is served; none given: anyone. */
  allowUids?: readonly number[];
  allowGids?: readonly number[];
}

/** Why a peer may not connect, or null when it may. */
export function peerRefusal(cred: PeerCredentials, allowUids?: readonly number[], allowGids?: readonly number[]): string | null {
  if ((allowUids === undefined || allowUids.length === 0) && (allowGids === undefined || allowGids.length === 0)) return null;
  if (allowUids?.includes(cred.uid) || allowGids?.includes(cred.gid)) return null;
  return `uid ${cred.uid} gid ${cred.gid} is not in --allow-uid/--allow-gid`;
}

/** The process's counters summed per metric, to tell what one session did. */
function counterTotals(): Map<string, number> {
  return metrics().counterTotals();
}

export class BackendServer {
  private conn: Connection | null = null;
  private handler: VhostUserHandler | null = null;
  sessions = 0;
  private readonly sessionsTotal: Counter = metrics().counter("vhost_sessions", "Front-end sessions accepted");
  private readonly refusedPeers: Counter = metrics().counter("vhost_peers_refused", "Front-ends refused by --allow-uid/--allow-gid");
  private readonly messagesTotal: Counter = metrics().counter("vhost_messages", "vhost-user messages handled");
  private readonly messagesRefused: Counter = metrics().counter("vhost_messages_refused", "vhost-user messages answered with an error");
  private sessionStart = 0;
  private totalsAtStart = new Map<string, number>();
  /** A second front-end is in the backlog while one is served (said once per session). */
  private waitingNoted = false;

  constructor(private readonly loop: EventLoop, readonly device: VhostUserDevice, private readonly opts: ServerOptions) {
    // A fault caught in guest memory (the front-end truncated a file we could not seal). The
    // handler is installed now, before serving, not at the first unsealable region.
    installGuestFaultHandler();
    loop.add(guestFaultWakeFd(), EPOLLIN, () => this.onGuestFault());
    if (opts.listenFd !== undefined) {
      setNonBlocking(opts.listenFd);
      loop.add(opts.listenFd, EPOLLIN, () => this.acceptOne());
    } else if (opts.connectedFd !== undefined) {
      this.startSession(opts.connectedFd);
    } else {
      throw new Error("BackendServer needs a listening or a connected socket");
    }
  }

  /** The current session's handler (for config-change notifications). */
  get current(): VhostUserHandler | null {
    return this.handler;
  }

  private acceptOne(): void {
    const fd = accept(this.opts.listenFd!, true);
    if (fd === -EAGAIN) return;
    let cred: PeerCredentials | null = null;
    try {
      cred = peerCredentials(fd);
    } catch (e) {
      log.debug(`no peer credentials: ${(e as Error).message}`);
    }
    const refusal = cred === null ? peerRefusal({ pid: 0, uid: -1, gid: -1 }, this.opts.allowUids, this.opts.allowGids) : peerRefusal(cred, this.opts.allowUids, this.opts.allowGids);
    if (refusal !== null) {
      this.refusedPeers.inc();
      log.warn(`refused a front-end: ${refusal}`, { pid: cred?.pid, uid: cred?.uid, gid: cred?.gid });
      close(fd);
      return;
    }
    // One front-end at a time: until this session ends, the listening socket is watched only to
    // say once that another front-end is waiting in the backlog.
    this.loop.remove(this.opts.listenFd!);
    this.waitingNoted = false;
    this.loop.add(this.opts.listenFd!, EPOLLIN, () => this.noteWaiting());
    this.startSession(fd, cred);
  }

  private noteWaiting(): void {
    this.loop.remove(this.opts.listenFd!); // level-triggered: watching on would wake for it forever
    if (this.waitingNoted) return;
    this.waitingNoted = true;
    log.info(`another front-end is waiting: it is served when session ${this.sessions} ends (one front-end at a time)`);
  }

  private startSession(fd: number, cred: PeerCredentials | null = null): void {
    setNonBlocking(fd);
    this.sessions++;
    this.sessionsTotal.inc();
    log.session = this.sessions;
    this.sessionStart = performance.now();
    this.totalsAtStart = counterTotals();
    this.conn = new Connection(fd);
    this.handler = new VhostUserHandler(this.device, this.loop, this.opts.identity);
    log.info(`front-end connected (session ${this.sessions})`, cred === null ? {} : { pid: cred.pid, uid: cred.uid, gid: cred.gid });
    this.loop.add(fd, EPOLLIN | EPOLLHUP | EPOLLERR, () => this.onReadable());
  }

  /** What this session did: every counter that moved, by metric (without the vhost_ prefix). */
  private sessionSummary(): Record<string, number | string> {
    const out: Record<string, number | string> = { seconds: Number(((performance.now() - this.sessionStart) / 1000).toFixed(3)) };
    for (const [name, total] of counterTotals()) {
      const delta = total - (this.totalsAtStart.get(name) ?? 0);
      if (delta !== 0 && name !== "vhost_sessions") out[name.replace(/^vhost_/, "")] = delta;
    }
    return out;
  }

  private onReadable(): void {
    const conn = this.conn;
    if (conn === null) return;
    try {
      const messages = conn.readMessages();
      if (messages === null) return this.endSession("front-end disconnected");
      for (const raw of messages) {
        if (this.conn !== conn) {
          for (const fd of raw.fds) close(fd);
          continue;
        }
        this.dispatch(raw.header, raw.payload, raw.fds);
      }
    } catch (e) {
      if (e instanceof FramingError) return this.endSession(`dropping front-end: ${e.message}`, "warn");
      if (peerGone(e)) return this.endSession("front-end disconnected (it closed the connection before our reply)");
      log.error("session failed:", e);
      this.endSession("dropping front-end after an internal error", "error");
    }
  }

  private onGuestFault(): void {
    drain(guestFaultWakeFd());
    const faults = takeGuestFaults();
    if (faults > 0 && this.conn !== null) {
      this.endSession(`dropping front-end: it truncated the file behind a mapped guest memory region (${faults} SIGBUS caught; the lost pages read as zeros until now)`, "warn");
    }
  }

  private dispatch(header: Message["header"], payload: Uint8Array, fds: number[]): void {
    const conn = this.conn!;
    const handler = this.handler!;
    const code = header.code;
    let msg: Message | null = null;
    try {
      this.messagesTotal.inc();
      msg = decodeMessage(header, payload, fds);
      log.debug(`<- ${reqName(code)}`);
      const reply = handler.handle(msg);
      const replyFds = handler.takeReplyFds();
      try {
        if (reply !== null) conn.send(encodeReply(code, reply), replyFds);
        else if (msg.needReply && handler.hasProtocol(ProtocolFeature.REPLY_ACK)) conn.send(encodeReply(code, u64Bytes(0)));
      } finally {
        for (const fd of replyFds) close(fd); // the front-end has its own copy now
      }
    } catch (e) {
      if (e instanceof FramingError || peerGone(e)) throw e;
      if (msg === null) for (const fd of fds) close(fd); // refused before the handler took the fds
      this.messagesRefused.inc();
      const known = e instanceof RequestError || e instanceof MessageError;
      if (known) log.warn(`refused ${reqName(code)}: ${(e as Error).message}`);
      else log.error(`${reqName(code)} failed:`, e);
      const needReply = (header.flags & 0x8) !== 0;
      if (VALUE_REPLIES.has(code)) {
        const reply = errorReply(code, msg ?? undefined);
        // No well-formed error reply exists: a short one would leave the front-end waiting.
        if (reply === null) return this.endSession(`dropping front-end: ${reqName(code)} failed and its reply has no error form`, "warn");
        conn.send(encodeReply(code, reply));
      } else if (needReply && handler.hasProtocol(ProtocolFeature.REPLY_ACK)) conn.send(encodeReply(code, u64Bytes(1)));
    }
  }

  private endSession(reason: string, level: "info" | "warn" | "error" = "info"): void {
    log[level](reason);
    if (this.conn !== null) log.info(`session ${this.sessions} summary`, this.sessionSummary());
    const conn = this.conn;
    if (conn !== null) {
      this.loop.remove(conn.fd);
      conn.dispose();
    }
    try {
      this.handler?.dispose();
    } catch (e) {
      log.error("device reset after disconnect failed:", e);
    }
    this.conn = null;
    this.handler = null;
    log.session = undefined;
    if (this.opts.listenFd !== undefined) {
      this.loop.remove(this.opts.listenFd); // the waiting watch, if still there
      this.loop.add(this.opts.listenFd, EPOLLIN, () => this.acceptOne());
    }
    else this.opts.onFinished?.();
  }

  dispose(): void {
    if (this.conn !== null) this.endSession("shutting down");
    this.loop.remove(guestFaultWakeFd());
    if (this.opts.listenFd !== undefined) {
      this.loop.remove(this.opts.listenFd);
      close(this.opts.listenFd);
    }
  }
}
