// `backend device console`: a virtio-console over vhost-user, with crosvm's host options
// (--output-file, --input-file, --syslog; stdin/stdout by default) plus SIZE, EMERG_WRITE and
// MULTIPORT ports.
import type { DeviceDefinition, DeviceContext } from "../../src/device.ts";
import { ConsoleDevice, type PortSetup } from "./device.ts";
import { VIRTIO_ID_CONSOLE } from "./config.ts";
import { parseConsoleOptions, checkPaths, type PortEndpointOptions, type ConsoleOptions } from "./options.ts";
import { openStdin, openInputFile, openStdStream, openOutputFile, openSyslog, type InputSource, type OutputSink } from "./host_io.ts";

const args = {
  "output-file": {
    type: "string",
    valueHint: "PATH",
    description: "Append port 0's guest output to this file (created if missing; a FIFO waits for its reader, nothing is lost). Default: stdout",
  },
  "input-file": {
    type: "string",
    valueHint: "PATH",
    description: "Read port 0's guest input from this file, FIFO or terminal; end of file ends input, not the device. Default: stdin (raw mode while it is a terminal)",
  },
  syslog: {
    type: "boolean",
    description: "Send port 0's guest output to syslog, one message per line, instead of stdout",
  },
  "syslog-socket": {
    type: "string",
    valueHint: "PATH",
    description: "The syslog socket for --syslog and syslog ports (default /dev/log; stderr when nothing listens there)",
  },
  port: {
    type: "string",
    valueHint: "SPEC",
    description:
      "Add a port, SPEC = name=NAME,output-file=PATH,input-file=PATH,syslog (repeatable; every key optional): MULTIPORT with the control queues, the guest sees /dev/vport0pN " +
      "(/dev/virtio-ports/NAME). Needs a front-end config space: QEMU num_vqs=2*(ports+1)+2, config_size=12",
  },
  "config-space": {
    type: "boolean",
    description:
      "The front-end exposes the 12-byte console config space (QEMU vhost-user-device-pci config_size=12): offer EMERG_WRITE, " +
      "and SIZE when port 0's input is a terminal (resized on SIGWINCH). Off by default, as QEMU's config_size=0 needs; --port implies it",
  },
} as const;

function openInput(o: PortEndpointOptions, isPort0: boolean): InputSource | null {
  if (o.inputFile !== null) return openInputFile(o.inputFile);
  return isPort0 ? openStdin() : null;
}

function openOutput(o: PortEndpointOptions, isPort0: boolean, tag: string, syslogSocket: string): OutputSink | null {
  if (o.syslog) return openSyslog(tag, syslogSocket);
  if (o.outputFile !== null) return openOutputFile(o.outputFile);
  return isPort0 ? openStdStream(1) : null; // other ports without an output discard it
}

/** Opens every port's host side; on a failure, closes what was opened (restoring the terminal). */
function openPorts(o: ConsoleOptions): PortSetup[] {
  const setup: PortSetup[] = [];
  const all = [{ ...o.port0, name: null }, ...o.ports];
  try {
    all.forEach((p, i) => {
      const tag = p.name !== null ? `console-${p.name}` : i === 0 ? "console" : `console-port${i}`;
      const s: PortSetup = { name: p.name, input: null, output: null };
      setup.push(s);
      s.input = openInput(p, i === 0);
      s.output = openOutput(p, i === 0, tag, o.syslogSocket);
    });
  } catch (e) {
    for (const s of setup) {
      s.input?.close();
      s.output?.close();
    }
    throw e;
  }
  return setup;
}

export const consoleDevice: DeviceDefinition<ConsoleOptions> = {
  name: "console",
  virtioId: VIRTIO_ID_CONSOLE,
  capabilities: { type: "console", features: [] },
  example: ["--socket", "/run/vm/console.sock", "--output-file", "guest.log"],
  description:
    "virtio-console (port 0: receiveq 0, transmitq 1). Guest output to stdout or --output-file/--syslog, guest input " +
    "from stdin or --input-file. QEMU: -device vhost-user-device-pci,chardev=c0,virtio-id=3,num_vqs=2,config_size=0",
  args,
  repeatable: ["port"],
  hostSignals: { SIGWINCH: "resize" },
  parse(raw) {
    const o = parseConsoleOptions(raw);
    checkPaths(o);
    return o;
  },
  create(o, _resources, ctx: DeviceContext) {
    return new ConsoleDevice(ctx, openPorts(o), o.configSpace);
  },
};
