// Net's acquire phase: the tap (its queue fds, the offload probe), the control socket, and each
// pair's io_urings, all made before serving, as plain data. After that net opens nothing, creates
// no socket and sets up no ring (the sandbox kills io_uring_setup).
import { closeRingHandle, type RingHandle } from "../../ffi/io_uring.ts";
import { log } from "../../src/log.ts";
import { acquireTap, releaseTap, type AcquiredTap } from "./tap.ts";
import { openPairRings } from "./uring_tx.ts";
import { setupRxRing } from "./rx_multishot.ts";
import type { NetOptions } from "./options.ts";

export interface AcquiredNet extends AcquiredTap {
  /** Each pair's transmit io_uring (restricted to READV and WRITEV), or null: writev/readv. */
  rings: (RingHandle | null)[];
  /** Each pair's receive io_uring (a multishot read: rx_multishot.ts), or null: READV batches on `rings`. */
  rxRings: (RingHandle | null)[];
  /** Why io_uring is not used (--net-io auto on a host that refuses it), or null. */
  ringsRefused: string | null;
}

/** Tests and the bench set this to receive with READV batches instead of a multishot read. */
const NO_MULTISHOT_ENV = "BACKEND_NET_RX_READV";

export function acquireNet(o: NetOptions): AcquiredNet {
  const tap = acquireTap(o);
  try {
    const { rings, refused } = openPairRings(o.queuePairs, o.netIo);
    return { ...tap, rings, rxRings: openRxRings(rings), ringsRefused: refused };
  } catch (e) {
    releaseTap(tap);
    throw e;
  }
}

/** A receive ring per pair that has a transmit ring; none at all when the kernel refuses one. */
function openRxRings(txRings: readonly (RingHandle | null)[]): (RingHandle | null)[] {
  const none = txRings.map(() => null);
  if (txRings.every((r) => r === null) || process.env[NO_MULTISHOT_ENV] === "1") return none;
  const rx: RingHandle[] = [];
  try {
    for (let i = 0; i < txRings.length; i++) rx.push(setupRxRing());
    return rx;
  } catch (e) {
    rx.forEach(closeRingHandle);
    log.info(`net: no multishot receive ring (${(e as Error).message}): READV batches`);
    return none;
  }
}

/** Closes what acquireNet made (startup failed after it, or the device is gone). */
export function releaseNet(a: AcquiredNet): void {
  releaseTap(a);
  releaseRings(a.rings);
  releaseRings(a.rxRings);
}

export function releaseRings(rings: readonly (RingHandle | null)[]): void {
  for (const r of rings) if (r !== null) closeRingHandle(r);
}
