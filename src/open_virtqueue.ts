// Builds the Virtqueue for a ring's layout (split or packed), and checks a ring against guest
// memory before the handler starts it.
import type { GuestMemory } from "./memory.ts";
import type { VirtqueueConfig } from "./ring.ts";
import type { Virtqueue } from "./virtqueue.ts";
import { SplitVirtqueue, checkSplitRing } from "./split_virtqueue.ts";
import { PackedVirtqueue, checkPackedRing } from "./packed_virtqueue.ts";

/** Builds the queue for `c`'s ring layout. */
export function openVirtqueue(mem: GuestMemory, c: VirtqueueConfig): Virtqueue {
  return c.packed ? new PackedVirtqueue(mem, c) : new SplitVirtqueue(mem, c);
}

/** Throws if `c` does not describe a ring that lies in `mem`. */
export function checkRing(mem: GuestMemory, c: VirtqueueConfig): void {
  if (c.packed) checkPackedRing(mem, c);
  else checkSplitRing(mem, c);
}
