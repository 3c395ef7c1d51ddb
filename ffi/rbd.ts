// Thin bindings to librados and librbd (Debian's librados2 and librbd1) through bun:ffi: one
// function per library call, failures thrown as RbdError with the call's name and errno. Nothing
// here knows about disks or loops.
//
// librbd runs its I/O on its own threads. Asynchronous calls take a completion made with a NULL
// callback (rbd_aio_create_completion), so librbd never calls into JS; once the image has an
// eventfd (rbd_set_image_notification, RBD_EVENT_TYPE_EVENTFD), every completion of an rbd_aio_*
// call made after that is queued on the image and the eventfd is signalled; the caller's loop
// collects them with rbd_poll_io_events and reads each one's argument and result.
import { dlopen, FFIType, ptr, type Pointer } from "bun:ffi";
import { LazyLibrary } from "./library.ts";

export const LIBRBD_SONAME = "librbd.so.1";
export const LIBRADOS_SONAME = "librados.so.2";

/** rbd_set_image_notification's types (librbd.h's EVENT_TYPE_PIPE, EVENT_TYPE_EVENTFD). */
export const RBD_EVENT_TYPE_PIPE = 1;
export const RBD_EVENT_TYPE_EVENTFD = 2;

/** rbd_aio_write_zeroes zero_flags: allocate the range (write zeroes) instead of deallocating it (librbd.h). */
export const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1;

/** rbd_get_features bits (librbd/Features.h). */
export const RBD_FEATURE_LAYERING = 1n << 0n;
export const RBD_FEATURE_EXCLUSIVE_LOCK = 1n << 2n;
export const RBD_FEATURE_OBJECT_MAP = 1n << 3n;
export const RBD_FEATURE_FAST_DIFF = 1n << 4n;
export const RBD_FEATURE_DEEP_FLATTEN = 1n << 5n;
export const RBD_FEATURE_JOURNALING = 1n << 6n;

const u64 = FFIType.u64;
const i64 = FFIType.i64_fast;

function loadRados() {
  return dlopen(LIBRADOS_SONAME, {
    rados_create2: { args: ["ptr", "cstring", "cstring", u64], returns: "i32" },
    rados_conf_read_file: { args: ["ptr", "ptr"], returns: "i32" },
    rados_conf_set: { args: ["ptr", "cstring", "cstring"], returns: "i32" },
    rados_conf_get: { args: ["ptr", "cstring", "ptr", u64], returns: "i32" },
    rados_connect: { args: ["ptr"], returns: "i32" },
    rados_shutdown: { args: ["ptr"], returns: "void" },
    rados_pool_lookup: { args: ["ptr", "cstring"], returns: i64 },
    rados_ioctx_create: { args: ["ptr", "cstring", "ptr"], returns: "i32" },
    rados_ioctx_set_namespace: { args: ["ptr", "ptr"], returns: "void" },
    rados_ioctx_destroy: { args: ["ptr"], returns: "void" },
  });
}

function loadRbd() {
  return dlopen(LIBRBD_SONAME, {
    rbd_open: { args: ["ptr", "cstring", "ptr", "ptr"], returns: "i32" },
    rbd_open_read_only: { args: ["ptr", "cstring", "ptr", "ptr"], returns: "i32" },
    rbd_close: { args: ["ptr"], returns: "i32" },
    rbd_get_size: { args: ["ptr", "ptr"], returns: "i32" },
    rbd_get_features: { args: ["ptr", "ptr"], returns: "i32" },
    rbd_stat: { args: ["ptr", "ptr", u64], returns: "i32" },
    rbd_get_id: { args: ["ptr", "ptr", u64], returns: "i32" },
    rbd_aio_create_completion: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
    rbd_aio_get_arg: { args: ["ptr"], returns: FFIType.u64_fast },
    rbd_aio_get_return_value: { args: ["ptr"], returns: i64 },
    rbd_aio_release: { args: ["ptr"], returns: "void" },
    rbd_aio_readv: { args: ["ptr", "ptr", "i32", u64, "ptr"], returns: "i32" },
    rbd_aio_writev: { args: ["ptr", "ptr", "i32", u64, "ptr"], returns: "i32" },
    rbd_aio_flush: { args: ["ptr", "ptr"], returns: "i32" },
    rbd_aio_discard: { args: ["ptr", u64, u64, "ptr"], returns: "i32" },
    rbd_aio_write_zeroes: { args: ["ptr", u64, u64, "ptr", "i32", "i32"], returns: "i32" },
    rbd_flush: { args: ["ptr"], returns: "i32" },
    rbd_set_image_notification: { args: ["ptr", "i32", "i32"], returns: "i32" },
    rbd_poll_io_events: { args: ["ptr", "ptr", "i32"], returns: "i32" },
    rbd_update_watch: { args: ["ptr", "ptr", "ptr", "ptr"], returns: "i32" },
    rbd_update_unwatch: { args: ["ptr", u64], returns: "i32" },
  });
}

const librbd = new LazyLibrary(
  () => ({ rados: loadRados().symbols, rbd: loadRbd().symbols }),
  `${LIBRBD_SONAME} / ${LIBRADOS_SONAME} (install Debian's librbd1)`,
);

/** The libraries, loaded on first use; throws a message saying which packages provide them. */
function libs() {
  return librbd.get();
}

/** Whether librados and librbd can be loaded here (null), or why not. */
export function librbdUnavailable(): string | null {
  return librbd.unavailable();
}

/** A failed librados/librbd call: its name and errno (the libraries return -errno). */
export class RbdError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call}: ${errnoText(errno)}`);
    this.name = "RbdError";
  }
}

const ERRNO_TEXT: Record<number, string> = {
  1: "operation not permitted (EPERM)", 2: "no such entry (ENOENT)", 5: "I/O error (EIO)", 13: "permission denied (EACCES)",
  16: "busy (EBUSY)", 22: "invalid argument (EINVAL)", 30: "read-only (EROFS)", 95: "not supported (EOPNOTSUPP)",
  107: "not connected (ENOTCONN)", 108: "cannot send after shutdown (ESHUTDOWN)", 110: "timed out (ETIMEDOUT)",
  111: "connection refused (ECONNREFUSED)", 113: "no route to host (EHOSTUNREACH)", 125: "canceled (ECANCELED)",
};

export function errnoText(errno: number): string {
  return ERRNO_TEXT[errno] ?? `errno ${errno}`;
}

function check(ret: number, call: string): number {
  if (ret < 0) throw new RbdError(call, -ret);
  return ret;
}

function cstr(s: string): Buffer {
  return Buffer.from(s + "\0");
}

/** One pointer-sized out-parameter, reused by the calls that fill one (its address taken once: the hot path makes a completion per request). */
const out = new BigUint64Array(1);
const outAddress = ptr(out);
const outPtr = () => outAddress;
const outValue = () => Number(out[0]) as unknown as Pointer;

export type RadosCluster = Pointer;
export type RadosIoctx = Pointer;
export type RbdImage = Pointer;
export type RbdCompletion = Pointer;

/** rados_create2: a cluster handle for `name` ("client.admin"), of cluster "ceph". */
export function radosCreate(name: string): RadosCluster {
  check(libs().rados.rados_create2(outPtr(), cstr("ceph"), cstr(name), 0n), "rados_create2");
  return outValue();
}

/** rados_conf_read_file: `path`, or null for the default search ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf). */
export function radosConfReadFile(c: RadosCluster, path: string | null): void {
  check(libs().rados.rados_conf_read_file(c, path === null ? null : ptr(cstr(path))), "rados_conf_read_file");
}

export function radosConfSet(c: RadosCluster, option: string, value: string): void {
  const r = libs().rados.rados_conf_set(c, cstr(option), cstr(value));
  if (r < 0) throw new RbdError(`rados_conf_set ${option}`, -r);
}

/** An option's value as librados has it now (after the file and the settings). */
export function radosConfGet(c: RadosCluster, option: string): string {
  const buf = new Uint8Array(4096);
  const r = libs().rados.rados_conf_get(c, cstr(option), ptr(buf), BigInt(buf.length));
  if (r < 0) throw new RbdError(`rados_conf_get ${option}`, -r);
  const end = buf.indexOf(0);
  return Buffer.from(buf.subarray(0, end < 0 ? buf.length : end)).toString();
}

/** Connects to the monitors (blocking, up to client_mount_timeout). */
export function radosConnect(c: RadosCluster): void {
  check(libs().rados.rados_connect(c), "rados_connect");
}

/** Disconnects and frees the handle (its threads end). */
export function radosShutdown(c: RadosCluster): void {
  libs().rados.rados_shutdown(c);
}

/** The pool's id, or -errno (-ENOENT: no such pool). */
export function radosPoolLookup(c: RadosCluster, pool: string): number {
  return Number(libs().rados.rados_pool_lookup(c, cstr(pool)));
}

export function radosIoctxCreate(c: RadosCluster, pool: string): RadosIoctx {
  check(libs().rados.rados_ioctx_create(c, cstr(pool), outPtr()), "rados_ioctx_create");
  return outValue();
}

export function radosIoctxSetNamespace(io: RadosIoctx, namespace: string): void {
  libs().rados.rados_ioctx_set_namespace(io, ptr(cstr(namespace)));
}

export function radosIoctxDestroy(io: RadosIoctx): void {
  libs().rados.rados_ioctx_destroy(io);
}

/** rbd_open (read-write) or rbd_open_read_only; `snap`: open that snapshot (read-only either way). */
export function rbdOpen(io: RadosIoctx, name: string, snap: string | null, readOnly: boolean): RbdImage {
  const f = readOnly ? libs().rbd.rbd_open_read_only : libs().rbd.rbd_open;
  check(f(io, cstr(name), outPtr(), snap === null ? null : ptr(cstr(snap))), readOnly ? "rbd_open_read_only" : "rbd_open");
  return outValue();
}

export function rbdClose(image: RbdImage): void {
  check(libs().rbd.rbd_close(image), "rbd_close");
}

const u64Out = new BigUint64Array(1);

export function rbdGetSize(image: RbdImage): number {
  check(libs().rbd.rbd_get_size(image, ptr(u64Out)), "rbd_get_size");
  return Number(u64Out[0]);
}

export function rbdGetFeatures(image: RbdImage): bigint {
  check(libs().rbd.rbd_get_features(image, ptr(u64Out)), "rbd_get_features");
  return u64Out[0]!;
}

export interface RbdImageInfo {
  size: number;
  /** Bytes per object (1 << order). */
  objectSize: number;
  numObjects: number;
  order: number;
}

/** rbd_stat: struct rbd_image_info_t { u64 size, obj_size, num_objs; int order; char prefix[24]; i64 parent_pool; char parent_name[96] }. */
export function rbdStat(image: RbdImage): RbdImageInfo {
  const info = new Uint8Array(8 * 3 + 4 + 24 + 4 + 8 + 96);
  check(libs().rbd.rbd_stat(image, ptr(info), BigInt(info.length)), "rbd_stat");
  const v = new DataView(info.buffer);
  return { size: Number(v.getBigUint64(0, true)), objectSize: Number(v.getBigUint64(8, true)), numObjects: Number(v.getBigUint64(16, true)), order: v.getInt32(24, true) };
}

/** The image's id (format 2 images: a stable hex string, unchanged by renames). */
export function rbdGetId(image: RbdImage): string {
  const buf = new Uint8Array(128);
  check(libs().rbd.rbd_get_id(image, ptr(buf), BigInt(buf.length)), "rbd_get_id");
  const end = buf.indexOf(0);
  return Buffer.from(buf.subarray(0, end < 0 ? buf.length : end)).toString();
}

/** Tells librbd to queue completions on the image and signal `eventfd` (RBD_EVENT_TYPE_EVENTFD). */
export function rbdSetImageNotification(image: RbdImage, eventfd: number): void {
  check(libs().rbd.rbd_set_image_notification(image, eventfd, RBD_EVENT_TYPE_EVENTFD), "rbd_set_image_notification");
}

/** A completion with a NULL callback whose argument is the number `arg` (read back by rbdAioGetArg). */
export function rbdAioCreateCompletion(arg: number): RbdCompletion {
  check(libs().rbd.rbd_aio_create_completion(arg as unknown as Pointer, null, outPtr()), "rbd_aio_create_completion");
  return outValue();
}

export function rbdAioGetArg(c: RbdCompletion): number {
  return Number(libs().rbd.rbd_aio_get_arg(c));
}

/** The operation's result: bytes for reads, 0 for the others, or -errno. */
export function rbdAioGetReturnValue(c: RbdCompletion): number {
  return Number(libs().rbd.rbd_aio_get_return_value(c));
}

export function rbdAioRelease(c: RbdCompletion): void {
  libs().rbd.rbd_aio_release(c);
}

// The aio calls return -errno when they refuse at once (the completion then never fires) and 0
// when started: returned as is, for the caller to complete the request with.

/** `iov`: the address of `count` struct iovec, which must stay valid until the completion. */
export function rbdAioReadv(image: RbdImage, iov: number, count: number, offset: number, c: RbdCompletion): number {
  return libs().rbd.rbd_aio_readv(image, iov as unknown as Pointer, count, offset, c);
}

export function rbdAioWritev(image: RbdImage, iov: number, count: number, offset: number, c: RbdCompletion): number {
  return libs().rbd.rbd_aio_writev(image, iov as unknown as Pointer, count, offset, c);
}

export function rbdAioFlush(image: RbdImage, c: RbdCompletion): number {
  return libs().rbd.rbd_aio_flush(image, c);
}

export function rbdAioDiscard(image: RbdImage, offset: number, len: number, c: RbdCompletion): number {
  return libs().rbd.rbd_aio_discard(image, offset, len, c);
}

export function rbdAioWriteZeroes(image: RbdImage, offset: number, len: number, c: RbdCompletion, zeroFlags: number): number {
  return libs().rbd.rbd_aio_write_zeroes(image, offset, len, c, zeroFlags, 0);
}

/** Blocking flush of everything written so far. */
export function rbdFlush(image: RbdImage): void {
  check(libs().rbd.rbd_flush(image), "rbd_flush");
}

/**
 * Collects up to `comps.length` finished completions into `comps` (addresses); returns how many.
 * `compsAddress`: ptr(comps), when the caller keeps it.
 */
export function rbdPollIoEvents(image: RbdImage, comps: BigUint64Array, compsAddress: number = ptr(comps)): number {
  return check(libs().rbd.rbd_poll_io_events(image, compsAddress as unknown as Pointer, comps.length), "rbd_poll_io_events");
}

/**
 * rbd_update_watch: librbd calls `cb(arg)` on its own thread whenever the image's header changes
 * (a resize, a snapshot...). `cb` must be native code (ffi/eventfd_callback.ts): never JS. Returns
 * the watch's handle.
 */
export function rbdUpdateWatch(image: RbdImage, cb: Pointer, arg: Pointer): bigint {
  const handle = new BigUint64Array(1);
  check(libs().rbd.rbd_update_watch(image, ptr(handle), cb, arg), "rbd_update_watch");
  return handle[0]!;
}

export function rbdUpdateUnwatch(image: RbdImage, handle: bigint): void {
  check(libs().rbd.rbd_update_unwatch(image, handle), "rbd_update_unwatch");
}
