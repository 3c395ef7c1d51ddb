// Checking a decoded device state (CBOR from SET_DEVICE_STATE_FD: untrusted input) against the
// shape a device expects, with messages that name the field: one small set of checks instead of a
// hand-written `fail`/`int`/`bigintString` in every device's state.ts. A schema is a function that
// returns the value typed or throws a StateError naming the path ("ports[1].txSkip").

export class StateError extends Error {}

/** Checks `v` (found at `path`) and returns it typed. */
export type Check<T> = (v: unknown, path: string) => T;

function fail(path: string, what: string): never {
  throw new StateError(`${path} ${what}`);
}

/** An integer in min..max. */
export function int(min: number, max: number): Check<number> {
  return (v, path) => (typeof v === "number" && Number.isInteger(v) && v >= min && v <= max ? v : fail(path, `is not an integer in ${min}..${max}`));
}

export const bool: Check<boolean> = (v, path) => (typeof v === "boolean" ? v : fail(path, "is not a boolean"));

/** A string of at most `maxLength` characters. */
export function str(maxLength = 4096): Check<string> {
  return (v, path) => (typeof v === "string" && v.length <= maxLength ? v : fail(path, `is not a string of at most ${maxLength} characters`));
}

/** A 64-bit unsigned integer carried as a decimal string (CBOR integers above 2^53 do not survive JS). */
export const u64String: Check<bigint> = (v, path) => {
  if (typeof v !== "string" || !/^[0-9]{1,20}$/.test(v)) fail(path, "is not a decimal integer string");
  const b = BigInt(v);
  return b < 1n << 64n ? b : fail(path, "does not fit 64 bits");
};

/** A byte string of exactly `length` bytes, or of at most `max` when `length` is null. */
export function bytes(length: number | null, max = 1 << 26): Check<Uint8Array> {
  return (v, path) => {
    if (!(v instanceof Uint8Array)) fail(path, "is not a byte string");
    if (length !== null && v.length !== length) fail(path, `is not ${length} bytes`);
    if (v.length > max) fail(path, `is longer than ${max} bytes`);
    return v;
  };
}

/** Exactly `value`. */
export function literal<T extends string | number | boolean | null>(value: T): Check<T> {
  return (v, path) => (v === value ? value : fail(path, `is ${JSON.stringify(v) ?? String(v)}, expected ${JSON.stringify(value)}`));
}

/** One of `values`. */
export function oneOf<T extends string | number>(values: readonly T[]): Check<T> {
  return (v, path) => (values.includes(v as T) ? (v as T) : fail(path, `is not one of ${values.join(", ")}`));
}

/** A list of at most `maxLength` items, each checked by `item`. */
export function array<T>(item: Check<T>, maxLength: number): Check<T[]> {
  return (v, path) => {
    if (!Array.isArray(v)) fail(path, "is not a list");
    if (v.length > maxLength) fail(path, `has more than ${maxLength} entries`);
    return v.map((x, i) => item(x, `${path}[${i}]`));
  };
}

export function nullable<T>(inner: Check<T>): Check<T | null> {
  return (v, path) => (v === null ? null : inner(v, path));
}

/** A missing field is `undefined` (a field added in a later version of the same state). */
export function optional<T>(inner: Check<T>): Check<T | undefined> {
  return (v, path) => (v === undefined ? undefined : inner(v, path));
}

type Fields = Record<string, Check<unknown>>;
type Shape<F extends Fields> = { [K in keyof F]: ReturnType<F[K]> };

/** A map with these fields (others are ignored), each checked. */
export function object<F extends Fields>(fields: F): Check<Shape<F>> {
  return (v, path) => {
    if (typeof v !== "object" || v === null || Array.isArray(v) || v instanceof Uint8Array) fail(path, "is not a map");
    const o = v as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const [k, check] of Object.entries(fields)) out[k] = check(o[k], path === "" ? k : `${path}.${k}`);
    return out as Shape<F>;
  };
}

/** Any value, unchecked (a part another schema checks later, e.g. a sub-component's own state). */
export const any: Check<unknown> = (v) => v;

/**
 * Checks a whole device state: `what` names it in the message ("block state"), and a state of
 * another version is refused first, with the versions named.
 */
export function checkState<T>(what: string, version: number, schema: Check<T>, raw: unknown): T {
  if (typeof raw !== "object" || raw === null) throw new StateError(`${what} is not a map`);
  const v = (raw as Record<string, unknown>).version;
  if (v !== version) throw new StateError(`${what}: version ${String(v)}, this backend reads ${version}`);
  try {
    return schema(raw, "");
  } catch (e) {
    if (e instanceof StateError) throw new StateError(`${what}: ${e.message}`);
    throw e;
  }
}
