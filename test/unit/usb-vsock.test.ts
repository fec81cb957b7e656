/**
 * USB/IP over vsock, host side (src/daemon/usb-vsock.ts): a machine on vsock gets a listener
 * at `<dir>/vsock_3240` whose connections are handed over with the machine's name, the
 * attach goes over "vsock:2", an older agent's BAD_PAYLOAD falls back to TCP, a machine not
 * on vsock uses TCP, and stopping the machine closes the listener.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AgentError } from '../../src/agent/client.js';
import { UsbVsock, type UsbTransport } from '../../src/daemon/usb-vsock.js';
import { createLogger } from '../../src/log.js';
import type { GuestVsockEndpoint } from '../../src/vmm/vsock-channel.js';

describe('USB/IP over vsock (host side)', () => {
  let dir: string;
  let endpoints: Map<string, GuestVsockEndpoint>;
  let accepted: { machine: string; sock: Duplex }[];
  let uv: UsbVsock;
  const TCP = { host: '192.168.127.1', port: 3240 };

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'tender-usbv-'));
    endpoints = new Map([['a', { via: 'vhost-user', cid: 3, path: join(dir, 'vsock') }]]);
    accepted = [];
    uv = new UsbVsock({ endpoint: (m) => endpoints.get(m) ?? null, accept: (machine, sock) => accepted.push({ machine, sock }), log: createLogger('silent') });
  });
  afterEach(() => {
    uv.closeAll();
    for (const a of accepted) a.sock.destroy();
    rmSync(dir, { recursive: true, force: true });
  });

  it('imports over vsock:2 and hands the guest connections over with the machine', async () => {
    const used: UsbTransport[] = [];
    const r = await uv.attach('a', TCP, async (t) => (used.push(t), 'attached'));
    expect([r, used]).toEqual(['attached', [{ host: 'vsock:2', port: 3240 }]]);
    // What the backend does for the guest's connect(CID 2, 3240).
    const c = net.connect(join(dir, 'vsock_3240'));
    await new Promise((res, rej) => c.once('connect', res).once('error', rej));
    for (let i = 0; i < 50 && accepted.length === 0; i++) await new Promise((res) => setTimeout(res, 10));
    expect(accepted.map((a) => a.machine)).toEqual(['a']);
    c.destroy();
    // The listener is kept for the next import; the machine stopping closes it.
    expect(uv.transportFor('a')).toEqual({ host: 'vsock:2', port: 3240 });
    uv.close('a');
    expect(existsSync(join(dir, 'vsock_3240'))).toBe(false);
  });

  it('uses TCP for a machine whose agent is not on vsock', async () => {
    const used: UsbTransport[] = [];
    await uv.attach('serial-machine', TCP, async (t) => void used.push(t));
    expect(used).toEqual([TCP]);
  });

  it('falls back to TCP once when the agent does not know vsock:CID (BAD_PAYLOAD)', async () => {
    const used: UsbTransport[] = [];
    await uv.attach('a', TCP, async (t) => {
      used.push(t);
      if (t.host.startsWith('vsock:')) throw new AgentError('AGENT_REJECTED', 'bad USB_ATTACH payload', { agentCode: 2 });
    });
    expect(used).toEqual([{ host: 'vsock:2', port: 3240 }, TCP]);
    // Other failures are the answer.
    await expect(
      uv.attach('a', TCP, async () => {
        throw new AgentError('USB_FAILED', 'no free port', { agentCode: 10 });
      }),
    ).rejects.toMatchObject({ code: 'USB_FAILED' });
  });

  it('opens a new listener when the machine came back on another endpoint', () => {
    uv.transportFor('a');
    endpoints.set('a', { via: 'vhost-user', cid: 3, path: join(dir, 'vsock2') });
    uv.transportFor('a');
    expect(existsSync(join(dir, 'vsock_3240'))).toBe(false);
    expect(existsSync(join(dir, 'vsock2_3240'))).toBe(true);
    endpoints.delete('a');
    expect(uv.transportFor('a')).toBeNull();
    expect(existsSync(join(dir, 'vsock2_3240'))).toBe(false);
  });
});
