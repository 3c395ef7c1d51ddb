// `backend device net` options: the citty definitions and one parser shared by the main thread
// (validate, before the socket exists) and the worker (create), so both read the command line the
// same way. Accepts our own spellings and crosvm's (`--tap-name SOCK,NAME`, `--tap-fd SOCK,FD`,
// `--device SOCK,IP,MASK,MAC`), whose first field is the vhost-user socket.
import { booleanOption, intOption } from "../../src/cli_args.ts";
import { MAX_QUEUE_SIZE } from "../../src/ring.ts";
import { IFNAMSIZ } from "../../ffi/tap.ts";

/** How the host side is reached: an existing tap, an inherited tap fd, or a tap we create. */
export type TapSource =
  | { kind: "name"; name: string }
  | { kind: "fd"; fd: number }
  | { kind: "create"; hostIp: Uint8Array; netmask: Uint8Array; hostMac: Uint8Array | null };

export interface NetOptions {
  tap: TapSource;
  /** The socket a crosvm spelling named (null: none did); see resolveSocket(). */
  socketPath: string | null;
  /** The guest's MAC (VIRTIO_NET_F_MAC); null: the front-end picks one. */
  mac: Uint8Array | null;
  /** MTU offered to the guest (VIRTIO_NET_F_MTU); null: the tap's own MTU. */
  mtu: number | null;
  queuePairs: number;
  mrgRxbuf: boolean;
  /** Offer checksum/segmentation offloads (as far as the tap accepts them). */
  offloads: boolean;
  queueSize: number;
  /** How frames move between the rings and the tap: batched through io_uring, one system call per frame, or io_uring when the kernel allows it. */
  netIo: NetIo;
}

export type NetIo = "uring" | "syscall" | "auto";
const NET_IO: readonly NetIo[] = ["uring", "syscall", "auto"];

export const MIN_MTU = 68;
export const MAX_MTU = 65535;
export const MAX_QUEUE_PAIRS = 16;
/** QEMU's virtio-net rx/tx_queue_size default (crosvm and cloud-hypervisor use 256 too). */
export const DEFAULT_QUEUE_SIZE = 256;
const MIN_QUEUE_SIZE = 64;

/** Options that may be given more than once on a crosvm command line; we serve one device, so more than one is an error we can name. */
export const NET_REPEATABLE = ["tap-name", "tap-fd", "device"];

export const NET_ARGS = {
  "tap-name": {
    type: "string",
    valueHint: "NAME|SOCK,NAME",
    description:
      "Attach to the existing tap NAME (`ip tuntap add mode tap NAME vnet_hdr [multi_queue]`; multi_queue for --queue-pairs > 1). " +
      "crosvm's SOCK,NAME also names the vhost-user socket (--socket may then be left out, or must name the same path; not with --fd)",
  },
  "tap-fd": {
    type: "string",
    valueHint: "FD|SOCK,FD",
    description: "Use an inherited tap fd opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (one queue pair). crosvm's SOCK,FD also names the socket, as for --tap-name",
  },
  "host-ip": { type: "string", valueHint: "IP", description: "Create a tap with this IPv4 address on the host side (needs CAP_NET_ADMIN; with --netmask)" },
  netmask: { type: "string", valueHint: "MASK", description: "The created tap's netmask, e.g. 255.255.255.0 (with --host-ip)" },
  "host-mac": { type: "string", valueHint: "MAC", description: "The created tap's own MAC (with --host-ip; default: random)" },
  device: {
    type: "string",
    valueHint: "SOCK,IP,MASK,MAC",
    description: "crosvm's form of --socket SOCK --host-ip IP --netmask MASK --host-mac MAC (SOCK as for --tap-name SOCK,NAME)",
  },
  mac: { type: "string", valueHint: "MAC", description: "The guest's MAC address, offered in the config space (VIRTIO_NET_F_MAC; default: the front-end's)" },
  mtu: { type: "string", description: `MTU offered to the guest (VIRTIO_NET_F_MTU), ${MIN_MTU}-${MAX_MTU}; sets a created tap's MTU. Default: the tap's MTU` },
  "queue-pairs": { type: "string", default: "1", description: `Receive/transmit queue pairs (1-${MAX_QUEUE_PAIRS}); more than 1 needs a multi_queue tap` },
  "mrg-rxbuf": { type: "boolean", default: true, negativeDescription: "Do not offer VIRTIO_NET_F_MRG_RXBUF", description: "Offer mergeable receive buffers (VIRTIO_NET_F_MRG_RXBUF)" },
  offloads: {
    type: "boolean",
    default: true,
    negativeDescription: "Offer no checksum or segmentation offloads",
    description: "Offer the checksum and TSO/UFO/USO offloads the tap accepts, and pass the guest's choice on to the tap",
  },
  "net-io": {
    type: "string",
    default: "auto",
    valueHint: "uring|syscall|auto",
    description:
      "How frames move to and from the tap: uring batches them (one io_uring_enter per batch), syscall uses one writev per frame, " +
      "auto uses io_uring where the kernel (or a sandbox) allows it",
  },
  "queue-size": { type: "string", default: String(DEFAULT_QUEUE_SIZE), description: `The front-end's ring size (QEMU's rx/tx_queue_size), a power of 2 in ${MIN_QUEUE_SIZE}..${MAX_QUEUE_SIZE}` },
} as const;

function parseInt10(v: string): number {
  return /^[0-9]+$/.test(v) ? Number(v) : NaN;
}


/** One value of an option that may arrive as an array (NET_REPEATABLE); null when absent. */
function single(raw: Record<string, unknown>, name: string): string | null {
  const v = raw[name];
  if (v === undefined || v === null) return null;
  const values = Array.isArray(v) ? v : [v];
  if (values.length === 0) return null;
  if (values.length > 1) throw new Error(`--${name} given ${values.length} times: one backend serves one net device; start one per device`);
  const s = values[0];
  if (typeof s !== "string" || s === "") throw new Error(`--${name} needs a value`);
  return s;
}

export function parseMac(s: string, what: string): Uint8Array {
  if (!/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/.test(s)) throw new Error(`${what}: '${s}' is not a MAC address (write it as 52:54:00:12:34:56)`);
  const mac = Uint8Array.from(s.split(":").map((h) => parseInt(h, 16)));
  if (mac.every((b) => b === 0)) throw new Error(`${what}: ${s} is the zero MAC address`);
  if ((mac[0]! & 1) !== 0) throw new Error(`${what}: ${s} is a multicast address (the first byte must be even, e.g. 52:54:00:...)`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join(":");
}

export function parseIpv4(s: string, what: string): Uint8Array {
  const parts = s.split(".");
  const bytes = parts.map(parseInt10);
  if (parts.length !== 4 || bytes.some((b) => !(b >= 0 && b <= 255))) throw new Error(`${what}: '${s}' is not an IPv4 address (a.b.c.d)`);
  return Uint8Array.from(bytes);
}

function parseNetmask(s: string, what: string): Uint8Array {
  const m = parseIpv4(s, what);
  const bits = ((m[0]! << 24) | (m[1]! << 16) | (m[2]! << 8) | m[3]!) >>> 0;
  const inverted = ~bits >>> 0;
  if (bits === 0 || (inverted & (inverted + 1)) !== 0) throw new Error(`${what}: '${s}' is not a netmask (contiguous ones, e.g. 255.255.255.0)`);
  return m;
}

export function checkTapName(name: string, what: string): string {
  if (Buffer.byteLength(name) >= IFNAMSIZ) throw new Error(`${what}: interface name '${name}' is longer than ${IFNAMSIZ - 1} bytes`);
  if (name === "." || name === ".." || /[/:\s%]/.test(name)) throw new Error(`${what}: '${name}' is not a valid interface name`);
  return name;
}

function checkFd(s: string, what: string): number {
  const fd = parseInt10(s);
  if (!Number.isInteger(fd) || fd > 0x7fffffff) throw new Error(`${what}: '${s}' is not a file descriptor number`);
  return fd;
}

/**
 * Splits crosvm's `SOCK,REST` forms. The tap name or fd never contains a comma, so the socket is
 * everything before the last `fields` commas (crosvm splits at the first comma instead, which
 * breaks socket paths with commas).
 */
function splitCrosvm(value: string, fields: number): { socket: string | null; rest: string[] } {
  const parts = value.split(",");
  if (parts.length <= fields) return { socket: null, rest: parts };
  const rest = parts.slice(parts.length - fields);
  const socket = parts.slice(0, parts.length - fields).join(",");
  return { socket: socket === "" ? null : socket, rest };
}

/** Parses and checks the options (no system access); throws a message naming the option and the fix. */
export function parseNetOptions(raw: Record<string, unknown>): NetOptions {
  const tapName = single(raw, "tap-name");
  const tapFd = single(raw, "tap-fd");
  const device = single(raw, "device");
  const hostIp = single(raw, "host-ip");
  const netmask = single(raw, "netmask");
  const hostMac = single(raw, "host-mac");

  const given = [tapName !== null && "--tap-name", tapFd !== null && "--tap-fd", device !== null && "--device", hostIp !== null && "--host-ip"].filter(Boolean);
  if (given.length !== 1) {
    throw new Error(
      given.length === 0
        ? "give the host side: --tap-name NAME (an existing tap), --tap-fd FD (an inherited tap fd) or --host-ip IP --netmask MASK (create a tap)"
        : `${given.join(" and ")} exclude each other: give exactly one host side`,
    );
  }
  let tap: TapSource;
  let socketPath: string | null = null;
  if (tapName !== null) {
    const { socket, rest } = splitCrosvm(tapName, 1);
    socketPath = socket;
    tap = { kind: "name", name: checkTapName(rest[0]!, "--tap-name") };
  } else if (tapFd !== null) {
    const { socket, rest } = splitCrosvm(tapFd, 1);
    socketPath = socket;
    tap = { kind: "fd", fd: checkFd(rest[0]!, "--tap-fd") };
  } else if (device !== null) {
    const { socket, rest } = splitCrosvm(device, 3);
    if (socket === null) throw new Error(`--device: '${device}' is not SOCK,IP,MASK,MAC (e.g. /run/vm/net.sock,10.0.2.2,255.255.255.0,12:34:56:78:9a:bc)`);
    if (netmask !== null || hostMac !== null) throw new Error("--device already gives the netmask and MAC: drop --netmask/--host-mac");
    socketPath = socket;
    tap = { kind: "create", hostIp: parseIpv4(rest[0]!, "--device IP"), netmask: parseNetmask(rest[1]!, "--device MASK"), hostMac: parseMac(rest[2]!, "--device MAC") };
  } else {
    if (netmask === null) throw new Error("--host-ip needs --netmask MASK (e.g. 255.255.255.0)");
    tap = { kind: "create", hostIp: parseIpv4(hostIp!, "--host-ip"), netmask: parseNetmask(netmask, "--netmask"), hostMac: hostMac === null ? null : parseMac(hostMac, "--host-mac") };
  }
  if (tap.kind !== "create" && (netmask !== null || hostMac !== null)) {
    throw new Error("--netmask and --host-mac configure a tap we create: use them with --host-ip, or configure your tap with `ip addr`/`ip link`");
  }

  const queuePairs = intOption(raw, "queue-pairs", 1, 1, MAX_QUEUE_PAIRS);
  if (tap.kind === "fd" && queuePairs !== 1) throw new Error(`--tap-fd gives one tap queue: --queue-pairs ${queuePairs} needs --tap-name NAME of a multi_queue tap`);
  const queueSize = intOption(raw, "queue-size", DEFAULT_QUEUE_SIZE, MIN_QUEUE_SIZE, MAX_QUEUE_SIZE);
  if ((queueSize & (queueSize - 1)) !== 0) throw new Error(`--queue-size: ${queueSize} is not a power of 2`);
  const netIoRaw = raw["net-io"] ?? "auto";
  if (typeof netIoRaw !== "string" || !NET_IO.includes(netIoRaw as NetIo)) throw new Error(`--net-io: '${String(netIoRaw)}' is not one of ${NET_IO.join(", ")}`);
  const macRaw = single(raw, "mac");
  const mtuRaw = raw.mtu;
  if (mtuRaw === "") throw new Error(`--mtu needs a value (${MIN_MTU}-${MAX_MTU})`);
  return {
    tap,
    socketPath,
    mac: macRaw === null ? null : parseMac(macRaw, "--mac"),
    mtu: mtuRaw === undefined || mtuRaw === null ? null : intOption(raw, "mtu", 0, MIN_MTU, MAX_MTU),
    queuePairs,
    mrgRxbuf: booleanOption(raw, "mrg-rxbuf", true),
    offloads: booleanOption(raw, "offloads", true),
    queueSize,
    netIo: netIoRaw as NetIo,
  };
}

/**
 * The one vhost-user socket, from --socket/--socket-path/--fd (the common options) and a crosvm
 * spelling's SOCK: a crosvm SOCK alone is the socket; with --socket or --socket-path it must name
 * the same path; with --fd it is an error. Returns the path, or null when --fd is the socket.
 */
export function resolveSocket(raw: Record<string, unknown>, o: NetOptions): string | null {
  const explicit = (raw.socket ?? raw["socket-path"]) as string | undefined;
  if (o.socketPath === null) return explicit ?? null;
  if (raw.fd !== undefined) throw new Error(`the crosvm form names socket ${o.socketPath} but --fd gives the socket: drop 'SOCK,' from the option`);
  if (explicit !== undefined && explicit !== o.socketPath) {
    throw new Error(`the crosvm form names socket ${o.socketPath} but --socket says ${explicit}: give the socket once`);
  }
  return o.socketPath;
}
