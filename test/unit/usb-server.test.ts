/**
 * The USB/IP server's connection and attached phases over real loopback TCP, with a device
 * whose URB completions the test controls: UNLINK before/after completion, per-endpoint reply
 * order, clamped replies, hostile input closing only that client, standard control requests.
 */
import { connect, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import type { Urb, UrbResult, UsbDevice } from '../../usb/device.js';
import { MemoryBackend } from '../../usb/devices/scsi.js';
import { StorageDevice, storageDescriptors } from '../../usb/devices/storage.js';
import {
  Errno,
  OP_COMMON_LEN,
  DEVICE_RECORD_LEN,
  ST_DEV_BUSY,
  ST_NODEV,
  URB_HEADER_LEN,
  USBIP_RET_SUBMIT,
  USBIP_RET_UNLINK,
  UrbHeader,
  UsbSpeed,
  emitCmdSubmit,
  emitCmdUnlink,
  emitReqDevlist,
  emitReqImport,
  parseOpCommon,
  parseRepDevlistBody,
} from '../../usb/protocol.js';
import { ByteQueue } from '../../usb/reader.js';
import { UsbIpServer } from '../../usb/server.js';

const DEVID = (99 << 16) | 1;

/** A device whose bulk URBs complete when the test says so. */
class ManualDevice implements UsbDevice {
  readonly busid = '99-1';
  readonly busnum = 99;
  readonly devnum = 1;
  readonly speed = UsbSpeed.High;
  readonly path = '/sys/devices/virtual/tender/usb99/99-1';
  readonly descriptors = storageDescriptors({ idVendor: 0x1234, idProduct: 0x5678, product: 'manual', serial: 'S1' });
  pending: { urb: Urb; resolve: (r: UrbResult) => void; aborted: boolean }[] = [];
  halted = new Set<number>();
  config = -1;
  submit(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    return new Promise((resolve) => {
      const p = { urb, resolve, aborted: false };
      signal.addEventListener('abort', () => (p.aborted = true));
      this.pending.push(p);
    });
  }
  setConfiguration(v: number) {
    this.config = v;
  }
  setInterface() {}
  clearHalt(ep: number) {
    this.halted.delete(ep);
  }
  isHalted(ep: number) {
    return this.halted.has(ep);
  }
}

class Client {
  readonly q = new ByteQueue();
  ended = false;
  private waiters: (() => void)[] = [];
  constructor(readonly sock: Socket) {
    sock.on('data', (c) => {
      this.q.push(c);
      this.wake();
    });
    sock.on('close', () => {
      this.ended = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }
  static async open(port: number): Promise<Client> {
    const s = connect(port, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    return new Client(s);
  }
  private wake() {
    for (const w of this.waiters.splice(0)) w();
  }
  async read(n: number): Promise<Uint8Array> {
    while (this.q.length < n) {
      if (this.ended) throw new Error(`closed with ${this.q.length} of ${n} bytes`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
    return new Uint8Array(this.q.take(n));
  }
  async closed(): Promise<void> {
    while (!this.ended) await new Promise<void>((r) => this.waiters.push(r));
  }
  async import(busid = '99-1'): Promise<number> {
    this.sock.write(emitReqImport(busid));
    const h = parseOpCommon(await this.read(OP_COMMON_LEN));
    if (h.status === 0) await this.read(DEVICE_RECORD_LEN);
    return h.status;
  }
  submit(seqnum: number, ep: number, dirIn: boolean, length: number, opts: { setup?: number[]; data?: Uint8Array; devid?: number } = {}) {
    const out = dirIn ? new Uint8Array(0) : (opts.data ?? new Uint8Array(length));
    const b = new Uint8Array(48 + out.length);
    emitCmdSubmit({ seqnum, devid: opts.devid ?? DEVID, direction: dirIn ? 1 : 0, ep, transferFlags: dirIn ? 0x200 : 0, transferBufferLength: length, startFrame: 0, numberOfPackets: 0, interval: 0, setup: Uint8Array.from(opts.setup ?? [0, 0, 0, 0, 0, 0, 0, 0]) }, b);
    b.set(out, 48);
    this.sock.write(b);
  }
  unlink(seqnum: number, target: number) {
    const b = new Uint8Array(48);
    emitCmdUnlink(seqnum, DEVID, target, b);
    this.sock.write(b);
  }
  /** Read one reply: header fields and IN data. */
  async reply(): Promise<{ command: number; seqnum: number; status: number; actual: number; data: Uint8Array }> {
    const h = new UrbHeader(await this.read(URB_HEADER_LEN));
    const data = h.command === USBIP_RET_SUBMIT && h.actualLength > 0 && this.expectIn.has(h.seqnum) ? await this.read(h.actualLength) : new Uint8Array(0);
    return { command: h.command, seqnum: h.seqnum, status: h.status, actual: h.command === USBIP_RET_SUBMIT ? h.actualLength : 0, data };
  }
  expectIn = new Set<number>();
}

const until = async (cond: () => boolean) => {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 2));
  expect(cond()).toBe(true);
};

let server: UsbIpServer | undefined;
const warnings: string[] = [];
afterEach(async () => {
  await server?.close();
  server = undefined;
  warnings.length = 0;
});

async function start(dev: UsbDevice): Promise<number> {
  server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => void warnings.push(`${m} ${JSON.stringify(o)}`) } });
  server.add(dev);
  return (await server.listen(0)).port;
}

describe('connection phase', () => {
  it('DEVLIST then close; IMPORT of an unknown busid → ST_NODEV; a second IMPORT → ST_DEV_BUSY', async () => {
    const port = await start(new ManualDevice());
    const c = await Client.open(port);
    c.sock.write(emitReqDevlist());
    await c.closed();
    const all = c.q.take(c.q.length);
    expect(parseOpCommon(all).code).toBe(5);
    expect(parseRepDevlistBody(all.subarray(8))![0]!.device.idVendor).toBe(0x1234);

    const n = await Client.open(port);
    expect(await n.import('1-9')).toBe(ST_NODEV);
    const a = await Client.open(port);
    expect(await a.import()).toBe(0);
    const b = await Client.open(port);
    expect(await b.import()).toBe(ST_DEV_BUSY);
    a.sock.destroy();
    await until(() => !server!.inUse('99-1'));
    const d = await Client.open(port);
    expect(await d.import()).toBe(0);
  });
});

describe('attached phase', () => {
  it('standard requests on ep0 are answered from descriptors and translated', async () => {
    const dev = new ManualDevice();
    const port = await start(dev);
    const c = await Client.open(port);
    await c.import();
    c.expectIn.add(1);
    c.submit(1, 0, true, 18, { setup: [0x80, 6, 0, 1, 0, 0, 18, 0] });
    const r = await c.reply();
    expect(r).toMatchObject({ command: USBIP_RET_SUBMIT, seqnum: 1, status: 0, actual: 18 });
    expect(r.data).toEqual(dev.descriptors.device);
    c.submit(2, 0, false, 0, { setup: [0x00, 9, 1, 0, 0, 0, 0, 0] }); // SET_CONFIGURATION 1
    expect(await c.reply()).toMatchObject({ seqnum: 2, status: 0 });
    expect(dev.config).toBe(1);
    dev.halted.add(0x81);
    c.submit(3, 0, false, 0, { setup: [0x02, 1, 0, 0, 0x81, 0, 0, 0] }); // CLEAR_FEATURE(ENDPOINT_HALT) 0x81
    expect(await c.reply()).toMatchObject({ seqnum: 3, status: 0 });
    expect(dev.halted.has(0x81)).toBe(false);
    c.expectIn.add(4);
    c.submit(4, 0, true, 255, { setup: [0x80, 6, 0x02, 3, 0x09, 0x04, 255, 0] }); // string 2
    const s = await c.reply();
    expect(Buffer.from(s.data.subarray(2)).toString('utf16le')).toBe('manual');
    c.submit(5, 0, true, 8, { setup: [0x80, 6, 0, 0x0f, 0, 0, 8, 0] }); // BOS: stall
    expect(await c.reply()).toMatchObject({ seqnum: 5, status: Errno.EPIPE, actual: 0 });
    expect(dev.pending.length).toBe(0); // none of these reached the device raw
  });

  it('UNLINK before completion: RET_UNLINK -ECONNRESET and never a RET_SUBMIT', async () => {
    const dev = new ManualDevice();
    const port = await start(dev);
    const c = await Client.open(port);
    await c.import();
    c.expectIn.add(10);
    c.submit(10, 1, true, 512);
    await until(() => dev.pending.length === 1);
    c.unlink(11, 10);
    expect(await c.reply()).toEqual({ command: USBIP_RET_UNLINK, seqnum: 11, status: -104, actual: 0, data: new Uint8Array(0) });
    expect(dev.pending[0]!.aborted).toBe(true);
    dev.pending[0]!.resolve({ status: 0, data: new Uint8Array(512) }); // the backend answers anyway
    // Next traffic proves nothing for seqnum 10 was written in between.
    c.expectIn.add(12);
    c.submit(12, 1, true, 4);
    await until(() => dev.pending.length === 2);
    dev.pending[1]!.resolve({ status: 0, data: Uint8Array.of(1, 2, 3, 4) });
    expect(await c.reply()).toMatchObject({ command: USBIP_RET_SUBMIT, seqnum: 12, actual: 4 });
  });

  it('UNLINK after completion: RET_SUBMIT, then RET_UNLINK status 0', async () => {
    const dev = new ManualDevice();
    const port = await start(dev);
    const c = await Client.open(port);
    await c.import();
    c.expectIn.add(20);
    c.submit(20, 1, true, 8);
    await until(() => dev.pending.length === 1);
    dev.pending[0]!.resolve({ status: 0, data: Uint8Array.of(9, 9) });
    expect(await c.reply()).toMatchObject({ command: USBIP_RET_SUBMIT, seqnum: 20, actual: 2 });
    c.unlink(21, 20);
    expect(await c.reply()).toMatchObject({ command: USBIP_RET_UNLINK, seqnum: 21, status: 0 });
  });

  it('replies are ordered per endpoint; a held completion unlinked gets RET_SUBMIT then RET_UNLINK 0', async () => {
    const dev = new ManualDevice();
    const port = await start(dev);
    const c = await Client.open(port);
    await c.import();
    for (const s of [30, 31]) c.expectIn.add(s);
    c.submit(30, 1, true, 4);
    c.submit(31, 1, true, 4);
    c.submit(32, 2, false, 4);
    await until(() => dev.pending.length === 3);
    dev.pending[1]!.resolve({ status: 0, data: Uint8Array.of(31) }); // completes before 30
    dev.pending[2]!.resolve({ status: 0, actualLength: 4 }); // other endpoint: not held
    expect(await c.reply()).toMatchObject({ seqnum: 32, actual: 4 });
    c.unlink(33, 31); // 31 completed in the backend but is held behind 30
    await new Promise((r) => setTimeout(r, 10));
    expect(c.q.length).toBe(0);
    dev.pending[0]!.resolve({ status: 0, data: Uint8Array.of(30) });
    expect(await c.reply()).toMatchObject({ seqnum: 30, actual: 1 });
    expect(await c.reply()).toMatchObject({ command: USBIP_RET_SUBMIT, seqnum: 31, actual: 1 });
    expect(await c.reply()).toMatchObject({ command: USBIP_RET_UNLINK, seqnum: 33, status: 0 });
  });

  it('a backend answering more than requested is clamped to -EOVERFLOW, never actual_length > request', async () => {
    const dev = new ManualDevice();
    const port = await start(dev);
    const c = await Client.open(port);
    await c.import();
    c.expectIn.add(40);
    c.submit(40, 1, true, 4);
    await until(() => dev.pending.length === 1);
    dev.pending[0]!.resolve({ status: 0, data: new Uint8Array(100) });
    const r = await c.reply();
    expect(r).toMatchObject({ seqnum: 40, status: Errno.EOVERFLOW, actual: 4 });
  });

  it('backpressure: no more than maxInflight URBs reach the device; reading resumes as they complete', async () => {
    const dev = new ManualDevice();
    server = new UsbIpServer({ maxInflight: 2 });
    server.add(dev);
    const port = (await server.listen(0)).port;
    const c = await Client.open(port);
    await c.import();
    for (let i = 1; i <= 5; i++) c.submit(i, 2, false, 4, { data: Uint8Array.of(i, i, i, i) });
    await until(() => dev.pending.length === 2);
    await new Promise((r) => setTimeout(r, 20));
    expect(dev.pending.length).toBe(2);
    for (let i = 0; i < 5; i++) {
      await until(() => dev.pending.length > i);
      dev.pending[i]!.resolve({ status: 0, actualLength: 4 });
      expect(await c.reply()).toMatchObject({ seqnum: i + 1, status: 0, actual: 4 });
    }
    expect(dev.pending.map((p) => p.urb.data[0])).toEqual([1, 2, 3, 4, 5]);
  });

  it('hostile input closes only that client; the server and other clients carry on', async () => {
    const dev = new StorageDevice(new MemoryBackend(new Uint8Array(64 * 512)), { busid: '99-1', busnum: 99, devnum: 1 });
    server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => void warnings.push(`${m} ${JSON.stringify(o)}`) } });
    server.add(dev);
    const other = new StorageDevice(new MemoryBackend(new Uint8Array(64 * 512)), { busid: '99-2', busnum: 99, devnum: 2 });
    server.add(other);
    const port = (await server.listen(0)).port;

    const good = await Client.open(port);
    expect(await good.import('99-2')).toBe(0);

    const cases: Uint8Array[] = [];
    const huge = new Uint8Array(48);
    emitCmdSubmit({ seqnum: 1, devid: DEVID, direction: 0, ep: 2, transferFlags: 0, transferBufferLength: 0xfffffff0, startFrame: 0, numberOfPackets: 0, interval: 0, setup: new Uint8Array(8) }, huge);
    cases.push(huge);
    const unknown = new Uint8Array(48);
    new DataView(unknown.buffer).setUint32(0, 0x99);
    cases.push(unknown);
    const wrongDev = new Uint8Array(48);
    emitCmdSubmit({ seqnum: 1, devid: 0x10001, direction: 1, ep: 1, transferFlags: 0, transferBufferLength: 13, startFrame: 0, numberOfPackets: 0, interval: 0, setup: new Uint8Array(8) }, wrongDev);
    cases.push(wrongDev);
    for (const bad of cases) {
      const h = await Client.open(port);
      expect(await h.import('99-1')).toBe(0);
      h.sock.write(bad);
      await h.closed();
    }
    expect(warnings.join('\n')).toMatch(/buffer_too_large/);
    expect(warnings.join('\n')).toMatch(/unknown_command/);
    expect(warnings.join('\n')).toMatch(/bad_devid/);
    // Garbage before any operation, and a request cut off halfway.
    const g = await Client.open(port);
    g.sock.write(Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8, 9));
    await g.closed();
    const t = await Client.open(port);
    t.sock.end(emitReqImport('99-1').subarray(0, 20));
    await t.closed();
    expect(warnings.join('\n')).toMatch(/truncated/);

    // The good client still works: TEST UNIT READY through BOT over URBs.
    const cbw = new Uint8Array(31);
    const v = new DataView(cbw.buffer);
    v.setUint32(0, 0x43425355, true);
    v.setUint32(4, 77, true);
    cbw[14] = 6;
    good.submit(1, 2, false, 31, { data: cbw, devid: (99 << 16) | 2 });
    expect(await good.reply()).toMatchObject({ seqnum: 1, status: 0, actual: 31 });
    good.expectIn.add(2);
    good.submit(2, 1, true, 13, { devid: (99 << 16) | 2 });
    const csw = await good.reply();
    expect(csw).toMatchObject({ seqnum: 2, status: 0, actual: 13 });
    expect(new DataView(csw.data.buffer, csw.data.byteOffset).getUint32(4, true)).toBe(77);
    // And the device the hostile clients used can be imported again.
    const again = await Client.open(port);
    expect(await again.import('99-1')).toBe(0);
  });
});
