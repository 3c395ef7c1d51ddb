// The net device's snapshot: what the driver programmed (receive offloads, MAC, MTU, link state,
// receive filter, active pairs). The negotiated features travel in the snapshot envelope
// (src/snapshot.ts), not here. Frames in flight are not state: a stopped ring has none. Restore
// validates everything before the device changes anything.
import { MAC_TABLE_ENTRIES } from "./shared.ts";
import { GUEST_OFFLOAD_FEATURES } from "./virtio_net.ts";
import { checkState, object, int, bytes, array, u64String, StateError } from "../../src/state_schema.ts";

export const NET_STATE_VERSION = 1;

export interface NetState {
  version: number;
  /** Decimal string: CBOR integers above 2^53 do not survive JS. */
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

/** Checks a decoded state completely against this device and the features it comes with; returns it typed. */
export function validateNetState(raw: unknown, queuePairs: number, ackedFeatures: bigint): NetState {
  const mac = bytes(6);
  const s = checkState("net state", NET_STATE_VERSION, object({
    guestOffloads: u64String,
    mac,
    mtu: int(68, 65535),
    status: int(0, 3),
    queuePairs: int(1, 0x8000),
    activePairs: int(1, 0x8000),
    rxMode: int(0, 63),
    unicast: array(mac, MAC_TABLE_ENTRIES),
    multicast: array(mac, MAC_TABLE_ENTRIES),
  }), raw);
  const fail = (msg: string): never => {
    throw new StateError(`net state: ${msg}`);
  };
  if (s.guestOffloads & ~(ackedFeatures & GUEST_OFFLOAD_FEATURES)) fail("guestOffloads are not negotiated receive offloads");
  if (s.queuePairs !== queuePairs) fail(`the state is of a device with ${s.queuePairs} queue pairs, this one has ${queuePairs}`);
  if (s.activePairs > queuePairs) fail(`activePairs ${s.activePairs} is more than the ${queuePairs} this device has`);
  if (s.unicast.length + s.multicast.length > MAC_TABLE_ENTRIES) fail(`more than ${MAC_TABLE_ENTRIES} filter addresses`);
  return { ...s, version: NET_STATE_VERSION, guestOffloads: s.guestOffloads.toString() };
}
