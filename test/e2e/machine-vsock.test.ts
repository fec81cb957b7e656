/**
 * A machine whose guest agent talks over vsock (the default channel), on a host without
 * /dev/vhost-vsock: the QEMU driver starts tender's vhost-user vsock backend for it, and the
 * daemon takes the agent's connections at the Firecracker-style `<dir>/vsock_1024` socket.
 * Through the CLI, like a user: start, exec, a daemon restart (the agent reconnects to the new
 * daemon through the backend, which outlives it), a virtual USB disk imported over vsock
 * (USB/IP on the guest's AF_VSOCK to the host's port 3240, arriving at `<dir>/vsock_3240`),
 * TCP round trips through the TCP offload of the machine's datagram link, stop; `machine set
 * agent=serial` switches the next start to virtio-serial, where the same
 * disk is imported over TCP through the userspace network.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import net from 'node:net';
import { cliDaemon, guestSkipReason, prepareHome, ROOT, tenderCli } from '../helpers/cli.js';
import { findVhostVsock } from '../../src/vmm/vhost-vsock.js';
import { run, waitFor } from '../helpers/netns.js';

const why = await guestSkipReason(() => (findVhostVsock() ? null : 'tender-vhost-vsock is not built (npm ci builds it)'));
const hostVsock = existsSync('/dev/vhost-vsock');

describe.skipIf(why !== null)('a machine with its agent on vsock (vhost-user backend)', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-vsock-home-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };

  const { tender, ok } = tenderCli(env);
  const daemon = cliDaemon(env);
  const startDaemon = daemon.start;
  const stopDaemon = daemon.stop;

  beforeAll(async () => {
    await prepareHome(home);
    await startDaemon();
  }, 300_000);

  afterAll(async () => {
    await tender(['machine', 'rm', '--force', 'v']).catch(() => {});
    await stopDaemon();
    rmSync(home, { recursive: true, force: true });
  }, 60_000);

  it('boots with the agent on vsock (the default) and runs commands', async () => {
    await ok(['machine', 'create', 'v', '--memory', '256', '--start']);
    expect(JSON.parse(readFileSync(join(home, 'machines', 'v', 'machine.json'), 'utf8')).agent).toBeUndefined();
    const m = JSON.parse(await ok(['machine', 'inspect', 'v', '--json']));
    expect(m.state).toBe('running');
    expect(m.agent).toMatch(hostVsock ? /connected \(vsock via the host/ : /connected \(vsock via tender's vhost-user backend\)/);
    // The backend's drop counters (only the non-zero ones): there, as an object.
    if (!hostVsock) expect(m.vsockDrops).toEqual(expect.any(Object));
    expect((await ok(['machine', 'exec', 'v', '--', 'uname', '-s'])).trim()).toBe('Linux');
    // The guest side really is AF_VSOCK: the agent was started with --vsock.
    expect(await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'cat /proc/$(pidof tender-agent)/cmdline | tr "\\\\0" " "'])).toContain('--vsock 1024');
  }, 240_000);

  it('keeps the vsock agent across a daemon restart', async () => {
    const pid = Number(readFileSync(join(home, 'machines', 'v', 'qemu.pid'), 'utf8'));
    await stopDaemon();
    await startDaemon();
    // The known flake of the first exec after a daemon restart (docs/NOTES.md): one retry.
    let r = await tender(['machine', 'exec', 'v', '--', 'echo', 'still here']);
    if (r.code !== 0) {
      console.warn(`KNOWN FLAKE: exec after a daemon restart failed (${r.code}): ${r.stderr}`);
      await new Promise((res) => setTimeout(res, 2000));
      r = await tender(['machine', 'exec', 'v', '--', 'echo', 'still here']);
    }
    expect([r.code, r.stdout.trim()]).toEqual([0, 'still here']);
    expect(JSON.parse(await ok(['machine', 'inspect', 'v', '--json'])).pid).toBe(pid);
  }, 120_000);

  // The guest's TCP connections to port 3240 (0CA8) in /proc/net/tcp: none when USB/IP runs over vsock.
  const tcpToUsbip = async (m: string) =>
    (await ok(['machine', 'exec', m, '--', 'sh', '-c', 'cat /proc/net/tcp'])).split('\n').filter((l) => / [0-9A-F]{8}:0CA8 01 /.test(l)).length;
  const data = Buffer.alloc(1024 * 1024).map((_, i) => (i * 13 + 5) & 255);
  const importDisk = async () => {
    await ok(['usb', 'attach', 'v', 'stick']);
    const size = await waitFor(async () => ((await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'cat /sys/block/sd*/size 2>/dev/null'])).trim() === '2048' ? true : null), 30_000);
    expect(size).toBe(true);
    const sum = await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'dd if=/dev/sda bs=64k 2>/dev/null | md5sum']);
    expect(sum.split(' ')[0]).toBe(createHash('md5').update(data).digest('hex'));
  };

  it('imports a virtual USB disk over vsock', async () => {
    const img = join(home, 'usb-disk.img');
    writeFileSync(img, data);
    await ok(['usb', 'virtual', 'add', 'storage', '--image', img, '--name', 'stick', '--read-only']);
    await importDisk();
    expect(existsSync(join(home, 'machines', 'v', 'vsock_3240'))).toBe(true);
    expect(await tcpToUsbip('v')).toBe(0);
    expect(JSON.parse(await ok(['usb', 'ls', '--json'])).find((d: { name: string }) => d.name === 'stick')).toMatchObject({ machine: 'v', transport: 'vsock' });
    await ok(['usb', 'detach', 'v', 'stick']);
    await waitFor(async () => (await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'ls /sys/block | grep -c sd || true'])).trim() === '0', 20_000);
  }, 120_000);

  it('carries TCP round trips from the guest through the TCP offload of its datagram link', async () => {
    // tender-vsperf's round-trip mode: one byte, wait for the echo, 2000 times, over TCP to the
    // host alias (the NAT dials 127.0.0.1). The daemon's network stats must show the fast path
    // (docs/tcp-offload.md) carried them: QEMU's -netdev dgram is a FrameIO in socket mode.
    const echo = net.createServer((c) => {
      c.setNoDelay(true);
      c.on('data', (d) => c.write(d));
      c.on('error', () => {});
    });
    await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
    const port = (echo.address() as net.AddressInfo).port;
    try {
      await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'cat > /tmp/vsperf && chmod +x /tmp/vsperf'], undefined, readFileSync(join(ROOT, 'build/agent/tender-vsperf')));
      await ok(['machine', 'exec', 'v', '--', '/tmp/vsperf', `192.168.127.254:${port}`, 'rr', '2000']);
    } finally {
      echo.close();
    }
    const stats = JSON.parse((await run('curl', ['-sS', '--unix-socket', join(home, 'tender.sock'), 'http://tender/v1/network/stats'])).stdout);
    expect(stats.tcpOffload.rx_segments).toBeGreaterThan(1500);
    expect(stats.tcpOffload.tx_segments).toBeGreaterThan(1500);
  }, 120_000);

  it('stops cleanly, and the backend goes with QEMU', async () => {
    expect(JSON.parse(await ok(['machine', 'stop', 'v', '--json'])).state).toBe('stopped');
    await waitFor(async () => !(await run('pgrep', ['-f', join(home, 'machines', 'v', 'vhost-user-vsock.sock')]).then(() => true, () => false)), 10_000);
  }, 120_000);

  it('runs on virtio-serial when asked to', async () => {
    await ok(['machine', 'set', 'v', 'agent=serial']);
    expect(JSON.parse(await ok(['machine', 'inspect', 'v', '--json'])).agent).toBe('not connected (virtio-serial)');
    await ok(['machine', 'start', 'v']);
    expect(JSON.parse(await ok(['machine', 'inspect', 'v', '--json'])).agent).toBe('connected (virtio-serial)');
    expect(await ok(['machine', 'exec', 'v', '--', 'sh', '-c', 'cat /proc/$(pidof tender-agent)/cmdline | tr "\\0" " "'])).not.toContain('--vsock');
    // USB/IP goes over TCP to the gateway then.
    await importDisk();
    expect(await tcpToUsbip('v')).toBe(1);
    expect(JSON.parse(await ok(['usb', 'ls', '--json'])).find((d: { name: string }) => d.name === 'stick')).toMatchObject({ machine: 'v', transport: 'tcp' });
    await ok(['usb', 'detach', 'v', 'stick']);
    await ok(['machine', 'stop', 'v']);
  }, 240_000);
});
