/**
 * The virtual CDC ACM serial device (usb/devices/serial.ts) driven URB by URB as Linux's
 * cdc_acm does: class requests on endpoint 0, bulk IN 0x81 reads kept in flight, bulk OUT 0x02
 * writes, the interrupt IN 0x83 notification URB; the host side is a fake stream (Duplex) or a
 * real unix socket.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Duplex } from 'node:stream';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { deviceRecord, parseConfiguration, type Urb } from '../../usb/device.js';
import { Errno } from '../../usb/protocol.js';
import {
  EP_IN,
  EP_NOTIFY,
  EP_OUT,
  GET_LINE_CODING,
  SET_CONTROL_LINE_STATE,
  SET_LINE_CODING,
  SerialDevice,
  emitLineCoding,
  listenSerialSocket,
  parseLineCoding,
} from '../../usb/devices/serial.js';

const sig = () => new AbortController().signal;
const dev = (o: Partial<ConstructorParameters<typeof SerialDevice>[0]> = {}) => new SerialDevice({ busid: '99-1', busnum: 99, devnum: 1, ...o });
const bulkOut = (data: Uint8Array | string): Urb => {
  const d = typeof data === 'string' ? new TextEncoder().encode(data) : data;
  return { endpoint: EP_OUT, type: 'bulk', data: d, length: d.length, transferFlags: 0 };
};
const bulkIn = (length: number): Urb => ({ endpoint: EP_IN, type: 'bulk', data: new Uint8Array(0), length, transferFlags: 0x200 });
const notifyIn = (): Urb => ({ endpoint: EP_NOTIFY, type: 'interrupt', data: new Uint8Array(0), length: 16, transferFlags: 0x200 });
const control = (setup: number[], data = new Uint8Array(0)): Urb => ({ endpoint: setup[0]! & 0x80 ? 0x80 : 0, type: 'control', setup: Uint8Array.from(setup), data, length: setup[6]! | (setup[7]! << 8), transferFlags: 0 });

/** A host stream: what the device writes is collected; push() plays the host writing. */
function fakeHost(o: { holdWrites?: boolean } = {}) {
  const written: Buffer[] = [];
  const held: (() => void)[] = [];
  const s = new Duplex({
    highWaterMark: 4,
    read() {},
    write(chunk: Buffer, _enc, cb) {
      written.push(chunk);
      if (o.holdWrites) held.push(cb);
      else cb();
    },
  });
  return { s, written: () => Buffer.concat(written).toString(), release: () => held.splice(0).forEach((cb) => cb()) };
}

const flush = () => new Promise((r) => setImmediate(r));

describe('descriptors', () => {
  it('a CDC ACM communication interface and a data interface with the right endpoints', () => {
    const d = dev();
    expect(d.descriptors.device[4]).toBe(0x02); // bDeviceClass CDC
    const cfg = d.descriptors.configurations[0]!;
    expect(cfg[2] | (cfg[3]! << 8)).toBe(cfg.length);
    const p = parseConfiguration(cfg);
    expect(p.interfaces).toEqual([
      { bInterfaceClass: 2, bInterfaceSubClass: 2, bInterfaceProtocol: 1 },
      { bInterfaceClass: 0x0a, bInterfaceSubClass: 0, bInterfaceProtocol: 0 },
    ]);
    expect(p.endpoints).toEqual([
      { address: EP_NOTIFY, type: 'interrupt', maxPacketSize: 16 },
      { address: EP_IN, type: 'bulk', maxPacketSize: 512 },
      { address: EP_OUT, type: 'bulk', maxPacketSize: 512 },
    ]);
    expect(deviceRecord(d)).toMatchObject({ idVendor: 0x0525, idProduct: 0xa4a7, bNumInterfaces: 2, bDeviceClass: 2 });
  });

  it('the functional descriptors cdc_acm looks for: header, call management, ACM, union', () => {
    const cfg = dev().descriptors.configurations[0]!;
    const fds: number[][] = [];
    for (let off = 0; off < cfg.length; off += cfg[off]!) if (cfg[off + 1] === 0x24) fds.push([...cfg.subarray(off, off + cfg[off]!)]);
    expect(fds).toEqual([
      [5, 0x24, 0x00, 0x20, 0x01], // header, CDC 1.20
      [5, 0x24, 0x01, 0x00, 1], // call management → data interface 1
      [4, 0x24, 0x02, 0x02], // ACM: line coding and serial state
      [5, 0x24, 0x06, 0, 1], // union: master 0, slave 1
    ]);
  });
});

describe('line coding', () => {
  it('parse and emit round trip (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.nat(255), fc.nat(255), fc.nat(255), (rate, stopBits, parity, dataBits) => {
        const c = { rate, stopBits, parity, dataBits };
        expect(parseLineCoding(emitLineCoding(c))).toEqual(c);
      }),
    );
    fc.assert(fc.property(fc.uint8Array({ maxLength: 6 }), (b) => parseLineCoding(b) === null));
  });

  it('SET_LINE_CODING then GET_LINE_CODING reads back what was set; SET_CONTROL_LINE_STATE sets DTR/RTS', async () => {
    const d = dev();
    // 115200 8N1, as `stty -F /dev/ttyACM0 115200` makes cdc_acm send.
    const coding = Uint8Array.of(0x00, 0xc2, 0x01, 0x00, 0, 0, 8);
    const set = await d.submit(control([0x21, SET_LINE_CODING, 0, 0, 0, 0, 7, 0], coding), sig());
    expect(set).toMatchObject({ status: 0, actualLength: 7 });
    expect(d.lineCoding).toEqual({ rate: 115200, stopBits: 0, parity: 0, dataBits: 8 });
    const get = await d.submit(control([0xa1, GET_LINE_CODING, 0, 0, 0, 0, 7, 0]), sig());
    expect(get.status).toBe(0);
    expect([...get.data!]).toEqual([...coding]);
    expect((await d.submit(control([0x21, SET_CONTROL_LINE_STATE, 3, 0, 0, 0, 0, 0]), sig())).status).toBe(0);
    expect([d.dtr, d.rts]).toEqual([true, true]);
    await d.submit(control([0x21, SET_CONTROL_LINE_STATE, 0, 0, 0, 0, 0, 0]), sig());
    expect([d.dtr, d.rts]).toEqual([false, false]);
  });

  it('short or unknown class requests stall', async () => {
    const d = dev();
    expect((await d.submit(control([0x21, SET_LINE_CODING, 0, 0, 0, 0, 3, 0], Uint8Array.of(1, 2, 3)), sig())).status).toBe(Errno.EPIPE);
    expect((await d.submit(control([0x21, 0x42, 0, 0, 0, 0, 0, 0]), sig())).status).toBe(Errno.EPIPE);
    expect((await d.submit(control([0xa1, GET_LINE_CODING, 0, 0, 1, 0, 7, 0]), sig())).status).toBe(Errno.EPIPE); // data interface
  });
});

describe('bytes both ways', () => {
  it('guest → host: bulk OUT bytes are written to the host stream in order', async () => {
    const d = dev();
    const h = fakeHost();
    d.connect(h.s);
    const rs = await Promise.all([d.submit(bulkOut('hello '), sig()), d.submit(bulkOut('world\n'), sig())]);
    expect(rs.map((r) => r.actualLength)).toEqual([6, 6]);
    expect(h.written()).toBe('hello world\n');
    expect(d.counters.toHost).toBe(12);
  });

  it('host → guest: an IN URB waits until bytes arrive, then gets at most what it asked for', async () => {
    const d = dev();
    const h = fakeHost();
    d.connect(h.s);
    let done = false;
    const first = d.submit(bulkIn(4), sig()).then((r) => ((done = true), r));
    await flush();
    expect(done).toBe(false); // nothing to read yet: the URB waits (NAK)
    h.s.push(Buffer.from('abcdefg'));
    const r1 = await first;
    expect(Buffer.from(r1.data!).toString()).toBe('abcd');
    const r2 = await d.submit(bulkIn(512), sig());
    expect(Buffer.from(r2.data!).toString()).toBe('efg');
  });

  it('bytes spread over several host chunks are joined into one IN URB', async () => {
    const d = dev();
    const h = fakeHost();
    d.connect(h.s);
    h.s.push(Buffer.from('ab'));
    h.s.push(Buffer.from('cd'));
    h.s.push(Buffer.from('ef'));
    await flush();
    expect(Buffer.from((await d.submit(bulkIn(5), sig())).data!).toString()).toBe('abcde');
    expect(Buffer.from((await d.submit(bulkIn(5), sig())).data!).toString()).toBe('f');
  });

  it('guest bytes written while no host client is connected go to the next client, bounded', async () => {
    const d = dev({ outBufferBytes: 8 });
    expect((await d.submit(bulkOut('early'), sig())).actualLength).toBe(5);
    expect((await d.submit(bulkOut('-and-late'), sig())).actualLength).toBe(9); // accepted, 6 dropped
    expect(d.counters.outDropped).toBe(6);
    const h = fakeHost();
    d.connect(h.s);
    expect(h.written()).toBe('early-an');
  });

  it('one host client at a time', () => {
    const d = dev();
    expect(d.connect(fakeHost().s)).toBe(true);
    expect(d.connect(fakeHost().s)).toBe(false);
  });
});

describe('cancellation and backpressure', () => {
  it('a waiting IN URB is cancelled by its AbortSignal (UNLINK) and takes no bytes', async () => {
    const d = dev();
    const h = fakeHost();
    d.connect(h.s);
    const ac = new AbortController();
    const p = d.submit(bulkIn(64), ac.signal);
    ac.abort();
    expect((await p).status).toBe(Errno.ECONNRESET);
    h.s.push(Buffer.from('kept'));
    await flush();
    expect(Buffer.from((await d.submit(bulkIn(64), sig())).data!).toString()).toBe('kept');
  });

  it('the host stream is paused while the buffer is full and no IN URB waits, resumed when read', async () => {
    const d = dev({ inBufferBytes: 8 });
    const h = fakeHost();
    d.connect(h.s);
    h.s.push(Buffer.from('0123456789'));
    await flush();
    expect(h.s.isPaused()).toBe(true);
    expect(Buffer.from((await d.submit(bulkIn(6), sig())).data!).toString()).toBe('012345');
    expect(h.s.isPaused()).toBe(false);
  });

  it('bulk OUT waits for the host stream to drain; UNLINK while waiting writes nothing', async () => {
    const d = dev();
    const h = fakeHost({ holdWrites: true });
    d.connect(h.s);
    expect((await d.submit(bulkOut('12345678'), sig())).actualLength).toBe(8); // fills the stream
    let second = false;
    const p2 = d.submit(bulkOut('second'), sig()).then((r) => ((second = true), r));
    await flush();
    expect(second).toBe(false);
    h.release();
    expect((await p2).actualLength).toBe(6); // 'second' is now held in the stream: full again

    const ac = new AbortController();
    const p3 = d.submit(bulkOut('never'), ac.signal);
    await flush();
    ac.abort();
    expect((await p3).status).toBe(Errno.ECONNRESET);
    h.release();
    await flush();
    expect(h.written()).toBe('12345678second');
  });

  it('SERIAL_STATE: DCD|DSR when a host client connects, 0 when it leaves', async () => {
    const d = dev();
    d.attached();
    const n1 = d.submit(notifyIn(), sig());
    const h = fakeHost();
    d.connect(h.s);
    expect([...(await n1).data!]).toEqual([0xa1, 0x20, 0, 0, 0, 0, 2, 0, 3, 0]);
    const n2 = d.submit(notifyIn(), sig());
    h.s.destroy();
    expect([...(await n2).data!]).toEqual([0xa1, 0x20, 0, 0, 0, 0, 2, 0, 0, 0]);
    expect(d.connected).toBe(false);
  });

  it('detach fails waiting URBs with ESHUTDOWN', async () => {
    const d = dev();
    const p = d.submit(bulkIn(64), sig());
    const n = d.submit(notifyIn(), sig());
    d.detached();
    expect((await p).status).toBe(Errno.ESHUTDOWN);
    expect((await n).status).toBe(Errno.ESHUTDOWN);
  });
});

describe('listenSerialSocket', () => {
  it('bridges one unix socket client at a time, both ways; replaces a stale socket file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-serial-'));
    const p = path.join(dir, 'tty.sock');
    // A stale socket file: bound by a process that exited without unlinking it.
    execFileSync('/usr/bin/python3', ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()', p]);
    expect(fs.existsSync(p)).toBe(true);
    const d = dev();
    const l = await listenSerialSocket(d, p);
    try {
      const c = net.connect(p);
      await new Promise((r) => c.once('connect', r));
      const second = net.connect(p);
      await new Promise((r) => second.once('close', r)); // refused while c holds the device
      await new Promise<void>((r) => {
        const t = setInterval(() => d.connected && (clearInterval(t), r()), 5);
      });
      c.write('to guest');
      const r = await d.submit(bulkIn(64), sig());
      expect(Buffer.from(r.data!).toString()).toBe('to guest');
      const got = new Promise<string>((res) => c.once('data', (b: Buffer) => res(b.toString())));
      await d.submit(bulkOut('to host'), sig());
      expect(await got).toBe('to host');
      c.destroy();
    } finally {
      await l.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a path that is not a socket', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-serial-'));
    const p = path.join(dir, 'file');
    fs.writeFileSync(p, 'x');
    await expect(listenSerialSocket(dev(), p)).rejects.toMatchObject({ code: 'EEXIST' });
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
