/**
 * `tender image build`: the default machine image, assembled from the host's Debian packages
 * under $TENDER_HOME/images/default/:
 *
 *   vmlinux | vmlinuz     the kernel (the uncompressed ELF when it supports PVH boot)
 *   initramfs.cpio.gz     busybox-static, /init, the modules, the guest agent
 *   manifest.json         versions and sha256 of everything above, and the recipe hash
 *
 * Built in a temporary directory next to it and renamed into place, under a lock directory so
 * two daemons or test workers never build at once. Reused while up to date: same recipe (this
 * builder, /init, the module list), same agent binary, same kernel version in apt's cache.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { gzipSync } from 'node:zlib';
import { type CpioEntry, cpioNewc } from './cpio.js';
import {
  ImageUnavailableError,
  aptCandidate,
  aptDownload,
  debExtract,
  debField,
  hasCommand,
  kernelPackageOf,
  requireDebianTools,
} from './debian.js';
import { INIT_SCRIPT, UDHCPC_SCRIPT } from './init-script.js';
import { resolveModules } from './kmod.js';
import { configHasPvh, extractVmlinux } from './vmlinux.js';
import { packageRoot } from '../../native/index.js';

export { ImageUnavailableError } from './debian.js';

/** Bump when the layout of the image changes in a way the recipe hash does not see. */
const BUILDER_VERSION = 1;
const MANIFEST_FORMAT = 1;
const KERNEL_META = 'linux-image-amd64';
const BUSYBOX = 'busybox-static';

/**
 * Roots of the module walk (dependencies are followed, built-in ones skipped). On Debian 12's
 * 6.1 kernel every one of these is a module. BOOT_MODULES are loaded before the network and
 * the agent start: the virtio transport and devices, vsock, and the ACPI power button (+ evdev
 * to read it) for graceful powerdown. LATER_MODULES load after DHCP, off the boot's critical
 * path: USB/IP's host controller and the class drivers a passed-through stick needs, 9p for
 * shared folders, ext4 for disks (at once when a root disk is given).
 */
export const BOOT_MODULES = ['virtio_mmio', 'virtio_net', 'virtio_console', 'virtio_blk', 'vsock', 'vmw_vsock_virtio_transport', 'button', 'evdev'];
export const LATER_MODULES = ['usbip_core', 'vhci_hcd', 'usb_storage', 'uas', 'sd_mod', 'cdc_acm', '9pnet_virtio', '9p', 'ext4'];
export const DEFAULT_MODULES = [...BOOT_MODULES, ...LATER_MODULES];

/** Kernel command-line words the default image wants (the driver adds console/timing). */
export const DEFAULT_IMAGE_CMDLINE = ['quiet'];

export interface ImageManifest {
  format: number;
  /** Short human version: kernel release + busybox + recipe. */
  version: string;
  recipe: string;
  builtAt: string;
  kernel: { package: string; metaVersion: string; version: string; release: string; file: string; format: 'elf-pvh' | 'bzimage'; sha256: string };
  initrd: { file: string; sha256: string };
  busybox: { package: string; version: string };
  modules: string[];
  builtinModules: string[];
  agent: { included: true; source: string; sha256: string } | { included: false; reason: string };
}

export interface DefaultImage {
  dir: string;
  kernel: string;
  initrd: string;
  version: string;
  modules: string[];
  /** Kernel command-line words to pass (DEFAULT_IMAGE_CMDLINE). */
  cmdline: string[];
  agent: boolean;
  manifest: ImageManifest;
}

export type BuildStep = 'check' | 'download' | 'unpack' | 'modules' | 'kernel' | 'initramfs' | 'install' | 'done';

export interface BuildProgress {
  step: BuildStep;
  message: string;
}

export interface BuildOptions {
  /** $TENDER_HOME: the image goes to <home>/images/default. */
  home: string;
  onProgress?: (p: BuildProgress) => void;
  /** The guest agent binary (default: build/agent/tender-agent in the package). */
  agentPath?: string;
  /** Rebuild even when up to date. */
  force?: boolean;
}

export function defaultImageDir(home: string): string {
  return path.join(home, 'images', 'default');
}

export function defaultAgentPath(): string {
  return process.env.TENDER_AGENT_BINARY || path.join(packageRoot(), 'build', 'agent', 'tender-agent');
}

function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

function sha256File(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** Everything that shapes the image besides the packages and the agent. */
export function recipeHash(): string {
  return sha256([`builder=${BUILDER_VERSION}`, BOOT_MODULES.join(','), LATER_MODULES.join(','), INIT_SCRIPT, UDHCPC_SCRIPT].join('\0')).slice(0, 16);
}

/** ELF without PT_INTERP: runs in an initramfs that has no libc. */
export function isStaticElf(b: Buffer): boolean {
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) return false;
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    if (o + 4 > b.length) return false;
    if (b.readUInt32LE(o) === 3) return false; // PT_INTERP
  }
  return true;
}

type AgentCheck = { ok: true; data: Buffer; sha256: string; source: string } | { ok: false; reason: string };

function checkAgent(file: string): AgentCheck {
  let data: Buffer;
  try {
    data = fs.readFileSync(file);
  } catch {
    return { ok: false, reason: `${file} not found (build it with make -C native/agent)` };
  }
  if (!isStaticElf(data)) return { ok: false, reason: `${file} is not a statically linked x86-64 ELF` };
  return { ok: true, data, sha256: sha256(data), source: file };
}

/** The installed image as its manifest describes it, or null if missing or damaged. */
export function readDefaultImage(home: string): DefaultImage | null {
  const dir = defaultImageDir(home);
  try {
    const m = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as ImageManifest;
    if (m.format !== MANIFEST_FORMAT) return null;
    const kernel = path.join(dir, m.kernel.file);
    const initrd = path.join(dir, m.initrd.file);
    if (!fs.existsSync(kernel) || !fs.existsSync(initrd)) return null;
    return { dir, kernel, initrd, version: m.version, modules: m.modules, cmdline: DEFAULT_IMAGE_CMDLINE, agent: m.agent.included, manifest: m };
  } catch {
    return null;
  }
}

/** Verify the files against the manifest's hashes (for `tender image inspect`, tests). */
export function verifyDefaultImage(img: DefaultImage): string[] {
  const bad: string[] = [];
  if (sha256File(img.kernel) !== img.manifest.kernel.sha256) bad.push(img.kernel);
  if (sha256File(img.initrd) !== img.manifest.initrd.sha256) bad.push(img.initrd);
  return bad;
}

const pending = new Map<string, Promise<DefaultImage>>();

/**
 * Build (or reuse) the default image. Concurrent calls in one process share one build; other
 * processes wait on the lock directory. Throws ImageUnavailableError (code IMAGE_UNAVAILABLE)
 * when the host cannot build it (no apt/dpkg, packages not in apt's cache).
 */
export function buildDefaultImage(opts: BuildOptions): Promise<DefaultImage> {
  const key = path.resolve(opts.home);
  let p = pending.get(key);
  if (!p) {
    p = buildLocked(opts).finally(() => pending.delete(key));
    pending.set(key, p);
  }
  return p;
}

async function upToDate(img: DefaultImage | null, agent: AgentCheck): Promise<boolean> {
  if (!img) return false;
  const m = img.manifest;
  if (m.recipe !== recipeHash()) return false;
  if (agent.ok !== m.agent.included) return false;
  if (agent.ok && m.agent.included && agent.sha256 !== m.agent.sha256) return false;
  // A newer kernel in apt's cache (after apt-get update) means a rebuild; without apt the
  // image we have is the best there is.
  if (!(await hasCommand('apt-cache'))) return true;
  try {
    return (await aptCandidate(KERNEL_META)).version === m.kernel.metaVersion;
  } catch {
    return true;
  }
}

async function buildLocked(opts: BuildOptions): Promise<DefaultImage> {
  const progress = (step: BuildStep, message: string) => opts.onProgress?.({ step, message });
  const imagesDir = path.join(opts.home, 'images');
  const agent = checkAgent(opts.agentPath ?? defaultAgentPath());
  progress('check', 'checking the installed image');
  const current = readDefaultImage(opts.home);
  if (!opts.force && (await upToDate(current, agent))) {
    progress('done', `image ${current!.version} is up to date`);
    return current!;
  }
  await requireDebianTools();
  fs.mkdirSync(imagesDir, { recursive: true });
  const lock = path.join(imagesDir, '.default.lock');
  await acquireLock(lock);
  try {
    // Holding the lock, any build directory or set-aside image is a leftover of a crash.
    for (const e of fs.readdirSync(imagesDir)) {
      if (e.startsWith('.default-build-') || e.startsWith('default.old-')) fs.rmSync(path.join(imagesDir, e), { recursive: true, force: true });
    }
    // Another process may have finished the same build while we waited.
    const again = readDefaultImage(opts.home);
    if (!opts.force && (await upToDate(again, agent))) return again!;
    const tmp = fs.mkdtempSync(path.join(imagesDir, '.default-build-'));
    try {
      const img = await build(tmp, opts.home, agent, progress);
      progress('done', `built image ${img.version}`);
      return img;
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  } finally {
    fs.rmSync(lock, { recursive: true, force: true });
  }
}

async function acquireLock(lock: string): Promise<void> {
  for (;;) {
    try {
      fs.mkdirSync(lock);
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    let age = 0;
    try {
      age = Date.now() - fs.statSync(lock).mtimeMs;
    } catch {
      continue; // released just now
    }
    // A builder that died leaves its lock behind; a live one finishes well within this.
    if (age > 10 * 60_000) fs.rmSync(lock, { recursive: true, force: true });
    else await new Promise((r) => setTimeout(r, 250));
  }
}

async function build(tmp: string, home: string, agent: AgentCheck, progress: (s: BuildStep, m: string) => void): Promise<DefaultImage> {
  const dl = path.join(tmp, 'dl');
  const x = path.join(tmp, 'x');
  const out = path.join(tmp, 'out');
  for (const d of [dl, x, out]) fs.mkdirSync(d);

  const meta = await aptCandidate(KERNEL_META);
  const kpkg = kernelPackageOf(meta.depends);
  if (!kpkg) throw new ImageUnavailableError(`cannot find the kernel package in ${KERNEL_META}'s Depends (${meta.depends})`);
  progress('download', `apt-get download ${kpkg} ${BUSYBOX}`);
  const debs = await aptDownload(dl, [kpkg, BUSYBOX]);
  const kdeb = debs.find((f) => path.basename(f).startsWith(`${kpkg}_`));
  const bdeb = debs.find((f) => path.basename(f).startsWith(`${BUSYBOX}_`));
  if (!kdeb || !bdeb) throw new ImageUnavailableError(`apt-get download produced ${debs.map((d) => path.basename(d)).join(', ') || 'nothing'}`);
  const kernelVersion = await debField(kdeb, 'Version');
  const busyboxVersion = await debField(bdeb, 'Version');

  progress('unpack', `unpacking ${path.basename(kdeb)}`);
  await debExtract(kdeb, x);
  await debExtract(bdeb, x);

  const boot = path.join(x, 'boot');
  const vmlinuz = fs.readdirSync(boot).find((f) => f.startsWith('vmlinuz-'));
  if (!vmlinuz) throw new Error(`no /boot/vmlinuz-* in ${kpkg}`);
  const release = vmlinuz.slice('vmlinuz-'.length);
  let modRoot = path.join(x, 'lib/modules', release);
  if (!fs.existsSync(modRoot)) modRoot = path.join(x, 'usr/lib/modules', release);

  progress('modules', `resolving ${DEFAULT_MODULES.length} modules and their dependencies`);
  const mods = resolveModules(modRoot, DEFAULT_MODULES);
  const bootNames = new Set(resolveModules(modRoot, BOOT_MODULES).modules.map((m) => m.name));
  const list = (boot: boolean) => Buffer.from(mods.modules.filter((m) => bootNames.has(m.name) === boot).map((m) => `${m.name}\n`).join(''));

  progress('kernel', 'extracting the uncompressed kernel');
  const config = path.join(boot, `config-${release}`);
  const bz = fs.readFileSync(path.join(boot, vmlinuz));
  const elf = fs.existsSync(config) && configHasPvh(fs.readFileSync(config, 'utf8')) ? extractVmlinux(bz) : null;
  const kernelFile = elf ? 'vmlinux' : 'vmlinuz';
  fs.writeFileSync(path.join(out, kernelFile), elf ?? bz);

  progress('initramfs', `writing the initramfs (${mods.modules.length} modules${agent.ok ? ', agent' : ', no agent'})`);
  let busybox = path.join(x, 'bin/busybox');
  if (!fs.existsSync(busybox)) busybox = path.join(x, 'usr/bin/busybox');
  const recipe = recipeHash();
  const version = `${release}-bb${busyboxVersion.replace(/^\d+:/, '')}-${recipe.slice(0, 8)}`;
  const entries: CpioEntry[] = [];
  for (const d of ['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'dev', 'proc', 'sys', 'tmp', 'run', 'etc', 'lib', 'lib/modules', 'var', 'root', 'mnt', 'newroot']) {
    entries.push({ kind: 'dir', path: d, ...(d === 'tmp' ? { mode: 0o1777 } : {}) });
  }
  // The kernel opens /dev/console before running /init, before devtmpfs is mounted.
  entries.push({ kind: 'chardev', path: 'dev/console', major: 5, minor: 1 });
  entries.push({ kind: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
  entries.push({ kind: 'file', path: 'bin/busybox', data: fs.readFileSync(busybox), mode: 0o755 });
  entries.push({ kind: 'symlink', path: 'bin/sh', target: 'busybox' });
  entries.push({ kind: 'file', path: 'init', data: Buffer.from(INIT_SCRIPT), mode: 0o755 });
  entries.push({ kind: 'file', path: 'etc/udhcpc.script', data: Buffer.from(UDHCPC_SCRIPT), mode: 0o755 });
  // Both lists keep the global dependency order; every dependency of a boot module is a boot module.
  entries.push({ kind: 'file', path: 'etc/tender-modules.boot', data: list(true) });
  entries.push({ kind: 'file', path: 'etc/tender-modules.later', data: list(false) });
  entries.push({ kind: 'file', path: 'etc/tender-release', data: Buffer.from(`${version}\n`) });
  entries.push({ kind: 'file', path: 'etc/passwd', data: Buffer.from('root:x:0:0:root:/root:/bin/sh\n') });
  entries.push({ kind: 'file', path: 'etc/group', data: Buffer.from('root:x:0:\ntty:x:5:\n') });
  entries.push({ kind: 'file', path: 'etc/hosts', data: Buffer.from('127.0.0.1 localhost\n::1 localhost\n') });
  entries.push({ kind: 'file', path: 'etc/profile', data: Buffer.from('export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nPS1="$(hostname):\\w# "\n') });
  for (const m of mods.modules) entries.push({ kind: 'file', path: `lib/modules/${m.name}.ko`, data: m.data });
  if (agent.ok) entries.push({ kind: 'file', path: 'sbin/tender-agent', data: agent.data, mode: 0o755 });
  const initrd = gzipSync(cpioNewc(entries), { level: 6 });
  fs.writeFileSync(path.join(out, 'initramfs.cpio.gz'), initrd);

  const manifest: ImageManifest = {
    format: MANIFEST_FORMAT,
    version,
    recipe,
    builtAt: new Date().toISOString(),
    kernel: {
      package: kpkg,
      metaVersion: meta.version,
      version: kernelVersion,
      release,
      file: kernelFile,
      format: elf ? 'elf-pvh' : 'bzimage',
      sha256: sha256File(path.join(out, kernelFile)),
    },
    initrd: { file: 'initramfs.cpio.gz', sha256: sha256(initrd) },
    busybox: { package: BUSYBOX, version: busyboxVersion },
    modules: mods.modules.map((m) => m.name),
    builtinModules: mods.builtin,
    agent: agent.ok ? { included: true, source: agent.source, sha256: agent.sha256 } : { included: false, reason: agent.reason },
  };
  fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');

  progress('install', `installing into ${defaultImageDir(home)}`);
  install(out, defaultImageDir(home));
  const img = readDefaultImage(home);
  if (!img) throw new Error(`the image at ${defaultImageDir(home)} is unreadable right after the build`);
  return img;
}

/**
 * Move the finished directory into place. rename(2) cannot replace a non-empty directory, so
 * the old image steps aside first; a machine already running keeps its open files, and one
 * starting takes the lock (through buildDefaultImage) before it looks.
 */
function install(from: string, to: string): void {
  let old: string | null = null;
  if (fs.existsSync(to)) {
    old = `${to}.old-${process.pid}-${Date.now()}`;
    fs.renameSync(to, old);
  }
  try {
    fs.renameSync(from, to);
  } catch (e) {
    if (old) fs.renameSync(old, to);
    throw e;
  }
  if (old) fs.rmSync(old, { recursive: true, force: true });
}
