// vhost-user message codes, header flags and feature bits (QEMU docs/interop/vhost-user.rst).

/** Front-end → back-end requests. */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
  GET_SHMEM_CONFIG: 44,
} as const;

export const REQ_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Req).map(([name, code]) => [code, name]),
);

export function reqName(code: number): string {
  return REQ_NAMES[code] ?? `UNKNOWN(${code})`;
}

/** Back-end → front-end requests (on the SET_BACKEND_REQ_FD channel). */
export const BackendReq = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
} as const;

export const HEADER_SIZE = 12;
export const FLAG_VERSION_MASK = 0x3;
export const VERSION = 0x1;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
export const FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/** Payload cap: every request of the spec fits in 4 KiB (SET_MEM_TABLE with 8 regions is 264 B). */
export const MAX_PAYLOAD = 4096;
/** Front-ends send at most 8 memory regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_TABLE_REGIONS = 8;
/** Config space limit of the protocol (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;
/** Memory slots offered with CONFIGURE_MEM_SLOTS (same as rust-vmm's vhost-user-backend). */
export const MAX_MEM_SLOTS = 509;

/** Vring-fd messages: bits 0-7 queue index, bit 8 "no fd". */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;

/** Virtio feature bits the protocol itself uses. */
export const F_PROTOCOL_FEATURES = 1n << 30n;
export const F_LOG_ALL = 1n << 26n;
/** SET_VRING_ADDR flag: log used-ring writes at the given log address. */
export const VHOST_VRING_F_LOG = 1;

export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
} as const;

export const pf = (bit: number) => 1n << BigInt(bit);

/** What the common handler always offers, whatever the device. */
export const HANDLER_PROTOCOL_FEATURES =
  pf(ProtocolFeature.MQ) |
  pf(ProtocolFeature.LOG_SHMFD) |
  pf(ProtocolFeature.INFLIGHT_SHMFD) |
  pf(ProtocolFeature.REPLY_ACK) |
  pf(ProtocolFeature.BACKEND_REQ) |
  pf(ProtocolFeature.CONFIG) |
  pf(ProtocolFeature.RESET_DEVICE) |
  pf(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  pf(ProtocolFeature.STATUS) |
  pf(ProtocolFeature.DEVICE_STATE);

/** SET_DEVICE_STATE_FD */
export const TRANSFER_SAVE = 0;
export const TRANSFER_LOAD = 1;
export const PHASE_STOPPED = 0;
export const DEVICE_STATE_NO_FD = 0x100;
