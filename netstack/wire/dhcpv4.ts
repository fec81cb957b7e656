/**
 * DHCPv4 messages (RFC 2131) and the options we speak (RFC 2132, RFC 3397 search list,
 * RFC 3396 long options, RFC 2131 §4.1 option overload).
 *
 * Two faces, as for every format here:
 * - `DhcpPacket`: a view over the BOOTP fixed part (offsets of RFC 2131 Figure 1). `check`
 *   guarantees the fixed part and the magic cookie are inside the buffer, so no getter can
 *   read out of bounds.
 * - `DhcpRepr`: the meaningful fields, with `parseDhcp` / `emitDhcp` / `dhcpEmittedLength`.
 *
 * DHCP is not a hot path (a handful of messages per machine per lease time), so parsing may
 * allocate (strings, option copies); it must simply never throw and never trust a length.
 * Every malformed input comes back as a drop reason for the caller to count.
 */
import { type Ip4, type Mac, readIp4, writeIp4 } from '../addr.js';

export const DHCP_SERVER_PORT = 67;
export const DHCP_CLIENT_PORT = 68;

/** op .. file (RFC 2131 Figure 1), without the cookie. */
export const BOOTP_FIXED_LEN = 236;
/** Fixed part plus the magic cookie 99.130.83.99 (RFC 2131 §3). */
export const DHCP_MIN_LEN = 240;
/**
 * RFC 1542 §3.4 / RFC 951: a BOOTP message is at least 300 bytes; some relays and old
 * clients discard shorter ones, so every message we emit is padded to it (dnsmasq and ISC
 * dhcpd do the same).
 */
export const BOOTP_MIN_EMIT_LEN = 300;
/**
 * RFC 2131 §2: every client must accept 576-byte IP datagrams, i.e. 548 bytes of DHCP
 * after the 20-byte IP and 8-byte UDP headers. Larger replies only with option 57.
 */
export const DHCP_DEFAULT_MAX_MESSAGE = 576 - 28;

const MAGIC = 0x63825363;

export const BootpOp = { Request: 1, Reply: 2 } as const;

/** Option 53 values (RFC 2132 §9.6). */
export const DhcpMessageType = {
  Discover: 1,
  Offer: 2,
  Request: 3,
  Decline: 4,
  Ack: 5,
  Nak: 6,
  Release: 7,
  Inform: 8,
} as const;

/** Option codes (RFC 2132 unless noted). */
export const DhcpOption = {
  Pad: 0,
  SubnetMask: 1,
  Router: 3,
  DnsServer: 6,
  Hostname: 12,
  DomainName: 15,
  InterfaceMtu: 26,
  BroadcastAddress: 28,
  RequestedIp: 50,
  LeaseTime: 51,
  Overload: 52,
  MessageType: 53,
  ServerId: 54,
  ParameterRequestList: 55,
  Message: 56,
  MaxMessageSize: 57,
  RenewalTime: 58,
  RebindingTime: 59,
  VendorClassId: 60,
  ClientId: 61,
  DomainSearch: 119, // RFC 3397
  End: 255,
} as const;

export type DhcpDropReason =
  | 'truncated' // shorter than the fixed part + cookie
  | 'bad_op' // op neither BOOTREQUEST nor BOOTREPLY
  | 'no_magic_cookie' // plain BOOTP (RFC 951) or garbage: we only speak DHCP
  | 'option_overrun' // an option's length runs past its field
  | 'bad_option' // a known option whose value has the wrong size or encoding
  | 'no_message_type'; // option 53 missing: not a DHCP message

/** Zero-copy view over a DHCP message (UDP payload). */
export class DhcpPacket {
  constructor(readonly buf: Uint8Array) {}

  /** Validates only what makes the getters safe: the fixed part and the cookie. */
  static check(buf: Uint8Array): DhcpPacket | DhcpDropReason {
    if (buf.length < DHCP_MIN_LEN) return 'truncated';
    if (readIp4(buf, BOOTP_FIXED_LEN) !== MAGIC) return 'no_magic_cookie';
    return new DhcpPacket(buf);
  }

  get op(): number { return this.buf[0]!; }
  get htype(): number { return this.buf[1]!; }
  get hlen(): number { return this.buf[2]!; }
  get hops(): number { return this.buf[3]!; }
  get xid(): number { return readIp4(this.buf, 4); }
  get secs(): number { return (this.buf[8]! << 8) | this.buf[9]!; }
  get flags(): number { return (this.buf[10]! << 8) | this.buf[11]!; }
  /** RFC 1542 §3.1.1: the only defined flag, the leftmost bit. */
  get broadcast(): boolean { return (this.buf[10]! & 0x80) !== 0; }
  get ciaddr(): Ip4 { return readIp4(this.buf, 12); }
  get yiaddr(): Ip4 { return readIp4(this.buf, 16); }
  get siaddr(): Ip4 { return readIp4(this.buf, 20); }
  get giaddr(): Ip4 { return readIp4(this.buf, 24); }
  /** All 16 bytes; only the first `hlen` (6 for Ethernet) are meaningful. */
  get chaddr(): Uint8Array { return this.buf.subarray(28, 44); }
  get sname(): Uint8Array { return this.buf.subarray(44, 108); }
  get file(): Uint8Array { return this.buf.subarray(108, 236); }
  /** The options field: from after the cookie to the end of the buffer. */
  get options(): Uint8Array { return this.buf.subarray(DHCP_MIN_LEN); }
}

export interface DhcpRepr {
  op: number;
  messageType: number;
  /** Hardware type (1 = Ethernet) and address length; the server ignores anything but 1/6. */
  htype: number;
  hlen: number;
  hops: number;
  xid: number;
  secs: number;
  broadcast: boolean;
  ciaddr: Ip4;
  yiaddr: Ip4;
  siaddr: Ip4;
  giaddr: Ip4;
  /** First 6 bytes of chaddr (a copy). */
  chaddr: Mac;

  // Options. null / empty = absent.
  clientId: Uint8Array | null; // 61
  requestedIp: Ip4 | null; // 50
  serverId: Ip4 | null; // 54
  parameterRequestList: Uint8Array | null; // 55
  maxMessageSize: number | null; // 57
  leaseTime: number | null; // 51, seconds
  renewalTime: number | null; // 58 (T1)
  rebindingTime: number | null; // 59 (T2)
  subnetMask: Ip4 | null; // 1
  routers: Ip4[]; // 3
  dnsServers: Ip4[]; // 6
  domainName: string | null; // 15
  searchList: string[] | null; // 119
  mtu: number | null; // 26
  hostname: string | null; // 12
  broadcastAddress: Ip4 | null; // 28
  message: string | null; // 56 (text for NAK)
  vendorClassId: Uint8Array | null; // 60
  /**
   * Emit only: write these option codes first, in this order (the client's parameter
   * request list). RFC 2131 does not require it, but some embedded clients read only the
   * first options, and it costs nothing. Never set by `parseDhcp`.
   */
  optionOrder?: Uint8Array | null;
}

/** A repr with every option absent, for building replies and tests. */
export function emptyDhcpRepr(): DhcpRepr {
  return {
    op: BootpOp.Request, messageType: 0, htype: 1, hlen: 6, hops: 0, xid: 0, secs: 0,
    broadcast: false, ciaddr: 0, yiaddr: 0, siaddr: 0, giaddr: 0, chaddr: new Uint8Array(6),
    clientId: null, requestedIp: null, serverId: null, parameterRequestList: null,
    maxMessageSize: null, leaseTime: null, renewalTime: null, rebindingTime: null,
    subnetMask: null, routers: [], dnsServers: [], domainName: null, searchList: null,
    mtu: null, hostname: null, broadcastAddress: null, message: null, vendorClassId: null,
  };
}

// ---------------------------------------------------------------------------------------
// Parsing

/**
 * Walk one options field. Appends option data to `out` (RFC 3396: repeated instances of a
 * code are concatenated in order). Returns null on success or a drop reason.
 *
 * Stops at End (255) or at the field's end: RFC 2131 §4.1 requires End, but clients in the
 * wild omit it and the bytes after the last option are zeros (Pad) anyway.
 */
function walkOptions(f: Uint8Array, out: Map<number, Uint8Array[]>): DhcpDropReason | null {
  let i = 0;
  while (i < f.length) {
    const code = f[i]!;
    if (code === DhcpOption.Pad) { i++; continue; }
    if (code === DhcpOption.End) return null;
    if (i + 1 >= f.length) return 'option_overrun';
    const len = f[i + 1]!;
    if (i + 2 + len > f.length) return 'option_overrun';
    const data = f.subarray(i + 2, i + 2 + len);
    const list = out.get(code);
    if (list) list.push(data);
    else out.set(code, [data]);
    i += 2 + len;
  }
  return null;
}

function joined(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  let n = 0;
  for (const p of parts) n += p.length;
  const b = new Uint8Array(n);
  n = 0;
  for (const p of parts) { b.set(p, n); n += p.length; }
  return b;
}

const latin1 = new TextDecoder('latin1');

/** NVT ASCII string; trailing NULs dropped (RFC 2132 §2: "should not" be NUL-terminated, but some are). */
function text(d: Uint8Array): string {
  let end = d.length;
  while (end > 0 && d[end - 1] === 0) end--;
  return latin1.decode(d.subarray(0, end));
}

class BadOption extends Error {}
const BAD = new BadOption();

function u32(d: Uint8Array): number {
  if (d.length !== 4) throw BAD;
  return readIp4(d, 0);
}

function u16(d: Uint8Array): number {
  if (d.length !== 2) throw BAD;
  return (d[0]! << 8) | d[1]!;
}

function ipList(d: Uint8Array): Ip4[] {
  if (d.length === 0 || d.length % 4 !== 0) throw BAD;
  const a: Ip4[] = [];
  for (let i = 0; i < d.length; i += 4) a.push(readIp4(d, i));
  return a;
}

/**
 * RFC 3397 §2: a sequence of RFC 1035 names, compression pointers relative to the start
 * of the (concatenated) option data. A pointer must point strictly before the label that
 * holds it, which makes every walk finite; names longer than 255 bytes are rejected.
 */
export function decodeSearchList(d: Uint8Array): string[] | null {
  const names: string[] = [];
  let i = 0;
  while (i < d.length) {
    const labels: string[] = [];
    let p = i;
    let wire = 0;
    let next = -1; // where the next name starts, once a pointer was followed
    let limit = d.length; // pointers must go strictly backwards
    for (;;) {
      if (p >= d.length) return null;
      const len = d[p]!;
      if (len === 0) {
        if (next < 0) next = p + 1;
        break;
      }
      if ((len & 0xc0) === 0xc0) {
        if (p + 1 >= d.length) return null;
        const target = ((len & 0x3f) << 8) | d[p + 1]!;
        if (target >= limit || target >= p) return null;
        if (next < 0) next = p + 2;
        limit = target;
        p = target;
        continue;
      }
      if ((len & 0xc0) !== 0) return null; // 0x40/0x80: reserved label types
      if (p + 1 + len > d.length) return null;
      wire += len + 1;
      if (wire > 254) return null;
      labels.push(latin1.decode(d.subarray(p + 1, p + 1 + len)));
      p += 1 + len;
    }
    if (labels.length === 0) return null; // the root domain is not a useful search entry
    names.push(labels.join('.'));
    i = next;
  }
  return names;
}

/** Parse a DHCP message (a UDP payload). Never throws; malformed input gives a drop reason. */
export function parseDhcp(bytes: Uint8Array): DhcpRepr | DhcpDropReason {
  const p = DhcpPacket.check(bytes);
  if (typeof p === 'string') return p;
  const op = p.op;
  if (op !== BootpOp.Request && op !== BootpOp.Reply) return 'bad_op';

  const opts = new Map<number, Uint8Array[]>();
  let err = walkOptions(p.options, opts);
  if (err) return err;
  // RFC 2131 §4.1: option 52 says file (1), sname (2) or both (3) carry more options, read
  // after the options field, file before sname. Only the main field's option 52 counts.
  const ov = opts.get(DhcpOption.Overload);
  if (ov) {
    const v = ov[0]!.length === 1 ? ov[0]![0]! : 0;
    if (v < 1 || v > 3) return 'bad_option';
    if (v & 1) { err = walkOptions(p.file, opts); if (err) return err; }
    if (v & 2) { err = walkOptions(p.sname, opts); if (err) return err; }
  }

  const get = (code: number): Uint8Array | null => {
    const l = opts.get(code);
    return l ? joined(l) : null;
  };

  const r = emptyDhcpRepr();
  r.op = op;
  r.htype = p.htype;
  r.hlen = p.hlen;
  r.hops = p.hops;
  r.xid = p.xid;
  r.secs = p.secs;
  r.broadcast = p.broadcast;
  r.ciaddr = p.ciaddr;
  r.yiaddr = p.yiaddr;
  r.siaddr = p.siaddr;
  r.giaddr = p.giaddr;
  r.chaddr = bytes.slice(28, 34);

  try {
    const mt = get(DhcpOption.MessageType);
    if (!mt) return 'no_message_type';
    if (mt.length !== 1) return 'bad_option';
    r.messageType = mt[0]!;

    let d: Uint8Array | null;
    if ((d = get(DhcpOption.ClientId))) {
      // RFC 2132 §9.14: type byte plus at least one byte of identifier.
      if (d.length < 2) throw BAD;
      r.clientId = d.slice();
    }
    if ((d = get(DhcpOption.RequestedIp))) r.requestedIp = u32(d);
    if ((d = get(DhcpOption.ServerId))) r.serverId = u32(d);
    if ((d = get(DhcpOption.ParameterRequestList))) r.parameterRequestList = d.slice();
    if ((d = get(DhcpOption.MaxMessageSize))) {
      r.maxMessageSize = u16(d);
      if (r.maxMessageSize < 576) throw BAD; // RFC 2132 §9.10: minimum legal value 576
    }
    if ((d = get(DhcpOption.LeaseTime))) r.leaseTime = u32(d);
    if ((d = get(DhcpOption.RenewalTime))) r.renewalTime = u32(d);
    if ((d = get(DhcpOption.RebindingTime))) r.rebindingTime = u32(d);
    if ((d = get(DhcpOption.SubnetMask))) r.subnetMask = u32(d);
    if ((d = get(DhcpOption.Router))) r.routers = ipList(d);
    if ((d = get(DhcpOption.DnsServer))) r.dnsServers = ipList(d);
    if ((d = get(DhcpOption.DomainName))) r.domainName = text(d);
    if ((d = get(DhcpOption.DomainSearch))) {
      const l = decodeSearchList(d);
      if (!l) throw BAD;
      r.searchList = l;
    }
    if ((d = get(DhcpOption.InterfaceMtu))) {
      r.mtu = u16(d);
      if (r.mtu < 68) throw BAD; // RFC 2132 §5.1: minimum legal value 68
    }
    if ((d = get(DhcpOption.Hostname))) r.hostname = text(d);
    if ((d = get(DhcpOption.BroadcastAddress))) r.broadcastAddress = u32(d);
    if ((d = get(DhcpOption.Message))) r.message = text(d);
    if ((d = get(DhcpOption.VendorClassId))) r.vendorClassId = d.slice();
  } catch (e) {
    if (e === BAD) return 'bad_option';
    throw e;
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// Emitting

/** Inverse of `text`: one byte per char (latin1), so parse(emit(s)) === s. */
function bytesOf(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i) & 0xff;
  return b;
}

/** RFC 3397 encoding with RFC 1035 §4.1.4 compression against earlier names of the list. */
export function encodeSearchList(names: readonly string[]): Uint8Array {
  const out: number[] = [];
  const suffixes = new Map<string, number>();
  for (const name of names) {
    if (name.replace(/\./g, '').length === 0) continue; // the root is no search domain
    const labels = name.replace(/\.$/, '').split('.').filter((l) => l.length > 0);
    let k = 0;
    for (; k < labels.length; k++) {
      const suffix = labels.slice(k).join('.').toLowerCase();
      const at = suffixes.get(suffix);
      if (at !== undefined) {
        out.push(0xc0 | (at >> 8), at & 0xff);
        break;
      }
      if (out.length < 0x4000) suffixes.set(suffix, out.length);
      const l = bytesOf(labels[k]!);
      out.push(Math.min(l.length, 63), ...l.subarray(0, 63));
    }
    if (k === labels.length) out.push(0);
  }
  return Uint8Array.from(out);
}

function be32(v: number): Uint8Array {
  const b = new Uint8Array(4);
  writeIp4(b, 0, v >>> 0);
  return b;
}

function be16(v: number): Uint8Array {
  return Uint8Array.of((v >> 8) & 0xff, v & 0xff);
}

function ips(a: readonly Ip4[]): Uint8Array {
  const b = new Uint8Array(a.length * 4);
  for (let i = 0; i < a.length; i++) writeIp4(b, i * 4, a[i]! >>> 0);
  return b;
}

/** The encoded value of each option present in `r`, keyed by code, in our default order. */
function optionValues(r: DhcpRepr): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  // Message type first and server id next: what clients (and Wireshark) expect to see.
  m.set(DhcpOption.MessageType, Uint8Array.of(r.messageType));
  if (r.serverId !== null) m.set(DhcpOption.ServerId, be32(r.serverId));
  if (r.leaseTime !== null) m.set(DhcpOption.LeaseTime, be32(r.leaseTime));
  if (r.renewalTime !== null) m.set(DhcpOption.RenewalTime, be32(r.renewalTime));
  if (r.rebindingTime !== null) m.set(DhcpOption.RebindingTime, be32(r.rebindingTime));
  if (r.subnetMask !== null) m.set(DhcpOption.SubnetMask, be32(r.subnetMask));
  if (r.broadcastAddress !== null) m.set(DhcpOption.BroadcastAddress, be32(r.broadcastAddress));
  if (r.routers.length > 0) m.set(DhcpOption.Router, ips(r.routers));
  if (r.dnsServers.length > 0) m.set(DhcpOption.DnsServer, ips(r.dnsServers));
  if (r.domainName !== null && r.domainName.length > 0) m.set(DhcpOption.DomainName, bytesOf(r.domainName));
  if (r.searchList !== null && r.searchList.length > 0) m.set(DhcpOption.DomainSearch, encodeSearchList(r.searchList));
  if (r.mtu !== null) m.set(DhcpOption.InterfaceMtu, be16(r.mtu));
  if (r.hostname !== null && r.hostname.length > 0) m.set(DhcpOption.Hostname, bytesOf(r.hostname));
  if (r.requestedIp !== null) m.set(DhcpOption.RequestedIp, be32(r.requestedIp));
  if (r.parameterRequestList !== null && r.parameterRequestList.length > 0) {
    m.set(DhcpOption.ParameterRequestList, r.parameterRequestList);
  }
  if (r.maxMessageSize !== null) m.set(DhcpOption.MaxMessageSize, be16(r.maxMessageSize));
  if (r.clientId !== null && r.clientId.length > 0) m.set(DhcpOption.ClientId, r.clientId);
  if (r.vendorClassId !== null && r.vendorClassId.length > 0) m.set(DhcpOption.VendorClassId, r.vendorClassId);
  if (r.message !== null && r.message.length > 0) m.set(DhcpOption.Message, bytesOf(r.message));
  return m;
}

/** Codes in emission order: 53, then the requested order, then the rest. */
function emissionOrder(r: DhcpRepr, m: Map<number, Uint8Array>): number[] {
  const order: number[] = [DhcpOption.MessageType];
  const seen = new Set<number>(order);
  if (r.optionOrder) {
    for (const c of r.optionOrder) {
      if (!seen.has(c) && m.has(c)) { order.push(c); seen.add(c); }
    }
  }
  for (const c of m.keys()) if (!seen.has(c)) { order.push(c); seen.add(c); }
  return order;
}

/** Wire size of one option value, split per RFC 3396 into 255-byte instances. */
function optionWireLen(len: number): number {
  if (len === 0) return 2;
  return len + 2 * Math.ceil(len / 255);
}

export function dhcpEmittedLength(r: DhcpRepr): number {
  let n = DHCP_MIN_LEN + 1; // + End
  for (const v of optionValues(r).values()) n += optionWireLen(v.length);
  return Math.max(n, BOOTP_MIN_EMIT_LEN);
}

/**
 * Write `r` at `buf[off..]`; returns the length (= `dhcpEmittedLength(r)`). sname and file
 * are left zero (we never overload them) and the message is padded to 300 bytes.
 */
export function emitDhcp(r: DhcpRepr, buf: Uint8Array, off = 0): number {
  const m = optionValues(r);
  const order = emissionOrder(r, m);
  let n = DHCP_MIN_LEN + 1;
  for (const v of m.values()) n += optionWireLen(v.length);
  const total = Math.max(n, BOOTP_MIN_EMIT_LEN);
  buf.fill(0, off, off + total);

  buf[off] = r.op;
  buf[off + 1] = r.htype;
  buf[off + 2] = r.hlen;
  buf[off + 3] = r.hops;
  writeIp4(buf, off + 4, r.xid >>> 0);
  buf[off + 8] = (r.secs >> 8) & 0xff;
  buf[off + 9] = r.secs & 0xff;
  buf[off + 10] = r.broadcast ? 0x80 : 0;
  writeIp4(buf, off + 12, r.ciaddr >>> 0);
  writeIp4(buf, off + 16, r.yiaddr >>> 0);
  writeIp4(buf, off + 20, r.siaddr >>> 0);
  writeIp4(buf, off + 24, r.giaddr >>> 0);
  buf.set(r.chaddr.subarray(0, 6), off + 28);
  writeIp4(buf, off + BOOTP_FIXED_LEN, MAGIC);

  let i = off + DHCP_MIN_LEN;
  for (const code of order) {
    const v = m.get(code)!;
    if (v.length === 0) {
      buf[i++] = code;
      buf[i++] = 0;
      continue;
    }
    for (let s = 0; s < v.length; s += 255) {
      const chunk = v.subarray(s, s + 255);
      buf[i++] = code;
      buf[i++] = chunk.length;
      buf.set(chunk, i);
      i += chunk.length;
    }
  }
  buf[i] = DhcpOption.End;
  return total;
}
