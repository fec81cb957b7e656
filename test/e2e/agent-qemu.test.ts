/**
 * The agent in a real micro-VM (QEMU microvm under TCG, Debian kernel, busybox initramfs),
 * over a virtio-serial port: HELLO, exec, a host that disconnects and comes back (the
 * driver's "host not connected" state), and poweroff through the agent.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { type AgentGuest, bootAgentGuest } from '../helpers/agent-guest.js';
import { collect } from '../helpers/agent.js';
import { type GuestAvailability, guestAvailability } from '../helpers/guest/image.js';

const avail: GuestAvailability = await guestAvailability();

describe.skipIf(!avail.ok)('agent in a QEMU guest over virtio-serial', () => {
  let guest: AgentGuest;
  let client: AgentClient;
  let helloMs = 0;

  beforeAll(async () => {
    if (!avail.ok) return;
    guest = await bootAgentGuest(avail.image);
    client = new AgentClient(await guest.connect());
    await client.ready;
    helloMs = performance.now() - guest.t0;
  }, 180_000);
  afterAll(() => {
    client?.close();
    guest?.kill();
  });

  test('HELLO from the guest kernel', async () => {
    const start = await guest.waitForLine(/TENDER-AGENT-START/);
    const boot = await guest.waitForLine(/TENDER-BOOT/);
    expect(client.hello!.kernelRelease).toBe(avail.ok ? avail.image.kernelVersion : '');
    expect(client.hello!.bootId).toMatch(/^[0-9a-f-]{36}$/);
    // Reported in the task: wall time from spawning QEMU to HELLO, and the guest's clock.
    console.log(`boot to HELLO: ${Math.round(helloMs)} ms wall; ${boot.trim()}; ${start.trim()}`);
  });

  test('exec with output, exit status and stdin', async () => {
    const h = client.exec(['sh', '-c', 'uname -r; cat; exit 7']);
    h.stdin.end('from the host\n');
    const [out, st] = await Promise.all([collect(h.stdout), h.exit]);
    expect(out.toString()).toBe(`${client.hello!.kernelRelease}\nfrom the host\n`);
    expect(st).toEqual({ code: 7, signal: null });
  });

  test('a tty in the guest', async () => {
    const h = client.exec(['sh', '-c', 'tty; stty size'], { tty: true, rows: 12, cols: 34 });
    const [out] = await Promise.all([collect(h.stdout).then(String), h.exit]);
    expect(out).toMatch(/\/dev\/pts\/\d+\r\n12 34\r\n/);
  });

  test('the host goes away and comes back: a new HELLO, same boot', async () => {
    const bootId = client.hello!.bootId;
    client.close();
    client = new AgentClient(await guest.connect());
    const hello = await Promise.race([
      client.ready,
      new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`no HELLO after reconnecting; serial:\n${guest.serial()}`)), 20_000)),
    ]);
    expect(hello.bootId).toBe(bootId);
    expect(await client.ping()).toBeGreaterThan(0);
  });

  test('the host away long enough for the agent to see the hang-up: killed processes, a new HELLO', async () => {
    const h = client.exec(['sleep', '1000']);
    const { pid } = await h.started;
    client.close();
    await guest.waitForLine(/tender-agent: host gone .*: 1 processes killed/, 20_000).catch((e: Error) => {
      throw new Error(`${e.message}\n${guest.serial()}`);
    });
    client = new AgentClient(await guest.connect());
    await client.ready;
    const check = client.exec(['sh', '-c', `test -e /proc/${pid} && echo alive || echo gone`]);
    expect((await collect(check.stdout)).toString()).toBe('gone\n');
  });

  test('poweroff through the agent ends QEMU', async () => {
    await client.poweroff();
    expect((await guest.exited).signal).toBeNull();
  });
});
