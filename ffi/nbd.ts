// Thin bindings to libnbd (Debian's libnbd0) through bun:ffi: one function per libnbd call, errors
// thrown as NbdError with libnbd's own message and errno. Nothing here knows about disks or loops.
//
// libnbd is driven from the caller's loop (libnbd(3), "ISSUING ASYNCHRONOUS COMMANDS"): it starts
// no threads; the caller watches nbd_aio_get_fd() in the direction nbd_aio_get_direction() says,
// calls nbd_aio_notify_read/write when it is ready, and retires finished commands by cookie
// (nbd_aio_command_completed). Commands are issued with a NULL completion callback, so libnbd never
// calls into JS.
//
// The completion callback is a struct of three pointers passed BY VALUE, which bun:ffi cannot
// express. The x86-64 System V ABI passes a struct larger than 16 bytes in memory: a 24-byte copy
// on the stack at the call, after the arguments that go in registers, while the remaining integer
// arguments still take the next free registers (rdi, rsi, rdx, rcx, r8, r9). So each aio command
// is declared here with its integer arguments first, padding arguments up to the sixth register,
// then the struct's three words, which land on the stack exactly where the callee reads the struct.
// The words are all zero: NBD_NULL_COMPLETION. Other ABIs pass such structs differently (AArch64
// by reference), so these bindings refuse to load anywhere but x86-64.
import { dlopen, FFIType, type Pointer } from "bun:ffi";
import { LazyLibrary } from "./library.ts";

export const LIBNBD_CMD_FLAG_FUA = 0x01;
export const LIBNBD_CMD_FLAG_NO_HOLE = 0x02;
export const LIBNBD_CMD_FLAG_FAST_ZERO = 0x10;

export const LIBNBD_AIO_DIRECTION_READ = 1;
export const LIBNBD_AIO_DIRECTION_WRITE = 2;

export const LIBNBD_SIZE_MINIMUM = 0;
export const LIBNBD_SIZE_PREFERRED = 1;
export const LIBNBD_SIZE_MAXIMUM = 2;

export const LIBNBD_ALLOW_TRANSPORT_TCP = 0x01;
export const LIBNBD_ALLOW_TRANSPORT_UNIX = 0x02;

/** Soname of the library (package libnbd0). */
export const LIBNBD_SONAME = "libnbd.so.0";

const u64 = FFIType.u64;
const i64 = FFIType.i64_fast;
/** One word of the by-value completion struct, or an unused register before it (always 0). */
const W = FFIType.u64;

function load() {
  if (process.arch !== "x64") throw new Error(`libnbd bindings: by-value callback structs are laid out for x86-64 only (this is ${process.arch})`);
  return dlopen(LIBNBD_SONAME, {
    nbd_create: { args: [], returns: "ptr" },
    nbd_close: { args: ["ptr"], returns: "void" },
    nbd_get_error: { args: [], returns: "cstring" },
    nbd_get_errno: { args: [], returns: "i32" },
    nbd_set_handle_name: { args: ["ptr", "cstring"], returns: "i32" },
    nbd_set_uri_allow_transports: { args: ["ptr", "u32"], returns: "i32" },
    nbd_set_uri_allow_local_file: { args: ["ptr", "bool"], returns: "i32" },
    nbd_set_request_block_size: { args: ["ptr", "bool"], returns: "i32" },
    nbd_set_strict_mode: { args: ["ptr", "u32"], returns: "i32" },
    nbd_set_pread_initialize: { args: ["ptr", "bool"], returns: "i32" },
    nbd_set_request_structured_replies: { args: ["ptr", "bool"], returns: "i32" },
    nbd_poll: { args: ["ptr", "i32"], returns: "i32" },
    nbd_connect_uri: { args: ["ptr", "cstring"], returns: "i32" },
    nbd_aio_connect_uri: { args: ["ptr", "cstring"], returns: "i32" },
    nbd_get_size: { args: ["ptr"], returns: i64 },
    nbd_get_block_size: { args: ["ptr", "i32"], returns: i64 },
    nbd_is_read_only: { args: ["ptr"], returns: "i32" },
    nbd_can_flush: { args: ["ptr"], returns: "i32" },
    nbd_can_fua: { args: ["ptr"], returns: "i32" },
    nbd_can_trim: { args: ["ptr"], returns: "i32" },
    nbd_can_zero: { args: ["ptr"], returns: "i32" },
    nbd_can_fast_zero: { args: ["ptr"], returns: "i32" },
    nbd_can_multi_conn: { args: ["ptr"], returns: "i32" },
    nbd_get_export_name: { args: ["ptr"], returns: "ptr" },
    nbd_aio_get_fd: { args: ["ptr"], returns: "i32" },
    nbd_aio_get_direction: { args: ["ptr"], returns: "u32" },
    nbd_aio_notify_read: { args: ["ptr"], returns: "i32" },
    nbd_aio_notify_write: { args: ["ptr"], returns: "i32" },
    nbd_aio_is_connecting: { args: ["ptr"], returns: "i32" },
    nbd_aio_is_ready: { args: ["ptr"], returns: "i32" },
    nbd_aio_is_processing: { args: ["ptr"], returns: "i32" },
    nbd_aio_is_dead: { args: ["ptr"], returns: "i32" },
    nbd_aio_is_closed: { args: ["ptr"], returns: "i32" },
    nbd_aio_in_flight: { args: ["ptr"], returns: "i32" },
    nbd_aio_command_completed: { args: ["ptr", u64], returns: "i32" },
    nbd_aio_peek_command_completed: { args: ["ptr"], returns: i64 },
    nbd_connection_state: { args: ["ptr"], returns: "cstring" },
    nbd_aio_disconnect: { args: ["ptr", "u32"], returns: "i32" },
    // C: (h, buf, count, offset, completion, flags) → registers h, buf, count, offset, flags, pad; stack: completion.
    nbd_aio_pread: { args: ["ptr", "ptr", u64, u64, "u32", W, W, W, W], returns: i64 },
    nbd_aio_pwrite: { args: ["ptr", "ptr", u64, u64, "u32", W, W, W, W], returns: i64 },
    // C: (h, count, offset, completion, flags) → registers h, count, offset, flags, pad, pad; stack: completion.
    nbd_aio_trim: { args: ["ptr", u64, u64, "u32", W, W, W, W, W], returns: i64 },
    nbd_aio_zero: { args: ["ptr", u64, u64, "u32", W, W, W, W, W], returns: i64 },
    // C: (h, completion, flags) → registers h, flags, pad ×4; stack: completion.
    nbd_aio_flush: { args: ["ptr", "u32", W, W, W, W, W, W, W], returns: i64 },
  });
}

const libnbd = new LazyLibrary(() => load().symbols, `${LIBNBD_SONAME} (install Debian's libnbd0)`);

/** The library, loaded on first use; throws a message saying which package provides it. */
function nbd() {
  return libnbd.get();
}

/** Whether libnbd can be loaded here (null), or why not. */
export function libnbdUnavailable(): string | null {
  return libnbd.unavailable();
}

/** A failed libnbd call: libnbd's message (it names the call) and errno (0 when it set none). */
export class NbdError extends Error {
  constructor(message: string, readonly errno: number) {
    super(message);
    this.name = "NbdError";
  }
}

/** The calling thread's last libnbd error; read right after the failing call. */
export function lastError(call: string): NbdError {
  const n = nbd();
  const message = n.nbd_get_error();
  return new NbdError(message === null || String(message) === "" ? `${call} failed` : String(message), n.nbd_get_errno());
}

function check(ret: number, call: string): number {
  if (ret < 0) throw lastError(call);
  return ret;
}

function cstr(s: string): Buffer {
  return Buffer.from(s + "\0");
}

/** An nbd_handle pointer. */
export type NbdHandle = Pointer;

export function create(): NbdHandle {
  const h = nbd().nbd_create() as NbdHandle | null;
  if (h === null) throw lastError("nbd_create");
  return h;
}

export function closeHandle(h: NbdHandle): void {
  nbd().nbd_close(h);
}

export function setHandleName(h: NbdHandle, name: string): void {
  check(nbd().nbd_set_handle_name(h, cstr(name)), "nbd_set_handle_name");
}

export function setUriAllowTransports(h: NbdHandle, mask: number): void {
  check(nbd().nbd_set_uri_allow_transports(h, mask), "nbd_set_uri_allow_transports");
}

export function setUriAllowLocalFile(h: NbdHandle, allow: boolean): void {
  check(nbd().nbd_set_uri_allow_local_file(h, allow), "nbd_set_uri_allow_local_file");
}

export function setRequestBlockSize(h: NbdHandle, request: boolean): void {
  check(nbd().nbd_set_request_block_size(h, request), "nbd_set_request_block_size");
}

/**
 * Whether libnbd zeroes a read buffer before the read (its default, against servers that send
 * less than asked). Off: the buffer is guest memory or our own bounce buffer, and only a read
 * that succeeded as a whole is reported as done.
 */
export function setPreadInitialize(h: NbdHandle, on: boolean): void {
  check(nbd().nbd_set_pread_initialize(h, on), "nbd_set_pread_initialize");
}

/**
 * Whether the handshake asks for structured replies (libnbd's default). Off, a read's reply is
 * a 16-byte header and the data, which libnbd reads in 2 recv calls; a structured one (header,
 * the rest of the larger header, the chunk's offset, the data) takes 4. Needed only for block
 * status and for reads the server answers in pieces (holes, partial errors).
 */
export function setRequestStructuredReplies(h: NbdHandle, request: boolean): void {
  check(nbd().nbd_set_request_structured_replies(h, request), "nbd_set_request_structured_replies");
}

/**
 * Waits up to `timeoutMs` for the handle's fd in the direction libnbd wants and notifies it:
 * 1 progress, 0 timed out, -1 failed (lastError; the connection may be dead). Blocking: only for
 * the places that must block (draining a queue that is being stopped).
 */
export function poll(h: NbdHandle, timeoutMs: number): number {
  return nbd().nbd_poll(h, timeoutMs);
}

/** Blocking connect and handshake (used once, before serving). */
export function connectUri(h: NbdHandle, uri: string): void {
  check(nbd().nbd_connect_uri(h, cstr(uri)), "nbd_connect_uri");
}

/** Starts a non-blocking connect; the caller drives it with the fd and notify calls. */
export function aioConnectUri(h: NbdHandle, uri: string): void {
  check(nbd().nbd_aio_connect_uri(h, cstr(uri)), "nbd_aio_connect_uri");
}

export function getSize(h: NbdHandle): number {
  return check(Number(nbd().nbd_get_size(h)), "nbd_get_size");
}

/** One of the LIBNBD_SIZE_* constraints; 0 when the server advertised none. */
export function getBlockSize(h: NbdHandle, which: number): number {
  return check(Number(nbd().nbd_get_block_size(h, which)), "nbd_get_block_size");
}

/** The export's flags as libnbd names their getters (all take the handle, return 1, 0 or -1). */
export type NbdExportFlag =
  | "nbd_is_read_only" | "nbd_can_flush" | "nbd_can_fua" | "nbd_can_trim" | "nbd_can_zero" | "nbd_can_fast_zero"
  | "nbd_can_multi_conn";

/** Whether the connected server advertised `flag` for the export. */
export function exportFlag(h: NbdHandle, flag: NbdExportFlag): boolean {
  return check(nbd()[flag](h), flag) === 1;
}

/** The socket libnbd uses, or -1 when there is none (not connected, dead, closed). */
export function aioGetFd(h: NbdHandle): number {
  return nbd().nbd_aio_get_fd(h);
}

/** LIBNBD_AIO_DIRECTION_* bits: what libnbd waits for on the fd. */
export function aioGetDirection(h: NbdHandle): number {
  return nbd().nbd_aio_get_direction(h);
}

/** The fd is readable; returns -1 (with lastError) when the state machine failed (connection dead). */
export function aioNotifyRead(h: NbdHandle): number {
  return nbd().nbd_aio_notify_read(h);
}

export function aioNotifyWrite(h: NbdHandle): number {
  return nbd().nbd_aio_notify_write(h);
}

export function aioIsConnecting(h: NbdHandle): boolean {
  return nbd().nbd_aio_is_connecting(h) === 1;
}
export function aioIsReady(h: NbdHandle): boolean {
  return nbd().nbd_aio_is_ready(h) === 1;
}
export function aioIsProcessing(h: NbdHandle): boolean {
  return nbd().nbd_aio_is_processing(h) === 1;
}
export function aioIsDead(h: NbdHandle): boolean {
  return nbd().nbd_aio_is_dead(h) === 1;
}
export function aioIsClosed(h: NbdHandle): boolean {
  return nbd().nbd_aio_is_closed(h) === 1;
}
export function aioInFlight(h: NbdHandle): number {
  return nbd().nbd_aio_in_flight(h);
}

export function connectionState(h: NbdHandle): string {
  const s = nbd().nbd_connection_state(h);
  return s === null ? "unknown" : String(s);
}

/**
 * Retires a command: 1 done, 0 still in flight, -1 failed (lastError() has its errno; the command
 * is retired all the same).
 */
export function aioCommandCompleted(h: NbdHandle, cookie: number): number {
  return nbd().nbd_aio_command_completed(h, cookie);
}

/** The cookie of a finished command not yet retired, 0 when commands are in flight but none finished, -1 when none are in flight. */
export function aioPeekCommandCompleted(h: NbdHandle): number {
  return Number(nbd().nbd_aio_peek_command_completed(h));
}

/** Each aio command returns its cookie (> 0), or -1 (lastError) when it could not be queued. */
export function aioPread(h: NbdHandle, buf: number, count: number, offset: number, flags: number): number {
  return Number(nbd().nbd_aio_pread(h, buf as unknown as Pointer, count, offset, flags, 0, 0, 0, 0));
}

export function aioPwrite(h: NbdHandle, buf: number, count: number, offset: number, flags: number): number {
  return Number(nbd().nbd_aio_pwrite(h, buf as unknown as Pointer, count, offset, flags, 0, 0, 0, 0));
}

export function aioTrim(h: NbdHandle, count: number, offset: number, flags: number): number {
  return Number(nbd().nbd_aio_trim(h, count, offset, flags, 0, 0, 0, 0, 0));
}

export function aioZero(h: NbdHandle, count: number, offset: number, flags: number): number {
  return Number(nbd().nbd_aio_zero(h, count, offset, flags, 0, 0, 0, 0, 0));
}

export function aioFlush(h: NbdHandle, flags: number): number {
  return Number(nbd().nbd_aio_flush(h, flags, 0, 0, 0, 0, 0, 0, 0));
}

/** Queues NBD_CMD_DISC (the server ends the session after the commands before it); does not wait. */
export function aioDisconnect(h: NbdHandle): number {
  return nbd().nbd_aio_disconnect(h, 0);
}
