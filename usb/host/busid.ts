/**
 * Bus ids as Linux names USB devices in sysfs (drivers/usb/core/usb.c usb_alloc_dev): the bus
 * number, a dash, then the port chain from the root hub joined by dots ("1-2", "3-1.4.2").
 * usbip and vhci-hcd know devices by this name, so tender uses it on every OS libusb reports
 * port numbers on.
 */

/** libusb_get_port_numbers: "as per the USB 3.0 specs, the current maximum limit for the depth is 7". */
export const MAX_PORT_DEPTH = 7;

export function busidOf(busnum: number, ports: readonly number[] | undefined): string | null {
  if (!Number.isInteger(busnum) || busnum < 1 || busnum > 255) return null;
  if (!ports || ports.length === 0 || ports.length > MAX_PORT_DEPTH) return null; // a root hub, or no port numbers on this OS
  if (!ports.every((p) => Number.isInteger(p) && p >= 1 && p <= 255)) return null;
  return `${busnum}-${ports.join('.')}`;
}

/** The inverse of busidOf, for names that arrive from users and clients; null when malformed. */
export function parseBusid(s: string): { busnum: number; ports: number[] } | null {
  const m = /^([1-9]\d{0,2})-([1-9]\d{0,2}(?:\.[1-9]\d{0,2})*)$/.exec(s);
  if (!m) return null;
  const busnum = Number(m[1]);
  const ports = m[2]!.split('.').map(Number);
  return busidOf(busnum, ports) === s ? { busnum, ports } : null;
}
