/**
 * A HostDeviceSource (usb/host/source.ts) without USB hardware: each "host device" is the
 * virtual mass-storage device (usb/devices/storage.ts) under a host busid and VID:PID, so the
 * daemon's USB manager, the USB/IP server and a guest's vhci-hcd drive it exactly as they
 * would drive a real disk. The test plugs, unplugs and re-enumerates devices by hand and sees
 * whether a device is open ("kernel driver detached") at any moment.
 *
 * The real source (libusb-source.ts over the `usb` package) is exercised by
 * test/e2e/usb-host-device.test.ts inside a QEMU guest with emulated USB devices: this host
 * has no USB devices of its own.
 */
import { EventEmitter } from 'node:events';
import type { BlockBackend } from '../../usb/devices/scsi.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import type { HostDeviceInfo, HostDeviceSource, HostUsbDevice } from '../../usb/host/source.js';
import { UsbSpeed } from '../../usb/protocol.js';

class FakeHostDevice extends StorageDevice implements HostUsbDevice {
  constructor(
    backend: BlockBackend,
    readonly info: HostDeviceInfo,
    private readonly src: FakeHostSource,
  ) {
    super(backend, { busid: info.busid, busnum: info.busnum, devnum: info.devnum, idVendor: info.vendorId, idProduct: info.productId, product: info.product ?? undefined });
  }

  async close(): Promise<void> {
    this.src.openNow.delete(this.info.busid);
    this.src.closes++;
  }
}

export interface FakePlug {
  busid: string;
  vendorId: number;
  productId: number;
  backend: BlockBackend;
  product?: string;
}

export class FakeHostSource extends EventEmitter implements HostDeviceSource {
  private readonly devs = new Map<string, { info: HostDeviceInfo; backend: BlockBackend }>();
  private nextDevnum = 2;
  /** Busids open now (their kernel driver would be detached). */
  readonly openNow = new Set<string>();
  opens = 0;
  closes = 0;
  closed = false;
  /** Make the next open() fail with this error. */
  failNextOpen: Error | null = null;

  list(): HostDeviceInfo[] {
    return [...this.devs.values()].map((d) => d.info);
  }

  /** Plug a device in (a new devnum each time, as the kernel assigns on enumeration); emits 'add'. */
  plug(p: FakePlug, opts: { silent?: boolean } = {}): HostDeviceInfo {
    const busnum = Number(p.busid.split('-')[0]);
    const info: HostDeviceInfo = {
      busid: p.busid,
      busnum,
      devnum: this.nextDevnum++,
      vendorId: p.vendorId,
      productId: p.productId,
      speed: UsbSpeed.High,
      manufacturer: 'Fake',
      product: p.product ?? 'Fake Disk',
      serial: null,
      path: `/sys/devices/pci0000:00/0000:00:14.0/usb${busnum}/${p.busid}`,
    };
    this.devs.set(p.busid, { info, backend: p.backend });
    if (!opts.silent) this.emit('add', info);
    return info;
  }

  /** Unplug; emits 'remove'. */
  unplug(busid: string): void {
    const d = this.devs.get(busid);
    if (!d) throw new Error(`fake: nothing at ${busid}`);
    this.devs.delete(busid);
    this.emit('remove', d.info);
  }

  async open(busid: string): Promise<HostUsbDevice> {
    const d = this.devs.get(busid);
    if (this.failNextOpen) {
      const e = this.failNextOpen;
      this.failNextOpen = null;
      throw e;
    }
    if (!d) throw Object.assign(new Error(`no device ${busid}`), { name: 'HostUsbError', code: 'USB_DEVICE_NOT_FOUND' });
    if (this.openNow.has(busid)) throw Object.assign(new Error(`${busid} is open already`), { name: 'HostUsbError', code: 'USB_DEVICE_BUSY' });
    this.openNow.add(busid);
    this.opens++;
    return new FakeHostDevice(d.backend, d.info, this);
  }

  close(): void {
    this.closed = true;
    this.removeAllListeners();
  }
}
