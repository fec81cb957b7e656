/**
 * The four network stacks the bench compares, each started against a fresh network namespace
 * (the "guest") and stopped afterwards:
 *
 * - veth: a kernel veth pair, host side 10.213.0.1/30, guest side .2 — the physical limit.
 * - slirp4netns 1.2.0 (libslirp): guest 10.0.2.100, host loopback reached at 10.0.2.2 (the
 *   default; `--disable-host-loopback` is not given).
 * - pasta (Debian passt 2023-03): copies the host's address and gateway into the namespace; a
 *   connection to the gateway address is mapped to the host's 127.0.0.1 (this build predates
 *   `--map-host-loopback`; the mapping is the default and `--no-map-gw` would turn it off).
 *   That goes through pasta's tap path, like the other stacks; `-T`/`-U` (the splice path
 *   between the namespace's loopback and the host's) would bypass the virtual NIC entirely,
 *   so all automatic port forwards are turned off.
 * - tender: `tender netns NS --configure`; guest 192.168.127.2, host loopback at the host
 *   alias 192.168.127.254.
 *
 * `target` is the address the guest dials; `bind` is where the host-side servers listen.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { must, run, startDaemon, waitFor, type Daemon } from './proc.js';
import { packageRoot } from '../native/index.js';

export const STACK_NAMES = ['veth', 'slirp4netns', 'pasta', 'tender'] as const;
export type StackName = (typeof STACK_NAMES)[number];

export interface Running {
  /** The address the guest connects to in order to reach the host-side servers. */
  target: string;
  /** The host address those servers bind to. */
  bind: string;
  /** The command lines that set the stack up, for the report. */
  commands: string[];
  /** The stack's own process (none for veth), for CPU time per round trip. */
  pid?: number;
  stop(): Promise<void>;
}

export interface Stack {
  name: StackName;
  /** What the stack is, in a few words, for the report. */
  title: string;
  version(): Promise<string>;
  start(ns: string, mtu: number): Promise<Running>;
}

/** Repository root (from dist/bench/ or, under vitest, bench/). */
export const repoRoot = packageRoot;

/** Resolves once `ifname` in `ns` has an IPv4 address and the namespace has a route to `target`. */
async function waitConfigured(ns: string, ifname: string, target: string, daemon: Daemon | null, ms = 10_000): Promise<void> {
  await waitFor(`${ifname} configured in ${ns}`, ms, async () => {
    if (daemon?.exited()) throw new Error(`exited early: ${daemon.output().trim().split('\n').slice(-3).join(' / ')}`);
    const a = await run('ip', ['-n', ns, '-4', '-o', 'addr', 'show', 'dev', ifname], { timeoutMs: 3000 });
    if (a.code !== 0 || !/inet /.test(a.stdout)) return false;
    const r = await run('ip', ['-n', ns, 'route', 'get', target], { timeoutMs: 3000 });
    return r.code === 0;
  });
}

async function firstLine(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { timeoutMs: 5000 });
  return (r.stdout || r.stderr).split('\n').find((l) => l.trim() && !/syslog/.test(l))?.trim() ?? 'unknown';
}

const VETH_HOST = '10.213.0.1';
const VETH_GUEST = '10.213.0.2';

export const veth: Stack = {
  name: 'veth',
  title: 'kernel veth pair (the physical limit)',
  version: async () => `kernel ${(await firstLine('uname', ['-r']))}`,
  async start(ns, mtu) {
    // 15-byte interface-name limit: tbv<pid> fits for any pid.
    const host = `tbv${process.pid}`.slice(0, 15);
    const commands = [
      `ip link add ${host} mtu ${mtu} type veth peer name eth0 netns ${ns}`,
      `ip addr add ${VETH_HOST}/30 dev ${host} && ip link set ${host} up`,
      `ip -n ${ns} link set eth0 mtu ${mtu} && ip -n ${ns} addr add ${VETH_GUEST}/30 dev eth0 && ip -n ${ns} link set eth0 up`,
    ];
    await must('ip', ['link', 'add', host, 'mtu', String(mtu), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns]);
    const del = async () => void (await run('ip', ['link', 'del', host], { timeoutMs: 5000 }));
    try {
      await must('ip', ['addr', 'add', `${VETH_HOST}/30`, 'dev', host]);
      await must('ip', ['link', 'set', host, 'up']);
      await must('ip', ['-n', ns, 'link', 'set', 'eth0', 'mtu', String(mtu)]);
      await must('ip', ['-n', ns, 'addr', 'add', `${VETH_GUEST}/30`, 'dev', 'eth0']);
      await must('ip', ['-n', ns, 'link', 'set', 'eth0', 'up']);
      await waitConfigured(ns, 'eth0', VETH_HOST, null);
    } catch (err) {
      await del();
      throw err;
    }
    return { target: VETH_HOST, bind: VETH_HOST, commands, stop: del };
  },
};

export const slirp4netns: Stack = {
  name: 'slirp4netns',
  title: 'slirp4netns (libslirp), Debian package',
  async version() {
    const r = await run('slirp4netns', ['--version'], { timeoutMs: 5000 });
    const v = /slirp4netns version (\S+)/.exec(r.stdout)?.[1] ?? 'unknown';
    const lib = /libslirp: (\S+)/.exec(r.stdout)?.[1];
    return `slirp4netns ${v}${lib ? ` (libslirp ${lib})` : ''}`;
  },
  async start(ns, mtu) {
    // slirp4netns's MTU limit is 65521; host loopback is reachable at 10.0.2.2 by default.
    const args = ['--configure', `--mtu=${mtu}`, '--netns-type=path', `/run/netns/${ns}`, 'tap0'];
    const d = startDaemon('slirp4netns', args, `slirp4netns for ${ns}`);
    try {
      await waitConfigured(ns, 'tap0', '10.0.2.2', d);
    } catch (err) {
      await d.stop();
      throw err;
    }
    return { target: '10.0.2.2', bind: '127.0.0.1', commands: [`slirp4netns ${args.join(' ')}`], pid: d.child.pid, stop: () => d.stop() };
  },
};

export const pasta: Stack = {
  name: 'pasta',
  title: 'pasta (passt), Debian package',
  async version() {
    // This build prints "pasta unknown version": ask dpkg.
    const r = await run('dpkg-query', ['-W', '-f', '${Version}', 'passt'], { timeoutMs: 5000 });
    return r.code === 0 && r.stdout.trim() ? `passt ${r.stdout.trim()}` : await firstLine('pasta', ['--version']);
  },
  async start(ns, mtu) {
    // --runas 0: as root pasta otherwise drops to "nobody" before joining the namespace and
    // fails with "Couldn't switch to pasta namespaces". -f keeps it a child we can stop.
    const args = [
      '-f', '-q', '--runas', '0', '--config-net', '--mtu', String(mtu),
      '-t', 'none', '-u', 'none', '-T', 'none', '-U', 'none',
      '--netns', `/run/netns/${ns}`,
    ];
    const d = startDaemon('pasta', args, `pasta for ${ns}`);
    let gw: string;
    try {
      // The gateway pasta configures is the host's own default gateway; find it in the namespace.
      gw = await waitFor(`pasta's default route in ${ns}`, 10_000, async () => {
        if (d.exited()) throw new Error(`exited early: ${d.output().trim().split('\n').filter((l) => !/syslog/.test(l)).slice(-3).join(' / ')}`);
        const r = await run('ip', ['-n', ns, '-4', 'route', 'show', 'default'], { timeoutMs: 3000 });
        return /default via (\S+)/.exec(r.stdout)?.[1] ?? null;
      });
      await waitConfigured(ns, readIfname(ns) ?? 'eth0', gw, d);
    } catch (err) {
      await d.stop();
      throw err;
    }
    return { target: gw, bind: '127.0.0.1', commands: [`pasta ${args.join(' ')}`], pid: d.child.pid, stop: () => d.stop() };
  },
};

/** pasta names the namespace interface after the host's default-route interface. */
function readIfname(_ns: string): string | null {
  try {
    const routes = readFileSync('/proc/net/route', 'utf8').split('\n').slice(1);
    for (const l of routes) {
      const f = l.trim().split(/\s+/);
      if (f[1] === '00000000' && f[0]) return f[0];
    }
  } catch {
    /* fall back to eth0 */
  }
  return null;
}

export const tender: Stack = {
  name: 'tender',
  title: 'tender (this repository)',
  async version() {
    const root = repoRoot();
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
    const rev = await run('git', ['-C', root, 'rev-parse', '--short', 'HEAD'], { timeoutMs: 5000 });
    const dirty = await run('git', ['-C', root, 'status', '--porcelain', '--untracked-files=no'], { timeoutMs: 5000 });
    const r = rev.code === 0 ? ` ${rev.stdout.trim()}${dirty.stdout.trim() ? '+dirty' : ''}` : '';
    return `tender ${pkg.version}${r}`;
  },
  async start(ns, mtu) {
    const cli = join(repoRoot(), 'dist', 'src', 'cli.js');
    if (!existsSync(cli)) throw new Error(`${cli} is missing: run npm run build:ts`);
    const args = [cli, 'netns', ns, '--configure', '--mtu', String(mtu), '--log-level', 'warn'];
    // For profiling runs, e.g. TENDER_BENCH_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof'.
    const nodeArgs = (process.env.TENDER_BENCH_NODE_ARGS ?? '').split(/\s+/).filter(Boolean);
    const d = startDaemon(process.execPath, [...nodeArgs, ...args], `tender for ${ns}`);
    try {
      await waitConfigured(ns, 'eth0', '192.168.127.254', d);
    } catch (err) {
      await d.stop();
      throw err;
    }
    return {
      target: '192.168.127.254',
      bind: '127.0.0.1',
      commands: [`node dist/src/cli.js ${args.slice(1).join(' ')}`],
      pid: d.child.pid,
      stop: () => d.stop(),
    };
  },
};

export const STACKS: Record<StackName, Stack> = { veth, slirp4netns, pasta, tender };
