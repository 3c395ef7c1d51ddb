// Our console backend serving a real Linux guest through QEMU's generic vhost-user-device-pci
// (virtio-id=3, num_vqs=2, config_size=0): the guest sees /dev/hvc0. The last two tests give the
// device a config space (config_size=12) for MULTIPORT and SIZE.
//
// hvc resets its termios on the last close, so each guest script keeps /dev/hvc0 open on fd 3 and
// puts it in raw mode first: binary data then passes the tty layer unchanged in both directions.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import { bootGuest, ensureRig, SETUP_TIMEOUT_MS, tail, type BootOptions, type BootResult, type Rig } from "./rig.ts";
import { startBackend, type RunningBackend } from "./backend.ts";
import { open, ioctl, O_RDWR, O_NONBLOCK } from "../../ffi/io.ts";
import { close } from "../../ffi/libc.ts";

let rig: Rig & { qemuConsole: string };
let dir: string;
const running: RunningBackend[] = [];

beforeAll(async () => {
  rig = await ensureRig({ consoleQemu: true }); // the patched QEMU with a user-creatable vhost-user-device-pci
  dir = mkdtempSync(join(tmpdir(), "e2e-console-"));
}, SETUP_TIMEOUT_MS);

afterAll(() => {
  for (const b of running) b.proc.kill("SIGKILL");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex");

/**
 * Boots a guest with our console as its virtio-console; asserts the guest command and the backend
 * exit cleanly. `device` is the vhost-user-device-pci queue/config layout.
 */
async function withConsole(
  name: string,
  args: string[],
  boot: Omit<BootOptions, "devices" | "qemu">,
  opts: { stdin?: "pipe"; onBackend?: (b: RunningBackend) => void; device?: string } = {},
): Promise<BootResult> {
  const sock = join(dir, `${name}.sock`);
  const backend = await startBackend("console", sock, ["--log-level", "warn", ...args], { stdin: opts.stdin });
  running.push(backend);
  opts.onBackend?.(backend);
  const r = await bootGuest({
    ...boot,
    qemu: rig.qemuConsole,
    devices: ["-chardev", `socket,id=c0,path=${sock}`, "-device", `vhost-user-device-pci,chardev=c0,virtio-id=3,${opts.device ?? "num_vqs=2,config_size=0"}`],
    timeoutMs: boot.timeoutMs ?? 180_000,
  });
  const stopped = await backend.stop();
  if (r.exitStatus !== 0 || stopped.code !== 0) {
    console.error(`guest serial:\n${tail(r.serial, 40)}\nqemu stderr:\n${tail(r.stderr, 20)}\nbackend:\n${tail(stopped.stderr, 20)}`);
  }
  expect(r.exitStatus).toBe(0);
  expect(stopped.code).toBe(0);
  return r;
}

function guestMd5(serial: string, file: string): string {
  const m = new RegExp(`^([0-9a-f]{32})  ${file}$`, "m").exec(serial);
  if (!m) throw new Error(`no md5sum of ${file} in the guest output`);
  return m[1]!;
}

describe("console device in a QEMU guest", () => {
  test("guest output to /dev/hvc0 reaches --output-file byte-exact: text, then 1 MiB of random data", async () => {
    const out = join(dir, "out.bin");
    const text = "hello from the guest over hvc0\n";
    const r = await withConsole("output", ["--output-file", out], {
      command: `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
printf '${text.trimEnd()}\\n' >&3
head -c 1048576 /dev/urandom >/tmp/r
cat /tmp/r >&3
md5sum /tmp/r
`,
    });
    const file = readFileSync(out);
    expect(file.subarray(0, text.length).toString()).toBe(text);
    expect(file.length).toBe(text.length + (1 << 20));
    expect(md5(file.subarray(text.length))).toBe(guestMd5(r.serial, "/tmp/r"));
  }, 240_000);

  test("-m 6G (a region of exactly 4 GiB at 4 GiB, rings and buffers anywhere): guest output byte-exact", async () => {
    const out = join(dir, "out-6g.bin");
    const r = await withConsole("output-6g", ["--output-file", out], {
      memoryMiB: 6144,
      command: `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
head -c 4194304 /dev/urandom >/tmp/r
cat /tmp/r >&3
md5sum /tmp/r
`,
    });
    const file = readFileSync(out);
    expect(file.length).toBe(4 << 20);
    expect(md5(file)).toBe(guestMd5(r.serial, "/tmp/r"));
  }, 240_000);

  test("host input on the backend's stdin reaches a guest reader byte-exact", async () => {
    const data = randomBytes(256 * 1024);
    let backend: RunningBackend | undefined;
    let sent = false;
    let serial = ""; // the marker may arrive split over chunks
    const r = await withConsole(
      "input",
      ["--output-file", join(dir, "input-test.out")],
      {
        // The input is sent only once the guest has hvc0 in raw mode (else the tty would translate
        // and echo it); until then it would wait in the device anyway.
        command: `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
echo E2E-READY-FOR-INPUT
head -c ${data.length} <&3 >/tmp/in
md5sum /tmp/in
`,
        onSerial: (chunk) => {
          serial += chunk;
          if (!sent && serial.includes("E2E-READY-FOR-INPUT\n")) {
            sent = true;
            const stdin = backend!.proc.stdin as import("bun").FileSink;
            stdin.write(data);
            void stdin.flush();
          }
        },
      },
      { stdin: "pipe", onBackend: (b) => (backend = b) },
    );
    expect(sent).toBe(true);
    expect(guestMd5(r.serial, "/tmp/in")).toBe(md5(data));
  }, 240_000);

  test("a guest booted with console=hvc0 writes its boot log to the output file", async () => {
    const out = join(dir, "boot.log");
    // The last console= becomes /dev/console (the rig's init reports on it): keep that ttyS0, so
    // the kernel logs to both and the two logs can be compared.
    const r = await withConsole("bootlog", ["--output-file", out], {
      command: "echo on-serial",
      kernelCmdline: "console=hvc0 console=ttyS0 loglevel=7",
    });
    // hvc drops what the kernel prints before the virtio-console is probed (~3 s into a TCG boot),
    // so the log starts there; from then on it is the kernel's log up to power-off.
    const lines = readFileSync(out, "utf8").split("\r\n").filter((l) => l !== "");
    expect(lines.length).toBeGreaterThan(20);
    expect(lines.some((l) => l.includes("Run /init as init process"))).toBe(true);
    expect(lines.at(-1)).toMatch(/reboot: Power down$/);
    const serialLines = new Set(r.serial.split("\n"));
    expect(lines.filter((l) => !serialLines.has(l))).toEqual([]);
    console.log(`[console] boot log on hvc0: ${lines.length} lines, from "${lines[0]}"`);
  }, 240_000);

  test("guest→host throughput through /dev/hvc0 (measured in the guest)", async () => {
    const out = join(dir, "throughput.bin");
    const mib = 16;
    const r = await withConsole("throughput", ["--output-file", out], {
      command: `
set -e
exec 3<>/dev/hvc0
stty raw -echo <&3
head -c ${mib * 1048576} /dev/urandom >/tmp/r
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/r bs=65536 >&3 2>/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
echo "E2E-TX t0=$t0 t1=$t1"
md5sum /tmp/r
`,
      timeoutMs: 300_000,
    });
    const m = /E2E-TX t0=([\d.]+) t1=([\d.]+)/.exec(r.serial)!;
    const seconds = Number(m[2]) - Number(m[1]);
    const file = readFileSync(out);
    expect(file.length).toBe(mib << 20);
    expect(md5(file)).toBe(guestMd5(r.serial, "/tmp/r"));
    // /proc/uptime has 10 ms resolution: 16 MiB keeps that well under the run-to-run noise of TCG.
    console.log(`[console] guest→host: ${mib} MiB by dd in ${seconds.toFixed(2)} s = ${(mib / Math.max(seconds, 0.01)).toFixed(1)} MiB/s under TCG`);
  }, 360_000);
  test("MULTIPORT (num_vqs=6, config_size=12): hvc0 plus a named port with its own files", async () => {
    const out0 = join(dir, "mp0.out");
    const out1 = join(dir, "mp1.out");
    const in1 = join(dir, "mp1.in");
    writeFileSync(in1, "hello port one\n");
    const r = await withConsole(
      "multiport",
      ["--output-file", out0, "--input-file", "/dev/null", "--port", `name=org.test.log,output-file=${out1},input-file=${in1}`],
      {
        // One open of the port for both directions: Linux drops unread port input on close.
        command: `
set -e
for p in /sys/class/virtio-ports/*; do echo "E2E-PORT $(basename $p) name=$(cat $p/name 2>/dev/null)"; done
exec 3<>/dev/hvc0
stty raw -echo <&3
echo "on hvc0" >&3
exec 4<>/dev/vport0p1
echo "on vport" >&4
echo "E2E-READ $(head -c 14 <&4)"
`,
      },
      { device: "num_vqs=6,config_size=12" },
    );
    expect(r.serial).toContain("E2E-PORT vport0p1 name=org.test.log");
    expect(r.serial).toContain("E2E-READ hello port one");
    expect(readFileSync(out0, "utf8")).toBe("on hvc0\n");
    expect(readFileSync(out1, "utf8")).toBe("on vport\n");
  }, 240_000);

  test("SIZE (config_size=12, --config-space, a terminal as input): the guest sees the size and a SIGWINCH resize", async () => {
    // A pty stands in for the user's terminal.
    const master = open("/dev/ptmx", O_RDWR | 0o400 /* O_NOCTTY */ | O_NONBLOCK);
    try {
      ioctl(master, 0x40045431 /* TIOCSPTLCK */, new Uint8Array(4));
      const n = new Uint8Array(4);
      ioctl(master, 0x80045430 /* TIOCGPTN */, n);
      const slave = `/dev/pts/${new DataView(n.buffer).getUint32(0, true)}`;
      const setSize = (cols: number, rows: number) => {
        const ws = new Uint8Array(8);
        const v = new DataView(ws.buffer);
        v.setUint16(0, rows, true);
        v.setUint16(2, cols, true);
        ioctl(master, 0x5414 /* TIOCSWINSZ */, ws);
      };
      setSize(100, 30);
      let backend: RunningBackend | undefined;
      let serial = "";
      let resized = false;
      const r = await withConsole(
        "size",
        ["--output-file", join(dir, "size.out"), "--input-file", slave, "--config-space"],
        {
          command: `
exec 3<>/dev/hvc0
i=0; while [ "$(stty size <&3)" = "0 0" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
first=$(stty size <&3)
echo "E2E-SIZE-1 $first"
i=0; while [ "$(stty size <&3)" = "$first" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo "E2E-SIZE-2 $(stty size <&3)"
`,
          onSerial: (chunk) => {
            serial += chunk;
            if (!resized && serial.includes("E2E-SIZE-1")) {
              resized = true;
              setSize(132, 43);
              backend!.proc.kill("SIGWINCH");
            }
          },
        },
        { device: "num_vqs=2,config_size=12", onBackend: (b) => (backend = b) },
      );
      expect(r.serial).toContain("E2E-SIZE-1 30 100"); // stty size prints rows cols
      expect(r.serial).toContain("E2E-SIZE-2 43 132");
    } finally {
      close(master);
    }
  }, 240_000);
});
