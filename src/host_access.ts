// What a device may still touch on the host after its acquire phase: declared as data on the
// device's definition, so that the framework can check it (the strace tests) and the sandbox can
// turn exactly this into Landlock rules and a seccomp allow-list. Everything a device needs
// before serving is opened in acquire(); this lists only what it opens *later* (a new WAV file on
// a format change, an NBD server reconnected after an outage), plus the kinds of system calls its
// serving path makes that the common set does not cover.

/** Rights on a declared path. "read"/"write" apply to the file itself; "create" to a directory (new files in it). */
export type PathRight = "read" | "write" | "create";

export interface DeclaredPath {
  /** Absolute path (a file, a directory, or a device node). */
  path: string;
  rights: readonly PathRight[];
  /** True when `path` is a directory whose whole subtree the rights cover. */
  directory?: boolean;
}

export interface HostAccess {
  /** Files and directories the device may open after acquire. */
  paths: readonly DeclaredPath[];
  /** Pathname unix sockets the device may connect to after acquire (PulseAudio, an NBD server). */
  unixSockets: readonly string[];
  /** TCP endpoints ("host:port") the device may connect to after acquire (NBD over TCP, Ceph monitors). */
  tcp: readonly string[];
  /** The device needs the host's network namespace (net: its taps; network disks: their servers). */
  hostNetwork: boolean;
  /** Threads the device may start after acquire beyond its pre-spawned ones (librbd's own, say): 0 for most. */
  threadsAfterAcquire: boolean;
  /**
   * Extra system-call groups beyond what every device uses (see src/sandbox when it exists):
   * e.g. "block-io" (fallocate, fdatasync, BLKDISCARD), "tap" (TUNSETOFFLOAD), "alsa" (ioctls on
   * /dev/snd), "io_uring".
   */
  syscallGroups: readonly string[];
}

/** A device that opens nothing after acquire. */
export const NO_HOST_ACCESS: HostAccess = {
  paths: [],
  unixSockets: [],
  tcp: [],
  hostNetwork: false,
  threadsAfterAcquire: false,
  syscallGroups: [],
};
