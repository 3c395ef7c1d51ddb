// A device's view of one virtqueue, whichever ring layout the driver negotiated: the split ring
// (src/split_virtqueue.ts) or the packed ring (src/packed_virtqueue.ts, VIRTIO_F_RING_PACKED).
// Devices pop DescriptorChains, move their bytes with ChainReader/ChainWriter, complete them with
// add(), publish with flush(), and cannot tell the layouts apart. This file is the interface only;
// src/open_virtqueue.ts builds one for a ring's layout.
import type { DescriptorChain } from "./chain.ts";
import type { VirtqueueConfig, RingPosition } from "./ring.ts";

export interface Virtqueue {
  readonly index: number;
  readonly size: number;
  readonly eventIdx: boolean;
  readonly kickFd: number;
  readonly callFd: number;
  readonly errFd: number;
  /** What this queue was built from. */
  readonly config: VirtqueueConfig;
  /** The driver broke the ring protocol: the queue yields nothing more until it is restarted. */
  readonly broken: boolean;
  /** Chains popped and not yet completed. */
  readonly inFlight: number;
  /** Guest-caused ring errors so far (logged rate-limited). */
  readonly errors: number;
  /** Where the ring stands (GET_VRING_BASE's encoding for the layout). */
  readonly nextAvail: number;
  readonly nextUsed: number;
  position(): RingPosition;
  /** Nonzero while chains are available (0 once broken). */
  pending(): number;
  /** The next available chain, or null; malformed chains are completed empty and skipped. */
  pop(): DescriptorChain | null;
  /** Gives back the last `n` chains popped and not completed; they are popped again. */
  rewind(n?: number): void;
  undoPop(): void;
  /** Completes the chain `head` (its DescriptorChain.head) with `len` bytes written; visible at flush(). */
  add(head: number, len: number): void;
  /** Publishes what add() wrote and notifies the driver if it asked to be (or leaves that to notifyLater). */
  flush(): void;
  /** Set by a coalescer: called instead of deciding on a notification at every flush. */
  notifyLater: (() => void) | null;
  /** Roughly how many requests the driver has outstanding (a hint for coalescing; 0 when unknown). */
  driverOutstanding(): number;
  notifyIfNeeded(): void;
  notify(): void;
  disableNotification(): void;
  /** Re-arms kicks; true if chains arrived meanwhile (the caller must process them). */
  enableNotification(): boolean;
}
