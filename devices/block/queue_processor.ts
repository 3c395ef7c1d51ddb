// Serves one virtio-blk request queue through the disk (disk/disk.ts). It depends only on (queue,
// disk, policy, loop), so it runs on whichever thread serves the queue: the disk instance is that
// thread's (built from the acquired resource), the policy is plain data.
//
// I/O path per request: the chain is walked (core), the header read from guest memory in place,
// iovecs built straight into the disk slot's array, pointing into the mapped guest regions, and
// ONE disk operation started (a DISCARD or WRITE_ZEROES: one per segment, in turn). How the disk
// completes it (inside the call, or later from the loop) is the disk's business; the completion
// writes the status and adds the used entry. Used entries are published once per batch of pops or
// of completions, which notifies at most once, as EVENT_IDX allows. GET_ID is answered here.
import { errnoName } from "../../ffi/libc.ts";
import { processQueue, watchKick, TurnBudget } from "../../src/queue_serving.ts";
import { NotifyCoalescer } from "../../src/notify_coalescer.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import type { Virtqueue } from "../../src/virtqueue.ts";
import { ChainReader, ChainWriter, type DescriptorChain } from "../../src/chain.ts";
import { GuestErrorLog, RateLimitedLog } from "../../src/guest_errors.ts";
import { ZERO_UNMAP, ZERO_FUA, type Disk, type DiskQueue, type DiskRequest } from "./disk/disk.ts";
import { SharedRecord, bool } from "../../src/shared_record.ts";
import { RequestHeader } from "./request.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S, REQUEST_HEADER_SIZE, DISCARD_SEGMENT_SIZE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VIRTIO_BLK_ID_BYTES,
  SECTOR_SHIFT, MAX_REQUEST_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
} from "./config.ts";
import { BlockQueueMetrics } from "./metrics.ts";

/** What the device shares with its queues that the guest may change while they run: the cache
 * mode (SET_CONFIG's writeback field, the negotiated FLUSH). One writer, the device thread. */
export const BLOCK_SHARED = {
  /** Every completed write is made stable before it completes (no FLUSH, or writeback = 0). */
  writethrough: bool,
};
export type BlockShared = SharedRecord<typeof BLOCK_SHARED>;

/** What a queue needs to know about the device besides the disk; fixed while it runs. */
export interface BlockPolicy {
  readOnly: boolean;
  /** DISCARD offered (--sparse on a writable image). */
  discard: boolean;
  /** WRITE_ZEROES offered (writable image). */
  writeZeroes: boolean;
  /** May WRITE_ZEROES with UNMAP deallocate (--sparse)? */
  mayUnmap: boolean;
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


/** handle()'s answer for a request that completes later (through the disk's `done`). */
const IN_FLIGHT = -1;

/** What a request being served needs at its completion; one per disk slot (indexed by its id),
 * reused, so serving a request allocates nothing. */
class RequestState {
  chain: DescriptorChain | null = null;
  /** The request's cursor over the device-writable part, less its last byte... */
  readonly writer = new ChainWriter();
  /** ...which is the status byte, split off so data cannot run into it. */
  readonly status = new ChainWriter();
  type = 0;
  /** First sector and bytes, for accounting and messages. */
  sector = 0;
  len = 0;
  /** DISCARD / WRITE_ZEROES: the segments (read at parse time: guest memory may change), how many,
   * and the next one to start. */
  segments: Uint8Array | null = null;
  segmentsView: DataView | null = null;
  count = 0;
  nextSegment = 0;
}

export class QueueProcessor {
  readonly stats: QueueStats = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0, unsupported: 0 };
  private readonly guestErrors: GuestErrorLog;
  /** Host I/O failures (a failing disk fails every request): logged, rate-limited, never silenced for good. */
  private readonly hostErrors: RateLimitedLog;
  private readonly metrics: BlockQueueMetrics;
  private readonly reader = new ChainReader();
  private readonly header = new RequestHeader();
  /** The disk's I/O channel for this queue (its requests' slots and completions). */
  readonly io: DiskQueue;
  private readonly states: RequestState[] = [];
  /** The per-turn work allowance while served from a loop (see serve). */
  private budget: TurnBudget | null = null;
  /** The disk had `depth` requests in flight: popping stopped, and resumes on the next batch of completions. */
  private stalled = false;
  private readonly handleChain = (chain: DescriptorChain): boolean => {
    const req = this.io.next();
    if (req === null) {
      this.queue.undoPop();
      this.stalled = true;
      return false;
    }
    const used = this.handle(chain, req);
    if (used !== IN_FLIGHT) this.queue.add(chain.head, used);
    return true;
  };
  /** Before a batch is published: hand its I/O to the disk (completions ready at once join the batch). */
  private readonly submitBatch = (): void => this.io.submit();
  /** Sectors per logical block, minus 1: sector numbers and counts must have these bits clear
   * (`&` sees the low 32 bits of the exact integer, which is all the mask needs). */
  private readonly sectorMask: number;

  /** Serves `queue` on `loop` through `disk` (attached here, for this queue). */
  constructor(
    readonly queue: Virtqueue,
    disk: Disk,
    private readonly policy: BlockPolicy,
    private readonly shared: BlockShared,
    private readonly loop: EventLoop,
  ) {
    this.guestErrors = new GuestErrorLog(`block queue ${queue.index}`, "debug");
    this.hostErrors = new RateLimitedLog(`block queue ${queue.index}`, "warn", "I/O errors");
    this.metrics = new BlockQueueMetrics(queue.index, queue.size);
    this.sectorMask = (policy.blkSize >> SECTOR_SHIFT) - 1;
    this.io = disk.attach(loop, { depth: queue.size, segMax: policy.segMax, queue: queue.index }, {
      done: (req, result) => this.completed(req, result),
      batchDone: () => this.onCompletions(),
    });
  }

  /** The shared record's version when `cachedWritethrough` was read from it. */
  private sharedVersion = -1;
  private cachedWritethrough = false;

  /** The cache mode now: one atomic load of the record's version per request, the field re-read
   * only after a change (a write under way leaves the version odd, so it is re-read next time). */
  private writethrough(): boolean {
    const v = this.shared.version;
    if (v !== this.sharedVersion) {
      this.cachedWritethrough = this.shared.get("writethrough");
      this.sharedVersion = v;
    }
    return this.cachedWritethrough;
  }

  /** Serves the queue from the loop (kicks and completions); returns the function that stops it,
   * which returns once every request in flight is complete and published. */
  serve(): () => void {
    let live = true;
    const loop = this.loop;
    this.budget = new TurnBudget(loop, () => {
      if (live) this.run();
    });
    const coalescer = this.policy.coalesceUs > 0 ? new NotifyCoalescer(loop, this.queue, this.policy.coalesceUs) : null;
    const unwatch = watchKick(loop, this.queue, () => this.run());
    return () => {
      live = false;
      unwatch();
      this.io.close(); // waits for the requests in flight (GET_VRING_BASE needs a final position)
      this.queue.flush();
      coalescer?.dispose();
    };
  }

  /** Serves every available request, publishing the completions once at the end. */
  run(): void {
    this.stalled = false;
    processQueue(this.queue, this.handleChain, this.submitBatch, this.budget ?? undefined);
  }

  /** Completions came from the loop: publish them (popping more if the disk was full). */
  private onCompletions(): void {
    if (this.stalled) this.run(); // publishes the completions with the new batch
    else this.queue.flush();
  }

  private stateOf(id: number): RequestState {
    return this.states[id] ?? (this.states[id] = new RequestState());
  }

  /** Handles one chain with the disk slot `req`; returns the used length (0 when there is no byte
   * to put a status in), or IN_FLIGHT when the disk completes it (possibly before this returns). */
  handle(chain: DescriptorChain, req: DiskRequest): number {
    this.stats.requests++;
    const state = this.stateOf(req.id);
    const reader = this.reader.reset(chain);
    const writer = state.writer.reset(chain);
    if (writer.remaining < 1 || !writer.splitAt(writer.remaining - 1, state.status)) {
      this.guestError(chain, "request has no writable byte for its status; completed with length 0");
      return 0;
    }
    this.metrics.begin(chain.head);
    let status: number;
    if (!this.header.read(reader)) {
      this.guestError(chain, `request header shorter than ${REQUEST_HEADER_SIZE} bytes`);
      status = VIRTIO_BLK_S.IOERR;
    } else {
      this.metrics.request(this.header.type);
      status = this.execute(chain, reader, writer, req, state);
      if (status === IN_FLIGHT) return IN_FLIGHT;
    }
    return this.finish(chain, state, status);
  }

  /** Counts the outcome, stores the status byte; returns the used length. */
  private finish(chain: DescriptorChain, state: RequestState, status: number): number {
    if (status === VIRTIO_BLK_S.IOERR) this.stats.errors++;
    else if (status === VIRTIO_BLK_S.UNSUPP) this.stats.unsupported++;
    this.metrics.end(chain.head, status);
    state.status.writeByte(status);
    // Like QEMU: the whole device-writable part counts as written (data for reads, then status).
    return chain.writableLen;
  }

  /** The disk finished an operation: the next segment of a discard, or the request's completion
   * (its used entry is published with the batch). */
  private completed(req: DiskRequest, result: number): void {
    const state = this.states[req.id]!;
    const chain = state.chain!;
    const type = state.type;
    let status: number = VIRTIO_BLK_S.OK;
    if (result < 0) {
      status = this.hostError(opName(type), state.sector, state.len, result);
    } else if (type === VIRTIO_BLK_T.IN) {
      this.stats.bytesRead += state.len;
      this.metrics.read(state.len);
    } else if (type === VIRTIO_BLK_T.OUT) {
      this.stats.bytesWritten += state.len;
      this.metrics.written(state.len);
    } else if (state.nextSegment < state.count) {
      this.startSegment(req, state);
      return;
    }
    state.chain = null;
    this.queue.add(chain.head, this.finish(chain, state, status));
  }

  private execute(chain: DescriptorChain, reader: ChainReader, writer: ChainWriter, req: DiskRequest, state: RequestState): number {
    const p = this.policy;
    const { type, sector } = this.header;
    switch (type) {
      case VIRTIO_BLK_T.IN:
      case VIRTIO_BLK_T.OUT: {
        // The data travels in the chain's writable part for a read, its readable part for a write.
        const write = type === VIRTIO_BLK_T.OUT;
        if (write && p.readOnly) return this.refuseReadOnly(chain, "write");
        const data = write ? reader : writer;
        const len = data.remaining;
        if (!this.checkRange(chain, sector, len, write ? "write" : "read")) return VIRTIO_BLK_S.IOERR;
        const iov = req.iov;
        iov.clear();
        if (!data.iovecs(iov, len)) return this.tooManySegments(chain);
        if (len === 0) return VIRTIO_BLK_S.OK;
        this.start(state, chain, type, sector, len);
        if (write) this.io.write(req, sector * 512, len, this.writethrough());
        else this.io.read(req, sector * 512, len);
        return IN_FLIGHT;
      }
      case VIRTIO_BLK_T.FLUSH:
        this.start(state, chain, type, 0, 0);
        this.io.flush(req);
        return IN_FLIGHT;
      case VIRTIO_BLK_T.GET_ID:
        if (writer.remaining < VIRTIO_BLK_ID_BYTES) {
          this.guestError(chain, `GET_ID buffer of ${writer.remaining} bytes (needs ${VIRTIO_BLK_ID_BYTES})`);
          return VIRTIO_BLK_S.IOERR;
        }
        writer.write(p.serial);
        return VIRTIO_BLK_S.OK;
      case VIRTIO_BLK_T.DISCARD:
      case VIRTIO_BLK_T.WRITE_ZEROES:
        return this.discardOrZero(chain, reader, req, state, type === VIRTIO_BLK_T.WRITE_ZEROES);
      default:
        this.guestError(chain, `unsupported request type ${type}`);
        return VIRTIO_BLK_S.UNSUPP;
    }
  }

  /** Records what the completion needs, before the disk may complete it. */
  private start(state: RequestState, chain: DescriptorChain, type: number, sector: number, len: number): void {
    state.chain = chain;
    state.type = type;
    state.sector = sector;
    state.len = len;
    state.count = 0;
    state.nextSegment = 0;
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

  private discardOrZero(chain: DescriptorChain, reader: ChainReader, req: DiskRequest, state: RequestState, zero: boolean): number {
    const p = this.policy;
    const what = zero ? "write zeroes" : "discard";
    if (p.readOnly) return this.refuseReadOnly(chain, what);
    if (!(zero ? p.writeZeroes : p.discard)) {
      this.guestError(chain, `${what} is not offered by this device`);
      return VIRTIO_BLK_S.UNSUPP;
    }
    const bytes = reader.remaining;
    if (bytes <= 0 || bytes % DISCARD_SEGMENT_SIZE !== 0) {
      this.guestError(chain, `${what} payload of ${bytes} bytes is not a list of 16-byte segments`);
      return VIRTIO_BLK_S.IOERR;
    }
    const count = bytes / DISCARD_SEGMENT_SIZE;
    if (count > MAX_DISCARD_SEGMENTS) {
      this.guestError(chain, `${what} with ${count} segments (at most ${MAX_DISCARD_SEGMENTS})`);
      return VIRTIO_BLK_S.UNSUPP;
    }
    if (state.segments === null) {
      state.segments = new Uint8Array(MAX_DISCARD_SEGMENTS * DISCARD_SEGMENT_SIZE);
      state.segmentsView = new DataView(state.segments.buffer);
    }
    reader.read(state.segments.subarray(0, bytes));
    const v = state.segmentsView!;
    // Check every segment before touching the image.
    for (let i = 0; i < count; i++) {
      const o = i * DISCARD_SEGMENT_SIZE;
      const sector = v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
      const sectors = v.getUint32(o + 8, true);
      const flags = v.getUint32(o + 12, true);
      const allowed = zero ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
      if ((flags & ~allowed) !== 0) {
        this.guestError(chain, `${what} segment with flags 0x${flags.toString(16)}`);
        return VIRTIO_BLK_S.UNSUPP;
      }
      if (sectors > MAX_DISCARD_SECTORS) {
        this.guestError(chain, `${what} of ${sectors} sectors (at most ${MAX_DISCARD_SECTORS})`);
        return VIRTIO_BLK_S.IOERR;
      }
      if (((sector & this.sectorMask) | (sectors & this.sectorMask)) !== 0) {
        this.guestError(chain, `${what} at sector ${sector} (+${sectors}) is not aligned to ${p.blkSize}-byte blocks`);
        return VIRTIO_BLK_S.IOERR;
      }
      if (sector > p.capacitySectors || sectors > p.capacitySectors - sector) {
        this.guestError(chain, `${what} at sector ${sector} (+${sectors}) is beyond the disk's ${p.capacitySectors} sectors`);
        return VIRTIO_BLK_S.IOERR;
      }
    }
    this.start(state, chain, zero ? VIRTIO_BLK_T.WRITE_ZEROES : VIRTIO_BLK_T.DISCARD, 0, 0);
    state.count = count;
    this.startSegment(req, state);
    return IN_FLIGHT;
  }

  /** Starts the next segment of a discard or write zeroes on the request's slot (one disk
   * operation per segment, one after the other; the last one completes the request). */
  private startSegment(req: DiskRequest, state: RequestState): void {
    const v = state.segmentsView!;
    const o = state.nextSegment++ * DISCARD_SEGMENT_SIZE;
    const sector = v.getUint32(o, true) + v.getUint32(o + 4, true) * 0x1_0000_0000;
    const sectors = v.getUint32(o + 8, true);
    state.sector = sector;
    state.len = sectors * 512;
    if (state.type === VIRTIO_BLK_T.DISCARD) {
      this.io.discard(req, sector * 512, sectors * 512);
      return;
    }
    const p = this.policy;
    const unmap = (v.getUint32(o + 12, true) & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0 && p.mayUnmap;
    this.io.writeZeroes(req, sector * 512, sectors * 512, (unmap ? ZERO_UNMAP : 0) | (this.writethrough() ? ZERO_FUA : 0));
  }

  private refuseReadOnly(chain: DescriptorChain, what: string): number {
    this.guestError(chain, `${what} on a read-only disk`);
    return VIRTIO_BLK_S.IOERR;
  }

  private tooManySegments(chain: DescriptorChain): number {
    this.guestError(chain, `request with more than ${this.policy.segMax} data segments (seg_max)`);
    return VIRTIO_BLK_S.IOERR;
  }

  /** Guest mistakes: debug-level (a guest may probe), rate-limited. */
  private guestError(chain: DescriptorChain, message: string): void {
    this.guestErrors.report(`head ${chain.head}: ${message}`);
  }

  /** Host I/O failures: the guest sees IOERR; we log (rate-limited) since the host has a problem. */
  private hostError(what: string, sector: number, len: number, result: number): number {
    this.hostErrors.report(`${what} of ${len} bytes at sector ${sector} failed: ${errnoName(-result)}`);
    return VIRTIO_BLK_S.IOERR;
  }
}

function opName(type: number): string {
  switch (type) {
    case VIRTIO_BLK_T.IN: return "read";
    case VIRTIO_BLK_T.OUT: return "write";
    case VIRTIO_BLK_T.FLUSH: return "flush";
    case VIRTIO_BLK_T.DISCARD: return "discard";
    default: return "write zeroes";
  }
}
