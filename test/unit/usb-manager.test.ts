/**
 * The daemon's USB manager with host devices, auto-attach rules and sharing, without USB
 * hardware or a guest: a fake HostDeviceSource (test/helpers/fake-host-usb.ts) whose "host
 * devices" are the virtual mass-storage device under host busids, and stand-in machines whose
 * "agent" imports a device the way the guest agent does (OP_REQ_IMPORT over a real TCP
 * connection into the manager's USB/IP server, held open as vhci-hcd holds it). The real libusb
 * source is exercised by test/e2e/usb-host-device.test.ts in a QEMU guest with emulated USB
 * devices (this host has none); a real guest's vhci-hcd by test/e2e/usb-policy.test.ts.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { networkConfig } from '../../netstack/config.js';
import { Network } from '../../netstack/network.js';
import { createApi } from '../../src/api/server.js';
import { registerUsbRoutes } from '../../src/api/usb-routes.js';
import { EventBus, type TenderEvent } from '../../src/daemon/events.js';
import type { AgentSession, MachineInfo } from '../../src/daemon/machines.js';
import { paths } from '../../src/daemon/paths.js';
import { UsbManager, type UsbMachines } from '../../src/daemon/usb.js';
import { migrateUsbState } from '../../src/daemon/usb-state.js';
import { TenderError } from '../../src/errors.js';
import { createLogger } from '../../src/log.js';
import { MemoryBackend } from '../../usb/devices/scsi.js';
import { DEVICE_RECORD_LEN, OP_COMMON_LEN, emitReqDevlist, emitReqImport, parseOpCommon, parseRepDevlistBody } from '../../usb/protocol.js';
import { FakeHostSource } from '../helpers/fake-host-usb.js';

const log = createLogger('silent');

/** Stand-in machines; each "agent" imports over TCP into the manager's server, like vhci-hcd. */
class Machines implements UsbMachines {
  readonly states = new Map<string, string>();
  /** vhci port → the connection holding the import */
  readonly imports = new Map<number, { machine: string; busid: string; sock: net.Socket }>();
  private nextPort = 0;
  usbPort = 0;

  inspect(name: string): MachineInfo {
    const state = this.states.get(name);
    if (state === undefined) throw new TenderError('MACHINE_NOT_FOUND', `no machine named "${name}"`);
    return { name, state, ip: null } as MachineInfo;
  }
  list(): MachineInfo[] {
    return [...this.states.keys()].map((n) => this.inspect(n));
  }
  vsockEndpoint(): null {
    return null; // the stand-in agents import over TCP
  }
  /** Machines whose agent has not said hello yet. */
  readonly noAgent = new Set<string>();
  async agentOf(name: string): Promise<AgentSession> {
    const s = this.inspect(name).state;
    if ((s !== 'running' && s !== 'starting') || this.noAgent.has(name)) throw new TenderError('AGENT_UNAVAILABLE', `${name} is not running`);
    return {
      usbAttach: async (o: { busid: string }) => {
        const sock = net.connect(this.usbPort, '127.0.0.1');
        await new Promise((r) => sock.once('connect', r));
        sock.on('error', () => {});
        sock.write(emitReqImport(o.busid));
        const rep = await readN(sock, OP_COMMON_LEN);
        const st = parseOpCommon(rep).status;
        if (st !== 0) {
          sock.destroy();
          throw new Error(`import refused: status ${st}`);
        }
        await readN(sock, DEVICE_RECORD_LEN);
        const port = this.nextPort++;
        this.imports.set(port, { machine: name, busid: o.busid, sock });
        sock.once('close', () => this.imports.delete(port));
        return { port };
      },
      usbDetach: async (port: number) => {
        this.imports.get(port)?.sock.destroy();
      },
    } as unknown as AgentSession;
  }
  importsOf(machine: string): string[] {
    return [...this.imports.values()].filter((i) => i.machine === machine).map((i) => i.busid);
  }
}

/** Read exactly n bytes (the rest stays in the socket). */
function readN(sock: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const onData = (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      if (buf.length >= n) {
        sock.off('data', onData);
        sock.off('close', onClose);
        sock.pause();
        if (buf.length > n) sock.unshift(buf.subarray(n));
        resolve(buf.subarray(0, n));
      }
    };
    const onClose = () => reject(new Error(`closed after ${buf.length} of ${n} bytes`));
    sock.on('data', onData);
    sock.once('close', onClose);
    sock.resume();
  });
}

/** OP_REQ_DEVLIST against a USB/IP server: the busids it offers. */
async function devlist(port: number): Promise<string[]> {
  const sock = net.connect(port, '127.0.0.1');
  const chunks: Buffer[] = [];
  sock.on('data', (c) => chunks.push(c));
  await new Promise((r) => sock.once('connect', r));
  sock.write(emitReqDevlist());
  await new Promise((r) => sock.once('close', r));
  const all = Buffer.concat(chunks);
  return (parseRepDevlistBody(all.subarray(OP_COMMON_LEN)) ?? []).map((e) => e.device.busid);
}

const until = async (cond: () => boolean, what: string) => {
  for (let i = 0; i < 400 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
};

const code = async (p: Promise<unknown>) => {
  try {
    await p;
  } catch (e) {
    return (e as TenderError).code;
  }
  return 'resolved';
};

const disk = () => new MemoryBackend(new Uint8Array(2048 * 512));
const STICK = { busid: '1-2', vendorId: 0x0781, productId: 0x5567, product: 'Cruzer' };

describe('USB manager: host devices, rules, sharing', () => {
  let home: string;
  let network: Network;
  let machines: Machines;
  let events: TenderEvent[];
  let bus: EventBus;
  let src: FakeHostSource;
  let usb: UsbManager;
  let gateway: net.Server;

  async function open(o: { source?: FakeHostSource | null; serve?: string } = {}): Promise<UsbManager> {
    const m = new UsbManager({ paths: paths(home), network, machines, events: bus, log, hostSource: o.source === undefined ? src : o.source, serve: o.serve ?? null });
    await m.load();
    return m;
  }

  beforeEach(async () => {
    home = mkdtempSync(join(tmpdir(), 'tender-usbm-'));
    network = new Network({ config: networkConfig({}), log });
    machines = new Machines();
    machines.states.set('a', 'running');
    machines.states.set('b', 'running');
    events = [];
    bus = new EventBus();
    bus.on('event', (e) => events.push(e));
    src = new FakeHostSource();
    usb = await open();
    // The stand-in agents reach the manager's server here (the gateway in a real daemon).
    gateway = net.createServer((s) => {
      s.on('error', () => {});
      void usb.server.accept(s);
    });
    await new Promise<void>((r) => gateway.listen(0, '127.0.0.1', r));
    machines.usbPort = (gateway.address() as net.AddressInfo).port;
  });

  afterEach(async () => {
    for (const i of machines.imports.values()) i.sock.destroy();
    await new Promise((r) => gateway.close(r));
    await usb.close();
    network.close();
    rmSync(home, { recursive: true, force: true });
  });

  it('lists host devices next to virtual ones; a host device is open only while attached', async () => {
    src.plug({ ...STICK, backend: disk() });
    const img = join(home, 'v.img');
    writeFileSync(img, Buffer.alloc(512 * 16));
    await usb.addStorage({ image: img, readOnly: false, name: 'stick' });
    expect(usb.list()).toMatchObject([
      { id: '1-2', busid: '1-2', kind: 'host', vidpid: '0781:5567', product: 'Fake Cruzer', state: 'available', machine: null, shared: false },
      { id: 'v1', busid: '99-1', kind: 'storage', vidpid: '0525:a4a5', name: 'stick', state: 'available' },
    ]);
    expect(src.openNow.size).toBe(0);

    const d = await usb.attach('a', '0781:5567');
    expect(d).toMatchObject({ id: '1-2', state: 'attached', machine: 'a', port: 0, transport: 'tcp', policy: null });
    expect(src.openNow.has('1-2')).toBe(true);
    expect(machines.importsOf('a')).toEqual(['1-2']);
    expect(events).toMatchObject([{ type: 'usb.attached', machine: 'a', device: '1-2' }]);

    await usb.detach('a', '1-2');
    await until(() => machines.imports.size === 0, 'the import to end');
    expect(src.openNow.size).toBe(0);
    expect(usb.list()[0]).toMatchObject({ state: 'available', machine: null, port: null, transport: null });
    expect(events.at(-1)).toMatchObject({ type: 'usb.detached', machine: 'a', device: '1-2' });
  });

  it('one machine per device; bad DEVICE arguments have codes', async () => {
    src.plug({ ...STICK, backend: disk() });
    src.plug({ ...STICK, busid: '1-3', backend: disk() });
    expect(await code(usb.attach('a', '0781:5567'))).toBe('BAD_ARGUMENT'); // two of them: ambiguous
    await usb.attach('a', '1-2');
    expect(await code(usb.attach('b', '1-2'))).toBe('USB_DEVICE_BUSY');
    expect(await code(usb.attach('a', '9-9'))).toBe('USB_DEVICE_NOT_FOUND');
    expect(await code(usb.attach('nosuch', '1-3'))).toBe('MACHINE_NOT_FOUND');
    expect(await code(usb.detach('b', '1-2'))).toBe('USB_DEVICE_NOT_FOUND');
    expect(await code(usb.addPolicy('a', 'not-a-match'))).toBe('BAD_ARGUMENT');
    expect(() => usb.removePolicy('p9')).toThrow(expect.objectContaining({ code: 'USB_POLICY_NOT_FOUND' }));
    // Attaching the same device to the same machine again is harmless.
    await usb.attach('a', '1-2');
    expect(machines.importsOf('a')).toEqual(['1-2']);
  });

  it('opening a host device can fail: the error keeps its code and nothing is recorded', async () => {
    src.plug({ ...STICK, backend: disk() });
    await new Promise((r) => setTimeout(r, 20)); // the manager has seen the plug
    src.failNextOpen = Object.assign(new Error('LIBUSB_ERROR_ACCESS'), { name: 'HostUsbError', code: 'PERMISSION_DENIED' });
    expect(await code(usb.attach('a', '1-2'))).toBe('PERMISSION_DENIED');
    expect(usb.list()[0]).toMatchObject({ state: 'available' });
    src.failNextOpen = new Error('LIBUSB_ERROR_BUSY');
    expect(await code(usb.bind('1-2'))).toBe('USB_OPEN_FAILED');
    expect(usb.list()[0]).toMatchObject({ state: 'available', shared: false });
    expect(existsSync(join(home, 'usb.json'))).toBe(false); // nothing was ever saved
  });

  it('--auto: unplug ends the attachment (usb.unplugged), the rule re-attaches the device when it comes back', async () => {
    src.plug({ ...STICK, backend: disk() });
    const d = await usb.attach('a', '0781:5567', { auto: true });
    expect(d).toMatchObject({ state: 'attached', policy: 'p1' });
    expect(usb.listPolicies()).toMatchObject([{ id: 'p1', machine: 'a', kind: 'vidpid', match: '0781:5567', devices: ['1-2'] }]);

    src.unplug('1-2');
    expect(events.at(-1)).toMatchObject({ type: 'usb.unplugged', machine: 'a', device: '1-2' });
    await until(() => src.openNow.size === 0 && machines.imports.size === 0, 'the device to be closed');
    expect(usb.list()).toEqual([]);
    expect(usb.listPolicies()).toMatchObject([{ id: 'p1', devices: [] }]);

    // Re-enumerated (a reset, a firmware flash): same VID:PID, a new devnum, another port even.
    src.plug({ ...STICK, busid: '1-4', backend: disk() });
    await until(() => machines.importsOf('a').includes('1-4'), 'the re-attach');
    expect(usb.list()[0]).toMatchObject({ busid: '1-4', state: 'attached', machine: 'a', policy: 'p1' });
    expect(src.openNow.has('1-4')).toBe(true);
    expect(events.at(-1)).toMatchObject({ type: 'usb.attached', machine: 'a', device: '1-4' });

    // A new devnum at the same busid without a 'remove' first (a missed event): the old
    // handle is closed and the new device attached.
    const opens = src.opens;
    src.plug({ ...STICK, busid: '1-4', backend: disk() });
    await until(() => src.opens === opens + 1 && machines.importsOf('a').includes('1-4'), 'the second re-attach');
    expect(events.filter((e) => e.type === 'usb.unplugged').length).toBe(2);
  });

  it('a busid rule; rules wait for a stopped machine and apply when it starts', async () => {
    const p = await usb.addPolicy('b', '2-1');
    expect(p).toMatchObject({ id: 'p1', kind: 'busid', match: '2-1', devices: [] });
    expect(await code(usb.addPolicy('a', '2-1'))).toBe('USB_POLICY_EXISTS');
    expect((await usb.addPolicy('b', '2-1')).id).toBe('p1'); // the same rule again: the same id

    machines.states.set('b', 'stopped');
    usb.machineStopped('b');
    src.plug({ busid: '2-1', vendorId: 0x1111, productId: 0x2222, backend: disk() });
    await new Promise((r) => setTimeout(r, 50));
    expect(usb.list()[0]).toMatchObject({ state: 'available', policy: 'p1' });
    expect(src.openNow.size).toBe(0);

    machines.states.set('b', 'running');
    await usb.restore('b'); // what the daemon calls when the machine's agent says hello
    expect(machines.importsOf('b')).toEqual(['2-1']);
    expect(usb.list()[0]).toMatchObject({ state: 'attached', machine: 'b' });

    // Stopping gives the device back to the host; the attachment stays for the next start.
    machines.states.set('b', 'stopped');
    usb.machineStopped('b');
    await until(() => src.openNow.size === 0, 'the device to be closed');
    expect(usb.list()[0]).toMatchObject({ state: 'attached', machine: 'b', port: null });

    // Removing the rule keeps what it attached.
    usb.removePolicy('p1');
    expect(usb.listPolicies()).toEqual([]);
    expect(usb.list()[0]).toMatchObject({ state: 'attached', policy: null });
  });

  it('attaching to a starting machine whose agent is not up yet: recorded now, imported at its hello', async () => {
    src.plug({ ...STICK, backend: disk() });
    machines.states.set('a', 'stopped');
    usb.machineStopped('a');
    machines.states.set('a', 'starting');
    machines.noAgent.add('a');
    expect(await usb.attach('a', '1-2')).toMatchObject({ state: 'attached', machine: 'a', port: null });
    expect(src.openNow.size).toBe(0); // opened when the machine can use it
    machines.noAgent.delete('a');
    await usb.restore('a');
    expect(machines.importsOf('a')).toEqual(['1-2']);
    expect(src.openNow.has('1-2')).toBe(true);
  });

  it('a rule added while its device is plugged in attaches it now when the machine runs', async () => {
    src.plug({ ...STICK, backend: disk() });
    await usb.addPolicy('a', '0781:5567');
    expect(machines.importsOf('a')).toEqual(['1-2']);
  });

  it('bind shares a device with serve clients only, opened while bound; the daemon serves them on usb.serve', async () => {
    await usb.close();
    usb = await open({ serve: '127.0.0.1:0' });
    const serving = usb.serving();
    expect(serving).toMatchObject({ listen: '127.0.0.1:0', address: '127.0.0.1', error: null });
    src.plug({ ...STICK, backend: disk() });
    src.plug({ busid: '1-3', vendorId: 0x1111, productId: 0x2222, backend: disk() });
    const img = join(home, 'v.img');
    writeFileSync(img, Buffer.alloc(512 * 16));
    await usb.addStorage({ image: img, readOnly: true });

    expect(await devlist(serving.port!)).toEqual([]);
    expect(await usb.bind('1-2')).toMatchObject({ state: 'shared', shared: true });
    expect((await usb.bind('v1')).state).toBe('shared');
    expect(src.openNow.has('1-2')).toBe(true);
    expect(src.openNow.has('1-3')).toBe(false);
    expect((await devlist(serving.port!)).sort()).toEqual(['1-2', '99-1']);

    // A shared device attached to a machine: attached wins in the state.
    await usb.attach('a', '1-2');
    expect(usb.list().find((d) => d.busid === '1-2')).toMatchObject({ state: 'attached', shared: true });
    await usb.detach('a', '1-2');
    expect(src.openNow.has('1-2')).toBe(true); // still shared

    expect(await usb.unbind('1-2')).toBe('1-2');
    await until(() => !src.openNow.has('1-2'), 'the device to be closed');
    expect(await devlist(serving.port!)).toEqual(['99-1']);
    expect(await code(usb.unbind('1-2'))).toBe('USB_DEVICE_NOT_FOUND');
  });

  it('persists atomically; restores rules, bindings and attachments on restart; keeps those naming unplugged devices', async () => {
    src.plug({ ...STICK, backend: disk() });
    src.plug({ busid: '1-3', vendorId: 0x1111, productId: 0x2222, backend: disk() });
    await usb.attach('a', '1-2', { auto: true });
    await usb.bind('1-3');
    await usb.addPolicy('b', '3-1');
    const saved = JSON.parse(readFileSync(join(home, 'usb.json'), 'utf8'));
    expect(saved).toMatchObject({
      version: 2,
      attachments: [{ device: '1-2', machine: 'a', vidpid: '0781:5567' }],
      bindings: [{ device: '1-3', vidpid: '1111:2222' }],
      policies: [{ id: 'p1', kind: 'busid', match: '1-2', machine: 'a' }, { id: 'p2', kind: 'busid', match: '3-1', machine: 'b' }],
    });
    await usb.close();
    for (const i of machines.imports.values()) i.sock.destroy();
    await until(() => machines.imports.size === 0, 'the old imports to end');
    expect(src.closed).toBe(true);
    expect(src.openNow.size).toBe(0); // every driver given back

    // Restart while 1-3 is unplugged: its binding stays; the attachment of 1-2 is restored.
    const src2 = new FakeHostSource();
    src2.plug({ ...STICK, backend: disk() }, { silent: true });
    src = src2;
    usb = await open();
    expect(usb.list()).toMatchObject([{ busid: '1-2', state: 'attached', machine: 'a', port: null }]);
    await usb.restore('a');
    expect(machines.importsOf('a')).toEqual(['1-2']);
    expect(usb.listPolicies().map((p) => p.id)).toEqual(['p1', 'p2']);
    src2.plug({ busid: '1-3', vendorId: 0x1111, productId: 0x2222, backend: disk() });
    await until(() => src2.openNow.has('1-3'), 'the shared device to be opened');
    expect(usb.list().find((d) => d.busid === '1-3')).toMatchObject({ state: 'shared' });
    // A different device at that port is not the one that was shared.
    src2.unplug('1-3');
    src2.plug({ busid: '1-3', vendorId: 0x3333, productId: 0x4444, backend: disk() });
    await new Promise((r) => setTimeout(r, 50));
    expect(usb.list().find((d) => d.busid === '1-3')).toMatchObject({ state: 'available' });
    src2.unplug('1-3');
    // Unbinding a device that is not plugged in.
    expect(await usb.unbind('1-3')).toBe('1-3');
  });

  it('an attachment whose device was unplugged while the daemon was down ends at load', async () => {
    src.plug({ ...STICK, backend: disk() });
    await usb.attach('a', '1-2');
    await usb.close();
    src = new FakeHostSource();
    usb = await open();
    expect(usb.list()).toEqual([]);
    expect(JSON.parse(readFileSync(join(home, 'usb.json'), 'utf8')).attachments).toEqual([]);
  });

  it('without a host source: virtual devices only', async () => {
    await usb.close();
    usb = await open({ source: null });
    src.plug({ ...STICK, backend: disk() });
    expect(usb.list()).toEqual([]);
    expect(await code(usb.attach('a', '1-2'))).toBe('USB_DEVICE_NOT_FOUND');
  });

  it('migrates usb.json version 1', async () => {
    await usb.close();
    const img = join(home, 'v.img');
    writeFileSync(img, Buffer.alloc(512 * 16));
    const v1 = { version: 1, virtual: [{ id: 'v1', kind: 'storage', image: img, readOnly: false, devnum: 1, name: 'old' }], attachments: { v1: 'a', v7: 'b' } };
    writeFileSync(join(home, 'usb.json'), JSON.stringify(v1));
    usb = await open();
    expect(usb.list()).toMatchObject([{ id: 'v1', name: 'old', state: 'attached', machine: 'a' }]);
    expect(JSON.parse(readFileSync(join(home, 'usb.json'), 'utf8'))).toEqual({
      version: 2,
      virtual: v1.virtual,
      attachments: [{ device: 'v1', machine: 'a', vidpid: '0525:a4a5' }],
      bindings: [],
      policies: [],
    });
    expect(() => migrateUsbState({ version: 3 })).toThrow(/version 3/);
  });

  it('the API: schemas refuse bad input with BAD_REQUEST, the manager\'s errors keep their codes', async () => {
    src.plug({ ...STICK, backend: disk() });
    const app = await createApi({ title: 't' });
    registerUsbRoutes(app, usb);
    const req = async (method: 'GET' | 'POST' | 'DELETE', url: string, payload?: object) => {
      const r = await app.inject({ method, url, payload });
      return { status: r.statusCode, body: r.body ? JSON.parse(r.body) : undefined };
    };
    expect(await req('POST', '/v1/usb/attach', { machine: 'a' })).toMatchObject({ status: 400, body: { code: 'BAD_REQUEST' } });
    expect(await req('POST', '/v1/usb/attach', { machine: 'a', device: '1-2', auto: 'yes' })).toMatchObject({ status: 400, body: { code: 'BAD_REQUEST' } });
    expect(await req('POST', '/v1/usb/bind', { device: 'x'.repeat(65) })).toMatchObject({ status: 400, body: { code: 'BAD_REQUEST' } });
    expect(await req('POST', '/v1/usb/bind', { device: 'a b' })).toMatchObject({ status: 400, body: { code: 'BAD_REQUEST' } });
    expect(await req('POST', '/v1/usb/policies', { machine: 'a', match: '1-2', extra: 1 })).toMatchObject({ status: 400, body: { code: 'BAD_REQUEST' } });
    expect(await req('DELETE', '/v1/usb/policies/p7')).toMatchObject({ status: 404, body: { code: 'USB_POLICY_NOT_FOUND' } });

    const pol = await req('POST', '/v1/usb/policies', { machine: 'b', match: '0781:5567' });
    expect(pol).toMatchObject({ status: 201, body: { id: 'p1', match: '0781:5567', devices: ['1-2'] } });
    expect(await req('POST', '/v1/usb/attach', { machine: 'a', device: '1-2' })).toMatchObject({ status: 409, body: { code: 'USB_DEVICE_BUSY' } });
    expect(await req('POST', '/v1/usb/policies', { machine: 'a', match: '0781:5567' })).toMatchObject({ status: 409, body: { code: 'USB_POLICY_EXISTS' } });
    expect(await req('GET', '/v1/usb/policies')).toMatchObject({ status: 200, body: [{ id: 'p1' }] });
    expect(await req('POST', '/v1/usb/detach', { machine: 'b', device: '1-2' })).toMatchObject({ status: 204 });
    expect(await req('POST', '/v1/usb/bind', { device: '1-2' })).toMatchObject({ status: 200, body: { state: 'shared' } });
    expect(await req('POST', '/v1/usb/unbind', { device: '1-2' })).toMatchObject({ status: 204 });
    expect(await req('DELETE', '/v1/usb/policies/p1')).toMatchObject({ status: 204 });
    expect(await req('GET', '/v1/usb/serve')).toMatchObject({ status: 200, body: { listen: null } });
    await app.close();
  });
});
