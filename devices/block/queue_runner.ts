// The block QueueRunner (src/device.ts): serves the request queues one thread is given, in the
// device thread or a queue thread of its own (src/queue_thread.ts). Each runner opens the image
// itself (an fd per thread: no shared file offset is involved, preadv/pwritev are positional),
// shared by the queues it serves, and shares only the cache mode with the device, through one
// shared word that SET_CONFIG may flip at any time.
import type { QueueRunner } from "../../src/device.ts";
import type { EventLoop } from "../../src/event_loop.ts";
import { openVirtqueue } from "../../src/open_virtqueue.ts";
import { type RingPosition } from "../../src/ring.ts";
import { BlockImage } from "./image.ts";
import { QueueProcessor, type AioMode, type BlockPolicy } from "./queue_processor.ts";

export interface BlockThreadOptions {
  file: string;
  readOnly: boolean;
  direct: boolean;
  /** Each queue gets its own io_uring in the thread that serves it. */
  aio: AioMode;
  /** The policy without its cache mode... */
  policy: Omit<BlockPolicy, "writethrough">;
  /** ...which lives here: word 0 is 1 for writethrough. */
  cacheMode: SharedArrayBuffer;
}

/** A policy whose `writethrough` follows the shared cache-mode word. */
export function sharedPolicy(policy: Omit<BlockPolicy, "writethrough">, cacheMode: Int32Array): BlockPolicy {
  return Object.defineProperty({ ...policy }, "writethrough", {
    get: () => Atomics.load(cacheMode, 0) === 1,
    enumerable: true,
  }) as BlockPolicy;
}

export class BlockQueueRunner implements QueueRunner {
  /** One image fd for every queue this thread serves, opened at the first start. */
  private image: BlockImage | null = null;
  private readonly policy: BlockPolicy;
  private readonly queues = new Map<number, { processor: QueueProcessor; stop: () => void }>();

  constructor(private readonly o: BlockThreadOptions, private readonly loop: EventLoop) {
    this.policy = sharedPolicy(o.policy, new Int32Array(o.cacheMode));
  }

  /** Processors of the running queues (stats, tests). */
  processors(): QueueProcessor[] {
    return [...this.queues.values()].map((q) => q.processor);
  }

  start(ring: Parameters<QueueRunner["start"]>[0], mem: Parameters<QueueRunner["start"]>[1]): void {
    this.stop(ring.index);
    this.image ??= BlockImage.open(this.o.file, { readOnly: this.o.readOnly, direct: this.o.direct });
    const processor = new QueueProcessor(openVirtqueue(mem, ring), this.image, this.policy, this.o.aio);
    this.queues.set(ring.index, { processor, stop: processor.serve(this.loop) });
  }

  /** Waits for the queue's requests in flight (io_uring), so its position is final. */
  stop(index: number): RingPosition | null {
    const q = this.queues.get(index);
    if (q === undefined) return null;
    this.queues.delete(index);
    q.stop();
    return q.processor.queue.position();
  }

  dispose(): void {
    for (const i of [...this.queues.keys()]) this.stop(i);
    this.image?.close();
    this.image = null;
  }
}

export function blockQueueRunner(options: unknown, loop: EventLoop): BlockQueueRunner {
  return new BlockQueueRunner(options as BlockThreadOptions, loop);
}
