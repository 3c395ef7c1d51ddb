// `backend device block --socket PATH --file IMAGE`: a virtio-blk device over a raw or qcow2 image file or a
// host block device (qemu-storage-daemon's vhost-user-blk export, crosvm's `device block`).
import { accessSync, constants, statSync } from "node:fs";
import type { DeviceDefinition } from "../../src/device.ts";
import { BLOCK_ARGS, parseBlockOptions, type BlockOptions } from "./options.ts";
import { BlockDevice } from "./device.ts";
import { blockQueueRunner } from "./queue_runner.ts";
import { acquireBlockDisk, blockHostAccess } from "./acquire.ts";
import { releaseDiskResource, type BlockDiskResource } from "./disk/open.ts";
import { isNbdUri } from "./disk/nbd.ts";
import { isRbdSpec, parseRbdSpec } from "./disk/rbd_spec.ts";

/** virtio spec 5.2: the block device. */
const VIRTIO_ID_BLOCK = 2;

export const blockDevice: DeviceDefinition<BlockOptions> = {
  name: "block",
  virtioId: VIRTIO_ID_BLOCK,
  description: "virtio-blk over a raw or qcow2 disk image, a block device, an NBD export or a Ceph RBD image",
  // As released. QEMU's docs/interop/vhost-user.json spells this type "block", and its "blk-file"
  // feature stands for a --blk-file option (ours is --file).
  capabilities: { type: "block", features: ["read-only"] },
  example: ["--socket", "/run/vm/disk.sock", "--file", "disk.img"],
  args: BLOCK_ARGS,
  parse(raw) {
    const o = parseBlockOptions(raw);
    if (isNbdUri(o.file)) {
      if (o.format === "qcow2") throw new Error(`--format qcow2: ${o.file} is an NBD export, served as raw (a qcow2 image behind NBD: export it with qemu-nbd -f qcow2)`);
      return o;
    }
    if (isRbdSpec(o.file)) {
      parseRbdSpec(o.file); // the spec's form, checked before anything connects
      if (o.format === "qcow2") throw new Error(`--format qcow2: ${o.file} is an RBD image, served as raw`);
      return o;
    }
    let st;
    try {
      st = statSync(o.file);
    } catch {
      throw new Error(`--file ${o.file}: no such file`);
    }
    if (!st.isFile() && !st.isBlockDevice()) throw new Error(`--file ${o.file}: neither a regular file nor a block device`);
    try {
      accessSync(o.file, o.readOnly ? constants.R_OK : constants.R_OK | constants.W_OK);
    } catch {
      throw new Error(`--file ${o.file}: not ${o.readOnly ? "readable" : "readable and writable (use --read-only to serve it read-only)"}`);
    }
    return o;
  },
  acquire: acquireBlockDisk,
  release: releaseDiskResource,
  hostAccess: blockHostAccess,
  create(o, resource: BlockDiskResource, ctx) {
    return new BlockDevice(o, resource, ctx);
  },
  queueRunner: blockQueueRunner,
};

export default blockDevice;
