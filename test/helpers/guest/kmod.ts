/**
 * Just enough of kernel modules to load them without modprobe: read a module's `depends=`
 * from its ELF `.modinfo` section (what `modinfo -F depends` prints; the .deb ships no
 * modules.dep, depmod runs in its postinst), and order a set of modules so dependencies load
 * first. Modules may be compressed (.ko.xz/.ko.zst since Debian 12's later kernels); busybox
 * insmod cannot always read those, so they are decompressed on the host.
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
    for (const kv of elf.toString('latin1', s.offset, s.offset + s.size).split('\0')) {
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
 * Resolve `wanted` against the modules under `modDir` (a /lib/modules/<version>): skip the
 * built-in ones (modules.builtin), follow `depends=`, return dependencies first.
 */
export function resolveModules(modDir: string, wanted: string[]): { name: string; data: Buffer }[] {
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
  const order: { name: string; data: Buffer }[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (raw: string) => {
    const name = raw.replace(/-/g, '_');
    if (builtin.has(name) || state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') throw new Error(`module dependency cycle at ${name}`);
    const file = files.get(name);
    if (!file) throw new Error(`module ${name} is neither built in nor under ${modDir}`);
    state.set(name, 'visiting');
    const data = readModule(file);
    const deps = (modinfo(data).get('depends')?.[0] ?? '').split(',').filter(Boolean);
    for (const d of deps) visit(d);
    state.set(name, 'done');
    order.push({ name, data });
  };
  for (const w of wanted) visit(w);
  return order;
}
