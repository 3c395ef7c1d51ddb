// The block QueueRunner (src/device.ts): serves the request queues one thread is given, in the
// device thread or a queue thread of its own (src/queue_thread.ts). A queue thread builds its own
// Disk from the acquired resource (plain data: fd numbers are process-wide; nothing is opened
// here), shared by the queues it serves; the device thread's runner uses the device's Disk. The
// runner shares only the cache mode with the device, through the shared record (BLOCK_SHARED),
// which SET_CONFIG may change at any time.
import type { QueueRunner } from "../../src/device.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import type { RingPosition } from "../../src/ring.ts";
import type { Disk } from "./disk/disk.ts";
import { openDisk, type BlockDiskResource } from "./disk/open.ts";
import { SharedRecord, type SharedRecordData } from "../../src/shared_record.ts";
import { QueueProcessor, BLOCK_SHARED, type BlockPolicy, type BlockShared } from "./queue_processor.ts";

export interface BlockThreadOptions {
  /** The acquired disk (fds and flags). */
  disk: BlockDiskResource;
  /** What the guest cannot change. */
  policy: BlockPolicy;
  /** What it can (the cache mode): BLOCK_SHARED, written by the device thread. */
  shared: SharedRecordData;
}

export class BlockQueueRunner implements QueueRunner {
  /** This thread's disk: the device's (device thread), or built at the first start (queue thread). */
  private disk: Disk | null;
  private readonly ownsDisk: boolean;
  private readonly shared: BlockShared;
  private readonly queues = new Map<number, { processor: QueueProcessor; stop: () => void }>();

  /** `disk`: the device thread's Disk to serve through (not closed here). */
  constructor(private readonly o: BlockThreadOptions, private readonly loop: EventLoop, disk: Disk | null = null) {
    this.shared = SharedRecord.attach(BLOCK_SHARED, o.shared);
    this.disk = disk;
    this.ownsDisk = disk === null;
  }

  /** Processors of the running queues (stats, tests). */
  processors(): QueueProcessor[] {
    return [...this.queues.values()].map((q) => q.processor);
  }

  start(ring: Parameters<QueueRunner["start"]>[0], mem: Parameters<QueueRunner["start"]>[1]): void {
    this.stop(ring.index);
    this.disk ??= openDisk(this.o.disk, false);
    const processor = new QueueProcessor(openVirtqueue(mem, ring), this.disk, this.o.policy, this.shared, this.loop);
    this.queues.set(ring.index, { processor, stop: processor.serve() });
  }

  /** Waits for the queue's requests in flight, so its position is final. */
  stop(index: number): RingPosition | null {
    const q = this.queues.get(index);
    if (q === undefined) return null;
    this.queues.delete(index);
    q.stop();
    return q.processor.queue.position();
  }

  dispose(): void {
    for (const i of [...this.queues.keys()]) this.stop(i);
    if (this.ownsDisk) {
      this.disk?.close();
      this.disk = null;
    }
  }
}

/** The queue-thread runner factory (the definition's `queueRunner`). */
export function blockQueueRunner(options: unknown, loop: EventLoop): BlockQueueRunner {
  return new BlockQueueRunner(options as BlockThreadOptions, loop);
}
