// The guest side of the block bench: a dash script that runs fio jobs alternately on /dev/vda and
// /dev/vdb and frames each with machine-readable serial markers, and the host-side line parser.
//
// Markers (one line each on the serial console):
//   BENCH-INFO disk=vda dev=/sys/devices/pci0000:00/0000:00:08.0/virtio1 size=2097152
//   BENCH-START seq=N job=J disk=vda round=R stat=<17 comma-separated /sys/block/vda/stat fields>
//   BENCH-END   seq=N job=J disk=vda round=R rc=0 stat=<...>
//   BENCH-FIO   seq=N <fio --output-format=terse --terse-version=3 line>
// After START the guest sleeps SETTLE_S before fio starts, so the host (which samples the backends'
// CPU when it sees START) is certainly done before the first I/O. END is printed as soon as fio
// exits; the backends are idle from then on, so a late host sample only adds idle time.

export interface FioJob {
  name: string;
  rw: "randread" | "randwrite" | "read" | "write";
  bs: string;
  bsBytes: number;
  iodepth: number;
}

export const JOBS: FioJob[] = [
  { name: "randread-4k-qd32", rw: "randread", bs: "4k", bsBytes: 4096, iodepth: 32 },
  { name: "randread-4k-qd1", rw: "randread", bs: "4k", bsBytes: 4096, iodepth: 1 },
  { name: "randwrite-4k-qd32", rw: "randwrite", bs: "4k", bsBytes: 4096, iodepth: 32 },
  { name: "read-128k-qd32", rw: "read", bs: "128k", bsBytes: 131072, iodepth: 32 },
];

export const SETTLE_S = 1;

export interface Step {
  seq: number;
  round: number;
  job: FioJob;
  disk: "vda" | "vdb";
}

/** All steps of one boot: per round, per job, both disks back to back; the first disk alternates by round. */
export function plan(jobs: FioJob[], rounds: number): Step[] {
  const steps: Step[] = [];
  let seq = 0;
  for (let round = 0; round < rounds; round++) {
    for (const [j, job] of jobs.entries()) {
      // Alternate which disk goes first (by round and job) so slow drift of the host does not favor one.
      const disks: ("vda" | "vdb")[] = (round + j) % 2 === 0 ? ["vda", "vdb"] : ["vdb", "vda"];
      for (const disk of disks) steps.push({ seq: seq++, round, job, disk });
    }
  }
  return steps;
}

export function guestScript(steps: Step[], runtimeS: number, rampS: number): string {
  const lines = [
    "set -u",
    "st() { echo $(cat /sys/block/$1/stat) | tr ' ' ','; }",
    "for d in vda vdb; do",
    '  [ -b /dev/$d ] || { echo "BENCH-ERROR no /dev/$d"; exit 1; }',
    // No I/O scheduler (the usual setting for virtio disks): mq-deadline only adds guest CPU, which
    // under TCG is the bottleneck, and hides the backends' differences.
    '  echo none > /sys/block/$d/queue/scheduler || { echo "BENCH-ERROR cannot set scheduler of $d"; exit 1; }',
    '  echo "BENCH-INFO disk=$d dev=$(readlink -f /sys/block/$d/device) size=$(cat /sys/block/$d/size)' +
      ' max_segments=$(cat /sys/block/$d/queue/max_segments) max_sectors_kb=$(cat /sys/block/$d/queue/max_sectors_kb)' +
      ' scheduler=$(cat /sys/block/$d/queue/scheduler | tr \' \' _)"',
    "done",
    // seq job disk round rw bs iodepth
    "run() {",
    '  echo "BENCH-START seq=$1 job=$2 disk=$3 round=$4 stat=$(st $3)"',
    `  sleep ${SETTLE_S}`,
    `  fio --name=$2 --filename=/dev/$3 --ioengine=libaio --direct=1 --time_based --ramp_time=${rampS}` +
      ` --runtime=${runtimeS} --numjobs=1 --iodepth=$7 --bs=$6 --rw=$5 --norandommap --randrepeat=0` +
      " --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err",
    "  rc=$?",
    '  echo "BENCH-END seq=$1 job=$2 disk=$3 round=$4 rc=$rc stat=$(st $3)"',
    '  while read -r l; do echo "BENCH-FIO seq=$1 $l"; done </tmp/fio.out',
    '  if [ $rc -ne 0 ]; then while read -r l; do echo "BENCH-FIOERR seq=$1 $l"; done </tmp/fio.err; exit 1; fi',
    "}",
  ];
  for (const s of steps) {
    lines.push(`run ${s.seq} ${s.job.name} ${s.disk} ${s.round} ${s.job.rw} ${s.job.bs} ${s.job.iodepth}`);
  }
  lines.push('echo "BENCH-DONE"');
  return lines.join("\n") + "\n";
}

/** Fields of /sys/block/<dev>/stat we use (Documentation/block/stat.rst). */
export interface DiskStat {
  readIos: number;
  readMerges: number;
  readSectors: number;
  writeIos: number;
  writeMerges: number;
  writeSectors: number;
}

export function parseDiskStat(csv: string): DiskStat {
  const f = csv.split(",").map(Number);
  if (f.length < 11 || f.some((x) => !Number.isFinite(x))) throw new Error(`bad /sys/block stat: ${csv}`);
  return { readIos: f[0]!, readMerges: f[1]!, readSectors: f[2]!, writeIos: f[4]!, writeMerges: f[5]!, writeSectors: f[6]! };
}

/** The figures we take from one fio terse v3 line (field numbers are 1-based, see fio's HOWTO). */
export interface FioResult {
  readIops: number;
  writeIops: number;
  readKiB: number;
  writeKiB: number;
  /** Mean total latency (µs), of reads or writes, whichever the job did. */
  latMeanUs: number;
  /** Guest-side CPU usage of fio (usr+sys %), for interest. */
  guestCpuPct: number;
  raw: string;
}

export function parseFioTerse(line: string): FioResult {
  const f = line.split(";");
  if (f[0] !== "3" || f.length < 90) throw new Error(`not a fio terse v3 line: ${line.slice(0, 200)}`);
  const num = (i: number) => Number(String(f[i - 1]).replace("%", ""));
  if (num(5) !== 0) throw new Error(`fio reported error ${num(5)}: ${line.slice(0, 200)}`);
  const readIops = num(8);
  const writeIops = num(49);
  return {
    readIops,
    writeIops,
    readKiB: num(6),
    writeKiB: num(47),
    latMeanUs: readIops >= writeIops ? num(40) : num(81),
    guestCpuPct: num(88) + num(89),
    raw: line,
  };
}

export type Marker =
  | { type: "info"; disk: string; fields: Record<string, string> }
  | { type: "start"; seq: number; job: string; disk: string; round: number; stat: DiskStat }
  | { type: "end"; seq: number; job: string; disk: string; round: number; rc: number; stat: DiskStat }
  | { type: "fio"; seq: number; line: string }
  | { type: "fioerr"; seq: number; line: string }
  | { type: "error"; line: string }
  | { type: "done" };

function kv(s: string): Record<string, string> {
  const o: Record<string, string> = {};
  for (const part of s.trim().split(/\s+/)) {
    const i = part.indexOf("=");
    if (i > 0) o[part.slice(0, i)] = part.slice(i + 1);
  }
  return o;
}

export function parseMarker(line: string): Marker | null {
  // Unanchored: a kernel message may share the line's beginning (rare with "quiet").
  const m = /BENCH-([A-Z]+)(?: (.*))?$/.exec(line.trim());
  if (!m) return null;
  const rest = m[2] ?? "";
  switch (m[1]) {
    case "INFO": {
      const o = kv(rest);
      return { type: "info", disk: o.disk ?? "?", fields: o };
    }
    case "START":
    case "END": {
      const o = kv(rest);
      const base = { seq: Number(o.seq), job: o.job!, disk: o.disk!, round: Number(o.round), stat: parseDiskStat(o.stat!) };
      return m[1] === "START" ? { type: "start", ...base } : { type: "end", ...base, rc: Number(o.rc) };
    }
    case "FIO":
    case "FIOERR": {
      const mm = /^seq=(\d+) (.*)$/.exec(rest);
      if (!mm) return { type: "error", line };
      return { type: m[1] === "FIO" ? "fio" : "fioerr", seq: Number(mm[1]), line: mm[2]! };
    }
    case "DONE":
      return { type: "done" };
    default:
      return { type: "error", line };
  }
}

/** Splits a chunked stream into complete lines. */
export class LineSplitter {
  private buf = "";
  constructor(private readonly onLine: (line: string) => void) {}
  push(chunk: string): void {
    this.buf += chunk;
    let i: number;
    while ((i = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 1);
      this.onLine(line);
    }
  }
}
