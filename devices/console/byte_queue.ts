// A FIFO of bytes kept as a list of chunks: host input waiting for receive buffers, and host-side
// output waiting for a writable sink. Pushing copies; taking consumes from the front.
import { ChainWriter, type DescriptorChain } from "../../src/chain.ts";

export class ByteQueue {
  private chunks: Uint8Array[] = [];
  /** Bytes of chunks[0] already consumed. */
  private offset = 0;
  length = 0;

  /** Appends a copy of `bytes`. */
  push(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    this.chunks.push(bytes.slice());
    this.length += bytes.length;
  }

  /** The first contiguous run of queued bytes (a view; valid until the next change). */
  front(): Uint8Array {
    const c = this.chunks[0];
    return c === undefined ? new Uint8Array(0) : c.subarray(this.offset);
  }

  /** Drops `n` bytes from the front. */
  consume(n: number): void {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const left = c.length - this.offset;
      if (n < left) {
        this.offset += n;
        return;
      }
      n -= left;
      this.chunks.shift();
      this.offset = 0;
    }
  }

  /** Copies as much as fits into the chain's writable buffers and consumes it; returns the count. */
  drainInto(chain: DescriptorChain): number {
    const w = new ChainWriter(chain);
    while (this.length > 0 && w.remaining > 0) {
      const src = this.front();
      const n = w.write(src);
      if (n === 0) break;
      this.consume(n);
      if (n < src.length) break;
    }
    return w.written;
  }

  /** All queued bytes, copied into one array (for snapshots). */
  toBytes(): Uint8Array {
    const out = new Uint8Array(this.length);
    let o = 0;
    for (let i = 0; i < this.chunks.length; i++) {
      const c = i === 0 ? this.chunks[0]!.subarray(this.offset) : this.chunks[i]!;
      out.set(c, o);
      o += c.length;
    }
    return out;
  }

  /** Puts `bytes` in front of what is queued (restored input precedes input read since). */
  unshift(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    if (this.offset > 0) {
      this.chunks[0] = this.chunks[0]!.subarray(this.offset);
      this.offset = 0;
    }
    this.chunks.unshift(bytes.slice());
    this.length += bytes.length;
  }

  clear(): void {
    this.chunks = [];
    this.offset = 0;
    this.length = 0;
  }
}
