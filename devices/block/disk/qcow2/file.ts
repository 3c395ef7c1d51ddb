// The file under a qcow2 image (or a raw backing file): positional reads and writes of metadata
// buffers, vectored data transfers straight to and from guest memory, and the space operations.
// Everything is synchronous on the calling thread; callers decide the order (crash consistency
// lives in the order of these calls and of sync()).
import {
  open, pread, pwrite, preadv, pwritev, fallocate, fdatasync, fstat, blockDeviceSize, IovecArray,
  O_RDONLY, O_RDWR, S_IFMT, S_IFREG, S_IFBLK, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
} from "../../../../ffi/io.ts";
import { close, SysError, EINVAL, EOPNOTSUPP, ENOTTY, ENODEV } from "../../../../ffi/libc.ts";
import { zeroIov } from "../iov_memory.ts";

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
