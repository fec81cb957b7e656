/** UDP (RFC 768) against datagrams sent by socat through the Linux kernel (see fixtures/captured.ts). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ip4 } from '../../netstack/addr.js';
import { UDP_HLEN, UdpPacket, emitUdp, emitUdpHeader } from '../../netstack/wire/udp.js';
import * as C from '../fixtures/captured.js';
import { hex, hostileBytes, inRange, padded, toHex, within } from '../helpers/frames.js';

const G = ip4('192.168.127.2');
const GW = ip4('192.168.127.1');
const udpOf = (h: string) => hex(h).subarray(34);
function must(b: Uint8Array, src = G, dst = GW): UdpPacket {
  const p = UdpPacket.check(b, src, dst);
  if (typeof p === 'string') throw new Error(p);
  return p;
}

describe('UdpPacket on real datagrams', () => {
  it('deconstructs socat 192.168.127.2:40000 -> .1:5000 "hello-tender"', () => {
    const p = must(udpOf(C.UDP_TO_5000));
    expect(p.srcPort).toBe(40000);
    expect(p.dstPort).toBe(5000);
    expect(p.length).toBe(20);
    expect(p.checksum).toBe(0x446d);
    expect(new TextDecoder().decode(p.payload)).toBe('hello-tender');
  });

  it('constructs the same bytes (checksum included), by emitUdp and by emitUdpHeader in place', () => {
    const raw = udpOf(C.UDP_TO_5000);
    const out = new Uint8Array(22);
    expect(emitUdp({ srcPort: 40000, dstPort: 5000 }, new TextEncoder().encode('hello-tender'), out, 2, G, GW)).toBe(20);
    expect(toHex(out.subarray(2))).toBe(toHex(raw));
    const inPlace = raw.slice();
    inPlace.fill(0, 0, 8);
    emitUdpHeader({ srcPort: 40000, dstPort: 5000 }, 12, inPlace, 0, G, GW);
    expect(toHex(inPlace)).toBe(toHex(raw));
    const small = must(udpOf(C.UDP_TO_5001));
    expect([small.srcPort, small.dstPort, small.length, small.checksum]).toEqual([40001, 5001, 12, 0xf1e5]);
  });

  it('ignores bytes past the UDP length (Ethernet padding inside the IP payload)', () => {
    const ip = padded(hex(C.UDP_TO_5001), 64).subarray(34);
    const p = must(ip);
    expect(p.payload.length).toBe(4);
  });

  it('checks the pseudo-header: the wrong address fails, a zero checksum means none', () => {
    expect(UdpPacket.check(udpOf(C.UDP_TO_5000), G, ip4('192.168.127.254'))).toBe('bad_checksum');
    expect(UdpPacket.check(udpOf(C.UDP_TO_5000), G, ip4('192.168.127.254'), false)).toBeInstanceOf(UdpPacket);
    const none = udpOf(C.UDP_TO_5000).slice();
    none[6] = 0;
    none[7] = 0;
    expect(UdpPacket.check(none, 1, 2)).toBeInstanceOf(UdpPacket);
    const flipped = udpOf(C.UDP_TO_5000).slice();
    flipped[12]! ^= 0x20;
    expect(UdpPacket.check(flipped, G, GW)).toBe('bad_checksum');
  });

  it('names the reason for truncated and bad lengths', () => {
    const raw = udpOf(C.UDP_TO_5000);
    expect(UdpPacket.check(raw.subarray(0, 7), G, GW)).toBe('truncated');
    expect(UdpPacket.check(raw.subarray(0, 19), G, GW)).toBe('bad_length');
    const short = raw.slice();
    short[5] = 7;
    expect(UdpPacket.check(short, G, GW)).toBe('bad_length');
  });

  it('sends a computed checksum of zero as 0xffff (RFC 768), which verifies', () => {
    const payload = new Uint8Array(4);
    const b = new Uint8Array(12);
    emitUdp({ srcPort: 1, dstPort: 2 }, payload, b, 0, G, GW);
    const c = (b[6]! << 8) | b[7]!;
    // Adding the checksum value itself to the data makes the sum 0xffff: the computed checksum is 0.
    payload[0] = c >> 8;
    payload[1] = c & 0xff;
    emitUdp({ srcPort: 1, dstPort: 2 }, payload, b, 0, G, GW);
    expect((b[6]! << 8) | b[7]!).toBe(0xffff);
    expect(must(b).checksum).toBe(0xffff);
  });
});

describe('UdpPacket properties', () => {
  const REAL = [C.UDP_TO_5000, C.UDP_TO_5001].map(udpOf);

  it('never throws and every accessor stays in bounds', () => {
    fc.assert(
      fc.property(hostileBytes(REAL, 100), fc.boolean(), (b, verify) => {
        const p = UdpPacket.check(b, G, GW, verify);
        if (typeof p === 'string') {
          expect(['truncated', 'bad_length', 'bad_checksum']).toContain(p);
          return;
        }
        for (const v of [p.srcPort, p.dstPort, p.length, p.checksum]) expect(inRange(v, 0xffff)).toBe(true);
        expect(p.length).toBeGreaterThanOrEqual(UDP_HLEN);
        expect(within(p.payload, b) && p.payload.length === p.length - UDP_HLEN).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });

  it('emit then check gives the ports and payload back, with a valid checksum', () => {
    const ipArb = fc.nat({ max: 0xffffffff });
    fc.assert(
      fc.property(fc.nat(0xffff), fc.nat(0xffff), fc.uint8Array({ maxLength: 1500 }), ipArb, ipArb, (sp, dp, payload, src, dst) => {
        const b = new Uint8Array(UDP_HLEN + payload.length);
        expect(emitUdp({ srcPort: sp, dstPort: dp }, payload, b, 0, src, dst)).toBe(b.length);
        const p = must(b, src, dst);
        expect([p.srcPort, p.dstPort, p.length]).toEqual([sp, dp, b.length]);
        expect(p.checksum).not.toBe(0);
        expect(p.payload).toEqual(payload);
      }),
    );
  });
});
