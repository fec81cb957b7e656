/**
 * What the server needs from a USB device, virtual or real. The attached phase (attached.ts)
 * answers standard control requests from `descriptors` and translates SET_CONFIGURATION,
 * SET_INTERFACE and CLEAR_FEATURE(ENDPOINT_HALT) into the hooks below; everything else
 * (class/vendor control requests, bulk, interrupt, isochronous) goes to `submit`.
 */
import type { IsoPacketDescriptor, UsbDeviceRecordRepr, UsbInterfaceRepr } from './protocol.js';
import { UsbSpeed } from './protocol.js';

export type TransferType = 'control' | 'isochronous' | 'bulk' | 'interrupt';

export interface Urb {
  /** Endpoint address: number | 0x80 for IN. Endpoint 0 control is 0x00/0x80 by direction. */
  endpoint: number;
  type: TransferType;
  /** Control only: the 8 raw setup bytes. */
  setup?: Uint8Array;
  /** OUT: the data to send. IN: empty. */
  data: Uint8Array;
  /** Requested length (transfer_buffer_length). */
  length: number;
  transferFlags: number;
  /** Isochronous only. */
  iso?: IsoPacketDescriptor[];
  startFrame?: number;
  interval?: number;
}

export interface UrbResult {
  /** 0 or a negative Linux errno (Errno in protocol.ts): -EPIPE for a stall. */
  status: number;
  /** IN: the data received (its length is the actual length). OUT: omitted. */
  data?: Uint8Array;
  /** OUT: bytes accepted; IN: defaults to data.length. */
  actualLength?: number;
  iso?: IsoPacketDescriptor[];
  startFrame?: number;
  errorCount?: number;
}

export interface UsbDescriptors {
  /** The 18-byte device descriptor. */
  device: Uint8Array;
  /** Full configuration descriptors (config + interfaces + endpoints), index = config index. */
  configurations: Uint8Array[];
  /** String descriptors by index (index 0 = language ids is generated). */
  strings: ReadonlyMap<number, string>;
  /** The BOS descriptor set (bcdUSB >= 2.01 devices; SuperSpeed needs it), as read from a real device. */
  bos?: Uint8Array;
}

export interface UsbDevice {
  readonly busid: string;
  readonly busnum: number;
  readonly devnum: number;
  readonly speed: UsbSpeed;
  /** A sysfs-like path shown by `usbip list -r`. */
  readonly path: string;
  readonly descriptors: UsbDescriptors;
  /** Start one transfer. Abort `signal` to cancel it (UNLINK); the promise then settles (any value). */
  submit(urb: Urb, signal: AbortSignal): Promise<UrbResult>;
  setConfiguration(value: number): Promise<void> | void;
  setInterface(iface: number, alt: number): Promise<void> | void;
  /** CLEAR_FEATURE(ENDPOINT_HALT) for `endpoint` (address incl. 0x80). */
  clearHalt(endpoint: number): Promise<void> | void;
  isHalted(endpoint: number): boolean;
  /** The client attached/detached (connection closed): reset per-connection state. */
  attached?(): void;
  detached?(): void;
}

// ---------------------------------------------------------------------------------------------
// Descriptor helpers (USB 2.0 chapter 9)

export interface EndpointInfo {
  address: number;
  type: TransferType;
  maxPacketSize: number;
}

const TYPES: TransferType[] = ['control', 'isochronous', 'bulk', 'interrupt'];

/** Walk a configuration descriptor: interfaces (alt 0) and endpoints. Bounds-checked. */
export function parseConfiguration(cfg: Uint8Array): { value: number; attributes: number; interfaces: UsbInterfaceRepr[]; endpoints: EndpointInfo[] } {
  const interfaces: UsbInterfaceRepr[] = [];
  const endpoints: EndpointInfo[] = [];
  let off = 0;
  while (off + 2 <= cfg.length) {
    const len = cfg[off]!;
    const type = cfg[off + 1]!;
    if (len < 2 || off + len > cfg.length) break;
    if (type === 4 && len >= 9 && cfg[off + 3] === 0) {
      interfaces.push({ bInterfaceClass: cfg[off + 5]!, bInterfaceSubClass: cfg[off + 6]!, bInterfaceProtocol: cfg[off + 7]! });
    } else if (type === 5 && len >= 7) {
      endpoints.push({ address: cfg[off + 2]!, type: TYPES[cfg[off + 3]! & 3]!, maxPacketSize: (cfg[off + 4]! | (cfg[off + 5]! << 8)) & 0x7ff });
    }
    off += len;
  }
  return { value: cfg[5] ?? 1, attributes: cfg[7] ?? 0x80, interfaces, endpoints };
}

/**
 * The record OP_REP_DEVLIST / OP_REP_IMPORT carry for `dev`. bConfigurationValue is what sysfs
 * shows for a configured device (usbipd reads it there): the first configuration's value.
 */
export function deviceRecord(dev: UsbDevice, configurationValue = dev.descriptors.configurations[0]?.[5] ?? 0): UsbDeviceRecordRepr & { interfaces: UsbInterfaceRepr[] } {
  const d = dev.descriptors.device;
  const cfg = dev.descriptors.configurations[0];
  const parsed = cfg ? parseConfiguration(cfg) : { interfaces: [] as UsbInterfaceRepr[] };
  return {
    path: dev.path,
    busid: dev.busid,
    busnum: dev.busnum,
    devnum: dev.devnum,
    speed: dev.speed,
    idVendor: d[8]! | (d[9]! << 8),
    idProduct: d[10]! | (d[11]! << 8),
    bcdDevice: d[12]! | (d[13]! << 8),
    bDeviceClass: d[4]!,
    bDeviceSubClass: d[5]!,
    bDeviceProtocol: d[6]!,
    bConfigurationValue: configurationValue,
    bNumConfigurations: d[17]!,
    bNumInterfaces: parsed.interfaces.length,
    interfaces: parsed.interfaces,
  };
}

/** A string descriptor (UTF-16LE), or the language-id list for index 0 (en-US). */
export function stringDescriptor(s: string | undefined, index: number): Uint8Array | undefined {
  if (index === 0) return Uint8Array.of(4, 3, 0x09, 0x04);
  if (s === undefined) return undefined;
  const body = Buffer.from(s.slice(0, 126), 'utf16le');
  const b = new Uint8Array(2 + body.length);
  b[0] = b.length;
  b[1] = 3;
  b.set(body, 2);
  return b;
}
