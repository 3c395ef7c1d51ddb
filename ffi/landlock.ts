// Thin bindings for Landlock (landlock(7)): the three system calls through syscall(), and the
// access-right bits of <linux/landlock.h>. Which rights to grant is src/sandbox/landlock.ts's
// business.
import { ptr } from "bun:ffi";
import { libc, check, errno } from "./libc.ts";

const sys = libc.syscall;
const SYS_landlock_create_ruleset = 444;
const SYS_landlock_add_rule = 445;
const SYS_landlock_restrict_self = 446;

export const LANDLOCK_CREATE_RULESET_VERSION = 1;
export const LANDLOCK_RULE_PATH_BENEATH = 1;
export const LANDLOCK_RULE_NET_PORT = 2;

// Filesystem rights, with the ABI version that introduced each.
export const ACCESS_FS = {
  EXECUTE: 1n << 0n,
  WRITE_FILE: 1n << 1n,
  READ_FILE: 1n << 2n,
  READ_DIR: 1n << 3n,
  REMOVE_DIR: 1n << 4n,
  REMOVE_FILE: 1n << 5n,
  MAKE_CHAR: 1n << 6n,
  MAKE_DIR: 1n << 7n,
  MAKE_REG: 1n << 8n,
  MAKE_SOCK: 1n << 9n,
  MAKE_FIFO: 1n << 10n,
  MAKE_BLOCK: 1n << 11n,
  MAKE_SYM: 1n << 12n,
  REFER: 1n << 13n, // ABI 2
  TRUNCATE: 1n << 14n, // ABI 3
  IOCTL_DEV: 1n << 15n, // ABI 5
} as const;

/** Every filesystem right a ruleset of ABI `abi` can handle. */
export function fsRightsOfAbi(abi: number): bigint {
  let all = (1n << 13n) - 1n;
  if (abi >= 2) all |= ACCESS_FS.REFER;
  if (abi >= 3) all |= ACCESS_FS.TRUNCATE;
  if (abi >= 5) all |= ACCESS_FS.IOCTL_DEV;
  return all;
}

// Network rights (ABI 4).
export const ACCESS_NET_BIND_TCP = 1n;
export const ACCESS_NET_CONNECT_TCP = 2n;

// Scopes (ABI 6).
export const SCOPE_ABSTRACT_UNIX_SOCKET = 1n;
export const SCOPE_SIGNAL = 2n;

/** The Landlock ABI version of the running kernel, or -errno (EOPNOTSUPP: disabled, ENOSYS: absent). */
export function landlockAbi(): number {
  const r = sys(SYS_landlock_create_ruleset, 0, 0, LANDLOCK_CREATE_RULESET_VERSION, 0, 0, 0);
  return r < 0 ? -errno() : Number(r);
}

export interface RulesetAttr {
  handledFs: bigint;
  handledNet: bigint;
  scoped: bigint;
}

/**
 * landlock_create_ruleset: a ruleset fd. `abi` decides the attribute size passed (8 bytes before
 * ABI 4, 16 before ABI 6, 24 from ABI 6), so older kernels do not see fields they reject.
 */
export function createRuleset(attr: RulesetAttr, abi: number): number {
  const buf = new BigUint64Array([attr.handledFs, attr.handledNet, attr.scoped]);
  const size = abi >= 6 ? 24 : abi >= 4 ? 16 : 8;
  return check(sys(SYS_landlock_create_ruleset, ptr(buf), size, 0, 0, 0, 0), "landlock_create_ruleset");
}

/** Allows `access` beneath the file or directory open as `parentFd` (an O_PATH fd is enough). */
export function addPathRule(rulesetFd: number, parentFd: number, access: bigint): void {
  const attr = new DataView(new ArrayBuffer(16)); // struct landlock_path_beneath_attr is packed: 12 bytes
  attr.setBigUint64(0, access, true);
  attr.setInt32(8, parentFd, true);
  check(sys(SYS_landlock_add_rule, rulesetFd, LANDLOCK_RULE_PATH_BENEATH, ptr(attr), 0, 0, 0), "landlock_add_rule(path)");
}

/** Allows `access` (bind/connect) on TCP `port` (ABI 4). */
export function addNetPortRule(rulesetFd: number, port: number, access: bigint): void {
  const attr = new BigUint64Array([access, BigInt(port)]);
  check(sys(SYS_landlock_add_rule, rulesetFd, LANDLOCK_RULE_NET_PORT, ptr(attr), 0, 0, 0), "landlock_add_rule(net)");
}

/** Restricts the calling thread (and what it execs or starts later) with the ruleset. Needs no_new_privs or CAP_SYS_ADMIN. */
export function restrictSelf(rulesetFd: number, flags = 0): void {
  check(sys(SYS_landlock_restrict_self, rulesetFd, flags, 0, 0, 0, 0), "landlock_restrict_self");
}
