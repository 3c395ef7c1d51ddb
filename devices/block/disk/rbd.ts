// A disk on a Ceph RBD image (`--file rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH][:key=value...]`,
// rbd_spec.ts), through librbd's asynchronous API (ffi/rbd.ts).
//
// Acquire: one blocking connection checks the cluster, the pool, the image and the snapshot, and
// says what to do when one is missing; it is closed again (librados's threads would not survive
// the sandbox's re-exec). The thread that serves then connects on its own when it builds its Disk
// from the resource. One image handle serves every queue from that one thread (multiThread false):
// two handles of one process on an exclusive-lock image would take the lock from each other on
// every write, and librbd does its work on its own threads anyway.
//
// Requests go to librbd straight from guest memory (rbd_aio_readv/writev take the iovecs; librbd
// copies written data before it returns, and fills a read's iovecs before it completes). The image
// has an eventfd (rbd_set_image_notification): librbd queues each completion on the image and
// signals it, and our loop collects them (rbd_poll_io_events); no JS ever runs on librbd's
// threads. FUA is a flush after the write (librbd has no per-write FUA; its cache is writeback once
// the guest flushes, as QEMU's cache=writeback has it); write-zeroes without unmap allocates
// (RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, as QEMU asks).
//
// librados keeps no admin socket here (a sandboxed process may not bind one; give
// :admin_socket=PATH to have one unsandboxed) and waits at most client_mount_timeout (30 s unless
// given) for the monitors at start. After that, an unreachable cluster makes requests wait, as
// for a local disk (librados reconnects on its own).
import { ptr } from "bun:ffi";
import * as rbd from "../../../ffi/rbd.ts";
import { eventfd, drain as drainEventfd } from "../../../ffi/eventfd.ts";
import { close as closeFd } from "../../../ffi/libc.ts";
import { Epoll, EPOLLIN } from "../../../ffi/epoll.ts";
import { EIO } from "../../../ffi/libc.ts";
import { IovecArray } from "../../../ffi/io.ts";
import type { EventLoop } from "../../../src/event_loop.ts";
import { eventfdCallback, eventfdArg } from "../../../ffi/eventfd_callback.ts";
import type { HostAccess, DeclaredPath } from "../../../src/host_access.ts";
import { log } from "../../../src/log.ts";
import {
  ZERO_UNMAP, ZERO_FUA, hash48, RequestSlots,
  type Disk, type DiskIdentity, type DiskQueue, type DiskQueueHandlers, type DiskQueueOptions, type DiskRequest, type DiskResource,
} from "./disk.ts";
import { parseRbdSpec, rbdImageName, type RbdSpec } from "./rbd_spec.ts";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, resolve } from "node:path";

export { isRbdSpec } from "./rbd_spec.ts";

const EROFS = 30;
const ENOENT = 2;
/** Ceph's EBLOCKLISTED: the cluster cut this client off (another client broke its lock). */
const ESHUTDOWN = 108;

/** "RBD": the device number of every RBD disk's identity. */
const RBD_IDENTITY_DEV = 0x524244;
/** How long acquire waits for the monitors unless client_mount_timeout is given (librados's default is 300 s). */
const DEFAULT_MOUNT_TIMEOUT_S = 30;
/** Completions collected per rbd_poll_io_events call. */
const POLL_BATCH = 64;

/** What acquire learnt about the image: plain data the serving thread builds its Disk from. */
export interface RbdDiskResource extends DiskResource {
  kind: "rbd";
  spec: RbdSpec;
  size: number;
  objectSize: number;
  /** rbd_get_features bits (below 2^53). */
  features: number;
  /** Pool id and image id: what names the image across renames (the identity). */
  poolId: number;
  imageId: string;
}

export interface RbdDiskOptions {
  readOnly: boolean;
}

// ---- connecting ----

function option(spec: RbdSpec, key: string): string | undefined {
  const k = key.replace(/ /g, "_");
  for (let i = spec.options.length - 1; i >= 0; i--) if (spec.options[i]![0].replace(/ /g, "_") === k) return spec.options[i]![1];
  return undefined;
}

/** A cluster handle configured as the spec says (not connected). Throws with the file's name. */
function configure(file: string, spec: RbdSpec): rbd.RadosCluster {
  const c = rbd.radosCreate(`client.${spec.user ?? "admin"}`);
  try {
    try {
      rbd.radosConfReadFile(c, spec.conf);
    } catch (e) {
      // Without conf=, librados's default search may find nothing: options given may be enough.
      if (spec.conf !== null) throw new Error(`--file ${file}: cannot read the Ceph configuration ${spec.conf} (${(e as Error).message}): fix conf=PATH`);
    }
    if (option(spec, "admin_socket") === undefined) rbd.radosConfSet(c, "admin_socket", "");
    for (const [k, v] of spec.options) {
      try {
        rbd.radosConfSet(c, k, v);
      } catch (e) {
        throw new Error(`--file ${file}: librados refuses the option ${k}=${v} (${(e as rbd.RbdError).errno === ENOENT ? "no such option" : (e as Error).message})`);
      }
    }
    return c;
  } catch (e) {
    rbd.radosShutdown(c);
    throw e;
  }
}

/** Connects (blocking); the failure says what to check. */
function connect(file: string, spec: RbdSpec, mountTimeoutS: number): rbd.RadosCluster {
  const c = configure(file, spec);
  if (option(spec, "client_mount_timeout") === undefined) rbd.radosConfSet(c, "client_mount_timeout", String(mountTimeoutS));
  try {
    rbd.radosConnect(c);
    return c;
  } catch (e) {
    const monHost = safeConfGet(c, "mon_host");
    const keyring = safeConfGet(c, "keyring");
    rbd.radosShutdown(c);
    const errno = (e as rbd.RbdError).errno;
    const timeout = option(spec, "client_mount_timeout") ?? String(mountTimeoutS);
    let hint: string;
    if (errno === 110 || errno === 111 || errno === 113) hint = `no monitor answered at ${monHost || "(no mon_host configured)"} within ${timeout} s: start the cluster, or fix mon_host in ${spec.conf ?? "ceph.conf"} (or :mon_host=ADDR)`;
    else if (errno === 1 || errno === 13) hint = `the monitors refused client.${spec.user ?? "admin"}: check :id=USER and its keyring (:keyring=PATH)`;
    else if (errno === 2 && monHost !== "") hint = `no key for client.${spec.user ?? "admin"} (looked in ${keyring || "no keyring"}): fix :id=USER, or give its keyring as :keyring=PATH`;
    else if (errno === 2 || errno === 22) hint = `no usable configuration: give :conf=PATH or :mon_host=ADDR`;
    else hint = "check that the cluster runs and that ceph.conf names its monitors";
    throw new Error(`--file ${file}: cannot connect to the Ceph cluster: ${(e as Error).message} (${hint})`);
  }
}

function safeConfGet(c: rbd.RadosCluster, key: string): string {
  try {
    return rbd.radosConfGet(c, key);
  } catch {
    return "";
  }
}

interface OpenImage {
  ioctx: rbd.RadosIoctx;
  image: rbd.RbdImage;
}

/** Opens the pool and the image (read-only for a snapshot or when asked); the failure names what is missing. */
function openImage(file: string, c: rbd.RadosCluster, spec: RbdSpec, readOnly: boolean): OpenImage {
  let ioctx: rbd.RadosIoctx;
  try {
    ioctx = rbd.radosIoctxCreate(c, spec.pool);
  } catch (e) {
    if ((e as rbd.RbdError).errno === ENOENT) throw new Error(`--file ${file}: the cluster has no pool '${spec.pool}': fix POOL, or create it (ceph osd pool create ${spec.pool} && rbd pool init ${spec.pool})`);
    throw new Error(`--file ${file}: cannot open pool '${spec.pool}': ${(e as Error).message}`);
  }
  if (spec.namespace !== "") rbd.radosIoctxSetNamespace(ioctx, spec.namespace);
  try {
    return { ioctx, image: rbd.rbdOpen(ioctx, spec.image, spec.snap, readOnly || spec.snap !== null) };
  } catch (e) {
    const errno = (e as rbd.RbdError).errno;
    let message = `--file ${file}: cannot open image ${rbdImageName(spec)}: ${(e as Error).message}`;
    if (errno === ENOENT) {
      // The image, or only its snapshot?
      let imageExists = false;
      if (spec.snap !== null) {
        try {
          rbd.rbdClose(rbd.rbdOpen(ioctx, spec.image, null, true));
          imageExists = true;
        } catch {
          // the image is missing too
        }
      }
      const where = `${spec.pool}${spec.namespace === "" ? "" : `/${spec.namespace}`}`;
      message = imageExists
        ? `--file ${file}: image ${where}/${spec.image} has no snapshot '${spec.snap}': fix SNAP (rbd snap ls ${where}/${spec.image} lists them)`
        : `--file ${file}: pool '${where}' has no image '${spec.image}': fix IMAGE (rbd ls ${where} lists them), or create it (rbd create --size SIZE ${where}/${spec.image})`;
    }
    rbd.radosIoctxDestroy(ioctx);
    throw new Error(message);
  }
}

function closeImage(o: OpenImage): void {
  try {
    rbd.rbdClose(o.image);
  } finally {
    rbd.radosIoctxDestroy(o.ioctx);
  }
}

/**
 * The acquire phase: connects once (blocking), opens the image, reads its size, object size,
 * features and ids, and disconnects. Throws a message that says what to do.
 */
export function acquireRbdDisk(file: string, o: RbdDiskOptions): RbdDiskResource {
  const unavailable = rbd.librbdUnavailable();
  if (unavailable !== null) throw new Error(`--file ${file}: ${unavailable}`);
  const spec = parseRbdSpec(file);
  const readOnly = o.readOnly || spec.snap !== null;
  const c = connect(file, spec, DEFAULT_MOUNT_TIMEOUT_S);
  try {
    const poolId = rbd.radosPoolLookup(c, spec.pool);
    const img = openImage(file, c, spec, readOnly);
    try {
      const info = rbd.rbdStat(img.image);
      const size = rbd.rbdGetSize(img.image);
      if (size < 512) throw new Error(`--file ${file}: the image is ${size} bytes, smaller than one 512-byte block`);
      return {
        kind: "rbd",
        location: file,
        readOnly,
        spec,
        size,
        objectSize: info.objectSize,
        features: Number(rbd.rbdGetFeatures(img.image)),
        poolId,
        imageId: rbd.rbdGetId(img.image),
      };
    } finally {
      closeImage(img);
    }
  } finally {
    rbd.radosShutdown(c);
  }
}

// ---- what the sandbox must allow ----

/** "host:port" endpoints of a mon_host value ("[v2:IP:PORT,v1:IP:PORT] IP2,IP3:PORT" ...); a bare address means both default ports. */
export function monEndpoints(monHost: string): string[] {
  const out = new Set<string>();
  for (const raw of monHost.split(/[\s,;]+/)) {
    const a = raw.replace(/^\[|\]$/g, "").replace(/\/\d+$/, "");
    if (a === "") continue;
    const m = /^(?:(v1|v2):)?(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(a);
    if (m === null) continue;
    const [, proto, host, port] = m;
    if (port !== undefined) out.add(`${host}:${port}`);
    else if (proto === "v1") out.add(`${host}:6789`);
    else if (proto === "v2") out.add(`${host}:3300`);
    else {
      out.add(`${host}:3300`);
      out.add(`${host}:6789`);
    }
  }
  return [...out];
}

/** The file librados reads without conf=: the first that exists of $CEPH_CONF and the usual places (none: []). */
function defaultConfFiles(): string[] {
  const candidates = [process.env.CEPH_CONF, "/etc/ceph/ceph.conf", `${homedir()}/.ceph/config`, resolve("ceph.conf")].filter((p): p is string => p !== undefined && p !== "");
  return candidates.filter((p) => existsSync(p)).slice(0, 1);
}

/**
 * What an RBD disk touches after acquire (its serving thread connects again, and librados keeps
 * talking to the cluster): the configuration and keyring files, TCP to the monitors' ports and to
 * the daemons' port range (OSDs and managers bind in ms_bind_port_min..max, 6800-7300 unless
 * configured), new threads (librados starts its own), the host's network. Read from the same
 * configuration librados will use (a handle configured, not connected).
 */
export function rbdHostAccess(file: string): HostAccess {
  const access: HostAccess = { paths: [], unixSockets: [], tcp: [], hostNetwork: true, threadsAfterAcquire: true, syscallGroups: ["ceph"] };
  let spec: RbdSpec;
  try {
    spec = parseRbdSpec(file);
  } catch {
    return access;
  }
  if (rbd.librbdUnavailable() !== null) return access;
  const paths: DeclaredPath[] = [];
  const read = (p: string) => paths.push({ path: p, rights: ["read"] });
  for (const f of spec.conf !== null ? [spec.conf] : defaultConfFiles()) read(resolve(f));
  let c: rbd.RadosCluster;
  try {
    c = configure(file, spec);
  } catch {
    return { ...access, paths };
  }
  try {
    const monHost = safeConfGet(c, "mon_host");
    const tcp = monEndpoints(monHost);
    const min = Number(safeConfGet(c, "ms_bind_port_min")) || 6800;
    const max = Number(safeConfGet(c, "ms_bind_port_max")) || 7300;
    // Any host of the cluster: the daemons' addresses come from the maps at run time.
    for (let p = min; p <= max && p - min < 4096; p++) tcp.push(`*:${p}`);
    for (const k of safeConfGet(c, "keyring").split(/[,;\s]+/)) if (k !== "" && existsSync(k)) read(resolve(k));
    for (const key of ["keyfile", "log_file"]) {
      const v = safeConfGet(c, key);
      if (v === "") continue;
      if (key === "log_file") paths.push({ path: dirname(resolve(v)), rights: ["create"], directory: true });
      else if (existsSync(v)) read(resolve(v));
    }
    // A monitor named by host name is looked up when librados connects.
    if (tcp.some((ep) => /^[a-z]/i.test(ep) && !ep.startsWith("*"))) for (const f of ["/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf"]) if (existsSync(f)) read(f);
    return { ...access, paths, tcp };
  } finally {
    rbd.radosShutdown(c);
  }
}

// ---- requests ----

/** The write (or zeroes) is done; a flush makes it durable (FUA). */
const STEP_NONE = 0;
const STEP_FLUSH = 1;

class RbdRequest implements DiskRequest {
  readonly iov: IovecArray;
  busy = false;
  /** Bytes a read or write reports when done (0 for the others). */
  len = 0;
  next = STEP_NONE;

  constructor(readonly id: number, readonly tag: number, segMax: number, readonly queue: RbdQueue) {
    this.iov = new IovecArray(segMax);
  }
}

/** The bytes a request's iovecs hold (librbd reads or writes exactly that many). */
function iovTotal(r: RbdRequest): number {
  let total = 0;
  for (let i = 0; i < r.iov.count; i++) total += r.iov.lenAt(i);
  return total;
}

class RbdQueue implements DiskQueue {
  readonly slots: RequestSlots<RbdRequest>;
  unpublished = false;
  private closed = false;

  constructor(private readonly disk: RbdDisk, options: DiskQueueOptions, private readonly handlers: DiskQueueHandlers) {
    this.slots = new RequestSlots(options.depth, (id) => new RbdRequest(id, disk.register(this), options.segMax, this), "RBD disk");
  }

  get inFlight(): number {
    return this.slots.inFlight;
  }

  next(): DiskRequest | null {
    return this.slots.next();
  }

  private begin(req: DiskRequest): RbdRequest {
    const r = this.slots.take(req);
    r.next = STEP_NONE;
    r.len = 0;
    return r;
  }

  private complete(r: RbdRequest, result: number): void {
    this.unpublished = true;
    this.slots.finish(r, result, this.handlers);
  }

  /** librbd finished the request's current call with `ret` (-errno, or bytes/0). */
  finished(r: RbdRequest, ret: number): void {
    if (ret < 0) return this.complete(r, ret);
    if (r.next === STEP_FLUSH) {
      r.next = STEP_NONE;
      return this.started(r, rbd.rbdAioFlush(this.disk.image, this.disk.completion(r)));
    }
    this.complete(r, r.len);
  }

  /** After an rbd_aio_* call: a refusal (-errno) completes the request now (its completion never fires). */
  private started(r: RbdRequest, ret: number): void {
    if (ret < 0) {
      this.disk.dropCompletion();
      this.complete(r, ret);
    }
  }

  read(req: DiskRequest, offset: number, len: number): void {
    const r = this.begin(req);
    r.len = len;
    if (len === 0) return this.complete(r, 0);
    if (iovTotal(r) !== len) return this.complete(r, -EIO);
    this.started(r, rbd.rbdAioReadv(this.disk.image, r.iov.ptr, r.iov.count, offset, this.disk.completion(r)));
  }

  write(req: DiskRequest, offset: number, len: number, fua: boolean): void {
    const r = this.begin(req);
    r.len = len;
    if (this.disk.readOnly) return this.complete(r, -EROFS);
    if (len === 0) return this.complete(r, 0);
    if (iovTotal(r) !== len) return this.complete(r, -EIO);
    if (fua) r.next = STEP_FLUSH;
    this.started(r, rbd.rbdAioWritev(this.disk.image, r.iov.ptr, r.iov.count, offset, this.disk.completion(r)));
  }

  flush(req: DiskRequest): void {
    const r = this.begin(req);
    if (this.disk.readOnly) return this.complete(r, 0);
    this.started(r, rbd.rbdAioFlush(this.disk.image, this.disk.completion(r)));
  }

  discard(req: DiskRequest, offset: number, len: number): void {
    const r = this.begin(req);
    if (this.disk.readOnly) return this.complete(r, -EROFS);
    if (len === 0) return this.complete(r, 0);
    this.started(r, rbd.rbdAioDiscard(this.disk.image, offset, len, this.disk.completion(r)));
  }

  writeZeroes(req: DiskRequest, offset: number, len: number, flags: number): void {
    const r = this.begin(req);
    if (this.disk.readOnly) return this.complete(r, -EROFS);
    if (len === 0) return this.complete(r, 0);
    if ((flags & ZERO_FUA) !== 0) r.next = STEP_FLUSH;
    const zeroFlags = (flags & ZERO_UNMAP) !== 0 ? 0 : rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    this.started(r, rbd.rbdAioWriteZeroes(this.disk.image, offset, len, this.disk.completion(r), zeroFlags));
  }

  submit(): void {
    // Every call went to librbd as it was made.
  }

  publish(): void {
    if (!this.unpublished) return;
    this.unpublished = false;
    this.handlers.batchDone();
  }

  drain(): void {
    this.disk.waitFor(() => this.inFlight > 0);
    this.publish();
  }

  close(): void {
    if (this.closed) return;
    this.drain();
    this.closed = true;
    this.disk.detach(this);
  }
}

// ---- the disk ----

export class RbdDisk implements Disk {
  readonly size: number;
  readonly logicalBlockSize = 512;
  readonly physicalBlockSize = 4096;
  readonly readOnly: boolean;
  readonly multiThread = false;
  readonly description: string;
  readonly image: rbd.RbdImage;
  private readonly cluster: rbd.RadosCluster;
  private readonly ioctx: rbd.RadosIoctx;
  private readonly efd: number;
  /** Requests of every queue by tag (the completion's argument - 1). */
  private readonly byTag: RbdRequest[] = [];
  private readonly queues = new Set<RbdQueue>();
  private readonly comps = new BigUint64Array(POLL_BATCH);
  private readonly compsAddress = ptr(this.comps);
  /** The completion made for the last call, released here if librbd refused the call. */
  private lastCompletion: rbd.RbdCompletion | null = null;
  private loop: EventLoop | null = null;
  private watchLoop: EventLoop | null = null;
  /** The header-update watch (watchSize): its eventfd, which librbd's thread signals through a native callback, and handle. */
  private updateFd = -1;
  private updateHandle: bigint | null = null;
  private closed = false;
  private blocklistLogged = false;

  constructor(readonly resource: RbdDiskResource) {
    const r = resource;
    this.readOnly = r.readOnly;
    const spec = r.spec;
    this.cluster = connect(r.location, spec, DEFAULT_MOUNT_TIMEOUT_S);
    let opened: OpenImage;
    try {
      opened = openImage(r.location, this.cluster, spec, r.readOnly);
    } catch (e) {
      rbd.radosShutdown(this.cluster);
      throw e;
    }
    this.ioctx = opened.ioctx;
    this.image = opened.image;
    try {
      const size = rbd.rbdGetSize(this.image);
      if (size !== r.size) log.warn(`RBD ${rbdImageName(spec)}: the image is now ${size} bytes (it was ${r.size} when the device started)`);
      this.size = size - (size % this.logicalBlockSize);
      this.efd = eventfd();
      rbd.rbdSetImageNotification(this.image, this.efd);
    } catch (e) {
      closeImage(opened);
      rbd.radosShutdown(this.cluster);
      throw e;
    }
    const features = featureNames(BigInt(r.features));
    this.description = `RBD ${rbdImageName(spec)} (${[spec.snap !== null ? "snapshot, read-only" : "", features].filter((x) => x !== "").join(", ")})`;
  }

  /** A tag (completion argument) for a new request slot. */
  register(q: RbdQueue): number {
    void q;
    this.byTag.push(null as unknown as RbdRequest);
    return this.byTag.length;
  }

  /** A completion for `r`'s next librbd call. */
  completion(r: RbdRequest): rbd.RbdCompletion {
    this.byTag[r.tag - 1] = r;
    this.lastCompletion = rbd.rbdAioCreateCompletion(r.tag);
    return this.lastCompletion;
  }

  /** librbd refused the last call at once: its completion will never fire. */
  dropCompletion(): void {
    if (this.lastCompletion !== null) rbd.rbdAioRelease(this.lastCompletion);
    this.lastCompletion = null;
  }

  identity(): DiskIdentity {
    const r = this.resource;
    return { location: r.location, size: r.size, dev: RBD_IDENTITY_DEV, ino: hash48(`${r.poolId}/${r.spec.namespace}/${r.imageId}@${r.spec.snap ?? ""}`) };
  }

  currentSize(): number {
    return rbd.rbdGetSize(this.image);
  }

  /**
   * Tells `onResize` when the image's size changes (an `rbd resize` while we serve): librbd's
   * header-update watch signals an eventfd through a native callback (no JS on librbd's thread,
   * no timer), and the loop then reads the size (rbd_get_size refreshes the header once).
   */
  watchSize(loop: EventLoop, onResize: (size: number) => void): void {
    if (this.updateFd >= 0) throw new Error(`RBD disk ${this.resource.location}: watchSize called twice`);
    let known = this.size;
    this.updateFd = eventfd();
    try {
      this.updateHandle = rbd.rbdUpdateWatch(this.image, eventfdCallback(), eventfdArg(this.updateFd));
    } catch (e) {
      closeFd(this.updateFd);
      this.updateFd = -1;
      log.warn(`RBD ${rbdImageName(this.resource.spec)}: cannot watch the image for resizes (${(e as Error).message}); a resize needs a restart`);
      return;
    }
    loop.add(this.updateFd, EPOLLIN, () => {
      drainEventfd(this.updateFd);
      if (this.closed) return;
      try {
        const now = this.currentSize();
        const usable = now - (now % this.logicalBlockSize);
        if (usable !== known) {
          known = usable;
          onResize(usable);
        }
      } catch (e) {
        log.warn(`RBD ${rbdImageName(this.resource.spec)}: size check after a header update failed: ${(e as Error).message}`);
      }
    });
    this.watchLoop = loop;
  }

  attach(loop: EventLoop, options: DiskQueueOptions, handlers: DiskQueueHandlers): DiskQueue {
    if (this.loop !== null && this.loop !== loop) throw new Error(`RBD disk ${this.resource.location}: all of one instance's queues must be on one loop`);
    if (this.loop === null) {
      this.loop = loop;
      loop.add(this.efd, EPOLLIN, () => this.reap());
    }
    const q = new RbdQueue(this, options, handlers);
    this.queues.add(q);
    return q;
  }

  detach(q: RbdQueue): void {
    this.queues.delete(q);
    for (const r of q.slots.all) this.byTag[r.tag - 1] = null as unknown as RbdRequest;
  }

  /** Collects finished completions and hands each to its request's queue; then the queues publish. */
  private reap(): void {
    drainEventfd(this.efd);
    this.collect();
    for (const q of this.queues) q.publish();
  }

  private collect(): void {
    for (;;) {
      const n = rbd.rbdPollIoEvents(this.image, this.comps, this.compsAddress);
      for (let i = 0; i < n; i++) {
        const c = Number(this.comps[i]!) as unknown as rbd.RbdCompletion;
        const tag = rbd.rbdAioGetArg(c);
        const ret = rbd.rbdAioGetReturnValue(c);
        rbd.rbdAioRelease(c);
        if (ret === -ESHUTDOWN && !this.blocklistLogged) {
          this.blocklistLogged = true;
          log.error(`RBD ${this.resource.location}: the cluster blocklisted this client (another client took the image's exclusive lock, taking this one for dead): every request now fails; restart the backend once that client is gone`);
        }
        const r = this.byTag[tag - 1];
        if (r === undefined || r === null || !r.busy) {
          log.warn(`RBD ${this.resource.location}: a completion for no request in flight (tag ${tag})`);
          continue;
        }
        r.queue.finished(r, ret);
      }
      if (n < this.comps.length) return;
    }
  }

  /** Blocks (collecting completions) while `pending()` holds: a queue being stopped. */
  waitFor(pending: () => boolean): void {
    if (!pending()) return;
    const ep = new Epoll(1);
    try {
      ep.add(this.efd, EPOLLIN);
      while (pending()) {
        ep.wait(100);
        drainEventfd(this.efd);
        this.collect();
      }
    } finally {
      closeFd(ep.fd);
    }
  }

  flushNow(): void {
    if (this.readOnly) return;
    rbd.rbdFlush(this.image);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.updateFd >= 0) {
      this.watchLoop?.remove(this.updateFd);
      if (this.updateHandle !== null) {
        try {
          rbd.rbdUpdateUnwatch(this.image, this.updateHandle); // waits for a callback in progress
        } catch (e) {
          log.debug(`RBD ${this.resource.location}: unwatch failed: ${(e as Error).message}`);
        }
      }
    }
    this.loop?.remove(this.efd);
    try {
      rbd.rbdClose(this.image); // flushes librbd's cache
    } catch (e) {
      log.warn(`RBD ${this.resource.location}: close failed: ${(e as Error).message}`);
    }
    rbd.radosIoctxDestroy(this.ioctx);
    rbd.radosShutdown(this.cluster);
    closeFd(this.efd);
    if (this.updateFd >= 0) closeFd(this.updateFd); // after the unwatch: no callback writes it any more
  }
}

function featureNames(f: bigint): string {
  const names: [bigint, string][] = [
    [rbd.RBD_FEATURE_EXCLUSIVE_LOCK, "exclusive-lock"], [rbd.RBD_FEATURE_OBJECT_MAP, "object-map"],
    [rbd.RBD_FEATURE_FAST_DIFF, "fast-diff"], [rbd.RBD_FEATURE_JOURNALING, "journaling"], [rbd.RBD_FEATURE_LAYERING, "layering"],
  ];
  return names.filter(([bit]) => (f & bit) !== 0n).map(([, n]) => n).join(", ");
}

/** Builds the serving thread's RBD disk: connects and opens the image from this thread. */
export function openRbdDisk(resource: RbdDiskResource, _owner: boolean): RbdDisk {
  return new RbdDisk(resource);
}
