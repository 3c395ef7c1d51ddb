// Files a front-end shares with us to map (guest memory, the dirty log, the inflight region). A
// mapped page past the end of its file raises SIGBUS on the first touch, which kills the process:
// what is mapped must lie inside the file, and the file must stay that long. Both are checked
// here, before mapping, in one place for every mapping.
import { fstat, fcntl, S_IFMT, S_IFREG } from "../ffi/io.ts";

const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
const F_SEAL_SEAL = 0x0001;
const F_SEAL_SHRINK = 0x0002;

/** How well a file is protected against being truncated under our mapping. */
export type ShrinkGuard = "sealed" | "sealed-now" | "unsealable" | "not-memfd";

/**
 * A memfd that allows sealing gets F_SEAL_SHRINK here (QEMU's memory-backend-memfd and its
 * vhost log seal by default; the seal only forbids shrinking, which no VMM needs while the file
 * is mapped). A memfd created without MFD_ALLOW_SEALING, or a tmpfs or hugetlbfs file, cannot be
 * sealed: the caller decides what that costs.
 */
export function guardAgainstShrinking(fd: number): ShrinkGuard {
  let seals: number;
  try {
    seals = fcntl(fd, F_GET_SEALS);
  } catch {
    return "not-memfd"; // EINVAL: not a memfd (tmpfs or hugetlbfs file, block device...)
  }
  if (seals & F_SEAL_SHRINK) return "sealed";
  if (seals & F_SEAL_SEAL) return "unsealable"; // memfd created without MFD_ALLOW_SEALING, or sealed shut
  try {
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
    return "sealed-now";
  } catch {
    return "unsealable";
  }
}

export interface SharedFileRules {
  /** Refuse anything but a regular file (memfd, tmpfs, hugetlbfs): a device file has no size to check. */
  regularOnly: boolean;
}

/**
 * Throws unless bytes [offset, offset+len) of `fd`'s file exist; seals a regular file against
 * shrinking first (so the size checked is one the front-end can no longer take back). Returns
 * the seal's state, or null for a non-regular file (a DAX or other device: not checked).
 */
export function checkSharedFile(fd: number, offset: number, len: number, what: string, rules: SharedFileRules): ShrinkGuard | null {
  const regular = (fstat(fd).mode & S_IFMT) === S_IFREG;
  if (!regular) {
    if (rules.regularOnly) throw new Error(`${what}: not a regular file (a memfd is expected)`);
    return null;
  }
  const guard = guardAgainstShrinking(fd);
  const size = fstat(fd).size;
  if (offset > size || len > size - offset) {
    throw new Error(`${what} at ${offset}+${len} extends past the end of its ${size}-byte file`);
  }
  return guard;
}
