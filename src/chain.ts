// A popped descriptor chain and the cursors devices use to move its bytes (crosvm's Reader and
// Writer over a chain). Every segment was checked against the memory table when the chain was
// walked, so a device reads and writes guest memory only through these, never by address math of
// its own. Bytes move either by copy (read/write into host buffers) or, with no copy, as iovecs
// that point straight into guest memory for readv/writev/preadv/pwritev.
import type { IovecArray } from "../ffi/io.ts";
import type { GuestMemory, MemoryRegion, Window } from "./memory.ts";

/** One checked guest buffer of a chain. */
export interface Segment {
  /** Host address of the first byte (for preadv/pwritev/readv/writev). */
  addr: number;
  len: number;
  region: MemoryRegion;
  /** Offset of the buffer inside its region. */
  offset: number;
}

/** A popped request: device-readable buffers first, then device-writable ones (spec order). */
export class DescriptorChain {
  readonly readable: Segment[] = [];
  readonly writable: Segment[] = [];
  readableLen = 0;
  writableLen = 0;
  /** Segment objects of this chain's earlier uses, refilled by appendBuffer (see reuse()). */
  readonly spare: Segment[] = [];
  /** The head descriptor (split ring) or buffer id (packed ring): what completes it. */
  constructor(readonly head: number) {}

  /**
   * Empties the chain for its head's next pop, keeping its objects: a ring that hands out one
   * chain object per head (a head is never popped again while in flight) allocates nothing per
   * request once warm, and its runtime heap is not freed and faulted in again at that rate.
   * Whoever held the chain must be done with it: it was completed.
   */
  reuse(): void {
    const spare = this.spare;
    for (let i = 0; i < this.readable.length; i++) spare.push(this.readable[i]!);
    for (let i = 0; i < this.writable.length; i++) spare.push(this.writable[i]!);
    this.readable.length = 0;
    this.writable.length = 0;
    this.readableLen = 0;
    this.writableLen = 0;
  }
}

/** A descriptor chain the guest built wrongly: the chain is refused, the ring goes on. */
export class ChainError extends Error {}

/**
 * Checks one descriptor's buffer against the memory table and adds it to `chain` (readable ones
 * must all come before writable ones, as the spec orders them).
 */
export function appendBuffer(chain: DescriptorChain, mem: GuestMemory, gpa: number, len: number, writable: boolean): void {
  if (!writable && chain.writable.length > 0) throw new ChainError("device-readable descriptor after a device-writable one");
  const region = mem.regionFor(gpa, len);
  if (region === null) throw new ChainError(`buffer 0x${gpa.toString(16)}+${len} outside guest memory`);
  const offset = gpa - region.desc.gpa;
  let seg = chain.spare.pop();
  if (seg === undefined) seg = { addr: region.host + offset, len, region, offset };
  else {
    seg.addr = region.host + offset;
    seg.len = len;
    seg.region = region;
    seg.offset = offset;
  }
  if (writable) {
    chain.writable.push(seg);
    chain.writableLen += len;
  } else {
    chain.readable.push(seg);
    chain.readableLen += len;
  }
}

/** The most bytes one typed-array view of a region covers safely (see MemoryRegion.window). */
const COPY_PIECE = 2 ** 30;

/**
 * Copies between `host` and the guest bytes [pos, pos+host.length) of `segs` (pos counted from
 * the first segment); returns the bytes copied. A buffer larger than one view of its region is
 * copied in pieces.
 */
function copyAt(segs: readonly Segment[], pos: number, host: Uint8Array, toGuest: boolean): number {
  let copied = 0;
  let skip = pos;
  for (const seg of segs) {
    if (copied >= host.length) break;
    if (skip >= seg.len) {
      skip -= seg.len;
      continue;
    }
    let off = skip;
    skip = 0;
    while (off < seg.len && copied < host.length) {
      const n = Math.min(seg.len - off, host.length - copied, COPY_PIECE);
      const at = seg.offset + off;
      const win = seg.region.window(at, n);
      if (win === null) return copied; // not for n <= COPY_PIECE: windows overlap by 1 GiB
      const start = at - win.start;
      if (toGuest) win.u8.set(host.subarray(copied, copied + n), start);
      else host.set(win.u8.subarray(start, start + n), copied);
      copied += n;
      off += n;
    }
  }
  return copied;
}

/** Appends iovecs for [pos, pos+len) of `segs` (zero-length pieces dropped); false if `iov` is full. */
function iovecsAt(segs: readonly Segment[], pos: number, len: number, iov: IovecArray): boolean {
  let remaining = len;
  let skip = pos;
  for (let i = 0; i < segs.length && remaining > 0; i++) {
    const seg = segs[i]!;
    if (skip >= seg.len) {
      skip -= seg.len;
      continue;
    }
    const n = Math.min(seg.len - skip, remaining);
    if (!iov.push(seg.addr + skip, n)) return false;
    remaining -= n;
    skip = 0;
  }
  return remaining === 0;
}

/** A cursor over one side of a chain; reusable for the next chain with reset(). */
abstract class ChainCursor {
  /** Bytes consumed so far. */
  pos = 0;
  /** Bytes of this side the cursor may use (the end, less what was carved off). */
  protected end = 0;
  protected segs: readonly Segment[] = [];
  chain!: DescriptorChain;

  /** `writable`: the side this cursor moves over (the device-writable buffers, or the readable ones). */
  constructor(private readonly writable: boolean, chain?: DescriptorChain) {
    if (chain !== undefined) this.reset(chain);
  }

  /** Starts over on this cursor's side of `chain` (a device's hot path reuses one cursor). */
  reset(chain: DescriptorChain): this {
    if (this.writable) this.point(chain, chain.writable, chain.writableLen);
    else this.point(chain, chain.readable, chain.readableLen);
    return this;
  }

  /** Starts over on one side (`segs`, `end` bytes) of `chain`. */
  protected point(chain: DescriptorChain, segs: readonly Segment[], end: number): void {
    this.chain = chain;
    this.segs = segs;
    this.end = end;
    this.pos = 0;
  }

  /** Copies between `host` and the next bytes (as many as both have) and moves past them; returns how many. */
  protected copyNext(host: Uint8Array, toGuest: boolean): number {
    const n = copyAt(this.segs, this.pos, host.subarray(0, Math.min(host.length, this.remaining)), toGuest);
    this.pos += n;
    return n;
  }

  get remaining(): number {
    return this.end - this.pos;
  }

  /**
   * The byte `ahead` bytes past the cursor (which does not move), or -1 past the end. Read in
   * place: a device's per-request peek at a header field allocates no buffer.
   */
  peekByte(ahead: number): number {
    if (ahead < 0 || ahead >= this.remaining || !this.locate(this.pos + ahead)) return -1;
    return this.byteWin!.u8[this.byteAt]!;
  }

  /** Where locate() found its byte: the region window and the index in it. */
  protected byteWin: Window | null = null;
  protected byteAt = 0;

  /** Finds the byte `pos` bytes into this side (byteWin, byteAt); false past the segments. */
  protected locate(pos: number): boolean {
    let skip = pos;
    for (const seg of this.segs) {
      if (skip >= seg.len) {
        skip -= seg.len;
        continue;
      }
      const at = seg.offset + skip;
      this.byteWin = seg.region.window(at, 1)!;
      this.byteAt = at - this.byteWin.start;
      return true;
    }
    return false;
  }

  /** Skips up to `n` bytes; returns how many were skipped. */
  skip(n: number): number {
    const k = Math.max(0, Math.min(n, this.remaining));
    this.pos += k;
    return k;
  }

  /**
   * Appends iovecs for the next `len` bytes to `iov` (not cleared first) and moves past them.
   * False, with the cursor unmoved, when fewer than `len` bytes remain or `iov` is too small.
   */
  iovecs(iov: IovecArray, len: number): boolean {
    if (len > this.remaining) return false;
    const before = iov.count;
    if (!iovecsAt(this.segs, this.pos, len, iov)) {
      iov.truncate(before);
      return false;
    }
    this.pos += len;
    return true;
  }
}

/** Reads a chain's device-readable bytes in order. */
export class ChainReader extends ChainCursor {
  constructor(chain?: DescriptorChain) {
    super(false, chain);
  }

  /** Copies up to dst.length bytes; returns how many. */
  read(dst: Uint8Array): number {
    return this.copyNext(dst, false);
  }
}

/** Writes a chain's device-writable bytes in order; `written` is the used length to report. */
export class ChainWriter extends ChainCursor {
  constructor(chain?: DescriptorChain) {
    super(true, chain);
  }

  /** Bytes written (or skipped over) so far: what the used element reports. */
  get written(): number {
    return this.pos;
  }

  /** Copies as much of `src` as fits; returns how many bytes. */
  write(src: Uint8Array): number {
    return this.copyNext(src, true);
  }

  /**
   * Splits this writer `offset` bytes past its position (crosvm's `Writer::split_at`): this one
   * ends there, `tail` (reset onto the same chain) covers the rest — a status byte or trailer the
   * data must not run into. False, with nothing changed, when fewer than `offset` bytes remain.
   */
  splitAt(offset: number, tail: ChainWriter): boolean {
    if (offset < 0 || offset > this.remaining) return false;
    const at = this.pos + offset;
    tail.point(this.chain, this.segs, this.end);
    tail.pos = at;
    this.end = at;
    return true;
  }

  /** Writes one byte at the cursor, in place (no copy through a buffer); returns 1, or 0 when full. */
  writeByte(value: number): number {
    if (this.remaining < 1 || !this.locate(this.pos)) return 0;
    this.byteWin!.u8[this.byteAt] = value;
    this.pos++;
    return 1;
  }

  /** Copies out bytes already written at [pos, pos+dst.length) of the writable side (a header the
   * host wrote straight into guest memory, to inspect it); the cursor does not move. */
  readAt(pos: number, dst: Uint8Array): number {
    return copyAt(this.segs, pos, dst.subarray(0, Math.max(0, Math.min(dst.length, this.end - pos))), false);
  }

  /** Overwrites bytes at [pos, pos+src.length) of the writable side; the cursor does not move. */
  writeAt(pos: number, src: Uint8Array): number {
    return copyAt(this.segs, pos, src.subarray(0, Math.max(0, Math.min(src.length, this.end - pos))), true);
  }
}
