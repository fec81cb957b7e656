/**
 * IPv4 headers (RFC 791).
 *
 * `Ipv4Packet.check` validates everything the rest of the stack relies on (version, IHL,
 * total length against the buffer, header checksum) and returns a drop reason otherwise, so
 * once a view exists no accessor can read past the packet. Trailing bytes beyond the total
 * length (Ethernet padding of short frames) are cut off by `payload`. Options are skipped,
 * never interpreted: we are an end host for everything we receive (RFC 1122 §3.2.1.8 lets a
 * host ignore options it does not implement).
 */
import { type Ip4, readIp4, writeIp4 } from '../addr.js';
import { checksum, update16, update32 } from './checksum.js';

export const IPV4_HLEN = 20;
export const IPV4_MAX_LEN = 65535;

export const IpProto = { ICMP: 1, TCP: 6, UDP: 17 } as const;

export const IPV4_DF = 0x4000;
export const IPV4_MF = 0x2000;

export type Ipv4DropReason = 'truncated' | 'bad_version' | 'bad_header_len' | 'bad_total_len' | 'bad_checksum';

export class Ipv4Packet {
  /** Writable so a receive path can reuse one view per packet (after `validate`). */
  constructor(public buf: Uint8Array) {}

  static check(buf: Uint8Array, verifyChecksum = true): Ipv4Packet | Ipv4DropReason {
    return Ipv4Packet.validate(buf, verifyChecksum) ?? new Ipv4Packet(buf);
  }

  /** What `check` verifies, without building the view: null when `buf` is a valid packet. */
  static validate(buf: Uint8Array, verifyChecksum = true): Ipv4DropReason | null {
    if (buf.length < IPV4_HLEN) return 'truncated';
    if (buf[0]! >> 4 !== 4) return 'bad_version';
    const hl = (buf[0]! & 0x0f) * 4;
    if (hl < IPV4_HLEN || hl > buf.length) return 'bad_header_len';
    const tl = (buf[2]! << 8) | buf[3]!;
    if (tl < hl) return 'bad_total_len';
    if (tl > buf.length) return 'truncated';
    if (verifyChecksum && checksum(buf, 0, hl) !== 0) return 'bad_checksum';
    return null;
  }

  get headerLen(): number { return (this.buf[0]! & 0x0f) * 4; }
  get tos(): number { return this.buf[1]!; }
  get totalLen(): number { return (this.buf[2]! << 8) | this.buf[3]!; }
  get ident(): number { return (this.buf[4]! << 8) | this.buf[5]!; }
  get flagsFrag(): number { return (this.buf[6]! << 8) | this.buf[7]!; }
  get dontFragment(): boolean { return (this.flagsFrag & IPV4_DF) !== 0; }
  get moreFragments(): boolean { return (this.flagsFrag & IPV4_MF) !== 0; }
  /** Fragment offset in bytes. */
  get fragOffset(): number { return (this.flagsFrag & 0x1fff) * 8; }
  get isFragment(): boolean { return (this.flagsFrag & (IPV4_MF | 0x1fff)) !== 0; }
  get ttl(): number { return this.buf[8]!; }
  get protocol(): number { return this.buf[9]!; }
  get checksum(): number { return (this.buf[10]! << 8) | this.buf[11]!; }
  get src(): Ip4 { return readIp4(this.buf, 12); }
  get dst(): Ip4 { return readIp4(this.buf, 16); }
  /** The header including options. */
  get header(): Uint8Array { return this.buf.subarray(0, this.headerLen); }
  /** Payload up to the total length (padding excluded). */
  get payload(): Uint8Array { return this.buf.subarray(this.headerLen, this.totalLen); }

  /** Rewrite the source address in place, updating the header checksum incrementally (RFC 1624). */
  setSrc(a: Ip4): void {
    const old = this.src;
    writeIp4(this.buf, 12, a);
    this.setChecksum(update32(this.checksum, old, a));
  }

  setDst(a: Ip4): void {
    const old = this.dst;
    writeIp4(this.buf, 16, a);
    this.setChecksum(update32(this.checksum, old, a));
  }

  setTtl(ttl: number): void {
    const oldWord = (this.buf[8]! << 8) | this.buf[9]!;
    this.buf[8] = ttl;
    this.setChecksum(update16(this.checksum, oldWord, (ttl << 8) | this.buf[9]!));
  }

  private setChecksum(c: number): void {
    this.buf[10] = c >> 8;
    this.buf[11] = c & 0xff;
  }
}

export interface Ipv4Repr {
  src: Ip4;
  dst: Ip4;
  protocol: number;
  /** Bytes after the header. */
  payloadLen: number;
  ttl: number;
  ident?: number;
  dontFragment?: boolean;
  moreFragments?: boolean;
  /** In bytes; must be a multiple of 8. */
  fragOffset?: number;
  tos?: number;
}

export function parseIpv4(p: Ipv4Packet): Ipv4Repr {
  return {
    src: p.src,
    dst: p.dst,
    protocol: p.protocol,
    payloadLen: p.totalLen - p.headerLen,
    ttl: p.ttl,
    ident: p.ident,
    dontFragment: p.dontFragment,
    moreFragments: p.moreFragments,
    fragOffset: p.fragOffset,
    tos: p.tos,
  };
}

/** Write a 20-byte header (no options) with its checksum; returns 20. */
export function emitIpv4(r: Ipv4Repr, buf: Uint8Array, off = 0): number {
  const total = IPV4_HLEN + r.payloadLen;
  const ff = (r.dontFragment ? IPV4_DF : 0) | (r.moreFragments ? IPV4_MF : 0) | ((r.fragOffset ?? 0) >> 3);
  const id = r.ident ?? 0;
  buf[off] = 0x45;
  buf[off + 1] = r.tos ?? 0;
  buf[off + 2] = total >> 8;
  buf[off + 3] = total & 0xff;
  buf[off + 4] = id >> 8;
  buf[off + 5] = id & 0xff;
  buf[off + 6] = ff >> 8;
  buf[off + 7] = ff & 0xff;
  buf[off + 8] = r.ttl;
  buf[off + 9] = r.protocol;
  buf[off + 10] = 0;
  buf[off + 11] = 0;
  writeIp4(buf, off + 12, r.src);
  writeIp4(buf, off + 16, r.dst);
  const c = checksum(buf, off, IPV4_HLEN);
  buf[off + 10] = c >> 8;
  buf[off + 11] = c & 0xff;
  return IPV4_HLEN;
}
