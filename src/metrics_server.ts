// `--metrics unix:PATH|HOST:PORT`: serves the process's metrics over HTTP for scrapers, from the
// main thread (the device threads never see a scrape). Any GET path answers with the metrics;
// OpenMetrics when the scraper asks for it (Accept: application/openmetrics-text), the Prometheus
// text format otherwise.
import { existsSync, lstatSync, unlinkSync } from "node:fs";
import { MetricsRegistry, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE } from "./metrics.ts";

export type MetricsAddress = { unix: string } | { hostname: string; port: number };

/** Parses `--metrics`'s value; errors name the option. */
export function parseMetricsAddress(spec: string): MetricsAddress {
  const bad = (why: string) => new Error(`--metrics ${spec}: ${why} (give unix:PATH or HOST:PORT, e.g. 127.0.0.1:9100)`);
  if (spec.startsWith("unix:")) {
    const path = spec.slice(5);
    if (path === "") throw bad("no socket path");
    if (Buffer.byteLength(path) > 107) throw bad("socket path longer than 107 bytes");
    return { unix: path };
  }
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):([0-9]+)$/.exec(spec);
  if (!m) throw bad("not an address");
  const port = Number(m[2]);
  if (!Number.isSafeInteger(port) || port > 65535) throw bad("port out of range");
  const host = m[1]!.startsWith("[") ? m[1]!.slice(1, -1) : m[1]!;
  return { hostname: host, port };
}

export interface MetricsServer {
  /** Where it listens, for the log: `unix:PATH` or `http://HOST:PORT/metrics`. */
  readonly where: string;
  stop(): void;
}

export function serveMetrics(address: MetricsAddress, registry: MetricsRegistry): MetricsServer {
  registry.timeLatencies();
  const fetch = (req: Request): Response => {
    if (req.method !== "GET" && req.method !== "HEAD") return new Response("only GET\n", { status: 405, headers: { allow: "GET, HEAD" } });
    const openMetrics = (req.headers.get("accept") ?? "").includes("application/openmetrics-text");
    return new Response(req.method === "HEAD" ? null : registry.render(openMetrics), {
      headers: { "content-type": openMetrics ? OPENMETRICS_CONTENT_TYPE : PROMETHEUS_CONTENT_TYPE },
    });
  };
  if ("unix" in address) {
    const path = address.unix;
    if (existsSync(path)) {
      if (!lstatSync(path).isSocket()) throw new Error(`--metrics unix:${path}: exists and is not a socket`);
      unlinkSync(path);
    }
    const server = Bun.serve({ unix: path, fetch });
    return {
      where: `unix:${path}`,
      stop() {
        server.stop(true);
        try {
          unlinkSync(path);
        } catch {
          // already gone
        }
      },
    };
  }
  let server: ReturnType<typeof Bun.serve>;
  try {
    server = Bun.serve({ hostname: address.hostname, port: address.port, fetch });
  } catch (e) {
    throw new Error(`--metrics ${address.hostname}:${address.port}: ${(e as Error).message}`);
  }
  const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return { where: `http://${host}:${server.port}/metrics`, stop: () => void server.stop(true) };
}
