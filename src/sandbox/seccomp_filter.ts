// A seccomp filter as data, compiled to classic BPF: per system call an action, or cases on its
// arguments each with an action and a fallback; a default for every other call. The layout keeps
// the kernel's action cache useful (5.11+): the path of a call allowed without argument checks
// reads only `arch` and `nr`, so the kernel learns it is always allowed and skips the filter for
// it; only calls with argument checks run the program.
import { BpfAssembler, NEXT, SECCOMP_DATA_ARCH, SECCOMP_DATA_NR, argLow } from "./bpf.ts";
import { syscallNumber, type SyscallName } from "./syscalls.ts";

// <linux/seccomp.h> return actions; <linux/audit.h> AUDIT_ARCH_X86_64.
export const SECCOMP_RET_KILL_PROCESS = 0x80000000;
export const SECCOMP_RET_ERRNO = 0x00050000;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const AUDIT_ARCH_X86_64 = 0xc000003e;
/** Numbers at or above this are x32 calls through the x86_64 entry: refused as a whole. */
export const X32_SYSCALL_BIT = 0x40000000;

export type Action = { kind: "allow" } | { kind: "errno"; errno: number } | { kind: "kill" };
export const ALLOW: Action = { kind: "allow" };
export const KILL: Action = { kind: "kill" };
export const errnoAction = (errno: number): Action => ({ kind: "errno", errno });

export function actionValue(a: Action): number {
  switch (a.kind) {
    case "allow":
      return SECCOMP_RET_ALLOW;
    case "kill":
      return SECCOMP_RET_KILL_PROCESS;
    case "errno":
      if (!Number.isInteger(a.errno) || a.errno <= 0 || a.errno > 4095) throw new Error(`seccomp: errno ${a.errno} out of range`);
      return SECCOMP_RET_ERRNO | a.errno;
  }
}

/**
 * Argument `arg`'s low 32 bits, masked with `mask` (all ones when absent), equal one of `oneOf`.
 * Low words only: the arguments checked here are ints or flag words whose bits all sit in the
 * low half (socket domain, ioctl request, clone flags, mmap prot and flags, prctl option).
 */
export interface ArgMatch {
  arg: number;
  mask?: number;
  oneOf: readonly number[];
}

/** Every match holds → `action`. */
export interface ArgCase {
  all: readonly ArgMatch[];
  action: Action;
}

export type SyscallRule =
  | { action: Action }
  /** The first case whose matches all hold decides; none → `otherwise`. */
  | { cases: readonly ArgCase[]; otherwise: Action };

export interface FilterSpec {
  rules: ReadonlyMap<SyscallName, SyscallRule>;
  /** For every call without a rule. */
  defaultAction: Action;
}

/** Compiles `spec` into a program seccomp(2) accepts. */
export function compileFilter(spec: FilterSpec): Uint8Array {
  const asm = new BpfAssembler();
  asm.load(SECCOMP_DATA_ARCH).jeq(AUDIT_ARCH_X86_64, "arch_ok").ret(SECCOMP_RET_KILL_PROCESS).label("arch_ok");
  asm.load(SECCOMP_DATA_NR).jge(X32_SYSCALL_BIT, NEXT, "nr_ok").ret(SECCOMP_RET_KILL_PROCESS).label("nr_ok");
  let n = 0;
  for (const [name, rule] of spec.rules) {
    const end = `end_${n++}`;
    asm.jeq(syscallNumber(name), NEXT, end);
    if ("action" in rule) {
      asm.ret(actionValue(rule.action));
    } else {
      // A holds an argument from here on; every path of the body returns, so the fall-through
      // to `end` (taken by the jeq above) still has the call number in A.
      rule.cases.forEach((c, ci) => {
        const fail = `${end}_case${ci}`;
        c.all.forEach((m, mi) => {
          if (m.arg < 0 || m.arg > 5) throw new Error(`seccomp: ${name} has no argument ${m.arg}`);
          if (m.oneOf.length === 0) throw new Error(`seccomp: ${name} argument ${m.arg}: no values`);
          const ok = `${fail}_m${mi}`;
          asm.load(argLow(m.arg));
          if (m.mask !== undefined) asm.and(m.mask);
          for (const v of m.oneOf) asm.jeq(v >>> 0, ok);
          asm.jump(fail).label(ok);
        });
        asm.ret(actionValue(c.action)).label(fail);
      });
      asm.ret(actionValue(rule.otherwise));
    }
    asm.label(end);
  }
  asm.ret(actionValue(spec.defaultAction));
  return asm.assemble();
}
