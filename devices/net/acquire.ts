// Net's acquire phase: the tap (its queue fds, the offload probe), the control socket, and each
// pair's io_uring, all made before serving, as plain data. After that net opens nothing, creates
// no socket and sets up no ring (the sandbox kills io_uring_setup).
import { closeRingHandle, type RingHandle } from "../../ffi/io_uring.ts";
import { acquireTap, releaseTap, type AcquiredTap } from "./tap.ts";
import { openPairRings } from "./uring_tx.ts";
import type { NetOptions } from "./options.ts";

export interface AcquiredNet extends AcquiredTap {
  /** Each pair's io_uring (restricted to READV and WRITEV), or null: writev/readv. */
  rings: (RingHandle | null)[];
  /** Why io_uring is not used (--net-io auto on a host that refuses it), or null. */
  ringsRefused: string | null;
}

export function acquireNet(o: NetOptions): AcquiredNet {
  const tap = acquireTap(o);
  try {
    const { rings, refused } = openPairRings(o.queuePairs, o.netIo);
    return { ...tap, rings, ringsRefused: refused };
  } catch (e) {
    releaseTap(tap);
    throw e;
  }
}

/** Closes what acquireNet made (startup failed after it, or the device is gone). */
export function releaseNet(a: AcquiredNet): void {
  releaseTap(a);
  releaseRings(a.rings);
}

export function releaseRings(rings: readonly (RingHandle | null)[]): void {
  for (const r of rings) if (r !== null) closeRingHandle(r);
}
