// `--file rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:id=USER][:conf=PATH][:key=value...]`, QEMU's spelling
// of an RBD image (block/rbd.c, qemu_rbd_parse_filename): a backslash makes the next character
// plain (`\:`, `\@`, `\/`, `\\`); `id` is the Ceph user (client.USER), `conf` the ceph.conf to
// read, and every other key=value is a librados option (rados_conf_set), e.g. mon_host=, keyring=,
// client_mount_timeout=.

export interface RbdSpec {
  pool: string;
  /** The RADOS namespace ("" for the default one). */
  namespace: string;
  image: string;
  /** A snapshot: served read-only. */
  snap: string | null;
  /** The Ceph user without "client." (librados's default: admin). */
  user: string | null;
  /** ceph.conf to read; null: librados's default search ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf). */
  conf: string | null;
  /** Further librados options, in the order given. */
  options: [string, string][];
}

/** Whether `--file` names an RBD image rather than a local path. */
export function isRbdSpec(file: string): boolean {
  return file.startsWith("rbd:");
}

/** Splits at unescaped `sep` (the backslashes stay, for the next split); at most `limit` pieces. */
function splitUnescaped(s: string, sep: string, limit = Infinity): string[] {
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c === "\\" && i + 1 < s.length) {
      cur += c + s[++i]!;
      continue;
    }
    if (c === sep && parts.length < limit - 1) {
      parts.push(cur);
      cur = "";
      continue;
    }
    cur += c;
  }
  parts.push(cur);
  return parts;
}

const unescape = (s: string) => s.replace(/\\(.)/g, "$1");

/** Parses an `rbd:` spec; throws a message that shows the expected form. */
export function parseRbdSpec(file: string): RbdSpec {
  const form = "write it as rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH][:key=value...]";
  if (!isRbdSpec(file)) throw new Error(`--file ${file}: not an rbd: spec (${form})`);
  const [path, ...opts] = splitUnescaped(file.slice(4), ":");
  const [names, snapPart] = splitUnescaped(path!, "@", 2);
  const comps = splitUnescaped(names!, "/");
  if (comps.length < 2 || comps.length > 3 || comps.some((c) => c === "")) throw new Error(`--file ${file}: expected POOL/IMAGE or POOL/NAMESPACE/IMAGE (${form})`);
  const spec: RbdSpec = {
    pool: unescape(comps[0]!),
    namespace: comps.length === 3 ? unescape(comps[1]!) : "",
    image: unescape(comps[comps.length - 1]!),
    snap: snapPart === undefined ? null : unescape(snapPart),
    user: null,
    conf: null,
    options: [],
  };
  if (spec.snap === "") throw new Error(`--file ${file}: empty snapshot name after '@' (${form})`);
  for (const opt of opts) {
    const [k, v] = splitUnescaped(opt, "=", 2);
    const key = unescape(k!);
    if (v === undefined || key === "") throw new Error(`--file ${file}: '${opt}' is not key=value (${form})`);
    const value = unescape(v);
    if (key === "id") spec.user = value;
    else if (key === "conf") spec.conf = value;
    else spec.options.push([key, value]);
  }
  return spec;
}

/** pool[/namespace]/image[@snap], for messages and the disk's identity. */
export function rbdImageName(s: Pick<RbdSpec, "pool" | "namespace" | "image" | "snap">): string {
  return `${s.pool}/${s.namespace === "" ? "" : `${s.namespace}/`}${s.image}${s.snap === null ? "" : `@${s.snap}`}`;
}
