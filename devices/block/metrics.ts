// What a block queue counts for --metrics: requests by type, bytes moved, errors, requests in
// flight and a latency histogram, per queue (one writer: the thread serving the queue). Counting
// is a few float adds per request; the latency histogram needs two clock reads, so it is fed only
// when the registry says latencies are read (the metrics endpoint is up).
import { metrics, type Counter, type Gauge, type Histogram } from "../../src/metrics.ts";
import {
  VIRTIO_BLK_T, VIRTIO_BLK_S,
} from "./config.ts";

const TYPE_NAMES: Record<number, string> = {
  [VIRTIO_BLK_T.IN]: "read", [VIRTIO_BLK_T.OUT]: "write", [VIRTIO_BLK_T.FLUSH]: "flush", [VIRTIO_BLK_T.GET_ID]: "get_id",
  [VIRTIO_BLK_T.DISCARD]: "discard", [VIRTIO_BLK_T.WRITE_ZEROES]: "write_zeroes",
};

export class BlockQueueMetrics {
  /** Request counters indexed by type (types are small numbers; the rest count as "other"). */
  private readonly byType: Counter[] = [];
  private readonly other: Counter;
  private readonly readBytes: Counter;
  private readonly writtenBytes: Counter;
  private readonly ioErrors: Counter;
  private readonly unsupported: Counter;
  private readonly inFlight: Gauge;
  private readonly latency: Histogram;
  /** When each head in flight was taken (ms, performance.now()); heads are < the ring size. Empty
   * when latencies are not timed. */
  private readonly started: Float64Array;

  constructor(queue: number, ringSize: number) {
    const m = metrics();
    const q = { queue };
    this.other = m.counter("vhost_block_requests", "Block requests by type", { queue, type: "other" });
    const types = Object.keys(TYPE_NAMES).map(Number);
    for (let t = 0; t <= Math.max(...types); t++) {
      const name = TYPE_NAMES[t];
      this.byType.push(name === undefined ? this.other : m.counter("vhost_block_requests", "Block requests by type", { queue, type: name }));
    }
    this.readBytes = m.counter("vhost_block_read_bytes", "Bytes read for the guest", q);
    this.writtenBytes = m.counter("vhost_block_written_bytes", "Bytes written for the guest", q);
    this.ioErrors = m.counter("vhost_block_errors", "Requests completed with an error, by status", { queue, status: "ioerr" });
    this.unsupported = m.counter("vhost_block_errors", "Requests completed with an error, by status", { queue, status: "unsupp" });
    this.inFlight = m.gauge("vhost_block_in_flight", "Requests taken from the ring and not yet completed", q);
    this.latency = m.histogram("vhost_block_request_seconds", "Time from taking a request to completing it", q);
    this.started = new Float64Array(m.latenciesTimed ? ringSize : 0);
  }

  /** A request was taken from the ring. */
  begin(head: number): void {
    this.inFlight.inc();
    if (head < this.started.length) this.started[head] = performance.now();
  }

  /** Its header says what it is. */
  request(type: number): void {
    (type < this.byType.length ? this.byType[type]! : this.other).inc();
  }

  read(bytes: number): void {
    this.readBytes.inc(bytes);
  }

  written(bytes: number): void {
    this.writtenBytes.inc(bytes);
  }

  /** It completed with `status`. */
  end(head: number, status: number): void {
    this.inFlight.dec();
    if (status === VIRTIO_BLK_S.IOERR) this.ioErrors.inc();
    else if (status === VIRTIO_BLK_S.UNSUPP) this.unsupported.inc();
    if (head < this.started.length) this.latency.observe((performance.now() - this.started[head]!) / 1000);
  }
}
