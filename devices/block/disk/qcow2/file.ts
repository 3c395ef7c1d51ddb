// The file under a qcow2 image (or a raw backing file): positional reads and writes of metadata
// buffers, vectored data transfers straight to and from guest memory, and the space operations.
// Everything is synchronous on the calling thread; callers decide the order (crash consistency
// lives in the order of these calls and of sync()).
import { toArrayBuffer, ptr } from "bun:ffi";
import {
  open, pread, pwrite, preadv, pwritev, fallocate, fdatasync, fstat, blockDeviceSize, IovecArray,
  O_RDONLY, O_RDWR, S_IFMT, S_IFREG, S_IFBLK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
} from "../../../../ffi/io.ts";
import { close, SysError, EINVAL, EOPNOTSUPP, ENOTTY, ENODEV } from "../../../../ffi/libc.ts";

/** The I/O a qcow2 image needs from the file that holds it. */
export class ImageFile {
  /** Current length in bytes (kept up to date by our own writes). */
  length: number;
  readonly dev: number;
  readonly ino: number;
  private punch = true;
  private closed = false;

  constructor(readonly path: string, readonly fd: number, readonly readOnly: boolean, private readonly ownsFd = true) {
    const st = fstat(fd);
    const type = st.mode & S_IFMT;
    if (type !== S_IFREG && type !== S_IFBLK) throw new Error(`${path} is neither a regular file nor a block device`);
    this.length = type === S_IFBLK ? blockDeviceSize(fd) : st.size;
    this.dev = st.dev;
    this.ino = st.ino;
  }

  static open(path: string, readOnly: boolean): ImageFile {
    const fd = open(path, readOnly ? O_RDONLY : O_RDWR);
    try {
      return new ImageFile(path, fd, readOnly);
    } catch (e) {
      close(fd);
      throw e;
    }
  }

  /** Reads `buf.length` bytes at `offset`; what lies past the end of the file reads as zeroes. */
  readAt(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const n = pread(this.fd, buf.subarray(done), buf.length - done, offset + done);
      if (n <= 0) {
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }

  writeAt(buf: Uint8Array, offset: number): void {
    if (this.readOnly) throw new Error(`${this.path}: write to a read-only image`);
    let done = 0;
    while (done < buf.length) {
      const n = pwrite(this.fd, buf.subarray(done), buf.length - done, offset + done);
      if (n <= 0) throw new Error(`${this.path}: pwrite at ${offset + done} returned ${n}`);
      done += n;
    }
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  /** Reads `len` bytes at `offset` into the iovecs (consumed: the array is left advanced); past the end of the file reads zeroes. */
  readv(iov: IovecArray, offset: number, len: number): void {
    let done = 0;
    while (done < len) {
      const n = preadv(this.fd, iov, offset + done);
      if (n <= 0) {
        zeroIov(iov, 0, len - done);
        return;
      }
      done += n;
      if (done < len) iov.advance(n);
    }
  }

  /** Writes `len` bytes from the iovecs at `offset` (the array may be left advanced). */
  writev(iov: IovecArray, offset: number, len: number): void {
    if (this.readOnly) throw new Error(`${this.path}: write to a read-only image`);
    let done = 0;
    while (done < len) {
      const n = pwritev(this.fd, iov, offset + done);
      if (n <= 0) throw new Error(`${this.path}: pwritev at ${offset + done} returned ${n}`);
      done += n;
      if (done < len) iov.advance(n);
    }
    if (offset + len > this.length) this.length = offset + len;
  }

  sync(): void {
    if (!this.readOnly) fdatasync(this.fd);
  }

  /** Gives a byte range back to the host file system, if it can (advisory). */
  punchHole(offset: number, len: number): void {
    if (!this.punch || this.readOnly || len === 0) return;
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    } catch (e) {
      if (!(e instanceof SysError) || ![EOPNOTSUPP, ENOTTY, ENODEV, EINVAL].includes(e.errno)) throw e;
      this.punch = false;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.ownsFd) close(this.fd);
  }
}

// ---- scatter-gather helpers (iovecs point at host memory: guest RAM or our own buffers) ----

function entry(iov: IovecArray, i: number): [number, number] {
  const v = new DataView(iov.bytes.buffer, iov.bytes.byteOffset + i * 16, 16);
  return [v.getUint32(0, true) + v.getUint32(4, true) * 0x1_0000_0000, v.getUint32(8, true) + v.getUint32(12, true) * 0x1_0000_0000];
}

/**
 * Calls `fn(address, length, at)` on each piece of host memory that [offset, offset + len) of the
 * iovecs covers, in order (`at`: the piece's place in the range); stops early when `fn` returns
 * false. Returns true if the whole range was covered and `fn` never refused.
 */
function eachSpan(iov: IovecArray, offset: number, len: number, fn: (address: number, n: number, at: number) => boolean): boolean {
  let pos = 0;
  let at = 0;
  for (let i = 0; i < iov.count && len > 0; i++) {
    const [base, l] = entry(iov, i);
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

