// virtio-net as the spec defines it (virtio 1.2 §5.1): feature bits, the per-packet header, the
// control queue's classes and commands, and the config space. No tap and no queue logic here, so
// the device, the tap glue and the tests share one source of these numbers.

/** Virtio device id of a network card. */
export const VIRTIO_ID_NET = 1;

// Feature bits (§5.1.3).
export const VIRTIO_NET_F_CSUM = 1n << 0n; // device handles packets with partial checksum (guest → host)
export const VIRTIO_NET_F_GUEST_CSUM = 1n << 1n; // driver handles packets with partial checksum (host → guest)
export const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1n << 2n;
export const VIRTIO_NET_F_MTU = 1n << 3n;
export const VIRTIO_NET_F_MAC = 1n << 5n;
export const VIRTIO_NET_F_GUEST_TSO4 = 1n << 7n;
export const VIRTIO_NET_F_GUEST_TSO6 = 1n << 8n;
export const VIRTIO_NET_F_GUEST_ECN = 1n << 9n;
export const VIRTIO_NET_F_GUEST_UFO = 1n << 10n;
export const VIRTIO_NET_F_HOST_TSO4 = 1n << 11n;
export const VIRTIO_NET_F_HOST_TSO6 = 1n << 12n;
export const VIRTIO_NET_F_HOST_ECN = 1n << 13n;
export const VIRTIO_NET_F_HOST_UFO = 1n << 14n;
export const VIRTIO_NET_F_MRG_RXBUF = 1n << 15n;
export const VIRTIO_NET_F_STATUS = 1n << 16n;
export const VIRTIO_NET_F_CTRL_VQ = 1n << 17n;
export const VIRTIO_NET_F_CTRL_RX = 1n << 18n;
export const VIRTIO_NET_F_CTRL_VLAN = 1n << 19n;
export const VIRTIO_NET_F_CTRL_RX_EXTRA = 1n << 20n;
export const VIRTIO_NET_F_GUEST_ANNOUNCE = 1n << 21n;
export const VIRTIO_NET_F_MQ = 1n << 22n;
export const VIRTIO_NET_F_CTRL_MAC_ADDR = 1n << 23n;
export const VIRTIO_NET_F_NOTF_COAL = 1n << 53n;
export const VIRTIO_NET_F_GUEST_USO4 = 1n << 54n;
export const VIRTIO_NET_F_GUEST_USO6 = 1n << 55n;
export const VIRTIO_NET_F_HOST_USO = 1n << 56n;
export const VIRTIO_NET_F_HASH_REPORT = 1n << 57n;
export const VIRTIO_NET_F_GUEST_HDRLEN = 1n << 59n;
export const VIRTIO_NET_F_RSS = 1n << 60n;
export const VIRTIO_NET_F_RSC_EXT = 1n << 61n;
export const VIRTIO_NET_F_STANDBY = 1n << 62n;
export const VIRTIO_NET_F_SPEED_DUPLEX = 1n << 63n;

/** The guest-receive offloads; CTRL_GUEST_OFFLOADS may switch these (and only these) at run time. */
export const GUEST_OFFLOAD_FEATURES =
  VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN |
  VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6;

// struct virtio_net_hdr_v1 (§5.1.6): 12 bytes, little-endian. With VERSION_1 the header always
// has num_buffers, whether or not MRG_RXBUF was negotiated.
export const VIRTIO_NET_HDR_SIZE = 12;
export const HDR_FLAGS = 0; // u8
export const HDR_GSO_TYPE = 1; // u8
export const HDR_HDR_LEN = 2; // le16
export const HDR_GSO_SIZE = 4; // le16
export const HDR_CSUM_START = 6; // le16
export const HDR_CSUM_OFFSET = 8; // le16
export const HDR_NUM_BUFFERS = 10; // le16

/** The header's flags (VIRTIO_NET_HDR_F_*). */
export const VIRTIO_NET_HDR_F = {
  NEEDS_CSUM: 1,
  DATA_VALID: 2,
  RSC_INFO: 4,
} as const;

/** The header's gso_type (VIRTIO_NET_HDR_GSO_*): the segmentation a frame still needs; ECN is a flag on top. */
export const VIRTIO_NET_HDR_GSO = {
  NONE: 0,
  TCPV4: 1,
  UDP: 3,
  TCPV6: 4,
  UDP_L4: 5,
  ECN: 0x80,
} as const;

export interface VirtioNetHdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
  numBuffers: number;
}

export function decodeNetHdr(b: Uint8Array): VirtioNetHdr {
  if (b.length < VIRTIO_NET_HDR_SIZE) throw new Error(`a virtio-net header has ${VIRTIO_NET_HDR_SIZE} bytes, got ${b.length}`);
  const v = new DataView(b.buffer, b.byteOffset, VIRTIO_NET_HDR_SIZE);
  return {
    flags: v.getUint8(HDR_FLAGS),
    gsoType: v.getUint8(HDR_GSO_TYPE),
    hdrLen: v.getUint16(HDR_HDR_LEN, true),
    gsoSize: v.getUint16(HDR_GSO_SIZE, true),
    csumStart: v.getUint16(HDR_CSUM_START, true),
    csumOffset: v.getUint16(HDR_CSUM_OFFSET, true),
    numBuffers: v.getUint16(HDR_NUM_BUFFERS, true),
  };
}

// Control queue (§5.1.6.5): class u8, command u8, data..., then the device writes an ack u8.
export const VIRTIO_NET_OK = 0;
export const VIRTIO_NET_ERR = 1;

export const VIRTIO_NET_CTRL_RX = 0;
export const VIRTIO_NET_CTRL_RX_PROMISC = 0;
export const VIRTIO_NET_CTRL_RX_ALLMULTI = 1;
export const VIRTIO_NET_CTRL_RX_ALLUNI = 2;
export const VIRTIO_NET_CTRL_RX_NOMULTI = 3;
export const VIRTIO_NET_CTRL_RX_NOUNI = 4;
export const VIRTIO_NET_CTRL_RX_NOBCAST = 5;

export const VIRTIO_NET_CTRL_MAC = 1;
export const VIRTIO_NET_CTRL_MAC_TABLE_SET = 0;
export const VIRTIO_NET_CTRL_MAC_ADDR_SET = 1;

export const VIRTIO_NET_CTRL_VLAN = 2;
export const VIRTIO_NET_CTRL_VLAN_ADD = 0;
export const VIRTIO_NET_CTRL_VLAN_DEL = 1;

export const VIRTIO_NET_CTRL_ANNOUNCE = 3;
export const VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0;

export const VIRTIO_NET_CTRL_MQ = 4;
export const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0;
export const VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1;
export const VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2;
export const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1;
export const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000;

export const VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5;
export const VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0;

// Config space (§5.1.4). Fields exist whether or not their feature is offered; a front-end reads
// only those its negotiated features make valid (mac: MAC, status: STATUS, pairs: MQ, mtu: MTU).
export const CONFIG = {
  MAC: 0, // u8[6]
  STATUS: 6, // le16
  MAX_VIRTQUEUE_PAIRS: 8, // le16
  MTU: 10, // le16
} as const;
export const NET_CONFIG_SIZE = 12;

/** The config space's status bits (VIRTIO_NET_S_*). */
export const VIRTIO_NET_S = {
  LINK_UP: 1,
  ANNOUNCE: 2,
} as const;

export interface NetConfig {
  mac: Uint8Array;
  status: number;
  maxVirtqueuePairs: number;
  mtu: number;
}

export function encodeNetConfig(c: NetConfig): Uint8Array {
  if (c.mac.length !== 6) throw new Error("the config space MAC has 6 bytes");
  const b = new Uint8Array(NET_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  b.set(c.mac, CONFIG.MAC);
  v.setUint16(CONFIG.STATUS, c.status, true);
  v.setUint16(CONFIG.MAX_VIRTQUEUE_PAIRS, c.maxVirtqueuePairs, true);
  v.setUint16(CONFIG.MTU, c.mtu, true);
  return b;
}

/** Queue layout (§5.1.2): receiveq N = 2N, transmitq N = 2N+1, the control queue after the last pair. */
export const rxQueueIndex = (pair: number) => 2 * pair;
export const txQueueIndex = (pair: number) => 2 * pair + 1;
export const ctrlQueueIndex = (pairs: number) => 2 * pairs;
