// Host cluster reference counts (qcow2.txt "Host cluster management"): a refcount table pointing
// to refcount blocks of 1-64-bit entries. Writes are write-through (the 8-byte word holding the
// changed entry), so what the file holds is always at least what our in-memory view says; the
// caller orders them against the L2 updates that depend on them (see qcow2.ts, flush()).
//
// Allocation scans for a free cluster from a hint. A missing refcount block is created in the
// first free cluster of the range it covers (so it describes itself); a full refcount table is
// replaced by a larger one placed past the end of the file together with the blocks that cover it.
import type { ImageFile } from "./file.ts";
import { HDR_REFTABLE_OFFSET, MAX_REFTABLE_BYTES } from "./header.ts";
import { LruCache } from "./lru_cache.ts";

export class Qcow2CorruptError extends Error {}

export interface RefBlock {
  data: Uint8Array;
  view: DataView;
}

export function refcountEntry(b: RefBlock, bits: number, i: number): number {
  switch (bits) {
    case 8:
      return b.data[i]!;
    case 16:
      return b.view.getUint16(i * 2);
    case 32:
      return b.view.getUint32(i * 4);
    case 64: {
      const hi = b.view.getUint32(i * 8);
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 + b.view.getUint32(i * 8 + 4);
    }
    default: {
      const bit = i * bits;
      return (b.data[bit >> 3]! >> (bit & 7)) & ((1 << bits) - 1);
    }
  }
}

export function setRefcountEntry(b: RefBlock, bits: number, i: number, v: number): void {
  switch (bits) {
    case 8:
      b.data[i] = v;
      break;
    case 16:
      b.view.setUint16(i * 2, v);
      break;
    case 32:
      b.view.setUint32(i * 4, v);
      break;
    case 64:
      b.view.setUint32(i * 8, Math.floor(v / 0x1_0000_0000));
      b.view.setUint32(i * 8 + 4, v >>> 0);
      break;
    default: {
      const bit = i * bits;
      const mask = ((1 << bits) - 1) << (bit & 7);
      b.data[bit >> 3] = (b.data[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
    }
  }
}



/** Refcount blocks kept in memory (they are write-through, so any may be dropped). */
const BLOCK_CACHE = 256;

export class Refcounts {
  readonly bits: number;
  /** Entries per refcount block. */
  readonly perBlock: number;
  readonly maxValue: number;
  private table: Uint8Array;
  private tableView: DataView;
  tableOffset: number;
  tableClusters: number;
  private readonly blocks = new LruCache<number, RefBlock>(BLOCK_CACHE);
  /** No cluster below this index is free. */
  private hint = 0;
  /** Clusters reserved by allocate(), handed out from `reservedAt` on. */
  private reserved: number[] = [];
  private reservedAt = 0;

  /**
   * `checkMetadata(offset, what)` throws when `offset` cannot hold a metadata cluster (overlaps the
   * header, the L1 table... or lies past the end of the file).
   */
  constructor(
    private readonly file: ImageFile,
    private readonly cs: number,
    order: number,
    tableOffset: number,
    tableClusters: number,
    private readonly checkMetadata: (offset: number, what: string) => void,
  ) {
    this.bits = 1 << order;
    this.perBlock = (cs * 8) / this.bits;
    this.maxValue = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.table = new Uint8Array(tableClusters * cs);
    file.readAt(this.table, tableOffset);
    this.tableView = new DataView(this.table.buffer);
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Offset of refcount block `i` (0: none), checked. */
  blockOffset(i: number): number {
    const hi = this.tableView.getUint32(i * 8);
    const lo = this.tableView.getUint32(i * 8 + 4);
    if ((lo & 0x1ff) !== 0 || hi >= 0x200000) throw new Qcow2CorruptError(`refcount table entry ${i} is malformed`);
    const off = hi * 0x1_0000_0000 + lo;
    if (off !== 0 && off % this.cs !== 0) throw new Qcow2CorruptError(`refcount block ${i} at ${off} is not cluster-aligned`);
    return off;
  }

  private block(off: number): RefBlock {
    const cached = this.blocks.get(off);
    if (cached !== undefined) return cached;
    this.checkMetadata(off, "refcount block");
    const data = new Uint8Array(this.cs);
    this.file.readAt(data, off);
    const b = { data, view: new DataView(data.buffer) };
    this.blocks.admit(off, b);
    return b;
  }

  /** Whether `off` is a refcount block we know of (for overlap checks). */
  isCachedBlock(off: number): boolean {
    return this.blocks.has(off);
  }

  isTable(off: number): boolean {
    return off >= this.tableOffset && off < this.tableOffset + this.tableClusters * this.cs;
  }

  /** The refcount of host cluster `idx`. */
  get(idx: number): number {
    const ti = Math.floor(idx / this.perBlock);
    if (ti >= this.tableEntries) return 0;
    const off = this.blockOffset(ti);
    if (off === 0) return 0;
    return refcountEntry(this.block(off), this.bits, idx % this.perBlock);
  }

  /** Sets cluster `idx`'s refcount in an existing block and writes the word that holds it. */
  private set(idx: number, v: number): void {
    const ti = Math.floor(idx / this.perBlock);
    const off = ti < this.tableEntries ? this.blockOffset(ti) : 0;
    if (off === 0) throw new Qcow2CorruptError(`no refcount block for cluster ${idx}`);
    const b = this.block(off);
    const i = idx % this.perBlock;
    setRefcountEntry(b, this.bits, i, v);
    const word = Math.floor((i * this.bits) / 64) * 8;
    this.file.writeAt(b.data.subarray(word, word + 8), off + word);
  }

  /** Drops one reference to host cluster `idx`; returns the new count. */
  decrement(idx: number): number {
    const v = this.get(idx);
    if (v === 0) throw new Qcow2CorruptError(`freeing cluster ${idx}, whose refcount is already 0`);
    this.set(idx, v - 1);
    if (v - 1 === 0 && idx < this.hint) this.hint = idx;
    return v - 1;
  }

  /**
   * A free host cluster, refcount 1 and durable: taken from the clusters reserved (refcounts
   * written, then one sync for the lot) ahead of use. Returns its offset.
   */
  allocate(): number {
    if (this.reservedAt >= this.reserved.length) {
      this.reserved = [];
      this.reservedAt = 0;
      const n = Math.max(2, Math.min(64, Math.floor((4 << 20) / this.cs)));
      for (let k = 0; k < n; k++) this.reserved.push(this.allocateOne());
      this.file.sync();
    }
    return this.reserved[this.reservedAt++]!;
  }

  /** Gives back the reserved clusters not handed out (they were never referenced). */
  releaseReserved(): void {
    for (; this.reservedAt < this.reserved.length; this.reservedAt++) {
      const off = this.reserved[this.reservedAt]!;
      if (this.decrement(off / this.cs) === 0) this.file.punchHole(off, this.cs);
    }
  }

  /** Finds a free host cluster, sets its refcount to 1 (written, not synced) and returns its offset. */
  private allocateOne(): number {
    for (let idx = this.hint; ; ) {
      const ti = Math.floor(idx / this.perBlock);
      if (ti >= this.tableEntries) {
        this.growTable(idx);
        continue;
      }
      const off = this.blockOffset(ti);
      if (off === 0) {
        this.createBlock(ti, idx);
        idx++;
        continue;
      }
      const b = this.block(off);
      const end = (ti + 1) * this.perBlock;
      for (; idx < end; idx++) {
        if (refcountEntry(b, this.bits, idx % this.perBlock) === 0) {
          this.set(idx, 1);
          this.hint = idx + 1;
          return idx * this.cs;
        }
      }
    }
  }

  /** A new refcount block for table entry `ti`, placed in cluster `idx` of the range it covers. */
  private createBlock(ti: number, idx: number): void {
    const off = idx * this.cs;
    const data = new Uint8Array(this.cs);
    const b = { data, view: new DataView(data.buffer) };
    setRefcountEntry(b, this.bits, idx % this.perBlock, 1);
    this.file.writeAt(data, off);
    // The block must be on disk before the table points to it.
    this.file.sync();
    this.setTableEntry(ti, off);
    this.blocks.set(off, b);
  }

  private setTableEntry(ti: number, off: number): void {
    this.tableView.setUint32(ti * 8, Math.floor(off / 0x1_0000_0000));
    this.tableView.setUint32(ti * 8 + 4, off >>> 0);
    this.file.writeAt(this.table.subarray(ti * 8, ti * 8 + 8), this.tableOffset + ti * 8);
  }

  /**
   * Replaces the refcount table with one covering at least cluster `needIdx` (and twice the old
   * coverage). The new table and the blocks describing it go past everything in use; they are
   * written and synced before the header points to them, and the old table is freed after.
   */
  private growTable(needIdx: number): void {
    const cs = this.cs;
    const E = this.perBlock;
    const oldEntries = this.tableEntries;
    const a = Math.max(Math.ceil(this.file.length / cs), oldEntries * E);
    let nb = 1;
    let tc = this.tableClusters;
    for (;;) {
      const n = nb + tc;
      const firstTi = Math.floor(a / E);
      const lastTi = Math.floor((a + n - 1) / E);
      const entries = Math.max(lastTi + 1, oldEntries * 2, Math.floor(needIdx / E) + 1);
      const tc2 = Math.max(tc, Math.ceil((entries * 8) / cs));
      const nb2 = Math.max(nb, lastTi - firstTi + 1);
      if (tc2 === tc && nb2 === nb) break;
      tc = tc2;
      nb = nb2;
    }
    if (tc * cs > MAX_REFTABLE_BYTES) throw new Error(`the image is full: its refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`);
    const firstTi = Math.floor(a / E);
    const table = new Uint8Array(tc * cs);
    table.set(this.table);
    const tview = new DataView(table.buffer);
    const blocks: { off: number; b: RefBlock }[] = [];
    for (let k = 0; k < nb; k++) {
      const data = new Uint8Array(cs);
      const b = { data, view: new DataView(data.buffer) };
      const off = (a + k) * cs;
      blocks.push({ off, b });
      const ti = firstTi + k;
      tview.setUint32(ti * 8, Math.floor(off / 0x1_0000_0000));
      tview.setUint32(ti * 8 + 4, off >>> 0);
    }
    for (let c = a; c < a + nb + tc; c++) setRefcountEntry(blocks[Math.floor(c / E) - firstTi]!.b, this.bits, c % E, 1);
    for (const { off, b } of blocks) this.file.writeAt(b.data, off);
    const tableOffset = (a + nb) * cs;
    this.file.writeAt(table, tableOffset);
    this.file.sync();
    const hdr = new Uint8Array(12);
    const hv = new DataView(hdr.buffer);
    hv.setUint32(0, Math.floor(tableOffset / 0x1_0000_0000));
    hv.setUint32(4, tableOffset >>> 0);
    hv.setUint32(8, tc);
    this.file.writeAt(hdr, HDR_REFTABLE_OFFSET);
    this.file.sync();
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableView = tview;
    this.tableOffset = tableOffset;
    this.tableClusters = tc;
    for (const { off, b } of blocks) this.blocks.set(off, b);
    for (let k = 0; k < oldClusters; k++) {
      const idx = oldOffset / cs + k;
      if (this.decrement(idx) === 0) this.file.punchHole(idx * cs, cs);
    }
  }
}
