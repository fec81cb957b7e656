/**
 * A machine whose guest agent talks over vsock, on a host without /dev/vhost-vsock: the QEMU
 * driver starts tender's vhost-user vsock backend for it, and the daemon takes the agent's
 * connections at the Firecracker-style `<dir>/vsock_1024` socket. Through the CLI, like a user:
 * start, exec, a daemon restart (the agent reconnects to the new daemon through the backend,
 * which outlives it), stop.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDefaultImage } from '../../src/image/default-image.js';
import { findVhostVsock } from '../../src/vmm/vhost-vsock.js';
import { hasCommand, isRoot, run, waitFor } from '../helpers/netns.js';

const root = new URL('../..', import.meta.url).pathname;
const cli = join(root, 'dist/src/cli.js');
const IMAGE_HOME = process.env.TENDER_TEST_IMAGE_HOME || '/var/tmp/tender-test-image';

let why: string | null = null;
if (!isRoot) why = 'needs root';
else if (!(await hasCommand('qemu-system-x86_64'))) why = 'qemu-system-x86_64 missing';
else if (!existsSync(join(root, 'build/agent/tender-agent'))) why = 'the guest agent is not built';
else if (!findVhostVsock()) why = 'tender-vhost-vsock is not built (npm ci builds it)';
if (why && process.env.TENDER_TEST_REQUIRE_GUEST === '1') throw new Error(`TENDER_TEST_REQUIRE_GUEST=1 but: ${why}`);
const hostVsock = existsSync('/dev/vhost-vsock');

describe.skipIf(why !== null)('a machine with its agent on vsock (vhost-user backend)', () => {
  const home = mkdtempSync(join(tmpdir(), 'tender-vsock-home-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  let daemon: ChildProcess | null = null;

  const tender = (args: string[]) =>
    new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      const p = spawn(process.execPath, [cli, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (d) => (stdout += d));
      p.stderr.on('data', (d) => (stderr += d));
      p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
    });
  const ok = async (args: string[]) => {
    const r = await tender(args);
    if (r.code !== 0) throw new Error(`tender ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
    return r.stdout;
  };
  const startDaemon = async () => {
    daemon = spawn(process.execPath, [cli, 'daemon', '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
    await waitFor(() => existsSync(join(home, 'tender.sock')), 15_000);
  };
  const stopDaemon = async () => {
    const d = daemon;
    daemon = null;
    if (!d) return;
    const closed = new Promise((r) => d.on('close', r));
    d.kill('SIGTERM');
    await closed;
  };

  beforeAll(async () => {
    if (!existsSync(cli)) await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root });
    const img = await buildDefaultImage({ home: IMAGE_HOME });
    await run('mkdir', ['-p', join(home, 'images')]);
    await run('cp', ['-a', img.dir, join(home, 'images', 'default')]);
    await startDaemon();
  }, 300_000);

  afterAll(async () => {
    await tender(['machine', 'rm', '--force', 'v']).catch(() => {});
    await stopDaemon();
    rmSync(home, { recursive: true, force: true });
  }, 60_000);

  it('boots with the agent on vsock and runs commands', async () => {
    await ok(['machine', 'create', 'v', '--memory', '256', '--agent', 'vsock', '--start']);
    const m = JSON.parse(await ok(['machine', 'inspect', 'v', '--json']));
    expect(m.state).toBe('running');
    expect(m.agent).toMatch(hostVsock ? /connected \(vsock via the host/ : /connected \(vsock via tender's vhost-user backend\)/);
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

  it('stops cleanly, and the backend goes with QEMU', async () => {
    expect(JSON.parse(await ok(['machine', 'stop', 'v', '--json'])).state).toBe('stopped');
    await waitFor(async () => !(await run('pgrep', ['-f', join(home, 'machines', 'v', 'vhost-user-vsock.sock')]).then(() => true, () => false)), 10_000);
  }, 120_000);
});
