// Thin bindings for Landlock (landlock(7)): the three system calls through syscall(), and the
// access-right bits of <linux/landlock.h>. Which rights to grant is src/sandbox/landlock.ts's
// business.
import { ptr } from "bun:ffi";
import { libc, check, errno, SYS } from "./libc.ts";

const sys = libc.syscall;

/** landlock_add_rule's rule types (enum landlock_rule_type, LANDLOCK_RULE_*). */
export const LANDLOCK_RULE = {
  PATH_BENEATH: 1,
  NET_PORT: 2,
} as const;

/** Access right `n` (the header's `1ULL << n`). */
const right = (n: number): bigint => 1n << BigInt(n);

/** Filesystem rights (LANDLOCK_ACCESS_FS_*), with the ABI version that introduced each. */
export const ACCESS_FS = {
  EXECUTE: right(0),
  WRITE_FILE: right(1),
  READ_FILE: right(2),
  READ_DIR: right(3),
  REMOVE_DIR: right(4),
  REMOVE_FILE: right(5),
  MAKE_CHAR: right(6),
  MAKE_DIR: right(7),
  MAKE_REG: right(8),
  MAKE_SOCK: right(9),
  MAKE_FIFO: right(10),
  MAKE_BLOCK: right(11),
  MAKE_SYM: right(12),
  REFER: right(13), // ABI 2
  TRUNCATE: right(14), // ABI 3
  IOCTL_DEV: right(15), // ABI 5
} as const;

/** Every filesystem right a ruleset of ABI `abi` can handle. */
export function fsRightsOfAbi(abi: number): bigint {
  let all = ACCESS_FS.REFER - 1n; // ABI 1: every right below REFER
  if (abi >= 2) all |= ACCESS_FS.REFER;
  if (abi >= 3) all |= ACCESS_FS.TRUNCATE;
  if (abi >= 5) all |= ACCESS_FS.IOCTL_DEV;
  return all;
}

/** Network rights, ABI 4 (LANDLOCK_ACCESS_NET_*). */
export const ACCESS_NET = {
  BIND_TCP: right(0),
  CONNECT_TCP: right(1),
} as const;

/** Scopes, ABI 6 (LANDLOCK_SCOPE_*). */
export const SCOPE = {
  ABSTRACT_UNIX_SOCKET: right(0),
  SIGNAL: right(1),
} as const;

/** landlock_create_ruleset's flag: return the ABI version instead of a ruleset. */
export const LANDLOCK_CREATE_RULESET_VERSION = 1;

/** The Landlock ABI version of the running kernel, or -errno (EOPNOTSUPP: disabled, ENOSYS: absent). */
export function landlockAbi(): number {
  const r = sys(SYS.landlock_create_ruleset, 0, 0, LANDLOCK_CREATE_RULESET_VERSION, 0, 0, 0);
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
  return check(sys(SYS.landlock_create_ruleset, ptr(buf), size, 0, 0, 0, 0), "landlock_create_ruleset");
}

/** Allows `access` beneath the file or directory open as `parentFd` (an O_PATH fd is enough). */
export function addPathRule(rulesetFd: number, parentFd: number, access: bigint): void {
  const attr = new DataView(new ArrayBuffer(16)); // struct landlock_path_beneath_attr is packed: 12 bytes
  attr.setBigUint64(0, access, true);
  attr.setInt32(8, parentFd, true);
  check(sys(SYS.landlock_add_rule, rulesetFd, LANDLOCK_RULE.PATH_BENEATH, ptr(attr), 0, 0, 0), "landlock_add_rule(path)");
}

/** Allows `access` (bind/connect) on TCP `port` (ABI 4). */
export function addNetPortRule(rulesetFd: number, port: number, access: bigint): void {
  const attr = new BigUint64Array([access, BigInt(port)]);
  check(sys(SYS.landlock_add_rule, rulesetFd, LANDLOCK_RULE.NET_PORT, ptr(attr), 0, 0, 0), "landlock_add_rule(net)");
}

/** Restricts the calling thread (and what it execs or starts later) with the ruleset. Needs no_new_privs or CAP_SYS_ADMIN. */
export function restrictSelf(rulesetFd: number, flags = 0): void {
  check(sys(SYS.landlock_restrict_self, rulesetFd, flags, 0, 0, 0, 0), "landlock_restrict_self");
}
