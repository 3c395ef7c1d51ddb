// A qcow2 image (QEMU docs/interop/qcow2.txt, versions 2 and 3): guest reads, writes, discards
// and write-zeroes mapped through the L1/L2 tables, clusters allocated and freed through the
// refcounts, copy-on-write from the backing image and from clusters shared with internal
// snapshots, compressed clusters read (deflate, zstd).
//
// Crash consistency comes from the order of writes, with syncs between the steps the host must
// not reorder:
//   1. clusters are reserved a few at a time: their refcounts are written and synced before any
//      of them is handed out (refcounts.ts), so a refcount is always durable before anything
//      points to its cluster; a crash leaks the reserved clusters not yet used, nothing worse;
//   2. a guest write's data is written before the L2 entry that points to it, and every L2 (and
//      L1) entry is written to the file as soon as it changes, so a backend killed at any moment
//      (and reconnected) has lost no acknowledged write;
//   3. a new L2 table is written and synced before the L1 entry that points to it;
//   4. a cluster whose last reference an L2/L1 update dropped is freed only at the next flush,
//      after a sync made that update durable, so it is never reused while the disk may still
//      hold a reference to it.
// flush() is then a sync, followed by those frees. A crash (SIGKILL or power) at any point leaves
// metadata that `qemu-img check` finds consistent (leaked clusters at worst); after a power loss,
// writes the guest did not flush may be lost, as on any disk with a volatile cache.
//
// Metadata and data I/O are synchronous on the calling thread, one request at a time: requests
// to the same cluster are trivially ordered and copy-on-write from the backing image happens once.
import { IovecArray } from "../../../../ffi/io.ts";
import { ImageFile } from "./file.ts";
import { sliceIov, zeroIov, copyToIov, copyFromIov, bufferIov } from "../iov_memory.ts";
import {
  parseHeader, overlaps, Qcow2FormatError, type Qcow2Header,
  INCOMPAT_DIRTY, HDR_INCOMPAT, HDR_AUTOCLEAR,
} from "./header.ts";
import { Refcounts, Qcow2CorruptError } from "./refcounts.ts";
import { LruCache } from "./lru_cache.ts";
import { decompressCluster, compressedExtent } from "./compressed.ts";
import { rebuildRefcounts } from "./repair.ts";

/** What a backing image must offer: reads of its virtual disk. */
export interface ReadableImage {
  /** Virtual size in bytes. */
  readonly size: number;
  /** Reads `len` bytes at `offset` into the iovecs (which it may consume); the caller keeps within `size`. */
  readv(iov: IovecArray, offset: number, len: number): void;
  close(): void;
}

/** A raw file used as a backing image. */
export class RawBackingImage implements ReadableImage {
  readonly size: number;
  constructor(readonly file: ImageFile) {
    this.size = file.length;
  }
  readv(iov: IovecArray, offset: number, len: number): void {
    this.file.readv(iov, offset, len);
  }
  close(): void {
    this.file.close();
  }
}

const COPIED = 0x80000000; // bit 63, in the high word
const COMPRESSED = 0x40000000; // bit 62
const L1_RESERVED_HI = 0x7f000000; // bits 56-62
const L2_RESERVED_HI = 0x3f000000; // bits 56-61
const OFFSET_HI = 0x00ffffff; // bits 32-55
const OFFSET_LO = 0xfffffe00; // bits 9-31

const enum Kind {
  Unallocated,
  /** Reads as zeroes, no host cluster. */
  Zero,
  /** Reads as zeroes, host cluster preallocated. */
  ZeroAllocated,
  Normal,
  Compressed,
}

/** One L2 entry, decoded. */
interface Mapping {
  kind: Kind;
  /** Host offset of a Normal/ZeroAllocated cluster (0 otherwise). */
  host: number;
  /** Refcount exactly 1 (writes may go in place). */
  copied: boolean;
  hi: number;
  lo: number;
}

interface L2Table {
  offset: number;
  data: Uint8Array;
  view: DataView;
}

export interface Qcow2OpenOptions {
  readOnly: boolean;
  /** The opened backing image (null: none), opened by the caller from `header.backingFile`. */
  backing: ReadableImage | null;
}

/** The L2 tables kept in memory: enough to map 8 GiB... with 64 KiB clusters, 32 MiB at most. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

export class Qcow2Image implements ReadableImage {
  readonly size: number;
  readonly readOnly: boolean;
  readonly header: Qcow2Header;
  readonly cs: number;
  private readonly cb: number;
  private readonly l2Entries: number;
  private readonly l1: Uint8Array;
  private readonly l1View: DataView;
  private readonly l2Cache: LruCache<number, L2Table>;
  private refcounts: Refcounts | null = null;
  /** Host clusters whose last in-memory reference is gone; freed after the next metadata flush. */
  private pendingFrees: number[] = [];
  private readonly scratch = new IovecArray(1024);
  private readonly zeroCluster: Uint8Array;
  /** Recently decompressed clusters, by L2 entry. */
  private readonly inflated = new Map<string, Uint8Array>();
  private closed = false;

  /** Opens the qcow2 image in `file` (which it then owns). */
  constructor(readonly file: ImageFile, private readonly backing: ReadableImage | null, readOnly: boolean) {
    const first = new Uint8Array(Math.min(2 * 1024 * 1024, Math.max(file.length, 512)));
    file.readAt(first, 0);
    const h = parseHeader(first, file.length);
    this.header = h;
    this.readOnly = readOnly;
    this.size = h.size;
    this.cs = h.clusterSize;
    this.cb = h.clusterBits;
    this.l2Entries = this.cs / 8;
    this.l2Cache = new LruCache(Math.max(16, Math.floor(L2_CACHE_BYTES / this.cs)));
    this.zeroCluster = new Uint8Array(this.cs);
    this.l1 = new Uint8Array(h.l1Size * 8);
    file.readAt(this.l1, h.l1TableOffset);
    this.l1View = new DataView(this.l1.buffer);
    if (readOnly) return;
    if (h.incompatible & INCOMPAT_DIRTY) {
      // Lazy refcounts left them stale (or a crash did): rebuild them from the L1/L2 tables.
      rebuildRefcounts(file, h, this.l1);
      this.writeHeaderU64(HDR_INCOMPAT, h.incompatible & ~INCOMPAT_DIRTY);
      h.incompatible &= ~INCOMPAT_DIRTY;
    }
    if (h.autoclear !== 0n) {
      // We maintain none of the auto-clear features (bitmaps): clear them before writing, as the spec asks.
      this.writeHeaderU64(HDR_AUTOCLEAR, 0n);
      h.autoclear = 0n;
    }
    this.refcounts = new Refcounts(file, this.cs, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters, (o, w) => this.checkMetadata(o, w));
  }

  private writeHeaderU64(offset: number, value: bigint): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, value);
    this.file.writeAt(b, offset);
    this.file.sync();
  }

  // ---- metadata ----

  /** Throws unless a metadata cluster may live at `offset`. */
  private checkMetadata(offset: number, what: string): void {
    const h = this.header;
    if (offset % this.cs !== 0 || offset === 0 || offset + this.cs > Math.ceil(this.file.length / this.cs) * this.cs) {
      throw new Qcow2CorruptError(`${what} at ${offset} lies outside the image or overlaps its header`);
    }
    if (overlaps(offset, this.cs, h.l1TableOffset, h.l1Size * 8)) throw new Qcow2CorruptError(`${what} at ${offset} overlaps the L1 table`);
    const rt = this.refcounts;
    const rtOff = rt?.tableOffset ?? h.refcountTableOffset;
    const rtLen = (rt?.tableClusters ?? h.refcountTableClusters) * this.cs;
    if (overlaps(offset, this.cs, rtOff, rtLen)) throw new Qcow2CorruptError(`${what} at ${offset} overlaps the refcount table`);
    if (what === "refcount block" && this.l2Cache.has(offset)) throw new Qcow2CorruptError(`refcount block at ${offset} is also an L2 table`);
  }

  /** Throws unless guest data may be read or written at host cluster `host`. */
  private checkData(host: number): void {
    this.checkMetadata(host, "data cluster");
    if (this.l2Cache.has(host) || this.refcounts?.isCachedBlock(host)) {
      throw new Qcow2CorruptError(`data cluster at ${host} is also a metadata cluster`);
    }
  }

  private l1Entry(i: number): { offset: number; copied: boolean } {
    const hi = this.l1View.getUint32(i * 8);
    const lo = this.l1View.getUint32(i * 8 + 4);
    if ((hi & L1_RESERVED_HI) !== 0 || (lo & 0x1ff) !== 0) throw new Qcow2CorruptError(`L1 entry ${i} has reserved bits set`);
    return { offset: (hi & OFFSET_HI) * 0x1_0000_0000 + lo, copied: (hi & COPIED) !== 0 };
  }

  private setL1(i: number, offset: number): void {
    this.l1View.setUint32(i * 8, (COPIED | Math.floor(offset / 0x1_0000_0000)) >>> 0);
    this.l1View.setUint32(i * 8 + 4, offset >>> 0);
    this.file.writeAt(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8);
  }

  private loadL2(offset: number): L2Table {
    const cached = this.l2Cache.get(offset);
    if (cached !== undefined) return cached;
    this.checkMetadata(offset, "L2 table");
    if (this.refcounts?.isCachedBlock(offset)) throw new Qcow2CorruptError(`L2 table at ${offset} is also a refcount block`);
    const data = new Uint8Array(this.cs);
    this.file.readAt(data, offset);
    const t = { offset, data, view: new DataView(data.buffer) };
    this.l2Cache.admit(offset, t);
    return t;
  }

  /** The L2 table for L1 index `i`, or null if there is none (reads). */
  private l2ForRead(i: number): L2Table | null {
    const e = this.l1Entry(i);
    return e.offset === 0 ? null : this.loadL2(e.offset);
  }

  /** The L2 table for L1 index `i`, made writable: allocated if missing, copied if shared. */
  private l2ForWrite(i: number): L2Table {
    const e = this.l1Entry(i);
    if (e.offset !== 0 && e.copied) return this.loadL2(e.offset);
    const rc = this.refcounts!;
    const offset = rc.allocate();
    const data = new Uint8Array(this.cs);
    if (e.offset !== 0) data.set(this.loadL2(e.offset).data);
    const t: L2Table = { offset, data, view: new DataView(data.buffer) };
    this.file.writeAt(data, offset);
    this.file.sync(); // the table is durable before the L1 entry that points to it
    this.l2Cache.admit(offset, t);
    this.setL1(i, offset);
    if (e.offset !== 0) this.pendingFrees.push(e.offset / this.cs);
    return t;
  }

  private decode(t: L2Table | null, j: number): Mapping {
    if (t === null) return { kind: Kind.Unallocated, host: 0, copied: false, hi: 0, lo: 0 };
    const hi = t.view.getUint32(j * 8);
    const lo = t.view.getUint32(j * 8 + 4);
    if (hi & COMPRESSED) return { kind: Kind.Compressed, host: 0, copied: false, hi, lo };
    if ((hi & L2_RESERVED_HI) !== 0 || (lo & 0x1fe) !== 0) throw new Qcow2CorruptError(`L2 entry ${j} of the table at ${t.offset} has reserved bits set`);
    const host = (hi & OFFSET_HI) * 0x1_0000_0000 + (lo & OFFSET_LO);
    const copied = (hi & COPIED) !== 0;
    if (lo & 1) {
      if (this.header.version < 3) throw new Qcow2CorruptError(`zero flag in a version 2 image (L2 table at ${t.offset})`);
      return { kind: host === 0 ? Kind.Zero : Kind.ZeroAllocated, host, copied, hi, lo };
    }
    if (host === 0) return { kind: Kind.Unallocated, host: 0, copied: false, hi, lo };
    if (host % this.cs !== 0) throw new Qcow2CorruptError(`data cluster at ${host} is not cluster-aligned`);
    return { kind: Kind.Normal, host, copied, hi, lo };
  }

  private setL2(t: L2Table, j: number, hi: number, lo: number): void {
    t.view.setUint32(j * 8, hi >>> 0);
    t.view.setUint32(j * 8 + 4, lo >>> 0);
    this.file.writeAt(t.data.subarray(j * 8, j * 8 + 8), t.offset + j * 8);
  }

  private setL2Host(t: L2Table, j: number, host: number, zero = false): void {
    this.setL2(t, j, COPIED | Math.floor(host / 0x1_0000_0000), (host >>> 0) | (zero ? 1 : 0));
  }

  private mapping(g: number): { t: L2Table | null; j: number; m: Mapping } {
    const c = Math.floor(g / this.cs);
    const t = this.l2ForRead(Math.floor(c / this.l2Entries));
    const j = c % this.l2Entries;
    return { t, j, m: this.decode(t, j) };
  }

  /** Where a compressed entry's bytes are. */
  private compressedExtent(m: Mapping): { offset: number; size: number } {
    const ext = compressedExtent(m.hi, m.lo, this.cb);
    if (ext.offset < this.cs || ext.offset >= this.file.length) {
      throw new Qcow2CorruptError(`compressed cluster at ${ext.offset} (${ext.size} bytes) lies outside the image`);
    }
    return ext;
  }

  private inflate(m: Mapping): Uint8Array {
    const key = `${m.hi}:${m.lo}`;
    const hit = this.inflated.get(key);
    if (hit !== undefined) return hit;
    const { offset, size } = this.compressedExtent(m);
    const input = new Uint8Array(size);
    this.file.readAt(input, offset);
    const out = decompressCluster(input, this.cs, this.header.compressionType);
    if (this.inflated.size >= 8) this.inflated.delete(this.inflated.keys().next().value!);
    this.inflated.set(key, out);
    return out;
  }

  // ---- reads ----

  /** Reads [offset, offset + len) of the virtual disk into the iovecs. */
  readv(iov: IovecArray, offset: number, len: number): void {
    this.checkRange(offset, len);
    let pos = 0;
    while (pos < len) {
      const g = offset + pos;
      const inCl = g % this.cs;
      let n = Math.min(this.cs - inCl, len - pos);
      const { m } = this.mapping(g);
      if (m.kind === Kind.Normal) {
        n = this.extendRun(m, g, n, len - pos, false);
        this.file.readv(this.part(iov, pos, n, len), m.host + inCl, n);
      } else {
        this.readUnmapped(m, iov, pos, g, n, len);
      }
      pos += n;
    }
  }

  /**
   * The guest range at `g` whose first `n` bytes (to the end of g's cluster) map to the plain host
   * cluster `m`, extended over the following clusters while they are plain, contiguous on the host
   * and (`inPlace`: for writes) not shared, up to `left` bytes: one host I/O for the whole run.
   */
  private extendRun(m: Mapping, g: number, n: number, left: number, inPlace: boolean): number {
    this.checkData(m.host);
    const host = m.host + (g % this.cs);
    while (n < left) {
      const next = this.mapping(g + n).m;
      if (next.kind !== Kind.Normal || (inPlace && !next.copied) || next.host !== host + n) break;
      this.checkData(next.host);
      n += Math.min(this.cs, left - n);
    }
    return n;
  }

  /** `iov` itself when the part is all of it (no copy of the iovec array), else a slice. */
  private part(iov: IovecArray, pos: number, n: number, len: number): IovecArray {
    if (pos === 0 && n === len) return iov;
    if (!sliceIov(iov, pos, n, this.scratch)) throw new Error("too many segments in one request");
    return this.scratch;
  }

  /** Reads a cluster part that is not a plain host cluster: zeroes, backing data, compressed data. */
  private readUnmapped(m: Mapping, iov: IovecArray, pos: number, g: number, n: number, len: number): void {
    switch (m.kind) {
      case Kind.Zero:
      case Kind.ZeroAllocated:
        zeroIov(iov, pos, n);
        return;
      case Kind.Compressed:
        copyToIov(iov, pos, this.inflate(m).subarray(g % this.cs, (g % this.cs) + n));
        return;
      default:
        this.readBacking(iov, pos, g, n, len);
    }
  }

  private readBacking(iov: IovecArray, pos: number, g: number, n: number, len: number): void {
    const b = this.backing;
    const inBacking = b === null ? 0 : Math.max(0, Math.min(n, b.size - g));
    if (inBacking > 0) b!.readv(this.part(iov, pos, inBacking, len), g, inBacking);
    if (inBacking < n) zeroIov(iov, pos + inBacking, n - inBacking);
  }

  private checkRange(offset: number, len: number): void {
    if (this.closed) throw new Error("image is closed");
    if (!Number.isInteger(offset) || !Number.isInteger(len) || offset < 0 || len < 0 || offset + len > this.size) {
      throw new RangeError(`request [${offset}, +${len}) is outside the ${this.size}-byte disk`);
    }
  }

  // ---- writes ----

  /** Writes `len` bytes from the iovecs at `offset` of the virtual disk. */
  writev(iov: IovecArray, offset: number, len: number): void {
    this.checkWritable();
    this.checkRange(offset, len);
    let pos = 0;
    while (pos < len) {
      const g = offset + pos;
      const inCl = g % this.cs;
      let n = Math.min(this.cs - inCl, len - pos);
      const { m } = this.mapping(g);
      if (m.kind === Kind.Normal && m.copied) {
        n = this.extendRun(m, g, n, len - pos, true);
        this.file.writev(this.part(iov, pos, n, len), m.host + inCl, n);
      } else {
        this.writeCluster(g - inCl, inCl, n, iov, pos, len);
      }
      pos += n;
    }
  }

  /**
   * Writes [inCl, inCl + n) of guest cluster `gc` where the cluster cannot be written in place:
   * a new host cluster gets the old contents around the new data (backing, compressed, shared or
   * zeroes), then the L2 entry points to it. A preallocated zero cluster we own is filled in place.
   */
  private writeCluster(gc: number, inCl: number, n: number, iov: IovecArray, pos: number, len: number): void {
    const c = gc / this.cs;
    const t = this.l2ForWrite(Math.floor(c / this.l2Entries));
    const j = c % this.l2Entries;
    const old = this.decode(t, j);
    const inPlace = old.kind === Kind.ZeroAllocated && old.copied;
    if (inPlace) this.checkData(old.host);
    const host = inPlace ? old.host : this.refcounts!.allocate();
    try {
      // A cluster past the end of the file reads as zeroes already: when the old contents are zeroes
      // too, only the new data needs writing (no zero-filled copy of the rest of the cluster).
      const fresh = !inPlace && host >= this.file.length;
      if (n === this.cs) {
        this.file.writev(this.part(iov, pos, n, len), host, n);
      } else if (fresh && this.readsAsZeroes(old, gc)) {
        this.file.writev(this.part(iov, pos, n, len), host + inCl, n);
      } else {
        const buf = new Uint8Array(this.cs);
        if (!inPlace) this.readOld(old, gc, buf);
        copyFromIov(iov, pos, buf.subarray(inCl, inCl + n));
        this.file.writeAt(buf, host);
      }
    } catch (e) {
      // Nothing points to the new cluster yet: it can be given back at once.
      if (!inPlace) this.refcounts!.decrement(host / this.cs);
      throw e;
    }
    this.setL2Host(t, j, host);
    if (!inPlace) this.dropReference(old);
  }

  private readsAsZeroes(m: Mapping, gc: number): boolean {
    if (m.kind === Kind.Zero || m.kind === Kind.ZeroAllocated) return true;
    return m.kind === Kind.Unallocated && (this.backing === null || gc >= this.backing.size);
  }

  /** The current contents of guest cluster `gc` (whose entry is `m`), for copy-on-write. */
  private readOld(m: Mapping, gc: number, buf: Uint8Array): void {
    switch (m.kind) {
      case Kind.Normal:
        this.checkData(m.host);
        this.file.readAt(buf, m.host);
        return;
      case Kind.Compressed:
        buf.set(this.inflate(m));
        return;
      case Kind.Unallocated: {
        const cluster = Math.min(this.cs, this.size - gc);
        this.readBacking(bufferIov(buf), 0, gc, cluster, this.cs);
        return;
      }
      default:
        return; // zeroes
    }
  }

  /** The host clusters entry `m` referenced are freed once the tables no longer pointing at them are durable. */
  private dropReference(m: Mapping): void {
    if (m.kind === Kind.Normal || m.kind === Kind.ZeroAllocated) {
      this.pendingFrees.push(m.host / this.cs);
    } else if (m.kind === Kind.Compressed) {
      const { offset, size } = this.compressedExtent(m);
      for (let c = Math.floor(offset / this.cs); c <= Math.floor((offset + size - 1) / this.cs); c++) this.pendingFrees.push(c);
      this.inflated.delete(`${m.hi}:${m.lo}`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly || this.refcounts === null) throw new Error("write to a read-only image");
  }

  // ---- discard and write zeroes ----

  /**
   * Deallocates the whole clusters in the range (advisory: partial clusters are left alone). Over a
   * backing image (v3) they become zero clusters, so the backing data does not show through.
   */
  discard(offset: number, len: number): void {
    this.checkWritable();
    this.checkRange(offset, len);
    const first = Math.ceil(offset / this.cs);
    const end = Math.floor((offset + len) / this.cs);
    for (let c = first; c < end; c++) {
      const { m } = this.mapping(c * this.cs);
      if (this.backing === null) {
        if (m.kind !== Kind.Unallocated) this.setEntry(c, 0, 0);
      } else if (this.header.version >= 3) {
        if (m.kind !== Kind.Zero) this.setEntry(c, 0, 1);
      } // v2 over a backing file cannot express "zero": leave it
    }
  }

  /** Makes the range read as zeroes; with `unmap` the host clusters may be freed. */
  writeZeroes(offset: number, len: number, unmap: boolean): void {
    this.checkWritable();
    this.checkRange(offset, len);
    const end = offset + len;
    for (let g = offset; g < end; ) {
      const n = Math.min(this.cs - (g % this.cs), end - g); // to the end of g's cluster
      const c = Math.floor(g / this.cs);
      const { m } = this.mapping(g);
      const readsZero = m.kind === Kind.Zero || m.kind === Kind.ZeroAllocated || (m.kind === Kind.Unallocated && this.backing === null);
      if (readsZero) {
        // nothing to do
      } else if (n === this.cs && this.header.version >= 3) {
        // Without unmap a cluster we own stays allocated (preallocated zeroes).
        if (!unmap && m.kind === Kind.Normal && m.copied) this.setEntry(c, m.hi, m.lo | 1, false);
        else this.setEntry(c, 0, 1);
      } else if (n === this.cs && unmap && this.backing === null) {
        this.setEntry(c, 0, 0);
      } else {
        const zeroes = bufferIov(this.zeroCluster.subarray(0, n));
        this.writev(zeroes, g, n);
      }
      g += n;
    }
  }

  /** Whether writeZeroes() on this range only changes metadata (no zero buffers written). */
  zeroesAreFast(offset: number, len: number): boolean {
    return this.header.version >= 3 && offset % this.cs === 0 && len % this.cs === 0;
  }

  /** Replaces guest cluster `c`'s entry by (hi, lo), dropping the reference the old entry held unless `drop` is false. */
  private setEntry(c: number, hi: number, lo: number, drop = true): void {
    const t = this.l2ForWrite(Math.floor(c / this.l2Entries));
    const j = c % this.l2Entries;
    const cur = this.decode(t, j);
    this.setL2(t, j, hi, lo);
    if (drop) this.dropReference(cur);
  }

  // ---- flush and close ----

  /** Makes every completed write durable, metadata included, then frees what updates released. */
  /**
   * `freeClusters` false: while guest I/O submitted earlier may still be in flight (asynchronous
   * queues), a cluster it targets must not be freed and reused; the frees then wait for a later
   * flush with nothing in flight (or for close).
   */
  flush(freeClusters = true): void {
    if (this.readOnly) return;
    if (freeClusters) this.flushMetadata();
    else this.file.sync();
  }

  /**
   * Where [offset, offset + len) of the virtual disk lies as one contiguous run of host clusters
   * holding data (writable in place for `forWrite`): its host offset, or -1 if it does not (then
   * readv()/writev() do it, with whatever mapping work it needs).
   */
  hostRun(offset: number, len: number, forWrite: boolean): number {
    this.checkRange(offset, len);
    if (forWrite) this.checkWritable();
    if (len === 0) return -1;
    const { m } = this.mapping(offset);
    if (m.kind !== Kind.Normal || (forWrite && !m.copied)) return -1;
    const first = Math.min(this.cs - (offset % this.cs), len);
    return this.extendRun(m, offset, first, len, forWrite) === len ? m.host + (offset % this.cs) : -1;
  }

  private flushMetadata(): void {
    // Every table update is in the file already: one sync makes them durable, then the clusters
    // they stopped referencing can be freed.
    this.file.sync();
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    let failed: Error | null = null;
    for (const c of frees) {
      try {
        if (this.refcounts!.decrement(c) === 0) this.file.punchHole(c * this.cs, this.cs);
      } catch (e) {
        // A refcount already 0 (a cluster referenced twice in a corrupt image): leave it, free the rest.
        failed ??= e as Error;
      }
    }
    if (failed !== null) throw failed;
  }

  close(): void {
    if (this.closed) return;
    try {
      if (!this.readOnly) {
        this.flushMetadata();
        this.refcounts!.releaseReserved();
        this.file.sync();
      }
    } finally {
      this.closed = true;
      this.file.close();
      this.backing?.close();
    }
  }
}

export { Qcow2FormatError, Qcow2CorruptError };
