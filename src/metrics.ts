// Counters, gauges and histograms that every thread of the process updates without locks, and
// their rendering in the Prometheus/OpenMetrics text format.
//
// All of a process's metrics live in one SharedArrayBuffer, handed to every thread at its start
// (attachMetrics). A series (a metric name with its labels) is registered once, under a short
// spin lock on the buffer, by whichever thread first asks for it; its descriptor (kind, name,
// labels, help) and its values are then in the buffer, so any thread — the one serving /metrics
// included — can read it without messages. Updates take no lock: each series has one writer (a
// queue's series is updated by the thread that serves the queue, a session's by the device
// thread), and values are float64 slots (integers exact to 2^53), read whole by an x86-64 load.
//
// Latencies cost two clock reads per request (a few percent of a fast request's CPU), so they are
// measured only once something reads them: the metrics endpoint, or a test (timeLatencies).
//
// Layout: Int32 header [lock, entries, string bytes used, value slots used, latencies timed], then MAX_ENTRIES
// descriptors of ENTRY_INTS Int32 each, then the string bytes (UTF-8), then the Float64 values.

/** "shared": a counter several threads add to (Atomics on an int64 slot; for rare events). */
export type MetricKind = "counter" | "gauge" | "histogram" | "shared";
const KIND_CODE: Record<MetricKind, number> = { counter: 1, gauge: 2, histogram: 3, shared: 4 };
const KIND_NAME: Record<number, MetricKind> = { 1: "counter", 2: "gauge", 3: "histogram", 4: "shared" };

const HEADER_INTS = 5;
const H_LOCK = 0;
const H_ENTRIES = 1;
const H_STRINGS = 2;
const H_VALUES = 3;
const H_TIMED = 4;
// kind, name off/len, labels off/len, help off/len, first value slot, histogram bound count
const ENTRY_INTS = 9;
const MAX_ENTRIES = 1024;
const STRING_BYTES = 64 * 1024;
const VALUE_SLOTS = 8192;

const ENTRIES_OFF = HEADER_INTS * 4;
const STRINGS_OFF = ENTRIES_OFF + MAX_ENTRIES * ENTRY_INTS * 4;
const VALUES_OFF = (STRINGS_OFF + STRING_BYTES + 7) & ~7;
export const METRICS_BUFFER_BYTES = VALUES_OFF + VALUE_SLOTS * 8;

export type Labels = Readonly<Record<string, string | number>>;

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function escapeHelp(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

/** Labels in the exposition's syntax, in the order given: `queue="0",type="read"`. */
function labelText(labels: Labels): string {
  return Object.entries(labels)
    .map(([k, v]) => {
      if (!LABEL_RE.test(k) || k.startsWith("__")) throw new Error(`bad metric label name '${k}'`);
      return `${k}="${escapeLabelValue(String(v))}"`;
    })
    .join(",");
}

export class Counter {
  constructor(private readonly values: Float64Array, private readonly slot: number) {}
  inc(n = 1): void {
    this.values[this.slot] += n;
  }
  get value(): number {
    return this.values[this.slot]!;
  }
}

export class Gauge {
  constructor(private readonly values: Float64Array, private readonly slot: number) {}
  set(v: number): void {
    this.values[this.slot] = v;
  }
  inc(n = 1): void {
    this.values[this.slot] += n;
  }
  dec(n = 1): void {
    this.values[this.slot] -= n;
  }
  get value(): number {
    return this.values[this.slot]!;
  }
}

/** A counter any thread may add to: one atomic add per increment (guest errors, broken rings). */
export class SharedCounter {
  constructor(private readonly values: BigInt64Array, private readonly slot: number) {}
  inc(n = 1): void {
    Atomics.add(this.values, this.slot, BigInt(n));
  }
  get value(): number {
    return Number(Atomics.load(this.values, this.slot));
  }
}

/**
 * Slots: the n upper bounds, then n+1 bucket counts (the last is +Inf), then the sum. Counts are
 * per bucket (one increment per observation); rendering makes them cumulative.
 */
export class Histogram {
  private readonly bounds: Float64Array;
  constructor(private readonly values: Float64Array, private readonly slot: number, private readonly n: number) {
    this.bounds = values.subarray(slot, slot + n);
  }
  observe(v: number): void {
    let i = 0;
    const b = this.bounds;
    while (i < this.n && v > b[i]!) i++;
    this.values[this.slot + this.n + i] += 1;
    this.values[this.slot + 2 * this.n + 1] += v;
  }
  get count(): number {
    let c = 0;
    for (let i = 0; i <= this.n; i++) c += this.values[this.slot + this.n + i]!;
    return c;
  }
  get sum(): number {
    return this.values[this.slot + 2 * this.n + 1]!;
  }
}

/** Latency buckets in seconds: 10 µs to 1 s. */
export const LATENCY_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1];

interface Entry {
  kind: MetricKind;
  name: string;
  labels: string;
  help: string;
  slot: number;
  bounds: number;
}

export class MetricsRegistry {
  readonly buffer: SharedArrayBuffer;
  private readonly header: Int32Array;
  private readonly entries: Int32Array;
  private readonly strings: Uint8Array;
  private readonly values: Float64Array;
  private readonly ints: BigInt64Array;
  /** This thread's handles by key, so asking twice costs no lock. */
  private readonly mine = new Map<string, Counter | Gauge | Histogram | SharedCounter>();
  private full = false;

  constructor(buffer?: SharedArrayBuffer) {
    this.buffer = buffer ?? new SharedArrayBuffer(METRICS_BUFFER_BYTES);
    if (this.buffer.byteLength !== METRICS_BUFFER_BYTES) throw new Error("metrics buffer of the wrong size");
    this.header = new Int32Array(this.buffer, 0, HEADER_INTS);
    this.entries = new Int32Array(this.buffer, ENTRIES_OFF, MAX_ENTRIES * ENTRY_INTS);
    this.strings = new Uint8Array(this.buffer, STRINGS_OFF, STRING_BYTES);
    this.values = new Float64Array(this.buffer, VALUES_OFF, VALUE_SLOTS);
    this.ints = new BigInt64Array(this.buffer, VALUES_OFF, VALUE_SLOTS);
  }

  /** Whether latency histograms are being fed: threads read this when they set up a queue. */
  get latenciesTimed(): boolean {
    return Atomics.load(this.header, H_TIMED) !== 0;
  }

  /** Starts feeding latency histograms (queues set up from now on time their requests). */
  timeLatencies(): void {
    Atomics.store(this.header, H_TIMED, 1);
  }

  /** A counter several threads may add to (rendered as a counter; each add is atomic). */
  sharedCounter(name: string, help: string, labels: Labels = {}): SharedCounter {
    return this.series("shared", name, help, labels, []) as SharedCounter;
  }

  /** A counter (name without `_total`: the exposition adds it). */
  counter(name: string, help: string, labels: Labels = {}): Counter {
    return this.series("counter", name, help, labels, []) as Counter;
  }

  gauge(name: string, help: string, labels: Labels = {}): Gauge {
    return this.series("gauge", name, help, labels, []) as Gauge;
  }

  /** A histogram with the given upper bounds (ascending; +Inf is implied). */
  histogram(name: string, help: string, labels: Labels = {}, bounds: readonly number[] = LATENCY_BUCKETS): Histogram {
    return this.series("histogram", name, help, labels, bounds) as Histogram;
  }

  private series(kind: MetricKind, name: string, help: string, labels: Labels, bounds: readonly number[]): Counter | Gauge | Histogram | SharedCounter {
    if (!NAME_RE.test(name)) throw new Error(`bad metric name '${name}'`);
    if ((kind === "counter" || kind === "shared") && name.endsWith("_total")) throw new Error(`counter '${name}': give the name without _total`);
    const lt = labelText(labels);
    const key = `${kind} ${name}{${lt}}`;
    const known = this.mine.get(key);
    if (known !== undefined) return known;
    let slot = -1;
    this.lock();
    try {
      const n = this.header[H_ENTRIES]!;
      for (let i = 0; i < n; i++) {
        const e = this.entry(i);
        if (e.name !== name) continue;
        if (e.kind !== kind) throw new Error(`metric ${name} is a ${e.kind}, not a ${kind}`);
        if (e.labels === lt) {
          slot = e.slot;
          break;
        }
      }
      if (slot < 0) slot = this.add(kind, name, lt, help, bounds);
    } finally {
      this.unlock();
    }
    if (slot < 0) {
      // Buffer full: count into a private slot rather than fail the device; the gap shows as a
      // missing series (and the registry says so once).
      if (!this.full) console.error(`metrics: no room for ${key}; it is not exported`);
      this.full = true;
      const scratch = new Float64Array(2 * bounds.length + 2);
      scratch.set(bounds);
      return this.handle(kind, scratch, new BigInt64Array(scratch.buffer), 0, bounds.length);
    }
    const h = this.handle(kind, this.values, this.ints, slot, bounds.length);
    this.mine.set(key, h);
    return h;
  }

  private handle(kind: MetricKind, values: Float64Array, ints: BigInt64Array, slot: number, n: number): Counter | Gauge | Histogram | SharedCounter {
    if (kind === "shared") return new SharedCounter(ints, slot);
    return kind === "counter" ? new Counter(values, slot) : kind === "gauge" ? new Gauge(values, slot) : new Histogram(values, slot, n);
  }

  /** A series' value as a number: float64 slots, or the int64 of a shared counter. */
  private valueOf(e: Entry): number {
    return e.kind === "shared" ? Number(Atomics.load(this.ints, e.slot)) : this.values[e.slot]!;
  }

  /**
   * Registration's lock: held for microseconds, so waiting is a short spin. A thread terminated
   * while holding it (a stuck queue thread is replaced) would leave it held: after 100 ms the
   * waiter takes it over.
   */
  private lock(): void {
    let deadline = 0;
    while (Atomics.compareExchange(this.header, H_LOCK, 0, 1) !== 0) {
      const now = performance.now();
      if (deadline === 0) deadline = now + 100;
      else if (now > deadline) return;
    }
  }

  private unlock(): void {
    Atomics.store(this.header, H_LOCK, 0);
  }

  /** Appends a descriptor (under the lock); -1 when the buffer is full. */
  private add(kind: MetricKind, name: string, labels: string, help: string, bounds: readonly number[]): number {
    const n = this.header[H_ENTRIES]!;
    const slots = kind === "histogram" ? 2 * bounds.length + 2 : 1;
    const enc = new TextEncoder();
    const bytes = [enc.encode(name), enc.encode(labels), enc.encode(help)];
    const stringBytes = bytes.reduce((a, b) => a + b.length, 0);
    const s0 = this.header[H_STRINGS]!;
    const v0 = this.header[H_VALUES]!;
    if (n >= MAX_ENTRIES || s0 + stringBytes > STRING_BYTES || v0 + slots > VALUE_SLOTS) return -1;
    const base = n * ENTRY_INTS;
    let s = s0;
    this.entries[base] = KIND_CODE[kind];
    bytes.forEach((b, i) => {
      this.strings.set(b, s);
      this.entries[base + 1 + 2 * i] = s;
      this.entries[base + 2 + 2 * i] = b.length;
      s += b.length;
    });
    this.entries[base + 7] = v0;
    this.entries[base + 8] = kind === "histogram" ? bounds.length : 0;
    for (let i = 0; i < bounds.length; i++) {
      if (i > 0 && !(bounds[i]! > bounds[i - 1]!)) throw new Error(`histogram ${name}: bounds must ascend`);
      this.values[v0 + i] = bounds[i]!;
    }
    this.header[H_STRINGS] = s;
    this.header[H_VALUES] = v0 + slots;
    Atomics.store(this.header, H_ENTRIES, n + 1); // published: readers see only complete entries
    return v0;
  }

  private str(off: number, len: number): string {
    // TextDecoder refuses views on shared memory: copy the bytes out first.
    return new TextDecoder().decode(this.strings.slice(off, off + len));
  }

  private entry(i: number): Entry {
    const b = i * ENTRY_INTS;
    const e = this.entries;
    return {
      kind: KIND_NAME[e[b]!]!,
      name: this.str(e[b + 1]!, e[b + 2]!),
      labels: this.str(e[b + 3]!, e[b + 4]!),
      help: this.str(e[b + 5]!, e[b + 6]!),
      slot: e[b + 7]!,
      bounds: e[b + 8]!,
    };
  }

  /** The value of one series (tests, the session summary): counter/gauge value, histogram count. */
  read(name: string, labels: Labels = {}): number | undefined {
    const lt = labelText(labels);
    const n = Atomics.load(this.header, H_ENTRIES);
    for (let i = 0; i < n; i++) {
      const e = this.entry(i);
      if (e.name !== name || e.labels !== lt) continue;
      if (e.kind !== "histogram") return this.valueOf(e);
      let c = 0;
      for (let j = 0; j <= e.bounds; j++) c += this.values[e.slot + e.bounds + j]!;
      return c;
    }
    return undefined;
  }

  /** Sum of a metric's series whose labels include `match` (e.g. every queue's reads). */
  total(name: string, match: Labels = {}): number {
    const want = Object.entries(match).map(([k, v]) => `${k}="${escapeLabelValue(String(v))}"`);
    const n = Atomics.load(this.header, H_ENTRIES);
    let sum = 0;
    for (let i = 0; i < n; i++) {
      const e = this.entry(i);
      if (e.name !== name || e.kind === "histogram") continue;
      const have = e.labels === "" ? [] : e.labels.split(/,(?=[a-zA-Z_][a-zA-Z0-9_]*=")/);
      if (want.every((w) => have.includes(w))) sum += this.valueOf(e);
    }
    return sum;
  }

  /** Every counter summed over its series, by metric name (what a session did is the difference of two). */
  counterTotals(): Map<string, number> {
    const out = new Map<string, number>();
    const n = Atomics.load(this.header, H_ENTRIES);
    for (let i = 0; i < n; i++) {
      const e = this.entry(i);
      if (e.kind === "counter" || e.kind === "shared") out.set(e.name, (out.get(e.name) ?? 0) + this.valueOf(e));
    }
    return out;
  }

  /**
   * The exposition: OpenMetrics 1.0 (`openMetrics`, ends with `# EOF`) or the Prometheus text
   * format 0.0.4. Series of one metric are grouped under one HELP/TYPE, in registration order.
   */
  render(openMetrics = false): string {
    const n = Atomics.load(this.header, H_ENTRIES);
    const families = new Map<string, Entry[]>();
    for (let i = 0; i < n; i++) {
      const e = this.entry(i);
      const f = families.get(e.name);
      if (f) f.push(e);
      else families.set(e.name, [e]);
    }
    const out: string[] = [];
    const num = (v: number) => (v === Infinity ? "+Inf" : v === -Infinity ? "-Inf" : Number.isNaN(v) ? "NaN" : String(v));
    const withLabels = (labels: string, extra?: string) => {
      const all = [labels, extra].filter((x) => x !== undefined && x !== "").join(",");
      return all === "" ? "" : `{${all}}`;
    };
    for (const [name, series] of families) {
      const { kind, help } = series[0]!;
      const isCounter = kind === "counter" || kind === "shared";
      const family = isCounter && !openMetrics ? `${name}_total` : name;
      out.push(`# HELP ${family} ${escapeHelp(help)}`, `# TYPE ${family} ${isCounter ? "counter" : kind}`);
      for (const e of series) {
        const v = this.values;
        if (isCounter) out.push(`${name}_total${withLabels(e.labels)} ${num(this.valueOf(e))}`);
        else if (kind === "gauge") out.push(`${name}${withLabels(e.labels)} ${num(v[e.slot]!)}`);
        else {
          let cumulative = 0;
          for (let j = 0; j <= e.bounds; j++) {
            cumulative += v[e.slot + e.bounds + j]!;
            const le = j < e.bounds ? num(v[e.slot + j]!) : "+Inf";
            out.push(`${name}_bucket${withLabels(e.labels, `le="${le}"`)} ${num(cumulative)}`);
          }
          out.push(`${name}_count${withLabels(e.labels)} ${num(cumulative)}`);
          out.push(`${name}_sum${withLabels(e.labels)} ${num(v[e.slot + 2 * e.bounds + 1]!)}`);
        }
      }
    }
    if (openMetrics) out.push("# EOF");
    return out.join("\n") + "\n";
  }
}

let registry: MetricsRegistry | null = null;

/** This thread's view of the process's metrics (a private registry until attachMetrics). */
export function metrics(): MetricsRegistry {
  registry ??= new MetricsRegistry();
  return registry;
}

/** Makes this thread use the process's metrics buffer (called at a thread's start). */
export function attachMetrics(buffer: SharedArrayBuffer): MetricsRegistry {
  if (registry?.buffer !== buffer) registry = new MetricsRegistry(buffer);
  return registry;
}

export const OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8";
export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";
