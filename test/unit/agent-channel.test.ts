/**
 * Which agent channel a machine gets (vsock by default: the host's vhost-vsock, else tender's
 * vhost-user backend, else virtio-serial with a warning; serial when asked), that a
 * re-adopted machine keeps the channel it booted with, and the unix side of
 * listenGuestVsock. A `sleep` child plays the VMM (as in machines.test.ts).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { networkConfig } from '../../netstack/config.js';
import { Network } from '../../netstack/network.js';
import { EventBus } from '../../src/daemon/events.js';
import { type AgentSession, MachineManager } from '../../src/daemon/machines.js';
import { paths } from '../../src/daemon/paths.js';
import { createLogger } from '../../src/log.js';
import type { ExitInfo, MachineSpec, VmmDriver, VmmInstance } from '../../src/vmm/driver.js';
import { type VsockChoice, chooseVsock, hostCid, listenGuestVsock } from '../../src/vmm/vsock-channel.js';

function instance(pid: number): VmmInstance {
  const exited = new Promise<ExitInfo>((resolve) => {
    const iv = setInterval(() => {
      try {
        process.kill(pid, 0);
      } catch {
        clearInterval(iv);
        resolve({ code: null, signal: null, reason: 'gone' });
      }
    }, 20);
  });
  const kill = async () => {
    process.kill(pid, 'SIGKILL');
    return exited;
  };
  return { pid, exited, shutdown: kill, kill };
}

class FakeDriver implements VmmDriver {
  readonly name = 'fake';
  specs: MachineSpec[] = [];
  vsock?: () => VsockChoice;
  commandLine() {
    return { cmd: 'sleep', args: [] };
  }
  async resolveAccel() {
    return { accel: 'tcg' as const };
  }
  async start(spec: MachineSpec) {
    this.specs.push(spec);
    return instance(spawn('sleep', ['1000'], { stdio: 'ignore' }).pid!);
  }
  async adopt(spec: MachineSpec, pid: number) {
    this.specs.push(spec);
    return instance(pid);
  }
}

function fakeSession(): AgentSession {
  return {
    ready: new Promise(() => {}),
    onListeners() {},
    poweroff: async () => {},
    exec: () => {
      throw new Error('not here');
    },
    close() {},
  };
}

const log = createLogger('silent');

describe('the agent channel of a machine', () => {
  let home: string;
  let network: Network;
  let driver: FakeDriver;
  let vsock: VsockChoice | undefined;
  let mms: MachineManager[];
  const sessions: string[] = [];

  const manager = () => {
    const mm = new MachineManager({
      paths: paths(home),
      network,
      driver,
      images: { resolve: async () => ({ kernel: '/dev/null' }) },
      events: new EventBus(),
      log,
      connectAgent: (p) => (sessions.push(`serial ${p}`), fakeSession()),
      listenAgent: (ep, port) => (sessions.push(`vsock ${ep.via} ${ep.cid} ${ep.path}_${port}`), fakeSession()),
      vsock: vsock === undefined ? undefined : () => vsock!,
    });
    mms.push(mm);
    return mm;
  };

  beforeEach(() => {
    home = mkdtempSync(join(tmpdir(), 'tender-chan-'));
    network = new Network({ config: networkConfig({ dnsUpstreams: [{ host: '127.0.0.1', port: 9 }] }), log });
    driver = new FakeDriver();
    vsock = { via: 'vhost-user' };
    mms = [];
    sessions.length = 0;
  });

  afterEach(async () => {
    const mm = mms.at(-1)!;
    for (const n of mm.names()) await mm.remove(n, { force: true }).catch(() => {});
    for (const m of mms) await m.close();
    network.close();
    rmSync(home, { recursive: true, force: true });
  });

  const state = (name: string) => JSON.parse(readFileSync(join(home, 'machines', name, 'state.json'), 'utf8'));

  it('is vsock through the vhost-user backend by default on a host without /dev/vhost-vsock', async () => {
    const mm = manager();
    await mm.load();
    mm.create({ name: 'a' });
    expect(mm.inspect('a').agent).toBe("not connected (vsock via tender's vhost-user backend)");
    await mm.start('a', { wait: false });
    const dir = join(home, 'machines', 'a');
    expect(driver.specs[0]!.agent).toEqual({ kind: 'vsock', via: 'vhost-user', cid: 3, port: 1024, path: join(dir, 'vsock'), hostPorts: [1024, 3240] });
    expect(sessions).toEqual([`vsock vhost-user 3 ${dir}/vsock_1024`]);
    expect(state('a').agentChannel).toBe('vsock-vhost-user');
    expect(mm.inspect('a').agent).toBe("connecting (vsock via tender's vhost-user backend)");
    expect(mm.vsockEndpoint('a')).toEqual({ via: 'vhost-user', cid: 3, path: join(dir, 'vsock') });
  });

  it("uses the host's vhost-vsock with a per-machine CID when there is one", async () => {
    vsock = { via: 'host' };
    const mm = manager();
    await mm.load();
    mm.create({ name: 'h' });
    await mm.start('h', { wait: false });
    const dir = join(home, 'machines', 'h');
    expect(driver.specs[0]!.agent).toMatchObject({ kind: 'vsock', via: 'host', cid: hostCid(dir) });
    expect(mm.inspect('h').agent).toBe("connecting (vsock via the host's vhost-vsock)");
  });

  it("asks the driver when nothing is injected: a VMM with vsock of its own (vfkit) gets per-port sockets", async () => {
    vsock = undefined;
    driver.vsock = () => ({ via: 'vmm' });
    const mm = manager();
    await mm.load();
    mm.create({ name: 'v' });
    await mm.start('v', { wait: false });
    const dir = join(home, 'machines', 'v');
    expect(driver.specs[0]!.agent).toEqual({ kind: 'vsock', via: 'vmm', cid: 3, port: 1024, path: join(dir, 'vsock'), hostPorts: [1024, 3240] });
    expect(sessions).toEqual([`vsock vmm 3 ${dir}/vsock_1024`]);
    expect(state('v').agentChannel).toBe('vsock-vmm');
    expect(mm.inspect('v').agent).toBe("connecting (vsock (the VMM's own))");
    expect(mm.vsockEndpoint('v')).toEqual({ via: 'vmm', cid: 3, path: join(dir, 'vsock') });
  });

  it('falls back to virtio-serial with a warning when no vsock path can work', async () => {
    vsock = { via: null, why: 'nothing here' };
    const mm = manager();
    await mm.load();
    mm.create({ name: 'f' });
    await mm.start('f', { wait: false });
    expect(driver.specs[0]!.agent.kind).toBe('virtio-serial');
    expect(mm.inspect('f').agent).toBe('connecting (virtio-serial; vsock unavailable (nothing here): the agent uses virtio-serial)');
    expect(state('f')).toMatchObject({ agentChannel: 'virtio-serial', agentWarning: expect.stringContaining('nothing here') });
    expect(mm.vsockEndpoint('f')).toBeNull();
  });

  it('is virtio-serial when asked, and `set agent=` changes the next start', async () => {
    const mm = manager();
    await mm.load();
    mm.create({ name: 's', agent: 'serial' });
    expect(mm.inspect('s').agent).toBe('not connected (virtio-serial)');
    await mm.start('s', { wait: false });
    expect(driver.specs[0]!.agent).toEqual({ kind: 'virtio-serial', path: join(home, 'machines', 's', 'agent.sock') });
    await mm.stop('s', { force: true });
    mm.set('s', ['agent=default']);
    expect(mm.config('s').agent).toBeUndefined();
    expect(mm.inspect('s').agent).toBe("not connected (vsock via tender's vhost-user backend)");
    expect(() => mm.set('s', ['agent=usb'])).toThrow(expect.objectContaining({ code: 'BAD_ARGUMENT' }));
  });

  it('keeps the channel a running machine booted with when a new daemon adopts it', async () => {
    vsock = { via: null, why: 'not built' };
    const first = manager();
    await first.load();
    first.create({ name: 'r' });
    await first.start('r', { wait: false });
    await first.close();
    // The backend is there now, but the running guest's agent is on virtio-serial.
    vsock = { via: 'vhost-user' };
    const second = manager();
    await second.load();
    expect(driver.specs.map((s) => s.agent.kind)).toEqual(['virtio-serial', 'virtio-serial']);
    expect(second.inspect('r').agent).toMatch(/^connecting \(virtio-serial; vsock unavailable/);
  });

  it('reads the record of a daemon from before vsock was the default ("vsock")', async () => {
    const first = manager();
    await first.load();
    first.create({ name: 'o', agent: 'vsock' });
    await first.start('o', { wait: false });
    await first.close();
    const file = join(home, 'machines', 'o', 'state.json');
    const { writeFileSync } = await import('node:fs');
    writeFileSync(file, JSON.stringify({ ...state('o'), agentChannel: 'vsock' }));
    const second = manager();
    await second.load();
    expect(driver.specs[1]!.agent).toMatchObject({ kind: 'vsock', via: 'vhost-user' });
  });
});

describe('chooseVsock', () => {
  it('prefers the host, then the backend, then says why not', () => {
    expect(chooseVsock({ host: true, backend: null })).toEqual({ via: 'host' });
    expect(chooseVsock({ host: false, backend: '/bin/true' })).toEqual({ via: 'vhost-user' });
    expect(chooseVsock({ host: false, backend: null })).toMatchObject({ via: null, why: expect.stringContaining('tender-vhost-vsock') });
  });

  it('gives CIDs in 3..2^31-1, stable per directory', () => {
    for (const d of ['/a', '/b', '/home/u/.local/share/tender/machines/dev']) {
      const c = hostCid(d);
      expect(c).toBeGreaterThanOrEqual(3);
      expect(c).toBeLessThan(0x7fffffff);
      expect(hostCid(d)).toBe(c);
    }
    expect(hostCid('/a')).not.toBe(hostCid('/b'));
  });
});

describe('listenGuestVsock (hybrid vsock: unix sockets)', () => {
  it('hands each connection to <base>_<port> over, and removes the path when closed', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tender-gv-'));
    try {
      const got: string[] = [];
      const l = listenGuestVsock({ via: 'vhost-user', cid: 3, path: join(dir, 'vsock') }, 3240, (s) => {
        s.on('data', (d: Buffer) => {
          got.push(d.toString());
          s.end('pong');
        });
      });
      await new Promise((r) => setTimeout(r, 50));
      const reply = await new Promise<string>((resolve, reject) => {
        const c = net.connect(join(dir, 'vsock_3240'), () => c.write('ping'));
        let b = '';
        c.on('data', (d) => (b += d));
        c.on('end', () => resolve(b));
        c.on('error', reject);
      });
      expect([got, reply]).toEqual([['ping'], 'pong']);
      l.close();
      expect(existsSync(join(dir, 'vsock_3240'))).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
