/**
 * Network namespaces as `tender netns` targets: a name under /var/run/netns, a path to a
 * namespace file, or a PID (its /proc/PID/ns/net).
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { TenderError } from './errors.js';

const run = promisify(execFile);

export type NetnsTarget = { kind: 'name'; name: string; path: string } | { kind: 'path'; path: string } | { kind: 'pid'; pid: number; path: string };

export const NETNS_RUN_DIR = '/var/run/netns';

export function resolveNetns(target: string): NetnsTarget {
  let t: NetnsTarget;
  if (/^\d+$/.test(target)) {
    const pid = Number(target);
    t = { kind: 'pid', pid, path: `/proc/${pid}/ns/net` };
  } else if (target.includes('/')) {
    t = { kind: 'path', path: target };
  } else {
    if (target === '' || target === '.' || target === '..') throw new TenderError('BAD_ARGUMENT', `not a namespace name: "${target}"`);
    t = { kind: 'name', name: target, path: `${NETNS_RUN_DIR}/${target}` };
  }
  let ok = false;
  try {
    ok = existsSync(t.path) && !statSync(t.path).isDirectory();
  } catch {
    ok = false;
  }
  if (!ok) {
    const what = t.kind === 'pid' ? `process ${t.pid}` : t.kind === 'name' ? `network namespace "${t.name}" (${t.path})` : `namespace file ${t.path}`;
    throw new TenderError('NETNS_NOT_FOUND', `${what} does not exist`);
  }
  return t;
}

/** For the native TAP call. */
export function nativeNetnsSpec(t: NetnsTarget): { path: string } {
  return { path: t.path };
}

/** Run a command inside the namespace (nsenter works for every kind of target). */
export async function inNetns(t: NetnsTarget, cmd: string[]): Promise<string> {
  const { stdout } = await run('nsenter', [`--net=${t.path}`, '--', ...cmd]);
  return stdout;
}

export interface ConfigureSpec {
  ifname: string;
  address: string;
  prefix: number;
  gateway: string;
  nameserver: string;
  search: string[];
}

/**
 * `--configure`: what slirp4netns --configure does, plus resolv.conf. The address and
 * default route are set inside the namespace; resolv.conf is written where `ip netns exec`
 * finds it (/etc/netns/NAME/resolv.conf) for a named namespace. Other targets have their own
 * mount namespace, which we leave alone: the returned note says what to put there.
 */
export async function configureNetns(t: NetnsTarget, s: ConfigureSpec): Promise<{ resolvConf: string | null; note?: string }> {
  try {
    await inNetns(t, ['ip', 'link', 'set', 'lo', 'up']);
    await inNetns(t, ['ip', 'addr', 'replace', `${s.address}/${s.prefix}`, 'dev', s.ifname]);
    await inNetns(t, ['ip', 'route', 'replace', 'default', 'via', s.gateway, 'dev', s.ifname]);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new TenderError('CONFIGURE_FAILED', `--configure: ${(e.stderr ?? e.message).trim()}`, { cause: err });
  }
  const content = `# written by tender netns --configure\nnameserver ${s.nameserver}\n${s.search.length ? `search ${s.search.join(' ')}\n` : ''}`;
  if (t.kind !== 'name') {
    return { resolvConf: null, note: `resolv.conf not written (not a named namespace): use "${content.split('\n')[1]}"` };
  }
  const dir = `/etc/netns/${t.name}`;
  const file = `${dir}/resolv.conf`;
  try {
    mkdirSync(dir, { recursive: true });
    if (existsSync(file) && !readFileSync(file, 'utf8').startsWith('# written by tender')) {
      return { resolvConf: null, note: `${file} exists and was not written by tender: left alone` };
    }
    writeFileSync(file, content);
  } catch (err) {
    throw new TenderError('CONFIGURE_FAILED', `--configure: cannot write ${file}: ${(err as Error).message}`, { cause: err });
  }
  return { resolvConf: file };
}

/** Remove what configureNetns wrote. */
export function unconfigureNetns(resolvConf: string | null): void {
  if (resolvConf === null) return;
  try {
    if (readFileSync(resolvConf, 'utf8').startsWith('# written by tender')) rmSync(resolvConf);
  } catch {
    // already gone
  }
}
