// sd_notify(3) for `Type=notify` services: one datagram of "KEY=VALUE" lines to the unix socket
// NOTIFY_SOCKET names (a path, or an abstract name written "@name"). READY=1 once the socket is
// listening, so units ordered after this one start when the front-end can connect; STOPPING=1 when
// shutting down. Without NOTIFY_SOCKET nothing is sent (not started by a service manager).
import { sendDatagramTo } from "../ffi/socket.ts";
import { log } from "./log.ts";

/**
 * Sends `state` ("READY=1", "STOPPING=1", "STATUS=...", lines joined by "\n") to the service
 * manager. Returns whether it was sent; a failure is logged, never thrown: a missing manager
 * must not stop the device.
 */
export function sdNotify(state: string, env: Record<string, string | undefined> = process.env): boolean {
  const socket = env.NOTIFY_SOCKET;
  if (!socket) return false;
  if (!socket.startsWith("/") && !socket.startsWith("@")) {
    log.debug(`NOTIFY_SOCKET=${socket}: only unix socket paths and @abstract names are supported; not notifying`);
    return false;
  }
  try {
    sendDatagramTo(socket, new TextEncoder().encode(state));
    return true;
  } catch (e) {
    log.warn(`NOTIFY_SOCKET=${socket}: could not notify the service manager (${(e as Error).message})`);
    return false;
  }
}

/** The socket is listening: the front-end may connect (READY=1, with a status line for systemctl). */
export function notifyReady(status: string, env: Record<string, string | undefined> = process.env): boolean {
  return sdNotify(`READY=1\nSTATUS=${status.replace(/\n/g, " ")}\nMAINPID=${process.pid}`, env);
}

export function notifyStopping(env: Record<string, string | undefined> = process.env): boolean {
  return sdNotify("STOPPING=1", env);
}
