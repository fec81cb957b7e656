/**
 * ARP for IPv4 over Ethernet (RFC 826). Only htype 1 / ptype 0x0800 / hlen 6 / plen 4 is
 * meaningful to us; anything else is a well-formed packet we do not speak.
 */
import { type Ip4, type Mac, readIp4, writeIp4 } from '../addr.js';

export const ARP_LEN = 28;
export const ArpOp = { Request: 1, Reply: 2 } as const;

export class ArpPacket {
  constructor(readonly buf: Uint8Array) {}

  /** Null when the bytes are too short to hold the Ethernet/IPv4 form. */
  static check(buf: Uint8Array): ArpPacket | null {
    return buf.length >= ARP_LEN ? new ArpPacket(buf) : null;
  }

  get htype(): number { return (this.buf[0]! << 8) | this.buf[1]!; }
  get ptype(): number { return (this.buf[2]! << 8) | this.buf[3]!; }
  get hlen(): number { return this.buf[4]!; }
  get plen(): number { return this.buf[5]!; }
  get op(): number { return (this.buf[6]! << 8) | this.buf[7]!; }
  get sha(): Uint8Array { return this.buf.subarray(8, 14); }
  get spa(): Ip4 { return readIp4(this.buf, 14); }
  get tha(): Uint8Array { return this.buf.subarray(18, 24); }
  get tpa(): Ip4 { return readIp4(this.buf, 24); }

  /** Ethernet + IPv4 flavour, the only one we answer. */
  get isEthernetIpv4(): boolean {
    return this.htype === 1 && this.ptype === 0x0800 && this.hlen === 6 && this.plen === 4;
  }
}

export interface ArpRepr {
  op: number;
  sha: Mac;
  spa: Ip4;
  tha: Mac;
  tpa: Ip4;
}

/** Null for a packet that is not Ethernet/IPv4 ARP or has an unknown operation. */
export function parseArp(p: ArpPacket): ArpRepr | null {
  if (!p.isEthernetIpv4) return null;
  const op = p.op;
  if (op !== ArpOp.Request && op !== ArpOp.Reply) return null;
  return { op, sha: p.sha.slice(), spa: p.spa, tha: p.tha.slice(), tpa: p.tpa };
}

export function emitArp(r: ArpRepr, buf: Uint8Array, off = 0): number {
  buf[off] = 0; buf[off + 1] = 1;
  buf[off + 2] = 0x08; buf[off + 3] = 0x00;
  buf[off + 4] = 6; buf[off + 5] = 4;
  buf[off + 6] = 0; buf[off + 7] = r.op;
  buf.set(r.sha.subarray(0, 6), off + 8);
  writeIp4(buf, off + 14, r.spa);
  buf.set(r.tha.subarray(0, 6), off + 18);
  writeIp4(buf, off + 24, r.tpa);
  return ARP_LEN;
}
