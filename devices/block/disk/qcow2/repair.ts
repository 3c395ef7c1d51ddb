// Rebuilds the refcounts of an image whose dirty bit is set (lazy refcounts, then a crash): every
// cluster reachable from the header is counted (header, active and snapshot L1/L2 tables and their
// data clusters, compressed data, the snapshot table, bitmaps), and a fresh refcount table with its
// blocks is written past the end of the file, synced, and only then made current by the header.
// The old refcount structures are then simply unreferenced: a crash at any point leaves either the
// old (dirty, repaired again next time) or the new, consistent structures in force.
import type { ImageFile } from "./file.ts";
import { HDR_REFTABLE_OFFSET, MAX_REFTABLE_BYTES, type Qcow2Header } from "./header.ts";
import { Qcow2CorruptError, setRefcountEntry, type RefBlock } from "./refcounts.ts";
import { compressedExtent } from "./compressed.ts";

/** Largest file, in clusters, we rebuild in memory (a 4-byte count per cluster). */
const MAX_CLUSTERS = 1 << 27;

function u64(v: DataView, o: number, what: string): number {
  const hi = v.getUint32(o);
  if (hi >= 0x200000) throw new Qcow2CorruptError(`${what} is too large`);
  return hi * 0x1_0000_0000 + v.getUint32(o + 4);
}

export function rebuildRefcounts(file: ImageFile, h: Qcow2Header, activeL1: Uint8Array): void {
  const cs = h.clusterSize;
  const fileClusters = Math.ceil(file.length / cs);
  if (fileClusters > MAX_CLUSTERS) throw new Qcow2CorruptError(`image of ${fileClusters} clusters is too large to repair here; use 'qemu-img check -r all'`);
  const refs = new Uint32Array(fileClusters);
  const add = (offset: number, len: number, what: string) => {
    if (len <= 0) return;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + len - 1) / cs);
    if (last >= fileClusters) throw new Qcow2CorruptError(`${what} at ${offset} lies past the end of the file`);
    for (let c = first; c <= last; c++) refs[c]!++;
  };
  const read = (offset: number, len: number) => {
    const b = new Uint8Array(len);
    file.readAt(b, offset);
    return b;
  };
  add(0, cs, "header");
  const l2 = new Uint8Array(cs);
  const l2v = new DataView(l2.buffer);
  const walkL1 = (l1: Uint8Array, l1Offset: number) => {
    add(l1Offset, l1.length, "L1 table");
    const v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l2Off = (v.getUint32(i * 8) & 0x00ffffff) * 0x1_0000_0000 + (v.getUint32(i * 8 + 4) & 0xfffffe00);
      if (l2Off === 0) continue;
      if (l2Off % cs !== 0) throw new Qcow2CorruptError(`L2 table at ${l2Off} is not cluster-aligned`);
      add(l2Off, cs, "L2 table");
      file.readAt(l2, l2Off);
      for (let j = 0; j < cs / 8; j++) {
        const hi = l2v.getUint32(j * 8);
        const lo = l2v.getUint32(j * 8 + 4);
        if (hi & 0x40000000) {
          const { offset, size } = compressedExtent(hi, lo, h.clusterBits);
          add(offset, size, "compressed cluster");
          continue;
        }
        const host = (hi & 0x00ffffff) * 0x1_0000_0000 + (lo & 0xfffffe00);
        if (host === 0) continue;
        if (host % cs !== 0) throw new Qcow2CorruptError(`data cluster at ${host} is not cluster-aligned`);
        add(host, cs, "data cluster");
      }
    }
  };
  walkL1(activeL1, h.l1TableOffset);

  // Internal snapshots: their table, and each one's L1 with everything under it.
  let o = h.snapshotsOffset;
  for (let s = 0; s < h.nbSnapshots; s++) {
    const e = read(o, 40);
    const v = new DataView(e.buffer);
    const l1Offset = u64(v, 0, "snapshot L1 offset");
    const l1Size = v.getUint32(8);
    const entryLen = 40 + v.getUint32(36) + v.getUint16(12) + v.getUint16(14);
    if (l1Size * 8 > 32 * 1024 * 1024 || l1Offset % cs !== 0) throw new Qcow2CorruptError(`snapshot ${s} has a bad L1 table`);
    walkL1(read(l1Offset, l1Size * 8), l1Offset);
    o += Math.ceil(entryLen / 8) * 8;
    if (o - h.snapshotsOffset > 64 * 1024 * 1024) throw new Qcow2CorruptError("snapshot table is too large");
  }
  add(h.snapshotsOffset, o - h.snapshotsOffset, "snapshot table");

  if (h.bitmaps !== null) {
    const { directoryOffset, directorySize, count } = h.bitmaps;
    if (directorySize > 64 * 1024 * 1024) throw new Qcow2CorruptError("bitmap directory is too large");
    add(directoryOffset, directorySize, "bitmap directory");
    const dir = read(directoryOffset, directorySize);
    const dv = new DataView(dir.buffer);
    let p = 0;
    for (let b = 0; b < count && p + 24 <= directorySize; b++) {
      const tableOffset = u64(dv, p, "bitmap table offset");
      const tableSize = dv.getUint32(p + 8);
      if (tableSize * 8 > 64 * 1024 * 1024) throw new Qcow2CorruptError("bitmap table is too large");
      add(tableOffset, tableSize * 8, "bitmap table");
      const table = read(tableOffset, tableSize * 8);
      const tv = new DataView(table.buffer);
      for (let k = 0; k < tableSize; k++) {
        const off = (tv.getUint32(k * 8) & 0x00ffffff) * 0x1_0000_0000 + (tv.getUint32(k * 8 + 4) & 0xfffffe00);
        if (off !== 0) add(off, cs, "bitmap data");
      }
      p += Math.ceil((24 + dv.getUint32(p + 20) + dv.getUint16(p + 18)) / 8) * 8;
    }
  }

  // The new structures, past the end: nb blocks covering everything including themselves, then the table.
  const bits = 1 << h.refcountOrder;
  const perBlock = (cs * 8) / bits;
  const maxValue = bits >= 32 ? 0xffffffff : 2 ** bits - 1;
  const a = fileClusters;
  let nb = 1;
  let tc = 1;
  for (;;) {
    const nb2 = Math.ceil((a + nb + tc) / perBlock);
    const tc2 = Math.ceil((nb2 * 8) / cs);
    if (nb2 === nb && tc2 === tc) break;
    nb = Math.max(nb, nb2);
    tc = Math.max(tc, tc2);
  }
  if (tc * cs > MAX_REFTABLE_BYTES) throw new Qcow2CorruptError("the rebuilt refcount table would be too large");
  const table = new Uint8Array(tc * cs);
  const tv = new DataView(table.buffer);
  for (let k = 0; k < nb; k++) {
    const data = new Uint8Array(cs);
    const blk: RefBlock = { data, view: new DataView(data.buffer) };
    for (let i = 0; i < perBlock; i++) {
      const c = k * perBlock + i;
      const n = c < a ? refs[c]! : c < a + nb + tc ? 1 : 0;
      if (n > maxValue) throw new Qcow2CorruptError(`cluster ${c} has ${n} references, more than ${bits}-bit refcounts hold`);
      if (n !== 0) setRefcountEntry(blk, bits, i, n);
    }
    const off = (a + k) * cs;
    file.writeAt(data, off);
    tv.setUint32(k * 8, Math.floor(off / 0x1_0000_0000));
    tv.setUint32(k * 8 + 4, off >>> 0);
  }
  const tableOffset = (a + nb) * cs;
  file.writeAt(table, tableOffset);
  file.sync();
  const hdr = new Uint8Array(12);
  const hv = new DataView(hdr.buffer);
  hv.setUint32(0, Math.floor(tableOffset / 0x1_0000_0000));
  hv.setUint32(4, tableOffset >>> 0);
  hv.setUint32(8, tc);
  file.writeAt(hdr, HDR_REFTABLE_OFFSET);
  file.sync();
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tc;
}
