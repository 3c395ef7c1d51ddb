// The block device's snapshot: which image it served (content-independent identity) and the
// guest-visible facts the guest has already read (capacity, block size, serial...), plus the cache
// mode. Restore checks that this backend serves the same disk, and refuses another or a resized one.

export const BLOCK_STATE_VERSION = 1;

export interface BlockState {
  version: number;
  image: {
    path: string;
    /** Bytes. */
    size: number;
    dev: number;
    ino: number;
  };
  serial: string;
  /** The serial came from --serial (the user names the disk, so a copy of it elsewhere may restore). */
  explicitSerial: boolean;
  capacitySectors: number;
  blkSize: number;
  segMax: number;
  readOnly: boolean;
  /** Decimal string (CBOR integers above 2^53 do not survive JS). */
  ackedFeatures: string;
  writeback: number;
}

/** What this backend serves, to compare a saved state against. */
export type BlockStateSelf = Omit<BlockState, "version" | "ackedFeatures" | "writeback">;

function fail(msg: string): never {
  throw new Error(`block state: ${msg}`);
}

/** Checks a decoded state completely; returns it typed, or throws a message saying what differs. */
export function validateBlockState(raw: unknown, self: BlockStateSelf, offeredFeatures: bigint): BlockState {
  if (typeof raw !== "object" || raw === null) fail("not a map");
  const s = raw as Record<string, unknown>;
  if (s.version !== BLOCK_STATE_VERSION) fail(`version ${String(s.version)}, this backend reads ${BLOCK_STATE_VERSION}`);
  const img = s.image as Record<string, unknown> | undefined;
  if (typeof img !== "object" || img === null) fail("no image section");
  const num = (v: unknown, name: string): number => {
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) fail(`field ${name} is malformed`);
    return v;
  };
  const size = num(img.size, "image.size");
  const dev = num(img.dev, "image.dev");
  const ino = num(img.ino, "image.ino");
  const path = typeof img.path === "string" ? img.path : fail("field image.path is malformed");
  const serial = typeof s.serial === "string" ? s.serial : fail("field serial is malformed");
  const explicitSerial = typeof s.explicitSerial === "boolean" ? s.explicitSerial : fail("field explicitSerial is malformed");
  const capacitySectors = num(s.capacitySectors, "capacitySectors");
  const blkSize = num(s.blkSize, "blkSize");
  const segMax = num(s.segMax, "segMax");
  const readOnly = typeof s.readOnly === "boolean" ? s.readOnly : fail("field readOnly is malformed");
  const writeback = s.writeback === 0 || s.writeback === 1 ? s.writeback : fail("field writeback is neither 0 nor 1");
  if (typeof s.ackedFeatures !== "string" || !/^[0-9]{1,20}$/.test(s.ackedFeatures)) fail("field ackedFeatures is malformed");
  const acked = BigInt(s.ackedFeatures);
  if (acked & ~offeredFeatures) fail(`saved features 0x${acked.toString(16)} include bits this device does not offer (0x${(acked & ~offeredFeatures).toString(16)})`);

  // Same disk?
  if (size !== self.image.size) {
    fail(`the image was resized: the state was saved with ${path} at ${size} bytes, ${self.image.path} has ${self.image.size} bytes`);
  }
  if (dev !== self.image.dev || ino !== self.image.ino) {
    if (!(explicitSerial && self.explicitSerial)) {
      fail(
        `a different image: the state was saved for ${path} (device ${dev}, inode ${ino}), this backend serves ` +
          `${self.image.path} (device ${self.image.dev}, inode ${self.image.ino}); to restore onto a copy, give both ` +
          "backends the same --serial",
      );
    }
  }
  if (serial !== self.serial) fail(`the disk serial differs: saved '${serial}', this backend has '${self.serial}'`);
  if (capacitySectors !== self.capacitySectors) fail(`capacity differs: saved ${capacitySectors} sectors, now ${self.capacitySectors}`);
  if (blkSize !== self.blkSize) fail(`block size differs: saved ${blkSize}, now ${self.blkSize}`);
  if (readOnly !== self.readOnly) fail(`the state is of a ${readOnly ? "read-only" : "writable"} disk, this one is ${self.readOnly ? "read-only" : "writable"}`);
  if (segMax > self.segMax) fail(`the guest was told seg_max ${segMax}, this backend allows ${self.segMax} (raise --queue-size)`);
  return {
    version: BLOCK_STATE_VERSION,
    image: { path, size, dev, ino },
    serial, explicitSerial, capacitySectors, blkSize, segMax, readOnly,
    ackedFeatures: s.ackedFeatures, writeback,
  };
}
