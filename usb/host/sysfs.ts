/**
 * What Linux's sysfs says about a USB device (Documentation/ABI/testing/sysfs-bus-usb), read
 * without opening it. `usb` v2 does not expose libusb_get_device_speed, and the server must
 * give vhci-hcd the device's speed (it picks the hub port by it); the kernel's own answer is
 * /sys/bus/usb/devices/<busid>/speed. Elsewhere these reads find nothing and the fields stay
 * unknown.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { UsbSpeed } from '../protocol.js';

export const SYSFS_USB_DEVICES = '/sys/bus/usb/devices';

/** The `speed` attribute, in Mb/s as the kernel prints it (drivers/usb/core/sysfs.c speed_show). */
export function parseSysfsSpeed(s: string): UsbSpeed {
  switch (s.trim()) {
    case '1.5':
      return UsbSpeed.Low;
    case '12':
      return UsbSpeed.Full;
    case '480':
      return UsbSpeed.High;
    case '53.3-480':
      return UsbSpeed.Wireless;
    case '5000':
      return UsbSpeed.Super;
    case '10000':
    case '20000':
      return UsbSpeed.SuperPlus;
    default:
      return UsbSpeed.Unknown;
  }
}

export interface SysfsInfo {
  speed: UsbSpeed;
  manufacturer: string | null;
  product: string | null;
  serial: string | null;
  /** The real device directory (what usbipd reports), or the link's path when it cannot be resolved. */
  path: string;
}

function attr(dir: string, name: string): string | null {
  try {
    return fs.readFileSync(path.join(dir, name), 'utf8').replace(/\n$/, '');
  } catch {
    return null;
  }
}

export function readSysfsInfo(busid: string, root = SYSFS_USB_DEVICES): SysfsInfo {
  const dir = path.join(root, busid);
  let real = dir;
  try {
    real = fs.realpathSync(dir);
  } catch {
    // not Linux, or already unplugged
  }
  const speed = attr(dir, 'speed');
  return {
    speed: speed === null ? UsbSpeed.Unknown : parseSysfsSpeed(speed),
    manufacturer: attr(dir, 'manufacturer'),
    product: attr(dir, 'product'),
    serial: attr(dir, 'serial'),
    path: real,
  };
}

/** The driver bound to interface `iface` of the active configuration, if any ("usb-storage"). */
export function interfaceDriver(busid: string, config: number, iface: number, root = SYSFS_USB_DEVICES): string | null {
  try {
    return path.basename(fs.readlinkSync(path.join(root, `${busid}:${config}.${iface}`, 'driver')));
  } catch {
    return null;
  }
}
