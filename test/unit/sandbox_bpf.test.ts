// The seccomp BPF assembler and the per-device policies, run through an independent interpreter
// (test/support/sandbox_bpf_interp.ts): encodings, label resolution, refusals, and what each
// policy decides for the calls issue 17 names.
import { describe, expect, test } from "bun:test";
import { BpfAssembler, NEXT, decode, OP, SECCOMP_DATA_NR, argLow } from "../../src/sandbox/bpf.ts";
import { compileFilter, AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, ALLOW, KILL } from "../../src/sandbox/seccomp_filter.ts";
import { buildPolicy, allowedCalls, keptCapabilities, SYSCALL_GROUPS } from "../../src/sandbox/policy.ts";
import { syscallNumber, syscallName, type SyscallName } from "../../src/sandbox/syscalls.ts";
import { NO_HOST_ACCESS, type HostAccess } from "../../src/host_access.ts";
import { runFilter } from "../support/sandbox_bpf_interp.ts";

const X86 = AUDIT_ARCH_X86_64;
const call = (prog: Uint8Array, name: SyscallName, ...args: (number | bigint)[]) => runFilter(prog, { nr: syscallNumber(name), arch: X86, args });
const errno = (e: number) => SECCOMP_RET_ERRNO | e;

describe("bpf assembler", () => {
  test("encodes struct sock_filter little-endian with resolved forward offsets", () => {
    const asm = new BpfAssembler();
    asm.load(SECCOMP_DATA_NR).jeq(39, "yes", NEXT).ret(7).label("yes").ret(9);
    const bytes = asm.assemble();
    expect(bytes.byteLength).toBe(4 * 8);
    expect([...bytes.subarray(0, 8)]).toEqual([0x20, 0, 0, 0, 0, 0, 0, 0]);
    expect([...bytes.subarray(8, 16)]).toEqual([0x15, 0, 1, 0, 39, 0, 0, 0]);
    expect(decode(bytes)[3]).toEqual({ code: OP.RET_K, jt: 0, jf: 0, k: 9 });
    expect(runFilter(bytes, { nr: 39, arch: X86 })).toBe(9);
    expect(runFilter(bytes, { nr: 40, arch: X86 })).toBe(7);
  });

  test("refuses backward jumps, far conditional jumps, undefined or duplicate labels, running off the end", () => {
    const back = new BpfAssembler().label("top").load(0).jeq(1, "top").ret(0);
    expect(() => back.assemble()).toThrow(/backwards/);
    const far = new BpfAssembler().load(0).jeq(1, "far");
    for (let i = 0; i < 256; i++) far.ret(i);
    far.label("far").ret(0);
    expect(() => far.assemble()).toThrow(/more than 255/);
    // The same distance through an unconditional jump is fine (32-bit offset).
    const ja = new BpfAssembler().jump("far");
    for (let i = 0; i < 300; i++) ja.ret(i);
    ja.label("far").ret(12345);
    expect(runFilter(ja.assemble(), { nr: 0, arch: X86 })).toBe(12345);
    expect(() => new BpfAssembler().jeq(1, "nowhere").ret(0).assemble()).toThrow(/undefined label/);
    expect(() => new BpfAssembler().label("x").label("x")).toThrow(/twice/);
    expect(() => new BpfAssembler().load(0).assemble()).toThrow(/off its end/);
    expect(() => new BpfAssembler().load(3)).toThrow(/32-bit field/);
    expect(() => new BpfAssembler().ret(2 ** 32)).toThrow(/32 bits/);
  });

  test("argument words: low and high halves of a 64-bit argument", () => {
    const p = new BpfAssembler().load(argLow(1)).jeq(0xdeadbeef, "lo").ret(1).label("lo").load(argLow(1) + 4).jeq(7, "hi").ret(2).label("hi").ret(3).assemble();
    expect(runFilter(p, { nr: 0, arch: X86, args: [0, (7n << 32n) | 0xdeadbeefn] })).toBe(3);
    expect(runFilter(p, { nr: 0, arch: X86, args: [0, 0xdeadbeef] })).toBe(2);
    expect(runFilter(p, { nr: 0, arch: X86, args: [0, 1] })).toBe(1);
  });
});

describe("compiled filter", () => {
  const spec = { rules: new Map<SyscallName, any>([["read", { action: ALLOW }], ["socket", { cases: [{ all: [{ arg: 0, oneOf: [1, 2] }], action: ALLOW }], otherwise: KILL }]]), defaultAction: { kind: "errno", errno: 38 } as const };
  const prog = compileFilter(spec);

  test("another architecture and x32 numbers are killed; unknown calls get the default", () => {
    expect(runFilter(prog, { nr: syscallNumber("read"), arch: 0x40000003 /* i386 */ })).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(runFilter(prog, { nr: 0x40000000 | syscallNumber("read"), arch: X86 })).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(call(prog, "read")).toBe(SECCOMP_RET_ALLOW);
    expect(call(prog, "write")).toBe(errno(38));
  });

  test("argument cases: one of a set, otherwise", () => {
    expect(call(prog, "socket", 1)).toBe(SECCOMP_RET_ALLOW);
    expect(call(prog, "socket", 2)).toBe(SECCOMP_RET_ALLOW);
    expect(call(prog, "socket", 10)).toBe(SECCOMP_RET_KILL_PROCESS);
  });
});

describe("device policies", () => {
  const pid = 4242;
  const policy = (access: Partial<HostAccess>) => compileFilter(buildPolicy({ ...NO_HOST_ACCESS, ...access }, { pid, openAllowed: true }));
  const plain = policy({});

  test("the escapes issue 17 names kill the process", () => {
    for (const n of ["execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "bpf", "kexec_load", "init_module", "finit_module", "io_uring_setup", "unshare", "setns", "fork", "vfork"] as SyscallName[]) {
      expect(`${n}: ${call(plain, n)}`).toBe(`${n}: ${SECCOMP_RET_KILL_PROCESS}`);
    }
    expect(call(plain, "socket", 2 /* AF_INET */)).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(call(plain, "socket", 1 /* AF_UNIX */)).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(call(plain, "connect", 3)).toBe(SECCOMP_RET_KILL_PROCESS);
  });

  test("threads but not processes; no new anonymous executable mappings", () => {
    const CLONE_THREAD_FLAGS = 0x3d0f00; // glibc's pthread_create
    expect(call(plain, "clone", CLONE_THREAD_FLAGS)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "clone", 0x11 /* SIGCHLD: fork */)).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(call(plain, "clone3")).toBe(errno(38)); // glibc falls back to clone
    expect(call(plain, "mmap", 0, 4096, 3, 0x22, -1, 0)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "mmap", 0, 4096, 5, 0x22, -1, 0)).toBe(errno(13)); // anonymous PROT_EXEC
    expect(call(plain, "mmap", 0, 4096, 5, 0x2, 7, 0)).toBe(SECCOMP_RET_ALLOW); // a library's text
    expect(call(plain, "mprotect", 0, 4096, 7)).toBe(SECCOMP_RET_ALLOW); // TinyCC's code pages (ffi/sigbus.ts)
  });

  test("signals only to this process; ioctls only from the allow-list; open per declaration", () => {
    expect(call(plain, "tgkill", pid, pid + 1, 30)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "tgkill", 1, 1, 9)).toBe(errno(1));
    expect(call(plain, "kill", 1, 9)).toBe(errno(1));
    expect(call(plain, "ioctl", 0, 0x5401 /* TCGETS */)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "ioctl", 5, 0x400454d0 /* TUNSETOFFLOAD */)).toBe(errno(1));
    expect(call(policy({ syscallGroups: ["tap"] }), "ioctl", 5, 0x400454d0)).toBe(SECCOMP_RET_ALLOW);
    expect(call(policy({ syscallGroups: ["tap"] }), "ioctl", 5, 0x8922 /* SIOCSIFMTU */)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "ioctl", 5, 0x8922)).toBe(errno(1));
    expect(keptCapabilities({ ...NO_HOST_ACCESS, syscallGroups: ["tap", "io_uring"] })).toEqual([12 /* CAP_NET_ADMIN */]);
    expect(keptCapabilities({ ...NO_HOST_ACCESS, syscallGroups: ["block-io", "io_uring"] })).toEqual([]);
    expect(call(policy({ syscallGroups: ["alsa"] }), "ioctl", 5, 0xc0044100)).toBe(SECCOMP_RET_ALLOW);
    const closed = compileFilter(buildPolicy(NO_HOST_ACCESS, { pid, openAllowed: false }));
    expect(call(closed, "openat", -100, 0, 0)).toBe(errno(13));
    expect(call(plain, "openat", -100, 0, 0)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "prctl", 15 /* PR_SET_NAME */)).toBe(SECCOMP_RET_ALLOW);
    expect(call(plain, "prctl", 38 /* PR_SET_NO_NEW_PRIVS */)).toBe(errno(1));
  });

  test("declared groups and sockets widen exactly what they name", () => {
    const block = policy({ syscallGroups: ["block-io", "io_uring"] });
    for (const n of ["fdatasync", "fallocate", "io_uring_enter", "io_uring_register"] as SyscallName[]) expect(call(block, n)).toBe(SECCOMP_RET_ALLOW);
    // Rings are set up (restricted) in acquire: a new one after setup kills, declared group or not.
    expect(call(block, "io_uring_setup")).toBe(SECCOMP_RET_KILL_PROCESS);
    expect(call(plain, "fdatasync")).toBe(errno(38));
    expect(call(block, "ioctl", 5, 0x1277 /* BLKDISCARD */)).toBe(SECCOMP_RET_ALLOW);
    const pulse = policy({ unixSockets: ["/run/user/0/pulse/native"] });
    expect(call(pulse, "socket", 1)).toBe(SECCOMP_RET_ALLOW);
    expect(call(pulse, "socket", 2)).toBe(SECCOMP_RET_KILL_PROCESS);
    const nbd = policy({ tcp: ["server:10809"] });
    expect(call(nbd, "socket", 2)).toBe(SECCOMP_RET_ALLOW);
    expect(() => buildPolicy({ ...NO_HOST_ACCESS, syscallGroups: ["nope"] }, { pid, openAllowed: true })).toThrow(/unknown syscall group/);
    // Every group's calls are known names (a typo would be a compile error, a number a silent hole).
    for (const g of Object.values(SYSCALL_GROUPS)) for (const c of g.calls) expect(syscallName(syscallNumber(c))).toBe(c);
  });

  test("the common set stays a small allow-list", () => {
    const spec = buildPolicy(NO_HOST_ACCESS, { pid, openAllowed: true });
    expect(allowedCalls(spec).length).toBeLessThan(140);
    expect(plain.byteLength / 8).toBeLessThan(1000);
  });
});
