// The host ends of a console port: where guest output goes (stdout, a file, a FIFO, syslog) and where
// guest input comes from (stdin, a file, a FIFO, a terminal). Everything is non-blocking or never
// blocks for long (regular files), so the worker's event loop never stalls on a host endpoint.
//
// stdin/stdout are reopened through /proc/self/fd when they are pipes or terminals: the new open
// file description can be made O_NONBLOCK without changing the one the shell shares with us.
//
// Opening and using are apart: the open* functions run in the device's acquire phase (main
// thread, before serving) and return plain data (fds and what to do with them); inputFrom and
// outputFrom build the endpoints from that data in the device thread.
import { toArrayBuffer, type Pointer } from "bun:ffi";
import {
  open, read, write, fstat, fcntl, setNonBlocking, isatty, tcgetattr, tcsetattr, ioctl,
  O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_APPEND, O_NONBLOCK, F_GETFL, F_SETFL,
  S_IFMT, S_IFREG, S_IFBLK, S_IFIFO, type Buf,
} from "../../ffi/io.ts";
import { close, EAGAIN, ENXIO, SysError } from "../../ffi/libc.ts";
import { connectUnixDatagram } from "../../ffi/socket.ts";
import type { WindowSize } from "./config.ts";
import { log } from "../../src/log.ts";

const O_NOCTTY = 0o400;
const TIOCGWINSZ = 0x5413;

/**
 * The parts of struct termios raw input changes (<termios.h>; x86_64 layout: c_iflag@0 c_oflag@4
 * c_cflag@8 c_lflag@12 c_line@16 c_cc[32]@17).
 */
const TERMIOS = {
  C_LFLAG: 12,
  C_CC: 17,
  // c_lflag bits: signal characters, line editing, echo.
  ISIG: 0o1,
  ICANON: 0o2,
  ECHO: 0o10,
  // c_cc slots: the read timer and the minimum byte count.
  VTIME: 5,
  VMIN: 6,
} as const;

/** Where a port's guest input comes from. */
export interface InputSource {
  /** For log messages ("stdin", "/tmp/in.fifo"). */
  readonly what: string;
  readonly fd: number;
  /**
   * True when reads can find nothing yet (pipes, FIFOs, terminals): read on EPOLLIN only. False for
   * regular files and block devices, which are read directly as receive buffers free up.
   */
  readonly pollable: boolean;
  readonly terminal: boolean;
  /** read(2): bytes read, 0 at end of input, -EAGAIN when nothing is there now. */
  read(buf: Uint8Array, len: number): number;
  /** The terminal's size, or null when the input is not a terminal. */
  windowSize(): WindowSize | null;
  /** Restores what we changed (terminal mode, fd flags) and closes what we opened. */
  close(): void;
}

/** Where a port's guest output goes. */
export interface OutputSink {
  readonly what: string;
  /** The fd to wait on with EPOLLOUT after write() returned -EAGAIN. */
  readonly fd: number;
  /** Writes from a Uint8Array or a host address: bytes taken (≥ 1 when len > 0), or -EAGAIN. */
  write(buf: Buf, len: number): number;
  close(): void;
}

export interface FdOwnership {
  /** We opened it and close it. */
  owned: boolean;
  /** File status flags to put back on a shared fd we had to make non-blocking ourselves. */
  restoreFlags: number | null;
}

function fileType(fd: number): number {
  return fstat(fd).mode & S_IFMT;
}

function isDirect(type: number): boolean {
  return type === S_IFREG || type === S_IFBLK;
}

function release(fd: number, own: FdOwnership): void {
  try {
    if (own.restoreFlags !== null) fcntl(fd, F_SETFL, own.restoreFlags);
  } catch {
    /* the fd may be gone already */
  }
  if (own.owned) close(fd);
}

/**
 * A non-blocking fd for inherited stdio `fd`: a fresh open file description through /proc when
 * possible, else the fd itself made non-blocking (its flags restored on close).
 */
function reopenStdio(fd: number, flags: number): { fd: number } & FdOwnership {
  try {
    return { fd: open(`/proc/self/fd/${fd}`, flags | O_NONBLOCK | O_NOCTTY), owned: true, restoreFlags: null };
  } catch {
    // Sockets cannot be reopened (ENXIO).
    const old = fcntl(fd, F_GETFL);
    setNonBlocking(fd);
    return { fd, owned: false, restoreFlags: old };
  }
}

// ---- input ----

class FdInput implements InputSource {
  readonly terminal: boolean;
  private savedTermios: Uint8Array | null = null;
  private readonly winsize = new Uint8Array(8);

  constructor(readonly what: string, readonly fd: number, readonly pollable: boolean, private readonly own: FdOwnership) {
    this.terminal = isatty(fd);
    if (this.terminal) this.makeRaw();
  }

  /**
   * Raw mode as crosvm sets it: no line editing, no echo, no signals from ^C/^Z (they go to the
   * guest). Output processing stays on, so host-side newlines are unaffected.
   */
  private makeRaw(): void {
    const saved = tcgetattr(this.fd);
    const raw = saved.slice();
    const v = new DataView(raw.buffer);
    v.setUint32(TERMIOS.C_LFLAG, v.getUint32(TERMIOS.C_LFLAG, true) & ~(TERMIOS.ICANON | TERMIOS.ECHO | TERMIOS.ISIG), true);
    raw[TERMIOS.C_CC + TERMIOS.VMIN] = 1;
    raw[TERMIOS.C_CC + TERMIOS.VTIME] = 0;
    tcsetattr(this.fd, raw);
    this.savedTermios = saved;
  }

  read(buf: Uint8Array, len: number): number {
    return read(this.fd, buf, len);
  }

  windowSize(): WindowSize | null {
    if (!this.terminal) return null;
    try {
      ioctl(this.fd, TIOCGWINSZ, this.winsize);
    } catch {
      return null;
    }
    const v = new DataView(this.winsize.buffer);
    return { rows: v.getUint16(0, true), cols: v.getUint16(2, true) };
  }

  close(): void {
    if (this.savedTermios !== null) {
      try {
        tcsetattr(this.fd, this.savedTermios);
      } catch (e) {
        log.warn(`${this.what}: could not restore the terminal mode: ${(e as Error).message}`);
      }
      this.savedTermios = null;
    }
    release(this.fd, this.own);
  }
}

/** An input opened in the acquire phase: plain data. */
export interface AcquiredInput {
  what: string;
  fd: number;
  pollable: boolean;
  own: FdOwnership;
}

/** stdin, or null when the process has none (fd 0 closed). */
export function openStdin(): AcquiredInput | null {
  let type: number;
  try {
    type = fileType(0);
  } catch {
    return null;
  }
  if (isDirect(type)) return { what: "stdin", fd: 0, pollable: false, own: { owned: false, restoreFlags: null } };
  const r = reopenStdio(0, O_RDONLY);
  return { what: "stdin", fd: r.fd, pollable: true, own: r };
}

/** A file, FIFO or terminal to read guest input from. Opening a FIFO does not wait for a writer. */
export function openInputFile(path: string): AcquiredInput {
  const fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY);
  try {
    return { what: path, fd, pollable: !isDirect(fileType(fd)), own: { owned: true, restoreFlags: null } };
  } catch (e) {
    close(fd);
    throw e;
  }
}

/** The input endpoint for acquired data (in the device thread: a terminal is put in raw mode here). */
export function inputFrom(a: AcquiredInput): InputSource {
  return new FdInput(a.what, a.fd, a.pollable, a.own);
}

// ---- output ----

class FdOutput implements OutputSink {
  constructor(readonly what: string, readonly fd: number, private readonly own: FdOwnership) {}

  write(buf: Buf, len: number): number {
    return write(this.fd, buf, len);
  }

  close(): void {
    release(this.fd, this.own);
  }
}

/** An output opened in the acquire phase: plain data. */
export type AcquiredOutput =
  | { kind: "fd"; what: string; fd: number; own: FdOwnership }
  | { kind: "syslog"; fd: number; socketPath: string; tag: string };

/** stdout (or stderr, fd 2). */
export function openStdStream(fd: 1 | 2): AcquiredOutput {
  const what = fd === 1 ? "stdout" : "stderr";
  if (isDirect(fileType(fd))) return { kind: "fd", what, fd, own: { owned: false, restoreFlags: null } };
  const r = reopenStdio(fd, O_WRONLY);
  return { kind: "fd", what, fd: r.fd, own: r };
}

/**
 * An output file: appended to, created if missing. A FIFO is opened read-write, which never
 * waits for a reader and never fails for want of one: output stays in the pipe (and then in the
 * guest's ring) until a reader comes.
 */
export function openOutputFile(path: string): AcquiredOutput {
  let fd: number;
  let readWrite = false;
  try {
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK | O_NOCTTY);
  } catch (e) {
    if (!(e instanceof SysError && e.errno === ENXIO)) throw e; // ENXIO: a FIFO without a reader
    fd = open(path, O_RDWR | O_NONBLOCK);
    readWrite = true;
  }
  try {
    if (fileType(fd) === S_IFIFO && !readWrite) {
      close(fd);
      fd = open(path, O_RDWR | O_NONBLOCK);
    }
  } catch (e) {
    close(fd);
    throw e;
  }
  return { kind: "fd", what: path, fd, own: { owned: true, restoreFlags: null } };
}

// ---- syslog ----

const SYSLOG_LINE_MAX = 1024;
const LOG_USER_INFO = (1 << 3) | 6;
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

function syslogTimestamp(d: Date): string {
  const p2 = (n: number) => String(n).padStart(2, "0");
  return `${MONTHS[d.getMonth()]} ${String(d.getDate()).padStart(2, " ")} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
}

/**
 * Guest output as syslog messages, one per line (long lines split at 1 KiB), sent to the syslog
 * socket as glibc's syslog(3) does (RFC 3164 framing). The socket is non-blocking: a message the
 * daemon cannot take yet is held, and the sink reports -EAGAIN until it has gone, which leaves the
 * rest of the guest's output in its ring.
 */
class SyslogOutput implements OutputSink {
  readonly what: string;
  private readonly line = new Uint8Array(SYSLOG_LINE_MAX);
  private lineLen = 0;
  private unsent: Uint8Array | null = null;
  private warned = false;

  constructor(readonly fd: number, socketPath: string, private readonly tag: string) {
    this.what = `syslog (${socketPath})`;
  }

  write(buf: Buf, len: number): number {
    if (len === 0) return 0;
    if (this.unsent !== null) {
      if (!this.send(this.unsent)) return -EAGAIN;
      this.unsent = null;
    }
    const bytes = typeof buf === "number" ? new Uint8Array(toArrayBuffer(buf as unknown as Pointer, 0, len)) : buf.subarray(0, len);
    for (let i = 0; i < len; i++) {
      const b = bytes[i]!;
      if (b !== 10) this.line[this.lineLen++] = b;
      if (b === 10 || this.lineLen === SYSLOG_LINE_MAX) {
        if (!this.flushLine()) return i + 1; // these bytes are ours now; the rest waits
      }
    }
    return len;
  }

  /** Sends the assembled line; false when the socket is full (the message is kept as unsent). */
  private flushLine(): boolean {
    let end = this.lineLen;
    if (end > 0 && this.line[end - 1] === 13) end--; // a guest tty sends \r\n
    this.lineLen = 0;
    if (end === 0) return true;
    const head = Buffer.from(`<${LOG_USER_INFO}>${syslogTimestamp(new Date())} ${this.tag}[${process.pid}]: `);
    const msg = new Uint8Array(head.length + end);
    msg.set(head, 0);
    msg.set(this.line.subarray(0, end), head.length);
    if (this.send(msg)) return true;
    this.unsent = msg;
    return false;
  }

  /** One datagram; true once it is sent or given up on, false when the socket is full. */
  private send(msg: Uint8Array): boolean {
    try {
      return write(this.fd, msg, msg.length) !== -EAGAIN;
    } catch (e) {
      // A restarted daemon refuses the old association; anything else loses this one message.
      if (!this.warned) log.warn(`${this.what}: ${(e as Error).message}; messages are being dropped`);
      this.warned = true;
      return true;
    }
  }

  close(): void {
    if (this.lineLen > 0) this.flushLine();
    close(this.fd);
  }
}

/**
 * A syslog sink; when no syslog daemon listens at `socketPath`, guest output goes to stderr
 * instead (with a warning), rather than nowhere.
 */
export function openSyslog(tag: string, socketPath: string): AcquiredOutput {
  let fd: number;
  try {
    fd = connectUnixDatagram(socketPath);
  } catch (e) {
    log.warn(`syslog: ${(e as Error).message}; guest output goes to stderr instead`);
    return openStdStream(2);
  }
  return { kind: "syslog", fd, socketPath, tag };
}

/** The output endpoint for acquired data (in the device thread). */
export function outputFrom(a: AcquiredOutput): OutputSink {
  return a.kind === "syslog" ? new SyslogOutput(a.fd, a.socketPath, a.tag) : new FdOutput(a.what, a.fd, a.own);
}

/** Gives back what the acquire phase opened, when the device is never created. */
export function releaseAcquired(a: AcquiredInput | AcquiredOutput): void {
  if ("own" in a) release(a.fd, a.own);
  else close(a.fd);
}
