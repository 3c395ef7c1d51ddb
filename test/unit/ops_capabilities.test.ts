// What management software reads: --print-capabilities and the backend description files, checked
// against the schema in QEMU's source (docs/interop/vhost-user.json, kept by test/e2e/setup.sh);
// and the man page and shell completion generated from the device definitions.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { DEVICES } from "../../app/registry.ts";
import { COMMON_ARGS } from "../../app/main.ts";
import { bashCompletion, descriptionFiles, deviceOptionList, manPage, zshCompletion } from "../../app/generated_files.ts";
import { capabilitiesJson, VHOST_USER_BACKEND_TYPES } from "../../src/capabilities.ts";

const SCHEMA_PATHS = [process.env.QEMU_VHOST_USER_SCHEMA ?? "", "/var/cache/vhost-backend-e2e/qemu-console/vhost-user.json"];
const schemaPath = SCHEMA_PATHS.find((p) => p !== "" && existsSync(p));
if (schemaPath === undefined && process.env.CI) throw new Error("QEMU's vhost-user.json is missing: test/e2e/setup.sh keeps it in /var/cache/vhost-backend-e2e/qemu-console/");

type QapiExpr = Record<string, any>;

/** QAPI schema text (Python-like literals with # comments) as a list of definitions. */
function parseQapi(text: string): QapiExpr[] {
  const noComments = text.split("\n").map((l) => l.replace(/#.*$/, "")).join("\n");
  const json = noComments.replace(/'/g, '"');
  const exprs: QapiExpr[] = [];
  let depth = 0;
  let start = -1;
  for (let i = 0; i < json.length; i++) {
    const c = json[i];
    if (c === "{") {
      if (depth === 0) start = i;
      depth++;
    } else if (c === "}") {
      depth--;
      if (depth === 0) exprs.push(JSON.parse(json.slice(start, i + 1)));
    }
  }
  return exprs;
}

/** A strict QAPI value check: known members only, required ones present, enums and lists typed. */
class Schema {
  constructor(private readonly exprs: QapiExpr[]) {}

  private find(name: string): QapiExpr {
    const e = this.exprs.find((x) => x.enum === name || x.struct === name || x.union === name);
    if (!e) throw new Error(`schema has no type ${name}`);
    return e;
  }

  enumValues(name: string): string[] {
    return this.find(name).data;
  }

  /** Errors found in `value` as type `type` (empty: valid). */
  check(value: unknown, type: string | string[], path = "$"): string[] {
    if (Array.isArray(type)) {
      if (!Array.isArray(value)) return [`${path}: not a list`];
      return value.flatMap((v, i) => this.check(v, type[0]!, `${path}[${i}]`));
    }
    if (type === "str") return typeof value === "string" ? [] : [`${path}: not a string`];
    const def = this.find(type);
    if (def.enum) return this.enumValues(type).includes(value as string) ? [] : [`${path}: '${String(value)}' is not a ${type}`];
    if (typeof value !== "object" || value === null || Array.isArray(value)) return [`${path}: not an object`];
    let members: Record<string, any>;
    if (def.struct) members = def.data;
    else {
      // A union: its base members, then the branch of the discriminator's value. The schema names
      // each backend type's capabilities VHostUserBackendCapabilities<Type>; QEMU 10's union lists
      // the input and gpu branches but not block's (defined since 5.0, printed by QEMU's own
      // vhost-user-blk), so a struct of that name is taken as the branch too.
      const disc = (value as Record<string, unknown>)[def.discriminator];
      const errs = this.check(disc, def.base[def.discriminator], `${path}.${def.discriminator}`);
      if (errs.length > 0) return errs;
      const branchName = def.data[disc as string] ?? this.exprs.find((x) => typeof x.struct === "string" && x.struct.toLowerCase() === `vhostuserbackendcapabilities${String(disc)}`.toLowerCase())?.struct;
      members = { ...def.base, ...(branchName ? this.find(branchName).data : {}) };
    }
    const errs: string[] = [];
    const known = new Map(Object.entries(members).map(([k, t]) => [k.replace(/^\*/, ""), { t, optional: k.startsWith("*") }]));
    for (const [k, { t, optional }] of known) {
      const v = (value as Record<string, unknown>)[k];
      if (v === undefined) {
        if (!optional) errs.push(`${path}.${k}: missing`);
      } else errs.push(...this.check(v, t, `${path}.${k}`));
    }
    for (const k of Object.keys(value)) if (!known.has(k)) errs.push(`${path}.${k}: not in the schema`);
    return errs;
  }
}

describe.skipIf(schemaPath === undefined)("against QEMU's vhost-user.json", () => {
  const schema = new Schema(parseQapi(readFileSync(schemaPath ?? "/dev/null", "utf8")));

  test("the validator is strict (it can fail)", () => {
    expect(schema.check({ type: "blk", features: [] }, "VHostUserBackendCapabilities")).toEqual(["$.type: 'blk' is not a VHostUserBackendType"]);
    expect(schema.check({ type: "block", features: ["blk-file", "discard"] }, "VHostUserBackendCapabilities")).toEqual(["$.features[1]: 'discard' is not a VHostUserBackendBlockFeature"]);
    expect(schema.check({ type: "net", features: ["mtu"] }, "VHostUserBackendCapabilities")).toEqual(["$.features: not in the schema"]);
    expect(schema.check({ type: "block" }, "VHostUserBackendCapabilities")).toEqual(["$.features: missing"]);
    expect(schema.check({ description: "x", type: "net" }, "VhostUserBackend")).toEqual(["$.binary: missing"]);
  });

  test("our list of backend types is the schema's", () => {
    expect([...VHOST_USER_BACKEND_TYPES] as string[]).toEqual(schema.enumValues("VHostUserBackendType"));
  });

  test("--print-capabilities of every device is valid, except sound, which the schema has no type for", () => {
    for (const def of Object.values(DEVICES)) {
      const caps = JSON.parse(capabilitiesJson(def.capabilities));
      const errors = schema.check(caps, "VHostUserBackendCapabilities");
      if (def.name === "snd") expect(errors).toEqual(["$.type: 'sound' is not a VHostUserBackendType"]);
      else expect(errors).toEqual([]);
      // A feature is advertised only if the command line takes the option it names.
      const options = new Set(deviceOptionList(def).map((o) => o.name));
      for (const f of caps.features ?? []) expect(options.has(f)).toBe(true);
    }
    expect(JSON.parse(capabilitiesJson(DEVICES.block!.capabilities))).toEqual({ type: "block", features: ["read-only"] });
  });

  test("the backend description files are valid VhostUserBackend objects with an absolute binary", () => {
    const files = descriptionFiles("/usr/libexec");
    expect(Object.keys(files).sort()).toEqual(["50-backend-block.json", "50-backend-console.json", "50-backend-net.json"]);
    for (const [name, text] of Object.entries(files)) {
      const d = JSON.parse(text);
      expect(schema.check(d, "VhostUserBackend")).toEqual([]);
      expect(d.binary).toBe(`/usr/libexec/vhost-user-${d.type}`);
      expect(name).toBe(`50-backend-${Object.values(DEVICES).find((x) => x.capabilities.type === d.type)!.name}.json`);
    }
  });
});

describe("generated docs", () => {
  test("the man page lists every option of every device and renders without warnings", () => {
    const page = manPage();
    const text = Bun.spawnSync(["groff", "-man", "-Tutf8", "-ww", "-P", "-cbou"], { stdin: new TextEncoder().encode(page) });
    expect(text.stderr.toString()).toBe("");
    const rendered = text.stdout.toString().replace(/\u2010/g, "-").replace(/-\n\s+/g, "-").replace(/\s+/g, " ");
    for (const name of Object.keys(COMMON_ARGS)) expect(rendered).toContain(`--${name}`);
    for (const def of Object.values(DEVICES)) {
      const section = rendered.slice(rendered.indexOf(`DEVICE: ${def.name.toUpperCase()}`));
      expect(section.length).toBeGreaterThan(0);
      for (const o of deviceOptionList(def)) if (!(o.name in COMMON_ARGS)) expect(section).toContain(`--${o.name}`);
    }
  });

  test("bash completion completes devices, options and their values", () => {
    const complete = (words: string[]) => {
      const script = `${bashCompletion()}\nCOMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _backend; printf '%s\\n' "\${COMPREPLY[@]}"`;
      const r = Bun.spawnSync(["bash", "-c", script]);
      expect(r.stderr.toString()).toBe("");
      return r.stdout.toString().trim().split("\n").filter((x) => x !== "");
    };
    expect(complete(["backend", "device", ""]).sort()).toEqual(Object.keys(DEVICES).sort());
    expect(complete(["backend", "device", "block", "--read"])).toEqual(["--read-only"]);
    expect(complete(["backend", "device", "snd", "--backend", ""]).sort()).toEqual(["alsa", "file", "null"]);
    expect(complete(["backend", "device", "net", "--log-format", "j"])).toEqual(["json"]);
    expect(complete(["vhost-user-block", "--socket-p"])).toEqual(["--socket-path"]);
    for (const def of Object.values(DEVICES)) {
      const all = complete(["backend", "device", def.name, "--"]);
      for (const o of deviceOptionList(def)) expect(all).toContain(`--${o.name}`);
    }
  });

  test("zsh completion names every option", () => {
    const z = zshCompletion();
    expect(z.startsWith("#compdef backend vhost-user-block")).toBe(true);
    for (const def of Object.values(DEVICES)) for (const o of deviceOptionList(def)) expect(z).toContain(`--${o.name}`);
    const zsh = Bun.which("zsh");
    if (zsh) expect(Bun.spawnSync([zsh, "-n", "-c", z]).exitCode).toBe(0);
  });
});
