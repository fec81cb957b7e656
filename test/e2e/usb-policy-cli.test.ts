/**
 * `tender usb ...` as a user types it: the compiled CLI (dist/) against a daemon started in
 * this process with a stand-in VMM (machines are created, never booted) and a fake host USB
 * source (test/helpers/fake-host-usb.ts: virtual disks under host busids; the real libusb
 * source is exercised by test/e2e/usb-host-device.test.ts in a QEMU guest, since this host
 * has no USB devices). Covers ls, attach --auto, one machine per device, policy add/ls/rm,
 * bind/unbind, `usb serve` relaying the shared devices to the Debian `usbip` tool, unplug, and
 * the exit codes of bad input.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, ROOT, tenderCli } from '../helpers/cli.js';
import { type Daemon, startDaemon } from '../../src/daemon/daemon.js';
import { createLogger } from '../../src/log.js';
import type { VmmDriver } from '../../src/vmm/driver.js';
import { MemoryBackend } from '../../usb/devices/scsi.js';
import { FakeHostSource } from '../helpers/fake-host-usb.js';

const run = promisify(execFile);
const hasUsbip = await run('usbip', ['version']).then(() => true, () => false);

/** Machines are only created here: starting one is not part of these tests. */
const driver: VmmDriver = {
  name: 'none',
  commandLine: () => ({ cmd: 'true', args: [] }),
  resolveAccel: async () => ({ accel: 'tcg' as const }),
  start: async () => {
    throw new Error('not in this test');
  },
  adopt: async () => null,
} as unknown as VmmDriver;

describe('tender usb (CLI) against a daemon with fake host devices', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-usbcli-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  const src = new FakeHostSource();
  let daemon: Daemon;

  const { tender, ok } = tenderCli(env);

  beforeAll(async () => {
    if (!existsSync(CLI)) await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT });
    src.plug({ busid: '1-2', vendorId: 0x0781, productId: 0x5567, product: 'Cruzer', backend: new MemoryBackend(new Uint8Array(512 * 64)) });
    src.plug({ busid: '1-3', vendorId: 0x1111, productId: 0x2222, product: 'Gadget', backend: new MemoryBackend(new Uint8Array(512 * 64)) });
    daemon = await startDaemon({ home, log: createLogger('silent'), deps: { driver, images: { resolve: async () => ({ kernel: '/nonexistent' }) }, hostUsb: () => src } });
  }, 180_000);

  afterAll(async () => {
    await daemon?.stop();
    rmSync(home, { recursive: true, force: true });
  });

  it('usb ls: host devices with busid, VID:PID, product and state', async () => {
    const out = await ok(['usb', 'ls']);
    expect(out.split('\n')[0]).toMatch(/^BUSID\s+VID:PID\s+DEVICE\s+STATE$/);
    expect(out).toMatch(/^1-2\s+0781:5567\s+Fake Cruzer\s+available$/m);
    const ls = JSON.parse(await ok(['usb', 'ls', '--json']));
    expect(ls).toMatchObject([
      { id: '1-2', kind: 'host', vidpid: '0781:5567', state: 'available' },
      { id: '1-3', kind: 'host', vidpid: '1111:2222', state: 'available' },
    ]);
  });

  it('usb attach --auto records a rule; one machine per device; errors have codes', async () => {
    await ok(['machine', 'create', 'm']);
    await ok(['machine', 'create', 'n']);
    expect(await ok(['usb', 'attach', 'm', '0781:5567', '--auto'])).toBe('1-2 attached to m, rule p1\n');
    expect(await ok(['usb', 'ls'])).toMatch(/^1-2\s+0781:5567\s+Fake Cruzer\s+attached to m$/m);
    expect(src.openNow.size).toBe(0); // m is not running: the host keeps the device meanwhile

    const cases: [string[], number, string][] = [
      [['usb', 'attach', 'n', '1-2'], 5, 'USB_DEVICE_BUSY'],
      [['usb', 'attach', 'nosuch', '1-3'], 3, 'MACHINE_NOT_FOUND'],
      [['usb', 'attach', 'm', '9-9'], 3, 'USB_DEVICE_NOT_FOUND'],
      [['usb', 'attach', 'm', 'two words'], 2, 'BAD_REQUEST'],
      [['usb', 'policy', 'add', 'n', 'nonsense'], 2, 'BAD_ARGUMENT'],
      [['usb', 'policy', 'add', 'n', '0781:5567'], 5, 'USB_POLICY_EXISTS'],
      [['usb', 'policy', 'rm', 'p9'], 3, 'USB_POLICY_NOT_FOUND'],
      [['usb', 'detach', 'n', '1-2'], 3, 'USB_DEVICE_NOT_FOUND'],
    ];
    for (const [args, code, name] of cases) {
      const r = await tender(args);
      expect([r.code, r.stderr.trim()], args.join(' ')).toEqual([code, expect.stringMatching(new RegExp(`^tender: ${name}: `))]);
    }
    const d = JSON.parse(await ok(['usb', 'attach', 'm', '1-2', '--json']));
    expect(d).toMatchObject({ id: '1-2', machine: 'm', state: 'attached', policy: 'p1' });
  });

  it('usb policy add/ls/rm', async () => {
    expect(await ok(['usb', 'policy', 'add', 'n', '3-1.4'])).toBe('p2\n');
    expect(JSON.parse(await ok(['usb', 'policy', 'add', 'n', '1-3', '--json']))).toMatchObject({ id: 'p3', machine: 'n', kind: 'busid', match: '1-3', devices: ['1-3'] });
    const table = await ok(['usb', 'policy', 'ls']);
    expect(table).toMatch(/^ID\s+MATCH\s+MACHINE\s+PLUGGED IN$/m);
    expect(table).toMatch(/^p1\s+0781:5567\s+m\s+1-2$/m);
    expect(table).toMatch(/^p2\s+3-1\.4\s+n\s+-$/m);
    expect(await ok(['usb', 'policy', 'rm', 'p2'])).toBe('p2\n');
    expect(await ok(['usb', 'policy', 'rm', 'p3'])).toBe('p3\n');
    expect(JSON.parse(await ok(['usb', 'policy', 'ls', '--json'])).map((p: { id: string }) => p.id)).toEqual(['p1']);
  });

  it.skipIf(!hasUsbip)('usb bind shares a device; usb serve offers only shared devices (usbip list); unbind', async () => {
    expect(await ok(['usb', 'bind', '1-3'])).toBe('1-3\n');
    expect(await ok(['usb', 'ls'])).toMatch(/^1-3\s+1111:2222\s+Fake Gadget\s+shared$/m);
    expect(src.openNow.has('1-3')).toBe(true); // open for serve clients from now on
    const serve = spawn(process.execPath, [CLI, 'usb', 'serve', '--listen', '127.0.0.1:0'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      let out = '';
      serve.stdout.on('data', (d) => (out += d));
      for (let i = 0; i < 400 && !/listening /.test(out); i++) await new Promise((r) => setTimeout(r, 25));
      const port = /listening 127\.0\.0\.1:(\d+)/.exec(out)?.[1];
      expect(port, out).toBeDefined();
      expect(out).toContain('device 1-3 1111:2222 Fake Gadget');
      const { stdout } = await run('usbip', ['--tcp-port', port!, 'list', '-r', '127.0.0.1']);
      expect(stdout).toMatch(/1-3: .*\(1111:2222\)/);
      expect(stdout).not.toMatch(/1-2:/); // attached, not shared
    } finally {
      serve.kill('SIGTERM');
      await new Promise((r) => serve.once('close', r));
    }
    expect(await ok(['usb', 'unbind', '1-3'])).toBe('1-3\n');
    expect(await ok(['usb', 'ls'])).toMatch(/^1-3\s+1111:2222\s+Fake Gadget\s+available$/m);
    for (let i = 0; i < 100 && src.openNow.has('1-3'); i++) await new Promise((r) => setTimeout(r, 10));
    expect(src.openNow.has('1-3')).toBe(false);
  });

  it('unplug: the device and its attachment go, the rule stays', async () => {
    src.unplug('1-2');
    expect(await ok(['usb', 'ls'])).not.toMatch(/^1-2 /m);
    expect(await ok(['usb', 'policy', 'ls'])).toMatch(/^p1\s+0781:5567\s+m\s+-$/m);
    src.plug({ busid: '1-2', vendorId: 0x0781, productId: 0x5567, product: 'Cruzer', backend: new MemoryBackend(new Uint8Array(512 * 64)) });
    // m is stopped: the rule waits for it to start.
    expect(await ok(['usb', 'ls'])).toMatch(/^1-2\s+0781:5567\s+Fake Cruzer\s+available$/m);
  });
});
