// `backend device console`: a virtio-console over vhost-user, with crosvm's host options
// (--output-file, --input-file, --syslog; stdin/stdout by default) plus SIZE, EMERG_WRITE and
// MULTIPORT ports.
import type { DeviceDefinition, DeviceContext } from "../../src/device.ts";
import { ConsoleDevice, type PortSetup } from "./device.ts";
import { VIRTIO_ID_CONSOLE } from "./config.ts";
import { parseConsoleOptions, checkPaths, type PortEndpointOptions, type ConsoleOptions } from "./options.ts";
import {
  openStdin, openInputFile, openStdStream, openOutputFile, openSyslog, inputFrom, outputFrom, releaseAcquired,
  type AcquiredInput, type AcquiredOutput,
} from "./host_io.ts";
import { NO_HOST_ACCESS } from "../../src/host_access.ts";
import { optionError } from "../../src/cli_args.ts";

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

function openInput(o: PortEndpointOptions, isPort0: boolean): AcquiredInput | null {
  if (o.inputFile !== null) return openInputFile(o.inputFile);
  return isPort0 ? openStdin() : null;
}

function openOutput(o: PortEndpointOptions, isPort0: boolean, tag: string, syslogSocket: string): AcquiredOutput | null {
  if (o.syslog) return openSyslog(tag, syslogSocket);
  if (o.outputFile !== null) return openOutputFile(o.outputFile);
  return isPort0 ? openStdStream(1) : null; // other ports without an output discard it
}

/** Every port's host side as opened in the acquire phase: plain data. */
interface AcquiredPort {
  name: string | null;
  input: AcquiredInput | null;
  output: AcquiredOutput | null;
}

function releasePorts(ports: readonly AcquiredPort[]): void {
  for (const p of ports) {
    if (p.input !== null) releaseAcquired(p.input);
    if (p.output !== null) releaseAcquired(p.output);
  }
}

/** Opens every port's host side (acquire phase); on a failure, closes what was opened. */
function openPorts(o: ConsoleOptions): AcquiredPort[] {
  const acquired: AcquiredPort[] = [];
  const all = [{ ...o.port0, name: null }, ...o.ports];
  try {
    all.forEach((p, i) => {
      const tag = p.name !== null ? `console-${p.name}` : i === 0 ? "console" : `console-port${i}`;
      const a: AcquiredPort = { name: p.name, input: null, output: null };
      acquired.push(a);
      const opt = (key: string, path: string | null) => (i === 0 ? `--${key} ${path}` : `--port ${p.name ?? i}: ${key} ${path}`);
      try {
        a.input = openInput(p, i === 0);
      } catch (e) {
        throw p.inputFile !== null ? optionError(opt("input-file", p.inputFile), e) : e;
      }
      try {
        a.output = openOutput(p, i === 0, tag, o.syslogSocket);
      } catch (e) {
        throw p.outputFile !== null ? optionError(opt("output-file", p.outputFile), e) : e;
      }
    });
  } catch (e) {
    releasePorts(acquired);
    throw e;
  }
  return acquired;
}

/** The device thread's endpoints for the acquired ports (terminals go to raw mode here). */
function portSetup(ports: readonly AcquiredPort[]): PortSetup[] {
  return ports.map((p) => ({
    name: p.name,
    input: p.input !== null ? inputFrom(p.input) : null,
    output: p.output !== null ? outputFrom(p.output) : null,
  }));
}

export const consoleDevice: DeviceDefinition<ConsoleOptions, AcquiredPort[]> = {
  name: "console",
  virtioId: VIRTIO_ID_CONSOLE,
  capabilities: { type: "console" },
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
  acquire: openPorts,
  release: releasePorts,
  // Everything is opened in acquire; a syslog daemon restarted later is not reconnected to.
  hostAccess: () => NO_HOST_ACCESS,
  create(o, ports: AcquiredPort[], ctx: DeviceContext) {
    return new ConsoleDevice(ctx, portSetup(ports), o.configSpace);
  },
};
