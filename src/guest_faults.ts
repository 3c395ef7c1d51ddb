// Surviving a front-end that truncates the file behind a mapped guest region it could not be kept
// from shrinking (a memfd without MFD_ALLOW_SEALING, a tmpfs or hugetlbfs file): the next access to
// the lost pages raises SIGBUS. Such regions are registered with the SIGBUS handler of
// ffi/sigbus.ts, which maps zero pages over the lost part (the access goes on, reading zeros) and
// wakes `wakeFd`; the session server watches it and drops the front-end whose memory it was. A
// SIGBUS anywhere else still crashes as before.
//
// Per thread: the thread that maps guest memory (the device thread) installs the handler when its
// server starts (or, without one, the first time it maps a region that needs it), and its server
// watches its own wake fd.
import { installGuestSigbusHandler, addGuestRange, removeGuestRange, guestFaults } from "../ffi/sigbus.ts";
import { eventfd } from "../ffi/eventfd.ts";
import { log } from "./log.ts";

let wake = -1;
let state: "off" | "on" | "failed" = "off";
let seen = 0;

/** The eventfd written when a fault in a guest range is caught (created on first use, never closed). */
export function guestFaultWakeFd(): number {
  if (wake < 0) wake = eventfd();
  return wake;
}

/**
 * Installs the handler in this thread's module instance, once. The server does it when it starts
 * (before the backend reports ready): compiling it writes a C file in the temporary directory and
 * TinyCC reads its headers, which a device past its acquire phase may not do (the strace tests).
 */
export function installGuestFaultHandler(): void {
  if (state !== "off") return;
  try {
    installGuestSigbusHandler(guestFaultWakeFd());
    state = "on";
  } catch (e) {
    state = "failed";
    log.warn(`could not install the SIGBUS handler for guest memory (${(e as Error).message}): a truncated guest memory file will crash this backend`);
  }
}

/**
 * Protects [host, host+len) (a mapping of guest memory that can be truncated under us); returns a
 * slot for unprotect(), or -1 when it could not be protected (the risk stays: logged).
 */
export function protectGuestRange(host: number, len: number): number {
  installGuestFaultHandler();
  if (state !== "on") return -1;
  const slot = addGuestRange(host, len);
  if (slot < 0) log.warn("guest memory: the SIGBUS handler's table is full; a truncated guest memory file can crash this backend");
  return slot;
}

/** Stops protecting a range: before it is unmapped (the handler must never map over an address reused since). */
export function unprotectGuestRange(slot: number): void {
  removeGuestRange(slot);
}

/** Faults caught since the last call (the session whose memory it was must be dropped). */
export function takeGuestFaults(): number {
  const now = guestFaults();
  const n = now - seen;
  seen = now;
  return n;
}
