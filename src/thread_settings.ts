// What every thread of the process shares beyond its own job: how to log (level, format, device
// name) and the metrics buffer. The main thread decides; each thread it starts applies the same
// at its start (device thread, queue threads).
import { applyLogSettings, logSettings, type LogSettings } from "./log.ts";
import { attachMetrics, metrics } from "./metrics.ts";

export interface ThreadSettings {
  log: LogSettings;
  metrics: SharedArrayBuffer;
}

/** This thread's settings, to hand to a thread it starts. */
export function threadSettings(): ThreadSettings {
  return { log: logSettings(), metrics: metrics().buffer };
}

export function applyThreadSettings(s: ThreadSettings): void {
  applyLogSettings(s.log);
  attachMetrics(s.metrics);
}
