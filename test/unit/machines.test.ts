/**
 * The machine manager's lifecycle logic with a stand-in VMM: a real child process (`sleep`)
 * plays QEMU, so starting, crashing, killing and re-adopting are real process events; the
 * QEMU driver itself is tested against real QEMU in test/e2e/machine-*.test.ts. DHCP leases
 * are announced by hand (there is no guest to ask for one).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { networkConfig } from '../../netstack/config.js';
import { Network } from '../../netstack/network.js';
import { EventBus } from '../../src/daemon/events.js';
import { MachineManager } from '../../src/daemon/machines.js';
import { paths } from '../../src/daemon/paths.js';
import { TenderError } from '../../src/errors.js';
import { createLogger } from '../../src/log.js';
import type { ExitInfo, MachineSpec, VmmDriver, VmmInstance } from '../../src/vmm/driver.js';

function instanceOf(child: ChildProcess | null, pid: number): VmmInstance {
  const exited = new Promise<ExitInfo>((resolve) => {
    if (child) {
      child.on('exit', (code, signal) => resolve({ code, signal, reason: signal ? `killed by ${signal}` : `exited with status ${code}` }));
    } else {
      const iv = setInterval(() => {
        try {
          process.kill(pid, 0);
        } catch {
          clearInterval(iv);
          resolve({ code: null, signal: null, reason: 'exited while tender was not watching' });
        }
      }, 50);
    }
  });
  return {
    pid,
    exited,
    async shutdown() {
      process.kill(pid, 'SIGTERM');
      return exited;
    },
    async kill() {
      process.kill(pid, 'SIGKILL');
      return exited;
    },
  };
}

class FakeDriver implements VmmDriver {
  readonly name = 'fake';
  started: MachineSpec[] = [];
  commandLine() {
    return { cmd: 'sleep', args: ['1000'] };
  }
  async resolveAccel() {
    return { accel: 'tcg' as const };
  }
  async start(spec: MachineSpec) {
    this.started.push(spec);
    const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
    return instanceOf(child, child.pid!);
  }
  async adopt(_spec: MachineSpec, pid: number) {
    try {
      process.kill(pid, 0);
    } catch {
      return null;
    }
    return instanceOf(null, pid);
  }
}

const log = createLogger('silent');

describe('machine manager', () => {
  let home: string;
  let network: Network;
  let driver: FakeDriver;
  let events: EventBus;
  let mm: MachineManager;
  const seen: string[] = [];

  const manager = () =>
    new MachineManager({
      paths: paths(home),
      network,
      driver,
      images: { resolve: async () => ({ kernel: '/dev/null' }) },
      events,
      log,
      bootTimeoutMs: 5000,
    });

  beforeEach(async () => {
    home = mkdtempSync(join(tmpdir(), 'tender-mm-'));
    network = new Network({ config: networkConfig({ dnsUpstreams: [{ host: '127.0.0.1', port: 9 }] }), log });
    driver = new FakeDriver();
    events = new EventBus();
    events.on('event', (e) => seen.push(`${e.type}:${'state' in e ? e.state : ''}`));
    mm = manager();
    await mm.load();
  });

  afterEach(async () => {
    for (const n of mm.names()) await mm.remove(n, { force: true }).catch(() => {});
    await mm.close();
    network.close();
    rmSync(home, { recursive: true, force: true });
  });

  const lease = (name: string, ip: string) => network.emit('lease', { event: 'bound', mac: mm.config(name).mac, ip });

  it('validates input and changes nothing on error', () => {
    expect(() => mm.create({ name: 'Bad_Name' })).toThrow(expect.objectContaining({ code: 'BAD_MACHINE_NAME' }));
    expect(() => mm.create({ name: 'k', kernel: '/nonexistent/vmlinuz' })).toThrow(expect.objectContaining({ code: 'FILE_NOT_FOUND' }));
    expect(() => mm.create({ name: 'f', forwards: ['80'] })).toThrow(expect.objectContaining({ code: 'BAD_FORWARD_SPEC' }));
    expect(mm.names()).toEqual([]);
    mm.create({ name: 'dev' });
    expect(() => mm.create({ name: 'dev' })).toThrow(expect.objectContaining({ code: 'MACHINE_EXISTS' }));
    expect(() => mm.inspect('nope')).toThrow(TenderError);
    expect(() => mm.set('dev', ['cpus=0'])).toThrow(expect.objectContaining({ code: 'BAD_ARGUMENT' }));
    expect(mm.set('dev', ['cpus=2', 'memory=1024']).cpus).toBe(2);
  });

  it('starts, learns its address, publishes its name, applies forwards, stops', async () => {
    mm.create({ name: 'dev', forwards: ['0:80'] });
    const started = mm.start('dev');
    await new Promise((r) => setTimeout(r, 50));
    lease('dev', '192.168.127.2');
    const info = await started;
    expect(info.state).toBe('running');
    expect(info.ip).toBe('192.168.127.2');
    expect(network.dns.records.list().some((r) => r.name === 'dev.tender.internal' && r.address === '192.168.127.2')).toBe(true);
    await new Promise((r) => setTimeout(r, 50));
    const fwd = mm.inspect('dev').forwards;
    expect(fwd).toHaveLength(1);
    // The host side of the forward is listening.
    await new Promise<void>((resolve, reject) => {
      const s = net.connect(fwd[0]!.hostPort, '127.0.0.1', () => {
        s.destroy();
        resolve();
      });
      s.on('error', reject);
    });
    const stopped = await mm.stop('dev');
    expect(stopped.state).toBe('stopped');
    expect(mm.inspect('dev').forwards).toHaveLength(0);
    expect(seen).toContain('machine.state:running');
  });

  it('notices a VMM killed from outside and records why', async () => {
    mm.create({ name: 'c' });
    await mm.start('c', { wait: false });
    const pid = mm.inspect('c').pid!;
    process.kill(pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 200));
    const i = mm.inspect('c');
    expect(i.state).toBe('crashed');
    expect(i.lastExit?.reason).toContain('SIGKILL');
  });

  it('re-adopts a running machine after a daemon restart, and keeps stopped ones stopped', async () => {
    mm.create({ name: 'a' });
    mm.create({ name: 'b' });
    const started = mm.start('a');
    await new Promise((r) => setTimeout(r, 50));
    lease('a', '192.168.127.3');
    await started;
    const pid = mm.inspect('a').pid;
    await mm.close();
    // A new daemon on the same state directory.
    mm = manager();
    await mm.load();
    expect(mm.inspect('a').state).toBe('running');
    expect(mm.inspect('a').pid).toBe(pid);
    expect(mm.inspect('a').ip).toBe('192.168.127.3');
    expect(mm.inspect('b').state).toBe('stopped');
    expect(driver.started).toHaveLength(1);
  });

  it('refuses to remove a running machine without force', async () => {
    mm.create({ name: 'r' });
    await mm.start('r', { wait: false });
    await expect(mm.remove('r')).rejects.toMatchObject({ code: 'MACHINE_STATE' });
    await mm.remove('r', { force: true });
    expect(mm.names()).toEqual([]);
    expect(existsSync(join(home, 'machines', 'r'))).toBe(false);
  });

  it('keeps forwards across stop and start, and removes them on request', async () => {
    mm.create({ name: 'f' });
    await mm.addForward('f', '127.0.0.1:0:22');
    expect(mm.listForwards('f')).toHaveLength(1);
    expect(() => mm.removeForward('f', '127.0.0.1:1234:22')).toThrow(expect.objectContaining({ code: 'FORWARD_NOT_FOUND' }));
    mm.removeForward('f', '127.0.0.1:0:22');
    expect(mm.listForwards('f')).toHaveLength(0);
  });
});
