// The process-wide logger. Workers get their own instance with the level main chose.
import { createConsola, type ConsolaInstance, type LogType } from "consola";

export const LOG_LEVELS: Record<string, number> = {
  silent: -999, fatal: 0, error: 0, warn: 1, info: 3, debug: 4, trace: 5,
};

export let log: ConsolaInstance = createConsola({ level: LOG_LEVELS.info, stdout: process.stderr, stderr: process.stderr });

/** Sets the level by name ("info", "debug"...); unknown names throw. */
export function setLogLevel(name: string): void {
  const level = LOG_LEVELS[name];
  if (level === undefined) throw new Error(`unknown log level '${name}' (one of ${Object.keys(LOG_LEVELS).join(", ")})`);
  log.level = level;
}

export type { LogType };

/** The name of the current level (to hand the same level to other threads). */
export function logLevelName(): string {
  return Object.entries(LOG_LEVELS).find(([, v]) => v === log.level)?.[0] ?? "info";
}
