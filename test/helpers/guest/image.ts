/**
 * A tiny guest for tests: Debian's generic kernel plus a busybox-static initramfs, built once
 * per machine from the host's Debian packages (apt-get download, never installed on the
 * host) and cached under $TENDER_TEST_CACHE or /var/tmp/tender-test-guest/<hash>. The hash
 * covers everything that shapes the image (init script, module list, this builder's
 * version), so changing any of them builds a new one next to the old.
 *
 * Per boot, the test's script is appended as a second (gzip'd) cpio archive: the kernel
 * unpacks concatenated archives in order (buffer-format.rst), so the cached base image is
 * never rebuilt for a new test.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { type CpioEntry, cpioNewc } from './cpio.js';
import { resolveModules } from './kmod.js';
import { configHasPvh, extractVmlinux } from '../../../src/image/vmlinux.js';

const run = promisify(execFile);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const BUILDER_VERSION = '2';

/**
 * What the guest loads at boot, roots of the dependency walk. On Debian 12's kernel all of
 * these are modules (virtio, virtio_ring, virtio_mmio, virtio_net, net_failover, failover);
 * whichever are built in on another kernel are skipped via modules.builtin.
 */
export const GUEST_MODULES = ['virtio_ring', 'virtio', 'virtio_mmio', 'virtio_net'];

export interface GuestImage {
  dir: string;
  kernel: string;
  initrd: string;
  kernelVersion: string;
  modules: string[];
}

export type GuestAvailability = { ok: true; image: GuestImage } | { ok: false; reason: string };

export function cacheRoot(): string {
  return process.env.TENDER_TEST_CACHE || '/var/tmp/tender-test-guest';
}

function inputs(): { hash: string; init: Buffer; udhcpc: Buffer } {
  const init = fs.readFileSync(path.join(HERE, 'init.sh'));
  const udhcpc = fs.readFileSync(path.join(HERE, 'udhcpc.script'));
  const h = createHash('sha256');
  h.update(BUILDER_VERSION).update('\0').update(GUEST_MODULES.join(',')).update('\0');
  h.update(init).update('\0').update(udhcpc).update('\0');
  h.update(fs.readFileSync(path.join(HERE, 'image.ts'))).update(fs.readFileSync(path.join(HERE, 'kmod.ts')));
  h.update(fs.readFileSync(path.join(HERE, 'cpio.ts')));
  // The shared pieces in src/image shape the image too.
  for (const f of ['cpio.ts', 'kmod.ts', 'vmlinux.ts']) h.update(fs.readFileSync(path.join(HERE, '../../../src/image', f)));
  return { hash: h.digest('hex').slice(0, 16), init, udhcpc };
}

function readImage(dir: string): GuestImage | null {
  try {
    const info = JSON.parse(fs.readFileSync(path.join(dir, 'info.json'), 'utf8')) as {
      kernelVersion: string;
      modules: string[];
    };
    const elf = path.join(dir, 'vmlinux');
    const kernel = fs.existsSync(elf) ? elf : path.join(dir, 'vmlinuz');
    const initrd = path.join(dir, 'initramfs.cpio.gz');
    if (!fs.existsSync(kernel) || !fs.existsSync(initrd)) return null;
    return { dir, kernel, initrd, ...info };
  } catch {
    return null;
  }
}

async function aptDownload(dir: string, pkgs: string[]): Promise<void> {
  try {
    // Sandbox user root: the download dir is a private temp dir _apt could not write to.
    await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', ...pkgs], {
      cwd: dir,
      timeout: 300_000,
    });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    const msg = (err.stderr || err.message).trim().split('\n').filter((l) => !l.startsWith('W:')).join(' ');
    throw new GuestUnavailable(
      `apt-get download ${pkgs.join(' ')} failed (${msg || 'no output'}); ` +
        `run 'apt-get update' on a Debian/Ubuntu host with network access to the archive`,
    );
  }
}

export class GuestUnavailable extends Error {}

let pending: Promise<GuestImage> | null = null;

/** Build the image if it is not cached yet (once per machine; concurrent workers wait for one builder). */
export function ensureGuestImage(): Promise<GuestImage> {
  pending ??= build();
  return pending;
}

/**
 * Like ensureGuestImage, but reports why a guest cannot be had instead of throwing, for
 * skipIf. With TENDER_TEST_REQUIRE_GUEST=1 (CI, where the guest must be there) it throws.
 */
export async function guestAvailability(): Promise<GuestAvailability> {
  const r = await probeGuest();
  if (!r.ok && process.env.TENDER_TEST_REQUIRE_GUEST === '1') {
    throw new Error(`TENDER_TEST_REQUIRE_GUEST=1 but no test guest: ${r.reason}`);
  }
  return r;
}

async function probeGuest(): Promise<GuestAvailability> {
  for (const tool of ['qemu-system-x86_64', 'dpkg-deb', 'apt-get']) {
    try {
      await run('sh', ['-c', `command -v ${tool}`]);
    } catch {
      return { ok: false, reason: `${tool} not found (apt-get install qemu-system-x86 / a Debian-based host)` };
    }
  }
  try {
    return { ok: true, image: await ensureGuestImage() };
  } catch (e) {
    return { ok: false, reason: e instanceof GuestUnavailable ? e.message : `guest image build failed: ${(e as Error).message}` };
  }
}

async function build(): Promise<GuestImage> {
  const { hash, init, udhcpc } = inputs();
  const root = cacheRoot();
  const dir = path.join(root, hash);
  const cached = readImage(dir);
  if (cached) return cached;

  fs.mkdirSync(root, { recursive: true });
  // Test workers start together on a clean machine: one builds, the others wait for it.
  const lock = path.join(root, `.lock-${hash}`);
  for (;;) {
    try {
      fs.mkdirSync(lock);
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const img = readImage(dir);
    if (img) return img;
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
  const again = readImage(dir);
  if (again) {
    fs.rmSync(lock, { recursive: true, force: true });
    return again;
  }
  const tmp = fs.mkdtempSync(path.join(root, `.build-${hash}-`));
  try {
    const dl = path.join(tmp, 'dl');
    fs.mkdirSync(dl);
    await aptDownload(dl, ['linux-image-amd64', 'busybox-static']);
    // The meta package depends on exactly one versioned kernel package.
    const meta = fs.readdirSync(dl).find((f) => f.startsWith('linux-image-amd64_'));
    if (!meta) throw new GuestUnavailable('apt-get download linux-image-amd64 produced no package');
    const { stdout: deps } = await run('dpkg-deb', ['-f', path.join(dl, meta), 'Depends']);
    const kpkg = /linux-image-[0-9][^\s,(]*/.exec(deps)?.[0];
    if (!kpkg) throw new Error(`cannot find the kernel package in linux-image-amd64's Depends: ${deps.trim()}`);
    await aptDownload(dl, [kpkg]);

    const x = path.join(tmp, 'x');
    fs.mkdirSync(x);
    for (const deb of fs.readdirSync(dl)) {
      if (deb.startsWith('linux-image-amd64_')) continue;
      await run('dpkg-deb', ['-x', path.join(dl, deb), x], { timeout: 300_000 });
    }
    const boot = path.join(x, 'boot');
    const vmlinuz = fs.readdirSync(boot).find((f) => f.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new Error(`no /boot/vmlinuz-* in ${kpkg}`);
    const kernelVersion = vmlinuz.slice('vmlinuz-'.length);
    let modRoot = path.join(x, 'lib/modules', kernelVersion);
    if (!fs.existsSync(modRoot)) modRoot = path.join(x, 'usr/lib/modules', kernelVersion);
    const modules = resolveModules(modRoot, GUEST_MODULES);
    let busybox = path.join(x, 'bin/busybox');
    if (!fs.existsSync(busybox)) busybox = path.join(x, 'usr/bin/busybox');

    const entries: CpioEntry[] = [];
    for (const d of ['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'dev', 'proc', 'sys', 'tmp', 'run', 'etc', 'lib', 'lib/modules', 'tender', 'var', 'root']) {
      entries.push({ kind: 'dir', path: d });
    }
    // The kernel opens /dev/console before running /init, before devtmpfs is mounted.
    entries.push({ kind: 'chardev', path: 'dev/console', major: 5, minor: 1 });
    entries.push({ kind: 'chardev', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });
    entries.push({ kind: 'file', path: 'bin/busybox', data: fs.readFileSync(busybox), mode: 0o755 });
    entries.push({ kind: 'symlink', path: 'bin/sh', target: 'busybox' });
    entries.push({ kind: 'file', path: 'init', data: init, mode: 0o755 });
    entries.push({ kind: 'file', path: 'etc/udhcpc.script', data: udhcpc, mode: 0o755 });
    entries.push({ kind: 'file', path: 'etc/tender-modules', data: Buffer.from(modules.map((m) => m.name).join('\n') + '\n') });
    entries.push({ kind: 'file', path: 'bin/tender-result', data: Buffer.from('#!/bin/sh\necho "TENDER-RESULT $*"\n'), mode: 0o755 });
    for (const m of modules) entries.push({ kind: 'file', path: `lib/modules/${m.name}.ko`, data: m.data });

    const out = path.join(tmp, 'out');
    fs.mkdirSync(out);
    fs.copyFileSync(path.join(boot, vmlinuz), path.join(out, 'vmlinuz'));
    // Under TCG, decompressing the 8 MB bzImage takes ~3.5 s of the ~5 s boot. A kernel built
    // with CONFIG_PVH boots from its uncompressed ELF through QEMU's PVH entry instead.
    const config = path.join(boot, `config-${kernelVersion}`);
    const pvh = fs.existsSync(config) && configHasPvh(fs.readFileSync(config, 'utf8'));
    const vmlinux = pvh ? extractVmlinux(fs.readFileSync(path.join(boot, vmlinuz))) : null;
    if (vmlinux) fs.writeFileSync(path.join(out, 'vmlinux'), vmlinux);
    fs.writeFileSync(path.join(out, 'initramfs.cpio.gz'), padTo4(gzipSync(cpioNewc(entries), { level: 6 })));
    fs.writeFileSync(
      path.join(out, 'info.json'),
      JSON.stringify({ kernelVersion, kernelPackage: kpkg, modules: modules.map((m) => m.name) }, null, 2),
    );
    try {
      fs.renameSync(out, dir);
    } catch (e) {
      // Another worker finished first: use theirs.
      const theirs = readImage(dir);
      if (!theirs) throw e;
      return theirs;
    }
    const img = readImage(dir);
    if (!img) throw new Error(`guest image at ${dir} unreadable after build`);
    pruneOldImages(root, hash);
    return img;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.rmSync(lock, { recursive: true, force: true });
  }
}

/** Images of earlier builder versions (~75 MB each) go once a newer one is built. */
function pruneOldImages(root: string, keep: string): void {
  for (const e of fs.readdirSync(root)) {
    if (e === keep || !/^[0-9a-f]{16}$/.test(e)) continue;
    const p = path.join(root, e);
    try {
      // Spare an image another checkout on this machine built within the hour.
      if (Date.now() - fs.statSync(p).mtimeMs > 3600_000) fs.rmSync(p, { recursive: true, force: true });
    } catch {
      // raced with another pruner
    }
  }
}

/** The kernel looks for the next archive of a concatenated initramfs at a 4-byte boundary. */
function padTo4(b: Buffer): Buffer {
  const pad = (4 - (b.length % 4)) % 4;
  return pad ? Buffer.concat([b, Buffer.alloc(pad)]) : b;
}

/**
 * The cached initramfs plus a second archive holding /tender/test.sh (and any extra files),
 * written to `dest`. Returns `dest`.
 */
export function initrdWithScript(image: GuestImage, dest: string, script: string | undefined, files: Record<string, string | Uint8Array> = {}): string {
  const base = fs.readFileSync(image.initrd);
  const entries: CpioEntry[] = [{ kind: 'dir', path: 'tender' }];
  if (script !== undefined) entries.push({ kind: 'file', path: 'tender/test.sh', data: Buffer.from(script), mode: 0o755 });
  for (const [p, data] of Object.entries(files)) {
    entries.push({ kind: 'file', path: p, data: typeof data === 'string' ? Buffer.from(data) : data, mode: 0o755 });
  }
  fs.writeFileSync(dest, Buffer.concat([padTo4(base), gzipSync(cpioNewc(entries))]));
  return dest;
}
