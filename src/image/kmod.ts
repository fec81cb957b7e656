/**
 * Just enough of kernel modules to load them without modprobe: read a module's `depends=` and
 * `softdep=` from its ELF `.modinfo` section (what `modinfo -F depends` prints; the .deb ships
 * no modules.dep, depmod runs in its postinst), and order a set of modules so dependencies
 * load first. Modules may be compressed (.ko.xz/.ko.zst in later Debian kernels); busybox
 * insmod cannot always read those, so they are decompressed on the host.
 *
 * Soft dependencies matter for more than speed: ext4 and jbd2 declare `softdep=pre:
 * crypto-crc32c` because they ask the crypto API for "crc32c" at mount time, and in a guest
 * without modprobe + modules.alias that request_module() fails and the mount with it.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Section `.modinfo` of an ELF64 little-endian object, as NUL-separated key=value strings. */
export function modinfo(elf: Buffer): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1) {
    throw new Error('not an ELF64 little-endian object');
  }
  const shoff = Number(elf.readBigUInt64LE(0x28));
  const shentsize = elf.readUInt16LE(0x3a);
  const shnum = elf.readUInt16LE(0x3c);
  const shstrndx = elf.readUInt16LE(0x3e);
  if (shoff + shnum * shentsize > elf.length || shstrndx >= shnum) throw new Error('truncated ELF section table');
  const sh = (i: number) => {
    const o = shoff + i * shentsize;
    return { name: elf.readUInt32LE(o), offset: Number(elf.readBigUInt64LE(o + 0x18)), size: Number(elf.readBigUInt64LE(o + 0x20)) };
  };
  const strtab = sh(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = sh(i);
    const nameStart = strtab.offset + s.name;
    const name = elf.toString('latin1', nameStart, elf.indexOf(0, nameStart));
    if (name !== '.modinfo') continue;
    for (const kv of elf.toString('latin1', s.offset, Math.min(elf.length, s.offset + s.size)).split('\0')) {
      const eq = kv.indexOf('=');
      if (eq <= 0) continue;
      const k = kv.slice(0, eq);
      out.set(k, [...(out.get(k) ?? []), kv.slice(eq + 1)]);
    }
  }
  return out;
}

/** Module names use '-' and '_' interchangeably. */
export function modName(file: string): string {
  return path.basename(file).replace(/\.ko(\.(xz|zst|gz))?$/, '').replace(/-/g, '_');
}

/** Read a module file, decompressing .xz/.zst/.gz with the host's tools. */
export function readModule(file: string): Buffer {
  if (file.endsWith('.ko')) return fs.readFileSync(file);
  if (file.endsWith('.xz')) return execFileSync('xz', ['-dc', file], { maxBuffer: 1 << 28 });
  if (file.endsWith('.zst')) return execFileSync('zstd', ['-dc', file], { maxBuffer: 1 << 28 });
  if (file.endsWith('.gz')) return execFileSync('gzip', ['-dc', file], { maxBuffer: 1 << 28 });
  throw new Error(`unknown module format: ${file}`);
}

/**
 * `softdep=pre: a b post: c` → the `pre:` and `post:` names (both load here; order within the
 * list is dependencies first, which satisfies `pre`, and `post` only asks to be loaded too).
 */
export function parseSoftdep(values: string[]): string[] {
  const out: string[] = [];
  for (const v of values) {
    for (const w of v.split(/\s+/)) if (w && w !== 'pre:' && w !== 'post:') out.push(w);
  }
  return out;
}

export interface ResolvedModule {
  name: string;
  data: Buffer;
}

export interface ModuleResolution {
  /** Load order: dependencies first. */
  modules: ResolvedModule[];
  /** Wanted or depended-on names that are built into this kernel (nothing to load). */
  builtin: string[];
}

/**
 * Resolve `wanted` against the modules under `modDir` (a /lib/modules/<version>): skip the
 * built-in ones (modules.builtin), follow `depends=` and `softdep=`, return dependencies
 * first. A wanted module that does not exist is an error; a soft dependency that resolves to
 * nothing is skipped (it names an optional accelerator or an alias of something built in).
 */
export function resolveModules(modDir: string, wanted: string[]): ModuleResolution {
  const builtin = new Set<string>();
  const builtinFile = path.join(modDir, 'modules.builtin');
  if (fs.existsSync(builtinFile)) {
    for (const l of fs.readFileSync(builtinFile, 'utf8').split('\n')) if (l) builtin.add(modName(l));
  }
  const files = new Map<string, string>();
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.ko(\.(xz|zst|gz))?$/.test(e.name)) files.set(modName(e.name), p);
    }
  };
  walk(path.join(modDir, 'kernel'));

  // Soft dependencies name aliases ("crypto-crc32c"), not files. Reading every module's
  // aliases would decompress ~4000 files; the aliases softdeps use are crypto and library
  // modules, so only those directories are indexed, once, when first needed.
  let aliases: Map<string, string> | null = null;
  const aliasIndex = (): Map<string, string> => {
    if (aliases) return aliases;
    aliases = new Map();
    for (const [name, file] of files) {
      const rel = path.relative(path.join(modDir, 'kernel'), file);
      if (!/^(crypto|lib|arch)\//.test(rel)) continue;
      for (const a of modinfo(readModule(file)).get('alias') ?? []) if (!aliases.has(a)) aliases.set(a, name);
    }
    return aliases;
  };
  // The generic implementation first: an accelerated one (crc32c-intel) needs CPU features
  // the guest's -cpu may not have, and the crypto API picks the best loaded one anyway.
  const byAlias = (alias: string): string | undefined => {
    const idx = aliasIndex();
    return idx.get(`${alias}-generic`) ?? idx.get(alias);
  };

  const order: ResolvedModule[] = [];
  const seenBuiltin = new Set<string>();
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (raw: string, soft: boolean) => {
    let name = raw.replace(/-/g, '_');
    if (builtin.has(name)) {
      seenBuiltin.add(name);
      return;
    }
    if (!files.has(name) && soft) {
      const real = byAlias(raw);
      if (real === undefined) return;
      name = real;
    }
    if (state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') {
      if (soft) return; // a soft cycle (a post: back-reference) is not an ordering constraint
      throw new Error(`module dependency cycle at ${name}`);
    }
    const file = files.get(name);
    if (!file) throw new Error(`module ${name} is neither built in nor under ${modDir}`);
    state.set(name, 'visiting');
    const data = readModule(file);
    const info = modinfo(data);
    for (const d of (info.get('depends')?.[0] ?? '').split(',').filter(Boolean)) visit(d, false);
    for (const d of parseSoftdep(info.get('softdep') ?? [])) visit(d, true);
    state.set(name, 'done');
    order.push({ name, data });
  };
  for (const w of wanted) visit(w, false);
  return { modules: order, builtin: [...seenBuiltin].sort() };
}
