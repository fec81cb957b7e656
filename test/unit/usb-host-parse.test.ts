/**
 * The pure parts of the host-device backend: busids, sysfs attributes, libusb → errno, and the
 * descriptors a real device sends (parsed with bounds checks; fuzzed).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { storageDescriptors } from '../../usb/devices/storage.js';
import { busidOf, parseBusid } from '../../usb/host/busid.js';
import { decodeStringDescriptor, interfaceNumbers, parseAltSettings, readDescriptors, stringIndexes } from '../../usb/host/descriptors.js';
import { errnoFromLibusb, errnoFromLibusbError, errnoFromTransferStatus, LibusbError, TransferStatus } from '../../usb/host/errno.js';
import { parseSysfsSpeed, readSysfsInfo } from '../../usb/host/sysfs.js';
import { Errno, UsbSpeed } from '../../usb/protocol.js';

describe('busid', () => {
  it('is the bus number and the port chain, as sysfs names devices', () => {
    expect(busidOf(1, [2])).toBe('1-2');
    expect(busidOf(3, [1, 4, 2])).toBe('3-1.4.2');
  });

  it('has none for root hubs, missing port numbers, and impossible values', () => {
    expect(busidOf(1, [])).toBeNull();
    expect(busidOf(1, undefined)).toBeNull();
    expect(busidOf(0, [1])).toBeNull();
    expect(busidOf(256, [1])).toBeNull();
    expect(busidOf(1, [0])).toBeNull();
    expect(busidOf(1, [1, 2, 3, 4, 5, 6, 7, 8])).toBeNull();
  });

  it('parses what it prints, and nothing else', () => {
    const ports = fc.array(fc.integer({ min: 1, max: 255 }), { minLength: 1, maxLength: 7 });
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 255 }), ports, (bus, p) => {
        const s = busidOf(bus, p)!;
        expect(parseBusid(s)).toEqual({ busnum: bus, ports: p });
      }),
    );
    fc.assert(
      fc.property(fc.string({ maxLength: 40 }), (s) => {
        const r = parseBusid(s);
        if (r) expect(busidOf(r.busnum, r.ports)).toBe(s);
      }),
    );
    for (const bad of ['', '1', '1-', '-1', '01-2', '1-02', '1-2.', '1-2..3', '1-0', '1-2:1.0', 'usb1', '99-1 ', '1-2.3.4.5.6.7.8.9', '1000-1']) {
      expect(parseBusid(bad), bad).toBeNull();
    }
  });
});

describe('sysfs', () => {
  it('maps the speed attribute (Mb/s) to enum usb_device_speed', () => {
    expect(parseSysfsSpeed('1.5\n')).toBe(UsbSpeed.Low);
    expect(parseSysfsSpeed('12')).toBe(UsbSpeed.Full);
    expect(parseSysfsSpeed('480')).toBe(UsbSpeed.High);
    expect(parseSysfsSpeed('53.3-480')).toBe(UsbSpeed.Wireless);
    expect(parseSysfsSpeed('5000')).toBe(UsbSpeed.Super);
    expect(parseSysfsSpeed('10000')).toBe(UsbSpeed.SuperPlus);
    expect(parseSysfsSpeed('20000')).toBe(UsbSpeed.SuperPlus);
    expect(parseSysfsSpeed('fast')).toBe(UsbSpeed.Unknown);
  });

  it('reads speed, strings and the real path; unknown when there is no sysfs entry', () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-sysfs-'));
    try {
      const real = path.join(root, 'devices', 'usb1', '1-2');
      fs.mkdirSync(real, { recursive: true });
      fs.writeFileSync(path.join(real, 'speed'), '480\n');
      fs.writeFileSync(path.join(real, 'product'), 'Flash Disk\n');
      fs.writeFileSync(path.join(real, 'serial'), 'ABC123\n');
      fs.mkdirSync(path.join(root, 'bus'));
      fs.symlinkSync(real, path.join(root, 'bus', '1-2'));
      expect(readSysfsInfo('1-2', path.join(root, 'bus'))).toEqual({ speed: UsbSpeed.High, manufacturer: null, product: 'Flash Disk', serial: 'ABC123', path: real });
      expect(readSysfsInfo('1-3', path.join(root, 'bus'))).toEqual({ speed: UsbSpeed.Unknown, manufacturer: null, product: null, serial: null, path: path.join(root, 'bus', '1-3') });
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});

describe('libusb outcomes as Linux URB statuses', () => {
  it('transfer statuses', () => {
    expect(errnoFromTransferStatus(TransferStatus.COMPLETED)).toBe(0);
    expect(errnoFromTransferStatus(TransferStatus.STALL)).toBe(Errno.EPIPE);
    expect(errnoFromTransferStatus(TransferStatus.CANCELLED)).toBe(Errno.ECONNRESET);
    expect(errnoFromTransferStatus(TransferStatus.NO_DEVICE)).toBe(Errno.ESHUTDOWN);
    expect(errnoFromTransferStatus(TransferStatus.OVERFLOW)).toBe(Errno.EOVERFLOW);
    expect(errnoFromTransferStatus(TransferStatus.ERROR)).toBe(Errno.EPROTO);
    expect(errnoFromTransferStatus(TransferStatus.TIMED_OUT)).toBe(-110);
  });

  it('call errors', () => {
    expect(errnoFromLibusbError(LibusbError.NO_DEVICE)).toBe(Errno.ENODEV);
    expect(errnoFromLibusbError(LibusbError.PIPE)).toBe(Errno.EPIPE);
    expect(errnoFromLibusbError(LibusbError.INVALID_PARAM)).toBe(Errno.EINVAL);
    expect(errnoFromLibusbError(LibusbError.NOT_FOUND)).toBe(Errno.ENOENT);
    expect(errnoFromLibusbError(LibusbError.BUSY)).toBe(-16);
    expect(errnoFromLibusbError(LibusbError.NOT_SUPPORTED)).toBe(-6);
    expect(errnoFromLibusbError(LibusbError.OTHER)).toBe(Errno.EPROTO);
  });

  it('tells the two kinds apart by sign, and survives anything thrown', () => {
    expect(errnoFromLibusb({ errno: 4 })).toBe(Errno.EPIPE); // LIBUSB_TRANSFER_STALL
    expect(errnoFromLibusb({ errno: -4 })).toBe(Errno.ENODEV); // LIBUSB_ERROR_NO_DEVICE
    expect(errnoFromLibusb(new Error('x'))).toBe(Errno.EPROTO);
    expect(errnoFromLibusb(null)).toBe(Errno.EPROTO);
    fc.assert(
      fc.property(fc.anything(), (x) => {
        expect(errnoFromLibusb(x)).toBeLessThanOrEqual(0);
      }),
    );
  });
});

describe('descriptors from a device', () => {
  const storage = storageDescriptors({ idVendor: 0x0525, idProduct: 0xa4a5, product: 'disk', serial: 'S1' });
  // Interface 0 with two alternate settings (the second with bigger packets), interface 1 with
  // an IAD and a string, as a composite device has.
  const composite = Uint8Array.of(
    9, 2, 55, 0, 2, 1, 4, 0x80, 50,
    8, 0x0b, 0, 2, 0xff, 0, 0, 5, // IAD, iFunction 5
    9, 4, 0, 0, 1, 0xff, 0, 0, 0,
    7, 5, 0x81, 3, 8, 0, 10,
    9, 4, 0, 1, 1, 0xff, 0, 0, 0,
    7, 5, 0x81, 3, 64, 0, 1,
    9, 4, 1, 0, 0, 0xff, 0, 0, 6,
  );

  it('walks interfaces, alternate settings and endpoints', () => {
    expect(parseAltSettings(storage.configurations[0]!)).toEqual([
      { iface: 0, alt: 0, endpoints: [ { address: 0x81, type: 'bulk', maxPacketSize: 512 }, { address: 0x02, type: 'bulk', maxPacketSize: 512 } ] },
    ]);
    expect(parseAltSettings(composite).map((a) => [a.iface, a.alt, a.endpoints.map((e) => e.maxPacketSize)])).toEqual([
      [0, 0, [8]],
      [0, 1, [64]],
      [1, 0, []],
    ]);
    expect(interfaceNumbers(composite)).toEqual([0, 1]);
  });

  it('finds every string index referenced', () => {
    expect(stringIndexes(storage.device, storage.configurations)).toEqual([1, 2, 3]);
    expect(stringIndexes(Uint8Array.of(18, 1, 0, 2, 0, 0, 0, 64, 1, 2, 3, 4, 0, 1, 0, 7, 0, 1), [composite])).toEqual([4, 5, 6, 7]);
  });

  it('decodes string descriptors, refusing what is not one', () => {
    expect(decodeStringDescriptor(Uint8Array.of(10, 3, 0x51, 0, 0x45, 0, 0x4d, 0, 0x55, 0))).toBe('QEMU');
    expect(decodeStringDescriptor(Uint8Array.of(2, 3))).toBe('');
    expect(decodeStringDescriptor(Uint8Array.of(10, 3, 0x41, 0))).toBe('A'); // bLength beyond the bytes
    expect(decodeStringDescriptor(Uint8Array.of(4, 2, 0, 0))).toBeNull();
  });

  it('never throws or reads out of bounds on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.uint8Array({ maxLength: 30 }), (cfg, dev) => {
        for (const a of parseAltSettings(cfg)) for (const e of a.endpoints) expect(e.maxPacketSize).toBeLessThanOrEqual(0x7ff);
        for (const i of stringIndexes(dev, [cfg])) expect(i).toBeGreaterThan(0);
        decodeStringDescriptor(cfg);
      }),
    );
  });

  it('reads device, configurations (header then whole), strings and BOS through GET_DESCRIPTOR', async () => {
    const device = Uint8Array.from(storage.device);
    device[2] = 0x10; // bcdUSB 2.10: has a BOS
    const bos = Uint8Array.of(5, 15, 12, 0, 1, 7, 16, 2, 2, 0, 0, 0);
    const asked: string[] = [];
    const str = (s: string) => Uint8Array.from([2 + s.length * 2, 3, ...Buffer.from(s, 'utf16le')]);
    const d = await readDescriptors(async (wValue, wIndex, wLength) => {
      asked.push(`${(wValue >> 8).toString(16)}/${wValue & 0xff}/${wIndex.toString(16)}/${wLength}`);
      const type = wValue >> 8;
      const full = type === 1 ? device : type === 2 ? storage.configurations[0]! : type === 15 ? bos : wValue === 0x300 ? Uint8Array.of(4, 3, 0x07, 0x04) : wValue === 0x302 ? str('disk') : undefined;
      if (!full) throw Object.assign(new Error('stall'), { errno: 4 });
      return full.subarray(0, wLength);
    });
    expect(d.device).toEqual(device);
    expect(d.configurations).toEqual(storage.configurations);
    // Strings in the device's first language (0x0407 here); refused ones left out.
    expect([...d.strings]).toEqual([[2, 'disk']]);
    expect(d.bos).toEqual(bos);
    expect(asked).toEqual(['1/0/0/18', '2/0/0/9', '2/0/0/32', '3/0/0/255', '3/1/407/255', '3/2/407/255', '3/3/407/255', 'f/0/0/5', 'f/0/0/12']);
  });

  it('fails the open on a device descriptor that is not one', async () => {
    await expect(readDescriptors(async () => Uint8Array.of(18, 2))).rejects.toThrow(/bad device descriptor/);
  });
});
