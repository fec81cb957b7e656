/**
 * What the daemon's USB manager keeps in $TENDER_HOME/usb.json, how older versions of the file
 * are carried forward, and how a user's DEVICE / MATCH arguments are read.
 *
 * Version 1 (session 1) knew virtual devices and `attachments: { id: machine }`. Version 2 adds
 * host devices (an attachment or binding names a host device by its busid and remembers its
 * VID:PID, so a different device plugged into the same port is not taken for it), bindings
 * (devices shared with `usb serve` clients) and auto-attach rules.
 */
import { parseBusid } from '../../usb/host/busid.js';
import { TenderError } from '../errors.js';

export type VirtualConfig = {
  id: string;
  name?: string;
  devnum: number;
} & ({ kind: 'storage'; image: string; readOnly: boolean } | { kind: 'serial'; socket: string });

/** A device given to a machine. `device`: a virtual id ("v1") or a host busid ("1-2"). */
export interface Attachment {
  device: string;
  machine: string;
  vidpid: string;
}

/** A device shared with `usb serve` clients; kept while the device is unplugged. */
export interface Binding {
  device: string;
  vidpid: string;
}

/** An auto-attach rule: a device matching `match` goes to `machine` whenever both are there. */
export interface UsbPolicy {
  id: string;
  machine: string;
  kind: 'vidpid' | 'busid';
  /** "vvvv:pppp" (lower-case hex) or a busid. */
  match: string;
  createdAt: string;
}

export interface UsbState {
  version: 2;
  virtual: VirtualConfig[];
  attachments: Attachment[];
  bindings: Binding[];
  policies: UsbPolicy[];
}

export const USB_STATE_VERSION = 2;

export function emptyUsbState(): UsbState {
  return { version: 2, virtual: [], attachments: [], bindings: [], policies: [] };
}

/** VID:PID of each virtual kind (usb/devices: the Linux gadgets' ids, driven by stock class drivers). */
export const VIRTUAL_VIDPID = { storage: '0525:a4a5', serial: '0525:a4a7' } as const;

/**
 * Bring a parsed usb.json up to the current version. A file from a newer tender is refused
 * rather than rewritten: saving it in our shape would drop what we do not understand.
 */
export function migrateUsbState(raw: unknown): UsbState {
  if (raw === null || raw === undefined) return emptyUsbState();
  const o = raw as { version?: unknown };
  if (o.version === 2) {
    const s = raw as Partial<UsbState>;
    return { version: 2, virtual: s.virtual ?? [], attachments: s.attachments ?? [], bindings: s.bindings ?? [], policies: s.policies ?? [] };
  }
  if (o.version === 1) {
    const v1 = raw as { virtual?: VirtualConfig[]; attachments?: Record<string, string> };
    const virtual = v1.virtual ?? [];
    const attachments: Attachment[] = [];
    for (const [device, machine] of Object.entries(v1.attachments ?? {})) {
      const v = virtual.find((x) => x.id === device);
      // Version 1 only had virtual devices; an attachment to one that no longer exists meant nothing.
      if (v) attachments.push({ device, machine, vidpid: VIRTUAL_VIDPID[v.kind] });
    }
    return { version: 2, virtual, attachments, bindings: [], policies: [] };
  }
  throw new TenderError('INTERNAL', `usb.json has version ${JSON.stringify(o.version)}, which this tender does not know (newer tender?); not touching it`);
}

const VIDPID_RE = /^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$/;

export function isVidPid(s: string): boolean {
  return VIDPID_RE.test(s);
}

export function normalizeVidPid(s: string): string {
  return s.toLowerCase();
}

/** Linux busids: bus number, then the port path ("1-2", "3-1.4.2"); virtual devices are "99-N". */
export function isBusid(s: string): boolean {
  return parseBusid(s) !== null;
}

export function vidpidOf(vendorId: number, productId: number): string {
  return `${vendorId.toString(16).padStart(4, '0')}:${productId.toString(16).padStart(4, '0')}`;
}

/** Read the MATCH of `usb policy add`: a VID:PID or a busid. */
export function parseMatch(s: string): { kind: 'vidpid' | 'busid'; match: string } {
  if (isVidPid(s)) return { kind: 'vidpid', match: normalizeVidPid(s) };
  if (isBusid(s)) return { kind: 'busid', match: s };
  throw new TenderError('BAD_ARGUMENT', `"${s}" is neither a VID:PID (e.g. 0483:df11) nor a busid (e.g. 1-2, 3-1.4)`);
}

/** An ADDR:PORT for `usb serve` (`--listen`, or `usb.serve` in config.json); PORT alone means 127.0.0.1. */
export function parseListen(s: string, what = '--listen'): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:]+)):(\d{1,5})$/.exec(s) ?? /^()()(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new TenderError('BAD_ARGUMENT', `${what} must be ADDR:PORT (got ${JSON.stringify(s)})`);
  return { host: m[1] || m[2] || '127.0.0.1', port };
}

/** A failed listen() as a coded error. */
export function listenError(e: NodeJS.ErrnoException, what: string): Error {
  if (e.code === 'EADDRINUSE') return new TenderError('ADDRESS_IN_USE', `${what}: address in use`);
  if (e.code === 'EADDRNOTAVAIL') return new TenderError('ADDRESS_NOT_AVAILABLE', `${what}: not an address of this host`);
  if (e.code === 'EACCES') return new TenderError('PERMISSION_DENIED', `${what}: permission denied`);
  return e;
}
