// Operations on the guest memory an iovec array describes (a request's data segments): slice it,
// zero it, copy to and from it. For the disks that cannot hand every segment to the host as it
// is: qcow2 (a request split over clusters, zeroes, backing data, inflated clusters) and NBD
// (a bounce buffer when libnbd needs one flat buffer).
import { toArrayBuffer, ptr } from "bun:ffi";
import { IovecArray } from "../../../ffi/io.ts";

/**
 * Calls `fn(address, length, at)` on each piece of host memory that [offset, offset + len) of the
 * iovecs covers, in order (`at`: the piece's place in the range); stops early when `fn` returns
 * false. Returns true if the whole range was covered and `fn` never refused.
 */
function eachSpan(iov: IovecArray, offset: number, len: number, fn: (address: number, n: number, at: number) => boolean): boolean {
  let pos = 0;
  let at = 0;
  for (let i = 0; i < iov.count && len > 0; i++) {
    const base = iov.baseAt(i);
    const l = iov.lenAt(i);
    if (pos + l <= offset) {
      pos += l;
      continue;
    }
    const skip = Math.max(0, offset - pos);
    const n = Math.min(l - skip, len);
    if (!fn(base + skip, n, at)) return false;
    at += n;
    len -= n;
    offset += n;
    pos += l;
  }
  return len === 0;
}

/** Fills `dst` with the part [offset, offset + len) of `src`; returns false if `dst` is too small. */
export function sliceIov(src: IovecArray, offset: number, len: number, dst: IovecArray): boolean {
  dst.clear();
  return eachSpan(src, offset, len, (address, n) => dst.push(address, n));
}

/** Calls `fn` on views of [offset, offset + len) of the memory the iovecs describe. */
function eachView(iov: IovecArray, offset: number, len: number, fn: (view: Uint8Array, at: number) => void): void {
  eachSpan(iov, offset, len, (address, n, at) => {
    if (n > 0) fn(new Uint8Array(toArrayBuffer(address as never, 0, n)), at);
    return true;
  });
}

export function zeroIov(iov: IovecArray, offset: number, len: number): void {
  eachView(iov, offset, len, (v) => v.fill(0));
}

/** Copies `src` into the iovecs' memory from byte `offset` on. */
export function copyToIov(iov: IovecArray, offset: number, src: Uint8Array): void {
  eachView(iov, offset, src.length, (v, at) => v.set(src.subarray(at, at + v.length)));
}

/** Copies [offset, offset + dst.length) of the iovecs' memory into `dst`. */
export function copyFromIov(iov: IovecArray, offset: number, dst: Uint8Array): void {
  eachView(iov, offset, dst.length, (v, at) => dst.set(v, at));
}

/** An iovec array describing one buffer of our own (the buffer must outlive the array's use). */
export function bufferIov(buf: Uint8Array): IovecArray {
  const iov = new IovecArray(1);
  if (buf.length > 0) iov.push(ptr(buf), buf.length);
  return iov;
}

