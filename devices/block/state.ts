// The block device's snapshot: which image it served (content-independent identity) and the
// guest-visible facts the guest has already read (capacity, block size, serial...), plus the cache
// mode. Restore checks that this backend serves the same disk, and refuses another or a resized one.

export const BLOCK_STATE_VERSION = 1;

import { checkState, object, int, str, bool, oneOf, StateError } from "../../src/state_schema.ts";

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
  /** 1 writeback, 0 writethrough (the negotiated features travel in the snapshot envelope). */
  writeback: number;
}

/** What this backend serves, to compare a saved state against. */
export type BlockStateSelf = Omit<BlockState, "version" | "writeback">;

const count = int(0, Number.MAX_SAFE_INTEGER);
const BLOCK_STATE = object({
  image: object({ path: str(), size: count, dev: count, ino: count }),
  serial: str(20),
  explicitSerial: bool,
  capacitySectors: count,
  blkSize: int(512, 1 << 30),
  segMax: int(0, 0xffff_ffff),
  readOnly: bool,
  writeback: oneOf([0, 1]),
});

/** Checks a decoded state completely; returns it typed, or throws a message saying what differs. */
export function validateBlockState(raw: unknown, self: BlockStateSelf): BlockState {
  const s = checkState("block state", BLOCK_STATE_VERSION, BLOCK_STATE, raw);
  const fail = (msg: string): never => {
    throw new StateError(`block state: ${msg}`);
  };
  const { path, size, dev, ino } = s.image;
  // Same disk?
  if (size !== self.image.size) {
    fail(`the image was resized: the state was saved with ${path} at ${size} bytes, ${self.image.path} has ${self.image.size} bytes`);
  }
  if (dev !== self.image.dev || ino !== self.image.ino) {
    if (!(s.explicitSerial && self.explicitSerial)) {
      fail(
        `a different image: the state was saved for ${path} (device ${dev}, inode ${ino}), this backend serves ` +
          `${self.image.path} (device ${self.image.dev}, inode ${self.image.ino}); to restore onto a copy, give both ` +
          "backends the same --serial",
      );
    }
  }
  if (s.serial !== self.serial) fail(`the disk serial differs: saved '${s.serial}', this backend has '${self.serial}'`);
  if (s.capacitySectors !== self.capacitySectors) fail(`capacity differs: saved ${s.capacitySectors} sectors, now ${self.capacitySectors}`);
  if (s.blkSize !== self.blkSize) fail(`block size differs: saved ${s.blkSize}, now ${self.blkSize}`);
  if (s.readOnly !== self.readOnly) fail(`the state is of a ${s.readOnly ? "read-only" : "writable"} disk, this one is ${self.readOnly ? "read-only" : "writable"}`);
  if (s.segMax > self.segMax) fail(`the guest was told seg_max ${s.segMax}, this backend allows ${self.segMax} (raise --queue-size)`);
  return { ...s, version: BLOCK_STATE_VERSION };
}
