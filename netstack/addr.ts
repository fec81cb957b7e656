/**
 * Address helpers. Inside the stack an IPv4 address is a uint32 number (host order, `>>> 0`)
 * and a MAC address is a 6-byte Uint8Array; strings exist only at the edges (config, API, logs).
 */
import { Address4 } from 'ip-address';

export type Ip4 = number;
export type Mac = Uint8Array;

export const BROADCAST_MAC: Mac = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
export const ZERO_MAC: Mac = new Uint8Array(6);
export const IP4_BROADCAST: Ip4 = 0xffffffff;
export const IP4_ANY: Ip4 = 0;

export function ip4(s: string): Ip4 {
  if (!Address4.isValid(s) || s.includes('/')) throw new RangeError(`not an IPv4 address: ${s}`);
  const parts = s.split('.').map(Number);
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function ip4str(a: Ip4): string {
  return `${a >>> 24}.${(a >>> 16) & 255}.${(a >>> 8) & 255}.${a & 255}`;
}

export function readIp4(b: Uint8Array, off: number): Ip4 {
  return ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
}

export function writeIp4(b: Uint8Array, off: number, a: Ip4): void {
  b[off] = a >>> 24;
  b[off + 1] = (a >>> 16) & 255;
  b[off + 2] = (a >>> 8) & 255;
  b[off + 3] = a & 255;
}

export interface Subnet {
  /** Network address. */
  network: Ip4;
  prefix: number;
  mask: Ip4;
}

export function parseSubnet(s: string): Subnet {
  const m = /^(\d+\.\d+\.\d+\.\d+)\/(\d{1,2})$/.exec(s);
  if (!m) throw new RangeError(`not an IPv4 subnet (a.b.c.d/len): ${s}`);
  const prefix = Number(m[2]);
  if (prefix < 1 || prefix > 30) throw new RangeError(`subnet prefix must be 1..30: ${s}`);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return { network: (ip4(m[1]!) & mask) >>> 0, prefix, mask };
}

export function inSubnet(sn: Subnet, a: Ip4): boolean {
  return ((a & sn.mask) >>> 0) === sn.network;
}

export function subnetBroadcast(sn: Subnet): Ip4 {
  return (sn.network | ~sn.mask) >>> 0;
}

/** The n-th host address of a subnet (.1 is n=1). Negative n counts back from broadcast (-1 = .254 in a /24). */
export function subnetHost(sn: Subnet, n: number): Ip4 {
  return n >= 0 ? (sn.network + n) >>> 0 : (subnetBroadcast(sn) + n) >>> 0;
}

export function subnetStr(sn: Subnet): string {
  return `${ip4str(sn.network)}/${sn.prefix}`;
}

export function isMulticast4(a: Ip4): boolean {
  return a >>> 28 === 0xe;
}

export function mac(s: string): Mac {
  const m = /^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$/i.exec(s);
  if (!m) throw new RangeError(`not a MAC address: ${s}`);
  return new Uint8Array(m.slice(1).map((h) => parseInt(h, 16)));
}

export function macStr(m: Uint8Array): string {
  let s = '';
  for (let i = 0; i < 6; i++) s += (i ? ':' : '') + m[i]!.toString(16).padStart(2, '0');
  return s;
}

export function macEq(a: Uint8Array, b: Uint8Array, bOff = 0): boolean {
  return (
    a[0] === b[bOff] && a[1] === b[bOff + 1] && a[2] === b[bOff + 2] &&
    a[3] === b[bOff + 3] && a[4] === b[bOff + 4] && a[5] === b[bOff + 5]
  );
}

/** Key for maps: the 48-bit MAC as a number. */
export function macKey(b: Uint8Array, off = 0): number {
  return (b[off]! * 0x10000000000) + (b[off + 1]! * 0x100000000) +
    ((b[off + 2]! << 24) >>> 0) + (b[off + 3]! << 16) + (b[off + 4]! << 8) + b[off + 5]!;
}

export function isGroupMac(b: Uint8Array, off = 0): boolean {
  return (b[off]! & 1) === 1;
}

/** A random locally administered unicast MAC. */
export function randomMac(): Mac {
  const m = new Uint8Array(6);
  crypto.getRandomValues(m);
  m[0] = (m[0]! & 0xfe) | 0x02;
  return m;
}
