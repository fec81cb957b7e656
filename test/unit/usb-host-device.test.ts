/**
 * The libusb backend over a fake libusb (the LibusbBinding seam): what it asks libusb to do for
 * each URB, open and close, and how it reports the outcomes. The real libusb against real
 * hardware is test/e2e/usb-host-device.test.ts.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { handleStandardRequest } from '../../usb/control.js';
import type { Urb, UrbResult, UsbDevice } from '../../usb/device.js';
import { storageDescriptors } from '../../usb/devices/storage.js';
import type { LibusbBinding, LibusbDevice, LibusbErr, LibusbTransfer } from '../../usb/host/libusb-binding.js';
import { openLibusbSource } from '../../usb/host/libusb-source.js';
import type { HostDeviceInfo, HostUsbDevice } from '../../usb/host/source.js';
import { Errno, URB_SHORT_NOT_OK, URB_ZERO_PACKET, UsbSpeed } from '../../usb/protocol.js';

const STALL = 4;
const CANCELLED = 3;
const NO_DEVICE = 5;
const descs = storageDescriptors({ idVendor: 0x1234, idProduct: 0x5678, product: 'Stick', serial: 'SN1' });
const tick = () => new Promise((r) => setImmediate(r));

class FakeTransfer implements LibusbTransfer {
  buf: Buffer = Buffer.alloc(0);
  pending = false;
  constructor(
    readonly lib: FakeLibusb,
    readonly dev: FakeDevice,
    readonly ep: number,
    readonly type: number,
    private readonly done: (err: LibusbErr, buf: Buffer, actual: number) => void,
  ) {}
  submit(buf: Buffer): this {
    if (this.dev.gone) throw Object.assign(new Error('LIBUSB_ERROR_NO_DEVICE'), { errno: -4 });
    this.buf = buf;
    this.pending = true;
    this.lib.submitted.push(this);
    if (this.ep === 0) this.dev.control(this);
    return this;
  }
  cancel(): boolean {
    if (!this.pending) return false;
    setImmediate(() => this.complete(CANCELLED, 0));
    return true;
  }
  /** libusb's completion: on a later turn, never inside submit. */
  complete(status: number, actual: number, data?: Uint8Array): void {
    if (!this.pending) return;
    this.pending = false;
    if (data && (this.ep !== 0 || this.buf[0]! & 0x80)) this.buf.set(data, this.ep === 0 ? 8 : 0);
    this.done(status ? { errno: status, message: `status ${status}` } : undefined, this.buf, actual);
  }
}

class FakeDevice implements LibusbDevice {
  busNumber = 1;
  deviceAddress = 5;
  portNumbers = [2];
  deviceDescriptor = { idVendor: 0x1234, idProduct: 0x5678, bDeviceClass: 0 };
  calls: string[] = [];
  drivers = new Set([0]);
  gone = false;
  openError?: number;
  claimError?: number;
  /** Class/vendor control requests: the answer, or a libusb status to fail with. */
  onControl: (setup: Buffer) => Uint8Array | number = () => STALL;
  constructor(readonly lib: FakeLibusb) {}
  control(t: FakeTransfer): void {
    const setup = t.buf.subarray(0, 8);
    const wLength = setup.readUInt16LE(6);
    let r: Uint8Array | number;
    if (setup[0] === 0x80 && setup[1] === 6) {
      const type = setup[3]!;
      const idx = setup[2]!;
      const str = descs.strings.get(idx);
      r = type === 1 ? descs.device : type === 2 ? descs.configurations[0]! : type === 3 && idx === 0 ? Uint8Array.of(4, 3, 9, 4) : type === 3 && str ? Uint8Array.from([2 + 2 * str.length, 3, ...Buffer.from(str, 'utf16le')]) : STALL;
    } else r = this.onControl(Buffer.from(setup));
    setImmediate(() => (typeof r === 'number' ? t.complete(r, 0) : t.complete(0, Math.min(r.length, wLength), r.subarray(0, wLength))));
  }
  __open(): void {
    if (this.openError) throw Object.assign(new Error('open'), { errno: this.openError });
    this.calls.push('open');
  }
  __close(): void {
    this.calls.push('close');
  }
  __getConfigDescriptor() {
    return { bConfigurationValue: 1 };
  }
  __claimInterface(i: number): void {
    if (this.claimError) throw Object.assign(new Error('claim'), { errno: this.claimError });
    this.calls.push(`claim ${i}`);
  }
  __releaseInterface(i: number, cb: (e?: LibusbErr) => void): void {
    this.calls.push(`release ${i}`);
    setImmediate(() => cb(this.gone ? { errno: -4 } : undefined));
  }
  __isKernelDriverActive(i: number): boolean {
    return this.drivers.has(i);
  }
  __detachKernelDriver(i: number): void {
    this.calls.push(`detach ${i}`);
    this.drivers.delete(i);
  }
  __attachKernelDriver(i: number): void {
    this.calls.push(`attach ${i}`);
    this.drivers.add(i);
  }
  __setConfiguration(v: number, cb: (e?: LibusbErr) => void): void {
    this.calls.push(`setConfiguration ${v}`);
    setImmediate(() => cb());
  }
  __setInterface(i: number, alt: number, cb: (e?: LibusbErr) => void): void {
    this.calls.push(`setInterface ${i} ${alt}`);
    setImmediate(() => cb());
  }
  __clearHalt(ep: number, cb: (e?: LibusbErr) => void): void {
    this.calls.push(`clearHalt ${ep.toString(16)}`);
    setImmediate(() => cb());
  }
}

class FakeLibusb implements LibusbBinding {
  devices: LibusbDevice[] = [];
  submitted: FakeTransfer[] = [];
  listeners?: { attach: (d: LibusbDevice) => void; detach: (d: LibusbDevice) => void };
  getDeviceList() {
    return this.devices;
  }
  transfer(dev: LibusbDevice, ep: number, type: number, done: (err: LibusbErr, buf: Buffer, actual: number) => void) {
    return new FakeTransfer(this, dev as FakeDevice, ep, type, done);
  }
  hotplug(attach: (d: LibusbDevice) => void, detach: (d: LibusbDevice) => void) {
    this.listeners = { attach, detach };
    return () => (this.listeners = undefined);
  }
  /** Transfers submitted on a data endpoint (not the descriptor reads on endpoint 0). */
  on(ep: number): FakeTransfer[] {
    return this.submitted.filter((t) => t.ep === ep);
  }
}

const sysfs = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-usb-host-'));
fs.mkdirSync(path.join(sysfs, '1-2'));
fs.writeFileSync(path.join(sysfs, '1-2', 'speed'), '480\n');
afterAll(() => fs.rmSync(sysfs, { recursive: true, force: true }));

const logs: string[] = [];
const log = { debug: (_o: object, m: string) => void logs.push(m), warn: (_o: object, m: string) => void logs.push(`warn: ${m}`) };

async function setup(o: { tweak?: (d: FakeDevice) => void } = {}) {
  const lib = new FakeLibusb();
  const dev = new FakeDevice(lib);
  o.tweak?.(dev);
  const hub = Object.assign(new FakeDevice(lib), { deviceDescriptor: { idVendor: 0x1d6b, idProduct: 2, bDeviceClass: 9 }, portNumbers: [] as number[], deviceAddress: 1 });
  lib.devices = [hub, dev];
  const source = openLibusbSource({ binding: lib, sysfsRoot: sysfs, log });
  return { lib, dev, source };
}

async function opened(o: { tweak?: (d: FakeDevice) => void } = {}) {
  const s = await setup(o);
  const host = await s.source.open('1-2');
  s.lib.submitted = [];
  return { ...s, host };
}

const bulkIn = (length: number, flags = 0): Urb => ({ endpoint: 0x81, type: 'bulk', data: new Uint8Array(0), length, transferFlags: flags });
const bulkOut = (data: Uint8Array, flags = 0): Urb => ({ endpoint: 0x02, type: 'bulk', data, length: data.length, transferFlags: flags });
const signal = () => new AbortController().signal;

describe('listing and opening', () => {
  it('lists devices by busid with sysfs speed, never hubs', async () => {
    const { source } = await setup();
    expect(source.list()).toEqual<HostDeviceInfo[]>([
      { busid: '1-2', busnum: 1, devnum: 5, vendorId: 0x1234, productId: 0x5678, speed: UsbSpeed.High, manufacturer: null, product: null, serial: null, path: fs.realpathSync(path.join(sysfs, '1-2')) },
    ]);
  });

  it('opens: reads the descriptors, detaches the kernel driver, claims; close gives it back in that order', async () => {
    const { dev, host, source } = await opened();
    expect(dev.calls).toEqual(['open', 'detach 0', 'claim 0']);
    expect(host.descriptors.device).toEqual(descs.device);
    expect(host.descriptors.configurations).toEqual(descs.configurations);
    expect(host.info).toMatchObject({ busid: '1-2', speed: UsbSpeed.High, product: 'Stick', serial: 'SN1', manufacturer: 'tender' });
    expect([host.busid, host.busnum, host.devnum, host.speed]).toEqual(['1-2', 1, 5, UsbSpeed.High]);
    await expect(source.open('1-2')).rejects.toMatchObject({ code: 'USB_DEVICE_BUSY' }); // one owner at a time
    await host.close();
    // Released before the driver comes back (libusb refuses to reattach a claimed interface).
    expect(dev.calls).toEqual(['open', 'detach 0', 'claim 0', 'release 0', 'attach 0', 'close']);
    expect(dev.drivers.has(0)).toBe(true);
    const again = await source.open('1-2'); // closed: can be opened again
    await again.close();
  });

  it('reports open failures with stable codes and undoes a half-done claim', async () => {
    const { source } = await setup({ tweak: (d) => (d.openError = -3) });
    await expect(source.open('1-2')).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
    const b = await setup({ tweak: (d) => (d.claimError = -6) });
    await expect(b.source.open('1-2')).rejects.toMatchObject({ code: 'USB_DEVICE_BUSY' });
    expect(b.dev.calls).toEqual(['open', 'detach 0', 'attach 0', 'close']);
    await expect(b.source.open('1-9')).rejects.toMatchObject({ code: 'USB_DEVICE_NOT_FOUND' });
    await expect(b.source.open('../../etc')).rejects.toMatchObject({ code: 'USB_DEVICE_NOT_FOUND' });
  });
});

describe('URBs', () => {
  it('keeps several in flight on one endpoint; an unlink cancels exactly its own', async () => {
    const { lib, host } = await opened();
    const a = [new AbortController(), new AbortController(), new AbortController()];
    const p = a.map((c) => host.submit(bulkIn(512), c.signal));
    await tick();
    const ts = lib.on(0x81);
    expect(ts.map((t) => t.pending)).toEqual([true, true, true]);
    a[1]!.abort();
    await tick();
    expect(ts.map((t) => t.pending)).toEqual([true, false, true]);
    expect(await p[1]).toMatchObject({ status: Errno.ECONNRESET });
    ts[0]!.complete(0, 3, Uint8Array.of(1, 2, 3));
    ts[2]!.complete(0, 1, Uint8Array.of(9));
    const [r0, r2] = await Promise.all([p[0], p[2]]);
    expect(r0).toEqual({ status: 0, data: Uint8Array.of(1, 2, 3) });
    expect(r2).toEqual({ status: 0, data: Uint8Array.of(9) });
  });

  it('sends control requests with their raw setup and returns the data stage', async () => {
    const { lib, host, dev } = await opened();
    dev.onControl = (s) => (s[0] === 0xa1 && s[1] === 0xfe ? Uint8Array.of(0) : STALL);
    const setup = Uint8Array.of(0xa1, 0xfe, 0, 0, 0, 0, 1, 0);
    const r = await host.submit({ endpoint: 0x80, type: 'control', setup, data: new Uint8Array(0), length: 1, transferFlags: 0 }, signal());
    expect(r).toEqual({ status: 0, data: Uint8Array.of(0) });
    expect(lib.on(0)[0]!.buf.subarray(0, 8)).toEqual(Buffer.from(setup));
    const out = Uint8Array.of(0x21, 0x20, 0, 0, 0, 0, 3, 0);
    dev.onControl = (s) => (s[1] === 0x20 ? new Uint8Array(3) : STALL);
    expect(await host.submit({ endpoint: 0, type: 'control', setup: out, data: Uint8Array.of(7, 8, 9), length: 3, transferFlags: 0 }, signal())).toEqual({ status: 0, actualLength: 3 });
    expect([...lib.on(0)[1]!.buf]).toEqual([...out, 7, 8, 9]);
    const stalled = await host.submit({ endpoint: 0x80, type: 'control', setup: Uint8Array.of(0xc0, 0x55, 0, 0, 0, 0, 4, 0), data: new Uint8Array(0), length: 4, transferFlags: 0 }, signal());
    expect(stalled.status).toBe(Errno.EPIPE);
    expect(host.isHalted(0)).toBe(false); // a protocol stall halts nothing
  });

  it('a stalled bulk endpoint is halted until CLEAR_FEATURE(ENDPOINT_HALT)', async () => {
    const { lib, dev, host } = await opened();
    const p = host.submit(bulkIn(512), signal());
    await tick();
    lib.on(0x81)[0]!.complete(STALL, 0);
    expect((await p).status).toBe(Errno.EPIPE);
    expect(host.isHalted(0x81)).toBe(true);
    await host.clearHalt(0x81);
    expect(dev.calls.at(-1)).toBe('clearHalt 81');
    expect(host.isHalted(0x81)).toBe(false);
  });

  it('emulates URB_ZERO_PACKET with a zero-length transfer queued right behind', async () => {
    const { lib, host } = await opened();
    const p = host.submit(bulkOut(new Uint8Array(1024), URB_ZERO_PACKET), signal());
    await tick();
    const ts = lib.on(0x02);
    expect(ts.map((t) => t.buf.length)).toEqual([1024, 0]);
    ts[0]!.complete(0, 1024);
    ts[1]!.complete(0, 0);
    expect(await p).toEqual({ status: 0, actualLength: 1024 });
    // The data stalls: the zero-length packet is cancelled, not sent after the halt is cleared.
    const q = host.submit(bulkOut(new Uint8Array(512), URB_ZERO_PACKET), signal());
    await tick();
    const [d, z] = lib.on(0x02).slice(2);
    d!.complete(STALL, 0);
    expect(await q).toEqual({ status: Errno.EPIPE, actualLength: 0 });
    expect(z!.pending).toBe(false);
    lib.submitted = [];
    // Not a multiple of the max packet size (512): the short packet ends it, no ZLP.
    void host.submit(bulkOut(new Uint8Array(100), URB_ZERO_PACKET), signal());
    await tick();
    expect(lib.on(0x02).map((t) => t.buf.length)).toEqual([100]);
  });

  it('a short IN with URB_SHORT_NOT_OK completes with -EREMOTEIO', async () => {
    const { lib, host } = await opened();
    const p = host.submit(bulkIn(512, URB_SHORT_NOT_OK), signal());
    await tick();
    lib.on(0x81)[0]!.complete(0, 13, new Uint8Array(13));
    expect(await p).toMatchObject({ status: Errno.EREMOTEIO });
  });

  it('refuses isochronous URBs clearly (-ENXIO, every packet), never touching libusb', async () => {
    const { lib, host } = await opened();
    const iso = [
      { offset: 0, length: 192, actualLength: 0, status: 0 },
      { offset: 192, length: 192, actualLength: 0, status: 0 },
    ];
    const r: UrbResult = await host.submit({ endpoint: 0x83, type: 'isochronous', data: new Uint8Array(0), length: 384, transferFlags: 0, iso }, signal());
    expect(r.status).toBe(-6);
    expect(r.iso).toEqual(iso.map((p) => ({ ...p, status: -6 })));
    expect(lib.submitted).toEqual([]);
    expect(logs.filter((l) => /isochronous/.test(l))).toHaveLength(1);
  });

  it('unplugged mid-transfer: in flight -ESHUTDOWN, then -ENODEV, one remove event, close does not throw', async () => {
    const { lib, dev, host, source } = await opened();
    const removed: string[] = [];
    source.on('remove', (d) => removed.push(d.busid));
    const p = host.submit(bulkIn(512), signal());
    await tick();
    dev.gone = true;
    lib.on(0x81)[0]!.complete(NO_DEVICE, 0);
    expect((await p).status).toBe(Errno.ESHUTDOWN);
    expect(await host.submit(bulkIn(512), signal())).toMatchObject({ status: Errno.ENODEV });
    expect(lib.on(0x81)).toHaveLength(1); // the second never reached libusb
    lib.listeners!.detach(dev); // libusb's own hotplug event, later
    expect(removed).toEqual(['1-2']);
    await host.close();
    expect(dev.calls.at(-1)).toBe('close');
  });

  it('close cancels what is in flight and waits for it before closing the handle', async () => {
    const { lib, dev, host } = await opened();
    const p = host.submit(bulkIn(512), signal());
    await tick();
    await host.close();
    expect((await p).status).toBe(Errno.ECONNRESET);
    expect(lib.on(0x81)[0]!.pending).toBe(false);
    expect(dev.calls.slice(-3)).toEqual(['release 0', 'attach 0', 'close']);
    expect(await host.submit(bulkIn(512), signal())).toMatchObject({ status: Errno.ESHUTDOWN });
  });

  it('SET_CONFIGURATION to the active one changes nothing; SET_INTERFACE goes to libusb', async () => {
    const { dev, host } = await opened();
    await host.setConfiguration(1);
    await host.setInterface(0, 0);
    expect(dev.calls.slice(3)).toEqual(['setInterface 0 0']);
    await host.setConfiguration(0);
    expect(dev.calls.slice(4)).toEqual(['release 0', 'setConfiguration -1']);
    await host.setConfiguration(1);
    expect(dev.calls.slice(6)).toEqual(['setConfiguration 1', 'claim 0']);
  });
});

describe('hotplug', () => {
  it('reports plugged and unplugged devices (hubs never), only while someone listens', async () => {
    const { lib, dev, source } = await setup();
    const seen: string[] = [];
    const onAdd = (d: HostDeviceInfo) => seen.push(`add ${d.busid}`);
    source.on('add', onAdd).on('remove', (d) => seen.push(`remove ${d.busid} ${d.vendorId.toString(16)}`));
    const other = Object.assign(new FakeDevice(lib), { portNumbers: [3, 1], deviceAddress: 7 });
    lib.listeners!.attach(other);
    lib.listeners!.attach(lib.devices[0]!); // a hub
    lib.listeners!.detach(dev);
    lib.listeners!.detach(dev); // twice: once reported
    expect(seen).toEqual(['add 1-3.1', 'remove 1-2 1234']);
    source.close();
    expect(lib.listeners).toBeUndefined();
  });

  it('stops delivery when the last listener goes', async () => {
    const { lib, source } = await setup();
    const fn = () => {};
    source.on('add', fn);
    expect(lib.listeners).toBeDefined();
    source.off('add', fn);
    expect(lib.listeners).toBeUndefined();
  });
});

describe('BOS', () => {
  it('a device read with a BOS set answers GET_DESCRIPTOR(BOS) from it (SuperSpeed hosts ask)', async () => {
    const bos = Uint8Array.of(5, 15, 12, 0, 1, 7, 16, 2, 2, 0, 0, 0);
    const dev = { descriptors: { ...descs, bos } } as unknown as UsbDevice;
    const r = await handleStandardRequest(dev, Uint8Array.of(0x80, 6, 0, 15, 0, 0, 5, 0), { configuration: 1 });
    expect(r).toEqual({ status: 0, data: bos.subarray(0, 5) });
    const none = await handleStandardRequest({ descriptors: descs } as unknown as UsbDevice, Uint8Array.of(0x80, 6, 0, 15, 0, 0, 5, 0), { configuration: 1 });
    expect(none?.status).toBe(Errno.EPIPE);
  });
});

// The backend is a UsbDevice the server drives; this only checks the type is one.
export type _Check = HostUsbDevice extends UsbDevice ? true : never;
