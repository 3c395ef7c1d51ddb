// A SIGBUS handler for guest memory (C, compiled at run time by bun:ffi's TinyCC: JS cannot run in
// a signal handler). A front-end that truncates the file behind a mapped guest region makes our next
// access to the lost pages raise SIGBUS, which would kill the process. Inside a registered guest
// range the handler maps anonymous zero pages over the rest of the range (MAP_FIXED: the faulting
// access is retried and reads zeros), counts the fault and writes an eventfd, so the thread that owns
// the session drops the front-end. Anything else — a SIGBUS outside guest memory, a SIGSEGV, a
// signal sent with kill — goes to the handler that was installed before ours (Bun's crash handler),
// or to the default action: it still crashes as before.
//
// The handler only reads the range table and calls mmap(2) and write(2), both async-signal-safe.
// The source declares its few libc prototypes itself, so no C headers are needed at run time.
import { cc, type Library } from "bun:ffi";
import { writeSync, closeSync } from "node:fs";
import { memfdCreate } from "./mem.ts";

/** Guest ranges the table holds at most (memory slots are 509 at most; regions are far fewer in practice). */
export const MAX_GUEST_RANGES = 512;

const SOURCE = `
typedef unsigned long u64;
extern int sigaction(int sig, const void *act, void *old);
extern void *mmap(void *addr, u64 len, int prot, int flags, int fd, long off);
extern long write(int fd, const void *buf, u64 len);

/* glibc's struct sigaction on x86_64 and aarch64: handler, 1024-bit mask, flags, restorer. */
struct k_sigaction { void *handler; u64 mask[16]; int flags; int pad; void *restorer; };

#define SIGBUS 7
#define SA_SIGINFO 4
#define SA_ONSTACK 0x08000000
#define SA_NODEFER 0x40000000
#define BUS_ADRERR 2
#define MAX ${MAX_GUEST_RANGES}
/* TinyCC has no __atomic builtins: aligned u64 volatile accesses are single loads and stores
   (x86_64), a full fence orders them for the handler in another thread, and the fault counter
   is a locked increment. */
#define FENCE() __asm__ __volatile__("mfence" ::: "memory")

static volatile u64 range_start[MAX];
static volatile u64 range_end[MAX];
static volatile u64 faults;
static int wake_fd = -1;
static struct k_sigaction previous;
static int installed;

static void chain(int sig, void *info, void *ctx) {
  if (previous.flags & SA_SIGINFO) {
    ((void (*)(int, void *, void *))previous.handler)(sig, info, ctx);
    return;
  }
  if ((u64)previous.handler > 1) {
    ((void (*)(int))previous.handler)(sig);
    return;
  }
  /* SIG_DFL or SIG_IGN: the default action, taken when the access is retried on return. */
  struct k_sigaction dfl;
  char *p = (char *)&dfl;
  for (int i = 0; i < (int)sizeof dfl; i++) p[i] = 0;
  sigaction(sig, &dfl, 0);
}

static void on_sigbus(int sig, void *info, void *ctx) {
  int code = *(int *)((char *)info + 8);
  u64 addr = *(u64 *)((char *)info + 16);
  if (code == BUS_ADRERR) {
    for (int i = 0; i < MAX; i++) {
      u64 start = range_start[i], end = range_end[i];
      if (end == 0 || addr < start || addr >= end) continue;
      /* Zero pages from the faulting page to the end of the range (a truncated file lost all of
         it). A hugetlbfs mapping can only be replaced in whole huge pages: 4 KiB, 2 MiB, 1 GiB. */
      long r = -1;
      for (u64 align = 4096; align <= (1UL << 30) && r == -1; align <<= 9) {
        u64 page = addr & ~(align - 1);
        if (page < start) break;
        /* PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED */
        r = (long)mmap((void *)page, end - page, 3, 0x02 | 0x20 | 0x10, -1, 0);
      }
      if (r == -1) break;
      __asm__ __volatile__("lock incq %0" : "+m"(faults) :: "memory");
      if (wake_fd >= 0) {
        u64 one = 1;
        write(wake_fd, &one, 8);
      }
      return;
    }
  }
  chain(sig, info, ctx);
}

/* Installs the handler once; returns 0, or -1 if sigaction refused. */
int guest_sigbus_install(int fd) {
  if (installed) return 0;
  struct k_sigaction act;
  char *p = (char *)&act;
  for (int i = 0; i < (int)sizeof act; i++) p[i] = 0;
  act.handler = (void *)on_sigbus;
  act.flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  wake_fd = fd;
  if (sigaction(SIGBUS, &act, &previous) != 0) return -1;
  installed = 1;
  return 0;
}

/* Adds range [start, start+len); returns its slot, or -1 when the table is full. */
int guest_range_add(u64 start, u64 len) {
  for (int i = 0; i < MAX; i++) {
    if (range_end[i] != 0) continue;
    range_start[i] = start;
    FENCE();
    range_end[i] = start + len;
    FENCE();
    return i;
  }
  return -1;
}

void guest_range_remove(int slot) {
  if (slot >= 0 && slot < MAX) {
    range_end[slot] = 0;
    FENCE();
  }
}

u64 guest_faults(void) {
  FENCE();
  return faults;
}
`;

type Symbols = {
  guest_sigbus_install: { args: ["i32"]; returns: "i32" };
  guest_range_add: { args: ["u64", "u64"]; returns: "i32" };
  guest_range_remove: { args: ["i32"]; returns: "void" };
  guest_faults: { args: []; returns: "u64" };
};

let lib: Library<Symbols> | null = null;

/**
 * Compiles and installs the handler (once per module instance: the thread that maps guest memory).
 * `wakeFd`: an eventfd written at each fault caught. Throws if TinyCC or sigaction fail.
 */
export function installGuestSigbusHandler(wakeFd: number): void {
  if (lib !== null) return;
  // cc() compiles a file; a compiled binary has no real path for an embedded one. A memfd, not a
  // temporary file: the sandbox (src/sandbox) lets this process write no directory.
  const fd = memfdCreate("vhost-backend-sigbus.c");
  writeSync(fd, SOURCE);
  const path = `/proc/self/fd/${fd}`;
  try {
    lib = cc({
      source: path,
      symbols: {
        guest_sigbus_install: { args: ["i32"], returns: "i32" },
        guest_range_add: { args: ["u64", "u64"], returns: "i32" },
        guest_range_remove: { args: ["i32"], returns: "void" },
        guest_faults: { args: [], returns: "u64" },
      },
    }) as Library<Symbols>;
  } finally {
    closeSync(fd);
  }
  if (lib.symbols.guest_sigbus_install(wakeFd) !== 0) throw new Error("sigaction(SIGBUS) failed");
}

/** Registers a guest range; returns its slot (-1: not protected: no handler, or the table is full). */
export function addGuestRange(start: number, len: number): number {
  if (lib === null) return -1;
  return lib.symbols.guest_range_add(BigInt(start), BigInt(len));
}

export function removeGuestRange(slot: number): void {
  if (lib !== null && slot >= 0) lib.symbols.guest_range_remove(slot);
}

/** Faults caught in guest ranges since the handler was installed. */
export function guestFaults(): number {
  return lib === null ? 0 : Number(lib.symbols.guest_faults());
}
