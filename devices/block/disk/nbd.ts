// A disk on an NBD server (`--file nbd://HOST[:PORT]/EXPORT`, `--file nbd+unix:///EXPORT?socket=PATH`;
// libnbd parses the URI), through libnbd's asynchronous API on our own loop (nbd_connection.ts).
//
// Acquire: one blocking connection checks the URI, the export and its limits, and says what to do
// when it fails; it is closed again, since a libnbd handle cannot move between threads. Each thread
// that serves then connects on its own when it builds its Disk from the resource (with multi-conn,
// one connection per queue thread; without, the device serves every queue from one thread, since
// only a multi-conn server promises that a flush on one connection covers writes on another).
//
// Data goes straight between guest memory and the socket when a request's buffers are one
// contiguous run of host memory (libnbd takes one buffer per command). Otherwise a request of up to
// BOUNCE_MAX bytes goes through one bounce buffer (one command, one copy), and a larger one as one
// command per run (no copy). Commands are split at the export's maximum block size. FUA, trim and
// write-zeroes (fast-zero, no-hole) map to the NBD flags; what the server lacks is emulated (FUA by
// a flush after the write, write-zeroes by writing zero pages) or, for discard, skipped.
import { toArrayBuffer } from "bun:ffi";
import { copyFromIov, copyToIov } from "./iov_memory.ts";
import * as nbd from "../../../ffi/nbd.ts";
import { EIO } from "../../../ffi/libc.ts";
import { IovecArray } from "../../../ffi/io.ts";
import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS } from "../../../ffi/mem.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import type { HostAccess } from "../../../src/host_access.ts";
import {
  ZERO_UNMAP, ZERO_MAY_FAIL_FAST, ZERO_FUA, hash48, RequestSlots,
  type Disk, type DiskIdentity, type DiskQueue, type DiskQueueHandlers, type DiskQueueOptions, type DiskRequest, type DiskResource,
} from "./disk.ts";
import {
  NbdConnection, connectBlocking, NBD_READ, NBD_WRITE, NBD_FLUSH, NBD_TRIM, NBD_ZERO,
  type NbdCommand, type NbdOp, type CommandOwner,
} from "./nbd_connection.ts";
import { log } from "../../../src/log.ts";

const EROFS = 30;
const EOPNOTSUPP = 95;

/** The NBD protocol's default maximum payload when the server names none (NBD spec, "Block size constraints"). */
const DEFAULT_MAX_PAYLOAD = 32 << 20;
/** Trim and write-zeroes carry no payload; their length is a u32 on the wire. Split there. */
const MAX_SPACE_COMMAND = 1 << 30;
/** Requests of several memory runs up to this size go through one bounce buffer (one command). */
const BOUNCE_MAX = 4 << 20;
/** Zero pages written where the server cannot write zeroes. */
const ZERO_CHUNK = 1 << 20;
/** "NBD": the device number of every NBD disk's identity. */
const NBD_IDENTITY_DEV = 0x4e4244;

/** Whether `--file` names an NBD export rather than a local path. */
export function isNbdUri(file: string): boolean {
  return /^nbds?(\+unix|\+vsock)?:\/\//.test(file);
}

export interface NbdDiskOptions {
  readOnly: boolean;
  /** --nbd-timeout in ms: how long requests wait for a lost server; 0 for ever. */
  timeoutMs: number;
}

/** What acquire learnt about the export: plain data every serving thread builds its Disk from. */
export interface NbdDiskResource extends DiskResource {
  kind: "nbd";
  uri: string;
  timeoutMs: number;
  size: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  /** Largest read or write per command. */
  maxPayload: number;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  multiConn: boolean;
  /** The export itself is read-only (so is the disk, --read-only or not). */
  exportReadOnly: boolean;
}

/** Explains a failed first connection: what went wrong and what to check. */
function connectFailure(uri: string, e: unknown): Error {
  const err = e as nbd.NbdError;
  const m = err.message ?? String(e);
  let hint: string;
  if (/no export named|export.*not (found|available)|unknown export/i.test(m)) hint = "the server is up but has no such export: fix EXPORT in the URI (nbdinfo --list URI lists them)";
  else if (/unknown NBD URI scheme|parse|URI/i.test(m) && err.errno === 22) hint = "write the URI as nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";
  else if (err.errno === 2) hint = "no socket at that path: start the NBD server (qemu-nbd -k PATH, nbdkit -U PATH) or fix socket= in the URI";
  else if (err.errno === 111) hint = "nothing listens there: start the NBD server or fix HOST:PORT (the default port is 10809)";
  else if (err.errno === 13 || err.errno === 1) hint = "permission denied: check who may use the socket";
  else hint = "check that the NBD server runs and that the URI names it";
  return new Error(`--file ${uri}: cannot use the NBD export: ${m} (${hint})`);
}

function powerOfTwoAtLeast(n: number, min: number): number {
  let p = min;
  while (p < n) p *= 2;
  return p;
}

/**
 * The acquire phase: connects once (blocking), reads the export's size, limits and flags, checks
 * that it can serve them, and disconnects. Throws a message that says what to do.
 */
export function acquireNbdDisk(uri: string, o: NbdDiskOptions): NbdDiskResource {
  const unavailable = nbd.libnbdUnavailable();
  if (unavailable !== null) throw new Error(`--file ${uri}: ${unavailable}`);
  let h: nbd.NbdHandle;
  try {
    h = connectBlocking(uri);
  } catch (e) {
    throw connectFailure(uri, e);
  }
  try {
    const size = nbd.getSize(h);
    const minimum = nbd.getBlockSize(h, nbd.LIBNBD_SIZE_MINIMUM);
    const preferred = nbd.getBlockSize(h, nbd.LIBNBD_SIZE_PREFERRED);
    const maximum = nbd.getBlockSize(h, nbd.LIBNBD_SIZE_MAXIMUM);
    if (minimum > 64 * 1024) throw new Error(`--file ${uri}: the export's minimum block size ${minimum} is above 64 KiB`);
    const logicalBlockSize = powerOfTwoAtLeast(minimum, 512);
    const physicalBlockSize = powerOfTwoAtLeast(Math.min(preferred, 1 << 20), logicalBlockSize);
    let maxPayload = maximum > 0 ? Math.min(maximum, DEFAULT_MAX_PAYLOAD * 2) : DEFAULT_MAX_PAYLOAD;
    maxPayload -= maxPayload % logicalBlockSize;
    if (maxPayload < logicalBlockSize) throw new Error(`--file ${uri}: the export's maximum block size ${maximum} is below its block size ${logicalBlockSize}`);
    if (size < logicalBlockSize) throw new Error(`--file ${uri}: the export is ${size} bytes, smaller than one ${logicalBlockSize}-byte block`);
    const exportReadOnly = nbd.exportFlag(h, "nbd_is_read_only");
    const writable = !exportReadOnly && !o.readOnly;
    return {
      kind: "nbd",
      location: uri,
      uri,
      readOnly: !writable,
      timeoutMs: o.timeoutMs,
      size,
      logicalBlockSize,
      physicalBlockSize,
      maxPayload,
      canFlush: nbd.exportFlag(h, "nbd_can_flush"),
      canFua: nbd.exportFlag(h, "nbd_can_fua"),
      canTrim: writable && nbd.exportFlag(h, "nbd_can_trim"),
      canZero: writable && nbd.exportFlag(h, "nbd_can_zero"),
      canFastZero: writable && nbd.exportFlag(h, "nbd_can_fast_zero"),
      multiConn: nbd.exportFlag(h, "nbd_can_multi_conn"),
      exportReadOnly,
    };
  } finally {
    nbd.closeHandle(h);
  }
}

/**
 * What an NBD disk touches after acquire: the server again (every queue thread connects, and
 * reconnects after an outage), over the unix socket or the TCP endpoint its URI names.
 */
export function nbdHostAccess(uri: string): HostAccess {
  const access: HostAccess = { paths: [], unixSockets: [], tcp: [], hostNetwork: false, threadsAfterAcquire: false, syscallGroups: [] };
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    return access;
  }
  if (u.protocol.endsWith("+unix:")) {
    const socket = u.searchParams.get("socket");
    return { ...access, unixSockets: socket === null ? [] : [socket] };
  }
  if (u.protocol === "nbd:" || u.protocol === "nbds:") {
    const host = u.hostname.startsWith("[") ? u.hostname : u.hostname.includes(":") ? `[${u.hostname}]` : u.hostname;
    return { ...access, tcp: [`${host || "localhost"}:${u.port || "10809"}`], hostNetwork: true };
  }
  return access;
}

/** A stable name for the export, independent of the socket path it was reached by (for identity). */
function exportKey(uri: string): string {
  try {
    const u = new URL(uri);
    const name = decodeURIComponent(u.pathname.replace(/^\//, ""));
    return u.protocol.endsWith("+unix:") ? `unix/${name}` : `${u.hostname}:${u.port || "10809"}/${name}`;
  } catch {
    return uri;
  }
}

// ---- buffers ----

/** Reusable anonymous mappings for bounce buffers, by power-of-two size. */
class BouncePool {
  private readonly free = new Map<number, number[]>();
  private readonly all: [number, number][] = [];

  take(len: number): { addr: number; size: number } {
    const size = powerOfTwoAtLeast(len, 64 * 1024);
    const list = this.free.get(size);
    const addr = list?.pop() ?? this.map(size);
    return { addr, size };
  }

  give(addr: number, size: number): void {
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    list.push(addr);
  }

  private map(size: number): number {
    const addr = mmap(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    this.all.push([addr, size]);
    return addr;
  }

  close(): void {
    for (const [addr, size] of this.all) munmap(addr, size);
    this.all.length = 0;
    this.free.clear();
  }
}

let zeroPage = 0;
/** A read-only mapping of ZERO_CHUNK zero bytes (shared by every NBD disk of the process). */
function zeroes(): number {
  if (zeroPage === 0) zeroPage = mmap(ZERO_CHUNK, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return zeroPage;
}

// ---- requests ----

const STEP_NONE = 0;
/** The data is written; a flush makes it durable (FUA on a server without FUA). */
const STEP_FLUSH = 1;

class NbdRequest implements DiskRequest, CommandOwner {
  readonly iov: IovecArray;
  busy = false;
  isRead = false;
  len = 0;
  /** Commands outstanding. */
  parts = 0;
  /** The first failure (-errno), or 0. */
  error = 0;
  next = STEP_NONE;
  bounceAddr = 0;
  bounceSize = 0;

  constructor(readonly id: number, segMax: number, readonly queue: NbdQueue) {
    this.iov = new IovecArray(segMax);
  }

  commandDone(_cmd: NbdCommand, result: number): void {
    if (result < 0 && this.error === 0) this.error = result;
    if (--this.parts > 0) return;
    this.queue.partsDone(this);
  }
}

class NbdQueue implements DiskQueue {
  private readonly slots: RequestSlots<NbdRequest>;
  /** Completions since the last batchDone. */
  unpublished = false;
  private closed = false;

  constructor(private readonly disk: NbdDisk, private readonly conn: NbdConnection, options: DiskQueueOptions, private readonly handlers: DiskQueueHandlers) {
    this.slots = new RequestSlots(options.depth, (id) => new NbdRequest(id, options.segMax, this), "NBD disk");
  }

  get inFlight(): number {
    return this.slots.inFlight;
  }

  next(): DiskRequest | null {
    return this.slots.next();
  }

  private begin(req: DiskRequest): NbdRequest {
    const r = this.slots.take(req);
    r.error = 0;
    r.parts = 0;
    r.next = STEP_NONE;
    r.isRead = false;
    return r;
  }

  private complete(r: NbdRequest, result: number): void {
    if (r.bounceAddr !== 0) {
      this.disk.bounce.give(r.bounceAddr, r.bounceSize);
      r.bounceAddr = 0;
    }
    this.unpublished = true;
    this.slots.finish(r, result, this.handlers);
  }

  /** Every command of a request (or of its current step) finished. */
  partsDone(r: NbdRequest): void {
    if (r.error !== 0) return this.complete(r, r.error);
    if (r.next === STEP_FLUSH) {
      r.next = STEP_NONE;
      this.startCommands(r, NBD_FLUSH, 0, 0, 0, 0, 1);
      return;
    }
    if (r.isRead && r.bounceAddr !== 0) copyToIov(r.iov, 0, new Uint8Array(toArrayBuffer(r.bounceAddr as never, 0, r.len)));
    this.complete(r, r.len);
  }

  /**
   * Starts commands over [offset, offset+len) in pieces of at most `chunk` bytes; `buf` is the data
   * (0 for commands without), advanced with the offset. Counts the parts before starting any, since
   * one may complete at once.
   */
  private startCommands(r: NbdRequest, op: NbdOp, buf: number, offset: number, len: number, flags: number, chunk: number): void {
    const n = len === 0 ? 1 : Math.ceil(len / chunk);
    r.parts += n;
    for (let done = 0, i = 0; i < n; i++) {
      const count = Math.min(chunk, len - done);
      const cmd = this.conn.command(r);
      cmd.op = op;
      cmd.offset = offset + done;
      cmd.count = count;
      cmd.buf = buf === 0 ? 0 : buf + done;
      cmd.flags = flags;
      done += count;
      this.conn.start(cmd);
    }
  }

  /** Reads or writes: straight from guest memory, through a bounce buffer, or one command per run. */
  private transfer(r: NbdRequest, op: NbdOp, offset: number, len: number, flags: number): void {
    const iov = r.iov;
    const count = iov.count;
    const maxPayload = this.disk.resource.maxPayload;
    let runs = 0;
    let end = -1;
    let total = 0;
    for (let i = 0; i < count; i++) {
      const base = iov.baseAt(i);
      const l = iov.lenAt(i);
      if (l === 0) continue;
      if (base !== end) runs++;
      end = base + l;
      total += l;
    }
    if (total < len) return this.complete(r, -EIO); // the caller's iovecs do not hold len bytes
    r.parts = 1; // held until every command is started
    if (runs <= 1) {
      this.startCommands(r, op, count > 0 ? firstBase(iov) : 0, offset, len, flags, maxPayload);
    } else if (len <= BOUNCE_MAX) {
      const b = this.disk.bounce.take(len);
      r.bounceAddr = b.addr;
      r.bounceSize = b.size;
      if (op === NBD_WRITE) copyFromIov(iov, 0, new Uint8Array(toArrayBuffer(b.addr as never, 0, len)));
      this.startCommands(r, op, b.addr, offset, len, flags, maxPayload);
    } else {
      // Too big to copy: one command per run of contiguous memory.
      let at = 0;
      let i = 0;
      while (i < count && at < len) {
        const base = iov.baseAt(i);
        let l = Math.min(iov.lenAt(i), len - at);
        i++;
        while (i < count && at + l < len && iov.baseAt(i) === base + l) {
          l += Math.min(iov.lenAt(i), len - at - l);
          i++;
        }
        if (l === 0) continue;
        this.startCommands(r, op, base, offset + at, l, flags, maxPayload);
        at += l;
      }
    }
    r.commandDone(null as unknown as NbdCommand, 0);
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const r = this.begin(req);
    r.isRead = true;
    r.len = len;
    if (len === 0) return this.complete(r, 0);
    this.transfer(r, NBD_READ, offset, len, 0);
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const r = this.begin(req);
    r.len = len;
    const d = this.disk.resource;
    if (d.readOnly) return this.complete(r, -EROFS);
    if (len === 0) return this.complete(r, 0);
    let flags = 0;
    if (fua && d.canFua) flags |= nbd.LIBNBD_CMD_FLAG_FUA;
    else if (fua && d.canFlush) r.next = STEP_FLUSH;
    this.transfer(r, NBD_WRITE, offset, len, flags);
  }

  flush(req: DiskRequest): void {
    const r = this.begin(req);
    r.len = 0;
    // A server that offers no flush writes through: there is nothing to make durable.
    if (this.disk.resource.readOnly || !this.disk.resource.canFlush) return this.complete(r, 0);
    this.startCommands(r, NBD_FLUSH, 0, 0, 0, 0, 1);
  }

  discard(req: DiskRequest, offset: number, len: number): void {
    const r = this.begin(req);
    r.len = 0;
    const d = this.disk.resource;
    if (d.readOnly) return this.complete(r, -EROFS);
    // Advisory: a server without trim keeps the data, which is allowed.
    if (!d.canTrim || len === 0) return this.complete(r, 0);
    this.startCommands(r, NBD_TRIM, 0, offset, len, 0, this.spaceChunk());
  }

  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    const r = this.begin(req);
    r.len = 0;
    const d = this.disk.resource;
    if (d.readOnly) return this.complete(r, -EROFS);
    if (len === 0) return this.complete(r, 0);
    const mayFailFast = (flags & ZERO_MAY_FAIL_FAST) !== 0;
    let nbdFlags = 0;
    if ((flags & ZERO_FUA) !== 0) {
      if (d.canFua) nbdFlags |= nbd.LIBNBD_CMD_FLAG_FUA;
      else if (d.canFlush) r.next = STEP_FLUSH;
    }
    if (!d.canZero) {
      // Writing zero pages is the slow fallback a fast-zero request asks us not to take.
      if (mayFailFast) return this.complete(r, -EOPNOTSUPP);
      r.parts = 1;
      const chunk = Math.min(ZERO_CHUNK, d.maxPayload);
      for (let at = 0; at < len; at += chunk) this.startCommands(r, NBD_WRITE, zeroes(), offset + at, Math.min(chunk, len - at), nbdFlags, chunk);
      r.commandDone(null as unknown as NbdCommand, 0);
      return;
    }
    if (mayFailFast) {
      if (!d.canFastZero) return this.complete(r, -EOPNOTSUPP);
      nbdFlags |= nbd.LIBNBD_CMD_FLAG_FAST_ZERO;
    }
    if ((flags & ZERO_UNMAP) === 0) nbdFlags |= nbd.LIBNBD_CMD_FLAG_NO_HOLE;
    this.startCommands(r, NBD_ZERO, 0, offset, len, nbdFlags, this.spaceChunk());
  }

  private spaceChunk(): number {
    const bs = this.disk.resource.logicalBlockSize;
    return MAX_SPACE_COMMAND - (MAX_SPACE_COMMAND % bs);
  }

  submit(): void {
    this.conn.flushInterest();
  }

  /** After completions from the loop: hand them to the caller. */
  publish(): void {
    if (!this.unpublished) return;
    this.unpublished = false;
    this.handlers.batchDone();
  }

  drain(): void {
    if (this.inFlight > 0) this.conn.drive(() => this.inFlight > 0);
    this.publish();
  }

  close(): void {
    if (this.closed) return;
    this.drain();
    this.closed = true;
    this.disk.detach(this);
  }
}

function firstBase(iov: IovecArray): number {
  for (let i = 0; i < iov.count; i++) if (iov.lenAt(i) > 0) return iov.baseAt(i);
  return 0;
}

// ---- the disk ----

export class NbdDisk implements Disk {
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly physicalBlockSize: number;
  readonly readOnly: boolean;
  readonly multiThread: boolean;
  readonly description: string;
  readonly bounce = new BouncePool();
  private readonly conn: NbdConnection;
  private readonly queues = new Set<NbdQueue>();
  private loop: EventLoop | null = null;

  constructor(readonly resource: NbdDiskResource, h: nbd.NbdHandle | null) {
    const r = resource;
    this.size = r.size - (r.size % r.logicalBlockSize);
    this.logicalBlockSize = r.logicalBlockSize;
    this.physicalBlockSize = r.physicalBlockSize;
    this.readOnly = r.readOnly;
    this.multiThread = r.multiConn;
    const flags = [r.multiConn ? "multi-conn" : "single connection", r.exportReadOnly ? "read-only export" : "", r.canFua ? "" : "no FUA", r.canTrim ? "" : r.readOnly ? "" : "no trim"].filter((x) => x !== "");
    this.description = `NBD ${r.uri} (${flags.join(", ")})`;
    this.conn = new NbdConnection({ uri: r.uri, timeoutMs: r.timeoutMs, onBatch: () => this.publish() }, h, r.size);
  }

  /** The connection (tests look at its reconnects). */
  get connection(): NbdConnection {
    return this.conn;
  }

  identity(): DiskIdentity {
    return { location: this.resource.uri, size: this.resource.size, dev: NBD_IDENTITY_DEV, ino: hash48(exportKey(this.resource.uri)) };
  }

  currentSize(): number {
    return this.conn.size;
  }

  attach(loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers): DiskQueue {
    if (this.loop !== null && this.loop !== loop) throw new Error(`NBD disk ${this.resource.uri}: all of one instance's queues must be on one loop (one instance per thread)`);
    this.loop = loop;
    this.conn.attach(loop);
    const q = new NbdQueue(this, this.conn, options, handlers);
    this.queues.add(q);
    return q;
  }

  detach(q: NbdQueue): void {
    this.queues.delete(q);
  }

  private publish(): void {
    for (const q of this.queues) q.publish();
  }

  flushNow(): void {
    if (this.readOnly || !this.resource.canFlush) return;
    let result = 1;
    const owner: CommandOwner = { commandDone: (_c, r) => (result = r) };
    const cmd = this.conn.command(owner);
    cmd.op = NBD_FLUSH;
    cmd.offset = 0;
    cmd.count = 0;
    this.conn.start(cmd);
    this.conn.flushInterest();
    if (result === 1) this.conn.drive(() => result === 1);
    if (result < 0) throw new Error(`NBD ${this.resource.uri}: flush failed (errno ${-result})`);
  }

  close(): void {
    this.conn.close();
    this.bounce.close();
  }
}

/**
 * Builds this thread's NBD disk: connects from this thread (libnbd handles do not move between
 * threads). A server that is down now is not an error: the disk starts in an outage and
 * reconnects once it serves, as after any outage.
 */
export function openNbdDisk(resource: NbdDiskResource, _owner: boolean): NbdDisk {
  let h: nbd.NbdHandle | null = null;
  try {
    h = connectBlocking(resource.uri);
  } catch (e) {
    log.warn(`NBD ${resource.uri}: cannot connect (${(e as Error).message}); requests wait until it can`);
  }
  if (h !== null) {
    const size = nbd.getSize(h);
    if (size !== resource.size) log.warn(`NBD ${resource.uri}: the export is now ${size} bytes (it was ${resource.size} when the device started)`);
  }
  return new NbdDisk(resource, h);
}
