/**
 * Host devices through libusb (`usb` v2; docs/usb.md "Host devices: which `usb`" says why v2).
 * Devices are named by their sysfs busid (busid.ts); speed, strings and path come from sysfs
 * on Linux (sysfs.ts), since v2 does not expose libusb_get_device_speed and reading strings
 * would mean opening devices other programs use. Hubs are never listed: a hub's ports belong
 * to the host.
 *
 * Hotplug is libusb's: on Linux its udev monitor, so arrivals need a running udevd (without
 * one, libusb neither reports nor lists devices plugged in after it started). The unplug of a
 * device we have open libusb notices itself (its usbfs descriptor errors), and so does a
 * transfer that ends in NO_DEVICE: 'remove' is emitted once, whichever comes first.
 * Delivery starts with the first listener.
 */
import { EventEmitter } from 'node:events';
import { busidOf, parseBusid } from './busid.js';
import { LibusbHostDevice } from './libusb-device.js';
import { loadLibusbBinding, type LibusbBinding, type LibusbDevice } from './libusb-binding.js';
import { HostUsbError, type HostDeviceInfo, type HostDeviceSource, type HostLog, type HostUsbDevice } from './source.js';
import { SYSFS_USB_DEVICES, readSysfsInfo } from './sysfs.js';

const CLASS_HUB = 9;
const silent: HostLog = { debug() {}, warn() {} };

export interface LibusbSourceOptions {
  log?: HostLog;
  /** Tests: a fake libusb and sysfs root. */
  binding?: LibusbBinding;
  sysfsRoot?: string;
}

/** Throws HostUsbError USB_UNAVAILABLE when the `usb` package or libusb cannot start. */
export function openLibusbSource(o: LibusbSourceOptions = {}): HostDeviceSource {
  return new LibusbSource(o.binding ?? loadLibusbBinding(), o.log ?? silent, o.sysfsRoot ?? SYSFS_USB_DEVICES);
}

/** The info of a libusb device, or null for hubs and devices without a port chain. */
export function hostDeviceInfo(d: LibusbDevice, sysfsRoot = SYSFS_USB_DEVICES): HostDeviceInfo | null {
  if (d.deviceDescriptor.bDeviceClass === CLASS_HUB) return null;
  const busid = busidOf(d.busNumber, d.portNumbers);
  if (!busid) return null;
  const s = readSysfsInfo(busid, sysfsRoot);
  return {
    busid,
    busnum: d.busNumber,
    devnum: d.deviceAddress,
    vendorId: d.deviceDescriptor.idVendor,
    productId: d.deviceDescriptor.idProduct,
    speed: s.speed,
    manufacturer: s.manufacturer,
    product: s.product,
    serial: s.serial,
    path: s.path,
  };
}

class LibusbSource extends EventEmitter implements HostDeviceSource {
  /** Infos by busid, as last seen: a detach event arrives after sysfs forgot the device. */
  private readonly known = new Map<string, HostDeviceInfo>();
  /** Busids open now (open() until the device's close() finished). */
  private readonly opened = new Set<string>();
  private stopHotplug?: () => void;
  private closed = false;

  constructor(
    private readonly binding: LibusbBinding,
    private readonly log: HostLog,
    private readonly sysfsRoot: string,
  ) {
    super();
  }

  list(): HostDeviceInfo[] {
    const out: HostDeviceInfo[] = [];
    for (const d of this.binding.getDeviceList()) {
      const info = hostDeviceInfo(d, this.sysfsRoot);
      if (!info) continue;
      this.known.set(info.busid, info);
      out.push(info);
    }
    return out.sort((a, b) => a.busnum - b.busnum || a.busid.localeCompare(b.busid, 'en', { numeric: true }));
  }

  async open(busid: string): Promise<HostUsbDevice> {
    if (!parseBusid(busid)) throw new HostUsbError('USB_DEVICE_NOT_FOUND', `${JSON.stringify(busid)} is not a USB bus id (like 1-2 or 1-2.3)`);
    const dev = this.binding.getDeviceList().find((d) => busidOf(d.busNumber, d.portNumbers) === busid && d.deviceDescriptor.bDeviceClass !== CLASS_HUB);
    const info = dev && hostDeviceInfo(dev, this.sysfsRoot);
    if (!dev || !info) throw new HostUsbError('USB_DEVICE_NOT_FOUND', `no USB device at ${busid}`);
    // One owner at a time: a second open would share the libusb handle and its claims.
    if (this.opened.has(busid)) throw new HostUsbError('USB_DEVICE_BUSY', `${busid} is already open`);
    this.opened.add(busid);
    this.known.set(busid, info);
    let d: LibusbHostDevice;
    try {
      // Without a hotplug event (no udevd, or it comes later), a transfer that finds the device
      // gone is the first news of the unplug: report it once, whichever comes first.
      d = await LibusbHostDevice.open(dev, info, this.binding, this.log, { gone: () => this.gone(info), closed: () => this.opened.delete(busid) });
    } catch (e) {
      this.opened.delete(busid);
      throw e;
    }
    this.log.debug({ busid, vendorId: info.vendorId, productId: info.productId }, 'opened host USB device');
    return d;
  }

  override on(ev: 'add' | 'remove', fn: (d: HostDeviceInfo) => void): this {
    super.on(ev, fn);
    this.syncHotplug();
    return this;
  }

  override off(ev: 'add' | 'remove', fn: (d: HostDeviceInfo) => void): this {
    super.off(ev, fn);
    this.syncHotplug();
    return this;
  }

  close(): void {
    this.closed = true;
    this.removeAllListeners();
    this.syncHotplug();
  }

  private syncHotplug(): void {
    const want = !this.closed && this.listenerCount('add') + this.listenerCount('remove') > 0;
    if (want && !this.stopHotplug) {
      this.list(); // remember what is there, for the infos of later detaches
      this.stopHotplug = this.binding.hotplug(
        (d) => this.attach(d),
        (d) => this.detach(d),
      );
    } else if (!want && this.stopHotplug) {
      this.stopHotplug();
      this.stopHotplug = undefined;
    }
  }

  private attach(d: LibusbDevice): void {
    const info = hostDeviceInfo(d, this.sysfsRoot);
    if (!info) return;
    this.known.set(info.busid, info);
    this.log.debug({ busid: info.busid }, 'USB device plugged in');
    this.emit('add', info);
  }

  private detach(d: LibusbDevice): void {
    if (d.deviceDescriptor.bDeviceClass === CLASS_HUB) return;
    const busid = busidOf(d.busNumber, d.portNumbers);
    const known = busid ? this.known.get(busid) : undefined;
    // Unknown: already reported (gone() below). Another devnum: the busid was taken again since
    // (re-enumeration), and that device is still there.
    if (!known || known.devnum !== d.deviceAddress) return;
    this.known.delete(known.busid);
    this.log.debug({ busid }, 'USB device unplugged');
    this.emit('remove', known);
  }

  private gone(info: HostDeviceInfo): void {
    const known = this.known.get(info.busid);
    if (!known || known.devnum !== info.devnum || this.closed) return;
    this.known.delete(info.busid);
    this.emit('remove', known);
  }
}
