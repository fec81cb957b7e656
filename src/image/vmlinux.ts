/**
 * The uncompressed kernel inside a bzImage. Under TCG, decompressing Debian's 8 MB bzImage
 * takes ~3.5 s of a ~5 s boot; a kernel built with CONFIG_PVH instead boots from its ELF
 * vmlinux through QEMU's PVH entry point (the Xen PVH ELF note), skipping the decompressor.
 */
import { spawnSync } from 'node:child_process';

/** CONFIG_PVH=y in the kernel's /boot/config-<version>. */
export function configHasPvh(config: string): boolean {
  return /^CONFIG_PVH=y$/m.test(config);
}

/**
 * What the kernel's scripts/extract-vmlinux does: find the compressed payload by its magic
 * and decompress the first stream only (what follows it is not part of the payload). Null
 * when no known payload decompresses to an ELF (or the host lacks xz/zstd).
 */
export function extractVmlinux(img: Buffer): Buffer | null {
  const formats: [Buffer, string, string[]][] = [
    [Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), 'xz', ['-dc', '--single-stream']],
    [Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), 'zstd', ['-dc']],
    [Buffer.from([0x1f, 0x8b, 0x08]), 'gzip', ['-dc']],
  ];
  for (const [magic, tool, args] of formats) {
    for (let at = img.indexOf(magic); at >= 0; at = img.indexOf(magic, at + 1)) {
      const r = spawnSync(tool, args, { input: img.subarray(at), maxBuffer: 1 << 30 });
      if (r.error) break; // tool missing: try the next format
      const elf = r.stdout;
      if (elf && elf.length > 4 && elf.readUInt32BE(0) === 0x7f454c46) return elf;
    }
  }
  return null;
}
