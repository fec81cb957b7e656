/**
 * A real device's descriptors, read once when it is opened, so the server can answer the
 * standard GET_DESCRIPTOR requests (control.ts) the way the device itself would. Everything
 * here parses bytes a device sent: bounds-checked, never trusted.
 */
import type { TransferType, UsbDescriptors } from '../device.js';

const DT_DEVICE = 1;
const DT_CONFIG = 2;
const DT_STRING = 3;
const DT_INTERFACE = 4;
const DT_ENDPOINT = 5;
const DT_INTERFACE_ASSOCIATION = 0x0b;
const DT_BOS = 0x0f;
const GET_DESCRIPTOR = 6;

/** A GET_DESCRIPTOR on endpoint 0 (device recipient, IN): resolves with what the device sent. */
export type ControlIn = (wValue: number, wIndex: number, wLength: number) => Promise<Uint8Array>;

export const getDescriptorSetup = (wValue: number, wIndex: number, wLength: number): Uint8Array =>
  Uint8Array.of(0x80, GET_DESCRIPTOR, wValue & 0xff, wValue >> 8, wIndex & 0xff, wIndex >> 8, wLength & 0xff, wLength >> 8);

export interface AltSetting {
  iface: number;
  alt: number;
  endpoints: { address: number; type: TransferType; maxPacketSize: number }[];
}

const TYPES: TransferType[] = ['control', 'isochronous', 'bulk', 'interrupt'];

/** Every interface alternate setting of a configuration descriptor, with its endpoints. */
export function parseAltSettings(cfg: Uint8Array): AltSetting[] {
  const out: AltSetting[] = [];
  let cur: AltSetting | undefined;
  let off = 0;
  while (off + 2 <= cfg.length) {
    const len = cfg[off]!;
    const type = cfg[off + 1]!;
    if (len < 2 || off + len > cfg.length) break;
    if (type === DT_INTERFACE && len >= 9) {
      cur = { iface: cfg[off + 2]!, alt: cfg[off + 3]!, endpoints: [] };
      out.push(cur);
    } else if (type === DT_ENDPOINT && len >= 7 && cur) {
      // wMaxPacketSize bits 10..0 (bits 12..11 are high-bandwidth extra transactions).
      cur.endpoints.push({ address: cfg[off + 2]!, type: TYPES[cfg[off + 3]! & 3]!, maxPacketSize: (cfg[off + 4]! | (cfg[off + 5]! << 8)) & 0x7ff });
    }
    off += len;
  }
  return out;
}

/** The interface numbers of a configuration, each once, in order of appearance. */
export function interfaceNumbers(cfg: Uint8Array): number[] {
  return [...new Set(parseAltSettings(cfg).map((a) => a.iface))];
}

/** String descriptor indexes the descriptors refer to (device, configuration, interface, IAD). */
export function stringIndexes(device: Uint8Array, configs: readonly Uint8Array[]): number[] {
  const s = new Set<number>();
  for (const i of [14, 15, 16]) if (device[i]) s.add(device[i]!);
  for (const cfg of configs) {
    let off = 0;
    while (off + 2 <= cfg.length) {
      const len = cfg[off]!;
      const type = cfg[off + 1]!;
      if (len < 2 || off + len > cfg.length) break;
      if (type === DT_CONFIG && len >= 9 && cfg[off + 6]) s.add(cfg[off + 6]!);
      if (type === DT_INTERFACE && len >= 9 && cfg[off + 8]) s.add(cfg[off + 8]!);
      if (type === DT_INTERFACE_ASSOCIATION && len >= 8 && cfg[off + 7]) s.add(cfg[off + 7]!);
      off += len;
    }
  }
  return [...s].sort((a, b) => a - b);
}

/** A string descriptor's text (UTF-16LE), or null when it is not one. */
export function decodeStringDescriptor(b: Uint8Array): string | null {
  if (b.length < 2 || b[1] !== DT_STRING) return null;
  const len = Math.min(b[0]!, b.length) & ~1;
  if (len < 2) return '';
  return Buffer.from(b.buffer, b.byteOffset + 2, len - 2).toString('utf16le');
}

export function isDeviceDescriptor(b: Uint8Array): boolean {
  return b.length >= 18 && b[0]! >= 18 && b[1] === DT_DEVICE;
}

/**
 * Read the device descriptor, every configuration (header first for wTotalLength, then the
 * whole), and the strings it names in its first language. A string the device refuses is left
 * out (the server then stalls that index, as the device did); a bad device or configuration
 * descriptor fails the open. USB 2.01+ devices also have a BOS set (USB 3 requires it).
 */
export async function readDescriptors(ctrlIn: ControlIn): Promise<UsbDescriptors> {
  const device = await ctrlIn(DT_DEVICE << 8, 0, 18);
  if (!isDeviceDescriptor(device)) throw new Error(`bad device descriptor (${device.length} bytes)`);
  const configurations: Uint8Array[] = [];
  for (let i = 0; i < device[17]!; i++) {
    const head = await ctrlIn((DT_CONFIG << 8) | i, 0, 9);
    if (head.length < 9 || head[1] !== DT_CONFIG) throw new Error(`bad configuration descriptor ${i}`);
    const total = head[2]! | (head[3]! << 8);
    const full = total > 9 ? await ctrlIn((DT_CONFIG << 8) | i, 0, total) : head;
    configurations.push(full);
  }
  const strings = new Map<number, string>();
  const wanted = stringIndexes(device, configurations);
  if (wanted.length) {
    let langid = 0x0409;
    try {
      const langs = await ctrlIn(DT_STRING << 8, 0, 255);
      if (langs.length >= 4 && langs[1] === DT_STRING) langid = langs[2]! | (langs[3]! << 8);
    } catch {
      // no language list: try US English, as the kernel does (usb_get_langid)
    }
    for (const i of wanted) {
      try {
        const s = decodeStringDescriptor(await ctrlIn((DT_STRING << 8) | i, langid, 255));
        if (s !== null) strings.set(i, s);
      } catch {
        // refused: leave it out
      }
    }
  }
  const bos = (device[2]! | (device[3]! << 8)) >= 0x0201 ? await readBos(ctrlIn) : undefined;
  return bos ? { device, configurations, strings, bos } : { device, configurations, strings };
}

/** The BOS set (USB 3.2 §9.6.2): 5-byte header for wTotalLength, then the whole. Absent when refused or malformed. */
async function readBos(ctrlIn: ControlIn): Promise<Uint8Array | undefined> {
  try {
    const head = await ctrlIn(DT_BOS << 8, 0, 5);
    if (head.length < 5 || head[1] !== DT_BOS) return undefined;
    const total = head[2]! | (head[3]! << 8);
    if (total < 5) return undefined;
    const full = total > 5 ? await ctrlIn(DT_BOS << 8, 0, total) : head;
    return full.length >= 5 && full[1] === DT_BOS ? full : undefined;
  } catch {
    return undefined;
  }
}
