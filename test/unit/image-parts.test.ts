/**
 * The default image's parts without apt: module resolution over a synthetic module tree
 * (ELF objects with a .modinfo section, laid out as in a Debian kernel package), the cpio
 * writer against the host's cpio, the static-ELF check, the init scripts' syntax under the
 * host's busybox, and the builder's decisions (reuse, IMAGE_UNAVAILABLE) with apt missing.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, test } from 'vitest';
import { cpioNewc } from '../../src/image/cpio.js';
import { kernelPackageOf } from '../../src/image/debian.js';
import {
  type ImageManifest,
  ImageUnavailableError,
  buildDefaultImage,
  defaultImageDir,
  isStaticElf,
  readDefaultImage,
  recipeHash,
} from '../../src/image/default-image.js';
import { INIT_SCRIPT, UDHCPC_SCRIPT } from '../../src/image/init-script.js';
import { modName, modinfo, parseSoftdep, resolveModules } from '../../src/image/kmod.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-image-t-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** An ELF64 LE relocatable with one .modinfo section of NUL-separated key=value strings. */
function fakeKo(info: string[]): Buffer {
  const modinfoData = Buffer.from(info.map((s) => s + '\0').join(''));
  const shstr = Buffer.from('\0.modinfo\0.shstrtab\0');
  const dataOff = 64;
  const shstrOff = dataOff + modinfoData.length;
  const shoff = (shstrOff + shstr.length + 7) & ~7;
  const b = Buffer.alloc(shoff + 3 * 64);
  b.writeUInt32BE(0x7f454c46, 0);
  b[4] = 2; // ELFCLASS64
  b[5] = 1; // little-endian
  b[6] = 1;
  b.writeUInt16LE(1, 0x10); // ET_REL
  b.writeUInt16LE(62, 0x12); // x86-64
  b.writeBigUInt64LE(BigInt(shoff), 0x28);
  b.writeUInt16LE(64, 0x34);
  b.writeUInt16LE(64, 0x3a);
  b.writeUInt16LE(3, 0x3c);
  b.writeUInt16LE(2, 0x3e);
  modinfoData.copy(b, dataOff);
  shstr.copy(b, shstrOff);
  const sh = (i: number, name: number, type: number, off: number, size: number) => {
    const o = shoff + i * 64;
    b.writeUInt32LE(name, o);
    b.writeUInt32LE(type, o + 4);
    b.writeBigUInt64LE(BigInt(off), o + 0x18);
    b.writeBigUInt64LE(BigInt(size), o + 0x20);
  };
  sh(1, 1, 1, dataOff, modinfoData.length); // .modinfo, PROGBITS
  sh(2, 10, 3, shstrOff, shstr.length); // .shstrtab, STRTAB
  return b;
}

/** /lib/modules/<ver> as Debian 12's kernel package lays it out (no modules.dep). */
function modTree(): string {
  const root = path.join(tmp, 'modules', '6.1.0-test-amd64');
  const put = (rel: string, info: string[]) => {
    fs.mkdirSync(path.dirname(path.join(root, 'kernel', rel)), { recursive: true });
    fs.writeFileSync(path.join(root, 'kernel', rel), fakeKo(info));
  };
  put('drivers/virtio/virtio.ko', ['license=GPL', 'depends=']);
  put('drivers/virtio/virtio_ring.ko', ['depends=']);
  put('drivers/virtio/virtio_mmio.ko', ['depends=virtio,virtio_ring']);
  put('drivers/net/virtio_net.ko', ['depends=net_failover,virtio,virtio_ring']);
  put('drivers/net/net_failover.ko', ['depends=failover']);
  put('net/core/failover.ko', ['depends=']);
  put('fs/ext4/ext4.ko', ['depends=jbd2,mbcache,crc16', 'softdep=pre: crypto-crc32c']);
  put('fs/jbd2/jbd2.ko', ['depends=', 'softdep=pre: crypto-crc32c']);
  put('fs/mbcache.ko', ['depends=']);
  put('lib/crc16.ko', ['depends=']);
  put('crypto/crc32c_generic.ko', ['alias=crypto-crc32c-generic', 'alias=crc32c-generic', 'alias=crypto-crc32c', 'alias=crc32c', 'depends=']);
  put('arch/x86/crypto/crc32c-intel.ko', ['alias=crypto-crc32c', 'alias=crc32c-intel', 'depends=']);
  put('drivers/usb/usbip/vhci-hcd.ko', ['depends=usbip-core,usbcore']);
  put('drivers/usb/usbip/usbip-core.ko', ['depends=usbcore']);
  put('drivers/usb/core/usbcore.ko', ['depends=', 'softdep=post: nosuch-accelerator']);
  fs.writeFileSync(path.join(root, 'modules.builtin'), 'kernel/drivers/block/loop.ko\nkernel/lib/crc16.ko\n');
  return root;
}

describe('kernel modules', () => {
  const root = modTree();

  test('dependencies load first; built-in ones are skipped; names normalise - to _', () => {
    const r = resolveModules(root, ['virtio_mmio', 'virtio_net', 'vhci-hcd']);
    const names = r.modules.map((m) => m.name);
    expect(names).toEqual(['virtio', 'virtio_ring', 'virtio_mmio', 'failover', 'net_failover', 'virtio_net', 'usbcore', 'usbip_core', 'vhci_hcd']);
    expect(r.builtin).toEqual([]);
  });

  test('soft dependencies resolve through aliases, preferring the generic implementation', () => {
    const r = resolveModules(root, ['ext4']);
    expect(r.modules.map((m) => m.name)).toEqual(['crc32c_generic', 'jbd2', 'mbcache', 'ext4']);
    expect(r.builtin).toEqual(['crc16']);
  });

  test('a missing wanted module is an error; a missing soft dependency is not', () => {
    expect(() => resolveModules(root, ['nosuch'])).toThrow(/nosuch is neither built in nor under/);
    expect(resolveModules(root, ['usbcore']).modules.map((m) => m.name)).toEqual(['usbcore']);
  });

  test('modinfo reads repeated keys; softdep lists pre and post', () => {
    const info = modinfo(fakeKo(['alias=a', 'alias=b', 'depends=x,y']));
    expect(info.get('alias')).toEqual(['a', 'b']);
    expect(parseSoftdep(['pre: a b post: c'])).toEqual(['a', 'b', 'c']);
    expect(modName('/k/usb-storage.ko.xz')).toBe('usb_storage');
    expect(() => modinfo(Buffer.from('not an elf at all, just some bytes that are long enough to pass the size check......'))).toThrow(/ELF64/);
  });

  test('modinfo never reads past a hostile header', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 64, maxLength: 512 }), (bytes) => {
        const b = Buffer.from(bytes);
        b.writeUInt32BE(0x7f454c46, 0);
        b[4] = 2;
        b[5] = 1;
        try {
          modinfo(b);
        } catch (e) {
          // a RangeError/Error is fine; anything escaping as a crash of the process is not
          expect(e).toBeInstanceOf(Error);
        }
      }),
    );
  });
});

describe('cpio (newc)', () => {
  test('the host cpio lists and extracts what we write', () => {
    const archive = cpioNewc([
      { kind: 'dir', path: 'etc' },
      { kind: 'file', path: 'etc/hello', data: Buffer.from('hi\n'), mode: 0o600 },
      { kind: 'symlink', path: 'bin/sh', target: 'busybox' },
      { kind: 'chardev', path: 'dev/null', major: 1, minor: 3 },
    ]);
    expect(archive.length % 4).toBe(0);
    const list = spawnSync('cpio', ['-itv', '--quiet'], { input: archive, encoding: 'utf8' });
    if (list.error) return; // no cpio on this host: the e2e boot still proves the format
    expect(list.stdout).toMatch(/^drwxr-xr-x .* etc$/m);
    expect(list.stdout).toMatch(/^-rw------- .* 3 .* etc\/hello$/m);
    expect(list.stdout).toMatch(/^lrwxrwxrwx .* bin\/sh -> busybox$/m);
    expect(list.stdout).toMatch(/^crw------- .* 1,\s+3 .* dev\/null$/m);
  });
});

describe('image builder', () => {
  test('init scripts parse under the host busybox sh', () => {
    for (const [name, text] of [['init', INIT_SCRIPT], ['udhcpc.script', UDHCPC_SCRIPT]] as const) {
      const f = path.join(tmp, name);
      fs.writeFileSync(f, text);
      const r = spawnSync('busybox', ['sh', '-n', f], { encoding: 'utf8' });
      if (r.error) return;
      expect(r.status, `${name}: ${r.stderr}`).toBe(0);
    }
    expect(INIT_SCRIPT).toMatch(/^#!\/bin\/busybox sh\n/);
    expect(INIT_SCRIPT).toContain('echo "TENDER-BOOT uptime=');
  });

  test('static ELF check: no PT_INTERP is static; /bin/ls and scripts are not', () => {
    expect(isStaticElf(fakeKo([]))).toBe(true);
    expect(isStaticElf(Buffer.from('#!/bin/sh\n'.padEnd(80)))).toBe(false);
    expect(isStaticElf(fs.readFileSync('/bin/ls'))).toBe(false); // dynamic: has PT_INTERP
  });

  test("linux-image-amd64's Depends names the kernel package", () => {
    expect(kernelPackageOf('linux-image-6.1.0-57-amd64 (= 6.1.192-3)')).toBe('linux-image-6.1.0-57-amd64');
    expect(kernelPackageOf('linux-image-6.12.9+bpo-amd64 (= 6.12.9-1~bpo12+1)')).toBe('linux-image-6.12.9+bpo-amd64');
    expect(kernelPackageOf('initramfs-tools')).toBeNull();
  });

  test('without apt and without an image: IMAGE_UNAVAILABLE, saying what to provide instead', async () => {
    const old = process.env.PATH;
    process.env.PATH = path.join(tmp, 'empty-path');
    try {
      const err = await buildDefaultImage({ home: path.join(tmp, 'home-none'), agentPath: path.join(tmp, 'no-agent') }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageUnavailableError);
      expect((err as ImageUnavailableError).code).toBe('IMAGE_UNAVAILABLE');
      expect((err as Error).message).toMatch(/apt-get is not on this host.*--kernel F --initrd F.*--disk F/);
    } finally {
      process.env.PATH = old;
    }
  });

  test('an up-to-date image is reused as is (no apt needed)', async () => {
    const home = path.join(tmp, 'home-reuse');
    const dir = defaultImageDir(home);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'vmlinux'), 'k');
    fs.writeFileSync(path.join(dir, 'initramfs.cpio.gz'), 'i');
    const manifest: ImageManifest = {
      format: 1,
      version: 'v-test',
      recipe: recipeHash(),
      builtAt: '2026-01-01T00:00:00.000Z',
      kernel: { package: 'linux-image-x', metaVersion: '1', version: '1', release: 'x', file: 'vmlinux', format: 'elf-pvh', sha256: '' },
      initrd: { file: 'initramfs.cpio.gz', sha256: '' },
      busybox: { package: 'busybox-static', version: '1' },
      modules: ['virtio'],
      builtinModules: [],
      agent: { included: false, reason: 'test' },
    };
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    const old = process.env.PATH;
    process.env.PATH = path.join(tmp, 'empty-path');
    try {
      const steps: string[] = [];
      const img = await buildDefaultImage({ home, agentPath: path.join(tmp, 'no-agent'), onProgress: (p) => steps.push(p.step) });
      expect(img.version).toBe('v-test');
      expect(img.kernel).toBe(path.join(dir, 'vmlinux'));
      expect(img.agent).toBe(false);
      expect(steps).toEqual(['check', 'done']);
    } finally {
      process.env.PATH = old;
    }
    // A different recipe (an edited /init) is not up to date: it would rebuild, which needs apt.
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify({ ...manifest, recipe: 'other' }));
    expect(readDefaultImage(home)?.manifest.recipe).toBe('other');
  });
});
