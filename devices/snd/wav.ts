// WAV files for the file backend: a writer for playback streams (RIFF sizes fixed up when the
// caller finalizes, e.g. on release or SIGTERM; an append mode that continues an existing file of
// the same format) and a reader for capture streams (silence after the end). Plain synchronous
// node:fs calls: the files are local and each call moves one period.
//
// Formats: U8 and S16 (<= 2 channels) as WAVE_FORMAT_PCM, FLOAT (<= 2 channels) as
// WAVE_FORMAT_IEEE_FLOAT (with the fact chunk non-PCM formats need), everything wider or with
// more channels as WAVE_FORMAT_EXTENSIBLE. virtio's S24 is ALSA S24_LE: 24 bits in the LOW three
// bytes of a 4-byte container, while WAVE_FORMAT_EXTENSIBLE with 24 valid bits in 32 keeps them
// in the HIGH three bytes; the writer shifts left by 8 and the reader shifts back (arithmetic).
import { closeSync, fstatSync, ftruncateSync, openSync, readSync, writeSync } from "node:fs";
import * as P from "./protocol.ts";
import { fixedCaps, formatInfo, rateIndex, silenceByte, type PcmCaps } from "./formats.ts";
import { waveChannelMask } from "./chmap.ts";

const WAVE_FORMAT_PCM = 0x0001;
const WAVE_FORMAT_IEEE_FLOAT = 0x0003;
const WAVE_FORMAT_EXTENSIBLE = 0xfffe;
/** KSDATAFORMAT_SUBTYPE_* GUIDs after their first two bytes (the format tag): -0000-0010-8000-00aa00389b71. */
const GUID_TAIL = [0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xaa, 0x00, 0x38, 0x9b, 0x71];
/** RIFF sizes are u32: the whole file may be at most 4 GiB - 1 + 8 bytes. */
const RIFF_MAX = 0xffffffff;
/** Chunks before `data` must lie in this many leading bytes (real headers are < 1 KiB). */
const HEADER_SCAN_BYTES = 64 * 1024;

export interface WavFormat {
  /** virtio FMT_*: U8, S16, S24 (4-byte container), S24_3, S32, FLOAT. */
  format: number;
  channels: number;
  rateHz: number;
}

export interface WavInfo extends WavFormat {
  /** Byte offset of the first sample and the data chunk's size (whole frames, as far as the file goes). */
  dataOffset: number;
  dataBytes: number;
  /** Offsets of the size fields to fix up on append. */
  riffSizeAt: number;
  dataSizeAt: number;
  factAt: number | null;
  /** The data chunk's size field said something other than what the file holds (an unfinished write). */
  sizeWasStale: boolean;
  /** Other chunks follow the data chunk (LIST, id3...): fine to read, impossible to append to. */
  trailingChunks: boolean;
}

/** How a format is stored: tag, container bits, valid bits. */
function layoutFor(f: WavFormat): { tag: number; subTag: number; bits: number; validBits: number; extensible: boolean } {
  const info = formatInfo(f.format);
  if (!info) throw new Error(`WAV: sample format ${f.format} is not supported`);
  const isFloat = info.kind === "float";
  const subTag = isFloat ? WAVE_FORMAT_IEEE_FLOAT : WAVE_FORMAT_PCM;
  const bits = info.bytes * 8;
  const extensible = f.channels > 2 || (!isFloat && bits > 16);
  return { tag: extensible ? WAVE_FORMAT_EXTENSIBLE : subTag, subTag, bits, validBits: info.validBits, extensible };
}

function checkFormat(f: WavFormat): void {
  if (!Number.isInteger(f.channels) || f.channels < 1 || f.channels > 8) throw new Error(`WAV: ${f.channels} channels (1-8 supported)`);
  if (rateIndex(f.rateHz) === null) throw new Error(`WAV: ${f.rateHz} Hz is not a virtio-snd rate`);
}

/** The header bytes for `f` with a data size of `dataBytes` (fact sample count follows from it). */
export function wavHeader(f: WavFormat, dataBytes: number): Uint8Array {
  checkFormat(f);
  const l = layoutFor(f);
  const blockAlign = (l.bits / 8) * f.channels;
  const fmtBytes = l.extensible ? 40 : l.subTag === WAVE_FORMAT_IEEE_FLOAT ? 18 : 16;
  const hasFact = l.subTag === WAVE_FORMAT_IEEE_FLOAT;
  const headerBytes = 12 + 8 + fmtBytes + (hasFact ? 12 : 0) + 8;
  const b = new Uint8Array(headerBytes);
  const dv = new DataView(b.buffer);
  const ascii = (off: number, s: string) => b.set(Buffer.from(s, "latin1"), off);
  const pad = dataBytes & 1;
  ascii(0, "RIFF");
  dv.setUint32(4, headerBytes - 8 + dataBytes + pad, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  dv.setUint32(16, fmtBytes, true);
  dv.setUint16(20, l.tag, true);
  dv.setUint16(22, f.channels, true);
  dv.setUint32(24, f.rateHz, true);
  dv.setUint32(28, f.rateHz * blockAlign, true);
  dv.setUint16(32, blockAlign, true);
  dv.setUint16(34, l.bits, true);
  let off = 36;
  if (fmtBytes >= 18) {
    dv.setUint16(36, fmtBytes - 18, true);
    off = 38;
  }
  if (l.extensible) {
    dv.setUint16(38, l.validBits, true);
    dv.setUint32(40, waveChannelMask(f.channels), true);
    dv.setUint16(44, l.subTag, true);
    b.set(GUID_TAIL, 46);
    off = 60;
  }
  if (hasFact) {
    ascii(off, "fact");
    dv.setUint32(off + 4, 4, true);
    dv.setUint32(off + 8, Math.floor(dataBytes / blockAlign), true);
    off += 12;
  }
  ascii(off, "data");
  dv.setUint32(off + 4, dataBytes, true);
  return b;
}

function fileSize(fd: number): number {
  return fstatSync(fd).size;
}

function readAt(fd: number, len: number, pos: number): Uint8Array {
  const b = new Uint8Array(len);
  let got = 0;
  while (got < len) {
    const n = readSync(fd, b, got, len - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  return b.subarray(0, got);
}

function looksLikeChunk(b: Uint8Array): boolean {
  return b.length >= 8 && [0, 1, 2, 3].every((i) => b[i]! >= 0x20 && b[i]! < 0x7f);
}

/** Parses an open WAV file's header; throws a message naming `path` for anything it cannot serve. */
function parseWav(fd: number, path: string): WavInfo {
  const size = fileSize(fd);
  const head = readAt(fd, Math.min(size, HEADER_SCAN_BYTES), 0);
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const id = (off: number) => Buffer.from(head.subarray(off, off + 4)).toString("latin1");
  if (head.length < 12 || id(0) !== "RIFF" || id(8) !== "WAVE") throw new Error(`${path}: not a RIFF/WAVE file`);
  let off = 12;
  let fmt: WavFormat | null = null;
  let blockAlign = 0;
  let factAt: number | null = null;
  while (off + 8 <= head.length) {
    const cid = id(off);
    const csize = dv.getUint32(off + 4, true);
    if (cid === "data") {
      if (!fmt) throw new Error(`${path}: data chunk before the fmt chunk`);
      const dataOffset = off + 8;
      const onDisk = size - dataOffset;
      let dataBytes = csize;
      let stale = false;
      let trailingChunks = false;
      if (csize === 0 || csize === RIFF_MAX || csize > onDisk) {
        dataBytes = onDisk;
        stale = csize !== onDisk;
      } else {
        const end = dataOffset + csize + (csize & 1);
        if (end < size) {
          const after = readAt(fd, 8, end);
          if (looksLikeChunk(after)) {
            trailingChunks = true;
          } else {
            dataBytes = onDisk;
            stale = true;
          }
        }
      }
      dataBytes -= dataBytes % blockAlign;
      return { ...fmt, dataOffset, dataBytes, riffSizeAt: 4, dataSizeAt: off + 4, factAt, sizeWasStale: stale, trailingChunks };
    }
    if ((cid === "fmt " || cid === "fact") && off + 8 + csize > head.length) throw new Error(`${path}: truncated ${cid.trim()} chunk`);
    if (cid === "fmt ") {
      if (csize < 16) throw new Error(`${path}: fmt chunk of ${csize} bytes`);
      const tag = dv.getUint16(off + 8, true);
      const channels = dv.getUint16(off + 10, true);
      const rateHz = dv.getUint32(off + 12, true);
      blockAlign = dv.getUint16(off + 20, true);
      const bits = dv.getUint16(off + 22, true);
      let subTag = tag;
      let validBits = bits;
      if (tag === WAVE_FORMAT_EXTENSIBLE) {
        if (csize < 40) throw new Error(`${path}: WAVE_FORMAT_EXTENSIBLE fmt chunk of ${csize} bytes`);
        validBits = dv.getUint16(off + 26, true) || bits;
        subTag = dv.getUint16(off + 32, true);
        if (!GUID_TAIL.every((v, i) => head[off + 34 + i] === v)) throw new Error(`${path}: unknown WAVE_FORMAT_EXTENSIBLE sub-format`);
      }
      const format = formatFromWave(subTag, bits, validBits);
      if (format === null) throw new Error(`${path}: ${describe(subTag, bits, validBits)} is not supported (use U8, S16, S24, S32 or 32-bit float PCM)`);
      if (blockAlign !== (bits / 8) * channels) throw new Error(`${path}: block align ${blockAlign} does not match ${channels} × ${bits} bits`);
      fmt = { format, channels, rateHz };
      checkFormatFor(path, fmt);
    } else if (cid === "fact") {
      factAt = off + 8;
    }
    off += 8 + csize + (csize & 1);
  }
  throw new Error(`${path}: no data chunk in the first ${HEADER_SCAN_BYTES} bytes`);
}

function checkFormatFor(path: string, f: WavFormat): void {
  try {
    checkFormat(f);
  } catch (e) {
    throw new Error(`${path}: ${(e as Error).message.replace(/^WAV: /, "")}`);
  }
}

function describe(tag: number, bits: number, validBits: number): string {
  const kind = tag === WAVE_FORMAT_PCM ? "PCM" : tag === WAVE_FORMAT_IEEE_FLOAT ? "float" : `format tag 0x${tag.toString(16)}`;
  return `${kind} with ${validBits} bits in ${bits}`;
}

function formatFromWave(tag: number, bits: number, validBits: number): number | null {
  if (tag === WAVE_FORMAT_IEEE_FLOAT) return bits === 32 && validBits === 32 ? P.FMT_FLOAT : null;
  if (tag !== WAVE_FORMAT_PCM) return null;
  if (bits === 8 && validBits === 8) return P.FMT_U8;
  if (bits === 16 && validBits === 16) return P.FMT_S16;
  if (bits === 24 && validBits === 24) return P.FMT_S24_3;
  if (bits === 32 && validBits === 24) return P.FMT_S24;
  if (bits === 32 && validBits === 32) return P.FMT_S32;
  return null;
}

function sameFormat(a: WavFormat, b: WavFormat): boolean {
  return a.format === b.format && a.channels === b.channels && a.rateHz === b.rateHz;
}

export function describeWavFormat(f: WavFormat): string {
  return `${formatInfo(f.format)?.name ?? `format ${f.format}`}, ${f.channels} ch, ${f.rateHz} Hz`;
}

/** What a capture stream fed by this file offers: exactly its format, rate and channel count. */
export function wavCaps(f: WavFormat): PcmCaps {
  return fixedCaps(f.format, rateIndex(f.rateHz)!, f.channels);
}

/** Reads and checks the header only: for validating --capture-file before the socket exists. */
export function readWavInfo(path: string): WavInfo {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw new Error(`${path}: cannot open (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  try {
    return parseWav(fd, path);
  } finally {
    closeSync(fd);
  }
}

/** S24_LE (low 24 bits) <-> WAVE 24-in-32 (high 24 bits). */
function shiftS24(buf: Uint8Array, left: boolean): void {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = buf.length - (buf.length % 4);
  for (let i = 0; i < n; i += 4) dv.setInt32(i, left ? dv.getInt32(i, true) << 8 : dv.getInt32(i, true) >> 8, true);
}

export interface WavWriterOptions {
  /** Continue an existing file of the same format (created when missing); otherwise truncate. */
  append?: boolean;
  /** Stop growing after this many data bytes (crosvm's playback_size); the RIFF limit applies anyway. */
  maxDataBytes?: number;
}

export class WavWriter {
  private fd: number;
  private readonly blockAlign: number;
  private readonly sampleBytes: number;
  private readonly limit: number;
  private info: WavInfo;
  /** A partial sample carried to the next write (guests send whole frames; this keeps S24 aligned anyway). */
  private carry = new Uint8Array(0);
  /** Data bytes refused because the file is full. */
  dropped = 0;

  private constructor(readonly path: string, readonly format: WavFormat, fd: number, info: WavInfo, maxDataBytes: number) {
    this.fd = fd;
    this.info = info;
    this.sampleBytes = formatInfo(format.format)!.bytes;
    this.blockAlign = this.sampleBytes * format.channels;
    const riffRoom = RIFF_MAX - (info.dataOffset - 8) - 1;
    this.limit = Math.min(maxDataBytes, riffRoom) - (Math.min(maxDataBytes, riffRoom) % this.blockAlign);
  }

  static open(path: string, format: WavFormat, o: WavWriterOptions = {}): WavWriter {
    checkFormat(format);
    layoutFor(format);
    const max = o.maxDataBytes ?? Number.MAX_SAFE_INTEGER;
    if (o.append) {
      let fd: number;
      try {
        fd = openSync(path, "r+");
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw new Error(`${path}: cannot open for appending (${(e as NodeJS.ErrnoException).code})`);
        return WavWriter.open(path, format, { ...o, append: false });
      }
      try {
        if (fileSize(fd) === 0) return WavWriter.fresh(path, format, fd, max);
        const info = parseWav(fd, path);
        if (info.trailingChunks) throw new Error(`${path}: chunks follow the data chunk; cannot append to it (use another file)`);
        if (!sameFormat(info, format)) {
          throw new Error(`${path}: holds ${describeWavFormat(info)}, the stream plays ${describeWavFormat(format)}; use another file or delete it`);
        }
        const w = new WavWriter(path, format, fd, info, max);
        ftruncateSync(fd, info.dataOffset + info.dataBytes); // drop a pad byte or a partial frame
        return w;
      } catch (e) {
        closeSync(fd);
        throw e;
      }
    }
    return WavWriter.fresh(path, format, openSync(path, "w+"), max);
  }

  private static fresh(path: string, format: WavFormat, fd: number, max: number): WavWriter {
    const header = wavHeader(format, 0);
    ftruncateSync(fd, 0);
    writeSync(fd, header, 0, header.length, 0);
    const l = layoutFor(format);
    const dataSizeAt = header.length - 4;
    const factAt = l.subTag === WAVE_FORMAT_IEEE_FLOAT ? dataSizeAt - 8 : null;
    const info: WavInfo = { ...format, dataOffset: header.length, dataBytes: 0, riffSizeAt: 4, dataSizeAt, factAt, sizeWasStale: false, trailingChunks: false };
    return new WavWriter(path, format, fd, info, max);
  }

  get dataBytes(): number {
    return this.info.dataBytes;
  }

  get full(): boolean {
    return this.info.dataBytes >= this.limit;
  }

  /** Appends interleaved samples in the stream's format (the caller's buffer is not changed); returns the bytes taken. */
  write(data: Uint8Array): number {
    if (this.fd < 0) throw new Error(`${this.path}: written after finalize`);
    let buf = data;
    if (this.carry.length > 0) {
      buf = new Uint8Array(this.carry.length + data.length);
      buf.set(this.carry);
      buf.set(data, this.carry.length);
    }
    const whole = buf.length - (buf.length % this.sampleBytes);
    const room = this.limit - this.info.dataBytes;
    const n = Math.min(whole, Math.max(0, room - (room % this.sampleBytes)));
    const refused = whole - n;
    this.dropped += refused;
    this.carry = refused === 0 ? buf.slice(whole) : new Uint8Array(0);
    if (n === 0) return Math.max(0, data.length - refused);
    let out = buf.subarray(0, n);
    if (this.format.format === P.FMT_S24) {
      out = out.slice();
      shiftS24(out, true);
    }
    let done = 0;
    while (done < n) done += writeSync(this.fd, out, done, n - done, this.info.dataOffset + this.info.dataBytes + done);
    this.info.dataBytes += n;
    return Math.max(0, data.length - refused);
  }

  /** Writes the RIFF, data and fact sizes for what has been written so far (safe to call any time). */
  updateHeader(): void {
    if (this.fd < 0) return;
    const data = this.info.dataBytes;
    const pad = data & 1;
    const sizes = new DataView(new ArrayBuffer(4));
    const put = (at: number, v: number) => {
      sizes.setUint32(0, v, true);
      writeSync(this.fd, new Uint8Array(sizes.buffer), 0, 4, at);
    };
    put(this.info.riffSizeAt, this.info.dataOffset - 8 + data + pad);
    put(this.info.dataSizeAt, data);
    if (this.info.factAt !== null) put(this.info.factAt, Math.floor(data / this.blockAlign));
    if (pad) writeSync(this.fd, new Uint8Array(1), 0, 1, this.info.dataOffset + data);
    ftruncateSync(this.fd, this.info.dataOffset + data + pad);
  }

  /** Bytes the file holds after updateHeader() (header, data, pad byte). */
  get expectedFileSize(): number {
    return this.info.dataOffset + this.info.dataBytes + (this.info.dataBytes & 1);
  }

  /** Closes without touching the file (another writer continued it, e.g. a restored backend). */
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }

  /** Fixes the sizes and closes the file. */
  finalize(): void {
    if (this.fd < 0) return;
    this.updateHeader();
    closeSync(this.fd);
    this.fd = -1;
  }
}

export class WavReader {
  private fd: number;
  private pos = 0;

  private constructor(readonly path: string, readonly info: WavInfo, fd: number) {
    this.fd = fd;
  }

  static open(path: string): WavReader {
    const fd = openSync(path, "r");
    try {
      return new WavReader(path, parseWav(fd, path), fd);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  get format(): WavFormat {
    return { format: this.info.format, channels: this.info.channels, rateHz: this.info.rateHz };
  }

  get eof(): boolean {
    return this.pos >= this.info.dataBytes;
  }

  /**
   * Fills all of `dst` with the next frames in the stream's format (S24 converted back to the low
   * bytes), silence once the data ends; returns how many bytes came from the file.
   */
  read(dst: Uint8Array): number {
    const want = Math.min(dst.length, this.info.dataBytes - this.pos);
    let got = 0;
    if (want > 0 && this.fd >= 0) {
      while (got < want) {
        const n = readSync(this.fd, dst, got, want - got, this.info.dataOffset + this.pos + got);
        if (n === 0) break;
        got += n;
      }
      this.pos += got;
      if (this.info.format === P.FMT_S24) shiftS24(dst.subarray(0, got), false);
    }
    dst.fill(silenceByte(this.info.format), got);
    return got;
  }

  /** Starts over at the first frame (a stream prepared again reads the file again). */
  rewind(): void {
    this.pos = 0;
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
