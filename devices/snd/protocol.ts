// The virtio-snd wire format (virtio 1.2 §5.14, plus the virtio 1.3 control elements): constants,
// and one strict decoder and one encoder per message. Every decoder checks lengths and ids first,
// so a short, oversized or out-of-range message becomes a status for the reply, never a throw or a
// read past the buffer. Encoders exist for both sides (the device's replies and the driver's
// requests) so tests can play the driver with the same layouts. Nothing here touches queues.

// ---- feature bits, queues, directions ----

/** Feature bit number of VIRTIO_SND_F_CTLS (control elements; virtio 1.3). */
export const VIRTIO_SND_F_CTLS = 0;
export const VIRTIO_SND_F_CTLS_BIT = 1n << BigInt(VIRTIO_SND_F_CTLS);

export const VQ_CONTROL = 0;
export const VQ_EVENT = 1;
export const VQ_TX = 2;
export const VQ_RX = 3;
export const NUM_QUEUES = 4;

export const D_OUTPUT = 0;
export const D_INPUT = 1;
export type Direction = typeof D_OUTPUT | typeof D_INPUT;

// ---- request, event and status codes ----

export const R_JACK_INFO = 0x0001;
export const R_JACK_REMAP = 0x0002;
export const R_PCM_INFO = 0x0100;
export const R_PCM_SET_PARAMS = 0x0101;
export const R_PCM_PREPARE = 0x0102;
export const R_PCM_RELEASE = 0x0103;
export const R_PCM_START = 0x0104;
export const R_PCM_STOP = 0x0105;
export const R_CHMAP_INFO = 0x0200;
export const R_CTL_INFO = 0x0300;
export const R_CTL_ENUM_ITEMS = 0x0301;
export const R_CTL_READ = 0x0302;
export const R_CTL_WRITE = 0x0303;
export const R_CTL_TLV_READ = 0x0304;
export const R_CTL_TLV_WRITE = 0x0305;
export const R_CTL_TLV_COMMAND = 0x0306;

export const EVT_JACK_CONNECTED = 0x1000;
export const EVT_JACK_DISCONNECTED = 0x1001;
export const EVT_PCM_PERIOD_ELAPSED = 0x1100;
export const EVT_PCM_XRUN = 0x1101;
export const EVT_CTL_NOTIFY = 0x1200;

export const S_OK = 0x8000;
export const S_BAD_MSG = 0x8001;
export const S_NOT_SUPP = 0x8002;
export const S_IO_ERR = 0x8003;
export type SndStatus = typeof S_OK | typeof S_BAD_MSG | typeof S_NOT_SUPP | typeof S_IO_ERR;

// ---- PCM features, formats, rates ----

export const PCM_F_SHMEM_HOST = 0;
export const PCM_F_SHMEM_GUEST = 1;
export const PCM_F_MSG_POLLING = 2;
export const PCM_F_EVT_SHMEM_PERIODS = 3;
export const PCM_F_EVT_XRUNS = 4;
/** Feature bits the spec defines; anything else in SET_PARAMS is a malformed request. */
export const PCM_F_DEFINED_MASK = 0x1f;

export const FMT_IMA_ADPCM = 0;
export const FMT_MU_LAW = 1;
export const FMT_A_LAW = 2;
export const FMT_S8 = 3;
export const FMT_U8 = 4;
export const FMT_S16 = 5;
export const FMT_U16 = 6;
export const FMT_S18_3 = 7;
export const FMT_U18_3 = 8;
export const FMT_S20_3 = 9;
export const FMT_U20_3 = 10;
export const FMT_S24_3 = 11;
export const FMT_U24_3 = 12;
export const FMT_S20 = 13;
export const FMT_U20 = 14;
/** 24 valid bits in the low three bytes of a 32-bit little-endian container (ALSA S24_LE). */
export const FMT_S24 = 15;
export const FMT_U24 = 16;
export const FMT_S32 = 17;
export const FMT_U32 = 18;
export const FMT_FLOAT = 19;
export const FMT_FLOAT64 = 20;
export const FMT_DSD_U8 = 21;
export const FMT_DSD_U16 = 22;
export const FMT_DSD_U32 = 23;
export const FMT_IEC958_SUBFRAME = 24;
export const FMT_COUNT = 25;

export const RATE_5512 = 0;
export const RATE_8000 = 1;
export const RATE_11025 = 2;
export const RATE_16000 = 3;
export const RATE_22050 = 4;
export const RATE_32000 = 5;
export const RATE_44100 = 6;
export const RATE_48000 = 7;
export const RATE_64000 = 8;
export const RATE_88200 = 9;
export const RATE_96000 = 10;
export const RATE_176400 = 11;
export const RATE_192000 = 12;
export const RATE_384000 = 13;
/** virtio 1.3 added these two; Linux's driver (6.x) does not know them yet. */
export const RATE_12000 = 14;
export const RATE_24000 = 15;
export const RATE_COUNT = 16;

// ---- jacks, channel maps, controls ----

export const JACK_F_REMAP = 0;

export const CHMAP_NONE = 0;
export const CHMAP_NA = 1;
export const CHMAP_MONO = 2;
export const CHMAP_FL = 3;
export const CHMAP_FR = 4;
export const CHMAP_RL = 5;
export const CHMAP_RR = 6;
export const CHMAP_FC = 7;
export const CHMAP_LFE = 8;
export const CHMAP_SL = 9;
export const CHMAP_SR = 10;
export const CHMAP_RC = 11;
/** Positions up to BRC (36) are defined. */
export const CHMAP_LAST = 36;
export const CHMAP_MAX_SIZE = 18;

export const CTL_ROLE_UNDEFINED = 0;
export const CTL_ROLE_VOLUME = 1;
export const CTL_ROLE_MUTE = 2;
export const CTL_ROLE_GAIN = 3;

export const CTL_TYPE_BOOLEAN = 0;
export const CTL_TYPE_INTEGER = 1;
export const CTL_TYPE_INTEGER64 = 2;
export const CTL_TYPE_ENUMERATED = 3;
export const CTL_TYPE_BYTES = 4;
export const CTL_TYPE_IEC958 = 5;

export const CTL_ACCESS_READ = 0;
export const CTL_ACCESS_WRITE = 1;
export const CTL_ACCESS_VOLATILE = 2;
export const CTL_ACCESS_INACTIVE = 3;
export const CTL_ACCESS_TLV_READ = 4;
export const CTL_ACCESS_TLV_WRITE = 5;
export const CTL_ACCESS_TLV_COMMAND = 6;

export const CTL_EVT_MASK_VALUE = 0;
export const CTL_EVT_MASK_INFO = 1;
export const CTL_EVT_MASK_TLV = 2;

/** The spec's limit for a TLV payload the driver submits. */
export const CTL_TLV_MAX_BYTES = 65536;

/** `role` as the spec packs it: the direction in bit 0, the role above it. */
export function ctlRole(role: number, direction: Direction): number {
  return role === CTL_ROLE_UNDEFINED ? 0 : ((role << 1) | direction) >>> 0;
}

// ---- sizes ----

export const HDR_BYTES = 4;
export const EVENT_BYTES = 8;
export const QUERY_INFO_BYTES = 16;
export const JACK_HDR_BYTES = 8;
export const JACK_REMAP_BYTES = 16;
export const PCM_HDR_BYTES = 8;
export const PCM_SET_PARAMS_BYTES = 24;
export const PCM_XFER_BYTES = 4;
export const PCM_STATUS_BYTES = 8;
export const CHMAP_HDR_BYTES = 8;
export const CTL_HDR_BYTES = 8;
export const JACK_INFO_BYTES = 24;
export const PCM_INFO_BYTES = 32;
export const CHMAP_INFO_BYTES = 24;
/** C layout on x86_64/arm64: the value union holds le64s, so it starts at 72 (4 padding bytes after name). */
export const CTL_INFO_BYTES = 96;
/** The same struct where u64 is 4-aligned (i386 guests): the union follows name directly. */
export const CTL_INFO_PACKED_BYTES = 92;
export const CTL_NAME_BYTES = 44;
export const CTL_ENUM_ITEM_BYTES = 64;
export const CTL_VALUE_BYTES = 512;
export const CTL_EVENT_BYTES = 8;
export const CONFIG_BYTES = 16;
/** Without VIRTIO_SND_F_CTLS the config space ends after `chmaps` (QEMU sizes it so). */
export const CONFIG_BYTES_NO_CTLS = 12;
/** A driver's `size` per item in query_info; anything larger is not a struct any version defines. */
export const QUERY_ITEM_MAX_BYTES = 4096;

// ---- little-endian helpers ----

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A `size`-byte struct whose leading fields are the le32 `words`, in order; the rest is zero. */
function le32Struct(size: number, words: readonly number[]): Uint8Array {
  const b = new Uint8Array(size);
  const dv = view(b);
  words.forEach((w, i) => dv.setUint32(4 * i, w, true));
  return b;
}

function u64Write(dv: DataView, off: number, v: number | bigint): void {
  dv.setBigUint64(off, BigInt.asUintN(64, BigInt(v)), true);
}

/** Writes `s` as a 0-terminated ASCII string in a `len`-byte field (truncated to len-1). */
function writeCString(b: Uint8Array, off: number, len: number, s: string): void {
  const bytes = Buffer.from(s, "latin1");
  const n = Math.min(bytes.length, len - 1);
  b.set(bytes.subarray(0, n), off);
  b.fill(0, off + n, off + len);
}

function readCString(b: Uint8Array, off: number, len: number): string {
  const field = b.subarray(off, off + len);
  const end = field.indexOf(0);
  return Buffer.from(end < 0 ? field : field.subarray(0, end)).toString("latin1");
}

// ---- config space ----

export interface SndConfig {
  jacks: number;
  streams: number;
  chmaps: number;
  /** Only meaningful with VIRTIO_SND_F_CTLS. */
  controls: number;
}

/** The config space: 16 bytes with CTLS offered, 12 without (the `controls` field does not exist then). */
export function encodeConfig(c: SndConfig, ctls: boolean): Uint8Array {
  if (!ctls) return le32Struct(CONFIG_BYTES_NO_CTLS, [c.jacks, c.streams, c.chmaps]);
  return le32Struct(CONFIG_BYTES, [c.jacks, c.streams, c.chmaps, c.controls]);
}

export function decodeConfig(b: Uint8Array): SndConfig {
  if (b.length !== CONFIG_BYTES && b.length !== CONFIG_BYTES_NO_CTLS) throw new Error(`config space of ${b.length} bytes`);
  const dv = view(b);
  return { jacks: dv.getUint32(0, true), streams: dv.getUint32(4, true), chmaps: dv.getUint32(8, true), controls: b.length === CONFIG_BYTES ? dv.getUint32(12, true) : 0 };
}

// ---- control requests (driver -> device, controlq) ----

/** What ids a request may name; `controls: null` means CTLS was not negotiated (CTL_* are NOT_SUPP). */
export interface SndLimits {
  jacks: number;
  streams: number;
  chmaps: number;
  controls: number | null;
}

export type QueryCode = typeof R_JACK_INFO | typeof R_PCM_INFO | typeof R_CHMAP_INFO | typeof R_CTL_INFO;
export type PcmCode = typeof R_PCM_PREPARE | typeof R_PCM_RELEASE | typeof R_PCM_START | typeof R_PCM_STOP;
export type CtlCode = typeof R_CTL_ENUM_ITEMS | typeof R_CTL_READ | typeof R_CTL_TLV_READ;

export interface QueryInfo { kind: "query"; code: QueryCode; startId: number; count: number; size: number }
export interface JackRemap { kind: "jack_remap"; code: typeof R_JACK_REMAP; jackId: number; association: number; sequence: number }
/** A stream's parameters, as VIRTIO_SND_R_PCM_SET_PARAMS carries them. */
export interface PcmParams {
  bufferBytes: number;
  periodBytes: number;
  /** PCM_F_* bits the driver selected (a subset of the stream's). */
  features: number;
  channels: number;
  format: number;
  rate: number;
}
export interface PcmSetParams extends PcmParams {
  kind: "set_params";
  code: typeof R_PCM_SET_PARAMS;
  streamId: number;
}
export interface PcmCommand { kind: "pcm"; code: PcmCode; streamId: number }
export interface CtlCommand { kind: "ctl"; code: CtlCode; controlId: number }
export interface CtlWrite { kind: "ctl_write"; code: typeof R_CTL_WRITE; controlId: number; value: Uint8Array }
export interface CtlTlvWrite { kind: "ctl_tlv"; code: typeof R_CTL_TLV_WRITE | typeof R_CTL_TLV_COMMAND; controlId: number; tlv: Uint8Array }
export type SndRequest = QueryInfo | JackRemap | PcmSetParams | PcmCommand | CtlCommand | CtlWrite | CtlTlvWrite;

export type Decoded<T> = { ok: true; value: T } | { ok: false; status: SndStatus; error: string };

function bad(error: string): { ok: false; status: SndStatus; error: string } {
  return { ok: false, status: S_BAD_MSG, error };
}
function notSupp(error: string): { ok: false; status: SndStatus; error: string } {
  return { ok: false, status: S_NOT_SUPP, error };
}

function hex(code: number): string {
  return `0x${code.toString(16).padStart(4, "0")}`;
}

function exact(b: Uint8Array, n: number, what: string): string | null {
  return b.length === n ? null : `${what}: ${b.length} bytes, expected ${n}`;
}

/**
 * The id after the code of a request that must be exactly `size` bytes, checked to be below
 * `count` (`what` names the request, `item` what the id counts, in the error).
 */
function decodeId(b: Uint8Array, size: number, what: string, item: string, count: number): Decoded<number> {
  const e = exact(b, size, what);
  if (e) return bad(e);
  const id = view(b).getUint32(4, true);
  return id < count ? { ok: true, value: id } : bad(`${what}: ${item} ${id} of ${count}`);
}

/** The code of a request, or null when fewer than 4 bytes came. */
export function requestCode(b: Uint8Array): number | null {
  return b.length < HDR_BYTES ? null : view(b).getUint32(0, true);
}

function queryTotal(code: QueryCode, l: SndLimits): number {
  switch (code) {
    case R_JACK_INFO: return l.jacks;
    case R_PCM_INFO: return l.streams;
    case R_CHMAP_INFO: return l.chmaps;
    case R_CTL_INFO: return l.controls ?? 0;
  }
}

/**
 * Decodes the device-readable part of a control request (all its readable descriptors, joined).
 * Lengths must match the request exactly; ids must be below the counts in `limits`.
 */
export function decodeRequest(b: Uint8Array, limits: SndLimits): Decoded<SndRequest> {
  const code = requestCode(b);
  if (code === null) return bad(`request of ${b.length} bytes has no header`);
  const dv = view(b);
  const isCtl = code >= R_CTL_INFO && code <= R_CTL_TLV_COMMAND;
  if (isCtl && limits.controls === null) return notSupp(`request ${hex(code)}: control elements were not negotiated`);
  switch (code) {
    case R_JACK_INFO:
    case R_PCM_INFO:
    case R_CHMAP_INFO:
    case R_CTL_INFO: {
      const e = exact(b, QUERY_INFO_BYTES, "query_info");
      if (e) return bad(e);
      const startId = dv.getUint32(4, true);
      const count = dv.getUint32(8, true);
      const size = dv.getUint32(12, true);
      const total = queryTotal(code, limits);
      if (startId > total || count > total - startId) return bad(`query ${hex(code)}: items ${startId}+${count} beyond ${total}`);
      if (size < HDR_BYTES || size > QUERY_ITEM_MAX_BYTES) return bad(`query ${hex(code)}: item size ${size}`);
      return { ok: true, value: { kind: "query", code, startId, count, size } };
    }
    case R_JACK_REMAP: {
      const id = decodeId(b, JACK_REMAP_BYTES, "jack_remap", "jack", limits.jacks);
      if (!id.ok) return id;
      return { ok: true, value: { kind: "jack_remap", code, jackId: id.value, association: dv.getUint32(8, true), sequence: dv.getUint32(12, true) } };
    }
    case R_PCM_SET_PARAMS: {
      const id = decodeId(b, PCM_SET_PARAMS_BYTES, "pcm_set_params", "stream", limits.streams);
      if (!id.ok) return id;
      return {
        ok: true,
        value: {
          kind: "set_params", code, streamId: id.value,
          bufferBytes: dv.getUint32(8, true),
          periodBytes: dv.getUint32(12, true),
          features: dv.getUint32(16, true),
          channels: b[20]!,
          format: b[21]!,
          rate: b[22]!,
        },
      };
    }
    case R_PCM_PREPARE:
    case R_PCM_RELEASE:
    case R_PCM_START:
    case R_PCM_STOP: {
      const id = decodeId(b, PCM_HDR_BYTES, `pcm ${hex(code)}`, "stream", limits.streams);
      if (!id.ok) return id;
      return { ok: true, value: { kind: "pcm", code, streamId: id.value } };
    }
    case R_CTL_ENUM_ITEMS:
    case R_CTL_READ:
    case R_CTL_TLV_READ: {
      const id = decodeId(b, CTL_HDR_BYTES, `ctl ${hex(code)}`, "control", limits.controls!);
      if (!id.ok) return id;
      return { ok: true, value: { kind: "ctl", code, controlId: id.value } };
    }
    case R_CTL_WRITE: {
      const id = decodeId(b, CTL_HDR_BYTES + CTL_VALUE_BYTES, "ctl_write", "control", limits.controls!);
      if (!id.ok) return id;
      return { ok: true, value: { kind: "ctl_write", code, controlId: id.value, value: b.slice(CTL_HDR_BYTES) } };
    }
    case R_CTL_TLV_WRITE:
    case R_CTL_TLV_COMMAND: {
      if (b.length < CTL_HDR_BYTES + 8) return bad(`ctl tlv ${hex(code)}: ${b.length} bytes, shorter than header and TLV header`);
      const controlId = dv.getUint32(4, true);
      if (controlId >= limits.controls!) return bad(`ctl tlv ${hex(code)}: control ${controlId} of ${limits.controls}`);
      const tlv = b.subarray(CTL_HDR_BYTES);
      const length = dv.getUint32(CTL_HDR_BYTES + 4, true);
      if (length > CTL_TLV_MAX_BYTES || length % 4 !== 0 || tlv.length !== 8 + length) {
        return bad(`ctl tlv ${hex(code)}: TLV length ${length} does not match its ${tlv.length - 8} payload bytes`);
      }
      return { ok: true, value: { kind: "ctl_tlv", code, controlId, tlv: tlv.slice() } };
    }
    default:
      return notSupp(`unknown request ${hex(code)}`);
  }
}

/**
 * The smallest device-writable part a request needs, beyond which the device writes nothing; a
 * chain with less is malformed. ENUM_ITEMS needs more (items × 64), which only the control knows.
 */
export function minResponseBytes(r: SndRequest): number {
  if (r.kind === "query") return HDR_BYTES + r.count * r.size;
  if (r.kind === "ctl" && r.code === R_CTL_READ) return HDR_BYTES + CTL_VALUE_BYTES;
  return HDR_BYTES;
}

// Request encoders (the driver's side; tests and tools).

export function encodeQueryInfo(code: QueryCode, startId: number, count: number, size: number): Uint8Array {
  return le32Struct(QUERY_INFO_BYTES, [code, startId, count, size]);
}

export function encodeJackRemap(jackId: number, association: number, sequence: number): Uint8Array {
  return le32Struct(JACK_REMAP_BYTES, [R_JACK_REMAP, jackId, association, sequence]);
}

export function encodePcmSetParams(p: Omit<PcmSetParams, "kind" | "code">): Uint8Array {
  const b = le32Struct(PCM_SET_PARAMS_BYTES, [R_PCM_SET_PARAMS, p.streamId, p.bufferBytes, p.periodBytes, p.features]);
  b[20] = p.channels;
  b[21] = p.format;
  b[22] = p.rate;
  return b;
}

export function encodePcmHdr(code: PcmCode, streamId: number): Uint8Array {
  return le32Struct(PCM_HDR_BYTES, [code, streamId]);
}

export function encodeCtlHdr(code: CtlCode | typeof R_CTL_WRITE | typeof R_CTL_TLV_WRITE | typeof R_CTL_TLV_COMMAND, controlId: number): Uint8Array {
  return le32Struct(CTL_HDR_BYTES, [code, controlId]);
}

export function encodeCtlWrite(controlId: number, value: Uint8Array): Uint8Array {
  if (value.length !== CTL_VALUE_BYTES) throw new Error(`ctl value of ${value.length} bytes`);
  const b = new Uint8Array(CTL_HDR_BYTES + CTL_VALUE_BYTES);
  b.set(encodeCtlHdr(R_CTL_WRITE, controlId));
  b.set(value, CTL_HDR_BYTES);
  return b;
}

// ---- replies and item information (device -> driver) ----

/** A reply that is only a status (virtio_snd_hdr). */
export function encodeHdr(status: SndStatus): Uint8Array {
  const b = new Uint8Array(HDR_BYTES);
  view(b).setUint32(0, status, true);
  return b;
}

/**
 * A query_info reply: the status, then each item in a slot of the driver's `size` bytes (a smaller
 * driver struct gets the leading bytes, a larger one zeros after ours: the spec's "size for
 * backward compatibility").
 */
export function encodeQueryReply(items: readonly Uint8Array[], size: number): Uint8Array {
  const b = new Uint8Array(HDR_BYTES + items.length * size);
  view(b).setUint32(0, S_OK, true);
  items.forEach((item, i) => b.set(item.subarray(0, Math.min(size, item.length)), HDR_BYTES + i * size));
  return b;
}

export interface JackInfo {
  nid: number;
  features: number;
  defconf: number;
  caps: number;
  connected: boolean;
}

export function encodeJackInfo(j: JackInfo): Uint8Array {
  const b = le32Struct(JACK_INFO_BYTES, [j.nid, j.features, j.defconf, j.caps]);
  b[16] = j.connected ? 1 : 0;
  return b;
}

export function decodeJackInfo(b: Uint8Array): JackInfo {
  if (b.length < JACK_INFO_BYTES) throw new Error(`jack_info of ${b.length} bytes`);
  const dv = view(b);
  return { nid: dv.getUint32(0, true), features: dv.getUint32(4, true), defconf: dv.getUint32(8, true), caps: dv.getUint32(12, true), connected: b[16] !== 0 };
}

export interface PcmInfo {
  nid: number;
  features: number;
  /** Bit map of 1 << FMT_*. */
  formats: number;
  /** Bit map of 1 << RATE_*. */
  rates: number;
  direction: Direction;
  channelsMin: number;
  channelsMax: number;
}

export function encodePcmInfo(p: PcmInfo): Uint8Array {
  const b = new Uint8Array(PCM_INFO_BYTES);
  const dv = view(b);
  dv.setUint32(0, p.nid, true);
  dv.setUint32(4, p.features, true);
  u64Write(dv, 8, p.formats);
  u64Write(dv, 16, p.rates);
  b[24] = p.direction;
  b[25] = p.channelsMin;
  b[26] = p.channelsMax;
  return b;
}

export function decodePcmInfo(b: Uint8Array): PcmInfo {
  if (b.length < PCM_INFO_BYTES) throw new Error(`pcm_info of ${b.length} bytes`);
  const dv = view(b);
  return {
    nid: dv.getUint32(0, true),
    features: dv.getUint32(4, true),
    formats: Number(dv.getBigUint64(8, true)),
    rates: Number(dv.getBigUint64(16, true)),
    direction: b[24] === D_INPUT ? D_INPUT : D_OUTPUT,
    channelsMin: b[25]!,
    channelsMax: b[26]!,
  };
}

export interface ChmapInfo {
  nid: number;
  direction: Direction;
  /** CHMAP_* per channel, at most CHMAP_MAX_SIZE. */
  positions: readonly number[];
}

export function encodeChmapInfo(c: ChmapInfo): Uint8Array {
  if (c.positions.length > CHMAP_MAX_SIZE) throw new Error(`channel map of ${c.positions.length} channels`);
  const b = new Uint8Array(CHMAP_INFO_BYTES);
  view(b).setUint32(0, c.nid, true);
  b[4] = c.direction;
  b[5] = c.positions.length;
  b.set(c.positions, 6);
  return b;
}

export function decodeChmapInfo(b: Uint8Array): ChmapInfo {
  if (b.length < CHMAP_INFO_BYTES) throw new Error(`chmap_info of ${b.length} bytes`);
  const n = Math.min(b[5]!, CHMAP_MAX_SIZE);
  return { nid: view(b).getUint32(0, true), direction: b[4] === D_INPUT ? D_INPUT : D_OUTPUT, positions: Array.from(b.subarray(6, 6 + n)) };
}

export interface CtlInfo {
  nid: number;
  /** Packed with ctlRole(). */
  role: number;
  type: number;
  /** Bit map of 1 << CTL_ACCESS_*. */
  access: number;
  count: number;
  index: number;
  name: string;
  /** INTEGER/INTEGER64 range (step 0: variable); ENUMERATED: items in `items`. */
  min?: number;
  max?: number;
  step?: number;
  items?: number;
}

/** Where the value union starts for a driver that says its ctl_info is `size` bytes. */
function ctlValueOffset(size: number): number {
  return size === CTL_INFO_PACKED_BYTES ? 68 : 72;
}

export function encodeCtlInfo(c: CtlInfo, size = CTL_INFO_BYTES): Uint8Array {
  const b = new Uint8Array(Math.max(size, CTL_INFO_PACKED_BYTES));
  const dv = view(b);
  dv.setUint32(0, c.nid, true);
  dv.setUint32(4, c.role, true);
  dv.setUint32(8, c.type, true);
  dv.setUint32(12, c.access, true);
  dv.setUint32(16, c.count, true);
  dv.setUint32(20, c.index, true);
  writeCString(b, 24, CTL_NAME_BYTES, c.name);
  const v = ctlValueOffset(size);
  if (c.type === CTL_TYPE_INTEGER) {
    dv.setInt32(v, c.min ?? 0, true);
    dv.setInt32(v + 4, c.max ?? 0, true);
    dv.setInt32(v + 8, c.step ?? 0, true);
  } else if (c.type === CTL_TYPE_INTEGER64) {
    dv.setBigInt64(v, BigInt(c.min ?? 0), true);
    dv.setBigInt64(v + 8, BigInt(c.max ?? 0), true);
    dv.setBigInt64(v + 16, BigInt(c.step ?? 0), true);
  } else if (c.type === CTL_TYPE_ENUMERATED) {
    dv.setUint32(v, c.items ?? 0, true);
  }
  return b;
}

export function decodeCtlInfo(b: Uint8Array, size = CTL_INFO_BYTES): CtlInfo {
  if (b.length < CTL_INFO_PACKED_BYTES) throw new Error(`ctl_info of ${b.length} bytes`);
  const dv = view(b);
  const c: CtlInfo = {
    nid: dv.getUint32(0, true),
    role: dv.getUint32(4, true),
    type: dv.getUint32(8, true),
    access: dv.getUint32(12, true),
    count: dv.getUint32(16, true),
    index: dv.getUint32(20, true),
    name: readCString(b, 24, CTL_NAME_BYTES),
  };
  const v = ctlValueOffset(size);
  if (c.type === CTL_TYPE_INTEGER) {
    c.min = dv.getInt32(v, true);
    c.max = dv.getInt32(v + 4, true);
    c.step = dv.getInt32(v + 8, true);
  } else if (c.type === CTL_TYPE_INTEGER64) {
    c.min = Number(dv.getBigInt64(v, true));
    c.max = Number(dv.getBigInt64(v + 8, true));
    c.step = Number(dv.getBigInt64(v + 16, true));
  } else if (c.type === CTL_TYPE_ENUMERATED) {
    c.items = dv.getUint32(v, true);
  }
  return c;
}

export function encodeCtlEnumItem(name: string): Uint8Array {
  const b = new Uint8Array(CTL_ENUM_ITEM_BYTES);
  writeCString(b, 0, CTL_ENUM_ITEM_BYTES, name);
  return b;
}

export function decodeCtlEnumItem(b: Uint8Array): string {
  if (b.length < CTL_ENUM_ITEM_BYTES) throw new Error(`ctl_enum_item of ${b.length} bytes`);
  return readCString(b, 0, CTL_ENUM_ITEM_BYTES);
}

/** virtio_snd_ctl_value for BOOLEAN/INTEGER/ENUMERATED elements: `count` le32 members, zeros after. */
export function encodeCtlValue32(values: readonly number[]): Uint8Array {
  if (values.length > CTL_VALUE_BYTES / 4) throw new Error(`${values.length} control values`);
  const b = new Uint8Array(CTL_VALUE_BYTES);
  const dv = view(b);
  values.forEach((v, i) => dv.setInt32(i * 4, v, true));
  return b;
}

/** The first `count` le32 members of a virtio_snd_ctl_value (signed, as ALSA's integer values are). */
export function decodeCtlValue32(b: Uint8Array, count: number): number[] {
  if (b.length !== CTL_VALUE_BYTES) throw new Error(`ctl value of ${b.length} bytes`);
  if (count > CTL_VALUE_BYTES / 4) throw new Error(`${count} control values`);
  const dv = view(b);
  return Array.from({ length: count }, (_, i) => dv.getInt32(i * 4, true));
}

/** A CTL_READ reply: status then the value. */
export function encodeCtlReadReply(value: Uint8Array): Uint8Array {
  const b = new Uint8Array(HDR_BYTES + CTL_VALUE_BYTES);
  view(b).setUint32(0, S_OK, true);
  b.set(value, HDR_BYTES);
  return b;
}

/** virtio_snd_ctl_tlv: type, length in bytes, le32 values. */
export function encodeTlv(type: number, values: readonly number[]): Uint8Array {
  const b = new Uint8Array(8 + values.length * 4);
  const dv = view(b);
  dv.setUint32(0, type, true);
  dv.setUint32(4, values.length * 4, true);
  values.forEach((v, i) => dv.setInt32(8 + i * 4, v, true));
  return b;
}

export function decodeTlv(b: Uint8Array): { type: number; values: number[] } {
  if (b.length < 8) throw new Error(`TLV of ${b.length} bytes`);
  const dv = view(b);
  const length = dv.getUint32(4, true);
  if (length % 4 !== 0 || 8 + length > b.length) throw new Error(`TLV length ${length} in ${b.length} bytes`);
  return { type: dv.getUint32(0, true), values: Array.from({ length: length / 4 }, (_, i) => dv.getInt32(8 + i * 4, true)) };
}

// ---- events (device -> driver, eventq) ----

export interface SndEvent {
  code: number;
  /** Jack id or stream id; for CTL_NOTIFY control_id | mask << 16. */
  data: number;
}

export function encodeEvent(e: SndEvent): Uint8Array {
  return le32Struct(EVENT_BYTES, [e.code, e.data >>> 0]);
}

export function decodeEvent(b: Uint8Array): SndEvent {
  if (b.length < EVENT_BYTES) throw new Error(`event of ${b.length} bytes`);
  const dv = view(b);
  return { code: dv.getUint32(0, true), data: dv.getUint32(4, true) };
}

/** VIRTIO_SND_EVT_CTL_NOTIFY: le16 control_id, le16 mask where a plain event has le32 data. */
export function ctlNotifyEvent(controlId: number, mask: number): SndEvent {
  if (controlId > 0xffff || mask > 0xffff) throw new Error(`ctl event ${controlId}/${mask} does not fit 16 bits`);
  return { code: EVT_CTL_NOTIFY, data: (controlId | (mask << 16)) >>> 0 };
}

export function decodeCtlEvent(b: Uint8Array): { controlId: number; mask: number } {
  if (b.length < CTL_EVENT_BYTES) throw new Error(`ctl event of ${b.length} bytes`);
  const dv = view(b);
  if (dv.getUint32(0, true) !== EVT_CTL_NOTIFY) throw new Error("not a CTL_NOTIFY event");
  return { controlId: dv.getUint16(4, true), mask: dv.getUint16(6, true) };
}

// ---- PCM I/O (txq, rxq) ----

export interface PcmXfer {
  streamId: number;
  /** PCM bytes: after the header (tx), or before the status (rx). */
  dataBytes: number;
}

function xferStream(head: Uint8Array, streamDirections: ArrayLike<number>, want: Direction, what: string): Decoded<number> {
  if (head.length < PCM_XFER_BYTES) return bad(`${what}: ${head.length} bytes, shorter than pcm_xfer`);
  const streamId = view(head).getUint32(0, true);
  if (streamId >= streamDirections.length) return bad(`${what}: stream ${streamId} of ${streamDirections.length}`);
  if (streamDirections[streamId] !== want) return bad(`${what}: stream ${streamId} is an ${want === D_OUTPUT ? "input" : "output"} stream`);
  return { ok: true, value: streamId };
}

/**
 * A txq chain: device-readable pcm_xfer then PCM bytes, device-writable pcm_status (exactly 8
 * bytes). `head` holds at least the first 4 readable bytes; lengths are the chain's totals.
 */
export function decodeTxXfer(head: Uint8Array, readableBytes: number, writableBytes: number, streamDirections: ArrayLike<number>): Decoded<PcmXfer> {
  if (readableBytes < PCM_XFER_BYTES || head.length < PCM_XFER_BYTES) return bad(`tx: ${readableBytes} readable bytes, shorter than pcm_xfer`);
  if (writableBytes !== PCM_STATUS_BYTES) return bad(`tx: ${writableBytes} writable bytes, expected a ${PCM_STATUS_BYTES}-byte pcm_status`);
  const s = xferStream(head, streamDirections, D_OUTPUT, "tx");
  if (!s.ok) return s;
  return { ok: true, value: { streamId: s.value, dataBytes: readableBytes - PCM_XFER_BYTES } };
}

/** An rxq chain: device-readable pcm_xfer (exactly 4 bytes), device-writable PCM bytes then pcm_status. */
export function decodeRxXfer(head: Uint8Array, readableBytes: number, writableBytes: number, streamDirections: ArrayLike<number>): Decoded<PcmXfer> {
  if (readableBytes !== PCM_XFER_BYTES || head.length < PCM_XFER_BYTES) return bad(`rx: ${readableBytes} readable bytes, expected a ${PCM_XFER_BYTES}-byte pcm_xfer`);
  if (writableBytes < PCM_STATUS_BYTES) return bad(`rx: ${writableBytes} writable bytes, shorter than pcm_status`);
  const s = xferStream(head, streamDirections, D_INPUT, "rx");
  if (!s.ok) return s;
  return { ok: true, value: { streamId: s.value, dataBytes: writableBytes - PCM_STATUS_BYTES } };
}

export function encodePcmXfer(streamId: number): Uint8Array {
  const b = new Uint8Array(PCM_XFER_BYTES);
  view(b).setUint32(0, streamId, true);
  return b;
}

export function encodePcmStatus(status: SndStatus, latencyBytes: number): Uint8Array {
  const b = new Uint8Array(PCM_STATUS_BYTES);
  const dv = view(b);
  dv.setUint32(0, status, true);
  dv.setUint32(4, Math.max(0, Math.min(0xffffffff, Math.round(latencyBytes))), true);
  return b;
}

export function decodePcmStatus(b: Uint8Array): { status: number; latencyBytes: number } {
  if (b.length < PCM_STATUS_BYTES) throw new Error(`pcm_status of ${b.length} bytes`);
  const dv = view(b);
  return { status: dv.getUint32(0, true), latencyBytes: dv.getUint32(4, true) };
}
