/** DHCPv4 wire format: real messages captured from real peers (see dhcp-captures.ts), then properties. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ip4, mac } from '../../netstack/addr.js';
import {
  BOOTP_MIN_EMIT_LEN, DHCP_MIN_LEN, DhcpMessageType as MT, DhcpPacket, type DhcpRepr,
  decodeSearchList, dhcpEmittedLength, emitDhcp, emptyDhcpRepr, encodeSearchList, parseDhcp,
} from '../../netstack/wire/dhcpv4.js';
import {
  CAPTURES, DHCLIENT_DISCOVER, DHCLIENT_INIT_REBOOT, DHCLIENT_RELEASE, DHCLIENT_REQUEST, DNSMASQ_ACK,
  DNSMASQ_OFFER, NETWORKD_DISCOVER, NETWORKD_RELEASE, NETWORKD_REQUEST, UDHCPC_DISCOVER, UDHCPC_RELEASE,
  UDHCPC_RENEW, UDHCPC_REQUEST, tohex, unhex,
} from './dhcp-captures.js';

function parseOk(b: Uint8Array): DhcpRepr {
  const r = parseDhcp(b);
  if (typeof r === 'string') throw new Error(`dropped: ${r}`);
  return r;
}

/** Option codes in the order they appear in the main options field. */
function codesOf(b: Uint8Array): number[] {
  const codes: number[] = [];
  for (let i = DHCP_MIN_LEN; i < b.length && b[i] !== 255;) {
    if (b[i] === 0) { i++; continue; }
    codes.push(b[i]!);
    i += 2 + b[i + 1]!;
  }
  return codes;
}

const CLIENT = mac('52:54:00:12:34:56');
const GW = ip4('192.168.127.1');
const LEASED = ip4('192.168.127.172');
const NETWORKD_CLIENT_ID = 'ff5f6daaa800020000ab110033bdebf95e192c';

describe('dhcpv4 view over captured bytes', () => {
  it('reads the BOOTP fixed part of the udhcpc renew', () => {
    const p = DhcpPacket.check(UDHCPC_RENEW);
    if (typeof p === 'string') throw new Error(p);
    expect(p.op).toBe(1);
    expect(p.htype).toBe(1);
    expect(p.hlen).toBe(6);
    expect(p.hops).toBe(0);
    expect(p.xid).toBe(0x502fd560);
    expect(p.secs).toBe(0);
    expect(p.broadcast).toBe(false);
    expect(p.ciaddr).toBe(LEASED);
    expect(p.yiaddr).toBe(0);
    expect(p.giaddr).toBe(0);
    expect(tohex(p.chaddr)).toBe('52540012345600000000000000000000');
    expect(p.sname.length).toBe(64);
    expect(p.file.length).toBe(128);
    expect(p.options[0]).toBe(53);
  });

  it('rejects what is not DHCP', () => {
    expect(DhcpPacket.check(UDHCPC_DISCOVER.subarray(0, 239))).toBe('truncated');
    const bootpOnly = UDHCPC_DISCOVER.slice();
    bootpOnly[236] = 0; // no magic cookie: RFC 951 BOOTP
    expect(parseDhcp(bootpOnly)).toBe('no_magic_cookie');
    const badOp = UDHCPC_DISCOVER.slice();
    badOp[0] = 3;
    expect(parseDhcp(badOp)).toBe('bad_op');
  });
});

describe('dhcpv4 parse of captured messages', () => {
  it('busybox udhcpc DISCOVER', () => {
    const r = parseOk(UDHCPC_DISCOVER);
    expect(r.op).toBe(1);
    expect(r.messageType).toBe(MT.Discover);
    expect(r.xid).toBe(0x502fd560);
    expect(r.chaddr).toEqual(CLIENT);
    expect(r.broadcast).toBe(false);
    expect(r.maxMessageSize).toBe(576);
    // subnet, router, dns, hostname, domain, mtu, broadcast, ntp, search
    expect([...r.parameterRequestList!]).toEqual([1, 3, 6, 12, 15, 26, 28, 42, 119]);
    expect(r.hostname).toBe('vmbox');
    expect(Buffer.from(r.vendorClassId!).toString()).toBe('udhcp 1.35.0');
    expect(tohex(r.clientId!)).toBe('01525400123456'); // type 1 (Ethernet) + MAC
    expect(r.requestedIp).toBeNull();
    expect(r.serverId).toBeNull();
  });

  it('dnsmasq OFFER carries every option udhcpc hands its script', () => {
    const r = parseOk(DNSMASQ_OFFER);
    expect(r.op).toBe(2);
    expect(r.messageType).toBe(MT.Offer);
    expect(r.yiaddr).toBe(LEASED);
    expect(r.siaddr).toBe(GW);
    expect(r.serverId).toBe(GW);
    expect(r.leaseTime).toBe(3600);
    expect(r.renewalTime).toBe(1800);
    expect(r.rebindingTime).toBe(3150);
    expect(r.subnetMask).toBe(ip4('255.255.255.0'));
    expect(r.broadcastAddress).toBe(ip4('192.168.127.255'));
    expect(r.routers).toEqual([GW]);
    expect(r.dnsServers).toEqual([GW]);
    expect(r.domainName).toBe('tender.internal');
    expect(r.searchList).toEqual(['tender.internal', 'example.com']);
    expect(r.mtu).toBe(1400);
  });

  it('dnsmasq ACK echoes the hostname', () => {
    const r = parseOk(DNSMASQ_ACK);
    expect(r.messageType).toBe(MT.Ack);
    expect(r.hostname).toBe('vmbox');
  });

  it('udhcpc REQUEST (SELECTING), renew and RELEASE', () => {
    const req = parseOk(UDHCPC_REQUEST);
    expect(req.messageType).toBe(MT.Request);
    expect(req.requestedIp).toBe(LEASED);
    expect(req.serverId).toBe(GW);
    expect(req.ciaddr).toBe(0);
    const renew = parseOk(UDHCPC_RENEW);
    expect(renew.messageType).toBe(MT.Request);
    expect(renew.ciaddr).toBe(LEASED);
    expect(renew.requestedIp).toBeNull();
    expect(renew.serverId).toBeNull();
    const rel = parseOk(UDHCPC_RELEASE);
    expect(rel.messageType).toBe(MT.Release);
    expect(rel.ciaddr).toBe(LEASED);
    expect(rel.serverId).toBe(GW);
    expect(rel.secs).toBe(1);
  });

  it('ISC dhclient DISCOVER, REQUEST, INIT-REBOOT, RELEASE', () => {
    const d = parseOk(DHCLIENT_DISCOVER);
    expect(d.clientId).toBeNull(); // dhclient identifies by chaddr
    expect(d.hostname).toBe('dhbox');
    expect([...d.parameterRequestList!]).toEqual([1, 28, 2, 3, 15, 6, 119, 12, 26]);
    const q = parseOk(DHCLIENT_REQUEST);
    expect(q.requestedIp).toBe(LEASED);
    expect(q.serverId).toBe(GW);
    const ir = parseOk(DHCLIENT_INIT_REBOOT);
    expect(ir.messageType).toBe(MT.Request);
    expect(ir.requestedIp).toBe(LEASED);
    expect(ir.serverId).toBeNull();
    expect(ir.ciaddr).toBe(0);
    const rel = parseOk(DHCLIENT_RELEASE);
    expect(rel.messageType).toBe(MT.Release);
    expect(rel.ciaddr).toBe(LEASED);
  });

  it('systemd-networkd DISCOVER: client id type 255, many options, 289 bytes', () => {
    expect(NETWORKD_DISCOVER.length).toBe(289);
    const r = parseOk(NETWORKD_DISCOVER);
    expect(tohex(r.clientId!)).toBe(NETWORKD_CLIENT_ID);
    expect(r.maxMessageSize).toBe(1472);
    expect([...r.parameterRequestList!]).toEqual([1, 3, 6, 12, 15, 26, 33, 42, 119, 120, 121]);
    expect(r.hostname).toBe('ndbox');
    expect(r.secs).toBe(1);
    const q = parseOk(NETWORKD_REQUEST);
    expect(q.requestedIp).toBe(LEASED);
    expect(q.serverId).toBe(GW);
    const rel = parseOk(NETWORKD_RELEASE);
    expect(rel.messageType).toBe(MT.Release);
    expect(rel.clientId).toEqual(q.clientId);
  });
});

describe('dhcpv4 emit', () => {
  for (const [name, bytes] of Object.entries(CAPTURES)) {
    it(`${name}: emit(parse) reproduces the captured bytes`, () => {
      const r = parseOk(bytes);
      // Emit in the capture's own option order: same bytes, except that we always pad to
      // the BOOTP minimum of 300 (networkd sends 289).
      r.optionOrder = Uint8Array.from(codesOf(bytes));
      const len = dhcpEmittedLength(r);
      expect(len).toBe(Math.max(bytes.length, BOOTP_MIN_EMIT_LEN));
      const out = new Uint8Array(len + 8).fill(0xee);
      expect(emitDhcp(r, out, 4)).toBe(len);
      expect(tohex(out.subarray(4, 4 + bytes.length))).toBe(tohex(bytes));
      expect(out.subarray(4 + bytes.length, 4 + len).every((x) => x === 0)).toBe(true);
      expect(out[3]).toBe(0xee); // nothing written outside [off, off+len)
      expect(out[4 + len]).toBe(0xee);
      const again = parseOk(out.subarray(4, 4 + len));
      r.optionOrder = undefined;
      expect(again).toEqual(r);
    });
  }

  it('default order puts message type and server id first and ends with End', () => {
    const r = parseOk(DNSMASQ_ACK);
    const out = new Uint8Array(dhcpEmittedLength(r));
    emitDhcp(r, out, 0);
    expect(codesOf(out).slice(0, 2)).toEqual([53, 54]);
    expect(parseOk(out)).toEqual(r);
  });

  it('encodes the search list as dnsmasq does and compresses shared suffixes', () => {
    expect(tohex(encodeSearchList(['tender.internal', 'example.com']))).toBe(
      '0674656e64657208696e7465726e616c00076578616d706c6503636f6d00',
    );
    // RFC 3397 §3 example: eng.apple.com, marketing.apple.com
    const enc = encodeSearchList(['eng.apple.com.', 'marketing.apple.com']);
    expect(tohex(enc)).toBe('03656e67056170706c6503636f6d00096d61726b6574696e67c004');
    expect(decodeSearchList(enc)).toEqual(['eng.apple.com', 'marketing.apple.com']);
  });

  it('splits options over 255 bytes into several instances (RFC 3396) and joins them back', () => {
    const r = emptyDhcpRepr();
    r.messageType = MT.Ack;
    r.searchList = Array.from({ length: 30 }, (_, i) => `zone${i}.example${i}.test`);
    const out = new Uint8Array(dhcpEmittedLength(r));
    emitDhcp(r, out, 0);
    expect(codesOf(out).filter((c) => c === 119).length).toBeGreaterThan(1);
    expect(parseOk(out).searchList).toEqual(r.searchList);
  });
});

describe('dhcpv4 options: hostile and unusual layouts', () => {
  /** A message with the given options field (after the cookie) and optional sname/file. */
  function msg(options: number[], sname: number[] = [], file: number[] = []): Uint8Array {
    const b = new Uint8Array(DHCP_MIN_LEN + options.length);
    b.set(UDHCPC_DISCOVER.subarray(0, 44), 0);
    b.set(sname, 44);
    b.set(file, 108);
    b.set([0x63, 0x82, 0x53, 0x63], 236);
    b.set(options, DHCP_MIN_LEN);
    return b;
  }

  it('reads options from file then sname under option overload (52)', () => {
    const r = parseOk(msg([53, 1, 1, 52, 1, 3, 255], [12, 2, 0x68, 0x69, 255], [50, 4, 10, 0, 0, 9, 255]));
    expect(r.hostname).toBe('hi');
    expect(r.requestedIp).toBe(ip4('10.0.0.9'));
    // Without option 52, sname/file are names, not options.
    const plain = parseOk(msg([53, 1, 1, 255], [12, 2, 0x68, 0x69, 255]));
    expect(plain.hostname).toBeNull();
    expect(parseDhcp(msg([53, 1, 1, 52, 1, 4, 255]))).toBe('bad_option');
    // An option in sname may not run past sname's 64 bytes.
    expect(parseDhcp(msg([53, 1, 1, 52, 1, 2, 255], [...new Array(62).fill(0), 12, 9]))).toBe('option_overrun');
  });

  it('handles pad, a missing End, overruns and bad lengths', () => {
    expect(parseOk(msg([0, 0, 53, 1, 3, 0])).messageType).toBe(3); // no End: tolerated
    expect(parseDhcp(msg([53, 1, 1, 12]))).toBe('option_overrun'); // code without length
    expect(parseDhcp(msg([53, 1, 1, 12, 5, 0x61]))).toBe('option_overrun');
    expect(parseDhcp(msg([12, 1, 0x61, 255]))).toBe('no_message_type');
    expect(parseDhcp(msg([53, 2, 1, 1, 255]))).toBe('bad_option');
    expect(parseDhcp(msg([53, 1, 1, 50, 3, 1, 2, 3, 255]))).toBe('bad_option');
    expect(parseDhcp(msg([53, 1, 1, 26, 2, 0, 67, 255]))).toBe('bad_option'); // MTU < 68
    expect(parseDhcp(msg([53, 1, 1, 57, 2, 1, 0, 255]))).toBe('bad_option'); // max size < 576
    expect(parseDhcp(msg([53, 1, 1, 61, 1, 1, 255]))).toBe('bad_option'); // client id too short
    expect(parseDhcp(msg([53, 1, 1, 3, 0, 255]))).toBe('bad_option'); // empty router list
    // RFC 3396: two instances concatenate; here a hostname split in two.
    expect(parseOk(msg([53, 1, 1, 12, 2, 0x61, 0x62, 12, 1, 0x63, 255])).hostname).toBe('abc');
    // A NUL-terminated hostname (some clients) loses its NUL.
    expect(parseOk(msg([53, 1, 1, 12, 3, 0x61, 0x62, 0, 255])).hostname).toBe('ab');
  });

  it('rejects search lists with forward or looping pointers, reserved labels, overlong names', () => {
    expect(decodeSearchList(unhex('03616263c000'))).toBeNull(); // points at itself' start: loop
    expect(decodeSearchList(unhex('c002'))).toBeNull(); // forward
    expect(decodeSearchList(unhex('03616263'))).toBeNull(); // no terminator
    expect(decodeSearchList(unhex('4061'))).toBeNull(); // 0x40 label type
    expect(decodeSearchList(unhex('00'))).toBeNull(); // root only
    const long = '3f' + '61'.repeat(63);
    expect(decodeSearchList(unhex(long.repeat(4) + '00'))).toBeNull(); // 256 bytes of name
    expect(decodeSearchList(unhex(long.repeat(3) + '3d' + '61'.repeat(61) + '00'))).toHaveLength(1); // 255
    // Two names where the second is entirely a pointer to the first.
    expect(decodeSearchList(unhex('0161000162c000'))).toEqual(['a', 'b.a']);
  });
});

// ---------------------------------------------------------------------------------------
// Properties

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const label = fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?$/);
const domain = fc.array(label, { minLength: 1, maxLength: 4 }).map((l) => l.join('.'));
const text = fc.string({ minLength: 1, maxLength: 40, unit: fc.integer({ min: 1, max: 255 }).map((c) => String.fromCharCode(c)) });
const opt = <T>(a: fc.Arbitrary<T>) => fc.option(a, { nil: null });

const reprArb: fc.Arbitrary<DhcpRepr> = fc.record({
  op: fc.constantFrom(1, 2),
  messageType: fc.integer({ min: 1, max: 255 }),
  htype: fc.integer({ min: 0, max: 255 }),
  hlen: fc.integer({ min: 0, max: 255 }),
  hops: fc.integer({ min: 0, max: 255 }),
  xid: u32,
  secs: fc.integer({ min: 0, max: 0xffff }),
  broadcast: fc.boolean(),
  ciaddr: u32, yiaddr: u32, siaddr: u32, giaddr: u32,
  chaddr: fc.uint8Array({ minLength: 6, maxLength: 6 }),
  clientId: opt(fc.uint8Array({ minLength: 2, maxLength: 300 })),
  requestedIp: opt(u32),
  serverId: opt(u32),
  parameterRequestList: opt(fc.uint8Array({ minLength: 1, maxLength: 40 })),
  maxMessageSize: opt(fc.integer({ min: 576, max: 0xffff })),
  leaseTime: opt(u32),
  renewalTime: opt(u32),
  rebindingTime: opt(u32),
  subnetMask: opt(u32),
  routers: fc.array(u32, { maxLength: 4 }),
  dnsServers: fc.array(u32, { maxLength: 70 }),
  domainName: opt(domain),
  searchList: opt(fc.array(domain, { minLength: 1, maxLength: 20 })),
  mtu: opt(fc.integer({ min: 68, max: 0xffff })),
  hostname: opt(text),
  broadcastAddress: opt(u32),
  message: opt(text),
  vendorClassId: opt(fc.uint8Array({ minLength: 1, maxLength: 60 })),
});

/** Every field of a parsed repr stays within its wire range. */
function inRange(r: DhcpRepr): boolean {
  const isU = (v: number, max: number) => Number.isInteger(v) && v >= 0 && v <= max;
  const ipOk = (v: number | null) => v === null || isU(v, 0xffffffff);
  return (
    isU(r.op, 2) && r.op >= 1 && isU(r.messageType, 255) && isU(r.htype, 255) && isU(r.hlen, 255) &&
    isU(r.hops, 255) && isU(r.xid, 0xffffffff) && isU(r.secs, 0xffff) && r.chaddr.length === 6 &&
    [r.ciaddr, r.yiaddr, r.siaddr, r.giaddr, r.requestedIp, r.serverId, r.subnetMask, r.broadcastAddress,
      r.leaseTime, r.renewalTime, r.rebindingTime, ...r.routers, ...r.dnsServers].every(ipOk) &&
    (r.mtu === null || (isU(r.mtu, 0xffff) && r.mtu >= 68)) &&
    (r.maxMessageSize === null || (isU(r.maxMessageSize, 0xffff) && r.maxMessageSize >= 576)) &&
    (r.searchList === null || r.searchList.every((n) => n.length > 0 && n.length <= 253))
  );
}

function safeParse(b: Uint8Array): void {
  const r = parseDhcp(b);
  if (typeof r !== 'string') expect(inRange(r)).toBe(true);
}

describe('dhcpv4 properties', () => {
  it('parse(emit(repr)) == repr', () => {
    fc.assert(
      fc.property(reprArb, fc.integer({ min: 0, max: 16 }), (r, off) => {
        const len = dhcpEmittedLength(r);
        const buf = new Uint8Array(off + len);
        expect(emitDhcp(r, buf, off)).toBe(len);
        expect(parseDhcp(buf.subarray(off))).toEqual(r);
      }),
      { numRuns: 300 },
    );
  });

  it('arbitrary bytes never throw and never yield out-of-range fields', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 700 }), (b) => safeParse(b)), { numRuns: 500 });
  });

  it('arbitrary options after a valid fixed part never throw (overload included)', () => {
    const head = UDHCPC_DISCOVER.subarray(0, DHCP_MIN_LEN);
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 400 }), fc.uint8Array({ minLength: 64, maxLength: 64 }),
        fc.uint8Array({ minLength: 128, maxLength: 128 }), fc.integer({ min: 0, max: 3 }),
        (opts, sname, file, ov) => {
          const b = new Uint8Array(DHCP_MIN_LEN + 6 + opts.length);
          b.set(head);
          b.set(sname, 44);
          b.set(file, 108);
          b.set([53, 1, 1, 52, 1, ov], DHCP_MIN_LEN);
          b.set(opts, DHCP_MIN_LEN + 6);
          safeParse(b);
          safeParse(b.subarray(0, DHCP_MIN_LEN + opts.length)); // without the prefix
        },
      ),
      { numRuns: 500 },
    );
  });

  it('truncations and byte flips of every capture never throw', () => {
    const caps = Object.values(CAPTURES);
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: caps.length - 1 }), fc.nat(), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
        (which, cut, flips) => {
          const src = caps[which]!;
          const b = src.slice(0, cut % (src.length + 1));
          safeParse(b);
          for (const [at, v] of flips) if (b.length > 0) b[at % b.length] = v;
          safeParse(b);
          if (b.length < DHCP_MIN_LEN) expect(parseDhcp(b)).toBe('truncated');
        },
      ),
      { numRuns: 1000 },
    );
  });

  it('search lists: arbitrary bytes never throw; encode/decode round trip', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (b) => { decodeSearchList(b); }), { numRuns: 1000 });
    fc.assert(
      fc.property(fc.array(domain, { minLength: 1, maxLength: 10 }), (names) => {
        expect(decodeSearchList(encodeSearchList(names))).toEqual(names);
      }),
    );
  });
});
