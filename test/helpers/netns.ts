/** Helpers for end-to-end tests in network namespaces the test creates (and always deletes). */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { promisify } from 'node:util';

export const run = promisify(execFile);

export const isRoot = process.getuid?.() === 0;

export async function hasCommand(cmd: string): Promise<boolean> {
  try {
    await run('sh', ['-c', `command -v ${cmd}`]);
    return true;
  } catch {
    return false;
  }
}

let seq = 0;
/** A unique namespace name for this process. */
export function nsName(tag: string): string {
  return `tender-t-${tag}-${process.pid}-${seq++}`;
}

export async function addNetns(name: string): Promise<void> {
  await run('ip', ['netns', 'add', name]);
  await run('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
}

export async function delNetns(name: string): Promise<void> {
  await run('ip', ['netns', 'del', name]).catch(() => {});
}

/** Run a command in the namespace; resolves with stdout, rejects with stderr in the message. */
export async function nsExec(ns: string, cmd: string[], opts: { timeout?: number; env?: Record<string, string> } = {}): Promise<string> {
  try {
    const r = await run('ip', ['netns', 'exec', ns, ...cmd], {
      timeout: opts.timeout ?? 20_000,
      env: { ...process.env, ...opts.env },
      maxBuffer: 64 * 1024 * 1024,
    });
    return r.stdout;
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message: string };
    throw new Error(`${cmd.join(' ')} in ${ns} failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
  }
}

export function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket('udp4');
    s.once('error', reject);
    s.bind(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

/** Poll `f` until it returns a truthy value or `ms` pass. */
export async function waitFor<T>(f: () => T | Promise<T>, ms = 10_000, step = 50): Promise<T> {
  const end = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) throw new Error(`condition not met within ${ms} ms${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, step));
  }
}

/** A dnsmasq on 127.0.0.1 as an upstream DNS server with the given extra arguments. */
export async function startDnsmasq(args: string[]): Promise<{ port: number; proc: ChildProcess; stop(): void }> {
  // The port is free for UDP when picked, but dnsmasq also binds TCP on it, and other tests run
  // at the same time: if dnsmasq exits (port taken), pick another.
  for (let attempt = 0; ; attempt++) {
    const port = await freeUdpPort();
    const proc = spawn(
      'dnsmasq',
      ['--no-daemon', '--no-resolv', '--no-hosts', '--bind-interfaces', '--listen-address=127.0.0.1', `--port=${port}`, '--pid-file=', ...args],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let exited = false;
    proc.on('exit', () => (exited = true));
    try {
      // Ready when it answers.
      await waitFor(async () => {
        if (exited) return 'exited';
        await run('dig', ['+time=1', '+tries=1', '-p', String(port), '@127.0.0.1', 'ready.invalid']);
        return 'ready';
      }, 10_000, 100).then((r) => {
        if (r === 'exited') throw new Error('dnsmasq exited');
      });
      return { port, proc, stop: () => proc.kill() };
    } catch (err) {
      proc.kill();
      if (attempt >= 4) throw err;
    }
  }
}

export const UDHCPC_SCRIPT = `#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr replace "$ip/\${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    env | grep -E '^(ip|mask|subnet|router|dns|domain|search|mtu|lease|serverid|broadcast|hostname)=' | sort > "$LEASE_FILE"
    ;;
esac
exit 0
`;
