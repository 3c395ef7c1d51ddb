// The virtio-net control queue (virtio 1.2 §5.1.6.5), served in the device thread. QEMU handles
// this queue itself; crosvm and guest-less front-ends pass it to the backend. Each command is
// class u8, command u8, data, then one device-writable ack byte. Malformed commands get
// VIRTIO_NET_ERR; nothing a driver sends can do more than fail its own command.
import type { DescriptorChain } from "../../src/chain.ts";
import { ChainReader, ChainWriter } from "../../src/chain.ts";
import { GuestErrorLog } from "../../src/guest_errors.ts";
import { MAC_TABLE_ENTRIES, NetShared, RX_ALLMULTI, RX_ALLUNI, RX_NOBCAST, RX_NOMULTI, RX_NOUNI, RX_PROMISC } from "./shared.ts";
import {
  VIRTIO_NET_OK, VIRTIO_NET_ERR, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
  VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
  VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
  VIRTIO_NET_F_GUEST_ANNOUNCE, GUEST_OFFLOAD_FEATURES,
} from "./virtio_net.ts";

/** The most command bytes read (a full MAC table: two counts and 64 addresses, with room). */
const MAX_COMMAND = 2 + 8 + 6 * MAC_TABLE_ENTRIES + 64;

/** What a command may change outside the shared filter state. */
export interface ControlTarget {
  acked(): bigint;
  maxPairs: number;
  /** False when the tap cannot follow. */
  setActivePairs(n: number): boolean;
  /** Applies receive offloads; false when the tap cannot take them. */
  setGuestOffloads(features: bigint): boolean;
  setMac(mac: Uint8Array): void;
  announceAcked(): void;
}

const RX_BITS = [RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST];

export class NetControl {
  private readonly buf = new Uint8Array(MAX_COMMAND);
  private readonly errors = new GuestErrorLog("net control queue", "debug");

  constructor(private readonly shared: NetShared, private readonly target: ControlTarget) {}

  /** Executes one command chain; returns the used length (1 with the ack written, else 0). */
  handle(chain: DescriptorChain): number {
    const w = new ChainWriter(chain);
    if (w.remaining < 1) {
      this.errors.report(`command in chain ${chain.head} has no byte for its ack; ignored`);
      return 0;
    }
    const n = new ChainReader(chain).read(this.buf);
    const ack = n < 2 ? this.fail("command shorter than its class and code") : this.execute(this.buf[0]!, this.buf[1]!, this.buf.subarray(2, n), chain.readableLen - 2);
    w.write(Uint8Array.of(ack));
    return 1;
  }

  private fail(why: string): number {
    this.errors.report(why);
    return VIRTIO_NET_ERR;
  }

  private has(f: bigint): boolean {
    return (this.target.acked() & f) !== 0n;
  }

  private execute(cls: number, cmd: number, data: Uint8Array, dataLen: number): number {
    const v = new DataView(data.buffer, data.byteOffset, data.length);
    switch (cls) {
      case VIRTIO_NET_CTRL_RX: {
        if (!this.has(VIRTIO_NET_F_CTRL_RX)) return this.fail("RX command without VIRTIO_NET_F_CTRL_RX");
        if (cmd >= RX_BITS.length || dataLen !== 1) return this.fail(`RX command ${cmd} with ${dataLen} data bytes`);
        const bit = RX_BITS[cmd]!;
        this.shared.rxMode = data[0] ? this.shared.rxMode | bit : this.shared.rxMode & ~bit;
        return VIRTIO_NET_OK;
      }
      case VIRTIO_NET_CTRL_MAC:
        if (cmd === VIRTIO_NET_CTRL_MAC_ADDR_SET) {
          if (!this.has(VIRTIO_NET_F_CTRL_MAC_ADDR)) return this.fail("MAC_ADDR_SET without VIRTIO_NET_F_CTRL_MAC_ADDR");
          if (dataLen !== 6) return this.fail(`MAC_ADDR_SET with ${dataLen} bytes`);
          this.target.setMac(data.slice(0, 6));
          return VIRTIO_NET_OK;
        }
        if (cmd === VIRTIO_NET_CTRL_MAC_TABLE_SET) {
          if (!this.has(VIRTIO_NET_F_CTRL_RX)) return this.fail("MAC_TABLE_SET without VIRTIO_NET_F_CTRL_RX");
          // Two tables, each: entries le32, then entries × 6 bytes.
          if (dataLen > data.length) return this.fail(`MAC_TABLE_SET of ${dataLen} bytes`);
          const tables: Uint8Array[][] = [];
          let o = 0;
          for (let t = 0; t < 2; t++) {
            if (o + 4 > dataLen) return this.fail("MAC_TABLE_SET shorter than its counts");
            const count = v.getUint32(o, true);
            o += 4;
            if (count > MAC_TABLE_ENTRIES || o + 6 * count > dataLen) return this.fail(`MAC_TABLE_SET table of ${count} entries does not fit`);
            tables.push(Array.from({ length: count }, (_, i) => data.slice(o + 6 * i, o + 6 * i + 6)));
            o += 6 * count;
          }
          if (o !== dataLen) return this.fail(`MAC_TABLE_SET with ${dataLen - o} trailing bytes`);
          if (tables[0]!.length + tables[1]!.length > MAC_TABLE_ENTRIES) return this.fail("MAC_TABLE_SET with more than 64 addresses");
          this.shared.setTable(tables[0]!, tables[1]!);
          return VIRTIO_NET_OK;
        }
        return this.fail(`MAC command ${cmd}`);
      case VIRTIO_NET_CTRL_MQ: {
        if (!this.has(VIRTIO_NET_F_MQ)) return this.fail("MQ command without VIRTIO_NET_F_MQ");
        if (cmd !== VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || dataLen !== 2) return this.fail(`MQ command ${cmd} with ${dataLen} bytes`);
        const n = v.getUint16(0, true);
        if (n < 1 || n > this.target.maxPairs) return this.fail(`VQ_PAIRS_SET ${n} (1..${this.target.maxPairs})`);
        return this.target.setActivePairs(n) ? VIRTIO_NET_OK : this.fail(`the tap could not switch to ${n} queue pairs`);
      }
      case VIRTIO_NET_CTRL_GUEST_OFFLOADS: {
        if (!this.has(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)) return this.fail("GUEST_OFFLOADS without VIRTIO_NET_F_CTRL_GUEST_OFFLOADS");
        if (cmd !== VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET || dataLen !== 8) return this.fail(`GUEST_OFFLOADS command ${cmd} with ${dataLen} bytes`);
        const offloads = v.getBigUint64(0, true);
        // Only offloads the driver negotiated may be switched on (§5.1.6.5.6.2).
        if (offloads & ~(this.target.acked() & GUEST_OFFLOAD_FEATURES)) return this.fail(`GUEST_OFFLOADS_SET 0x${offloads.toString(16)} beyond the negotiated offloads`);
        return this.target.setGuestOffloads(offloads) ? VIRTIO_NET_OK : this.fail("the tap refused those offloads");
      }
      case VIRTIO_NET_CTRL_ANNOUNCE:
        if (!this.has(VIRTIO_NET_F_GUEST_ANNOUNCE) || cmd !== VIRTIO_NET_CTRL_ANNOUNCE_ACK) return this.fail(`ANNOUNCE command ${cmd}`);
        this.target.announceAcked();
        return VIRTIO_NET_OK;
      default:
        return this.fail(`unknown command class ${cls}`);
    }
  }
}
