// The host side of a tap for tests and benches: an AF_PACKET socket bound to one interface sees
// every frame the tap sends into the host and injects frames toward it.
import { libc, check } from "../../ffi/libc.ts";
import * as tun from "../../ffi/tap.ts";
import { AF, SOCK } from "../../ffi/socket.ts";

/** htons(ETH_P_ALL): every protocol. */
const ETH_P_ALL_BE = 0x0300;
const SOL_PACKET = 263;
const PACKET_VNET_HDR = 15;

/** An ethertype nothing else in a test's namespace sends (IEEE "local experimental"). */
export const TEST_ETHERTYPE = 0x88b5;

/**
 * A non-blocking AF_PACKET socket on interface `ifname`, in the calling thread's network namespace
 * (call it inside ns.enter). With `vnetHdr`, frames written to it start with a 10-byte
 * virtio_net_hdr (a GSO frame the kernel segments).
 */
export function packetSocket(ifname: string, vnetHdr = false): number {
  const ifindex = tun.withControlSocket((s) => tun.ifIndex(s, ifname));
  const fd = check(libc.socket(AF.PACKET, SOCK.RAW | SOCK.NONBLOCK | SOCK.CLOEXEC, ETH_P_ALL_BE), "socket(AF_PACKET)");
  if (vnetHdr) check(libc.setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, new Int32Array([1]), 4), "PACKET_VNET_HDR");
  const sll = new Uint8Array(20); // struct sockaddr_ll
  const v = new DataView(sll.buffer);
  v.setUint16(0, AF.PACKET, true);
  v.setUint16(2, ETH_P_ALL_BE, true);
  v.setInt32(4, ifindex, true);
  check(libc.bind(fd, sll, sll.length), "bind(AF_PACKET)");
  return fd;
}
