/**
 * ICMPv4 (RFC 792): echo request/reply and the error messages we generate
 * (destination unreachable, time exceeded). Errors quote the offending IP header plus the
 * first 8 bytes of its payload, the minimum RFC 792 requires and all a host needs to match
 * the error to its socket (RFC 1122 §3.2.2).
 */
import { checksum } from './checksum.js';

export const ICMP_HLEN = 8;

export const IcmpType = {
  EchoReply: 0,
  DestUnreachable: 3,
  Redirect: 5,
  EchoRequest: 8,
  TimeExceeded: 11,
  ParameterProblem: 12,
} as const;

export const UnreachCode = {
  Net: 0,
  Host: 1,
  Protocol: 2,
  Port: 3,
  FragNeeded: 4,
  AdminProhibited: 13,
} as const;

export type IcmpDropReason = 'truncated' | 'bad_checksum';

export class IcmpPacket {
  constructor(readonly buf: Uint8Array) {}

  static check(buf: Uint8Array): IcmpPacket | IcmpDropReason {
    if (buf.length < ICMP_HLEN) return 'truncated';
    if (checksum(buf, 0, buf.length) !== 0) return 'bad_checksum';
    return new IcmpPacket(buf);
  }

  get type(): number { return this.buf[0]!; }
  get code(): number { return this.buf[1]!; }
  get checksum(): number { return (this.buf[2]! << 8) | this.buf[3]!; }
  /** Echo identifier (echo request/reply only). */
  get ident(): number { return (this.buf[4]! << 8) | this.buf[5]!; }
  get seq(): number { return (this.buf[6]! << 8) | this.buf[7]!; }
  /** Next-hop MTU of a "fragmentation needed" error (RFC 1191). */
  get nextHopMtu(): number { return (this.buf[6]! << 8) | this.buf[7]!; }
  get isError(): boolean {
    const t = this.type;
    return t === IcmpType.DestUnreachable || t === IcmpType.TimeExceeded || t === IcmpType.ParameterProblem;
  }
  /** Echo data, or the quoted datagram of an error. */
  get payload(): Uint8Array { return this.buf.subarray(ICMP_HLEN); }
}

export type IcmpRepr =
  | { type: typeof IcmpType.EchoRequest | typeof IcmpType.EchoReply; ident: number; seq: number; data: Uint8Array }
  | { type: typeof IcmpType.DestUnreachable; code: number; nextHopMtu?: number; quote: Uint8Array }
  | { type: typeof IcmpType.TimeExceeded; code: number; quote: Uint8Array };

export function parseIcmp(p: IcmpPacket): IcmpRepr | null {
  switch (p.type) {
    case IcmpType.EchoRequest:
    case IcmpType.EchoReply:
      if (p.code !== 0) return null;
      return { type: p.type, ident: p.ident, seq: p.seq, data: p.payload };
    case IcmpType.DestUnreachable:
      return { type: p.type, code: p.code, nextHopMtu: p.code === UnreachCode.FragNeeded ? p.nextHopMtu : undefined, quote: p.payload };
    case IcmpType.TimeExceeded:
      return { type: p.type, code: p.code, quote: p.payload };
    default:
      return null;
  }
}

export function icmpLen(r: IcmpRepr): number {
  return ICMP_HLEN + ('data' in r ? r.data.length : r.quote.length);
}

export function emitIcmp(r: IcmpRepr, buf: Uint8Array, off = 0): number {
  buf[off] = r.type;
  buf[off + 2] = 0;
  buf[off + 3] = 0;
  let body: Uint8Array;
  if ('data' in r) {
    buf[off + 1] = 0;
    buf[off + 4] = r.ident >> 8;
    buf[off + 5] = r.ident & 0xff;
    buf[off + 6] = r.seq >> 8;
    buf[off + 7] = r.seq & 0xff;
    body = r.data;
  } else {
    buf[off + 1] = r.code;
    const mtu = r.type === IcmpType.DestUnreachable ? (r.nextHopMtu ?? 0) : 0;
    buf[off + 4] = 0;
    buf[off + 5] = 0;
    buf[off + 6] = mtu >> 8;
    buf[off + 7] = mtu & 0xff;
    body = r.quote;
  }
  // `body` may already sit at off+8 (an echo reply built in place): skip the copy then.
  if (!(body.buffer === buf.buffer && body.byteOffset === buf.byteOffset + off + ICMP_HLEN)) {
    buf.set(body, off + ICMP_HLEN);
  }
  const len = ICMP_HLEN + body.length;
  const c = checksum(buf, off, len);
  buf[off + 2] = c >> 8;
  buf[off + 3] = c & 0xff;
  return len;
}

/** The quote for an ICMP error: the IP header and the first 8 payload bytes (RFC 792). */
export function icmpQuote(ipPacket: Uint8Array, headerLen: number): Uint8Array {
  return ipPacket.subarray(0, Math.min(ipPacket.length, headerLen + 8));
}
