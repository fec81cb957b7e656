/** IPv4 headers (RFC 791) against packets produced by the Linux kernel (see fixtures/captured.ts). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ip4 } from '../../netstack/addr.js';
import { checksum } from '../../netstack/wire/checksum.js';
import { IPV4_HLEN, IpProto, Ipv4Packet, type Ipv4Repr, emitIpv4, parseIpv4 } from '../../netstack/wire/ipv4.js';
import * as C from '../fixtures/captured.js';
import { hex, hostileBytes, inRange, padded, toHex, within } from '../helpers/frames.js';

const G = ip4('192.168.127.2');
const GW = ip4('192.168.127.1');
const ipOf = (h: string) => hex(h).subarray(14);
function must(b: Uint8Array): Ipv4Packet {
  const p = Ipv4Packet.check(b);
  if (typeof p === 'string') throw new Error(p);
  return p;
}

describe('Ipv4Packet on real packets', () => {
  it('deconstructs the kernel echo request (DF, no options)', () => {
    const p = must(ipOf(C.ECHO_REQUEST_TO_1));
    expect(p.headerLen).toBe(20);
    expect(p.tos).toBe(0);
    expect(p.totalLen).toBe(84);
    expect(p.ident).toBe(0x768f);
    expect(p.dontFragment).toBe(true);
    expect(p.moreFragments).toBe(false);
    expect(p.fragOffset).toBe(0);
    expect(p.isFragment).toBe(false);
    expect(p.ttl).toBe(64);
    expect(p.protocol).toBe(IpProto.ICMP);
    expect(p.checksum).toBe(0x44c5);
    expect(p.src).toBe(G);
    expect(p.dst).toBe(GW);
    expect(p.payload.length).toBe(64);
    expect(p.payload[0]).toBe(8); // echo request
  });

  it('deconstructs both fragments of ping -s 1600', () => {
    const a = must(ipOf(C.FRAG_REQUEST_1));
    expect([a.ident, a.moreFragments, a.fragOffset, a.isFragment, a.dontFragment]).toEqual([0x780d, true, 0, true, false]);
    expect(a.payload.length).toBe(1480);
    const b = must(ipOf(C.FRAG_REQUEST_2));
    expect([b.ident, b.moreFragments, b.fragOffset, b.isFragment]).toEqual([0x780d, false, 1480, true]);
    expect(b.payload.length).toBe(128);
    expect(b.totalLen).toBe(148);
  });

  it('deconstructs a header with options (ping -R: NOP + record route, IHL 15)', () => {
    const raw = ipOf(C.RR_ECHO_REQUEST);
    const p = must(raw);
    expect(p.headerLen).toBe(60);
    expect(p.totalLen).toBe(124);
    expect(p.header.length).toBe(60);
    // NOP, then RR: type 7, length 39, pointer 8 (one slot filled: the sender's own address).
    expect(toHex(p.header.subarray(20, 28))).toBe('01072708c0a87f02');
    expect(p.payload.length).toBe(64);
    expect(p.payload[0]).toBe(8);
    expect(parseIpv4(p).payloadLen).toBe(64);
  });

  it('deconstructs the kernel ICMP error (tos 0xc0, no DF)', () => {
    const p = must(ipOf(C.ICMP_PORT_UNREACHABLE));
    expect(p.tos).toBe(0xc0);
    expect(p.dontFragment).toBe(false);
    expect(p.src).toBe(GW);
    expect(p.dst).toBe(G);
  });

  it('parses to the expected repr and constructs identical bytes from it', () => {
    const cases: [string, Ipv4Repr][] = [
      [C.ECHO_REQUEST_TO_1, { src: G, dst: GW, protocol: 1, payloadLen: 64, ttl: 64, ident: 0x768f, dontFragment: true, moreFragments: false, fragOffset: 0, tos: 0 }],
      [C.FRAG_REQUEST_1, { src: G, dst: GW, protocol: 1, payloadLen: 1480, ttl: 64, ident: 0x780d, dontFragment: false, moreFragments: true, fragOffset: 0, tos: 0 }],
      [C.FRAG_REQUEST_2, { src: G, dst: GW, protocol: 1, payloadLen: 128, ttl: 64, ident: 0x780d, dontFragment: false, moreFragments: false, fragOffset: 1480, tos: 0 }],
      [C.ICMP_PORT_UNREACHABLE, { src: GW, dst: G, protocol: 1, payloadLen: 40, ttl: 64, ident: 0x7778, dontFragment: false, moreFragments: false, fragOffset: 0, tos: 0xc0 }],
      [C.UDP_TO_5000, { src: G, dst: GW, protocol: 17, payloadLen: 20, ttl: 64, ident: 0x5335, dontFragment: true, moreFragments: false, fragOffset: 0, tos: 0 }],
    ];
    for (const [h, r] of cases) {
      const raw = ipOf(h);
      expect(parseIpv4(must(raw))).toEqual(r);
      const out = new Uint8Array(IPV4_HLEN + 2);
      expect(emitIpv4(r, out, 1)).toBe(IPV4_HLEN);
      // Same bytes, checksum included: the kernel and we agree on every header field.
      expect(toHex(out.subarray(1, 21))).toBe(toHex(raw.subarray(0, 20)));
    }
  });

  it('cuts Ethernet padding off the payload', () => {
    const f = padded(hex(C.UDP_TO_5000), 64);
    const p = must(f.subarray(14));
    expect(p.totalLen).toBe(40);
    expect(p.payload.length).toBe(20);
    expect(within(p.payload, f)).toBe(true);
  });

  it('names the reason for each malformed header', () => {
    const good = ipOf(C.ECHO_REQUEST_TO_1);
    const mod = (f: (b: Uint8Array) => void) => {
      const b = good.slice();
      f(b);
      return Ipv4Packet.check(b);
    };
    expect(Ipv4Packet.check(good.subarray(0, 19))).toBe('truncated');
    expect(mod((b) => (b[0] = 0x65))).toBe('bad_version');
    expect(mod((b) => (b[0] = 0x44))).toBe('bad_header_len');
    expect(Ipv4Packet.check(ipOf(C.RR_ECHO_REQUEST).subarray(0, 40))).toBe('bad_header_len');
    expect(mod((b) => (b[3] = 19))).toBe('bad_total_len');
    expect(Ipv4Packet.check(good.subarray(0, 83))).toBe('truncated');
    expect(mod((b) => (b[8] = 63))).toBe('bad_checksum');
    // With verification off (checksum offloaded), only the structure is checked.
    const ttlChanged = good.slice();
    ttlChanged[8] = 1;
    expect(Ipv4Packet.check(ttlChanged, false)).toBeInstanceOf(Ipv4Packet);
  });
});

describe('Ipv4Packet properties', () => {
  const REAL = Object.values(C).map((h) => hex(h).subarray(14));

  it('never throws, and a checked view never reads out of bounds', () => {
    fc.assert(
      fc.property(hostileBytes(REAL), fc.boolean(), (b, verify) => {
        const p = Ipv4Packet.check(b, verify);
        if (typeof p === 'string') {
          expect(['truncated', 'bad_version', 'bad_header_len', 'bad_total_len', 'bad_checksum']).toContain(p);
          return;
        }
        expect(p.headerLen).toBeGreaterThanOrEqual(20);
        expect(p.headerLen).toBeLessThanOrEqual(p.totalLen);
        expect(p.totalLen).toBeLessThanOrEqual(b.length);
        for (const v of [p.totalLen, p.ident, p.flagsFrag, p.checksum]) expect(inRange(v, 0xffff)).toBe(true);
        for (const v of [p.tos, p.ttl, p.protocol]) expect(inRange(v, 0xff)).toBe(true);
        for (const v of [p.src, p.dst]) expect(inRange(v, 0xffffffff)).toBe(true);
        expect(inRange(p.fragOffset, 0x1fff * 8)).toBe(true);
        expect(within(p.header, b) && p.header.length === p.headerLen).toBe(true);
        expect(within(p.payload, b) && p.payload.length === p.totalLen - p.headerLen).toBe(true);
        if (verify) expect(checksum(b, 0, p.headerLen)).toBe(0);
        const r = parseIpv4(p);
        expect(r.payloadLen).toBe(p.payload.length);
      }),
      { numRuns: 3000 },
    );
  });

  it('emit then check+parse gives the repr back', () => {
    fc.assert(
      fc.property(
        fc.record({
          src: fc.nat({ max: 0xffffffff }),
          dst: fc.nat({ max: 0xffffffff }),
          protocol: fc.nat(255),
          payloadLen: fc.nat(2000),
          ttl: fc.nat(255),
          ident: fc.nat(0xffff),
          dontFragment: fc.boolean(),
          moreFragments: fc.boolean(),
          fragOffset: fc.nat(0x1fff).map((n) => n * 8),
          tos: fc.nat(255),
        }),
        (r) => {
          const b = new Uint8Array(IPV4_HLEN + r.payloadLen);
          emitIpv4(r, b);
          expect(parseIpv4(must(b))).toEqual(r);
        },
      ),
    );
  });
});
