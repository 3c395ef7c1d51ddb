// io_uring(7) through the raw system calls (liburing's prep helpers are header-inline, so SQEs are
// filled here by hand). One IoUring is one ring: a submission queue of 64-byte SQEs and a
// completion queue of 16-byte CQEs, both mapped into this process. The ring memory is shared with
// the kernel, so the head/tail words go through Atomics (the barriers the ABI asks for) and each
// CQE field is read once. Nothing here knows about devices: see devices/block/disk/raw_uring.ts.
import { ptr, toArrayBuffer } from "bun:ffi";
import { libc, check, close, errno, SysError, SYS, EAGAIN, EINTR, EBUSY, EINVAL } from "./libc.ts";
import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS } from "./mem.ts";
import type { IovecArray } from "./io.ts";

const sys = libc.syscall;

// <linux/io_uring.h>
/** SQE opcodes (IORING_OP_*). */
export const IORING_OP = {
  READV: 1,
  WRITEV: 2,
  FSYNC: 3,
  /** A write of one flat buffer (addr, len): WRITEV without the iovec array to import. */
  WRITE: 23,
  /** Cancels the request whose user_data is the SQE's addr. */
  ASYNC_CANCEL: 14,
  /** Opens a file (an opcode no device submits: restricted rings refuse it). */
  OPENAT: 18,
  /**
   * A read that stays armed (6.7+): each time the fd has data it reads into a buffer the kernel
   * takes from a provided-buffer ring (IOSQE.BUFFER_SELECT) and posts a CQE with IORING_CQE_F.MORE,
   * until an error, the group running out of buffers (-ENOBUFS) or a cancel ends it (a CQE
   * without F_MORE). Only on pollable files (a tap, a pipe, a socket).
   */
  READ_MULTISHOT: 49,
} as const;
export const IORING_FSYNC_DATASYNC = 1;
/** SQE flags (IOSQE_*). */
export const IOSQE = {
  IO_DRAIN: 1 << 1,
  IO_LINK: 1 << 2,
  /** Go straight to io_uring's worker threads instead of trying the operation inline first. */
  ASYNC: 1 << 4,
  /** The read takes its buffer from the provided-buffer group named by the SQE's buf_group. */
  BUFFER_SELECT: 1 << 5,
} as const;
/** CQE flags (IORING_CQE_F_*): a provided buffer was used (its id in the flags' upper 16 bits); more CQEs follow. */
export const IORING_CQE_F = {
  BUFFER: 1 << 0,
  MORE: 1 << 1,
} as const;
export const IORING_CQE_BUFFER_SHIFT = 16;
/**
 * READV/WRITEV rw_flags: fail with -EAGAIN instead of waiting. Without it, a read or write that
 * would block on a non-blocking fd (a full tap or pipe, an empty one) is parked by io_uring until
 * the fd is ready, and its CQE comes later.
 */
export const RWF_NOWAIT = 0x8;
/** io_uring_setup flags (IORING_SETUP_*). */
const IORING_SETUP = {
  /** io_uring_params.cq_entries is the CQ size asked for. */
  CQSIZE: 1 << 3,
  CLAMP: 1 << 4,
  /** Set up disabled: restrictions can be registered until IORING_REGISTER.ENABLE_RINGS (5.10+). */
  R_DISABLED: 1 << 6,
  /** Keep submitting the rest of a batch when one SQE fails to prepare (5.18+). */
  SUBMIT_ALL: 1 << 7,
} as const;
const IORING_FEAT_SINGLE_MMAP = 1 << 0;
const IORING_ENTER_GETEVENTS = 1 << 0;
/** io_uring_register opcodes (IORING_REGISTER_*, IORING_UNREGISTER_*). */
const IORING_REGISTER = {
  EVENTFD: 4,
  UNREGISTER_EVENTFD: 5,
  RESTRICTIONS: 11,
  ENABLE_RINGS: 12,
  PBUF_RING: 22,
  UNREGISTER_PBUF_RING: 23,
} as const;
/** What one restriction allows (IORING_RESTRICTION_*). */
const IORING_RESTRICTION = {
  REGISTER_OP: 0,
  SQE_OP: 1,
  SQE_FLAGS_ALLOWED: 2,
} as const;

/** io_uring_register opcodes a restricted ring may be given (the others fail with EACCES). */
export const RegisterOp = {
  EVENTFD: IORING_REGISTER.EVENTFD,
  UNREGISTER_EVENTFD: IORING_REGISTER.UNREGISTER_EVENTFD,
  PBUF_RING: IORING_REGISTER.PBUF_RING,
  UNREGISTER_PBUF_RING: IORING_REGISTER.UNREGISTER_PBUF_RING,
} as const;

/**
 * What a ring set up with restrictions may do once enabled: the SQE opcodes it may carry and the
 * io_uring_register opcodes it may be given. Any other SQE completes with -EACCES, any other
 * register call fails with EACCES; no SQE flag (IOSQE_*) is allowed but those in `sqeFlags`.
 * seccomp cannot see what an SQE does, so this is what confines a ring in a sandboxed process.
 */
export interface RingRestrictions {
  sqeOps: readonly number[];
  registerOps: readonly number[];
  /** IOSQE_* flags SQEs may carry (none when absent). */
  sqeFlags?: number;
}
/** mmap offsets of the ring's parts (IORING_OFF_*). */
const IORING_OFF = {
  SQ_RING: 0,
  CQ_RING: 0x8000000,
  SQES: 0x10000000,
} as const;

const SQE_SIZE = 64;
const CQE_SIZE = 16;
/** struct io_uring_params: 40 bytes of scalars, then io_sqring_offsets and io_cqring_offsets. */
const PARAMS_SIZE = 120;
const SQ_OFF = 40;
const CQ_OFF = 80;

/**
 * A ring as plain data: its fd and the io_uring_params the kernel filled in, so a ring set up in
 * one thread (before serving) can be mapped and used in another (IoUring.attach). JSON-safe (the
 * params as byte values), since resources also cross the sandbox's re-exec as JSON. The fd
 * belongs to whoever set the ring up (closeRingHandle).
 */
export interface RingHandle {
  fd: number;
  params: number[];
}

/** Closes a ring set up with IoUring.setupHandle (after every IoUring attached to it is closed). */
export function closeRingHandle(h: RingHandle): void {
  close(h.fd);
}

/** IORING_REGISTER.RESTRICTIONS on a ring set up disabled (it takes effect at ENABLE_RINGS). */
function registerRestrictions(fd: number, r: RingRestrictions): void {
  const entries: [number, number][] = [
    ...r.sqeOps.map((op): [number, number] => [IORING_RESTRICTION.SQE_OP, op]),
    ...r.registerOps.map((op): [number, number] => [IORING_RESTRICTION.REGISTER_OP, op]),
    ...(r.sqeFlags ? [[IORING_RESTRICTION.SQE_FLAGS_ALLOWED, r.sqeFlags] as [number, number]] : []),
  ];
  // struct io_uring_restriction: u16 opcode, u8 register_op/sqe_op/sqe_flags, u8 resv, u32 resv2[3].
  const RESTRICTION_SIZE = 16;
  const buf = new Uint8Array(Math.max(1, entries.length) * RESTRICTION_SIZE);
  const v = new DataView(buf.buffer);
  entries.forEach(([kind, op], i) => {
    v.setUint16(i * RESTRICTION_SIZE, kind, true);
    v.setUint8(i * RESTRICTION_SIZE + 2, op);
  });
  check(sys(SYS.io_uring_register, fd, IORING_REGISTER.RESTRICTIONS, ptr(buf), entries.length, 0, 0, 0), "io_uring_register(RESTRICTIONS)");
}

/** A CQE as handed to reap()'s callback. `res` is the operation's return value or -errno. */
export type CqeHandler = (userData: number, res: number, flags: number) => void;

export class IoUring {
  readonly fd: number;
  /** Submission queue entries (a power of 2; at most this many SQEs are queued at once). */
  readonly entries: number;
  readonly cqEntries: number;
  readonly features: number;

  private readonly ringPtr: number;
  private readonly ringLen: number;
  private readonly cqPtr: number; // == ringPtr with SINGLE_MMAP
  private readonly cqLen: number;
  private readonly sqesPtr: number;
  private readonly sqesLen: number;

  /** The SQ ring words (head/tail are indexes into it, in u32 units). */
  private readonly sqRing: Uint32Array;
  private readonly sqHead: number;
  private readonly sqTail: number;
  private readonly sqMask: number;
  private readonly cqRing: Uint32Array;
  private readonly cqResI32: Int32Array;
  private readonly cqHead: number;
  private readonly cqTail: number;
  private readonly cqMask: number;
  /** u32 index of the first CQE. */
  private readonly cqes: number;
  private readonly sqes: Uint32Array;

  /** Our SQ tail: SQEs up to here are filled; the kernel sees them once submit() publishes it. */
  private tail = 0;
  private closed = false;
  private readonly eventfdArg = new Int32Array(1);
  /** close() closes the fd too (not for a ring attached from a RingHandle). */
  private ownsFd = true;

  private constructor(fd: number, p: DataView) {
    this.fd = fd;
    this.entries = p.getUint32(0, true);
    this.cqEntries = p.getUint32(4, true);
    this.features = p.getUint32(20, true);
    const sq = (i: number) => p.getUint32(SQ_OFF + 4 * i, true);
    const cq = (i: number) => p.getUint32(CQ_OFF + 4 * i, true);
    // sq_off: head, tail, ring_mask, ring_entries, flags, dropped, array; cq_off: head, tail,
    // ring_mask, ring_entries, overflow, cqes.
    const sqLen = sq(6) + 4 * this.entries;
    const cqLen = cq(5) + CQE_SIZE * this.cqEntries;
    const single = (this.features & IORING_FEAT_SINGLE_MMAP) !== 0;
    const mapRing = (len: number, off: number) => mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
    this.ringLen = single ? Math.max(sqLen, cqLen) : sqLen;
    this.ringPtr = mapRing(this.ringLen, IORING_OFF.SQ_RING);
    this.cqLen = single ? 0 : cqLen;
    this.cqPtr = single ? this.ringPtr : mapRing(cqLen, IORING_OFF.CQ_RING);
    this.sqesLen = SQE_SIZE * this.entries;
    this.sqesPtr = mapRing(this.sqesLen, IORING_OFF.SQES);

    this.sqRing = new Uint32Array(toArrayBuffer(this.ringPtr as never, 0, this.ringLen));
    this.sqHead = sq(0) / 4;
    this.sqTail = sq(1) / 4;
    this.sqMask = this.sqRing[sq(2) / 4]!;
    const cqBuf = toArrayBuffer(this.cqPtr as never, 0, single ? this.ringLen : cqLen);
    this.cqRing = new Uint32Array(cqBuf);
    this.cqResI32 = new Int32Array(cqBuf);
    this.cqHead = cq(0) / 4;
    this.cqTail = cq(1) / 4;
    this.cqMask = this.cqRing[cq(2) / 4]!;
    this.cqes = cq(5) / 4;
    this.sqes = new Uint32Array(toArrayBuffer(this.sqesPtr as never, 0, this.sqesLen));
    // SQ slot i always carries SQE i (the indirection array is the identity), as liburing does.
    const array = sq(6) / 4;
    for (let i = 0; i < this.entries; i++) this.sqRing[array + i] = i;
    this.tail = Atomics.load(this.sqRing, this.sqTail);
  }

  /**
   * io_uring_setup(2) without mapping: the ring as plain data, for a thread that will attach to it.
   * Flags as setup()'s.
   */
  static setupHandle(entries: number, restrictions?: RingRestrictions, cqEntries = 0): RingHandle {
    const ring = IoUring.setup(entries, restrictions === undefined ? 0 : IORING_SETUP.R_DISABLED, cqEntries);
    const params = ring.paramsBytes!;
    ring.ownsFd = false;
    ring.close();
    const h = { fd: ring.fd, params: [...params] };
    if (restrictions === undefined) return h;
    try {
      registerRestrictions(h.fd, restrictions);
      check(sys(SYS.io_uring_register, h.fd, IORING_REGISTER.ENABLE_RINGS, 0, 0, 0, 0, 0), "io_uring_register(ENABLE_RINGS)");
    } catch (e) {
      close(h.fd);
      throw e;
    }
    return h;
  }

  /** Maps a ring set up elsewhere (setupHandle) into this thread; close() then leaves its fd open. */
  static attach(h: RingHandle): IoUring {
    if (h.params.length !== PARAMS_SIZE) throw new Error(`io_uring: a ring handle with ${h.params.length} bytes of params (${PARAMS_SIZE} expected)`);
    const ring = new IoUring(h.fd, new DataView(Uint8Array.from(h.params).buffer));
    ring.ownsFd = false;
    return ring;
  }

  /** The io_uring_params the ring was set up with (for setupHandle). */
  private paramsBytes: Uint8Array | null = null;

  /** io_uring_setup(2) with `entries` SQ entries (rounded up to a power of 2, clamped);
   * `extraFlags`: IORING_SETUP_* besides ours; `cqEntries`: CQ entries (0: twice `entries`). */
  static setup(entries: number, extraFlags = 0, cqEntries = 0): IoUring {
    const params = new Uint8Array(PARAMS_SIZE);
    const v = new DataView(params.buffer);
    let fd = -1;
    for (const flags of [IORING_SETUP.CLAMP | IORING_SETUP.SUBMIT_ALL, IORING_SETUP.CLAMP]) {
      params.fill(0);
      v.setUint32(8, flags | extraFlags | (cqEntries > 0 ? IORING_SETUP.CQSIZE : 0), true);
      if (cqEntries > 0) v.setUint32(4, cqEntries, true);
      const r = sys(SYS.io_uring_setup, entries, ptr(params), 0, 0, 0, 0, 0);
      if (r >= 0) {
        fd = Number(r);
        break;
      }
      const e = errno();
      if (e !== EINVAL) throw new SysError("io_uring_setup", e); // EINVAL: an older kernel, try fewer flags
      if (flags === IORING_SETUP.CLAMP) throw new SysError("io_uring_setup", e);
    }
    try {
      const ring = new IoUring(fd, v);
      ring.paramsBytes = params.slice();
      return ring;
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** SQEs filled but not yet consumed by the kernel. */
  get unsubmitted(): number {
    return (this.tail - Atomics.load(this.sqRing, this.sqHead)) >>> 0;
  }

  /** Free SQ slots. */
  get space(): number {
    return this.entries - this.unsubmitted;
  }

  /**
   * Queues one SQE (not yet visible to the kernel: see submit()). Returns false when the SQ is
   * full. `offset` and `addr` are exact integers below 2^53; `userData` a u32.
   */
  prep(opcode: number, fd: number, addr: number, len: number, offset: number, userData: number, sqeFlags = 0, opFlags = 0, bufGroup = 0): boolean {
    if (this.space === 0) return false;
    const w = (this.tail & this.sqMask) * (SQE_SIZE / 4);
    const s = this.sqes;
    s[w] = opcode | (sqeFlags << 8); // opcode u8, flags u8, ioprio u16 = 0
    s[w + 1] = fd;
    s[w + 2] = offset >>> 0;
    s[w + 3] = Math.floor(offset / 0x1_0000_0000);
    s[w + 4] = addr >>> 0;
    s[w + 5] = Math.floor(addr / 0x1_0000_0000);
    s[w + 6] = len;
    s[w + 7] = opFlags; // rw_flags / fsync_flags
    s[w + 8] = userData;
    s[w + 9] = 0;
    s[w + 10] = bufGroup; // buf_index / buf_group u16, personality u16 = 0
    s.fill(0, w + 11, w + 16); // splice_fd_in, addr3
    this.tail = (this.tail + 1) >>> 0;
    return true;
  }

  /** READV of `iov` (its current entries) at `offset`. */
  prepReadv(fd: number, iov: IovecArray, offset: number, userData: number, sqeFlags = 0): boolean {
    return this.prep(IORING_OP.READV, fd, iov.ptr, iov.count, offset, userData, sqeFlags);
  }

  /** WRITEV of `iov` at `offset`. */
  prepWritev(fd: number, iov: IovecArray, offset: number, userData: number, sqeFlags = 0): boolean {
    return this.prep(IORING_OP.WRITEV, fd, iov.ptr, iov.count, offset, userData, sqeFlags);
  }

  /** READ_MULTISHOT of `fd` into buffers of provided-buffer group `bufGroup` (see BufferRing). */
  prepReadMultishot(fd: number, bufGroup: number, userData: number): boolean {
    return this.prep(IORING_OP.READ_MULTISHOT, fd, 0, 0, 0, userData, IOSQE.BUFFER_SELECT, 0, bufGroup);
  }

  /** ASYNC_CANCEL of the request submitted with user_data `target` (a u32 here). */
  prepCancel(target: number, userData: number): boolean {
    return this.prep(IORING_OP.ASYNC_CANCEL, -1, target, 0, 0, userData);
  }

  /** FSYNC of the whole file; `datasync` = fdatasync semantics. */
  prepFsync(fd: number, datasync: boolean, userData: number, sqeFlags = 0): boolean {
    return this.prep(IORING_OP.FSYNC, fd, 0, 0, 0, userData, sqeFlags, datasync ? IORING_FSYNC_DATASYNC : 0);
  }

  /**
   * Publishes the queued SQEs and hands them to the kernel with one io_uring_enter; with
   * `waitFor` > 0 also blocks until that many CQEs are available. Returns the SQEs consumed.
   * EAGAIN/EBUSY (kernel short of resources, or completions backed up) return 0: the SQEs stay
   * queued and the next submit() retries them.
   */
  submit(waitFor = 0): number {
    Atomics.store(this.sqRing, this.sqTail, this.tail); // release: the SQEs before it are filled
    const flags = waitFor > 0 ? IORING_ENTER_GETEVENTS : 0;
    for (;;) {
      const toSubmit = this.unsubmitted;
      if (toSubmit === 0 && waitFor === 0) return 0;
      const r = sys(SYS.io_uring_enter, this.fd, toSubmit, waitFor, flags, 0, 0, 0);
      if (r >= 0) return Number(r);
      const e = errno();
      if (e === EINTR) continue;
      if (e === EAGAIN || e === EBUSY) return 0;
      throw new SysError("io_uring_enter", e);
    }
  }

  /** CQEs the kernel has posted and we have not reaped. */
  get ready(): number {
    return (Atomics.load(this.cqRing, this.cqTail) - this.cqRing[this.cqHead]!) >>> 0;
  }

  /**
   * Submits the `n` queued SQEs and reaps until all `n` of their CQEs came: for operations that
   * complete at once (RWF_NOWAIT on non-blocking fds: done or -EAGAIN), so one io_uring_enter
   * normally does it; the loop covers a kernel short of resources. Throws when they do not come
   * (the caller falls back to plain system calls).
   */
  submitAndReapAll(n: number, handler: CqeHandler, what: string): void {
    let reaped = 0;
    for (let tries = 0; reaped < n; tries++) {
      this.submit(n - reaped);
      reaped += this.reap(handler);
      if (tries > 1000) throw new Error(`io_uring: ${n - reaped} of ${n} ${what} completions missing`);
    }
  }

  /**
   * Calls `handler` for every available CQE, in order, then gives their slots back to the kernel
   * (one head store for the batch). Returns how many were reaped. The handler may queue SQEs.
   */
  reap(handler: CqeHandler): number {
    let head = this.cqRing[this.cqHead]!; // written only by us
    const tail = Atomics.load(this.cqRing, this.cqTail); // acquire: the CQEs before it are complete
    if (head === tail) return 0;
    let n = 0;
    try {
      while (head !== tail) {
        const c = this.cqes + (head & this.cqMask) * (CQE_SIZE / 4);
        const userData = this.cqRing[c]!;
        const res = this.cqResI32[c + 2]!;
        const flags = this.cqRing[c + 3]!;
        head = (head + 1) >>> 0;
        n++;
        handler(userData, res, flags);
      }
    } finally {
      Atomics.store(this.cqRing, this.cqHead, head); // release: the kernel may reuse those slots
    }
    return n;
  }

  /** Makes the kernel signal `efd` whenever it posts a CQE (IORING_REGISTER.EVENTFD). */
  registerEventfd(efd: number): void {
    this.eventfdArg[0] = efd;
    check(sys(SYS.io_uring_register, this.fd, IORING_REGISTER.EVENTFD, ptr(this.eventfdArg), 1, 0, 0, 0), "io_uring_register(EVENTFD)");
  }

  unregisterEventfd(): void {
    check(sys(SYS.io_uring_register, this.fd, IORING_REGISTER.UNREGISTER_EVENTFD, 0, 0, 0, 0, 0), "io_uring_register(UNREGISTER_EVENTFD)");
  }

  /**
   * Unmaps the rings and closes the ring fd. Requests still in flight are cancelled by the kernel,
   * which waits for them; callers drain first so nothing is in flight.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    munmap(this.sqesPtr, this.sqesLen);
    if (this.cqLen > 0) munmap(this.cqPtr, this.cqLen);
    munmap(this.ringPtr, this.ringLen);
    if (this.ownsFd) close(this.fd);
  }
}

/** struct io_uring_buf_reg: u64 ring_addr, u32 ring_entries, u16 bgid, u16 flags, u64 resv[3]. */
const BUF_REG_SIZE = 40;
/** struct io_uring_buf: u64 addr, u32 len, u16 bid, u16 resv (entry 0's resv is the ring's tail). */
const BUF_SIZE = 16;

/**
 * A provided-buffer ring (IORING_REGISTER.PBUF_RING, 5.19+) of `count` buffers of `size` bytes
 * each, in memory of our own: reads with IOSQE.BUFFER_SELECT on group `group` take a buffer from
 * it and name it in their CQE (IORING_CQE_F.BUFFER, id in the flags' upper bits). A buffer goes
 * back with give() and is visible to the kernel after publish(). Until then the kernel leaves it
 * alone: the bytes read into it stay ours to copy out.
 */
export class BufferRing {
  /** The buffers' memory: buffer `id` is bytes [id * size, (id + 1) * size). */
  readonly bytes: Uint8Array;
  private readonly bufsPtr: number;
  private readonly ringPtr: number;
  private readonly ringLen: number;
  private readonly entries: Uint32Array;
  private readonly tailWord: Uint16Array;
  private tail = 0;
  private registered = false;

  /** Registers the ring with `ring` (and gives it every buffer). `count`: a power of 2, ≤ 32768. */
  constructor(private readonly ring: IoUring, readonly group: number, readonly count: number, readonly size: number) {
    if (count <= 0 || count > 32768 || (count & (count - 1)) !== 0) throw new Error(`BufferRing: ${count} buffers (a power of 2 up to 32768)`);
    this.ringLen = Math.max(4096, count * BUF_SIZE);
    this.ringPtr = mmap(this.ringLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    try {
      this.bufsPtr = mmap(count * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    } catch (e) {
      munmap(this.ringPtr, this.ringLen);
      throw e;
    }
    const ringBuf = toArrayBuffer(this.ringPtr as never, 0, this.ringLen);
    this.entries = new Uint32Array(ringBuf);
    this.tailWord = new Uint16Array(ringBuf);
    this.bytes = new Uint8Array(toArrayBuffer(this.bufsPtr as never, 0, count * size));
    const reg = new Uint8Array(BUF_REG_SIZE);
    const v = new DataView(reg.buffer);
    v.setBigUint64(0, BigInt(this.ringPtr), true);
    v.setUint32(8, count, true);
    v.setUint16(12, group, true);
    try {
      check(sys(SYS.io_uring_register, ring.fd, IORING_REGISTER.PBUF_RING, ptr(reg), 1, 0, 0, 0), "io_uring_register(PBUF_RING)");
    } catch (e) {
      munmap(this.bufsPtr, count * size);
      munmap(this.ringPtr, this.ringLen);
      throw e;
    }
    this.registered = true;
    for (let id = 0; id < count; id++) this.give(id);
    this.publish();
  }

  /** Buffer `id`'s first `len` bytes (a view: valid until the buffer is given back). */
  view(id: number, len: number): Uint8Array {
    return this.bytes.subarray(id * this.size, id * this.size + Math.min(len, this.size));
  }

  /** Queues buffer `id` for the kernel again (seen at the next publish()). */
  give(id: number): void {
    const e = (this.tail & (this.count - 1)) * (BUF_SIZE / 4);
    const addr = this.bufsPtr + id * this.size;
    this.entries[e] = addr >>> 0;
    this.entries[e + 1] = Math.floor(addr / 0x1_0000_0000);
    this.entries[e + 2] = this.size;
    // bid u16, then resv u16 — which in entry 0 is the tail word: write bid alone.
    this.tailWord[e * 2 + 6] = id;
    this.tail = (this.tail + 1) & 0xffff;
  }

  /** Makes the buffers given since the last publish available to the kernel. */
  publish(): void {
    Atomics.store(this.tailWord, 7, this.tail); // release: the entries before it are written
  }

  /**
   * Unregisters the ring and frees the memory. No read may still be armed on the group (cancel it
   * first): the kernel would write into freed memory.
   */
  close(): void {
    if (!this.registered) return;
    this.registered = false;
    const reg = new Uint8Array(BUF_REG_SIZE);
    new DataView(reg.buffer).setUint16(12, this.group, true);
    check(sys(SYS.io_uring_register, this.ring.fd, IORING_REGISTER.UNREGISTER_PBUF_RING, ptr(reg), 1, 0, 0, 0), "io_uring_register(UNREGISTER_PBUF_RING)");
    munmap(this.bufsPtr, this.count * this.size);
    munmap(this.ringPtr, this.ringLen);
  }
}
