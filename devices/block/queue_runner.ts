// Serving block queues in queue threads of their own (src/queue_thread.ts), so the queues of a
// multi-queue disk run in parallel. Each thread opens the image itself (an fd per thread: no
// shared file offset is involved, preadv/pwritev are positional) and shares only the cache mode
// with the device, through one shared word that SET_CONFIG may flip at any time.
import type { QueueRunnerModule } from "../../src/queue_thread.ts";
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

/** One image fd per thread, shared by the queues that thread serves. */
let image: BlockImage | null = null;

export const blockQueueRunner: QueueRunnerModule = {
  runQueue(queue, _mem, loop, raw) {
    const o = raw as BlockThreadOptions;
    image ??= BlockImage.open(o.file, { readOnly: o.readOnly, direct: o.direct });
    const processor = new QueueProcessor(queue, image, sharedPolicy(o.policy, new Int32Array(o.cacheMode)), o.aio);
    return { stop: processor.serve(loop) };
  },
};
