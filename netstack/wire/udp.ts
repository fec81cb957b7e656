/**
 * UDP (RFC 768). A zero checksum means "none" for IPv4; a computed checksum of zero is sent
 * as 0xffff.
 */
import type { Ip4 } from '../addr.js';
import { finish, pseudoSum4, sum16 } from './checksum.js';
import { IpProto } from './ipv4.js';

export const UDP_HLEN = 8;

export type UdpDropReason = 'truncated' | 'bad_length' | 'bad_checksum';

export class UdpPacket {
  constructor(readonly buf: Uint8Array) {}

  /** Validate against the IPv4 payload `buf` (length field within it, checksum if present). */
  static check(buf: Uint8Array, src: Ip4, dst: Ip4, verifyChecksum = true): UdpPacket | UdpDropReason {
    if (buf.length < UDP_HLEN) return 'truncated';
    const len = (buf[4]! << 8) | buf[5]!;
    if (len < UDP_HLEN || len > buf.length) return 'bad_length';
    const p = new UdpPacket(buf);
    if (verifyChecksum && p.checksum !== 0) {
      const s = sum16(buf, 0, len, pseudoSum4(src, dst, IpProto.UDP, len));
      if (finish(s) !== 0) return 'bad_checksum';
    }
    return p;
  }

  get srcPort(): number { return (this.buf[0]! << 8) | this.buf[1]!; }
  get dstPort(): number { return (this.buf[2]! << 8) | this.buf[3]!; }
  get length(): number { return (this.buf[4]! << 8) | this.buf[5]!; }
  get checksum(): number { return (this.buf[6]! << 8) | this.buf[7]!; }
  get payload(): Uint8Array { return this.buf.subarray(UDP_HLEN, this.length); }
}

export interface UdpRepr {
  srcPort: number;
  dstPort: number;
}

/**
 * Write header + checksum for a payload that already sits at `off + 8` (so no copy is made);
 * returns the UDP length.
 */
export function emitUdpHeader(r: UdpRepr, payloadLen: number, buf: Uint8Array, off: number, src: Ip4, dst: Ip4): number {
  const len = UDP_HLEN + payloadLen;
  buf[off] = r.srcPort >> 8;
  buf[off + 1] = r.srcPort & 0xff;
  buf[off + 2] = r.dstPort >> 8;
  buf[off + 3] = r.dstPort & 0xff;
  buf[off + 4] = len >> 8;
  buf[off + 5] = len & 0xff;
  buf[off + 6] = 0;
  buf[off + 7] = 0;
  let c = finish(sum16(buf, off, len, pseudoSum4(src, dst, IpProto.UDP, len)));
  if (c === 0) c = 0xffff;
  buf[off + 6] = c >> 8;
  buf[off + 7] = c & 0xff;
  return len;
}

export function emitUdp(r: UdpRepr, payload: Uint8Array, buf: Uint8Array, off: number, src: Ip4, dst: Ip4): number {
  buf.set(payload, off + UDP_HLEN);
  return emitUdpHeader(r, payload.length, buf, off, src, dst);
}
