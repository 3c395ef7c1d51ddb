// The net device's snapshot: what the driver negotiated and programmed (features, receive offloads,
// MAC, MTU, link state, receive filter, active pairs). Frames in flight are not state: a stopped
// ring has none. Restore validates everything before the device changes anything.
import { MAC_TABLE_ENTRIES } from "./shared.ts";
import { GUEST_OFFLOAD_FEATURES } from "./virtio_net.ts";

export const NET_STATE_VERSION = 1;

export interface NetState {
  version: number;
  /** Decimal strings: CBOR integers above 2^53 do not survive JS. */
  ackedFeatures: string;
  guestOffloads: string;
  mac: Uint8Array;
  mtu: number;
  status: number;
  queuePairs: number;
  activePairs: number;
  rxMode: number;
  unicast: Uint8Array[];
  multicast: Uint8Array[];
}

function fail(msg: string): never {
  throw new Error(`net state: ${msg}`);
}

function bigintString(v: unknown, what: string): bigint {
  if (typeof v !== "string" || !/^[0-9]{1,20}$/.test(v)) fail(`${what} is not a decimal integer string`);
  const b = BigInt(v);
  if (b >= 1n << 64n) fail(`${what} does not fit 64 bits`);
  return b;
}

function int(v: unknown, what: string, min: number, max: number): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) fail(`${what} is not an integer in ${min}..${max}`);
  return v;
}

function macs(v: unknown, what: string): Uint8Array[] {
  if (!Array.isArray(v) || v.length > MAC_TABLE_ENTRIES) fail(`${what} is not a list of at most ${MAC_TABLE_ENTRIES} addresses`);
  return v.map((m, i) => {
    if (!(m instanceof Uint8Array) || m.length !== 6) fail(`${what}[${i}] is not a 6-byte address`);
    return m;
  });
}

/** Checks a decoded state completely against this device; returns it typed. */
export function validateNetState(raw: unknown, offered: bigint, queuePairs: number): NetState {
  if (typeof raw !== "object" || raw === null) fail("not a map");
  const s = raw as Record<string, unknown>;
  if (s.version !== NET_STATE_VERSION) fail(`version ${String(s.version)}, this backend reads ${NET_STATE_VERSION}`);
  const acked = bigintString(s.ackedFeatures, "ackedFeatures");
  if (acked & ~offered) fail(`saved features 0x${acked.toString(16)} are not all offered by this device (0x${offered.toString(16)})`);
  const offloads = bigintString(s.guestOffloads, "guestOffloads");
  if (offloads & ~(acked & GUEST_OFFLOAD_FEATURES)) fail("guestOffloads are not negotiated receive offloads");
  if (!(s.mac instanceof Uint8Array) || s.mac.length !== 6) fail("mac is not 6 bytes");
  const pairs = int(s.queuePairs, "queuePairs", 1, 0x8000);
  if (pairs !== queuePairs) fail(`the state is of a device with ${pairs} queue pairs, this one has ${queuePairs}`);
  const unicast = macs(s.unicast, "unicast");
  const multicast = macs(s.multicast, "multicast");
  if (unicast.length + multicast.length > MAC_TABLE_ENTRIES) fail(`more than ${MAC_TABLE_ENTRIES} filter addresses`);
  return {
    version: NET_STATE_VERSION,
    ackedFeatures: s.ackedFeatures as string,
    guestOffloads: s.guestOffloads as string,
    mac: s.mac,
    mtu: int(s.mtu, "mtu", 68, 65535),
    status: int(s.status, "status", 0, 3),
    queuePairs: pairs,
    activePairs: int(s.activePairs, "activePairs", 1, queuePairs),
    rxMode: int(s.rxMode, "rxMode", 0, 63),
    unicast,
    multicast,
  };
}
