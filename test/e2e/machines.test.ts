/**
 * Machines end to end, as a user drives them: the `tender` CLI (compiled) against a daemon it
 * started, booting the default image under TCG. Covers the lease, exec, NAT to a host server,
 * explicit and automatic forwards, two machines reaching each other by name, bridged mode on a
 * test LAN (a Linux bridge and a namespace running dnsmasq as the LAN's DHCP server), stop,
 * start, rm, a killed QEMU being noticed, a daemon restart keeping machines and forwards, and
 * bad input giving clear errors while changing nothing.
 *
 * Two machines run at once (TCG, 256 MiB each). Everything lives in a throwaway TENDER_HOME.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliDaemon, guestSkipReason, prepareHome, tenderCli } from '../helpers/cli.js';
import { addNetns, delNetns, nsExec, nsName, run, waitFor } from '../helpers/netns.js';

const why = await guestSkipReason();

describe.skipIf(why !== null)('machines, end to end (TCG)', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-home-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  let hostServer: http.Server;
  let hostPort = 0;
  const blob = Buffer.alloc(4 * 1024 * 1024).map((_, i) => (i * 2654435761) >>> 24);
  const blobHash = createHash('sha256').update(blob).digest('hex');
  const lan = nsName('lan');
  const bridge = `tbr${process.pid % 100000}`;
  const lanIf = `tlv${process.pid % 100000}`;
  let dnsmasq: ChildProcess | null = null;

  const { tender, ok } = tenderCli(env);
  const inspect = async (name: string) => JSON.parse(await ok(['machine', 'inspect', name, '--json']));

  const daemon = cliDaemon(env);
  const startDaemon = daemon.start;
  const stopDaemon = daemon.stop;

  beforeAll(async () => {
    await prepareHome(home);
    hostServer = http.createServer((req, res) => res.end(req.url === '/blob' ? blob : 'hello from the host'));
    await new Promise<void>((r) => hostServer.listen(0, '127.0.0.1', r));
    hostPort = (hostServer.address() as net.AddressInfo).port;
    // The test LAN for bridged mode: a bridge, and a namespace on it serving DHCP.
    await run('ip', ['link', 'add', bridge, 'type', 'bridge']);
    await run('ip', ['link', 'set', bridge, 'up']);
    await addNetns(lan);
    await run('ip', ['link', 'add', lanIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', lan]);
    await run('ip', ['link', 'set', lanIf, 'master', bridge, 'up']);
    await nsExec(lan, ['ip', 'addr', 'add', '10.213.9.1/24', 'dev', 'eth0']);
    await nsExec(lan, ['ip', 'link', 'set', 'eth0', 'up']);
    dnsmasq = spawn('ip', ['netns', 'exec', lan, 'dnsmasq', '--no-daemon', '--no-resolv', '--no-hosts', '--port=0', '--interface=eth0', '--bind-interfaces',
      '--dhcp-range=10.213.9.50,10.213.9.99,1h', `--dhcp-leasefile=${join(home, 'lan.leases')}`, '--pid-file='], { stdio: 'ignore' });
    await startDaemon();
  }, 300_000);

  afterAll(async () => {
    for (const n of ['a', 'b', 'c']) await tender(['machine', 'rm', '--force', n]).catch(() => {});
    await stopDaemon();
    hostServer?.close();
    dnsmasq?.kill();
    await delNetns(lan);
    await run('ip', ['link', 'del', lanIf]).catch(() => {});
    await run('ip', ['link', 'del', bridge]).catch(() => {});
    rmSync(home, { recursive: true, force: true });
  }, 120_000);

  it('refuses bad input with a clear error and changes nothing', async () => {
    const cases: [string[], number, string][] = [
      [['machine', 'create', 'Bad_Name'], 2, 'BAD_MACHINE_NAME'],
      [['machine', 'create', 'k', '--kernel', '/nonexistent/vmlinuz'], 3, 'FILE_NOT_FOUND'],
      [['machine', 'create', 'f', '--forward', '80'], 2, 'BAD_FORWARD_SPEC'],
      [['machine', 'create', 'n', '--net', 'wifi'], 2, 'BAD_ARGUMENT'],
      [['machine', 'start', 'nosuch'], 3, 'MACHINE_NOT_FOUND'],
      [['machine', 'exec', 'nosuch', '--', 'true'], 3, 'MACHINE_NOT_FOUND'],
    ];
    for (const [args, code, name] of cases) {
      const r = await tender(args);
      expect([r.code, r.stderr.trim()], args.join(' ')).toEqual([code, expect.stringMatching(new RegExp(`^tender: ${name}: `))]);
    }
    expect(JSON.parse(await ok(['machine', 'ls', '--json']))).toEqual([]);
  });

  it('creates and starts a machine from the default image; it gets a lease', async () => {
    await ok(['machine', 'create', 'a', '--memory', '256', '--forward', '0:8080', '--start'], 240_000);
    const a = await inspect('a');
    expect(a.state).toBe('running');
    expect(a.ip).toMatch(/^192\.168\.127\.\d+$/);
    expect(a.agent).toContain('connected');
    expect(a.accel).toMatch(/tcg|kvm/);
    const r = await tender(['machine', 'create', 'a']);
    expect(r.stderr).toMatch(/^tender: MACHINE_EXISTS: /);
  }, 300_000);

  it('runs commands with their output and exit status', async () => {
    expect((await ok(['machine', 'exec', 'a', '--', 'hostname'])).trim()).toBe('a');
    const r = await tender(['machine', 'exec', 'a', '--', 'sh', '-c', 'echo out; echo err >&2; exit 7']);
    expect([r.code, r.stdout, r.stderr]).toEqual([7, 'out\n', 'err\n']);
  });

  it('gives a terminal with -t, and shows the serial console', async () => {
    expect((await ok(['machine', 'exec', '-t', 'a', '--', 'tty'])).trim()).toMatch(/^\/dev\/pts\/\d+$/);
    expect(await ok(['machine', 'logs', 'a'])).toMatch(/\[\s*\d+\.\d+\]/); // kernel messages with timestamps
  });

  it('streams events as NDJSON', async () => {
    const chunks: string[] = [];
    const req = http.get({ socketPath: join(home, 'tender.sock'), path: '/v1/events' }, (res) => res.on('data', (d) => chunks.push(String(d))));
    await new Promise((r) => setTimeout(r, 200));
    await ok(['forward', 'add', 'a', '0:9999']);
    await waitFor(() => chunks.join('').split('\n').some((l) => l.includes('"forward.added"') && l.includes('"machine":"a"')), 5000);
    req.destroy();
    await ok(['forward', 'rm', 'a', JSON.parse(await ok(['forward', 'ls', 'a', '--json'])).find((f: { guestPort: number }) => f.guestPort === 9999).spec]);
  });

  it('downloads from a host server through NAT, byte for byte', async () => {
    const sum = await ok(['machine', 'exec', 'a', '--', 'sh', '-c', `wget -qO- http://host.tender.internal:${hostPort}/blob | sha256sum`]);
    expect(sum.split(' ')[0]).toBe(blobHash);
  }, 120_000);

  it('forwards a host port to a server in the guest, and forwards new listeners automatically', async () => {
    await ok(['machine', 'exec', 'a', '--', 'sh', '-c', 'mkdir -p /www && echo guest-page > /www/index.html && busybox httpd -p 8080 -h /www && busybox httpd -p 8081 -h /www']);
    const fwds = JSON.parse(await ok(['forward', 'ls', 'a', '--json'])) as { spec: string; hostPort: number; guestPort: number; auto: boolean }[];
    const explicit = fwds.find((f) => !f.auto && f.guestPort === 8080)!;
    const page = await new Promise<string>((resolve, reject) =>
      http.get(`http://127.0.0.1:${explicit.hostPort}/`, (res) => {
        let s = '';
        res.on('data', (d) => (s += d));
        res.on('end', () => resolve(s));
      }).on('error', reject),
    );
    expect(page).toBe('guest-page\n');
    // The agent reports the new listener on 8081; a forward on the same host port appears.
    await waitFor(async () => (JSON.parse(await ok(['forward', 'ls', 'a', '--json'])) as { auto: boolean; guestPort: number }[]).some((f) => f.auto && f.guestPort === 8081), 20_000);
  }, 60_000);

  it('lets two machines reach each other by name', async () => {
    await ok(['machine', 'create', 'b', '--memory', '256', '--start'], 240_000);
    const out = await ok(['machine', 'exec', 'a', '--', 'ping', '-c', '1', '-W', '5', 'b.tender.internal']);
    expect(out).toMatch(/1 packets received/);
  }, 300_000);

  it('notices a killed QEMU and records why', async () => {
    const b = await inspect('b');
    process.kill(b.pid, 'SIGKILL');
    await waitFor(async () => (await inspect('b')).state === 'crashed', 10_000);
    expect((await inspect('b')).lastExit.reason).toMatch(/SIGKILL|killed/);
    await ok(['machine', 'rm', 'b']);
  }, 30_000);

  it('keeps machines and forwards when the daemon restarts', async () => {
    const before = await inspect('a');
    await stopDaemon();
    expect(() => process.kill(before.pid, 0)).not.toThrow();
    // The CLI starts a daemon in the background when none runs.
    const after = await inspect('a');
    expect([after.state, after.pid, after.ip]).toEqual(['running', before.pid, before.ip]);
    // KNOWN FLAKE (docs/NOTES.md): about one full-suite run in three, the first exec right after
    // a daemon restart ends with "the connection to the machine ended before the command did".
    // Until it is understood, one retry, and the first failure is printed with the daemon's log.
    let r = await tender(['machine', 'exec', 'a', '--', 'echo', 'still here']);
    if (r.code !== 0) {
      const log = existsSync(join(home, 'daemon.log')) ? readFileSync(join(home, 'daemon.log'), 'utf8').slice(-4000) : '(no log)';
      console.warn(`KNOWN FLAKE: exec after a daemon restart failed (${r.code}): ${r.stderr}\ndaemon.log:\n${log}`);
      await new Promise((res) => setTimeout(res, 2000));
      r = await tender(['machine', 'exec', 'a', '--', 'echo', 'still here']);
    }
    expect([r.code, r.stdout.trim()]).toEqual([0, 'still here']);
    const fwd = after.forwards.find((f: { guestPort: number }) => f.guestPort === 8080);
    expect(fwd).toBeDefined();
    // Hand the background daemon back to the test.
    const pid = Number(readFileSync(join(home, 'daemon.pid'), 'utf8'));
    process.kill(pid, 'SIGTERM');
    await waitFor(() => !existsSync(join(home, 'daemon.pid')), 10_000);
    await startDaemon();
  }, 60_000);

  it('attaches a virtual USB disk to a machine over USB/IP, and detaches it', async () => {
    const img = join(home, 'usb-disk.img');
    const data = Buffer.alloc(1024 * 1024).map((_, i) => (i * 7 + 1) & 255);
    writeFileSync(img, data);
    const dev = JSON.parse(await ok(['usb', 'virtual', 'add', 'storage', '--image', img, '--name', 'stick', '--json']));
    expect(dev).toMatchObject({ id: 'v1', busid: '99-1', state: 'available' });
    await ok(['usb', 'attach', 'a', 'stick']);
    // The guest kernel's vhci-hcd took it: a 2048-block disk whose bytes are the image's.
    const size = await waitFor(async () => {
      const s = await ok(['machine', 'exec', 'a', '--', 'sh', '-c', 'cat /sys/block/sd*/size 2>/dev/null']);
      return s.trim() === '2048' ? s : null;
    }, 20_000);
    expect(size?.trim()).toBe('2048');
    const sum = await ok(['machine', 'exec', 'a', '--', 'sh', '-c', 'dd if=/dev/sda bs=64k 2>/dev/null | md5sum']);
    expect(sum.split(' ')[0]).toBe(createHash('md5').update(data).digest('hex'));
    await ok(['machine', 'exec', 'a', '--', 'sh', '-c', 'printf tender-was-here | dd of=/dev/sda bs=512 seek=7 conv=notrunc,fsync 2>/dev/null']);
    expect(readFileSync(img).subarray(7 * 512, 7 * 512 + 15).toString()).toBe('tender-was-here');
    const ls = JSON.parse(await ok(['usb', 'ls', '--json']));
    expect(ls.find((d: { id: string }) => d.id === 'v1')).toMatchObject({ id: 'v1', machine: 'a', state: 'attached' });
    // One machine per device.
    const r = await tender(['usb', 'attach', 'b-does-not-exist', 'stick']);
    expect(r.stderr).toMatch(/^tender: MACHINE_NOT_FOUND: /);
    await ok(['usb', 'detach', 'a', 'stick']);
    await waitFor(async () => (await ok(['machine', 'exec', 'a', '--', 'sh', '-c', 'ls /sys/block | grep -c sd || true'])).trim() === '0', 20_000);
    await ok(['usb', 'virtual', 'rm', 'stick']);
  }, 120_000);

  it('stops, starts and removes', async () => {
    const stopped = JSON.parse(await ok(['machine', 'stop', 'a', '--json'], 60_000));
    expect(stopped.state).toBe('stopped');
    expect((await inspect('a')).lastExit.reason).toMatch(/powered off/);
    const started = JSON.parse(await ok(['machine', 'start', 'a', '--json'], 240_000));
    expect(started.state).toBe('running');
    const r = await tender(['machine', 'rm', 'a']);
    expect(r.stderr).toMatch(/^tender: MACHINE_STATE: /);
    await ok(['machine', 'rm', 'a', '--force']);
    expect(existsSync(join(home, 'machines', 'a'))).toBe(false);
  }, 300_000);

  it('puts a machine on a LAN bridge: its lease comes from the LAN\'s DHCP server', async () => {
    await ok(['machine', 'create', 'c', '--memory', '256', '--net', `bridged:${bridge}`, '--start'], 240_000);
    const c = await inspect('c');
    const ip = await waitFor(async () => /inet (10\.213\.9\.\d+)/.exec(await ok(['machine', 'exec', 'c', '--', 'ip', '-4', 'addr', 'show', 'eth0']))?.[1], 30_000);
    expect(readFileSync(join(home, 'lan.leases'), 'utf8')).toContain(c.mac);
    // The LAN reaches it.
    if (!ip) throw new Error('no LAN address');
    await nsExec(lan, ['ping', '-c', '1', '-W', '5', ip]);
    // Back to the userspace network, live.
    expect(JSON.parse(await ok(['net', 'bridge', 'c', '--off', '--json'])).net).toBe('nat');
  }, 300_000);
});
