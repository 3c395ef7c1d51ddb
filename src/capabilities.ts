// What QEMU's vhost-user backend conventions (docs/interop/vhost-user.rst, "Backend program
// conventions"; schema docs/interop/vhost-user.json) ask a backend to tell management software:
// `--print-capabilities` (a VHostUserBackendCapabilities object) and a backend description file
// (a VhostUserBackend object, installed as /usr/share/qemu/vhost-user/50-<name>.json).
//
// The schema's VHostUserBackendType has no "sound": snd prints {"type":"sound"}, outside the
// schema, and gets no description file. Feature lists exist in the schema for block, gpu and
// input only; a type without one prints no "features" member (QAPI rejects unknown members).

/** VHostUserBackendType (QEMU 10.0's schema; a unit test checks it against the schema's source). */
export const VHOST_USER_BACKEND_TYPES = [
  "9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs",
] as const;

export interface Capabilities {
  /** VHostUserBackendType, or the virtio name for a device the schema does not list ("sound"). */
  type: string;
  /** Only for types whose schema entry has a feature list (block: "read-only", "blk-file"). */
  features?: readonly string[];
}

/** The JSON `--print-capabilities` prints. */
export function capabilitiesJson(c: Capabilities): string {
  return JSON.stringify(c.features === undefined ? { type: c.type } : { type: c.type, features: [...c.features] });
}

/** Whether management software can find this type through a description file. */
export function describable(c: Capabilities): boolean {
  return (VHOST_USER_BACKEND_TYPES as readonly string[]).includes(c.type);
}

/**
 * A VhostUserBackend description. `binary` is started as QEMU's conventions say (`--socket-path`
 * or `--fd`, `--print-capabilities`): the multi-call binary serves the device its name says
 * (`vhost-user-block` → `backend device block`).
 */
export function backendDescription(c: Capabilities, description: string, binary: string, version: string): object {
  if (!describable(c)) throw new Error(`vhost-user type '${c.type}' is not in QEMU's schema: no description file`);
  return { description, type: c.type, binary, tags: [`backend-${version}`] };
}
