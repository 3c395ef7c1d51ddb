// State a device thread shares with its queue threads, as one typed record over a
// SharedArrayBuffer: fields declared once (name → kind), read and written by name, with a version
// word that moves on every change and a wake-up for the threads that care.
//
// One writer (the device thread, which applies the driver's and the front-end's requests), any
// number of readers. Readers never see a torn field: every read of a multi-word field retries
// until the version shows no write overlapped it (a seqlock: odd while a write is under way).
// Counters are the exception: any thread adds to them (Atomics.add), they wake nobody and take
// no part in the version.
//
// Wake-ups: the record owns one eventfd per subscriber slot, made when the record is made (before
// any thread starts, so a thread opens nothing later). A thread subscribes with its own event
// loop; every change signals the claimed slots, and the subscriber's callback runs on its own
// thread at its loop's next turn. The record is plain data for postMessage (`shared`): its
// SharedArrayBuffer, with the slots' fds inside (fds are process-wide).
import { eventfd, signal, drain } from "../ffi/eventfd.ts";
import { EPOLLIN } from "../ffi/epoll.ts";
import { close } from "../ffi/libc.ts";
import type { EventLoop } from "./event_loop.ts";

/** A 32-bit signed integer. */
export interface I32Field {
  kind: "i32";
}
export interface BoolField {
  kind: "bool";
}
/** A fixed number of bytes (a MAC address, a table). */
export interface BytesField {
  kind: "bytes";
  length: number;
}
/** Counters any thread may add to (statistics); not versioned, wake nobody. */
export interface CountersField {
  kind: "counters";
  length: number;
}
export type Field = I32Field | BoolField | BytesField | CountersField;
export type Schema = Record<string, Field>;

export const i32: I32Field = { kind: "i32" };
export const bool: BoolField = { kind: "bool" };
export const bytes = (length: number): BytesField => ({ kind: "bytes", length });
export const counters = (length: number): CountersField => ({ kind: "counters", length });

type ValueOf<F extends Field> = F extends I32Field ? number : F extends BoolField ? boolean : F extends BytesField ? Uint8Array : never;
/** Names of the fields read and written whole (not counters). */
export type ValueKey<S extends Schema> = { [K in keyof S]: S[K] extends CountersField ? never : K }[keyof S] & string;
export type CounterKey<S extends Schema> = { [K in keyof S]: S[K] extends CountersField ? K : never }[keyof S] & string;

// Header words (Int32 indices).
const W_VERSION = 0;
const W_SLOTS = 1; // subscriber slot count
const W_SLOT_BASE = 2; // then per slot: [eventfd, claimed]
const MAX_SLOTS = 64;
const HEADER_WORDS = W_SLOT_BASE + 2 * MAX_SLOTS;
const MAX_READ_RETRIES = 100_000;

interface Placed {
  kind: Field["kind"];
  /** Int32 word index (i32, bool, counters) or byte offset (bytes). */
  at: number;
  length: number;
}

/** Where each field lives: the same for every thread, computed from the schema alone. */
function layout(schema: Schema): { fields: Map<string, Placed>; size: number } {
  const fields = new Map<string, Placed>();
  let word = HEADER_WORDS;
  for (const [name, f] of Object.entries(schema)) {
    if (f.kind === "i32" || f.kind === "bool") fields.set(name, { kind: f.kind, at: word++, length: 1 });
    else if (f.kind === "counters") {
      if (!Number.isInteger(f.length) || f.length < 1) throw new Error(`shared record: counters ${name} of length ${f.length}`);
      fields.set(name, { kind: f.kind, at: word, length: f.length });
      word += f.length;
    }
  }
  let byte = 4 * word;
  for (const [name, f] of Object.entries(schema)) {
    if (f.kind !== "bytes") continue;
    if (!Number.isInteger(f.length) || f.length < 1) throw new Error(`shared record: bytes ${name} of length ${f.length}`);
    fields.set(name, { kind: f.kind, at: byte, length: f.length });
    byte += f.length;
  }
  return { fields, size: Math.ceil(byte / 8) * 8 };
}

/** What crosses to another thread (postMessage): the buffer, with the wake fds inside it. */
export interface SharedRecordData {
  sab: SharedArrayBuffer;
}

export class SharedRecord<S extends Schema> {
  private readonly i32: Int32Array;
  private readonly u8: Uint8Array;
  private readonly fields: Map<string, Placed>;
  private readonly owner: boolean;
  /** This thread is inside update(): its own reads need no retry. */
  private writing = false;

  private constructor(readonly schema: S, sab: SharedArrayBuffer | null, slots: number) {
    const { fields, size } = layout(schema);
    this.fields = fields;
    this.owner = sab === null;
    const buf = sab ?? new SharedArrayBuffer(size);
    if (buf.byteLength !== size) throw new Error(`shared record: a buffer of ${buf.byteLength} bytes, the schema needs ${size}`);
    this.i32 = new Int32Array(buf);
    this.u8 = new Uint8Array(buf);
    if (this.owner) {
      if (!Number.isInteger(slots) || slots < 0 || slots > MAX_SLOTS) throw new Error(`shared record: ${slots} subscriber slots (0..${MAX_SLOTS})`);
      const made: number[] = [];
      try {
        for (let i = 0; i < slots; i++) made.push(eventfd());
      } catch (e) {
        made.forEach(close);
        throw e;
      }
      made.forEach((fd, i) => {
        this.i32[W_SLOT_BASE + 2 * i] = fd;
      });
      Atomics.store(this.i32, W_SLOTS, slots);
    }
  }

  /** A new record (all fields zero) with `subscribers` wake-up slots: one per thread that will subscribe. */
  static create<S extends Schema>(schema: S, subscribers = 0): SharedRecord<S> {
    return new SharedRecord(schema, null, subscribers);
  }

  /** The same record seen from another thread (from `shared`); the schema must be the creator's. */
  static attach<S extends Schema>(schema: S, data: SharedRecordData): SharedRecord<S> {
    return new SharedRecord(schema, data.sab, 0);
  }

  /** Plain data for postMessage. */
  get shared(): SharedRecordData {
    return { sab: this.i32.buffer as SharedArrayBuffer };
  }

  /** Moves on every change (even between changes); compare it to see whether anything changed. */
  get version(): number {
    return Atomics.load(this.i32, W_VERSION);
  }

  /** The field `name`, which must be a counters field (`counters`) or a value field (not counters). */
  private field(name: string, counters: boolean): Placed {
    const f = this.fields.get(name);
    if (f === undefined || (f.kind === "counters") !== counters) throw new Error(`shared record: no ${counters ? "counters" : "value"} field ${name}`);
    return f;
  }

  get<K extends ValueKey<S>>(name: K): ValueOf<S[K]> {
    const f = this.field(name, false);
    if (f.kind === "i32") return Atomics.load(this.i32, f.at) as ValueOf<S[K]>;
    if (f.kind === "bool") return (Atomics.load(this.i32, f.at) !== 0) as ValueOf<S[K]>;
    // A write takes a few stores; a writer that died mid-write (a terminated thread) must not
    // hang its readers, so after a bounded number of retries the bytes are taken as they are.
    for (let tries = 0; ; tries++) {
      const v = Atomics.load(this.i32, W_VERSION);
      const out = this.u8.slice(f.at, f.at + f.length);
      if (this.writing || tries >= MAX_READ_RETRIES || ((v & 1) === 0 && Atomics.load(this.i32, W_VERSION) === v)) return out as ValueOf<S[K]>;
    }
  }

  /** Writes one field; readers see the change, subscribers are woken. Device thread only. */
  set<K extends ValueKey<S>>(name: K, value: ValueOf<S[K]>): void {
    this.update(() => this.write(name, value));
  }

  /**
   * Several writes as one change: readers see all of them or none (per field read), subscribers are
   * woken once. `fn` writes through the `write` it is given. Device thread only.
   */
  update(fn: (write: <K extends ValueKey<S>>(name: K, value: ValueOf<S[K]>) => void) => void): void {
    if (this.writing) throw new Error("shared record: update() inside update()");
    this.writing = true;
    Atomics.add(this.i32, W_VERSION, 1); // odd: writing
    try {
      fn((name, value) => this.write(name, value));
    } finally {
      Atomics.add(this.i32, W_VERSION, 1); // even again
      this.writing = false;
      this.wake();
    }
  }

  private write(name: string, value: unknown): void {
    const f = this.field(name, false);
    if (f.kind === "i32") {
      if (typeof value !== "number" || !Number.isInteger(value)) throw new Error(`shared record: ${name} takes an integer`);
      Atomics.store(this.i32, f.at, value);
    } else if (f.kind === "bool") {
      Atomics.store(this.i32, f.at, value ? 1 : 0);
    } else {
      const b = value as Uint8Array;
      if (!(b instanceof Uint8Array) || b.length > f.length) throw new Error(`shared record: ${name} takes at most ${f.length} bytes`);
      this.u8.set(b, f.at);
      this.u8.fill(0, f.at + b.length, f.at + f.length);
    }
  }

  /** Adds `delta` to counter `index` of `name` (any thread). */
  count<K extends CounterKey<S>>(name: K, index: number, delta = 1): void {
    const f = this.field(name, true);
    if (index >= 0 && index < f.length) Atomics.add(this.i32, f.at + index, delta);
  }

  /**
   * The counters of `name` as an Int32Array over the shared words, for a hot path that counts
   * per frame or request without looking the field up each time (use Atomics.add/load on it).
   */
  countersView<K extends CounterKey<S>>(name: K): Int32Array {
    const f = this.field(name, true);
    return this.i32.subarray(f.at, f.at + f.length);
  }

  counter<K extends CounterKey<S>>(name: K, index: number): number {
    const f = this.field(name, true);
    return index >= 0 && index < f.length ? Atomics.load(this.i32, f.at + index) : 0;
  }

  private wake(): void {
    const slots = Atomics.load(this.i32, W_SLOTS);
    for (let i = 0; i < slots; i++) {
      if (Atomics.load(this.i32, W_SLOT_BASE + 2 * i + 1) === 1) signal(this.i32[W_SLOT_BASE + 2 * i]!);
    }
  }

  /**
   * Calls `onChange` on `loop`'s thread after every change (several changes may share one call).
   * Takes a free wake-up slot; throws when all are taken. Returns the function that unsubscribes.
   */
  subscribe(loop: EventLoop, onChange: () => void): () => void {
    const slots = Atomics.load(this.i32, W_SLOTS);
    for (let i = 0; i < slots; i++) {
      if (Atomics.compareExchange(this.i32, W_SLOT_BASE + 2 * i + 1, 0, 1) !== 0) continue;
      const fd = this.i32[W_SLOT_BASE + 2 * i]!;
      drain(fd); // a wake meant for the slot's previous subscriber
      loop.add(fd, EPOLLIN, () => {
        drain(fd);
        onChange();
      });
      let live = true;
      return () => {
        if (!live) return;
        live = false;
        loop.remove(fd);
        Atomics.store(this.i32, W_SLOT_BASE + 2 * i + 1, 0);
      };
    }
    throw new Error(`shared record: all ${slots} subscriber slots are taken`);
  }

  /** Closes the wake-up fds (the creator, once no thread uses the record). */
  dispose(): void {
    if (!this.owner) return;
    const slots = Atomics.exchange(this.i32, W_SLOTS, 0);
    for (let i = 0; i < slots; i++) close(this.i32[W_SLOT_BASE + 2 * i]!);
  }
}
