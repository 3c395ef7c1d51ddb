// Transmit through io_uring: the frames of one kick go to the tap as one WRITEV SQE each (iovecs
// pointing into guest memory, as writev's do), submitted with ONE io_uring_enter that also waits
// for their completions. Each write carries RWF_NOWAIT, so the kernel completes it inline or fails
// it with EAGAIN when the tap is full (without it io_uring would park the write until the tap has
// room, and its completion would come later): the wait costs nothing and no io-wq thread is
// involved. A frame after a full one may still find room (the tap drained in between): it goes
// out first, which the caller notes; nothing is lost or sent twice.
// This replaces one writev system call per frame (about a microsecond each on this VM) with one
// io_uring_enter per batch.
//
// The batch's iovecs live in one array: frame i owns entries [start[i], start[i] + count[i]).
// Results come back per frame, in submission order (user_data = the frame's index in the batch).
import {
  IoUring, IORING_OP, RWF_NOWAIT, closeRingHandle, type RingHandle, type RingRestrictions,
} from "../../ffi/io_uring.ts";
import { IovecArray } from "../../ffi/io.ts";
import { ChainReader, type DescriptorChain } from "../../src/chain.ts";

/** Frames per batch (SQ entries of each pair's ring): the turn's chain budget fits in a few. */
export const TX_BATCH = 64;
/** iovecs for a whole batch (a frame takes at most MAX_IOVECS of them on its own). */
const BATCH_IOVECS = 4096;

export class TxBatch {
  private readonly iov = new IovecArray(BATCH_IOVECS);
  private readonly reader = new ChainReader();
  /** The chains queued, in order. */
  readonly chains: DescriptorChain[] = [];
  private readonly start = new Int32Array(TX_BATCH);
  private readonly results = new Int32Array(TX_BATCH);
  private readonly onCqe = (userData: number, res: number) => {
    if (userData < TX_BATCH) this.results[userData] = res;
  };

  constructor(private readonly ring: IoUring, private readonly fd: number) {
    if (ring.entries < TX_BATCH) throw new Error(`io_uring of ${ring.entries} entries (transmit batches need ${TX_BATCH})`);
  }

  get size(): number {
    return this.chains.length;
  }

  /**
   * Queues `chain`'s readable bytes (virtio-net header + frame) as one WRITEV. Returns "full" when
   * the batch has no room left (submit first), "too-long" when the chain alone has more than
   * `maxIovecs` segments (it cannot be sent), or "queued".
   */
  queue(chain: DescriptorChain, maxIovecs: number): "queued" | "full" | "too-long" {
    const i = this.chains.length;
    if (i >= TX_BATCH) return "full";
    const first = this.iov.count;
    this.reader.reset(chain);
    if (chain.readable.length > maxIovecs) return "too-long";
    if (first + chain.readable.length > BATCH_IOVECS) return i === 0 ? "too-long" : "full";
    if (!this.reader.iovecs(this.iov, chain.readableLen)) return "too-long";
    this.start[i] = first;
    this.chains.push(chain);
    return "queued";
  }

  /**
   * Submits the queued writes with one io_uring_enter that waits for all of them, and returns
   * how many there were; result(i) is then frame i's byte count or -errno. A kernel short of
   * resources (EAGAIN/EBUSY from io_uring_enter itself) is retried; a ring that fails outright
   * throws (the caller falls back to writev).
   */
  submit(): number {
    const n = this.chains.length;
    if (n === 0) return 0;
    const fd = this.fd;
    for (let i = 0; i < n; i++) {
      const first = this.start[i]!;
      const count = (i + 1 < n ? this.start[i + 1]! : this.iov.count) - first;
      this.results[i] = -125; // ECANCELED until its CQE says otherwise
      // A frame in one buffer (a driver that puts the header in front of the frame, as DPDK's
      // and Linux's do for small frames) goes as a plain WRITE: no iovec array to import.
      if (count === 1) this.ring.prep(IORING_OP.WRITE, fd, this.iov.baseAt(first), this.iov.lenAt(first), 0, i, 0, RWF_NOWAIT);
      else this.ring.prep(IORING_OP.WRITEV, fd, this.iov.ptr + 16 * first, count, 0, i, 0, RWF_NOWAIT);
    }
    this.ring.submitAndReapAll(n, this.onCqe, "transmit");
    return n;
  }

  result(i: number): number {
    return this.results[i]!;
  }

  /** Forgets the batch (after its results were taken). */
  clear(): void {
    this.chains.length = 0;
    this.iov.clear();
  }
}

/** Tests set this to see the writev fallback of a kernel without io_uring. */
const DISABLE_ENV = "BACKEND_NO_IO_URING";

/**
 * What a pair's ring may do: the transmit batch's WRITEs and WRITEVs and the receive batch's
 * READVs, nothing else (no register call either: the batches wait in io_uring_enter). seccomp
 * cannot see SQEs.
 *
 * The tap fd is not registered in the ring (IOSQE_FIXED_FILE would save the fd lookup per frame,
 * ~1.5 % of transmit): a registered file is released only when the ring is torn down, which the
 * kernel does asynchronously after the process dies, so a backend restarted at once after a crash
 * found its single-queue tap still attached (EBUSY) — the crash-safe reconnect e2e test failed so.
 */
export const NET_RING_RESTRICTIONS: RingRestrictions = { sqeOps: [IORING_OP.WRITE, IORING_OP.WRITEV, IORING_OP.READV], registerOps: [] };

/**
 * The io_uring of each of `pairs` pairs (its transmit and receive batches), set up in acquire
 * (restricted: NET_RING_RESTRICTIONS), or nulls (writev/readv) for --net-io syscall. With auto, a
 * kernel or sandbox that refuses io_uring means writev; with uring it is an error. Returns also
 * why io_uring was not used, if it was not.
 */
export function openPairRings(pairs: number, mode: "uring" | "syscall" | "auto"): { rings: (RingHandle | null)[]; refused: string | null } {
  const none = { rings: new Array<RingHandle | null>(pairs).fill(null), refused: null };
  if (mode === "syscall") return none;
  const rings: RingHandle[] = [];
  try {
    if (process.env[DISABLE_ENV] === "1") throw new Error("io_uring_setup: ENOSYS (simulated: BACKEND_NO_IO_URING=1)");
    for (let i = 0; i < pairs; i++) rings.push(IoUring.setupHandle(TX_BATCH, NET_RING_RESTRICTIONS));
  } catch (e) {
    rings.forEach(closeRingHandle);
    const why = (e as Error).message;
    if (mode === "uring") throw new Error(`--net-io uring: io_uring is not available here (${why}); use --net-io syscall or auto`);
    return { ...none, refused: why };
  }
  return { rings, refused: null };
}
