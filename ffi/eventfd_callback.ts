// A native callback for C libraries that call back on their own threads, where JS must never run
// (a bun:ffi JSCallback called from a foreign thread would): `void cb(void *arg)` writes 1 to the
// eventfd whose number is `arg`, so the owning thread's loop hears of it. Compiled at run time by
// bun:ffi's TinyCC from a memfd (as ffi/sigbus.ts is: a compiled binary has no source file, and the
// sandbox lets the process write no directory). Used for librbd's image update watch.
import { cc, type Library, type Pointer } from "bun:ffi";
import { writeSync, closeSync } from "node:fs";
import { memfdCreate } from "./mem.ts";

const SOURCE = `
typedef unsigned long u64;
extern long write(int fd, const void *buf, u64 len);

static void signal_eventfd(void *arg) {
  u64 one = 1;
  write((int)(long)arg, &one, 8);
}

void *signal_eventfd_address(void) {
  return (void *)signal_eventfd;
}
`;

type Symbols = { signal_eventfd_address: { args: []; returns: "ptr" } };

let address: Pointer | null = null;
/** Held for the life of the process: the compiled code lives as long as its library object. */
let compiled: Library<Symbols> | null = null;

/** The address of `void cb(void *eventfd)` (compiled once per thread's module instance). */
export function eventfdCallback(): Pointer {
  if (address !== null) return address;
  const fd = memfdCreate("vhost-backend-eventfd-callback.c");
  writeSync(fd, SOURCE);
  let lib: Library<Symbols>;
  try {
    lib = cc({ source: `/proc/self/fd/${fd}`, symbols: { signal_eventfd_address: { args: [], returns: "ptr" } } }) as Library<Symbols>;
  } finally {
    closeSync(fd);
  }
  compiled = lib;
  const p = compiled.symbols.signal_eventfd_address() as Pointer | null;
  if (p === null) throw new Error("eventfd callback: TinyCC gave no address");
  address = p;
  return p;
}

/** `fd` as the callback's `void *arg`. */
export function eventfdArg(fd: number): Pointer {
  return fd as unknown as Pointer;
}
