// Every kind of disk the block device can serve, by the resource its acquire phase produced: the
// one place that maps a resource's `kind` to its implementation (each implementation adds its case).
import type { Disk } from "./disk.ts";
import { openRawDisk, closeRawDiskResource, type RawDiskResource } from "./raw.ts";
import { openQcow2Disk, closeQcow2DiskResource, type Qcow2DiskResource } from "./qcow2/disk.ts";
import { openNbdDisk, type NbdDiskResource } from "./nbd.ts";
import { openRbdDisk, type RbdDiskResource } from "./rbd.ts";

/** The resource of any disk kind (plain, structured-cloneable data). */
export type BlockDiskResource = RawDiskResource | Qcow2DiskResource | NbdDiskResource | RbdDiskResource;

/** Builds this thread's Disk from the resource; `owner` closes the resource's fds on close(). */
export function openDisk(resource: BlockDiskResource, owner: boolean): Disk {
  switch (resource.kind) {
    case "raw":
      return openRawDisk(resource, owner);
    case "qcow2":
      return openQcow2Disk(resource, owner);
    case "nbd":
      return openNbdDisk(resource, owner);
    case "rbd":
      return openRbdDisk(resource, owner);
    default:
      throw new Error(`unknown disk kind '${(resource as { kind: string }).kind}'`);
  }
}

/** Releases a resource no Disk owns yet (building the device failed after acquire). */
export function releaseDiskResource(resource: BlockDiskResource): void {
  switch (resource.kind) {
    case "raw":
      closeRawDiskResource(resource);
      return;
    case "qcow2":
      closeQcow2DiskResource(resource);
      return;
    case "nbd": // hold no fd: every Disk connects on its own
    case "rbd":
      return;
  }
}
