/**
 * Real host USB devices as the USB/IP server sees them: a source lists what is plugged in,
 * reports hotplug, and opens one device for export. Opening takes the device away from the
 * host's kernel drivers (they are detached from its interfaces, which are then claimed);
 * closing gives it back. The libusb implementation is libusb-source.ts; the daemon may run
 * against any other implementation (a fake in its tests).
 */
import type { UsbDevice } from '../device.js';
import type { UsbSpeed } from '../protocol.js';

export interface HostDeviceInfo {
  /** The Linux sysfs name: bus number, then the port chain ("1-2", "1-2.3"). */
  busid: string;
  busnum: number;
  /** The device address on its bus. */
  devnum: number;
  vendorId: number;
  productId: number;
  speed: UsbSpeed;
  manufacturer: string | null;
  product: string | null;
  serial: string | null;
  /** The sysfs device directory where there is one (what `usbip list` shows). */
  path: string;
}

export interface HostDeviceSource {
  /** Devices plugged in now, hubs excluded. */
  list(): HostDeviceInfo[];
  /** Detaches the kernel drivers of the device's interfaces and claims them. */
  open(busid: string): Promise<HostUsbDevice>;
  on(ev: 'add' | 'remove', fn: (d: HostDeviceInfo) => void): this;
  off(ev: 'add' | 'remove', fn: (d: HostDeviceInfo) => void): this;
  /** Stop hotplug delivery. Devices already opened stay open until closed. */
  close(): void;
}

export interface HostUsbDevice extends UsbDevice {
  readonly info: HostDeviceInfo;
  /** Cancels what is in flight, releases the interfaces, reattaches the kernel drivers it detached. */
  close(): Promise<void>;
}

/** Log sink (pino's shape, as the server's). */
export interface HostLog {
  debug(o: object, msg: string): void;
  warn(o: object, msg: string): void;
}

export type HostUsbErrorCode = 'USB_UNAVAILABLE' | 'USB_DEVICE_NOT_FOUND' | 'USB_DEVICE_BUSY' | 'PERMISSION_DENIED' | 'USB_OPEN_FAILED';

/** Errors of open() and openLibusbSource(), with the stable codes of tender's error table. */
export class HostUsbError extends Error {
  constructor(
    readonly code: HostUsbErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'HostUsbError';
  }
}
