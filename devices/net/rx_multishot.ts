// Receive through one multishot read per pair (IORING_OP_READ_MULTISHOT, 6.7+): armed once, it
// reads every frame the tap has into a buffer of a provided-buffer ring and posts one CQE per frame
// (io_uring polls the tap itself: no READV per frame, none failing with EAGAIN on an empty tap, no
// epoll_wait per wakeup). The pair runner copies each frame into guest receive buffers and gives its
// buffer back. Frames wait in our buffers while the guest has no receive buffers; once all are taken
// the read ends (-ENOBUFS) and later frames wait in the tap's queue, as with readv, until the
// buffers come back and the read is armed again.
//
// The ring is the pair's second io_uring (its own CQ: the transmit batches reap theirs in a loop
// that counts every CQE), restricted to READ_MULTISHOT with IOSQE_BUFFER_SELECT and ASYNC_CANCEL,
// and to registering its buffer ring. Its fd is readable when CQEs are waiting: the event loop
// watches it in place of the tap.
import {
  BufferRing, IoUring, IORING_OP, IOSQE, IORING_CQE_F,
  IORING_CQE_BUFFER_SHIFT, RegisterOp, type RingHandle, type RingRestrictions,
} from "../../ffi/io_uring.ts";

/** Buffers per pair: frames read ahead of the guest's buffers at most (and per CQ reap). */
export const RX_BUFFERS = 64;
/** Each buffer takes the largest frame the tap may hand us: 64 KiB of GSO payload, headers, header. */
export const RX_BUFFER_SIZE = 68 * 1024;
/** CQ entries: one per buffer, plus the read's last CQE and a cancel's. */
const CQ_ENTRIES = 2 * RX_BUFFERS;
const SQ_ENTRIES = 4;
const GROUP = 0;
const READ_ID = 1;
const CANCEL_ID = 2;

/** What a pair's receive ring may do (seccomp cannot see SQEs). */
export const RX_RING_RESTRICTIONS: RingRestrictions = {
  sqeOps: [IORING_OP.READ_MULTISHOT, IORING_OP.ASYNC_CANCEL],
  registerOps: [RegisterOp.PBUF_RING, RegisterOp.UNREGISTER_PBUF_RING],
  sqeFlags: IOSQE.BUFFER_SELECT,
};

/** Sets up a pair's receive ring (in acquire: the sandbox forbids io_uring_setup later). */
export function setupRxRing(): RingHandle {
  return IoUring.setupHandle(SQ_ENTRIES, RX_RING_RESTRICTIONS, CQ_ENTRIES);
}

export class RxMultishot {
  readonly ring: IoUring;
  private readonly bufs: BufferRing;
  /** Frames read and not yet delivered, in order: buffer id and length (a FIFO of RX_BUFFERS). */
  private readonly pendingId = new Int32Array(RX_BUFFERS);
  private readonly pendingLen = new Int32Array(RX_BUFFERS);
  private head = 0;
  pending = 0;
  /** The read is armed (its last CQE, one without F_MORE, not seen yet). */
  armed = false;
  /** Why the read ended, if not for lack of buffers or a cancel (-errno), until the next arm. */
  failed = 0;
  private canceling = false;
  private readonly onCqe = (userData: number, res: number, flags: number) => {
    if (userData !== READ_ID) return; // the cancel's own CQE
    if ((flags & IORING_CQE_F.BUFFER) !== 0) {
      const id = flags >>> IORING_CQE_BUFFER_SHIFT;
      if (res > 0 && this.pending < RX_BUFFERS) {
        const at = (this.head + this.pending) % RX_BUFFERS;
        this.pendingId[at] = id;
        this.pendingLen[at] = res;
        this.pending++;
      } else this.bufs.give(id); // an empty read (cannot happen on a tap) holds nothing
    }
    if ((flags & IORING_CQE_F.MORE) === 0) {
      this.armed = false;
      // -ENOBUFS: every buffer is taken (re-armed when they come back); -ECANCELED: ours.
      if (res < 0 && res !== -105 && res !== -125) this.failed = res;
    }
  };

  constructor(handle: RingHandle, private readonly fd: number) {
    this.ring = IoUring.attach(handle);
    try {
      this.bufs = new BufferRing(this.ring, GROUP, RX_BUFFERS, RX_BUFFER_SIZE);
    } catch (e) {
      this.ring.close();
      throw e;
    }
  }

  /** Arms the read when it is not (and buffers are free). Throws when the ring fails outright. */
  arm(): void {
    if (this.armed || this.canceling || this.pending === RX_BUFFERS) return;
    this.failed = 0;
    this.bufs.publish();
    this.ring.prepReadMultishot(this.fd, GROUP, READ_ID);
    this.armed = true;
    this.ring.submit();
  }

  /** Takes the CQEs waiting (frames join the pending FIFO). Returns how many CQEs. */
  reap(): number {
    return this.ring.reap(this.onCqe);
  }

  /** The oldest pending frame's buffer id (-1 when none) and length. */
  get frontId(): number {
    return this.pending > 0 ? this.pendingId[this.head]! : -1;
  }

  get frontLen(): number {
    return this.pendingLen[this.head]!;
  }

  /** The oldest pending frame's bytes (valid until release()). */
  frontBytes(): Uint8Array {
    return this.bufs.view(this.pendingId[this.head]!, this.pendingLen[this.head]!);
  }

  /** Done with the oldest pending frame: its buffer goes back (to the kernel at the next publish). */
  release(): void {
    this.bufs.give(this.pendingId[this.head]!);
    this.head = (this.head + 1) % RX_BUFFERS;
    this.pending--;
  }

  /** Hands the buffers given back to the kernel. */
  publish(): void {
    this.bufs.publish();
  }

  /**
   * Ends the read and waits for its last CQE (frames it still posts join the pending FIFO), so no
   * read is armed on the buffers any more.
   */
  cancel(): void {
    if (!this.armed) return;
    this.canceling = true;
    try {
      this.ring.prepCancel(READ_ID, CANCEL_ID);
      for (let tries = 0; this.armed; tries++) {
        this.ring.submit(1);
        this.reap();
        if (tries > 1000) throw new Error("io_uring: the receive read did not end after its cancel");
      }
    } finally {
      this.canceling = false;
    }
  }

  /** Cancels the read, frees the buffers and unmaps the ring (its fd stays: acquire's). */
  close(): void {
    try {
      this.cancel();
      this.bufs.close();
    } finally {
      this.ring.close();
    }
  }
}
