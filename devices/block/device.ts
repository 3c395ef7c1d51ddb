// The virtio-blk device (virtio id 2): features, config space, cache mode, per-queue processors and
// snapshots. The disk (built from the acquired resource) and the queue processors do the I/O; this
// class only wires them.
import { COMMON_FEATURES, type DeviceContext, type VhostUserDevice } from "../../src/device.ts";
import type { GuestMemory } from "../../src/memory.ts";
import type { VirtqueueConfig, RingPosition } from "../../src/ring.ts";
import { QueueService } from "../../src/queue_thread.ts";
import { BlockQueueRunner, type BlockThreadOptions } from "./queue_runner.ts";
import { SharedRecord } from "../../src/shared_record.ts";
import { log } from "../../src/log.ts";
import type { Disk } from "./disk/disk.ts";
import { openDisk, releaseDiskResource, type BlockDiskResource } from "./disk/open.ts";
import { BLOCK_SHARED, type BlockPolicy, type BlockShared } from "./queue_processor.ts";
import { segMaxFor, type BlockOptions } from "./options.ts";
import { validateBlockState, BLOCK_STATE_VERSION, type BlockState, type BlockStateSelf } from "./state.ts";
import {
  buildConfig, CONFIG_SIZE, CFG, VIRTIO_BLK_ID_BYTES, type BlockGeometry,
  VIRTIO_BLK_F,
} from "./config.ts";

/** The GET_ID answer when --serial is not given: the file's device and inode numbers in hex. */
export function defaultSerial(dev: number, ino: number): string {
  const s = `${dev.toString(16)}-${ino.toString(16)}`;
  return s.length <= VIRTIO_BLK_ID_BYTES ? s : s.slice(s.length - VIRTIO_BLK_ID_BYTES);
}

/** Cache mode after reset: writeback (the guest sends FLUSH when it needs stability). */
const DEFAULT_WRITEBACK = 1;

export class BlockDevice implements VhostUserDevice {
  /** The device thread's disk: owns the acquired fds (closed by dispose). */
  readonly disk: Disk;
  private readonly serial: string;
  private readonly geometry: BlockGeometry;
  private readonly policy: BlockPolicy;
  private readonly offered: bigint;
  private acked = 0n;
  private writeback = DEFAULT_WRITEBACK;
  /** The cache mode, shared with the queue threads (nobody subscribes: queues read it per request). */
  private readonly shared: BlockShared = SharedRecord.create(BLOCK_SHARED);
  /** Where the request queues run: queue i on thread i % threads, or all in the device thread. */
  private readonly queues: QueueService;
  private readonly readOnly: boolean;

  /** Takes ownership of `resource` (acquireBlockDisk's), also when it throws. */
  constructor(private readonly opts: BlockOptions, resource: BlockDiskResource, ctx: DeviceContext) {
    let disk: Disk;
    try {
      disk = openDisk(resource, true);
    } catch (e) {
      releaseDiskResource(resource);
      throw e;
    }
    this.disk = disk;
    const blkSize = disk.logicalBlockSize;
    if (disk.size % blkSize !== 0) {
      log.warn(`${opts.file}: size ${disk.size} is not a multiple of ${blkSize}; the last ${disk.size % blkSize} bytes are not addressable`);
    }
    const identity = disk.identity();
    this.serial = opts.serial ?? defaultSerial(identity.dev, identity.ino);
    // Read-only by option, or because the store itself is (a read-only NBD export).
    this.readOnly = opts.readOnly || disk.readOnly;
    const writable = !this.readOnly;
    const segMax = segMaxFor(opts.queueSize);
    const physicalBlockExp = Math.min(15, Math.log2(disk.physicalBlockSize / blkSize));
    this.geometry = {
      // A multiple of the block size, in 512-byte sectors.
      capacitySectors: Math.floor(disk.size / blkSize) * (blkSize / 512),
      segMax,
      blkSize,
      physicalBlockExp,
      minIoSize: 1,
      optIoSize: 0,
      numQueues: opts.numQueues,
      discard: writable && opts.sparse,
      writeZeroes: writable,
      writeZeroesMayUnmap: opts.sparse,
    };
    const serialBytes = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    serialBytes.set(Buffer.from(this.serial).subarray(0, VIRTIO_BLK_ID_BYTES));
    this.policy = {
      readOnly: this.readOnly,
      discard: this.geometry.discard,
      writeZeroes: this.geometry.writeZeroes,
      mayUnmap: opts.sparse,
      serial: serialBytes,
      capacitySectors: this.geometry.capacitySectors,
      blkSize,
      segMax,
      coalesceUs: opts.coalesceUs,
    };
    this.offered =
      COMMON_FEATURES | VIRTIO_BLK_F.SEG_MAX | VIRTIO_BLK_F.BLK_SIZE | VIRTIO_BLK_F.TOPOLOGY | VIRTIO_BLK_F.FLUSH |
      VIRTIO_BLK_F.CONFIG_WCE | VIRTIO_BLK_F.MQ |
      (this.readOnly ? VIRTIO_BLK_F.RO : 0n) |
      (this.geometry.discard ? VIRTIO_BLK_F.DISCARD : 0n) |
      (this.geometry.writeZeroes ? VIRTIO_BLK_F.WRITE_ZEROES : 0n);
    this.updateWriteMode();
    const threadOptions: BlockThreadOptions = {
      disk: resource, policy: this.policy, shared: this.shared.shared,
    };
    // A disk that cannot be served from several threads at once serves every queue here.
    let threads = opts.threads;
    if (threads > 0 && !disk.multiThread) {
      if (opts.threadsGiven) log.warn(`block: ${opts.file} is served from one thread (its format keeps state in memory); ignoring --threads ${threads}`);
      threads = 0;
    }
    this.queues = new QueueService({
      entry: ctx.queueThreadEntry, device: "block", options: threadOptions, threads, loop: ctx.loop,
      // In the device thread, through this device's disk; queue threads build their own from the resource.
      runner: (o, loop) => new BlockQueueRunner(o as BlockThreadOptions, loop, disk),
    });
    if (disk.watchSize !== undefined && !disk.multiThread) disk.watchSize(ctx.loop, (size) => this.resized(size, ctx));
    log.info(
      `block: ${opts.file} (${disk.description}, ${disk.size} bytes, ` +
        `${blkSize}-byte blocks, ${this.readOnly ? "read-only" : "read-write"}${opts.lock ? "" : ", not locked"}), ` +
        `serial '${this.serial}', ${opts.numQueues} queue(s), ${threads === 0 ? "served in the device thread" : `${threads} queue thread(s)`}`,
    );
  }

  /** The store was resized while served: the new capacity goes into the config space and the
   * queues' bounds (one thread serves them all, through this policy object), and the front-end is
   * told to re-read the config space (BACKEND_CONFIG_CHANGE_MSG; virtio-blk drivers then resize). */
  private resized(size: number, ctx: DeviceContext): void {
    const blkSize = this.geometry.blkSize;
    const sectors = Math.floor(size / blkSize) * (blkSize / 512);
    if (sectors === this.geometry.capacitySectors) return;
    log.info(`block: ${this.opts.file} resized: ${this.geometry.capacitySectors * 512} → ${sectors * 512} bytes; telling the front-end`);
    this.geometry.capacitySectors = sectors;
    this.policy.capacitySectors = sectors;
    ctx.configChanged();
  }

  maxQueues(): number {
    return this.opts.numQueues;
  }

  features(): bigint {
    return this.offered;
  }

  ackFeatures(features: bigint): void {
    this.acked = features;
    // virtio 1.2 §5.2.5.2: with CONFIG_WCE but no FLUSH the device starts in writethrough.
    if ((features & VIRTIO_BLK_F.CONFIG_WCE) !== 0n && (features & VIRTIO_BLK_F.FLUSH) === 0n) this.writeback = 0;
    this.updateWriteMode();
  }

  protocolFeatures(): bigint {
    return 0n;
  }

  /** Writes are stable at completion unless the driver negotiated FLUSH and the cache is writeback. */
  private updateWriteMode(): void {
    const writethrough = !this.disk.readOnly && ((this.acked & VIRTIO_BLK_F.FLUSH) === 0n || this.writeback === 0);
    this.shared.set("writethrough", writethrough);
  }

  readConfig(offset: number, size: number): Uint8Array | null {
    if (offset < 0 || size < 0 || offset + size > CONFIG_SIZE) return null;
    return buildConfig(this.geometry, this.writeback).subarray(offset, offset + size);
  }

  /** Only `writeback` is writable (CONFIG_WCE), with 0 (writethrough) or 1 (writeback). */
  writeConfig(offset: number, data: Uint8Array): boolean {
    if (offset !== CFG.WRITEBACK || data.length !== 1 || data[0]! > 1) return false;
    this.writeback = data[0]!;
    this.updateWriteMode();
    log.debug(`block: cache mode ${this.writeback ? "writeback" : "writethrough"}`);
    return true;
  }

  startQueue(ring: VirtqueueConfig, mem: GuestMemory): void {
    if (ring.size < this.geometry.segMax + 2) {
      // Linux sizes its chains by seg_max, not by the ring: chains may be longer than this ring.
      log.warn(
        `block queue ${ring.index}: ring of ${ring.size} entries, but seg_max ${this.geometry.segMax} lets the guest build ` +
          `chains of ${this.geometry.segMax + 2} descriptors; give --queue-size ${ring.size} to match the front-end`,
      );
    }
    this.disk.activate?.(); // throws (the ring stays stopped) while another process has the image
    this.queues.start(ring, mem, this.acked);
  }

  /** Stopping waits for the queue's requests in flight (io_uring) in whichever thread serves it,
   * so none is in flight, and all are published, once this returns. */
  stopQueue(index: number): RingPosition | null {
    return this.queues.stop(index);
  }

  reset(): void {
    for (const i of this.queues.running()) this.stopQueue(i);
    this.acked = 0n;
    this.writeback = DEFAULT_WRITEBACK;
    this.updateWriteMode();
  }

  /** The VM is stopping (or about to be saved): make what the guest wrote stable. */
  enterSuspendedState(): void {
    try {
      this.disk.flushNow();
    } catch (e) {
      log.warn(`block: flush on suspend failed: ${(e as Error).message}`);
    }
    this.disk.suspend?.();
  }

  private self(): BlockStateSelf {
    return {
      image: identityState(this.disk),
      serial: this.serial,
      explicitSerial: this.opts.serial !== null,
      capacitySectors: this.geometry.capacitySectors,
      blkSize: this.geometry.blkSize,
      segMax: this.geometry.segMax,
      readOnly: this.readOnly,
    };
  }

  snapshot(): BlockState {
    return { version: BLOCK_STATE_VERSION, ...this.self(), writeback: this.writeback };
  }

  restore(state: unknown, ackedFeatures: bigint): void {
    const self = this.self();
    // The image may have been resized on the host since we opened it: compare against now.
    self.image.size = this.disk.currentSize();
    if (self.image.size !== this.disk.size) {
      throw new Error(`block state: ${self.image.path} changed size since this backend opened it (${this.disk.size} → ${self.image.size} bytes); restart the backend`);
    }
    const s = validateBlockState(state, self);
    this.writeback = s.writeback;
    this.ackFeatures(ackedFeatures);
  }

  dispose(): void {
    this.queues.dispose();
    this.disk.close();
    this.shared.dispose();
  }
}

/** The snapshot's image section: the disk's identity. */
function identityState(disk: Disk): BlockStateSelf["image"] {
  const { location, size, dev, ino } = disk.identity();
  return { path: location, size, dev, ino };
}
