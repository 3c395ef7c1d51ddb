// The block device's acquire phase: everything it opens, done once before serving, returned as
// plain data (fd numbers are process-wide) from which the device thread and every queue thread
// build their Disk (disk/open.ts). And what it may still touch on the host afterwards: nothing
// for a raw image, nor for a qcow2 image (its whole backing chain is opened here).
import { log } from "../../src/log.ts";
import type { HostAccess } from "../../src/host_access.ts";
import type { BlockOptions } from "./options.ts";
import type { BlockDiskResource } from "./disk/open.ts";
import { acquireRawDisk } from "./disk/raw.ts";
import { acquireQcow2Disk, isQcow2File } from "./disk/qcow2/disk.ts";
import { acquireNbdDisk, isNbdUri, nbdHostAccess } from "./disk/nbd.ts";
import { acquireRbdDisk, isRbdSpec, rbdHostAccess } from "./disk/rbd.ts";

/**
 * Opens the image (and, with --direct, its buffered twin), locks it as QEMU does (unless
 * --no-lock), and with --aio io_uring or hybrid sets up one io_uring per queue, each restricted to the
 * operations a disk queue submits (a kernel without io_uring costs one warning, and the disk is
 * served synchronously). Throws a message saying what is wrong.
 */
export function acquireBlockDisk(o: BlockOptions): BlockDiskResource {
  if (isNbdUri(o.file)) return acquireNbdDisk(o.file, { readOnly: o.readOnly, timeoutMs: o.nbdTimeoutMs });
  if (isRbdSpec(o.file)) return acquireRbdDisk(o.file, { readOnly: o.readOnly });
  const aio = o.aio;
  const rings = { queues: o.numQueues, queueSize: o.queueSize };
  // --format raw never probes: what a guest writes into its raw disk cannot change how it opens.
  if (o.format === "qcow2" || (o.format === "auto" && isQcow2File(o.file))) {
    if (o.direct) log.info(`block: ${o.file} is qcow2: served through the page cache (--direct applies to raw images)`);
    // --direct defaults --aio to io_uring for what it opens O_DIRECT; a qcow2 image is read
    // through the page cache, where sync is the default (an explicit --aio still holds).
    return acquireQcow2Disk(o.file, { readOnly: o.readOnly, lock: o.lock, aio: o.direct && !o.aioGiven ? "sync" : aio, ...rings });
  }
  return acquireRawDisk(o.file, { readOnly: o.readOnly, direct: o.direct, aio, lock: o.lock, ...rings });
}

/** After acquire, a raw image needs no new file, socket or thread: only I/O on its fds. An NBD
 * disk connects to its server again (each queue thread, and after an outage); an RBD disk
 * connects to its cluster again, with librados's own threads. */
export function blockHostAccess(o: BlockOptions): HostAccess {
  if (isNbdUri(o.file)) return nbdHostAccess(o.file);
  if (isRbdSpec(o.file)) return rbdHostAccess(o.file);
  return {
    paths: [],
    unixSockets: [],
    tcp: [],
    hostNetwork: false,
    threadsAfterAcquire: false,
    syscallGroups: ["block-io", "io_uring"],
  };
}
