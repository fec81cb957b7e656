/**
 * The default image's parts come from the host's Debian archive: `apt-get download` fetches
 * the .deb files into a private directory and `dpkg-deb -x` unpacks them there. Nothing is
 * installed on the host and nothing is fetched from anywhere apt is not configured to use.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** `IMAGE_UNAVAILABLE`: the default image cannot be built on this host. */
export class ImageUnavailableError extends Error {
  readonly code = 'IMAGE_UNAVAILABLE' as const;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ImageUnavailableError';
  }
}

const WHAT_INSTEAD = 'provide a kernel and initrd (--kernel F --initrd F) or a disk image (--disk F) instead';

export async function hasCommand(cmd: string): Promise<boolean> {
  try {
    await run('/bin/sh', ['-c', `command -v ${cmd}`]);
    return true;
  } catch {
    return false;
  }
}

/** Throws IMAGE_UNAVAILABLE unless apt-get, apt-cache and dpkg-deb are all there. */
export async function requireDebianTools(): Promise<void> {
  for (const tool of ['apt-get', 'apt-cache', 'dpkg-deb']) {
    if (!(await hasCommand(tool))) {
      throw new ImageUnavailableError(`the default image is built from Debian packages, but ${tool} is not on this host: ${WHAT_INSTEAD}`);
    }
  }
}

function aptError(what: string, e: unknown): ImageUnavailableError {
  const err = e as { stderr?: string; message: string };
  const msg = (err.stderr || err.message)
    .trim()
    .split('\n')
    .filter((l) => !l.startsWith('W:'))
    .join(' ');
  return new ImageUnavailableError(
    `${what} failed (${msg || 'no output'}); run 'apt-get update' on a Debian/Ubuntu host with access to its archive, or ${WHAT_INSTEAD}`,
    { cause: e },
  );
}

/** The candidate version and Depends of a package, from apt's cache (no network). */
export async function aptCandidate(pkg: string): Promise<{ version: string; depends: string }> {
  let out: string;
  try {
    ({ stdout: out } = await run('apt-cache', ['show', '--no-all-versions', pkg], { timeout: 60_000 }));
  } catch (e) {
    throw aptError(`apt-cache show ${pkg}`, e);
  }
  const version = /^Version: (.+)$/m.exec(out)?.[1]?.trim();
  if (!version) throw new ImageUnavailableError(`apt knows no version of ${pkg}; ${WHAT_INSTEAD}`);
  return { version, depends: /^Depends: (.+)$/m.exec(out)?.[1]?.trim() ?? '' };
}

/** The versioned kernel package a meta package (linux-image-amd64) depends on. */
export function kernelPackageOf(depends: string): string | null {
  return /linux-image-[0-9][^\s,(]*/.exec(depends)?.[0] ?? null;
}

/** Download `pkgs` as .deb files into `dir`; returns the files. */
export async function aptDownload(dir: string, pkgs: string[]): Promise<string[]> {
  const before = new Set(fs.readdirSync(dir));
  try {
    // Sandbox user root: the download dir is a private temp dir _apt could not write to.
    await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', ...pkgs], { cwd: dir, timeout: 600_000 });
  } catch (e) {
    throw aptError(`apt-get download ${pkgs.join(' ')}`, e);
  }
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.deb') && !before.has(f))
    .map((f) => path.join(dir, f));
}

export async function debExtract(deb: string, dest: string): Promise<void> {
  await run('dpkg-deb', ['-x', deb, dest], { timeout: 600_000, maxBuffer: 1 << 26 });
}

export async function debField(deb: string, field: string): Promise<string> {
  const { stdout } = await run('dpkg-deb', ['-f', deb, field]);
  return stdout.trim();
}
