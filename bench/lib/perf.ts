// perf record of a backend, with its JIT-compiled JavaScript named. JavaScriptCore writes a
// JITDump file per process when BUN_JSC_useJITDump is set, but perf inject --jit does not take it
// (JSC names it jit-<tid>-<pid>.dump, perf wants jit-<pid>.dump), so the code-load records are turned
// into the /tmp/perf-<pid>.map file perf report reads for anonymous executable memory. Frames then
// show as "JSC-<tier>: <function>#<hash>" (tier: Baseline, DFG, FTL; a hot function stuck in
// Baseline is worth a look: bench/README.md, "Profiling ours").
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** Environment for a backend whose JIT code should be named in perf reports. */
export function jitDumpEnv(dir: string): Record<string, string> {
  return { BUN_JSC_useJITDump: "1", BUN_JSC_jitDumpDirectory: dir };
}

const JITDUMP_MAGIC = 0x4a695444;
const JIT_CODE_LOAD = 0;

/**
 * Writes /tmp/perf-<pid>.map for every process with a JITDump file in `dir`; returns the pids
 * mapped. A sandboxed backend re-execs itself: both images have the same pid and each writes a
 * dump; the later one (header timestamp) holds the code that serves, the first image's is gone.
 */
export function writePerfMaps(dir: string): number[] {
  const latest = new Map<number, { at: bigint; lines: string[] }>();
  let names: string[];
  try {
    names = readdirSync(dir).filter((n) => /^jit-.*\.dump$/.test(n));
  } catch {
    return [];
  }
  for (const name of names) {
    const b = readFileSync(join(dir, name));
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    if (b.length < 40 || v.getUint32(0, true) !== JITDUMP_MAGIC) continue;
    const headerSize = v.getUint32(8, true);
    const pid = v.getUint32(20, true);
    const at = v.getBigUint64(24, true);
    // Header: magic, version, size, elf_mach, pad, pid, timestamp, flags. Records: id u32,
    // size u32, timestamp u64, then for JIT_CODE_LOAD: pid, tid, vma u64, code_addr u64,
    // code_size u64, code_index u64, name (NUL-terminated), code bytes.
    const code = new Map<number, { size: number; name: string }>();
    for (let o = headerSize; o + 16 <= b.length; ) {
      const id = v.getUint32(o, true);
      const size = v.getUint32(o + 4, true);
      if (size < 16 || o + size > b.length) break; // a record still being written
      if (id === JIT_CODE_LOAD && size >= 56) {
        const addr = Number(v.getBigUint64(o + 32, true));
        const codeSize = Number(v.getBigUint64(o + 40, true));
        const end = b.indexOf(0, o + 56);
        const fnName = b.subarray(o + 56, end < 0 || end > o + size ? o + size : end).toString("utf8");
        code.set(addr, { size: codeSize, name: fnName });
      }
      o += size;
    }
    const lines = [...code.entries()].sort((x, y) => x[0] - y[0]).map(([a, c]) => `${a.toString(16)} ${c.size.toString(16)} ${c.name}`);
    const known = latest.get(pid);
    if (known === undefined || at > known.at) latest.set(pid, { at, lines });
  }
  for (const [pid, { lines }] of latest) writeFileSync(`/tmp/perf-${pid}.map`, lines.join("\n") + "\n");
  return [...latest.keys()];
}

/**
 * `perf record -g` of process `pid` (all its threads) into `out`; stop() ends it, names the JIT
 * code found in `jitDumpDir` (if any) and returns the top of `perf report --sort dso,sym`.
 */
export function startPerf(pid: number, out: string, jitDumpDir?: string): { stop(): Promise<string[]> } {
  const p = Bun.spawn(["perf", "record", "-F", "999", "-g", "-p", String(pid), "-o", out], { stdout: "ignore", stderr: "pipe" });
  return {
    async stop() {
      p.kill("SIGINT");
      await p.exited;
      if (jitDumpDir !== undefined) writePerfMaps(jitDumpDir);
      const rep = Bun.spawnSync(
        ["perf", "report", "-i", out, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none", "--percent-limit", "1"],
        { stdout: "pipe", stderr: "pipe" },
      );
      return rep.stdout.toString().split("\n").filter((l) => /%/.test(l) && !l.startsWith("#")).map((l) => l.trim());
    },
  };
}
