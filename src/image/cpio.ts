/**
 * A writer for the cpio "newc" format (magic 070701), the format the kernel unpacks as an
 * initramfs (Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII hex
 * header, the NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes, and a
 * final "TRAILER!!!" entry. Written by hand so building a guest needs no cpio binary and no
 * root (device nodes are just header fields).
 */

export type CpioEntry =
  | { kind: 'dir'; path: string; mode?: number }
  | { kind: 'file'; path: string; data: Uint8Array; mode?: number }
  | { kind: 'symlink'; path: string; target: string }
  | { kind: 'chardev'; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

export function cpioNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const add = (name: string, mode: number, data: Uint8Array, rdevMajor = 0, rdevMinor = 0) => {
    const nameBytes = Buffer.from(name + '\0', 'utf8');
    const header =
      '070701' +
      hex8(ino++) +
      hex8(mode) +
      hex8(0) + // uid
      hex8(0) + // gid
      hex8(mode & S_IFDIR ? 2 : 1) + // nlink
      hex8(0) + // mtime: fixed, so identical inputs give identical archives
      hex8(data.length) +
      hex8(0) + // dev major
      hex8(0) + // dev minor
      hex8(rdevMajor) +
      hex8(rdevMinor) +
      hex8(nameBytes.length) +
      hex8(0); // check
    const h = Buffer.from(header, 'ascii');
    parts.push(h, nameBytes, Buffer.alloc(pad4(h.length + nameBytes.length)));
    if (data.length > 0) parts.push(Buffer.from(data.buffer, data.byteOffset, data.length), Buffer.alloc(pad4(data.length)));
  };
  for (const e of entries) {
    const p = e.path.replace(/^\/+/, '');
    switch (e.kind) {
      case 'dir':
        add(p, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0));
        break;
      case 'file':
        add(p, S_IFREG | (e.mode ?? 0o644), e.data);
        break;
      case 'symlink':
        add(p, S_IFLNK | 0o777, Buffer.from(e.target, 'utf8'));
        break;
      case 'chardev':
        add(p, S_IFCHR | (e.mode ?? 0o600), new Uint8Array(0), e.major, e.minor);
        break;
    }
  }
  add('TRAILER!!!', 0, new Uint8Array(0));
  return Buffer.concat(parts);
}
