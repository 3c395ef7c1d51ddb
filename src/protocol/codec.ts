// Decodes front-end requests into typed messages and encodes replies. Strict by design: exact
// payload sizes, fds only where the spec carries them, and 64-bit addresses that fit a JS number.
import { Req, reqName, HEADER_SIZE, FLAG_VERSION_MASK, VERSION, FLAG_REPLY, FLAG_NEED_REPLY, FLAGS_KNOWN,
  MAX_PAYLOAD, MAX_MEM_TABLE_REGIONS, MAX_CONFIG_SIZE, VRING_IDX_MASK, VRING_NOFD_MASK } from "./constants.ts";

export interface Header {
  code: number;
  flags: number;
  size: number;
}

export interface MemoryRegionDesc {
  gpa: number;
  size: number;
  uaddr: number;
  mmapOffset: number;
}

export type Body =
  | { kind: "none" }
  | { kind: "u64"; value: bigint }
  | { kind: "vringState"; index: number; num: number }
  | { kind: "vringAddr"; index: number; flags: number; desc: number; used: number; avail: number; log: number }
  | { kind: "vringFd"; index: number; noFd: boolean }
  | { kind: "memTable"; regions: MemoryRegionDesc[] }
  | { kind: "memRegion"; region: MemoryRegionDesc }
  | { kind: "config"; offset: number; size: number; flags: number; data: Uint8Array }
  | { kind: "deviceStateFd"; direction: number; phase: number }
  | { kind: "logBase"; size: number; offset: number }
  | { kind: "inflight"; mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number };

export interface Message {
  header: Header;
  needReply: boolean;
  body: Body;
  /** fds that arrived with the message; the handler owns them (and closes what it does not keep). */
  fds: number[];
}

/** A message whose header or framing cannot be trusted: the connection must be dropped. */
export class FramingError extends Error {}
/** A well-framed message that breaks a rule: refuse it, keep the session. */
export class MessageError extends Error {
  /** Set once the header is known, so the refusal can be sent as a reply to that request. */
  header?: Header;
}

export function decodeHeader(bytes: Uint8Array): Header {
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_SIZE);
  const header = { code: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
  if ((header.flags & FLAG_VERSION_MASK) !== VERSION) {
    throw new FramingError(`${reqName(header.code)}: protocol version ${header.flags & FLAG_VERSION_MASK}, expected 1`);
  }
  if (header.flags & FLAG_REPLY) throw new FramingError(`${reqName(header.code)}: reply flag set on a request`);
  if (header.flags & ~FLAGS_KNOWN) {
    throw new FramingError(`${reqName(header.code)}: reserved flag bits 0x${(header.flags & ~FLAGS_KNOWN).toString(16)}`);
  }
  if (header.size > MAX_PAYLOAD) {
    throw new FramingError(`${reqName(header.code)}: payload of ${header.size} bytes exceeds ${MAX_PAYLOAD}`);
  }
  return header;
}

/** Which fd counts a request may carry. */
function allowedFds(code: number, body: Body): [number, number] {
  switch (code) {
    case Req.SET_MEM_TABLE:
      return body.kind === "memTable" ? [body.regions.length, body.regions.length] : [0, 0];
    case Req.SET_VRING_KICK:
    case Req.SET_VRING_CALL:
    case Req.SET_VRING_ERR:
      return body.kind === "vringFd" && !body.noFd ? [1, 1] : [0, 0];
    case Req.SET_LOG_BASE:
    case Req.SET_LOG_FD:
    case Req.SET_BACKEND_REQ_FD:
    case Req.SET_INFLIGHT_FD:
    case Req.GPU_SET_SOCKET:
    case Req.ADD_MEM_REG:
    case Req.SET_DEVICE_STATE_FD:
      return [1, 1];
    case Req.REM_MEM_REG:
      return [0, 1]; // the spec lets a front-end attach one; we close it
    default:
      return [0, 0];
  }
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

class Reader {
  private readonly v: DataView;
  constructor(private readonly bytes: Uint8Array, private readonly what: string) {
    this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  u16(o: number): number {
    return this.v.getUint16(o, true);
  }
  u32(o: number): number {
    return this.v.getUint32(o, true);
  }
  big(o: number): bigint {
    return this.v.getBigUint64(o, true);
  }
  /** A u64 that must fit a JS number exactly (addresses, sizes, offsets). */
  num(o: number, field: string): number {
    const lo = this.v.getUint32(o, true);
    const hi = this.v.getUint32(o + 4, true);
    const n = hi * 0x1_0000_0000 + lo;
    if (n > MAX_SAFE) throw new MessageError(`${this.what}: ${field} 0x${this.big(o).toString(16)} is out of range`);
    return n;
  }
  region(o: number): MemoryRegionDesc {
    return {
      gpa: this.num(o, "guest address"),
      size: this.num(o + 8, "region size"),
      uaddr: this.num(o + 16, "user address"),
      mmapOffset: this.num(o + 24, "mmap offset"),
    };
  }
  get length(): number {
    return this.bytes.byteLength;
  }
  slice(start: number, end: number): Uint8Array {
    return this.bytes.slice(start, end);
  }
}

/** The fixed payload size of each request; a function for the variable ones. */
const SIZES: Record<number, number | ((r: Reader) => number)> = {
  [Req.GET_FEATURES]: 0,
  [Req.SET_FEATURES]: 8,
  [Req.SET_OWNER]: 0,
  [Req.RESET_OWNER]: 0,
  [Req.SET_MEM_TABLE]: (r) => (r.length >= 8 ? 8 + 32 * r.u32(0) : 8),
  [Req.SET_LOG_BASE]: 16,
  [Req.SET_LOG_FD]: 0,
  [Req.SET_VRING_NUM]: 8,
  [Req.SET_VRING_ADDR]: 40,
  [Req.SET_VRING_BASE]: 8,
  [Req.GET_VRING_BASE]: 8,
  [Req.SET_VRING_KICK]: 8,
  [Req.SET_VRING_CALL]: 8,
  [Req.SET_VRING_ERR]: 8,
  [Req.GET_PROTOCOL_FEATURES]: 0,
  [Req.SET_PROTOCOL_FEATURES]: 8,
  [Req.GET_QUEUE_NUM]: 0,
  [Req.SET_VRING_ENABLE]: 8,
  [Req.SEND_RARP]: 8,
  [Req.NET_SET_MTU]: 8,
  [Req.SET_BACKEND_REQ_FD]: 0,
  [Req.IOTLB_MSG]: 32,
  [Req.SET_VRING_ENDIAN]: 8,
  [Req.GET_CONFIG]: (r) => (r.length >= 12 ? 12 + r.u32(4) : 12),
  [Req.SET_CONFIG]: (r) => (r.length >= 12 ? 12 + r.u32(4) : 12),
  [Req.CLOSE_CRYPTO_SESSION]: 8,
  [Req.POSTCOPY_ADVISE]: 0,
  [Req.POSTCOPY_LISTEN]: 0,
  [Req.POSTCOPY_END]: 0,
  [Req.GET_INFLIGHT_FD]: 24,
  [Req.SET_INFLIGHT_FD]: 24,
  [Req.GPU_SET_SOCKET]: 0,
  [Req.RESET_DEVICE]: 0,
  [Req.VRING_KICK]: 8,
  [Req.GET_MAX_MEM_SLOTS]: 0,
  [Req.ADD_MEM_REG]: 40,
  [Req.REM_MEM_REG]: 40,
  [Req.SET_STATUS]: 8,
  [Req.GET_STATUS]: 0,
  [Req.GET_SHARED_OBJECT]: 16,
  [Req.SET_DEVICE_STATE_FD]: 8,
  [Req.CHECK_DEVICE_STATE]: 0,
  [Req.GET_SHMEM_CONFIG]: 0,
};

function decodeBody(code: number, r: Reader, what: string): Body {
  switch (code) {
    case Req.SET_FEATURES:
    case Req.SET_PROTOCOL_FEATURES:
    case Req.SEND_RARP:
    case Req.NET_SET_MTU:
    case Req.SET_STATUS:
    case Req.CLOSE_CRYPTO_SESSION:
      return { kind: "u64", value: r.big(0) };
    case Req.SET_VRING_NUM:
    case Req.SET_VRING_BASE:
    case Req.GET_VRING_BASE:
    case Req.SET_VRING_ENABLE:
    case Req.SET_VRING_ENDIAN:
    case Req.VRING_KICK:
      return { kind: "vringState", index: r.u32(0), num: r.u32(4) };
    case Req.SET_VRING_ADDR:
      return {
        kind: "vringAddr", index: r.u32(0), flags: r.u32(4),
        desc: r.num(8, "descriptor table address"), used: r.num(16, "used ring address"),
        avail: r.num(24, "available ring address"), log: r.num(32, "log address"),
      };
    case Req.SET_VRING_KICK:
    case Req.SET_VRING_CALL:
    case Req.SET_VRING_ERR: {
      const v = r.big(0);
      if (v & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) throw new MessageError(`${what}: reserved bits set in 0x${v.toString(16)}`);
      return { kind: "vringFd", index: Number(v & BigInt(VRING_IDX_MASK)), noFd: (v & BigInt(VRING_NOFD_MASK)) !== 0n };
    }
    case Req.SET_MEM_TABLE: {
      const n = r.u32(0);
      if (n === 0 || n > MAX_MEM_TABLE_REGIONS) throw new MessageError(`${what}: ${n} regions (1..${MAX_MEM_TABLE_REGIONS} allowed)`);
      const regions: MemoryRegionDesc[] = [];
      for (let i = 0; i < n; i++) regions.push(r.region(8 + 32 * i));
      return { kind: "memTable", regions };
    }
    case Req.ADD_MEM_REG:
    case Req.REM_MEM_REG:
      return { kind: "memRegion", region: r.region(8) };
    case Req.GET_CONFIG:
    case Req.SET_CONFIG: {
      const size = r.u32(4);
      if (size > MAX_CONFIG_SIZE) throw new MessageError(`${what}: config size ${size} exceeds ${MAX_CONFIG_SIZE}`);
      return { kind: "config", offset: r.u32(0), size, flags: r.u32(8), data: r.slice(12, 12 + size) };
    }
    case Req.SET_DEVICE_STATE_FD:
      return { kind: "deviceStateFd", direction: r.u32(0), phase: r.u32(4) };
    case Req.SET_LOG_BASE:
      return { kind: "logBase", size: r.num(0, "log size"), offset: r.num(8, "log offset") };
    case Req.GET_INFLIGHT_FD:
    case Req.SET_INFLIGHT_FD:
      return { kind: "inflight", mmapSize: r.num(0, "inflight size"), mmapOffset: r.num(8, "inflight offset"), numQueues: r.u16(16), queueSize: r.u16(18) };
    default:
      return { kind: "none" };
  }
}

/**
 * Decodes a complete request. Throws MessageError for a well-framed message that breaks a rule;
 * the caller then refuses it and closes its fds.
 */
export function decodeMessage(header: Header, payload: Uint8Array, fds: number[]): Message {
  try {
    return decodeChecked(header, payload, fds);
  } catch (e) {
    if (e instanceof MessageError) e.header = header;
    throw e;
  }
}

function decodeChecked(header: Header, payload: Uint8Array, fds: number[]): Message {
  const what = reqName(header.code);
  const expected = SIZES[header.code];
  if (expected === undefined) throw new MessageError(`unknown request ${header.code}`);
  const reader = new Reader(payload, what);
  const size = typeof expected === "number" ? expected : expected(reader);
  if (payload.byteLength !== size) {
    throw new MessageError(`${what}: payload is ${payload.byteLength} bytes, expected ${size}`);
  }
  const body = decodeBody(header.code, reader, what);
  const [min, max] = allowedFds(header.code, body);
  if (fds.length < min || fds.length > max) {
    const want = min === max ? `${min}` : `${min}..${max}`;
    throw new MessageError(`${what}: carries ${fds.length} fds, expected ${want}`);
  }
  return { header, needReply: (header.flags & FLAG_NEED_REPLY) !== 0, body, fds };
}

// ---- encoding ----

export function encodeHeader(code: number, flags: number, size: number): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + size);
  const v = new DataView(out.buffer);
  v.setUint32(0, code, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
  return out;
}

/** A reply message: the request's code, version 1 and the REPLY flag, then `payload`. */
export function encodeReply(code: number, payload: Uint8Array): Uint8Array {
  const out = encodeHeader(code, VERSION | FLAG_REPLY, payload.byteLength);
  out.set(payload, HEADER_SIZE);
  return out;
}

/** VhostUserInflight: mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16 (24 bytes, padded). */
export function inflightBytes(mmapSize: number, mmapOffset: number, numQueues: number, queueSize: number): Uint8Array {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(mmapSize), true);
  v.setBigUint64(8, BigInt(mmapOffset), true);
  v.setUint16(16, numQueues, true);
  v.setUint16(18, queueSize, true);
  return b;
}

export function u64Bytes(value: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(value), true);
  return b;
}

export function vringStateBytes(index: number, num: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return b;
}

export function configBytes(offset: number, flags: number, data: Uint8Array): Uint8Array {
  const b = new Uint8Array(12 + data.byteLength);
  const v = new DataView(b.buffer);
  v.setUint32(0, offset, true);
  v.setUint32(4, data.byteLength, true);
  v.setUint32(8, flags, true);
  b.set(data, 12);
  return b;
}
