// Guest memory: the regions the front-end shares as fds, mapped into this process. Every access
// the backend makes on behalf of the guest goes through `translate`, which checks the whole range
// against one region (no wrap-around, no straddling). Views are long-lived: one set per window.
import { toArrayBuffer } from "bun:ffi";
import { mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED } from "../ffi/mem.ts";
import { close } from "../ffi/libc.ts";
import { checkSharedFile } from "./shared_file.ts";
import { protectGuestRange, unprotectGuestRange } from "./guest_faults.ts";
import { log } from "./log.ts";
import type { MemoryRegionDesc } from "./protocol/codec.ts";

const PAGE = 4096;
/** An ArrayBuffer cannot exceed 4 GiB, so larger regions get overlapping 2 GiB windows every
 * 1 GiB: any range of at most 1 GiB then lies inside one window. */
const SINGLE_VIEW_MAX = 2 ** 32;
const WINDOW_STRIDE = 2 ** 30;
const WINDOW_LEN = 2 ** 31;

export interface Window {
  /** Offset of the window inside its region. */
  start: number;
  u8: Uint8Array;
  dv: DataView;
  u16: Uint16Array;
  u32: Uint32Array;
}

export class MemoryRegion {
  /** Host address of guest address `gpa`. */
  readonly host: number;
  private readonly windows: Window[] = [];

  private constructor(
    readonly desc: MemoryRegionDesc,
    private readonly mapBase: number,
    /** 0 for a borrowed view of another thread's mapping (never unmapped here). */
    private readonly mapLen: number,
    delta: number,
    /** Its slot with the SIGBUS handler (src/guest_faults.ts), or -1. */
    private readonly faultSlot = -1,
  ) {
    this.host = mapBase + delta;
    const { size } = desc;
    const makeWindow = (start: number, len: number): Window => {
      const ab = toArrayBuffer(this.host as never, start, len);
      // Lengths as exact division: a 4 GiB window is 2^32 bytes, which `>>>` would wrap to 0.
      return { start, u8: new Uint8Array(ab), dv: new DataView(ab), u16: new Uint16Array(ab, 0, Math.floor(len / 2)), u32: new Uint32Array(ab, 0, Math.floor(len / 4)) };
    };
    if (size <= SINGLE_VIEW_MAX) this.windows.push(makeWindow(0, size));
    else for (let s = 0; s < size; s += WINDOW_STRIDE) this.windows.push(makeWindow(s, Math.min(WINDOW_LEN, size - s)));
  }

  /** Maps `fd` for `desc`; the fd is closed either way (the mapping keeps the memory). */
  static map(desc: MemoryRegionDesc, fd: number): MemoryRegion {
    try {
      if (desc.size === 0) throw new Error("memory region of size 0");
      // A region must lie inside its file (a page past its end raises SIGBUS), and a memfd that
      // allows it is sealed against shrinking. A file that cannot be sealed can still be truncated
      // by the front-end: its mapping is registered with the SIGBUS handler (src/guest_faults.ts),
      // which survives that by dropping the front-end.
      const where = `region 0x${desc.gpa.toString(16)}+0x${desc.size.toString(16)}`;
      const guard = checkSharedFile(fd, desc.mmapOffset, desc.size, where, { regularOnly: false });
      const aligned = desc.mmapOffset - (desc.mmapOffset % PAGE);
      const delta = desc.mmapOffset - aligned;
      const len = desc.size + delta;
      const base = mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, aligned);
      let slot = -1;
      if (guard !== "sealed" && guard !== "sealed-now") {
        slot = protectGuestRange(base, len);
        log.warn(
          `memory ${where}: its file cannot be sealed against shrinking (${guard === "unsealable" ? "memfd without sealing" : guard === "not-memfd" ? "not a memfd" : "not a regular file"}); ` +
            (slot >= 0 ? "a front-end that truncates it is dropped" : "a front-end that truncates it can crash this backend") +
            " (QEMU's memory-backend-memfd seals by default)",
        );
      }
      return new MemoryRegion(desc, base, len, delta, slot);
    } finally {
      close(fd);
    }
  }

  /**
   * A view of a region another thread of this process has mapped at `host`. The owner unmaps it,
   * and only after every borrower has stopped using it (rings are stopped first).
   */
  static borrow(desc: MemoryRegionDesc, host: number): MemoryRegion {
    return new MemoryRegion(desc, host, 0, 0);
  }

  get gpa(): number {
    return this.desc.gpa;
  }
  get size(): number {
    return this.desc.size;
  }

  /** The window holding [offset, offset+len), or null if the range is larger than a window allows. */
  window(offset: number, len: number): Window | null {
    if (this.windows.length === 1) return this.windows[0]!;
    const w = this.windows[Math.floor(offset / WINDOW_STRIDE)];
    if (w === undefined || offset + len > w.start + w.u8.byteLength) return null;
    return w;
  }

  unmap(): void {
    if (this.mapLen === 0) return;
    unprotectGuestRange(this.faultSlot); // first: the handler must never map over a reused address
    munmap(this.mapBase, this.mapLen);
  }
}

/** A checked guest range: which region it lies in, and where. */
export interface GuestRange {
  region: MemoryRegion;
  /** Offset of the range inside the region. */
  offset: number;
}

export class GuestMemory {
  private regions: MemoryRegion[] = [];
  private last: MemoryRegion | null = null;
  /**
   * Told of every region added, synchronously, before add() returns: whoever serves rings from
   * copies of this table in other threads (QueueService) extends those copies, so a region the
   * front-end added (ADD_MEM_REG) is usable everywhere once it is acknowledged, without stopping
   * any ring. Removal is not announced: the handler stops the rings before it unmaps anything.
   */
  private readonly addListeners = new Set<(region: MemoryRegion) => void>();

  get regionCount(): number {
    return this.regions.length;
  }

  list(): readonly MemoryRegion[] {
    return this.regions;
  }

  /** Adds a mapped region; refuses one that overlaps another in guest or front-end address space. */
  add(region: MemoryRegion): void {
    const d = region.desc;
    if (d.gpa + d.size > Number.MAX_SAFE_INTEGER || d.uaddr + d.size > Number.MAX_SAFE_INTEGER) {
      throw new Error("memory region end out of range");
    }
    for (const r of this.regions) {
      const o = r.desc;
      if (d.gpa < o.gpa + o.size && o.gpa < d.gpa + d.size) {
        throw new Error(`memory region 0x${d.gpa.toString(16)}+0x${d.size.toString(16)} overlaps 0x${o.gpa.toString(16)}+0x${o.size.toString(16)}`);
      }
      if (d.uaddr < o.uaddr + o.size && o.uaddr < d.uaddr + d.size) {
        throw new Error(`memory region user address 0x${d.uaddr.toString(16)} overlaps another region`);
      }
    }
    this.regions.push(region);
    this.regions.sort((a, b) => a.gpa - b.gpa);
    for (const l of this.addListeners) l(region);
  }

  /** Calls `listener` for every region added from now on (see addListeners); returns the unsubscribe. */
  onAdd(listener: (region: MemoryRegion) => void): () => void {
    this.addListeners.add(listener);
    return () => this.addListeners.delete(listener);
  }

  /** Removes and unmaps the region matching `desc` exactly (gpa, size, user address). */
  remove(desc: MemoryRegionDesc): boolean {
    const i = this.regions.findIndex((r) => r.desc.gpa === desc.gpa && r.desc.size === desc.size && r.desc.uaddr === desc.uaddr);
    if (i < 0) return false;
    const [r] = this.regions.splice(i, 1);
    r!.unmap();
    this.last = null;
    return true;
  }

  /**
   * The region and offset of guest range [gpa, gpa+len), or null when any byte of it lies outside
   * guest memory. A zero-length range must still start inside a region.
   */
  translate(gpa: number, len: number): GuestRange | null {
    const region = this.regionFor(gpa, len);
    return region === null ? null : { region, offset: gpa - region.desc.gpa };
  }

  /** The region holding all of [gpa, gpa+len), or null (translate without an object per call). */
  regionFor(gpa: number, len: number): MemoryRegion | null {
    const last = this.last;
    if (last !== null && gpa >= last.desc.gpa && gpa + len <= last.desc.gpa + last.desc.size && gpa < last.desc.gpa + last.desc.size) {
      return last;
    }
    for (const r of this.regions) {
      const d = r.desc;
      if (gpa >= d.gpa && gpa < d.gpa + d.size && gpa + len <= d.gpa + d.size) {
        this.last = r;
        return r;
      }
    }
    return null;
  }

  /** Front-end virtual address → guest physical address (ring addresses arrive as VMM VAs). */
  vaToGpa(va: number, len: number): number | null {
    for (const r of this.regions) {
      const d = r.desc;
      if (va >= d.uaddr && va < d.uaddr + d.size && va + len <= d.uaddr + d.size) return d.gpa + (va - d.uaddr);
    }
    return null;
  }

  /** Unmaps everything. */
  clear(): void {
    for (const r of this.regions) r.unmap();
    this.regions = [];
    this.last = null;
  }
}
