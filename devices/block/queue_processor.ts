// Serves one virtio-blk request queue. It depends only on (queue, image, policy, aio mode), so it
// can run on any thread that has the queue: the image is an fd plus geometry, the policy is plain
// data, and the io_uring (if any) is created here, in the thread that serves the queue.
//
// I/O path per request: the chain is walked (core), the header read from guest memory in place,
// iovecs built pointing straight into the mapped guest regions, then the data moves between the
// image and guest memory with no copy:
// - aio "sync": ONE preadv/pwritev per request, completed before the next is popped (excellent on
//   page-cache images; with O_DIRECT on a real disk it serializes the I/O);
// - aio "io_uring": a READV/WRITEV SQE per request (FSYNC for FLUSH), ONE io_uring_enter per batch,
//   completions reaped in batches when the ring's eventfd fires (see uring_engine.ts).
// Used entries are published once per batch of pops or of completions, which notifies at most
// once, as EVENT_IDX allows. DISCARD, WRITE_ZEROES and GET_ID are rare and stay synchronous.
import { IovecArray } from "../../ffi/io.ts";
import { SysError } from "../../ffi/libc.ts";
import { processQueue, watchKick, TurnBudget } from "../../src/queue_serving.ts";
import { NotifyCoalescer } from "../../src/notify_coalescer.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { ChainReader, ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import { log } from "../../src/log.ts";
import type { BlockImage } from "./image.ts";
import { UringEngine, OP_READ, OP_WRITE, type IoSlot } from "./uring_engine.ts";
import { RequestHeader } from "./request.ts";
import {
  VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
  REQUEST_HEADER_SIZE, DISCARD_SEGMENT_SIZE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VIRTIO_BLK_ID_BYTES,
  SECTOR_SHIFT, MAX_REQUEST_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
} from "./config.ts";

/** What a queue needs to know about the device besides the image. `writethrough` may change. */
export interface BlockPolicy {
  readOnly: boolean;
  /** DISCARD offered (--sparse on a writable image). */
  discard: boolean;
  /** WRITE_ZEROES offered (writable image). */
  writeZeroes: boolean;
  /** May WRITE_ZEROES with UNMAP deallocate (--sparse)? */
  mayUnmap: boolean;
  /** Every completed write is made stable before it completes (no FLUSH, or writeback = 0). */
  writethrough: boolean;
  /** GET_ID answer: exactly 20 bytes, NUL-padded. */
  serial: Uint8Array;
  capacitySectors: number;
  /** Logical block size in bytes: offsets and lengths must be multiples of it. */
  blkSize: number;
  /** Most data segments (iovecs) per request. */
  segMax: number;
  /** Interrupt coalescing window for a busy queue, in µs (0: notify at every flush). */
  coalesceUs: number;
}

/** Per-queue counters, for logs and tests. */
export interface QueueStats {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  unsupported: number;
}

const LOGGED_ERRORS = 8;

/** How reads, writes and flushes are done: synchronously, or asynchronously through io_uring. */
export type AioMode = "sync" | "io_uring";

/** handle()'s answer for a request that completes later (through the engine). */
const IN_FLIGHT = -1;

export class QueueProcessor {
  readonly stats: QueueStats = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, unsupported: 0 };
  private readonly guestErrors: GuestErrorLog;
  private readonly reader = new ChainReader();
  private readonly syncWriter = new ChainWriter();
  private readonly iov: IovecArray;
  private readonly header = new RequestHeader();
  private readonly segments = new Uint8Array(MAX_DISCARD_SEGMENTS * DISCARD_SEGMENT_SIZE);
  private readonly segmentsView = new DataView(this.segments.buffer);
  /** The asynchronous engine (aio io_uring), or null to complete every request synchronously. */
  readonly engine: UringEngine | null;
  /** The per-turn work allowance while served from a loop (see serve). */
  private budget: TurnBudget | null = null;
  /** The ring was full: popping stopped, and resumes on the next batch of completions. */
  private stalled = false;
  private readonly handleChain = (chain: DescriptorChain): boolean => {
    if (this.engine !== null && this.engine.nextSlot() === null) {
      this.queue.undoPop();
      this.stalled = true;
      return false;
    }
    const used = this.handle(chain);
    if (used !== IN_FLIGHT) this.queue.add(chain.head, used);
    return true;
  };
  /** Before a batch is published: submit its I/O, and take the completions that are ready already
   * (page-cache hits often complete inside the submit), so they share the batch's notification. */
  private readonly submitBatch = (): void => {
    this.engine!.submit();
    this.engine!.complete();
  };
  private readonly slotDone = (slot: IoSlot, error: Error | null): void => this.completeSlot(slot, error);
  /** Sectors per logical block, minus 1: sector numbers and counts must have these bits clear
   * (`&` sees the low 32 bits of the exact integer, which is all the mask needs). */
  private readonly sectorMask: number;

  /**
   * With `aio` "io_uring", requests are served through an io_uring of this queue; if the ring
   * cannot be set up (no io_uring here: EPERM, ENOSYS...), synchronously, with a warning.
   */
  constructor(readonly queue: Virtqueue, private readonly image: BlockImage, private readonly policy: BlockPolicy, aio: AioMode = "sync") {
    this.iov = new IovecArray(policy.segMax);
    this.guestErrors = new GuestErrorLog(`block queue ${queue.index}`, "debug");
    this.sectorMask = (policy.blkSize >> SECTOR_SHIFT) - 1;
    let engine: UringEngine | null = null;
    if (aio === "io_uring") {
      try {
        engine = new UringEngine(image, queue.size, policy.segMax, this.slotDone);
      } catch (e) {
        log.warn(`block queue ${queue.index}: io_uring unavailable (${(e as Error).message}); serving it synchronously`);
      }
    }
    this.engine = engine;
  }

  /** Serves the queue from `loop` (kicks and completions); returns the function that stops it,
   * which returns once every request in flight is complete and published. */
  serve(loop: EventLoop): () => void {
    let live = true;
    this.budget = new TurnBudget(loop, () => {
      if (live) this.run();
    });
    const coalescer = this.policy.coalesceUs > 0 ? new NotifyCoalescer(loop, this.queue, this.policy.coalesceUs) : null;
    const unwatch = watchKick(loop, this.queue, () => this.run());
    const engine = this.engine;
    engine?.attach(loop, () => this.onCompletions());
    return () => {
      live = false;
      unwatch();
      engine?.close(); // waits for the requests in flight (GET_VRING_BASE needs a final position)
      this.queue.flush();
      coalescer?.dispose();
    };
  }

  /** Serves every available request, publishing the completions once at the end. */
  run(): void {
    this.stalled = false;
    processQueue(this.queue, this.handleChain, this.engine === null ? undefined : this.submitBatch, this.budget ?? undefined);
  }

  /** The ring's eventfd fired: reap, then publish the batch (popping more if the ring was full). */
  private onCompletions(): void {
    this.engine!.complete();
    if (this.stalled) this.run(); // publishes the completions with the new batch
    else this.queue.flush();
  }

  /** Handles one chain; returns the used length (0 when there is no byte to put a status in), or
   * IN_FLIGHT when the engine completes it later. */
  handle(chain: DescriptorChain): number {
    this.stats.requests++;
    // Reused cursors: the engine's next slot owns the writer its completion needs.
    const reader = this.reader.reset(chain);
    const writer = (this.engine === null ? this.syncWriter : this.engine.nextSlot()!.writer).reset(chain);
    if (!writer.carveStatus()) {
      this.guestError(chain, "request has no writable byte for its status; completed with length 0");
      return 0;
    }
    let status: number;
    if (!this.header.read(reader)) {
      this.guestError(chain, `request header shorter than ${REQUEST_HEADER_SIZE} bytes`);
      status = VIRTIO_BLK_S_IOERR;
    } else {
      status = this.execute(chain, reader, writer);
      if (status === IN_FLIGHT) return IN_FLIGHT;
    }
    return this.finish(chain, writer, status);
  }

  /** Counts the outcome, stores the status byte; returns the used length. */
  private finish(chain: DescriptorChain, writer: ChainWriter, status: number): number {
    if (status === VIRTIO_BLK_S_IOERR) this.stats.errors++;
    else if (status === VIRTIO_BLK_S_UNSUPP) this.stats.unsupported++;
    writer.writeStatus(status);
    // Like QEMU: the whole device-writable part counts as written (data for reads, then status).
    return chain.writableLen;
  }

  /** A request the engine finished: status, accounting, used entry (published with the batch). */
  private completeSlot(slot: IoSlot, error: Error | null): void {
    const chain = slot.chain!;
    let status = VIRTIO_BLK_S_OK;
    if (error !== null) {
      const what = slot.op === OP_READ ? "read" : slot.op === OP_WRITE ? "write" : "flush";
      status = this.hostError(what, Math.floor(slot.offset / 512), slot.len, error);
    } else if (slot.op === OP_READ) this.stats.bytesRead += slot.len;
    else if (slot.op === OP_WRITE) this.stats.bytesWritten += slot.len;
    this.queue.add(chain.head, this.finish(chain, slot.status!, status));
  }

  /** The iovec array for the request being handled: the engine's next slot's, or the shared one. */
  private requestIov(): IovecArray {
    const iov = this.engine === null ? this.iov : this.engine.nextSlot()!.iov; // handleChain checked there is one
    iov.clear();
    return iov;
  }

  private execute(chain: DescriptorChain, reader: ChainReader, writer: ChainWriter): number {
    const p = this.policy;
    const { type, sector } = this.header;
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const len = writer.remaining;
        if (!this.checkRange(chain, sector, len, "read")) return VIRTIO_BLK_S_IOERR;
        const iov = this.requestIov();
        if (!writer.iovecs(iov, len)) return this.tooManySegments(chain);
        if (len === 0) return VIRTIO_BLK_S_OK;
        if (this.engine !== null) {
          this.engine.read(chain, writer, sector * 512, len);
          return IN_FLIGHT;
        }
        try {
          this.image.read(this.iov, sector * 512, len);
        } catch (e) {
          return this.hostError("read", sector, len, e);
        }
        this.stats.bytesRead += len;
        return VIRTIO_BLK_S_OK;
      }
      case VIRTIO_BLK_T_OUT: {
        if (p.readOnly) return this.refuseReadOnly(chain, "write");
        const len = reader.remaining;
        if (!this.checkRange(chain, sector, len, "write")) return VIRTIO_BLK_S_IOERR;
        const iov = this.requestIov();
        if (!reader.iovecs(iov, len)) return this.tooManySegments(chain);
        if (len === 0) return VIRTIO_BLK_S_OK;
        if (this.engine !== null) {
          this.engine.write(chain, writer, sector * 512, len, p.writethrough);
          return IN_FLIGHT;
        }
        try {
          this.image.write(this.iov, sector * 512, len);
          if (p.writethrough) this.image.flush();
        } catch (e) {
          return this.hostError("write", sector, len, e);
        }
        this.stats.bytesWritten += len;
        return VIRTIO_BLK_S_OK;
      }
      case VIRTIO_BLK_T_FLUSH:
        if (this.engine !== null && !p.readOnly) {
          this.engine.flush(chain, writer);
          return IN_FLIGHT;
        }
        try {
          this.image.flush();
        } catch (e) {
          return this.hostError("flush", 0, 0, e);
        }
        return VIRTIO_BLK_S_OK;
      case VIRTIO_BLK_T_GET_ID:
        if (writer.remaining < VIRTIO_BLK_ID_BYTES) {
          this.guestError(chain, `GET_ID buffer of ${writer.remaining} bytes (needs ${VIRTIO_BLK_ID_BYTES})`);
          return VIRTIO_BLK_S_IOERR;
        }
        writer.write(p.serial);
        return VIRTIO_BLK_S_OK;
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        return this.discardOrZero(chain, reader, type === VIRTIO_BLK_T_WRITE_ZEROES);
      default:
        this.guestError(chain, `unsupported request type ${type}`);
        return VIRTIO_BLK_S_UNSUPP;
    }
  }

  /** IN/OUT: length a multiple of the block size, sector aligned to it, range inside the disk. */
  private checkRange(chain: DescriptorChain, sector: number, len: number, what: string): boolean {
    const p = this.policy;
    if (len > MAX_REQUEST_BYTES) {
      this.guestError(chain, `${what} of ${len} bytes exceeds the ${MAX_REQUEST_BYTES}-byte request limit`);
      return false;
    }
    if (len % p.blkSize !== 0 || (sector & this.sectorMask) !== 0) {
      this.guestError(chain, `${what} of ${len} bytes at sector ${sector} is not aligned to ${p.blkSize}-byte blocks`);
      return false;
    }
    if (sector > p.capacitySectors || len / 512 > p.capacitySectors - sector) {
      this.guestError(chain, `${what} of ${len} bytes at sector ${sector} is beyond the disk's ${p.capacitySectors} sectors`);
      return false;
    }
    return true;
  }

  private discardOrZero(chain: DescriptorChain, reader: ChainReader, zero: boolean): number {
    const p = this.policy;
    const what = zero ? "write zeroes" : "discard";
    if (p.readOnly) return this.refuseReadOnly(chain, what);
    if (!(zero ? p.writeZeroes : p.discard)) {
      this.guestError(chain, `${what} is not offered by this device`);
      return VIRTIO_BLK_S_UNSUPP;
    }
    const bytes = reader.remaining;
    if (bytes <= 0 || bytes % DISCARD_SEGMENT_SIZE !== 0) {
      this.guestError(chain, `${what} payload of ${bytes} bytes is not a list of 16-byte segments`);
      return VIRTIO_BLK_S_IOERR;
    }
    const count = bytes / DISCARD_SEGMENT_SIZE;
    if (count > MAX_DISCARD_SEGMENTS) {
      this.guestError(chain, `${what} with ${count} segments (at most ${MAX_DISCARD_SEGMENTS})`);
      return VIRTIO_BLK_S_UNSUPP;
    }
    reader.read(this.segments.subarray(0, bytes));
    const v = this.segmentsView;
    // Check every segment before touching the image.
    for (let i = 0; i < count; i++) {
      const o = i * DISCARD_SEGMENT_SIZE;
      const sector = v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
      const sectors = v.getUint32(o + 8, true);
      const flags = v.getUint32(o + 12, true);
      const allowed = zero ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
      if ((flags & ~allowed) !== 0) {
        this.guestError(chain, `${what} segment with flags 0x${flags.toString(16)}`);
        return VIRTIO_BLK_S_UNSUPP;
      }
      if (sectors > MAX_DISCARD_SECTORS) {
        this.guestError(chain, `${what} of ${sectors} sectors (at most ${MAX_DISCARD_SECTORS})`);
        return VIRTIO_BLK_S_IOERR;
      }
      if (((sector & this.sectorMask) | (sectors & this.sectorMask)) !== 0) {
        this.guestError(chain, `${what} at sector ${sector} (+${sectors}) is not aligned to ${p.blkSize}-byte blocks`);
        return VIRTIO_BLK_S_IOERR;
      }
      if (sector > p.capacitySectors || sectors > p.capacitySectors - sector) {
        this.guestError(chain, `${what} at sector ${sector} (+${sectors}) is beyond the disk's ${p.capacitySectors} sectors`);
        return VIRTIO_BLK_S_IOERR;
      }
    }
    for (let i = 0; i < count; i++) {
      const o = i * DISCARD_SEGMENT_SIZE;
      const sector = v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
      const sectors = v.getUint32(o + 8, true);
      const unmap = (v.getUint32(o + 12, true) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
      try {
        if (zero) this.image.writeZeroes(sector * 512, sectors * 512, unmap && p.mayUnmap);
        else this.image.discard(sector * 512, sectors * 512);
      } catch (e) {
        return this.hostError(what, sector, sectors * 512, e);
      }
    }
    if (zero && p.writethrough) {
      try {
        this.image.flush();
      } catch (e) {
        return this.hostError("flush", 0, 0, e);
      }
    }
    return VIRTIO_BLK_S_OK;
  }

  private refuseReadOnly(chain: DescriptorChain, what: string): number {
    this.guestError(chain, `${what} on a read-only disk`);
    return VIRTIO_BLK_S_IOERR;
  }

  private tooManySegments(chain: DescriptorChain): number {
    this.guestError(chain, `request with more than ${this.policy.segMax} data segments (seg_max)`);
    return VIRTIO_BLK_S_IOERR;
  }

  /** Guest mistakes: debug-level (a guest may probe), rate-limited. */
  private guestError(chain: DescriptorChain, message: string): void {
    this.guestErrors.report(`head ${chain.head}: ${message}`);
  }

  /** Host I/O failures: the guest sees IOERR; we log (rate-limited) since the host has a problem. */
  private hostError(what: string, sector: number, len: number, e: unknown): number {
    if (this.stats.errors < LOGGED_ERRORS) {
      const why = e instanceof SysError ? e.message : String((e as Error)?.message ?? e);
      log.warn(`block queue ${this.queue.index}: ${what} of ${len} bytes at sector ${sector} failed: ${why}`);
    }
    return VIRTIO_BLK_S_IOERR;
  }
}
