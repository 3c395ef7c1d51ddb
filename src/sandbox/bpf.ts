// A small assembler for classic BPF as seccomp runs it (<linux/filter.h>, <linux/bpf_common.h>):
// loads of the 32-bit words of struct seccomp_data, constant compares, an AND, returns. Jumps name
// labels; assemble() resolves them to the 8-bit forward offsets the encoding has, and refuses a
// program it cannot encode (a backward jump, a conditional jump over more than 255 instructions,
// more than 4096 instructions) rather than emitting something that means another thing.

// Instruction classes and fields.
const BPF_LD = 0x00;
const BPF_ALU = 0x04;
const BPF_JMP = 0x05;
const BPF_RET = 0x06;
const BPF_W = 0x00;
const BPF_ABS = 0x20;
const BPF_K = 0x00;
const BPF_AND = 0x50;
const BPF_JA = 0x00;
const BPF_JEQ = 0x10;
const BPF_JGT = 0x20;
const BPF_JGE = 0x30;
const BPF_JSET = 0x40;

export const OP = {
  LD_W_ABS: BPF_LD | BPF_W | BPF_ABS,
  AND_K: BPF_ALU | BPF_AND | BPF_K,
  JA: BPF_JMP | BPF_JA,
  JEQ_K: BPF_JMP | BPF_JEQ | BPF_K,
  JGT_K: BPF_JMP | BPF_JGT | BPF_K,
  JGE_K: BPF_JMP | BPF_JGE | BPF_K,
  JSET_K: BPF_JMP | BPF_JSET | BPF_K,
  RET_K: BPF_RET | BPF_K,
} as const;

/** The kernel's limit on a filter's length (BPF_MAXINSNS). */
export const BPF_MAXINSNS = 4096;

// struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
export const SECCOMP_DATA_NR = 0;
export const SECCOMP_DATA_ARCH = 4;
/** Offset of the low 32 bits of argument `i` (x86_64 is little-endian). */
export const argLow = (i: number): number => 16 + 8 * i;
/** Offset of the high 32 bits of argument `i`. */
export const argHigh = (i: number): number => 20 + 8 * i;

/** A jump target: a label, or "next" for the following instruction. */
export type Target = string;
export const NEXT: Target = "";

interface Insn {
  code: number;
  k: number;
  jt?: Target;
  jf?: Target;
}

/** One decoded instruction, as the kernel sees it. */
export interface SockFilter {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

export class BpfAssembler {
  private readonly insns: Insn[] = [];
  private readonly labels = new Map<string, number>();

  get length(): number {
    return this.insns.length;
  }

  /** Defines `name` as the position of the next instruction. */
  label(name: string): this {
    if (name === NEXT) throw new Error("bpf: empty label name");
    if (this.labels.has(name)) throw new Error(`bpf: label '${name}' defined twice`);
    this.labels.set(name, this.insns.length);
    return this;
  }

  /** A = the 32-bit word at `offset` of struct seccomp_data. */
  load(offset: number): this {
    if (offset < 0 || offset > 60 || offset % 4 !== 0) throw new Error(`bpf: seccomp_data offset ${offset} is not a 32-bit field`);
    return this.push({ code: OP.LD_W_ABS, k: offset });
  }

  /** A &= k. */
  and(k: number): this {
    return this.push({ code: OP.AND_K, k });
  }

  /** if (A == k) goto jt else goto jf. */
  jeq(k: number, jt: Target, jf: Target = NEXT): this {
    return this.push({ code: OP.JEQ_K, k, jt, jf });
  }

  /** if (A >= k) goto jt else goto jf (unsigned). */
  jge(k: number, jt: Target, jf: Target = NEXT): this {
    return this.push({ code: OP.JGE_K, k, jt, jf });
  }

  /** if (A > k) goto jt else goto jf (unsigned). */
  jgt(k: number, jt: Target, jf: Target = NEXT): this {
    return this.push({ code: OP.JGT_K, k, jt, jf });
  }

  /** if (A & k) goto jt else goto jf. */
  jset(k: number, jt: Target, jf: Target = NEXT): this {
    return this.push({ code: OP.JSET_K, k, jt, jf });
  }

  /** goto target (32-bit offset). */
  jump(target: Target): this {
    return this.push({ code: OP.JA, k: 0, jt: target });
  }

  /** return k (a seccomp action). */
  ret(k: number): this {
    return this.push({ code: OP.RET_K, k });
  }

  private push(insn: Insn): this {
    if (!Number.isInteger(insn.k) || insn.k < -0x80000000 || insn.k > 0xffffffff) throw new Error(`bpf: constant ${insn.k} does not fit 32 bits`);
    insn.k = insn.k >>> 0;
    this.insns.push(insn);
    return this;
  }

  private offset(from: number, target: Target | undefined, max: number): number {
    if (target === undefined || target === NEXT) return 0;
    const to = this.labels.get(target);
    if (to === undefined) throw new Error(`bpf: undefined label '${target}'`);
    const off = to - (from + 1);
    if (off < 0) throw new Error(`bpf: jump from ${from} to '${target}' goes backwards`);
    if (off > max) throw new Error(`bpf: jump from ${from} to '${target}' is ${off} instructions, more than ${max}`);
    if (to >= this.insns.length) throw new Error(`bpf: label '${target}' is past the last instruction`);
    return off;
  }

  /** The decoded program: offsets resolved. */
  resolve(): SockFilter[] {
    if (this.insns.length === 0) throw new Error("bpf: empty program");
    if (this.insns.length > BPF_MAXINSNS) throw new Error(`bpf: ${this.insns.length} instructions, more than ${BPF_MAXINSNS}`);
    const last = this.insns[this.insns.length - 1]!;
    if (last.code !== OP.RET_K && last.code !== OP.JA) throw new Error("bpf: the program can run off its end");
    return this.insns.map((insn, i) => {
      if (insn.code === OP.JA) return { code: insn.code, jt: 0, jf: 0, k: this.offset(i, insn.jt, 0xffffffff) };
      return { code: insn.code, jt: this.offset(i, insn.jt, 255), jf: this.offset(i, insn.jf, 255), k: insn.k };
    });
  }

  /** The program as the kernel takes it: struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} per instruction. */
  assemble(): Uint8Array {
    const prog = this.resolve();
    const out = new Uint8Array(prog.length * 8);
    const view = new DataView(out.buffer);
    prog.forEach((f, i) => {
      view.setUint16(i * 8, f.code, true);
      view.setUint8(i * 8 + 2, f.jt);
      view.setUint8(i * 8 + 3, f.jf);
      view.setUint32(i * 8 + 4, f.k, true);
    });
    return out;
  }
}

/** Decodes an assembled program (for tests and for printing a filter). */
export function decode(program: Uint8Array): SockFilter[] {
  const view = new DataView(program.buffer, program.byteOffset, program.byteLength);
  const out: SockFilter[] = [];
  for (let o = 0; o < program.byteLength; o += 8) {
    out.push({ code: view.getUint16(o, true), jt: view.getUint8(o + 2), jf: view.getUint8(o + 3), k: view.getUint32(o + 4, true) });
  }
  return out;
}
