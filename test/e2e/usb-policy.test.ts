/**
 * An auto-attach rule in a running machine: the default image booted under TCG by a daemon
 * started in this process, whose host USB source is a fake (test/helpers/fake-host-usb.ts: a
 * virtual disk under a host busid and VID:PID; the real libusb source is exercised by
 * test/e2e/usb-host-device.test.ts in a QEMU guest, since this host has no USB devices).
 * Through the CLI, like a user: `usb attach --auto`; the guest kernel's vhci-hcd gets the disk
 * and reads the host's bytes; the device is unplugged (usb.unplugged, the disk goes away in
 * the guest, the device is closed on the host, the rule stays) and comes back re-enumerated,
 * first at the same busid with a new devnum, then at another port: each time the rule attaches
 * it again and the guest reads the same bytes.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestSkipReason, prepareHome, tenderCli } from '../helpers/cli.js';
import { type Daemon, startDaemon } from '../../src/daemon/daemon.js';
import { defaultDeps } from '../../src/daemon/deps.js';
import type { TenderEvent } from '../../src/daemon/events.js';
import { paths } from '../../src/daemon/paths.js';
import { createLogger } from '../../src/log.js';
import { MemoryBackend } from '../../usb/devices/scsi.js';
import { FakeHostSource } from '../helpers/fake-host-usb.js';
import { waitFor } from '../helpers/netns.js';

const why = await guestSkipReason();

const STICK = { vendorId: 0x0781, productId: 0x5567, product: 'Cruzer' };

describe.skipIf(why !== null)('USB auto-attach rule in a running machine (TCG)', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-usbpol-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  const src = new FakeHostSource();
  const data = new Uint8Array(1024 * 1024).map((_, i) => (i * 13 + 7) & 255);
  const md5 = createHash('md5').update(data).digest('hex');
  const events: TenderEvent[] = [];
  let daemon: Daemon;

  const { tender, ok } = tenderCli(env);
  const sh = (script: string) => ok(['machine', 'exec', 'p', '--', 'sh', '-c', script]);
  /** The guest's USB disk: its size in blocks and the md5 of its bytes, or null while there is none. */
  const guestDisk = async (): Promise<{ size: string; md5: string } | null> => {
    const out = (await sh('for b in /sys/block/sd*; do [ -e "$b" ] || exit 0; echo "$(cat $b/size) $(dd if=/dev/${b##*/} bs=64k 2>/dev/null | md5sum)"; done')).trim();
    if (!out) return null;
    const [size, sum] = out.split(/\s+/);
    return { size: size!, md5: sum! };
  };
  /** Wait until the guest reads the host's bytes from its USB disk. */
  const guestReads = () =>
    waitFor(async () => {
      const d = await guestDisk();
      return d?.md5 === md5 ? d : null;
    }, 30_000);
  const plug = (busid: string) => src.plug({ ...STICK, busid, backend: new MemoryBackend(data) });

  beforeAll(async () => {
    await prepareHome(home);
    const p = paths(home);
    daemon = await startDaemon({ home, log: createLogger('warn'), deps: { ...defaultDeps(p), hostUsb: () => src } });
    daemon.events.on('event', (e) => events.push(e));
    await ok(['machine', 'create', 'p', '--memory', '256', '--start'], 240_000);
    // The image's init loads the usbip modules after DHCP; the agent may answer before that.
    await waitFor(async () => (await sh('ls -d /sys/devices/platform/vhci_hcd.0 2>/dev/null || true')).trim() !== '', 60_000);
  }, 400_000);

  afterAll(async () => {
    await tender(['machine', 'rm', '--force', 'p']).catch(() => {});
    await daemon?.stop();
    rmSync(home, { recursive: true, force: true });
  }, 120_000);

  it('usb attach --auto: the guest gets the host device and reads its bytes', async () => {
    plug('1-2');
    expect(await ok(['usb', 'attach', 'p', '0781:5567', '--auto'])).toMatch(/^1-2 attached to p \(port \d+\), rule p1\n$/);
    expect(src.openNow.has('1-2')).toBe(true);
    expect(await guestReads()).toEqual({ size: '2048', md5 });
  }, 60_000);

  it('unplugged: the disk goes away in the guest, the device is closed, the rule stays', async () => {
    src.unplug('1-2');
    await waitFor(() => events.some((e) => e.type === 'usb.unplugged' && e.machine === 'p' && e.device === '1-2'), 10_000);
    await waitFor(async () => (await guestDisk()) === null, 30_000);
    expect(src.openNow.size).toBe(0);
    expect(JSON.parse(await ok(['usb', 'policy', 'ls', '--json']))).toMatchObject([{ id: 'p1', machine: 'p', match: '0781:5567', devices: [] }]);
  }, 60_000);

  it('re-enumerated at the same busid (new devnum): attached again by the rule', async () => {
    const n = events.filter((e) => e.type === 'usb.attached').length;
    plug('1-2');
    await waitFor(() => events.filter((e) => e.type === 'usb.attached').length > n, 30_000);
    expect(await guestReads()).toEqual({ size: '2048', md5 });
    const ls = JSON.parse(await ok(['usb', 'ls', '--json']));
    expect(ls).toMatchObject([{ busid: '1-2', state: 'attached', machine: 'p', policy: 'p1' }]);
  }, 90_000);

  it('back at another port: the VID:PID rule follows it', async () => {
    src.unplug('1-2');
    await waitFor(async () => (await guestDisk()) === null, 30_000);
    plug('1-4');
    await waitFor(() => events.some((e) => e.type === 'usb.attached' && e.device === '1-4'), 30_000);
    expect(await guestReads()).toEqual({ size: '2048', md5 });
    // detach leaves the rule; the device goes back to the host.
    await ok(['usb', 'detach', 'p', '1-4']);
    await waitFor(async () => (await guestDisk()) === null, 30_000);
    await waitFor(() => src.openNow.size === 0, 10_000);
  }, 90_000);
});
