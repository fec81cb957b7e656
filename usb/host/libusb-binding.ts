/**
 * The slice of the `usb` package (v2, libusb) this backend uses, as an interface: the real one
 * wraps the package, tests pass a fake. Kept to the package's own low-level calls (the
 * `__`-prefixed device methods and `Transfer`), which map one to one onto libusb functions;
 * the package's higher-level Endpoint/Interface classes add polling and state we do not want.
 */
import { createRequire } from 'node:module';
import { HostUsbError } from './source.js';

/** LibUSBException: `errno` is a libusb_error (< 0) or, for a transfer, its libusb_transfer_status (> 0). */
export type LibusbErr = { errno?: number; message?: string } | undefined;
type Cb = (err?: LibusbErr) => void;

export interface LibusbDevice {
  busNumber: number;
  deviceAddress: number;
  portNumbers?: number[];
  deviceDescriptor: { idVendor: number; idProduct: number; bDeviceClass: number };
  __open(): void;
  __close(): void;
  /** libusb_get_active_config_descriptor; throws when the device is unconfigured. */
  __getConfigDescriptor(): { bConfigurationValue: number };
  __claimInterface(iface: number): void;
  __releaseInterface(iface: number, cb: Cb): void;
  __isKernelDriverActive(iface: number): boolean;
  __detachKernelDriver(iface: number): void;
  __attachKernelDriver(iface: number): void;
  __setConfiguration(value: number, cb: Cb): void;
  __setInterface(iface: number, alt: number, cb: Cb): void;
  __clearHalt(endpoint: number, cb: Cb): void;
}

export interface LibusbTransfer {
  /** libusb_submit_transfer; throws a LibUSBException (errno < 0) when libusb refuses it. */
  submit(buf: Buffer): unknown;
  /** libusb_cancel_transfer; false when it is no longer pending. */
  cancel(): boolean;
}

/** libusb_transfer_type. */
export const XferType = { control: 0, isochronous: 1, bulk: 2, interrupt: 3 } as const;

export interface LibusbBinding {
  getDeviceList(): LibusbDevice[];
  /** A transfer on `endpoint` of an open device, no timeout; `done` runs once per submit. */
  transfer(dev: LibusbDevice, endpoint: number, type: number, done: (err: LibusbErr, buf: Buffer, actual: number) => void): LibusbTransfer;
  /** Start hotplug delivery; returns the function that stops it. */
  hotplug(attach: (d: LibusbDevice) => void, detach: (d: LibusbDevice) => void): () => void;
}

interface UsbV2 {
  usb: {
    INIT_ERROR: number;
    on(ev: 'attach' | 'detach', fn: (d: LibusbDevice) => void): void;
    off(ev: 'attach' | 'detach', fn: (d: LibusbDevice) => void): void;
  };
  getDeviceList(): LibusbDevice[];
  Transfer: new (dev: LibusbDevice, ep: number, type: number, timeout: number, cb: (err: LibusbErr, buf: Buffer, actual: number) => void) => LibusbTransfer;
}

/** Load `usb` v2 (its prebuilt libusb); USB_UNAVAILABLE when it cannot load or libusb_init failed. */
export function loadLibusbBinding(): LibusbBinding {
  let m: UsbV2;
  try {
    m = createRequire(import.meta.url)('usb') as UsbV2;
  } catch (e) {
    throw new HostUsbError('USB_UNAVAILABLE', `the usb package (libusb) cannot be loaded: ${(e as Error).message}`, { cause: e });
  }
  if (m.usb.INIT_ERROR) throw new HostUsbError('USB_UNAVAILABLE', `libusb could not start (libusb_init: ${m.usb.INIT_ERROR})`);
  return {
    getDeviceList: () => m.getDeviceList(),
    transfer: (dev, ep, type, done) => new m.Transfer(dev, ep, type, 0, done),
    hotplug(attach, detach) {
      m.usb.on('attach', attach);
      m.usb.on('detach', detach);
      return () => {
        m.usb.off('attach', attach);
        m.usb.off('detach', detach);
      };
    },
  };
}
