// Opening a qcow2 image with its backing chain. Two steps, so the files can be opened in the
// acquire phase and the image built later from their fds: openChain() opens every file of the
// chain (the top one is given), read-only below the top, each link resolved as QEMU does (a
// relative name is relative to the directory of the image that names it), its format taken from
// the backing-format extension or probed; it refuses a chain that loops, runs too deep, or names
// something that is not a local file. buildImage() then reads the metadata and builds the images.
import { dirname, resolve, isAbsolute } from "node:path";
import { ImageFile } from "./file.ts";
import { isQcow2 } from "./header.ts";
import { Qcow2Image, RawBackingImage, type ReadableImage } from "./qcow2.ts";

export type DiskFormat = "raw" | "qcow2";

/** Backing chains deeper than this are refused (each link holds an fd). */
export const MAX_CHAIN_DEPTH = 64;

export interface ChainLink {
  file: ImageFile;
  format: DiskFormat;
}

/** Reads the first bytes of an open file and says whether it is qcow2. */
export function probeFormat(file: ImageFile): DiskFormat {
  const b = new Uint8Array(4);
  file.readAt(b, 0);
  return isQcow2(b) ? "qcow2" : "raw";
}

/**
 * Opens the files of the backing chain under the qcow2 image in `top`: returns the chain, top
 * first. On error, closes what it opened (not `top`) and throws.
 */
export function openChain(top: ImageFile): ChainLink[] {
  const links: ChainLink[] = [{ file: top, format: "qcow2" }];
  try {
    for (let cur = top; ; ) {
      // Read-only and without a backing image: only the header is needed here.
      const h = new Qcow2Image(cur, null, true).header;
      if (h.backingFile === null) return links;
      if (links.length > MAX_CHAIN_DEPTH) throw new Error(`${top.path}: backing chain deeper than ${MAX_CHAIN_DEPTH} images`);
      const format = h.backingFormat;
      if (format !== null && format !== "raw" && format !== "qcow2") throw new Error(`${cur.path}: backing format '${format}' is not supported (raw or qcow2)`);
      const file = ImageFile.open(backingPath(cur.path, h.backingFile), true);
      if (links.some((l) => l.file.dev === file.dev && l.file.ino === file.ino)) {
        file.close();
        throw new Error(`${cur.path}: backing chain loops back to ${file.path}`);
      }
      const link: ChainLink = { file, format: format ?? probeFormat(file) };
      links.push(link);
      if (link.format === "raw") return links;
      cur = file;
    }
  } catch (e) {
    for (const l of links.slice(1)) l.file.close();
    throw e;
  }
}

/** Where a backing file name leads, as QEMU resolves it. */
export function backingPath(parentPath: string, name: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith("file:")) {
    throw new Error(`${parentPath}: backing file '${name}' is not a local file (protocols and json: names are not supported)`);
  }
  const plain = name.startsWith("file:") ? name.slice(5) : name;
  return isAbsolute(plain) ? plain : resolve(dirname(parentPath), plain);
}

/** Builds the image over an opened chain (bottom up); the images own the chain's ImageFiles. */
export function buildImage(links: ChainLink[], readOnly: boolean): Qcow2Image {
  let backing: ReadableImage | null = null;
  try {
    for (let i = links.length - 1; i >= 1; i--) {
      const l = links[i]!;
      backing = l.format === "raw" ? new RawBackingImage(l.file) : new Qcow2Image(l.file, backing, true);
    }
    return new Qcow2Image(links[0]!.file, backing, readOnly);
  } catch (e) {
    backing?.close();
    throw e;
  }
}

/** Opens the qcow2 image in `file` (taking ownership of it) with its whole backing chain. */
export function openQcow2(file: ImageFile, readOnly: boolean): Qcow2Image {
  let links: ChainLink[];
  try {
    links = openChain(file);
  } catch (e) {
    file.close();
    throw e;
  }
  try {
    return buildImage(links, readOnly);
  } catch (e) {
    for (const l of links) l.file.close();
    throw e;
  }
}
