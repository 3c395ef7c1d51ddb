#!/usr/bin/env bun
/**
 * Block bench: our vhost-user-blk backend side by side with qemu-storage-daemon in a real QEMU guest.
 *
 *   bun run bench:block [--rounds 3] [--runtime 5] [--ramp 1] [--order both|a|b] [--jobs a,b]
 *                       [--peer-only] [--profile] [--source] [--qsd-aio threads] [--serial]
 *
 * One guest boot per disk order (A: ours=vda qsd=vdb, B: swapped). In each boot the guest runs every
 * fio job on vda and vdb back to back, round after round; the host samples both backends'
 * utime+stime (/proc/PID/stat) exactly when the guest announces a job's start and end on the serial
 * console. Per job it prints the median IOPS of each backend, the ratio ours/qsd, and the host CPU each
 * backend spent per I/O. See bench/README.md.
 */
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { bootGuest, ensureRig, type Rig } from "../test/e2e/rig.ts";
import {
  CLK_TCK,
  createImage,
  createImages,
  cpuTicks,
  findPidByCmdline,
  hostBusyTicks,
  socketPath,
  startNbdServer,
  startOurs,
  startQsd,
  tail,
  type Backend,
  type BackendKind,
  type NbdServer,
} from "./lib/backends.ts";
import {
  guestScript,
  JOBS,
  LineSplitter,
  parseFioTerse,
  parseMarker,
  plan,
  SETTLE_S,
  type DiskStat,
  type FioResult,
  type Step,
} from "./lib/guest.ts";
import { fmt, fmtInt, max, median, min, spreadPct, table } from "./lib/stats.ts";
import { jitDumpEnv, startPerf } from "./lib/perf.ts";
import { CephCluster } from "../test/support/ceph_cluster.ts";

const ROOT = resolve(import.meta.dir, "..");

const USAGE = `usage: bun run bench:block [options]
  --rounds N        rounds per boot (default 3; each round runs every job once per disk)
  --runtime S       fio --runtime per job in seconds (default 5)
  --ramp S          fio --ramp_time in seconds (default 1)
  --order O         both (default), a (ours=vda, qsd=vdb) or b (qsd=vda, ours=vdb)
  --jobs LIST       comma-separated subset of: ${JOBS.map((j) => j.name).join(", ")}
  --image-mib N     size of each /dev/shm image (default 1024)
  --queue-size N    virtqueue size for both disks (default 128, QEMU's default)
  --peer-only       serve both disks with qemu-storage-daemon (harness check; also BENCH_PEER_ONLY=1)
  --profile         run ours as \`bun --cpu-prof app/main.ts\` (profiles land in bench/results/; CPU figures
                    of ours are then inflated by the profiler)
  --perf            also record ours with \`perf record -g\` (all threads; kernel and native frames resolve, JIT'd JS
                    is named with its tier through JSC's JITDump) into bench/results/, and print a per-DSO/symbol summary
  --source          run ours from source (\`bun app/main.ts\`) instead of dist/backend
  --ours-bin PATH   run this backend executable instead of dist/backend (e.g. another checkout's build)
  --peer-bin PATH   serve the peer disk with this build of ours instead of qsd (two builds side by side in one
                    guest: "qsd" in the tables is then that build; e.g. --peer-bin /tmp/old/dist/backend)
  --ours-arg ARG    extra argument for \`backend device block\` (repeatable, e.g. --ours-arg=--direct)
  --qsd-aio A       aio= of qsd's file driver: threads (default, qsd's own default), io_uring, native
  --qsd-iothread    run qsd's export in an iothread (default: main loop, qsd's default)
  --nbd             both disks on one NBD export: qemu-nbd serving one raw /dev/shm image on a unix socket, ours
                    by its URI, qsd through its nbd driver; the server's CPU per I/O is reported apart
  --rbd             both disks on one Ceph RBD image of a single-node cluster (one mon, one memstore OSD), ours by
                    its rbd: spec, qsd through its rbd driver; the OSD's CPU per I/O is reported apart
  --serial          echo the guest's serial console to stderr
  --out PATH        JSON result file (default bench/results/block-<date>.json)`;

interface Sample {
  order: "A" | "B";
  seq: number;
  round: number;
  job: string;
  disk: "vda" | "vdb";
  backend: BackendKind;
  /** fio's IOPS (after ramp), reads + writes. */
  iops: number;
  latMeanUs: number;
  guestCpuPct: number;
  /** I/Os of the job's size transferred in the CPU window (ramp included), from the guest's disk stats. */
  ios: number;
  /** Requests the device completed in the window (differs from ios if the guest merged or split). */
  requests: number;
  /** Host CPU (utime+stime) of the serving backend in the window, seconds. */
  cpuS: number;
  /** Host CPU of the other (idle) backend in the same window, seconds: a sanity check, should be ~0. */
  idleCpuS: number;
  /** Host wall time of the window, seconds. */
  wallS: number;
  /** QEMU's host CPU in the window, seconds (vCPUs under TCG + its I/O thread). */
  qemuCpuS: number;
  /** Host CPU used by everything else (not QEMU, not the backends, not this harness), in cores. */
  foreignCores: number;
  cpuUsPerIo: number;
  /** The NBD server's CPU per I/O in the window (--nbd; 0 without): common to both backends, in neither's. */
  serverCpuUsPerIo: number;
  fio: string;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    args: process.argv.slice(2),
    options: {
      rounds: { type: "string", default: "3" },
      runtime: { type: "string", default: "5" },
      ramp: { type: "string", default: "1" },
      order: { type: "string", default: "both" },
      jobs: { type: "string" },
      "image-mib": { type: "string", default: "1024" },
      "queue-size": { type: "string", default: "128" },
      "peer-only": { type: "boolean", default: false },
      profile: { type: "boolean", default: false },
      perf: { type: "boolean", default: false },
      source: { type: "boolean", default: false },
      "ours-bin": { type: "string" },
      "peer-bin": { type: "string" },
      "ours-arg": { type: "string", multiple: true, default: [] },
      "qsd-aio": { type: "string", default: "threads" },
      "qsd-iothread": { type: "boolean", default: false },
      nbd: { type: "boolean", default: false },
      rbd: { type: "boolean", default: false },
      serial: { type: "boolean", default: false },
      out: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (a.help) {
    console.log(USAGE);
    return;
  }
  const posInt = (name: string, v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} ${v}: expected a positive integer`);
    return n;
  };
  const rounds = posInt("rounds", a.rounds!);
  const runtimeS = posInt("runtime", a.runtime!);
  const rampS = Number(a.ramp);
  if (!Number.isInteger(rampS) || rampS < 0) throw new Error(`--ramp ${a.ramp}: expected an integer >= 0`);
  const imageBytes = posInt("image-mib", a["image-mib"]!) * 1024 * 1024;
  const queueSize = posInt("queue-size", a["queue-size"]!);
  const peerOnly = a["peer-only"] || process.env.BENCH_PEER_ONLY === "1";
  const orders: ("A" | "B")[] = a.order === "both" ? ["A", "B"] : a.order === "a" ? ["A"] : a.order === "b" ? ["B"] : [];
  if (orders.length === 0) throw new Error(`--order ${a.order}: expected both, a or b`);
  const jobs = a.jobs
    ? a.jobs.split(",").map((n) => {
        const j = JOBS.find((x) => x.name === n.trim());
        if (!j) throw new Error(`unknown job ${n}; known: ${JOBS.map((x) => x.name).join(", ")}`);
        return j;
      })
    : JOBS;
  if (!["threads", "io_uring", "native"].includes(a["qsd-aio"]!)) throw new Error(`--qsd-aio ${a["qsd-aio"]}`);
  if (peerOnly && a.profile) throw new Error("--profile profiles our backend; it makes no sense with --peer-only");
  const peerBin = a["peer-bin"] ? resolve(a["peer-bin"]) : undefined;
  if (peerBin !== undefined && (peerOnly || !existsSync(peerBin))) throw new Error(`--peer-bin ${peerBin}: not found, or with --peer-only`);

  const rig = await ensureRig();
  const oursCmd = peerOnly ? [] : await prepareOurs({ profile: a.profile!, source: a.source!, bin: a["ours-bin"] });

  const date = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "");
  const resultsDir = join(ROOT, "bench", "results");
  mkdirSync(resultsDir, { recursive: true });
  const profileDir = join(resultsDir, `block-${date}-cpuprof`);
  const jitDumpDir = join(resultsDir, `block-${date}-jitdump`);
  if (a.perf) mkdirSync(jitDumpDir, { recursive: true });
  const outPath = a.out ? resolve(a.out) : join(resultsDir, `block-${date}.json`);

  // Named by our pid: two benches at once (a shared machine) must not remove each other's images.
  const images: Record<BackendKind, string> = { ours: `/dev/shm/bench-${process.pid}-ours.img`, qsd: `/dev/shm/bench-${process.pid}-qsd.img` };
  const tmp = mkdtempSync(join(tmpdir(), "bench-block-"));
  const steps = plan(jobs, rounds);
  const nbdTarget = a.nbd!;
  if (nbdTarget && (peerOnly || peerBin !== undefined)) throw new Error("--nbd compares ours with qsd's nbd driver: not with --peer-only or --peer-bin");
  const rbdTarget = a.rbd!;
  if (rbdTarget && (peerOnly || peerBin !== undefined || nbdTarget)) throw new Error("--rbd compares ours with qsd's rbd driver: not with --peer-only, --peer-bin or --nbd");
  const qsdDesc = peerBin !== undefined
    ? `[--peer-bin] ${peerBin} device block --num-queues 1 --queue-size ${queueSize}${a["ours-arg"]!.length ? " " + a["ours-arg"]!.join(" ") : ""}`
    : nbdTarget
    ? `qemu-storage-daemon driver=nbd (the export on a unix socket) ${a["qsd-iothread"] ? " iothread" : " main-loop"} num-queues=1`
    : rbdTarget
    ? `qemu-storage-daemon driver=rbd (librbd, cache writeback) ${a["qsd-iothread"] ? " iothread" : " main-loop"} num-queues=1`
    : `qemu-storage-daemon driver=file cache.direct=off (buffered) aio=${a["qsd-aio"]}` +
    `${a["qsd-iothread"] ? " iothread" : " main-loop"} num-queues=1`;
  const oursDesc = peerOnly
    ? `[--peer-only] a second ${qsdDesc}`
    : `${oursCmd.map((c) => c.replace(ROOT + "/", "")).join(" ")} device block --num-queues 1 --queue-size ${queueSize}` +
      `${a["ours-arg"]!.length ? " " + a["ours-arg"]!.join(" ") : ""} (${a["ours-arg"]!.includes("--direct") ? "O_DIRECT" : "buffered"})`;
  const perBootS = steps.length * (SETTLE_S + rampS + runtimeS + 2) + 10;

  console.log(`block bench: ${jobs.length} jobs x ${rounds} rounds x 2 disks per boot, boots: ${orders.join(", ")}`);
  console.log(`  ours: ${oursDesc}`);
  console.log(`  qsd:  ${qsdDesc}`);
  console.log(
    `  fio: libaio direct=1 time_based runtime=${runtimeS}s ramp=${rampS}s numjobs=1; guest: TCG -smp 2; ` +
      `images: ${rbdTarget ? `one RBD image of ${imageBytes >> 20} MiB (memstore OSD) for both disks` : `${imageBytes >> 20} MiB fallocate'd on /dev/shm${nbdTarget ? " (one, behind qemu-nbd on a unix socket, for both disks)" : ""}`}; queue-size=${queueSize}`,
  );
  console.log(`  expected duration: ~${Math.round((perBootS * orders.length) / 60)} min\n`);
  if (a.profile) console.log(`  --profile: ours runs under bun --cpu-prof; its CPU figures include profiler overhead\n`);

  const samples: Sample[] = [];
  const infos: Record<string, Record<string, string>> = {};
  const started = Date.now();
  try {
    for (const order of orders) {
      // --nbd: one image, one server for both disks (one disk runs I/O at a time), fresh per boot.
      let server: NbdServer | null = null;
      // --rbd: one cluster and image for both disks, fresh per boot.
      let cluster: CephCluster | null = null;
      if (nbdTarget) {
        createImage(images.ours, imageBytes);
        server = await startNbdServer(images.ours, join(tmp, "nbd.sock"), "bench");
      } else if (rbdTarget) {
        cluster = await startRbdTarget(imageBytes);
      } else createImages([images.ours, images.qsd], imageBytes); // together: the same mix of host pages (createImages)
      const backends = await startBackends({
        nbd: server ?? undefined,
        rbd: cluster ?? undefined,
        peerOnly,
        oursCmd,
        oursArgs: a["ours-arg"]!,
        images,
        tmp,
        queueSize,
        rig,
        qsdAio: a["qsd-aio"]!,
        qsdIothread: a["qsd-iothread"]!,
        peerBin,
        jitDumpDir: a.perf && !peerOnly ? jitDumpDir : undefined,
        profileDir: a.profile ? profileDir : undefined,
      });
      try {
        const vda = order === "A" ? backends.ours : backends.qsd;
        const vdb = order === "A" ? backends.qsd : backends.ours;
        const t0 = Date.now();
        const perfOut = join(resultsDir, `block-${date}-${order}.perf.data`);
        const perf = a.perf && !peerOnly ? startPerf(backends.ours.pid, perfOut, jitDumpDir) : null;
        const res = await runBoot({ order, steps, runtimeS, rampS, vda, vdb, rig, queueSize, serial: a.serial!, timeoutMs: perBootS * 3000 + 120_000, serverPid: server?.pid ?? cluster?.osdPid });
        if (perf) {
          const top = await perf.stop();
          console.log(`  perf: ${perfOut.replace(ROOT + "/", "")} (perf report -i ... --sort dso,sym); top of ours:\n` + top.slice(0, 30).map((l) => "    " + l).join("\n"));
        }
        samples.push(...res.samples);
        infos[order] = res.info;
        console.log(`  boot ${order} done in ${((Date.now() - t0) / 1000).toFixed(0)} s (${res.samples.length} samples)`);
        for (const b of [backends.ours, backends.qsd]) b.assertAlive();
      } finally {
        await backends.ours.stop();
        await backends.qsd.stop();
        await server?.stop();
        await cluster?.stop();
      }
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
    for (const p of Object.values(images)) rmSync(p, { force: true });
  }
  const elapsedS = (Date.now() - started) / 1000;

  // ---- report ----
  const rows: string[][] = [];
  const summary: Record<string, unknown>[] = [];
  for (const job of jobs) {
    const of = (b: BackendKind) => samples.filter((s) => s.job === job.name && s.backend === b);
    const o = of("ours");
    const q = of("qsd");
    const iopsO = median(o.map((s) => s.iops));
    const iopsQ = median(q.map((s) => s.iops));
    const cpuO = median(o.map((s) => s.cpuUsPerIo));
    const cpuQ = median(q.map((s) => s.cpuUsPerIo));
    // Paired: ours vs qsd in the same boot, round and job (run back to back), so slow changes of the
    // host's load cancel out; the median of those ratios is a cross-check of the ratio of medians.
    const pairs = o.flatMap((so) => {
      const sq = q.find((x) => x.order === so.order && x.round === so.round);
      return sq ? [{ iops: so.iops / sq.iops, cpu: so.cpuUsPerIo / sq.cpuUsPerIo }] : [];
    });
    const pIops = median(pairs.map((p) => p.iops));
    const pCpu = median(pairs.map((p) => p.cpu));
    rows.push([
      job.name,
      fmtInt(iopsO),
      fmtInt(iopsQ),
      fmt(iopsO / iopsQ),
      fmt(pIops),
      fmt(cpuO, 1),
      fmt(cpuQ, 1),
      fmt(cpuO / cpuQ),
      fmt(pCpu),
      `${fmt(spreadPct(o.map((s) => s.iops)), 0)}/${fmt(spreadPct(q.map((s) => s.iops)), 0)}`,
      `${fmt(spreadPct(o.map((s) => s.cpuUsPerIo)), 0)}/${fmt(spreadPct(q.map((s) => s.cpuUsPerIo)), 0)}`,
      iopsO / iopsQ >= 1 && cpuO / cpuQ <= 1 ? "yes" : "NO",
    ]);
    const stats = (xs: number[]) => ({ median: median(xs), min: min(xs), max: max(xs), n: xs.length });
    summary.push({
      job: job.name,
      ours: {
        iops: stats(o.map((s) => s.iops)),
        cpuUsPerIo: stats(o.map((s) => s.cpuUsPerIo)),
        cpuCores: stats(o.map((s) => s.cpuS / s.wallS)),
        latMeanUs: stats(o.map((s) => s.latMeanUs)),
        requestsPerIo: stats(o.map((s) => s.requests / s.ios)),
      },
      qsd: {
        iops: stats(q.map((s) => s.iops)),
        cpuUsPerIo: stats(q.map((s) => s.cpuUsPerIo)),
        cpuCores: stats(q.map((s) => s.cpuS / s.wallS)),
        latMeanUs: stats(q.map((s) => s.latMeanUs)),
        requestsPerIo: stats(q.map((s) => s.requests / s.ios)),
      },
      iopsRatio: iopsO / iopsQ,
      cpuPerIoRatio: cpuO / cpuQ,
      pairedIopsRatio: pIops,
      pairedCpuPerIoRatio: pCpu,
      pairs,
    });
  }
  const oursName = peerOnly ? "qsd#2" : "ours";
  console.log(`\nmedians over ${rounds} rounds x ${orders.length} boot(s) = ${rounds * orders.length} samples per cell; elapsed ${fmt(elapsedS / 60, 1)} min`);
  console.log(
    table(
      ["job", `IOPS ${oursName}`, "IOPS qsd", "ratio", "paired", `CPU µs/IO ${oursName}`, "CPU µs/IO qsd", "ratio", "paired", "IOPS spread %", "CPU spread %", "target"],
      rows,
    ),
  );
  console.log(
    "(ratio = ours/qsd of the medians; paired = median of ours/qsd over back-to-back pairs (same boot, round, job);\n" +
      " target: IOPS ratio >= 1.00 and CPU ratio <= 1.00 (ratio of medians); spread = (max-min)/median, ours/qsd)",
  );

  // Disk-slot asymmetry and the rest, for whoever reads the numbers closely.
  const rows2: string[][] = [];
  for (const job of jobs) {
    for (const b of ["ours", "qsd"] as const) {
      const cell = (disk: string) => samples.filter((s) => s.job === job.name && s.backend === b && s.disk === disk);
      const all = samples.filter((s) => s.job === job.name && s.backend === b);
      rows2.push([
        `${job.name} ${b === "ours" ? oursName : b}`,
        fmtInt(median(cell("vda").map((s) => s.iops))),
        fmtInt(median(cell("vdb").map((s) => s.iops))),
        fmt(median(all.map((s) => s.cpuS / s.wallS)), 2),
        fmt(median(all.map((s) => s.latMeanUs)), 0),
        fmt(median(all.map((s) => s.requests / s.ios)), 2),
        fmt(median(all.map((s) => s.guestCpuPct)), 0),
        fmt(median(all.map((s) => s.qemuCpuS / s.wallS)), 2),
        fmt(median(all.map((s) => s.foreignCores)), 2),
        fmt(max(all.map((s) => s.idleCpuS)), 2),
        ...(nbdTarget || rbdTarget ? [fmt(median(all.map((s) => s.serverCpuUsPerIo)), 1)] : []),
      ]);
    }
  }
  console.log(
    "\n" +
      table(
        ["job backend", "IOPS on vda", "IOPS on vdb", "host cores", "lat µs", "reqs/IO", "fio cpu%", "qemu cores", "foreign cores", "idle peer CPU s", ...(nbdTarget || rbdTarget ? ["server µs/IO"] : [])],
        rows2,
      ),
  );
  console.log(
    "(host cores = backend CPU s / wall s in the window; reqs/IO = device requests per fio I/O (merging/splitting);\n" +
      " qemu cores = QEMU's CPU (TCG vCPUs + I/O thread); foreign cores = host CPU used by anything else;\n" +
      " idle peer CPU = max CPU the other, idle backend burnt during a job — should be ~0)",
  );
  const foreign = samples.map((s) => s.foreignCores);
  if (max(foreign) > 0.1) {
    console.log(
      `\nWARNING: other processes used host CPU during the jobs (median ${fmt(median(foreign), 2)}, max ${fmt(max(foreign), 2)} ` +
        `of ${navigator.hardwareConcurrency} cores): IOPS and even CPU/IO are noisier than on an idle host.`,
    );
  }

  const gitHead = Bun.spawnSync(["git", "-C", ROOT, "rev-parse", "HEAD"]).stdout.toString().trim();
  const gitDirty = Bun.spawnSync(["git", "-C", ROOT, "status", "--porcelain"]).stdout.toString().trim() !== "";
  const result = {
    date: new Date().toISOString(),
    git: { head: gitHead, dirty: gitDirty },
    host: { clkTck: CLK_TCK, nproc: navigator.hardwareConcurrency, kernel: Bun.spawnSync(["uname", "-r"]).stdout.toString().trim() },
    rig: { qemu: rig.qemu, qsd: rig.qemuStorageDaemon, kernel: rig.kernelVersion },
    config: {
      rounds,
      runtimeS,
      rampS,
      settleS: SETTLE_S,
      orders,
      jobs,
      imageBytes,
      queueSize,
      peerOnly,
      profile: a.profile,
      ours: oursDesc,
      qsd: qsdDesc,
    },
    guestDisks: infos,
    elapsedS,
    summary,
    samples,
  };
  writeFileSync(outPath, JSON.stringify(result, null, 2) + "\n");
  console.log(`\nresults: ${outPath.replace(ROOT + "/", "")}`);
  if (a.profile) {
    const profs = existsSync(profileDir) ? readdirSync(profileDir) : [];
    console.log(
      profs.length
        ? `profiles (SamplingProfile.*.txt: JSC sampler, one per thread incl. queue threads — the hot path;\n` +
            ` CPU.*.cpuprofile/.md: bun --cpu-prof, main thread only; open .cpuprofile in Chrome DevTools):\n` +
            profs.map((p) => `  ${join(profileDir, p).replace(ROOT + "/", "")}`).join("\n")
        : `no cpu profile was written to ${profileDir} (did ours exit cleanly on SIGTERM?)`,
    );
  }
}

/** The argv prefix that runs our backend; rebuilds dist/backend when a source file is newer. */
async function prepareOurs(o: { profile: boolean; source: boolean; bin?: string }): Promise<string[]> {
  if (o.bin) {
    if (!existsSync(o.bin)) throw new Error(`--ours-bin ${o.bin}: no such file`);
    return [resolve(o.bin)];
  }
  const { DEVICES } = await import("../app/registry.ts");
  if (!DEVICES.block) {
    throw new Error(
      "our block device is not registered in app/registry.ts yet: run with --peer-only (or BENCH_PEER_ONLY=1) " +
        "to bench qsd against qsd",
    );
  }
  if (o.profile) {
    // `bun --cpu-prof` profiles only the main thread (checked with Bun 1.4.5), and our hot path runs in
    // the device worker and the queue threads; the env-enabled JavaScriptCore sampling profiler (see
    // startBackends) covers every thread. Both write on exit, so ours must exit cleanly on SIGTERM.
    return [process.execPath, "--cpu-prof", "--cpu-prof-md", "--cpu-prof-dir=__PROFILE_DIR__", join(ROOT, "app/main.ts")];
  }
  if (o.source) return [process.execPath, join(ROOT, "app/main.ts")];
  const bin = join(ROOT, "dist/backend");
  const newest = newestMtime([join(ROOT, "src"), join(ROOT, "devices"), join(ROOT, "ffi"), join(ROOT, "build.ts"), join(ROOT, "package.json")]);
  if (!existsSync(bin) || statSync(bin).mtimeMs < newest) {
    console.log(`dist/backend is ${existsSync(bin) ? "older than the sources" : "missing"}: bun run build`);
    const r = Bun.spawnSync([process.execPath, "run", "build"], { cwd: ROOT, stdout: "inherit", stderr: "inherit" });
    if (r.exitCode !== 0) throw new Error("bun run build failed");
  }
  return [bin];
}

function newestMtime(paths: string[]): number {
  let newest = 0;
  const walk = (p: string) => {
    if (!existsSync(p)) return;
    const st = statSync(p);
    if (st.isDirectory()) for (const e of readdirSync(p)) walk(join(p, e));
    else if (/\.(ts|json|c|h)$/.test(p)) newest = Math.max(newest, st.mtimeMs);
  };
  for (const p of paths) walk(p);
  return newest;
}

/**
 * A single-node Ceph cluster with one image, rbd/bench, written through once (a read of an object
 * never written costs the OSD less); librbd's cache writeback from the start for both backends (it
 * stays writethrough until a client's first flush otherwise, and when each backend sees the guest's
 * first flush differs).
 */
async function startRbdTarget(imageBytes: number): Promise<CephCluster> {
  const cluster = await CephCluster.start();
  try {
    appendFileSync(cluster.conf, "\n[client]\nrbd cache writethrough until flush = false\n");
    cluster.createPool("rbd");
    cluster.createImage("rbd", "bench", imageBytes);
    cluster.rbd(["bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "4", "--io-total", String(imageBytes), "--io-pattern", "seq", "rbd/bench"]);
    return cluster;
  } catch (e) {
    await cluster.stop();
    throw e;
  }
}

async function startBackends(o: {
  peerOnly: boolean;
  oursCmd: string[];
  oursArgs: string[];
  images: Record<BackendKind, string>;
  /** Both disks on this NBD server's export instead of the images. */
  nbd?: NbdServer;
  /** Both disks on this cluster's image rbd/bench instead (startRbdTarget). */
  rbd?: CephCluster;
  tmp: string;
  queueSize: number;
  rig: Rig;
  qsdAio: string;
  qsdIothread: boolean;
  /** Serve the "qsd" slot with this build of ours instead. */
  peerBin?: string;
  /** Have ours write JITDump files here (for --perf: JS frames named). */
  jitDumpDir?: string;
  profileDir?: string;
}): Promise<Record<BackendKind, Backend>> {
  const qsdOpts = (kind: BackendKind) => ({
    qsd: o.rig.qemuStorageDaemon,
    image: o.images[kind],
    nbd: o.nbd,
    rbd: o.rbd === undefined ? undefined : { pool: "rbd", image: "bench", conf: o.rbd.conf },
    socket: socketPath(o.tmp, kind),
    numQueues: 1,
    queueSize: o.queueSize,
    aio: o.qsdAio,
    iothread: o.qsdIothread,
  });
  const qsd = o.peerBin !== undefined
    ? await startOurs("qsd", { command: [o.peerBin], extraArgs: o.oursArgs, image: o.images.qsd, socket: socketPath(o.tmp, "qsd"), numQueues: 1, queueSize: o.queueSize })
    : await startQsd("qsd", qsdOpts("qsd"));
  let ours: Backend;
  try {
    if (o.peerOnly) {
      ours = await startQsd("ours", qsdOpts("ours"));
    } else {
      if (o.profileDir) mkdirSync(o.profileDir, { recursive: true });
      ours = await startOurs("ours", {
        command: o.oursCmd.map((c) => c.replace("__PROFILE_DIR__", o.profileDir ?? "")),
        // JavaScriptCore's own sampling profiler, per VM (main thread, device worker, each queue thread):
        // one SamplingProfile.*.txt per thread with the hottest functions and bytecodes, on exit.
        env: {
          ...(o.profileDir ? { BUN_JSC_useSamplingProfiler: "1", BUN_JSC_samplingProfilerPath: o.profileDir } : {}),
          ...(o.jitDumpDir ? jitDumpEnv(o.jitDumpDir) : {}),
        },
        extraArgs: o.oursArgs,
        image: o.nbd?.uri ?? (o.rbd === undefined ? o.images.ours : `rbd:rbd/bench:conf=${o.rbd.conf}`),
        socket: socketPath(o.tmp, "ours"),
        numQueues: 1,
        queueSize: o.queueSize,
      });
    }
  } catch (e) {
    await qsd.stop();
    throw e;
  }
  return { ours, qsd };
}

async function runBoot(o: {
  order: "A" | "B";
  steps: Step[];
  runtimeS: number;
  rampS: number;
  vda: Backend;
  vdb: Backend;
  rig: Rig;
  queueSize: number;
  serial: boolean;
  timeoutMs: number;
  /** The NBD server behind both disks (--nbd): its CPU is sampled too, and is not foreign load. */
  serverPid?: number;
}): Promise<{ samples: Sample[]; info: Record<string, string> }> {
  const byDisk = { vda: o.vda, vdb: o.vdb };
  const qmpPath = join(dirname(o.vda.socket), `qmp-${o.order}.sock`);
  const backends = [o.vda, o.vdb];
  const samples: Sample[] = [];
  const info: Record<string, string> = {};
  interface Snap {
    /** utime+stime ticks per backend pid. */
    ticks: Map<number, number>;
    /** QEMU's utime+stime ticks. */
    qemu: number;
    /** The NBD server's utime+stime ticks (0 without one). */
    server: number;
    /** Busy ticks of the whole host. */
    host: number;
    /** This harness's own CPU, µs. */
    selfUs: number;
  }
  interface Open {
    step: Step;
    ticks0: Snap;
    t0: number;
    stat0: DiskStat;
    ticks1?: Snap;
    t1?: number;
    stat1?: DiskStat;
  }
  let qemuPid: number | null = null;
  let open: Open | undefined;
  let nextSeq = 0;
  let failure: Error | undefined;
  let done = false;
  const sample = (): Snap => {
    const ticks = new Map<number, number>();
    for (const b of backends) {
      b.assertAlive();
      ticks.set(b.pid, cpuTicks(b.pid));
    }
    qemuPid ??= findPidByCmdline(qmpPath);
    if (qemuPid === null) throw new Error(`cannot find the QEMU process (no cmdline with ${qmpPath})`);
    const u = process.cpuUsage();
    return { ticks, qemu: cpuTicks(qemuPid), server: o.serverPid ? cpuTicks(o.serverPid) : 0, host: hostBusyTicks(), selfUs: u.user + u.system };
  };
  const fail = (msg: string) => {
    failure ??= new Error(`boot ${o.order}: ${msg}`);
  };

  const onLine = (line: string) => {
    if (failure) return;
    let mk;
    try {
      mk = parseMarker(line);
    } catch (e) {
      return fail(`cannot parse ${JSON.stringify(line)}: ${(e as Error).message}`);
    }
    if (!mk) return;
    try {
      switch (mk.type) {
        case "info":
          info[mk.disk] = Object.entries(mk.fields).map(([k, v]) => `${k}=${v}`).join(" ");
          break;
        case "start": {
          // Sample first: the guest sleeps SETTLE_S before fio starts, everything else can wait.
          const ticks0 = sample();
          const t0 = performance.now();
          const step = o.steps[mk.seq];
          if (mk.seq !== nextSeq || !step || step.disk !== mk.disk || step.job.name !== mk.job) {
            return fail(`unexpected START ${line} (expected seq ${nextSeq})`);
          }
          if (open) return fail(`START ${mk.seq} while ${open.step.seq} is still open`);
          open = { step, ticks0, t0, stat0: mk.stat };
          break;
        }
        case "end": {
          const ticks1 = sample();
          const t1 = performance.now();
          if (!open || open.step.seq !== mk.seq) return fail(`END ${mk.seq} without its START`);
          if (mk.rc !== 0) return fail(`fio failed (rc ${mk.rc}) in ${line}`);
          open.ticks1 = ticks1;
          open.t1 = t1;
          open.stat1 = mk.stat;
          break;
        }
        case "fio": {
          if (!open || open.step.seq !== mk.seq || !open.ticks1) return fail(`FIO ${mk.seq} out of order`);
          finish(open, parseFioTerse(mk.line));
          open = undefined;
          nextSeq++;
          break;
        }
        case "fioerr":
          return fail(`fio error: ${mk.line}`);
        case "error":
          return fail(`guest: ${line}`);
        case "done":
          done = true;
          break;
      }
    } catch (e) {
      fail((e as Error).message);
    }
  };

  const finish = (w: Open, fio: FioResult) => {
    const { step } = w;
    const serving = byDisk[step.disk];
    const idle = serving === o.vda ? o.vdb : o.vda;
    const d = (b: Backend) => (w.ticks1!.ticks.get(b.pid)! - w.ticks0.ticks.get(b.pid)!) / CLK_TCK;
    const wallS = (w.t1! - w.t0) / 1000;
    const qemuCpuS = (w.ticks1!.qemu - w.ticks0.qemu) / CLK_TCK;
    const hostS = (w.ticks1!.host - w.ticks0.host) / CLK_TCK;
    const selfS = (w.ticks1!.selfUs - w.ticks0.selfUs) / 1e6;
    const serverS = (w.ticks1!.server - w.ticks0.server) / CLK_TCK;
    // Everything else the host ran meanwhile (other guests, builds...): the noise we cannot control.
    const foreignCores = Math.max(0, hostS - qemuCpuS - d(o.vda) - d(o.vdb) - selfS - serverS) / wallS;
    const sectors = w.stat1!.readSectors - w.stat0.readSectors + (w.stat1!.writeSectors - w.stat0.writeSectors);
    const requests = w.stat1!.readIos - w.stat0.readIos + (w.stat1!.writeIos - w.stat0.writeIos);
    const ios = (sectors * 512) / step.job.bsBytes;
    if (ios <= 0) throw new Error(`no I/O reached ${step.disk} during ${step.job.name} (seq ${step.seq})`);
    const cpuS = d(serving);
    const s: Sample = {
      order: o.order,
      seq: step.seq,
      round: step.round,
      job: step.job.name,
      disk: step.disk,
      backend: serving.label,
      iops: fio.readIops + fio.writeIops,
      latMeanUs: fio.latMeanUs,
      guestCpuPct: fio.guestCpuPct,
      ios,
      requests,
      cpuS,
      idleCpuS: d(idle),
      wallS,
      qemuCpuS,
      foreignCores,
      cpuUsPerIo: (cpuS / ios) * 1e6,
      serverCpuUsPerIo: (serverS / ios) * 1e6,
      fio: fio.raw,
    };
    samples.push(s);
    console.log(
      `  [${o.order} r${step.round} ${step.disk}=${s.backend.padEnd(4)}] ${step.job.name.padEnd(18)} ` +
        `${fmtInt(s.iops).padStart(7)} IOPS  ${fmt(s.cpuUsPerIo, 1).padStart(6)} µs/IO  ` +
        `(cpu ${fmt(cpuS, 2)} s for ${fmtInt(ios)} I/Os, idle peer ${fmt(s.idleCpuS, 2)} s, ` +
        `qemu ${fmt(qemuCpuS / wallS, 2)} cores, foreign load ${fmt(foreignCores, 2)} cores)`,
    );
  };

  const splitter = new LineSplitter(onLine);
  // On a failure (a backend died, fio failed, a marker is off) stop the guest at once through QMP
  // instead of letting it run the remaining jobs, or hang on a dead disk until the timeout.
  let quitting = false;
  const abort = () => {
    if (quitting) return;
    quitting = true;
    void qmpQuit(qmpPath);
  };
  const watchdog = setInterval(() => {
    try {
      for (const b of backends) b.assertAlive();
    } catch (e) {
      fail((e as Error).message);
    }
    if (failure) abort();
  }, 500);
  const q = o.queueSize;
  // Explicit PCI slots: vda is the lower slot (virtio_blk probes in PCI order); the guest prints each
  // disk's sysfs path so the mapping is checked below rather than assumed.
  const devices = [
    "-chardev", `socket,id=blk0,path=${o.vda.socket}`,
    "-device", `vhost-user-blk-pci,chardev=blk0,num-queues=1,queue-size=${q},addr=0x8`,
    "-chardev", `socket,id=blk1,path=${o.vdb.socket}`,
    "-device", `vhost-user-blk-pci,chardev=blk1,num-queues=1,queue-size=${q},addr=0x9`,
  ];
  const r = await bootGuest({
    command: guestScript(o.steps, o.runtimeS, o.rampS),
    devices,
    memoryMiB: 512,
    timeoutMs: o.timeoutMs,
    extraArgs: ["-smp", "2", "-qmp", `unix:${qmpPath},server=on,wait=off`],
    onSerial: (chunk) => {
      if (o.serial) process.stderr.write(chunk);
      splitter.push(chunk);
      if (failure) abort();
    },
  }).finally(() => clearInterval(watchdog));
  const context = () =>
    `\nqemu exit ${r.qemuExitCode}, guest exit ${r.exitStatus}\nqemu stderr:\n${tail(r.stderr, 20)}\n` +
    `serial tail:\n${tail(r.serial, 30)}\n` +
    backends.map((b) => `${b.label} (${b.kind}) output:\n${tail(b.output(), 15)}`).join("\n");
  if (failure) throw new Error(failure.message + context());
  for (const b of backends) b.assertAlive();
  if (r.exitStatus !== 0 || !done) throw new Error(`boot ${o.order}: guest did not finish the bench` + context());
  if (samples.length !== o.steps.length) {
    throw new Error(`boot ${o.order}: ${samples.length} of ${o.steps.length} jobs reported` + context());
  }
  for (const [disk, slot] of [["vda", "0000:00:08.0"], ["vdb", "0000:00:09.0"]] as const) {
    if (!info[disk]?.includes(slot)) throw new Error(`boot ${o.order}: ${disk} is not the device in slot ${slot}: ${info[disk]}`);
  }
  return { samples, info };
}

/** Asks QEMU to quit through its QMP socket (best effort). */
async function qmpQuit(path: string): Promise<void> {
  try {
    const sock = await Bun.connect({
      unix: path,
      socket: {
        open(s) {
          s.write('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
        },
        data() {},
      },
    });
    setTimeout(() => sock.end(), 2000).unref();
  } catch {
    // QEMU already gone.
  }
}

main().catch((e) => {
  console.error(`bench:block FAILED: ${(e as Error).stack ?? e}`);
  process.exit(1);
});
