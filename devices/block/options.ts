// `backend device block` options: the citty definitions and one parser shared by the main thread
// (validate) and the worker (create), so both read the command line the same way.
import { availableParallelism } from "node:os";
import { IOV_MAX, VIRTIO_BLK_ID_BYTES } from "./config.ts";
import type { AioMode } from "./disk/raw.ts";
import { booleanOption, intOption } from "../../src/cli_args.ts";
import { MAX_QUEUE_SIZE } from "../../src/ring.ts";

export const BLOCK_ARGS = {
  file: { type: "string", description: "Disk image: a raw or qcow2 image file, a block device, an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), or a Ceph RBD image (rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH][:key=value...]; a snapshot is read-only) (required)" },
  format: { type: "string", default: "auto", description: "Image format: auto (qcow2 if the file starts with a qcow2 header, else raw), raw (never probed: a guest that writes a qcow2 header into its raw disk does not change how it opens next time) or qcow2" },
  "read-only": { type: "boolean", default: false, description: "Expose the disk read-only (VIRTIO_BLK_F_RO); writes fail" },
  serial: { type: "string", description: `Disk serial for GET_ID (at most ${VIRTIO_BLK_ID_BYTES} bytes; default derived from the file's device and inode)` },
  "num-queues": { type: "string", default: "16", description: "Number of request queues offered (1-256)" },
  "queue-size": { type: "string", default: "128", description: "The front-end's ring size (QEMU's queue-size); seg_max is queue-size - 2" },
  direct: { type: "boolean", default: false, description: "Open the image with O_DIRECT (bypass the host page cache)" },
  "coalesce-us": { type: "string", default: "50", description: "Interrupt coalescing: while the guest has more than 4 requests outstanding (EVENT_IDX), hold a used-ring notification up to this many µs so completions share an interrupt; a queue waiting on 1-4 requests is notified at once (0: off)" },
  aio: { type: "string", description: "How reads, writes and flushes run: sync (one preadv/pwritev at a time per queue, inside the serving thread), io_uring (everything through an io_uring per queue, many in flight; best with --direct on a real disk) or hybrid (reads of 64 KiB or more through the io_uring, copied by its worker threads in parallel; smaller reads and all writes as sync does; large page-cache reads copied by other cores, at more CPU per I/O). Default: io_uring with --direct on a raw image or block device, sync otherwise; hybrid and io_uring fall back to sync where io_uring is unavailable" },
  threads: { type: "string", description: "Queue threads serving the queues in parallel (0: all queues in the device thread; default: one per queue, up to the number of CPUs, 0 for a single queue)" },
  lock: { type: "boolean", default: true, negativeDescription: "Do not lock the image (QEMU's locking=off): only if you know no other process writes it meanwhile", description: "Lock the image as QEMU does (OFD byte-range locks), so no other backend, QEMU or qemu-img writes it while we serve it (read-only: no writer)" },
  "nbd-timeout": { type: "string", default: "0", description: "NBD disks: seconds requests wait for a server that went away (reconnecting meanwhile) before they fail (0: wait for ever, as for a local disk)" },
  sparse: { type: "boolean", default: true, negativeDescription: "Do not offer DISCARD and never deallocate on write-zeroes", description: "Offer DISCARD and deallocate discarded ranges (punch holes)" },
} as const;

export type ImageFormat = "auto" | "raw" | "qcow2";

export interface BlockOptions {
  file: string;
  /** auto: probed at acquire. */
  format: ImageFormat;
  readOnly: boolean;
  /** null: derive from the file. */
  serial: string | null;
  numQueues: number;
  queueSize: number;
  direct: boolean;
  /** How data requests run; falls back to sync where io_uring is unavailable. */
  aio: AioMode;
  /** Interrupt coalescing window of a busy queue in µs (0: off). */
  coalesceUs: number;
  sparse: boolean;
  /** Lock the image against other writers (QEMU-compatible); false with --no-lock. */
  lock: boolean;
  /** Queue threads (0: serve the queues in the device thread). */
  threads: number;
  /** NBD disks: how long requests wait for a lost server, in ms (0: for ever). */
  nbdTimeoutMs: number;
  /** --threads was given (not the default): a disk that cannot use them says so. */
  threadsGiven: boolean;
  /** --aio was given (not defaulted from --direct): a format --direct does not apply to keeps its own default. */
  aioGiven: boolean;
}

export const MAX_NUM_QUEUES = 256;
/** Measured under TCG: ~2× fewer interrupts per I/O at QD32, QD1 latency unchanged. */
export const DEFAULT_COALESCE_US = 50;
/** QEMU's vhost-user-blk-pci default queue-size; seg_max 126, as qemu-storage-daemon offers. */
export const DEFAULT_QUEUE_SIZE = 128;


/** Parses and checks the options (no file system access); throws a message naming the option. */
export function parseBlockOptions(raw: Record<string, unknown>): BlockOptions {
  const file = raw.file;
  if (typeof file !== "string" || file === "") throw new Error("--file PATH is required (a raw or qcow2 disk image, or a block device)");
  const format = raw.format ?? "auto";
  if (format !== "auto" && format !== "raw" && format !== "qcow2") throw new Error(`--format: '${String(format)}' is not one of auto, raw, qcow2`);
  const serialRaw = raw.serial;
  let serial: string | null = null;
  if (serialRaw !== undefined && serialRaw !== null) {
    serial = String(serialRaw);
    if (Buffer.byteLength(serial) > VIRTIO_BLK_ID_BYTES) throw new Error(`--serial: '${serial}' is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
  }
  const queueSize = intOption(raw, "queue-size", DEFAULT_QUEUE_SIZE, 4, MAX_QUEUE_SIZE);
  if ((queueSize & (queueSize - 1)) !== 0) throw new Error(`--queue-size: ${queueSize} is not a power of 2`);
  const numQueues = intOption(raw, "num-queues", 16, 1, MAX_NUM_QUEUES);
  const defaultThreads = numQueues === 1 ? 0 : Math.min(numQueues, availableParallelism());
  const direct = booleanOption(raw, "direct", false);
  const aioRaw = raw.aio;
  let aio: AioMode = direct ? "io_uring" : "sync";
  if (aioRaw !== undefined && aioRaw !== null && aioRaw !== "") {
    if (aioRaw !== "sync" && aioRaw !== "io_uring" && aioRaw !== "hybrid") throw new Error(`--aio: '${String(aioRaw)}' is not one of sync, io_uring, hybrid`);
    aio = aioRaw;
  }
  return {
    file,
    format,
    readOnly: booleanOption(raw, "read-only", false),
    serial,
    numQueues,
    threads: intOption(raw, "threads", defaultThreads, 0, numQueues),
    threadsGiven: raw.threads !== undefined && raw.threads !== null && raw.threads !== "",
    aioGiven: aioRaw !== undefined && aioRaw !== null && aioRaw !== "",
    queueSize,
    direct,
    aio,
    sparse: booleanOption(raw, "sparse", true),
    lock: booleanOption(raw, "lock", true),
    coalesceUs: intOption(raw, "coalesce-us", DEFAULT_COALESCE_US, 0, 10_000),
    nbdTimeoutMs: secondsOption(raw, "nbd-timeout"),
  };
}

/** A duration in seconds (decimals allowed), as ms; 0 when absent. */
function secondsOption(raw: Record<string, unknown>, name: string): number {
  const v = raw[name];
  if (v === undefined || v === null || v === "") return 0;
  const s = String(v);
  if (!/^[0-9]+(\.[0-9]+)?$/.test(s) || Number(s) > 86_400 * 365) throw new Error(`--${name}: '${s}' is not a number of seconds`);
  return Math.round(Number(s) * 1000);
}

/** seg_max: data segments per request. A chain has at most queue-size descriptors (header and
 * status take two), and one preadv/pwritev takes at most IOV_MAX iovecs. */
export function segMaxFor(queueSize: number): number {
  return Math.min(queueSize, IOV_MAX) - 2;
}
