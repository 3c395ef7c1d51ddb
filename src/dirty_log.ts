// Dirty-page logging for live migration (VHOST_F_LOG_ALL, protocol feature LOG_SHMFD). The
// front-end shares a bitmap, one bit per 4 KiB page of guest-physical address space; while
// LOG_ALL is acked, every byte the backend writes into guest memory must set its page's bit, or
// the migration copies a stale page. The bits are set with an atomic OR (the front-end clears
// them concurrently) and only after the write itself, so a page can never be copied between
// the bit and the data.
//
// Two places write guest memory on the guest's behalf, and both mark here: the used ring (the
// Virtqueue's add/flush/notification fields) and request data, which the Virtqueue marks when a
// chain completes (its writable bytes up to the used length): devices cannot forget it.
import { toArrayBuffer } from "bun:ffi";
import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED } from "../ffi/mem.ts";
import { close } from "../ffi/libc.ts";
import { checkSharedFile } from "./shared_file.ts";
import { log } from "./log.ts";
import type { DescriptorChain } from "./chain.ts";

export const LOG_PAGE = 4096;
/** The most bitmap bytes accepted: covers 16 TiB of guest-physical space. */
const MAX_LOG_BYTES = 1 << 29;

/** A mapped log, as plain data for other threads (they borrow the mapping). */
export interface DirtyLogShare {
  host: number;
  size: number;
}

export class DirtyLog {
  private readonly bits: Uint8Array;
  /** Test hook: with VHOST_BACKEND_TEST_NO_DIRTY_LOG=1 nothing is marked (proves the migration test catches it). */
  private static readonly disabled = process.env.VHOST_BACKEND_TEST_NO_DIRTY_LOG === "1";

  private constructor(readonly host: number, readonly size: number, private readonly owned: boolean) {
    this.bits = new Uint8Array(toArrayBuffer(host as never, 0, size));
  }

  /** Maps the front-end's log (SET_LOG_BASE: size and offset in the fd); closes the fd either way. */
  static map(fd: number, size: number, offset: number): DirtyLog {
    try {
      if (size === 0 || size > MAX_LOG_BYTES) throw new Error(`log of ${size} bytes (1..${MAX_LOG_BYTES})`);
      if (offset % LOG_PAGE !== 0) throw new Error(`log offset ${offset} is not page aligned`);
      // Marking a bit past the end of the file would raise SIGBUS (QEMU's log is a memfd sealed
      // against shrinking; one we can seal is sealed here).
      const guard = checkSharedFile(fd, offset, size, "log", { regularOnly: true });
      if (guard === "unsealable" || guard === "not-memfd") {
        log.warn("dirty log: its file cannot be sealed against shrinking; a front-end that truncates it can crash this backend");
      }
      return new DirtyLog(mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset), size, true);
    } finally {
      close(fd);
    }
  }

  static borrow(s: DirtyLogShare): DirtyLog {
    return new DirtyLog(s.host, s.size, false);
  }

  share(): DirtyLogShare {
    return { host: this.host, size: this.size };
  }

  /** Marks the pages of guest-physical range [gpa, gpa+len). Pages past the bitmap are ignored. */
  mark(gpa: number, len: number): void {
    if (len <= 0 || DirtyLog.disabled) return;
    const first = Math.floor(gpa / LOG_PAGE);
    const last = Math.min(Math.floor((gpa + len - 1) / LOG_PAGE), this.size * 8 - 1);
    for (let page = first; page <= last; page++) {
      Atomics.or(this.bits, page >>> 3, 1 << (page & 7));
    }
  }

  /** Marks the first `len` bytes of a completed chain's writable buffers (what the device wrote). */
  markWritten(chain: DescriptorChain, len: number): void {
    let left = len;
    for (const seg of chain.writable) {
      if (left <= 0) break;
      const n = Math.min(seg.len, left);
      this.mark(seg.region.gpa + seg.offset, n);
      left -= n;
    }
  }

  unmap(): void {
    if (this.owned) munmap(this.host, this.size);
  }
}
