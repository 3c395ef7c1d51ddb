// Opening a disk image as qcow2 or raw: the format is detected from the first bytes unless the
// user forced it (a raw image is then never probed: a guest that writes a qcow2 header into its raw
// disk must not change how the disk opens next time). A qcow2 image's backing chain is opened here,
// read-only, each link resolved as QEMU does (a relative name is relative to the directory of the
// image that names it), its format taken from the backing-format extension or probed, and refused
// when it loops, runs too deep, or names something that is not a plain file.
import { dirname, resolve, isAbsolute } from "node:path";
import { ImageFile } from "./file.ts";
import { isQcow2 } from "./header.ts";
import { Qcow2Image, RawBackingImage, type ReadableImage } from "./qcow2.ts";

export type DiskFormat = "raw" | "qcow2";

/** Backing chains deeper than this are refused (each link holds an fd). */
export const MAX_CHAIN_DEPTH = 64;

/** Reads the first bytes of an open file and says whether it is qcow2. */
export function probeFormat(file: ImageFile): DiskFormat {
  const b = new Uint8Array(4);
  file.readAt(b, 0);
  return isQcow2(b) ? "qcow2" : "raw";
}

/** Opens the qcow2 image in `file` (taking ownership of it) with its whole backing chain. */
export function openQcow2(file: ImageFile, readOnly: boolean): Qcow2Image {
  return openChainLink(file, readOnly, [], 0) as Qcow2Image;
}

function openChainLink(file: ImageFile, readOnly: boolean, seen: string[], depth: number): Qcow2Image {
  const ids = [...seen, `${file.dev}:${file.ino}`];
  let backing: ReadableImage | null = null;
  try {
    // Parse once without the backing image to learn its name, then open the chain below.
    const probe = new Qcow2Image(file, null, true);
    const name = probe.header.backingFile;
    if (name !== null) backing = openBacking(file.path, name, probe.header.backingFormat, ids, depth + 1);
    return new Qcow2Image(file, backing, readOnly);
  } catch (e) {
    backing?.close();
    file.close();
    throw e;
  }
}

function openBacking(parentPath: string, name: string, format: string | null, seen: string[], depth: number): ReadableImage {
  if (depth > MAX_CHAIN_DEPTH) throw new Error(`${parentPath}: backing chain deeper than ${MAX_CHAIN_DEPTH} images`);
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith("file:")) {
    throw new Error(`${parentPath}: backing file '${name}' is not a local file (protocols and json: names are not supported)`);
  }
  const plain = name.startsWith("file:") ? name.slice(5) : name;
  const path = isAbsolute(plain) ? plain : resolve(dirname(parentPath), plain);
  if (format !== null && format !== "raw" && format !== "qcow2") throw new Error(`${parentPath}: backing format '${format}' is not supported (raw or qcow2)`);
  const file = ImageFile.open(path, true);
  if (seen.includes(`${file.dev}:${file.ino}`)) {
    file.close();
    throw new Error(`${parentPath}: backing chain loops back to ${path}`);
  }
  const fmt = format ?? probeFormat(file);
  if (fmt === "raw") return new RawBackingImage(file);
  return openChainLink(file, true, seen, depth);
}
