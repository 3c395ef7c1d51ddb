// A classic-BPF interpreter for the instructions src/sandbox/bpf.ts emits, written from the
// kernel's semantics (net/core/filter.c, seccomp's checker) independently of the assembler: tests
// run compiled seccomp filters on made-up seccomp_data without installing them.
import { OP, decode } from "../../src/sandbox/bpf.ts";

export interface SeccompData {
  nr: number;
  arch: number;
  /** Up to six arguments (bigint for full 64-bit values). */
  args?: readonly (number | bigint)[];
}

function dataWord(d: SeccompData, off: number): number {
  if (off === 0) return d.nr >>> 0;
  if (off === 4) return d.arch >>> 0;
  if (off >= 16 && off < 64) {
    const i = (off - 16) >> 3;
    const v = BigInt.asUintN(64, BigInt(d.args?.[i] ?? 0));
    return Number((off & 4 ? v >> 32n : v) & 0xffffffffn);
  }
  if (off === 8 || off === 12) return 0; // instruction pointer
  throw new Error(`load outside seccomp_data at ${off}`);
}

/** Runs `program` on `d`; returns the action value. Throws on anything the kernel would reject or trap. */
export function runFilter(program: Uint8Array, d: SeccompData): number {
  const insns = decode(program);
  let a = 0;
  let pc = 0;
  for (let steps = 0; steps <= insns.length; steps++) {
    const f = insns[pc];
    if (f === undefined) throw new Error(`ran off the program at ${pc}`);
    switch (f.code) {
      case OP.LD_W_ABS:
        a = dataWord(d, f.k);
        pc++;
        break;
      case OP.AND_K:
        a = (a & f.k) >>> 0;
        pc++;
        break;
      case OP.JA:
        pc += 1 + f.k;
        break;
      case OP.JEQ_K:
        pc += 1 + (a === f.k ? f.jt : f.jf);
        break;
      case OP.JGT_K:
        pc += 1 + (a > f.k ? f.jt : f.jf);
        break;
      case OP.JGE_K:
        pc += 1 + (a >= f.k ? f.jt : f.jf);
        break;
      case OP.JSET_K:
        pc += 1 + ((a & f.k) !== 0 ? f.jt : f.jf);
        break;
      case OP.RET_K:
        return f.k;
      default:
        throw new Error(`unknown opcode 0x${f.code.toString(16)} at ${pc}`);
    }
  }
  throw new Error("program did not return");
}
