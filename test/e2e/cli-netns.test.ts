/**
 * The `tender netns` command line as a user runs it: the compiled CLI in a child process,
 * its one-line coded errors and exit statuses, a clean stop on SIGTERM/SIGINT, and every kind
 * of target (name, path, PID).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addNetns, delNetns, isRoot, nsExec, nsName, run, waitFor } from '../helpers/netns.js';

const root = new URL('../..', import.meta.url).pathname;
const cli = join(root, 'dist/src/cli.js');

function tender(args: string[], opts: { uid?: number } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const cmd = opts.uid !== undefined ? 'setpriv' : process.execPath;
  const argv = opts.uid !== undefined ? [`--reuid=${opts.uid}`, `--regid=${opts.uid}`, '--clear-groups', process.execPath, cli, ...args] : [cli, ...args];
  return new Promise((resolve) => {
    const p = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Start a long-running `tender netns`, resolved once it printed "ready". */
async function start(args: string[]): Promise<{ proc: ChildProcess; stdout: () => string; exited: Promise<number> }> {
  const proc = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TENDER_LOG: 'warn' } });
  let out = '';
  let err = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number>((r) => proc.on('close', (c) => r(c ?? -1)));
  await waitFor(() => out.includes('ready') || proc.exitCode !== null, 15_000);
  if (!out.includes('ready')) throw new Error(`tender netns did not start: ${err}`);
  return { proc, stdout: () => out, exited };
}

describe.skipIf(!isRoot)('tender netns command line', () => {
  const ns = nsName('cli');
  const dir = mkdtempSync(join(tmpdir(), 'tender-cli-'));

  beforeAll(async () => {
    if (!existsSync(cli)) await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root });
    await addNetns(ns);
  }, 120_000);

  afterAll(async () => {
    await delNetns(ns);
    rmSync(dir, { recursive: true, force: true });
  });

  it.each([
    [['netns', 'tender-no-such-ns'], 3, 'NETNS_NOT_FOUND'],
    [['netns', '999999999'], 3, 'NETNS_NOT_FOUND'],
    [['netns', '/nonexistent/ns/file'], 3, 'NETNS_NOT_FOUND'],
    [['netns', 'x', '--mtu', '100'], 2, 'BAD_MTU'],
    [['netns', 'x', '--mtu', '70000'], 2, 'BAD_MTU'],
    [['netns', 'x', '--mac', '01:00:00:00:00:01'], 2, 'BAD_MAC'],
    [['netns', 'x', '--mac', 'zz'], 2, 'BAD_MAC'],
    [['netns', 'x', '--ifname', 'a-very-long-ifname'], 2, 'BAD_IFNAME'],
    [['netns', 'x', '--subnet', '10.0.0.0/33'], 2, 'BAD_SUBNET'],
    [['netns', 'x', '--dns-upstream', 'not an address'], 2, 'BAD_UPSTREAM'],
    [['netns', 'x', '--forward', '80'], 2, 'BAD_FORWARD_SPEC'],
  ])('%j exits %i with %s on one line', async (args, code, name) => {
    const r = await tender(args);
    expect(r.code).toBe(code);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`^tender: ${name}: `));
  });

  it('rejects unknown options with usage status 2', async () => {
    const r = await tender(['netns', ns, '--frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('unknown option');
  });

  it('says PERMISSION_DENIED without root', async () => {
    const r = await tender(['netns', ns], { uid: 65534 });
    expect(r.code).toBe(4);
    expect(r.stderr).toMatch(/^tender: PERMISSION_DENIED: /);
  });

  it('serves a named namespace with --configure and stops cleanly on SIGTERM', async () => {
    const t = await start(['netns', ns, '--configure', '--forward', '0:80', '--pcap', join(dir, 'c.pcap')]);
    expect(t.stdout()).toMatch(/^forward 127\.0\.0\.1:\d+:80\/tcp -> 192\.168\.127\.2:80$/m);
    expect(await nsExec(ns, ['ip', '-4', '-o', 'addr', 'show', 'eth0'])).toContain('192.168.127.2/24');
    expect(await nsExec(ns, ['ip', 'route'])).toContain('default via 192.168.127.1');
    expect(await nsExec(ns, ['cat', '/etc/resolv.conf'])).toContain('nameserver 192.168.127.1');
    await nsExec(ns, ['ping', '-c', '1', '-W', '2', '192.168.127.1']);
    t.proc.kill('SIGTERM');
    expect(await t.exited).toBe(0);
    // The TAP went with the process; so did the resolv.conf it wrote.
    await expect(nsExec(ns, ['ip', 'link', 'show', 'eth0'])).rejects.toThrow();
    expect(existsSync(`/etc/netns/${ns}/resolv.conf`)).toBe(false);
    expect(existsSync(join(dir, 'c.pcap'))).toBe(true);
  });

  it('serves a namespace given by PID, and by path, and stops on SIGINT', async () => {
    const holder = spawn('ip', ['netns', 'exec', ns, 'sleep', '60'], { stdio: 'ignore' });
    try {
      await waitFor(async () => (await run('pgrep', ['-f', `^sleep 60$`])).stdout.trim() !== '', 5000);
      const pid = (await run('pgrep', ['-n', '-f', `^sleep 60$`])).stdout.trim();
      const srv = http.createServer((_q, r) => r.end(Buffer.alloc(3_000_000, 9)));
      await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
      const port = (srv.address() as { port: number }).port;
      for (const target of [pid, `/var/run/netns/${ns}`]) {
        // --no-offload: plain frames, so the switch cuts the gateway's TCP super-segments itself.
        const t = await start(['netns', target, '--configure', '--ifname', 'tnd0', '--no-offload']);
        await nsExec(ns, ['ping', '-c', '1', '-W', '2', '192.168.127.254']);
        expect((await nsExec(ns, ['curl', '-sS', '-o', '/dev/null', '-w', '%{size_download}', `http://192.168.127.254:${port}/`])).trim()).toBe('3000000');
        t.proc.kill('SIGINT');
        expect(await t.exited).toBe(0);
      }
      srv.close();
    } finally {
      holder.kill();
    }
  });
});
