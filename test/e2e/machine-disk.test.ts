/**
 * A machine whose root is the user's own disk image (`machine create --disk F`), booted with
 * the default image's kernel and initramfs under TCG: the initramfs mounts the disk and
 * switch_roots to its /sbin/init, and the guest agent keeps running inside the disk's system
 * (copied into its /run), so exec works there. The disk here is a small ext4 image made with
 * mkfs.ext4 -d: busybox (taken from the default image), an init that brings the network up
 * with udhcpc as a distribution's init would, and a marker file. What a guest writes to the
 * disk survives a stop and a start.
 */
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UDHCPC_SCRIPT } from '../../src/image/init-script.js';
import { cliDaemon, guestSkipReason, prepareHome, tenderCli } from '../helpers/cli.js';
import { hasCommand, run } from '../helpers/netns.js';

const why = await guestSkipReason(async () => ((await hasCommand('mkfs.ext4')) ? null : 'mkfs.ext4 missing (e2fsprogs)'));

/** The disk's init: what a distribution's init does, reduced to what the test needs. */
const DISK_INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
echo "DISK-INIT up"
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
ip link set eth0 up
udhcpc -i eth0 -b -t 5 -T 1 -A 2 -x hostname:$(hostname) -s /etc/udhcpc.script
while :; do sleep 3600 & wait $!; done
`;

describe.skipIf(why !== null)('a machine booted from a root disk (TCG)', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-home-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  const disk = join(home, 'root.ext4');
  const { tender, ok } = tenderCli(env);
  const daemon = cliDaemon(env);

  beforeAll(async () => {
    await prepareHome(home);
    const img = join(home, 'images', 'default');
    // The disk's content: busybox from the default image's initramfs, our init, a marker.
    const tree = join(home, 'tree');
    const x = join(home, 'x');
    mkdirSync(x);
    await run('sh', ['-c', `zcat '${join(img, 'initramfs.cpio.gz')}' | cpio -id --quiet bin/busybox`], { cwd: x });
    for (const d of ['bin', 'sbin', 'etc', 'dev', 'proc', 'sys', 'run', 'tmp', 'root']) mkdirSync(join(tree, d), { recursive: true });
    copyFileSync(join(x, 'bin/busybox'), join(tree, 'bin/busybox'));
    chmodSync(join(tree, 'bin/busybox'), 0o755);
    writeFileSync(join(tree, 'sbin/init'), DISK_INIT, { mode: 0o755 });
    writeFileSync(join(tree, 'etc/udhcpc.script'), UDHCPC_SCRIPT, { mode: 0o755 });
    writeFileSync(join(tree, 'etc/marker'), 'root from the disk\n');
    await run('mkfs.ext4', ['-q', '-F', '-L', 'tender-root', '-d', tree, disk, '64M']);
    await daemon.start();
  }, 300_000);

  afterAll(async () => {
    await tender(['machine', 'rm', '--force', 'd']).catch(() => {});
    await daemon.stop();
    rmSync(home, { recursive: true, force: true });
  }, 120_000);

  it('boots the disk, runs commands in its system, and keeps what the guest wrote', async () => {
    const created = JSON.parse(await ok(['machine', 'create', 'd', '--disk', disk, '--memory', '256', '--start', '--json']));
    expect(created.state).toBe('running');
    expect(created.ip).toMatch(/^\d+\.\d+\.\d+\.\d+$/);
    // The disk's system, not the initramfs: its marker, its init as PID 1.
    expect(await ok(['machine', 'exec', 'd', '--', 'cat', '/etc/marker'])).toBe('root from the disk\n');
    expect(await ok(['machine', 'exec', 'd', '--', 'cat', '/proc/1/cmdline'])).toContain('/sbin/init');
    expect(await ok(['machine', 'exec', 'd', '--', 'sh', '-c', 'grep " / " /proc/mounts'])).toMatch(/^\/dev\/vda \/ ext4 rw/);
    await ok(['machine', 'exec', 'd', '--', 'sh', '-c', 'echo written by the guest > /root/note && sync']);
    await ok(['machine', 'stop', 'd']);
    await ok(['machine', 'start', 'd']);
    expect(await ok(['machine', 'exec', 'd', '--', 'cat', '/root/note'])).toBe('written by the guest\n');
  }, 400_000);
});
