// One NBD client connection (libnbd) driven from our EventLoop, and kept alive across outages.
//
// libnbd starts no threads and calls nothing back: we watch its socket in the direction it asks
// for (nbd_aio_get_direction), tell it when the socket is ready (nbd_aio_notify_read/write), and
// retire finished commands by cookie (nbd_aio_peek_command_completed, nbd_aio_command_completed).
// Many commands are in flight at once; libnbd writes a command to the socket as it is issued when
// the socket takes it, so the socket is watched for writing only while libnbd has bytes queued.
//
// Outages (the server restarts, the network drops): the handle dies and fails its commands in
// flight; those are kept and resent, in their original order, on a new connection. Requests made
// meanwhile wait in the same queue. The connection is retried with backoff (at once, then 100 ms
// doubling to 2 s), each attempt a non-blocking connect and handshake driven by the same loop. A
// request is failed only when the user set a timeout (--nbd-timeout) and the outage outlasts it;
// then every waiting request fails and new ones fail at once until the server is back. One warning
// when an outage starts (and one when a timeout expires), one info line when it ends: never one
// per request or per attempt.
//
// Deadlines (the next attempt, an attempt's own limit, the outage timeout) are plain numbers that
// one loop timer serves, so that drive() — the blocking path a queue being stopped takes — honours
// them too without the loop.
import * as nbd from "../../../ffi/nbd.ts";
import { EIO } from "../../../ffi/libc.ts";
import { EPOLLIN, EPOLLOUT, EPOLLHUP, EPOLLERR } from "../../../ffi/epoll.ts";
import { ioctl } from "../../../ffi/io.ts";
import type { EventLoop, Timer } from "../../../src/event_loop.ts";
import { log } from "../../../src/log.ts";

export const NBD_READ = 0;
export const NBD_WRITE = 1;
export const NBD_FLUSH = 2;
export const NBD_TRIM = 3;
export const NBD_ZERO = 4;
export type NbdOp = typeof NBD_READ | typeof NBD_WRITE | typeof NBD_FLUSH | typeof NBD_TRIM | typeof NBD_ZERO;

const ENOTCONN = 107;
const ETIMEDOUT = 110;

/** Backoff between connection attempts: the first retry at once, then doubling from this... */
const RETRY_FIRST_MS = 100;
/** ...up to this. */
const RETRY_MAX_MS = 2000;
/** One attempt (connect + handshake) gives up after this long (a TCP SYN to a dead host waits minutes). */
const ATTEMPT_LIMIT_MS = 10_000;
/** Most replies read per readable event (the rest wait for the next turn, so other fds get theirs). */
const NOTIFY_BURST = 32;
/** ioctl: bytes waiting to be read on a socket. */
const FIONREAD = 0x541b;
/** drive() blocks at most this long per wait, so it notices its deadlines. */
const DRIVE_SLICE_MS = 50;
/** drive() warns once when it has waited this long (the device is blocked on the server). */
const DRIVE_WARN_MS = 10_000;

export interface CommandOwner {
  /** `result`: 0, or -errno (the server's error, or ETIMEDOUT when --nbd-timeout expired). */
  commandDone(cmd: NbdCommand, result: number): void;
}

/** One NBD command: what to send, and whom to tell. Reused (see NbdConnection.command). */
export class NbdCommand {
  op: NbdOp = NBD_READ;
  offset = 0;
  count = 0;
  /** Host address of the data (reads and writes). */
  buf = 0;
  /** LIBNBD_CMD_FLAG_* bits. */
  flags = 0;
  cookie = 0;
  /** Start order, kept across resends (cookies restart with every connection). */
  seq = 0;
  owner: CommandOwner | null = null;
}

export interface NbdConnectionConfig {
  uri: string;
  /** How long requests wait for a lost server before they fail, in ms; 0: for ever. */
  timeoutMs: number;
  /** After completions delivered from the loop (or drive()): the owners publish them. */
  onBatch(): void;
}

type State = "down" | "connecting" | "ready" | "closed";

/** Creates a handle set up the way every connection here is. */
export function newHandle(): nbd.NbdHandle {
  const h = nbd.create();
  try {
    nbd.setHandleName(h, "vhost-user-blk");
    nbd.setPreadInitialize(h, false);
    // Simple replies: a read's reply is 2 recv calls instead of 4 (see the binding); we use
    // nothing structured replies add (no block status; a read is done or failed as a whole).
    nbd.setRequestStructuredReplies(h, false);
    return h;
  } catch (e) {
    nbd.closeHandle(h);
    throw e;
  }
}

/** Connects and negotiates, blocking; throws libnbd's error (NbdError). */
export function connectBlocking(uri: string): nbd.NbdHandle {
  const h = newHandle();
  try {
    nbd.connectUri(h, uri);
    return h;
  } catch (e) {
    nbd.closeHandle(h);
    throw e;
  }
}

export class NbdConnection {
  private h: nbd.NbdHandle | null;
  private state: State;
  private loop: EventLoop | null = null;
  private fd = -1;
  private interest = 0;
  private readonly inFlight = new Map<number, NbdCommand>();
  /** Commands waiting for a connection (issued during an outage, or resent after one), in order. */
  private waiting: NbdCommand[] = [];
  private readonly spare: NbdCommand[] = [];
  private seq = 0;

  /** When the current outage started (performance.now ms), or -1. */
  private outageSince = -1;
  /** The outage outlasted the timeout: requests fail instead of waiting. */
  private expired = false;
  private attempts = 0;
  private retryAt = 0;
  private attemptDeadline = 0;
  private expireAt = Infinity;
  private timer: Timer | null = null;
  private timerAt = Infinity;
  private lastAttemptError = "";
  /**
   * drive() read the socket since the loop last delivered its events: what epoll reported may be
   * gone, so the next readiness may be stale (see fdEvents).
   */
  private droveSinceEvents = false;
  /** The export's size as the current (or last) connection reported it. */
  size: number;
  /** Connections made after the first (a test and the log read it). */
  reconnects = 0;

  private readonly onFdEvents = (events: number): void => this.fdEvents(events);
  private readonly onTimer = (): void => {
    this.timer = null;
    this.timerAt = Infinity;
    this.tick();
    this.config.onBatch();
  };

  /**
   * `h`: a handle connected in this thread (connectBlocking), or null to start disconnected (the
   * first attempt is made when the connection is attached to a loop, or by drive()).
   */
  constructor(private readonly config: NbdConnectionConfig, h: nbd.NbdHandle | null, size: number) {
    this.h = h;
    this.state = h === null ? "down" : "ready";
    this.size = h === null ? size : nbd.getSize(h);
    if (h === null) this.startOutage("not connected", true);
  }

  get uri(): string {
    return this.config.uri;
  }

  /** Whether a server is connected right now. */
  get connected(): boolean {
    return this.state === "ready";
  }

  /** The live handle, for the export's flags (null during an outage). */
  get handle(): nbd.NbdHandle | null {
    return this.state === "ready" ? this.h : null;
  }

  /** Commands started and not yet completed (in flight or waiting). */
  get pending(): number {
    return this.inFlight.size + this.waiting.length;
  }

  /** Serves the connection from `loop` from now on. */
  attach(loop: EventLoop): void {
    if (this.loop === loop) return;
    if (this.loop !== null) throw new Error(`NBD ${this.uri}: one connection serves one event loop`);
    this.loop = loop;
    if (this.state === "ready" || this.state === "connecting") this.watch();
    this.armTimer();
  }

  /** A command object to fill and start (returned to the pool when it completes). */
  command(owner: CommandOwner): NbdCommand {
    const cmd = this.spare.pop() ?? new NbdCommand();
    cmd.owner = owner;
    cmd.flags = 0;
    cmd.buf = 0;
    return cmd;
  }

  /** Starts `cmd`: sent now if connected; waits during an outage; fails at once once it timed out. */
  start(cmd: NbdCommand): void {
    cmd.seq = this.seq++;
    if (this.state === "ready") this.issue(cmd);
    else if (this.expired || this.state === "closed") this.deliver(cmd, -(this.state === "closed" ? ENOTCONN : ETIMEDOUT));
    else this.waiting.push(cmd);
  }

  /** After a batch of start()s: watch for writability if libnbd could not send everything. */
  flushInterest(): void {
    if (this.state !== "ready") return;
    // Sending may have found the connection dead (and libnbd closed its socket): notice it before
    // touching the fd's registration.
    if (nbd.aioIsDead(this.h!) || nbd.aioIsClosed(this.h!)) this.progress();
    else this.updateInterest();
  }

  /**
   * Blocks, serving the connection (replies, reconnects, timeouts), until `more()` is false:
   * a queue being stopped waits for its requests this way.
   */
  drive(more: () => boolean): void {
    const since = performance.now();
    let warned = false;
    while (more() && this.state !== "closed") {
      if (!warned && performance.now() - since > DRIVE_WARN_MS) {
        warned = true;
        const where = this.h === null ? "no connection" : nbd.connectionState(this.h);
        log.warn(`NBD ${this.uri}: still waiting for ${this.pending} request(s) after ${DRIVE_WARN_MS / 1000} s (${this.state}; libnbd: ${where})`);
      }
      this.tick();
      if (!more()) break;
      const now = performance.now();
      const h = this.h;
      if (h !== null && (this.state === "ready" || this.state === "connecting")) {
        const wait = Math.max(0, Math.min(DRIVE_SLICE_MS, (this.state === "connecting" ? this.attemptDeadline : this.expireAt) - now));
        this.droveSinceEvents = true;
        if (nbd.poll(h, Math.ceil(wait)) < 0) this.lastAttemptError = nbd.lastError("nbd_poll").message;
        this.progress();
      } else {
        const next = Math.min(this.retryAt, this.expireAt);
        Bun.sleepSync(Math.max(1, Math.min(DRIVE_SLICE_MS, next - now)));
      }
      this.config.onBatch();
    }
    if (this.loop !== null) this.armTimer();
  }

  /** Disconnects and fails whatever still waits (the owners drained their queues before). */
  close(): void {
    if (this.state === "closed") return;
    this.timer?.cancel();
    this.timer = null;
    this.dropHandle(true);
    this.state = "closed";
    const left = [...this.inFlight.values(), ...this.waiting];
    this.inFlight.clear();
    this.waiting = [];
    for (const cmd of left) this.deliver(cmd, -ENOTCONN);
  }

  // ---- commands ----

  private issue(cmd: NbdCommand): void {
    const h = this.h!;
    let cookie: number;
    switch (cmd.op) {
      case NBD_READ:
        cookie = nbd.aioPread(h, cmd.buf, cmd.count, cmd.offset, cmd.flags);
        break;
      case NBD_WRITE:
        cookie = nbd.aioPwrite(h, cmd.buf, cmd.count, cmd.offset, cmd.flags);
        break;
      case NBD_FLUSH:
        cookie = nbd.aioFlush(h, cmd.flags);
        break;
      case NBD_TRIM:
        cookie = nbd.aioTrim(h, cmd.count, cmd.offset, cmd.flags);
        break;
      default:
        cookie = nbd.aioZero(h, cmd.count, cmd.offset, cmd.flags);
        break;
    }
    if (cookie > 0) {
      cmd.cookie = cookie;
      this.inFlight.set(cookie, cmd);
      return;
    }
    const e = nbd.lastError("nbd_aio_*");
    if (nbd.aioIsDead(h) || nbd.aioIsClosed(h)) {
      // The connection died under it: it waits for the next one like the commands in flight.
      this.waiting.push(cmd);
      this.lost(e.message);
      return;
    }
    // Refused before anything was sent (out of bounds, misaligned, read-only export...).
    this.deliver(cmd, -(e.errno || EIO));
  }

  private deliver(cmd: NbdCommand, result: number): void {
    const owner = cmd.owner!;
    cmd.owner = null;
    this.spare.push(cmd);
    owner.commandDone(cmd, result);
  }

  /** Retires every finished command. Failed ones are resent when the connection died under them. */
  private reap(): void {
    const h = this.h!;
    let dead = false;
    for (;;) {
      const cookie = nbd.aioPeekCommandCompleted(h);
      if (cookie <= 0) break;
      const r = nbd.aioCommandCompleted(h, cookie);
      const errno = r < 0 ? nbd.lastError("nbd_aio_command_completed").errno : 0;
      const cmd = this.inFlight.get(cookie);
      if (cmd === undefined) continue;
      this.inFlight.delete(cookie);
      if (r === 1) {
        this.deliver(cmd, 0);
        continue;
      }
      if (!dead) dead = nbd.aioIsDead(h) || nbd.aioIsClosed(h);
      if (dead || errno === ENOTCONN) this.waiting.push(cmd);
      else this.deliver(cmd, -(errno || EIO));
    }
  }

  // ---- the socket ----

  private fdEvents(events: number): void {
    const h = this.h;
    if (h === null) return;
    // A drive() since the loop's epoll_wait (a queue stopped by a message earlier in the same batch)
    // may have read what made the socket readable. libnbd told "readable" with nothing to read
    // parks in REPLY.START (its recv gets EAGAIN and it stays there): no longer ready, it queues
    // every later command without sending it, and waits for a reply that never comes. So such a
    // readiness is not passed on; the loop is level-triggered, so a socket that still has
    // something to read (a reply, the server's end) is reported again next turn.
    const stale = this.droveSinceEvents;
    this.droveSinceEvents = false;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR) && !stale) {
      // libnbd reads one reply per notification. Replies already waiting in the socket are read
      // on at once rather than one loop turn each; only while there are bytes to read (FIONREAD):
      // a notification without data would start a reply read that is not there.
      for (let i = 0; i < NOTIFY_BURST; i++) {
        if (nbd.aioNotifyRead(h) < 0) {
          this.lastAttemptError = nbd.lastError("nbd_aio_notify_read").message;
          break;
        }
        if (this.state !== "ready" || this.fd < 0 || nbd.aioInFlight(h) === 0 || !nbd.aioIsReady(h) || !this.readable()) break;
      }
    }
    // Only while libnbd still wants to write: a notification it does not expect moves its state
    // machine on as if the socket were ready (measured: a stray notify_read starts reading a reply).
    if (events & EPOLLOUT && this.h === h && (nbd.aioGetDirection(h) & nbd.LIBNBD_AIO_DIRECTION_WRITE) !== 0) {
      if (nbd.aioNotifyWrite(h) < 0) this.lastAttemptError = nbd.lastError("nbd_aio_notify_write").message;
    }
    this.progress();
    this.config.onBatch();
  }

  /** After libnbd made progress: state changes, finished commands, what to watch next. */
  private progress(): void {
    const h = this.h;
    if (h === null) return;
    if (this.state === "connecting") {
      if (nbd.aioIsReady(h)) this.onConnected();
      else if (nbd.aioIsDead(h) || nbd.aioIsClosed(h)) this.attemptFailed(this.lastAttemptError || nbd.connectionState(h));
      else this.watch(); // a TCP connect may move on to the next address: a new socket
      return;
    }
    if (this.state !== "ready") return;
    this.reap();
    if (nbd.aioIsDead(h) || nbd.aioIsClosed(h)) this.lost(this.lastAttemptError || "the server closed the connection");
    else this.updateInterest();
  }

  private readonly available = new Uint8Array(4);
  private readonly availableView = new DataView(this.available.buffer);

  /** Bytes are waiting on the socket (FIONREAD). */
  private readable(): boolean {
    try {
      ioctl(this.fd, FIONREAD, this.available);
    } catch {
      return false; // the connection's end shows in the next notification
    }
    return this.availableView.getInt32(0, true) > 0;
  }

  private bits(): number {
    const dir = nbd.aioGetDirection(this.h!);
    return (dir & nbd.LIBNBD_AIO_DIRECTION_READ ? EPOLLIN : 0) | (dir & nbd.LIBNBD_AIO_DIRECTION_WRITE ? EPOLLOUT : 0);
  }

  private updateInterest(): void {
    if (this.loop === null || this.fd < 0) return;
    const bits = this.bits();
    if (bits === this.interest) return;
    this.interest = bits;
    this.loop.modify(this.fd, bits);
  }

  /** (Re)registers the handle's current socket: libnbd may replace it while connecting. */
  private watch(): void {
    this.unwatch();
    if (this.loop === null) return;
    const fd = nbd.aioGetFd(this.h!);
    if (fd < 0) return;
    this.fd = fd;
    this.interest = this.bits();
    this.loop.add(fd, this.interest, this.onFdEvents);
  }

  private unwatch(): void {
    if (this.fd >= 0 && this.loop !== null) this.loop.remove(this.fd);
    this.fd = -1;
  }

  private dropHandle(disconnect: boolean): void {
    this.unwatch();
    const h = this.h;
    this.h = null;
    if (h === null) return;
    if (disconnect && nbd.aioIsReady(h)) nbd.aioDisconnect(h);
    nbd.closeHandle(h);
  }

  // ---- outages ----

  private lost(reason: string): void {
    if (this.state !== "ready") return;
    this.reap(); // what finished before the end still counts; the rest is resent
    const resend = [...this.waiting, ...this.inFlight.values()].sort((a, b) => a.seq - b.seq);
    this.inFlight.clear();
    this.waiting = resend;
    this.dropHandle(false);
    this.state = "down";
    this.attempts = 0;
    this.lastAttemptError = "";
    this.startOutage(`lost the connection (${reason})`);
    this.retryAt = performance.now();
    this.armTimer();
  }

  private startOutage(what: string, quiet = false): void {
    if (this.outageSince >= 0) return;
    this.outageSince = performance.now();
    this.expireAt = this.config.timeoutMs > 0 ? this.outageSince + this.config.timeoutMs : Infinity;
    if (quiet) return;
    const limit = this.config.timeoutMs > 0 ? `; requests fail after ${this.config.timeoutMs / 1000} s (--nbd-timeout)` : "; requests wait until it is back (--nbd-timeout to fail them instead)";
    log.warn(`NBD ${this.uri}: ${what}; reconnecting, ${this.pending} request(s) waiting${limit}`);
  }

  /** Runs what is due, then arms the loop's timer for the next deadline. */
  private tick(): void {
    const now = performance.now();
    if (!this.expired && now >= this.expireAt) this.expire();
    if (this.state === "down" && now >= this.retryAt) this.attempt();
    else if (this.state === "connecting" && now >= this.attemptDeadline) this.attemptFailed(`no answer within ${ATTEMPT_LIMIT_MS / 1000} s`);
    if (this.loop !== null) this.armTimer();
  }

  private nextDeadline(): number {
    let at = this.expired ? Infinity : this.expireAt;
    if (this.state === "down") at = Math.min(at, this.retryAt);
    else if (this.state === "connecting") at = Math.min(at, this.attemptDeadline);
    return at;
  }

  private armTimer(): void {
    if (this.loop === null || this.state === "closed") return;
    const at = this.state === "ready" ? Infinity : this.nextDeadline();
    if (at === this.timerAt) return;
    this.timer?.cancel();
    this.timer = null;
    this.timerAt = at;
    if (at !== Infinity) this.timer = this.loop.timer(Math.max(0, (at - performance.now()) * 1000), this.onTimer);
  }

  private attempt(): void {
    this.attempts++;
    let h: nbd.NbdHandle;
    try {
      h = newHandle();
    } catch (e) {
      this.attemptFailed((e as Error).message);
      return;
    }
    this.h = h;
    this.state = "connecting";
    this.attemptDeadline = performance.now() + ATTEMPT_LIMIT_MS;
    try {
      nbd.aioConnectUri(h, this.uri);
    } catch (e) {
      this.attemptFailed((e as Error).message);
      return;
    }
    this.watch();
    this.progress(); // a unix socket may be connected (or refused) already
  }

  private attemptFailed(why: string): void {
    this.dropHandle(false);
    this.state = "down";
    if (why !== this.lastAttemptError) log.debug(`NBD ${this.uri}: connection attempt ${this.attempts} failed: ${why}`);
    this.lastAttemptError = why;
    const delay = this.attempts <= 1 ? RETRY_FIRST_MS : Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** (this.attempts - 1));
    this.retryAt = performance.now() + delay;
    this.armTimer();
  }

  private onConnected(): void {
    const h = this.h!;
    this.state = "ready";
    this.reconnects++;
    const was = this.size;
    this.size = nbd.getSize(h);
    const seconds = ((performance.now() - this.outageSince) / 1000).toFixed(1);
    const resend = this.waiting;
    this.waiting = [];
    const notes: string[] = [];
    if (this.size !== was) notes.push(`the export's size changed from ${was} to ${this.size} bytes`);
    log.info(`NBD ${this.uri}: connected again after ${seconds} s; ${resend.length} request(s) sent${notes.length ? `; ${notes.join("; ")}` : ""}`);
    this.outageSince = -1;
    this.expireAt = Infinity;
    this.expired = false;
    this.attempts = 0;
    this.lastAttemptError = "";
    this.armTimer();
    this.watch();
    for (const cmd of resend) {
      if (this.state !== "ready") this.waiting.push(cmd); // it died again while resending
      else this.issue(cmd);
    }
    if (this.state === "ready") this.updateInterest();
  }

  private expire(): void {
    this.expired = true;
    const failed = this.waiting;
    this.waiting = [];
    log.warn(`NBD ${this.uri}: unreachable for ${this.config.timeoutMs / 1000} s (--nbd-timeout): ${failed.length} waiting request(s) failed; new requests fail until it is back${this.lastAttemptError ? ` (last attempt: ${this.lastAttemptError})` : ""}`);
    for (const cmd of failed) this.deliver(cmd, -ETIMEDOUT);
  }
}
