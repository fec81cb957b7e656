/**
 * libusb's outcomes as the Linux errno a kernel USB/IP stub would have put in the URB status
 * (Documentation/driver-api/usb/error-codes.rst), so a client sees the same codes whether
 * the device is served by usbip-host or by tender on any OS.
 *
 * `usb` v2 reports two kinds of numbers through LibUSBException.errno: a failed transfer
 * carries its libusb_transfer_status (positive), a failed call its libusb_error (negative).
 */

/** Linux errno values not in protocol.ts's Errno table. */
export const LinuxErrno = {
  EINTR: -4,
  EIO: -5,
  ENXIO: -6, // error-codes.rst: "host controller driver does not support queuing of this type of urb"
  ENOMEM: -12,
  EACCES: -13,
  EBUSY: -16,
  ETIMEDOUT: -110,
} as const;

/** enum libusb_transfer_status (libusb.h). */
export const TransferStatus = { COMPLETED: 0, ERROR: 1, TIMED_OUT: 2, CANCELLED: 3, STALL: 4, NO_DEVICE: 5, OVERFLOW: 6 } as const;

/** enum libusb_error (libusb.h). */
export const LibusbError = {
  IO: -1,
  INVALID_PARAM: -2,
  ACCESS: -3,
  NO_DEVICE: -4,
  NOT_FOUND: -5,
  BUSY: -6,
  TIMEOUT: -7,
  OVERFLOW: -8,
  PIPE: -9,
  INTERRUPTED: -10,
  NO_MEM: -11,
  NOT_SUPPORTED: -12,
  OTHER: -99,
} as const;

/** The URB status for a transfer that completed with libusb status `s`. */
export function errnoFromTransferStatus(s: number): number {
  switch (s) {
    case TransferStatus.COMPLETED:
      return 0;
    case TransferStatus.STALL:
      return -32; // EPIPE: the endpoint halted, or a control request was refused (protocol stall)
    case TransferStatus.CANCELLED:
      return -104; // ECONNRESET: what usb_unlink_urb gives back
    case TransferStatus.NO_DEVICE:
      return -108; // ESHUTDOWN: URBs in flight when the device went away (usb_hcd_flush_endpoint)
    case TransferStatus.OVERFLOW:
      return -75; // EOVERFLOW: babble
    case TransferStatus.TIMED_OUT:
      return LinuxErrno.ETIMEDOUT; // never set by this backend (URBs have no timeout), kept for completeness
    default:
      return -71; // EPROTO: libusb folds the kernel's EPROTO/EILSEQ/ECOMM/ENOSR into TRANSFER_ERROR
  }
}

/** The URB status for a libusb call that failed with `e` (submitting, mostly). */
export function errnoFromLibusbError(e: number): number {
  switch (e) {
    case LibusbError.NO_DEVICE:
      return -19; // ENODEV: usb_submit_urb on a device that is gone
    case LibusbError.PIPE:
      return -32;
    case LibusbError.OVERFLOW:
      return -75;
    case LibusbError.INVALID_PARAM:
      return -22;
    case LibusbError.NOT_FOUND:
      return -2; // ENOENT: "specified interface or endpoint does not exist or is not enabled"
    case LibusbError.BUSY:
      return LinuxErrno.EBUSY;
    case LibusbError.TIMEOUT:
      return LinuxErrno.ETIMEDOUT;
    case LibusbError.INTERRUPTED:
      return LinuxErrno.EINTR;
    case LibusbError.NO_MEM:
      return LinuxErrno.ENOMEM;
    case LibusbError.ACCESS:
      return LinuxErrno.EACCES;
    case LibusbError.NOT_SUPPORTED:
      return LinuxErrno.ENXIO;
    case LibusbError.IO:
      return LinuxErrno.EIO;
    default:
      return -71;
  }
}

/** Either kind, from whatever `usb` threw or passed to a callback. */
export function errnoFromLibusb(err: unknown): number {
  const n = (err as { errno?: unknown } | null)?.errno;
  if (typeof n !== 'number' || !Number.isInteger(n)) return -71;
  return n > 0 ? errnoFromTransferStatus(n) : errnoFromLibusbError(n);
}
