// Receive through io_uring where the multishot read (rx_multishot.ts, kernel 6.7+) is not
// available (or BACKEND_NET_RX_READV=1): up to RX_BATCH frames per io_uring_enter, each read by its own READV
// SQE straight into guest receive buffers. The held receive chains are split, in order, into
// parts that can each take the largest frame the guest may receive (one chain each without
// MRG_RXBUF); part i's READV covers its chains plus a small overflow area behind them, so a frame
// longer than expected (a tap whose MTU is above the guest's) is seen as such, never truncated
// silently. Reads carry RWF_NOWAIT: an empty tap fails them with EAGAIN at once instead of
// parking them in the kernel.
//
// The kernel issues the SQEs in order, so frame i of the tap lands in the first part whose READV
// found a frame, and frames keep their order. Parts whose READV found the tap empty keep their
// chains for the next batch.
import { IoUring, IORING_OP, RWF_NOWAIT } from "../../ffi/io_uring.ts";
import { IovecArray } from "../../ffi/io.ts";
import { ptr } from "bun:ffi";
import type { ChainWriter } from "../../src/chain.ts";

/** Frames per batch (it shares the pair's ring with transmit, which submits at other times). */
export const RX_BATCH = 32;
/** Overflow area per part: enough to tell that a frame did not fit. */
const OVERFLOW = 64;
const BATCH_IOVECS = 4096;

export class RxBatch {
  private readonly iov = new IovecArray(BATCH_IOVECS);
  private readonly overflow = new Uint8Array(RX_BATCH * OVERFLOW);
  private readonly overflowPtr = ptr(this.overflow);
  /** Part i: held chains [first[i], end[i]), their capacity, its first iovec. */
  readonly first = new Int32Array(RX_BATCH);
  readonly end = new Int32Array(RX_BATCH);
  readonly capacity = new Float64Array(RX_BATCH);
  private readonly iovStart = new Int32Array(RX_BATCH + 1);
  private readonly results = new Int32Array(RX_BATCH);
  size = 0;
  private readonly onCqe = (userData: number, res: number) => {
    if (userData < RX_BATCH) this.results[userData] = res;
  };

  constructor(private readonly ring: IoUring, private readonly fd: number) {}

  clear(): void {
    this.size = 0;
    this.iov.clear();
  }

  /**
   * Adds a part over `writers[from, to)` (null writers, unusable chains, are skipped). False when
   * the batch is full or the part's iovecs do not fit (nothing added then).
   */
  addPart(writers: readonly (ChainWriter | null)[], from: number, to: number): boolean {
    const i = this.size;
    if (i >= RX_BATCH) return false;
    const start = this.iov.count;
    let capacity = 0;
    for (let k = from; k < to; k++) {
      const w = writers[k];
      if (w === null || w === undefined) continue;
      if (this.iov.count + w.chain.writable.length + 1 > BATCH_IOVECS || !w.iovecs(this.iov, w.remaining)) {
        this.iov.truncate(start);
        return false;
      }
      w.pos = 0; // iovecs() moved the cursor; the kernel writes the chain, not the cursor
      capacity += w.chain.writableLen;
    }
    this.iov.push(this.overflowPtr + i * OVERFLOW, OVERFLOW);
    this.first[i] = from;
    this.end[i] = to;
    this.capacity[i] = capacity;
    this.iovStart[i] = start;
    this.size++;
    return true;
  }

  /** The first bytes of part i's overflow area (where a frame longer than the part went on). */
  overflowOf(i: number): Uint8Array {
    return this.overflow.subarray(i * OVERFLOW, (i + 1) * OVERFLOW);
  }

  /** Submits the reads with one io_uring_enter and waits for all (each completes at once). */
  submit(): number {
    const n = this.size;
    if (n === 0) return 0;
    this.iovStart[n] = this.iov.count;
    for (let i = 0; i < n; i++) {
      this.results[i] = -125; // ECANCELED until its CQE says otherwise
      this.ring.prep(IORING_OP.READV, this.fd, this.iov.ptr + 16 * this.iovStart[i]!, this.iovStart[i + 1]! - this.iovStart[i]!, 0, i, 0, RWF_NOWAIT);
    }
    this.ring.submitAndReapAll(n, this.onCqe, "receive");
    return n;
  }

  result(i: number): number {
    return this.results[i]!;
  }
}
