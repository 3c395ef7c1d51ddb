// Metrics: series in one SharedArrayBuffer updated by several threads without locks, rendered in
// the OpenMetrics and Prometheus text formats and parsed back by the Prometheus project's own
// parsers (python3-prometheus-client, installed by test/e2e/setup.sh), served over a unix socket.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { MetricsRegistry, attachMetrics, metrics } from "../../src/metrics.ts";
import { parseMetricsAddress, serveMetrics } from "../../src/metrics_server.ts";
import { parseExposition, sampleValue } from "../support/metrics_parse.ts";

const dir = mkdtempSync(join(tmpdir(), "ops-metrics-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sample = sampleValue;

describe("metrics registry", () => {
  test("counters, gauges and histograms render as OpenMetrics and Prometheus text, as a real parser reads them", () => {
    const r = new MetricsRegistry();
    r.counter("vhost_block_requests", "Requests completed", { queue: 0, type: "read" }).inc(5);
    r.counter("vhost_block_requests", "Requests completed", { queue: 0, type: "write" }).inc(2);
    r.counter("vhost_sessions", "Front-end sessions accepted").inc();
    r.gauge("vhost_block_in_flight", "Requests in flight", { queue: 0 }).set(3);
    const h = r.histogram("vhost_block_latency_seconds", "Request latency", { queue: 0 }, [0.001, 0.01, 0.1]);
    for (const v of [0.0005, 0.002, 0.002, 0.05, 3]) h.observe(v);
    r.counter("vhost_odd", 'Help with a \\ backslash and\na newline', { path: 'a "quoted"\\path\n' }).inc(1);

    const om = parseExposition(r.render(true), "openmetrics");
    expect(om.families).toContainEqual(["vhost_block_requests", "counter", "Requests completed"]);
    expect(om.families).toContainEqual(["vhost_block_latency_seconds", "histogram", "Request latency"]);
    expect(sample(om, "vhost_block_requests_total", { queue: "0", type: "read" })).toBe(5);
    expect(sample(om, "vhost_block_requests_total", { queue: "0", type: "write" })).toBe(2);
    expect(sample(om, "vhost_sessions_total")).toBe(1);
    expect(sample(om, "vhost_block_in_flight", { queue: "0" })).toBe(3);
    expect(sample(om, "vhost_block_latency_seconds_bucket", { queue: "0", le: "0.001" })).toBe(1);
    expect(sample(om, "vhost_block_latency_seconds_bucket", { queue: "0", le: "0.01" })).toBe(3);
    expect(sample(om, "vhost_block_latency_seconds_bucket", { queue: "0", le: "0.1" })).toBe(4);
    expect(sample(om, "vhost_block_latency_seconds_bucket", { queue: "0", le: "+Inf" })).toBe(5);
    expect(sample(om, "vhost_block_latency_seconds_count", { queue: "0" })).toBe(5);
    expect(sample(om, "vhost_block_latency_seconds_sum", { queue: "0" })).toBeCloseTo(3.0545, 9);
    expect(sample(om, "vhost_odd_total", { path: 'a "quoted"\\path\n' })).toBe(1);
    expect(om.families).toContainEqual(["vhost_odd", "counter", "Help with a \\ backslash and\na newline"]);

    const prom = parseExposition(r.render(false), "prometheus");
    expect(sample(prom, "vhost_block_requests_total", { queue: "0", type: "read" })).toBe(5);
    expect(sample(prom, "vhost_block_latency_seconds_bucket", { queue: "0", le: "+Inf" })).toBe(5);
    expect(sample(prom, "vhost_odd_total", { path: 'a "quoted"\\path\n' })).toBe(1);
  });

  test("the parser is strict: a broken exposition is refused (the check can fail)", () => {
    expect(() => parseExposition("# TYPE x counter\nx_total 1\n", "openmetrics")).toThrow(/refused/); // no # EOF
    expect(() => parseExposition("# TYPE x counter\nx_total{a=\"b} 1\n# EOF\n", "openmetrics")).toThrow(/refused/);
  });

  test("the same series asked twice, from any registry over the buffer, is one series", () => {
    const a = new MetricsRegistry();
    const b = new MetricsRegistry(a.buffer);
    a.counter("vhost_x", "x", { queue: 1 }).inc(2);
    b.counter("vhost_x", "x", { queue: 1 }).inc(3);
    expect(a.read("vhost_x", { queue: 1 })).toBe(5);
    expect(a.render(true).match(/^vhost_x_total/gm)).toHaveLength(1);
    expect(() => b.gauge("vhost_x", "x", { queue: 1 })).toThrow(/counter, not a gauge/);
    expect(() => a.counter("bad name", "")).toThrow();
    expect(() => a.counter("vhost_y_total", "")).toThrow(/_total/);
    a.counter("vhost_y", "y", { queue: 0, type: "read" }).inc(1);
    a.counter("vhost_y", "y", { queue: 1, type: "read" }).inc(2);
    a.counter("vhost_y", "y", { queue: 1, type: "write" }).inc(4);
    expect(a.total("vhost_y", { type: "read" })).toBe(3);
    expect(a.total("vhost_y")).toBe(7);
  });

  test("a full buffer does not fail the caller: the series counts privately and is not exported", () => {
    const r = new MetricsRegistry();
    const origError = console.error;
    console.error = () => {};
    try {
      for (let i = 0; i < 1100; i++) r.counter("vhost_many", "many", { i }).inc();
    } finally {
      console.error = origError;
    }
    const c = r.counter("vhost_many", "many", { i: 5000 });
    c.inc(7);
    expect(c.value).toBe(7);
    expect(r.read("vhost_many", { i: 5000 })).toBeUndefined();
    expect(r.read("vhost_many", { i: 1 })).toBe(1);
  });

  test("threads register and update their own series lock-free; the main thread reads exact totals", async () => {
    const r = attachMetrics(new MetricsRegistry().buffer);
    expect(metrics()).toBe(r);
    const src = `
      import { attachMetrics } from ${JSON.stringify(join(import.meta.dir, "../../src/metrics.ts"))};
      self.onmessage = (ev) => {
        const m = attachMetrics(ev.data.buffer);
        const c = m.counter("vhost_net_rx_packets", "Packets received", { pair: ev.data.pair });
        const h = m.histogram("vhost_lat_seconds", "lat", { pair: ev.data.pair }, [0.5]);
        for (let i = 0; i < 200000; i++) { c.inc(); h.observe(i % 2); }
        postMessage("done");
      };`;
    const file = join(dir, "metrics_worker.ts");
    await Bun.write(file, src);
    const workers = [0, 1, 2].map(() => new Worker(file));
    const mine = r.counter("vhost_sessions", "Sessions");
    await Promise.all(workers.map((w, pair) => new Promise<void>((res) => {
      w.onmessage = () => res();
      w.postMessage({ buffer: r.buffer, pair });
    })));
    for (let i = 0; i < 1000; i++) mine.inc();
    for (const w of workers) w.terminate();
    const p = parseExposition(r.render(true), "openmetrics");
    for (const pair of ["0", "1", "2"]) {
      expect(sample(p, "vhost_net_rx_packets_total", { pair })).toBe(200000);
      expect(sample(p, "vhost_lat_seconds_bucket", { pair, le: "0.5" })).toBe(100000);
      expect(sample(p, "vhost_lat_seconds_count", { pair })).toBe(200000);
    }
    expect(sample(p, "vhost_sessions_total")).toBe(1000);
  });
});

describe("--metrics", () => {
  test("addresses: unix:PATH, HOST:PORT, [v6]:PORT; bad ones name the option", () => {
    expect(parseMetricsAddress("unix:/run/vm/m.sock")).toEqual({ unix: "/run/vm/m.sock" });
    expect(parseMetricsAddress("127.0.0.1:9100")).toEqual({ hostname: "127.0.0.1", port: 9100 });
    expect(parseMetricsAddress("[::1]:9100")).toEqual({ hostname: "::1", port: 9100 });
    expect(parseMetricsAddress("localhost:0")).toEqual({ hostname: "localhost", port: 0 });
    for (const bad of ["9100", "unix:", "host:99999", "::1:9100", `unix:/${"x".repeat(120)}`]) {
      expect(() => parseMetricsAddress(bad)).toThrow(new RegExp(`^--metrics ${bad.replace(/[[\]]/g, "\\$&").slice(0, 20)}`));
    }
  });

  test("served over a unix socket: OpenMetrics when asked, Prometheus text otherwise; the file goes on stop", async () => {
    const r = new MetricsRegistry();
    r.counter("vhost_console_bytes", "Bytes", { port: 0, direction: "rx" }).inc(1234);
    const path = join(dir, "metrics.sock");
    const server = serveMetrics({ unix: path }, r);
    try {
      expect(server.where).toBe(`unix:${path}`);
      const om = await fetch("http://localhost/metrics", { unix: path, headers: { accept: "application/openmetrics-text; version=1.0.0" } });
      expect(om.headers.get("content-type")).toStartWith("application/openmetrics-text");
      expect(sample(parseExposition(await om.text(), "openmetrics"), "vhost_console_bytes_total", { port: "0", direction: "rx" })).toBe(1234);
      const prom = await fetch("http://localhost/metrics", { unix: path });
      expect(prom.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
      expect(sample(parseExposition(await prom.text(), "prometheus"), "vhost_console_bytes_total", { port: "0", direction: "rx" })).toBe(1234);
      expect((await fetch("http://localhost/metrics", { unix: path, method: "POST" })).status).toBe(405);
    } finally {
      server.stop();
    }
    expect(existsSync(path)).toBe(false);
  });

  test("served over TCP", async () => {
    const r = new MetricsRegistry();
    r.gauge("vhost_up", "Up").set(1);
    const server = serveMetrics({ hostname: "127.0.0.1", port: 0 }, r);
    try {
      expect(server.where).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
      const text = await (await fetch(server.where)).text();
      expect(sample(parseExposition(text, "prometheus"), "vhost_up")).toBe(1);
    } finally {
      server.stop();
    }
  });
});
