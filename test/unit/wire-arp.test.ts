/** ARP (RFC 826) against the Linux kernel's own request and reply (see fixtures/captured.ts). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ZERO_MAC, ip4 } from '../../netstack/addr.js';
import { ARP_LEN, ArpOp, ArpPacket, emitArp, parseArp } from '../../netstack/wire/arp.js';
import * as C from '../fixtures/captured.js';
import { GUEST_MAC, GW_MAC, hex, hostileBytes, inRange, toHex, within } from '../helpers/frames.js';

const arpOf = (h: string) => hex(h).subarray(14);

describe('ArpPacket on real frames', () => {
  it('deconstructs the kernel request who-has .1 tell .2', () => {
    const p = ArpPacket.check(arpOf(C.ARP_REQUEST_FOR_1))!;
    expect([p.htype, p.ptype, p.hlen, p.plen]).toEqual([1, 0x0800, 6, 4]);
    expect(p.isEthernetIpv4).toBe(true);
    expect(p.op).toBe(ArpOp.Request);
    expect(p.sha).toEqual(GUEST_MAC);
    expect(p.spa).toBe(ip4('192.168.127.2'));
    expect(p.tha).toEqual(ZERO_MAC);
    expect(p.tpa).toBe(ip4('192.168.127.1'));
  });

  it('deconstructs the kernel reply .254 is-at 5a:94:ef:e4:0c:dd', () => {
    const p = ArpPacket.check(arpOf(C.ARP_REPLY_FROM_254))!;
    expect(p.op).toBe(ArpOp.Reply);
    expect(p.sha).toEqual(GW_MAC);
    expect(p.spa).toBe(ip4('192.168.127.254'));
    expect(p.tha).toEqual(GUEST_MAC);
    expect(p.tpa).toBe(ip4('192.168.127.2'));
  });

  it('parses to the expected repr and constructs the same bytes from it', () => {
    const cases = [
      { h: C.ARP_REQUEST_FOR_1, r: { op: 1, sha: GUEST_MAC, spa: ip4('192.168.127.2'), tha: ZERO_MAC, tpa: ip4('192.168.127.1') } },
      { h: C.ARP_REPLY_FROM_1, r: { op: 2, sha: GW_MAC, spa: ip4('192.168.127.1'), tha: GUEST_MAC, tpa: ip4('192.168.127.2') } },
      { h: C.ARP_REQUEST_FOR_254, r: { op: 1, sha: GUEST_MAC, spa: ip4('192.168.127.2'), tha: ZERO_MAC, tpa: ip4('192.168.127.254') } },
    ];
    for (const { h, r } of cases) {
      const raw = arpOf(h);
      expect(parseArp(ArpPacket.check(raw)!)).toEqual(r);
      const out = new Uint8Array(ARP_LEN + 4).fill(0xee);
      expect(emitArp(r, out, 2)).toBe(ARP_LEN);
      expect(toHex(out.subarray(2, 2 + ARP_LEN))).toBe(toHex(raw));
      expect(out[0]).toBe(0xee);
      expect(out[ARP_LEN + 2]).toBe(0xee);
    }
  });

  it('repr does not alias the packet bytes', () => {
    const raw = arpOf(C.ARP_REQUEST_FOR_1);
    const r = parseArp(ArpPacket.check(raw)!)!;
    raw.fill(0);
    expect(r.sha).toEqual(GUEST_MAC);
  });

  it('rejects short packets; answers null for other hardware/protocol types and ops', () => {
    expect(ArpPacket.check(arpOf(C.ARP_REQUEST_FOR_1).subarray(0, 27))).toBeNull();
    for (const [i, v] of [[1, 6], [3, 0xdd], [4, 8], [5, 16], [7, 3], [7, 0]] as const) {
      const b = arpOf(C.ARP_REQUEST_FOR_1).slice();
      b[i] = v;
      expect(parseArp(ArpPacket.check(b)!)).toBeNull();
    }
  });
});

describe('ArpPacket properties', () => {
  const REAL = [C.ARP_REQUEST_FOR_1, C.ARP_REPLY_FROM_1, C.ARP_REQUEST_FOR_254, C.ARP_REPLY_FROM_254].map(arpOf);

  it('never throws and every accessor stays in bounds', () => {
    fc.assert(
      fc.property(hostileBytes(REAL, 64), (b) => {
        const p = ArpPacket.check(b);
        if (p === null) {
          expect(b.length).toBeLessThan(ARP_LEN);
          return;
        }
        for (const v of [p.htype, p.ptype, p.op]) expect(inRange(v, 0xffff)).toBe(true);
        for (const v of [p.hlen, p.plen]) expect(inRange(v, 0xff)).toBe(true);
        for (const v of [p.spa, p.tpa]) expect(inRange(v, 0xffffffff)).toBe(true);
        for (const m of [p.sha, p.tha]) expect(within(m, b) && m.length === 6).toBe(true);
        const r = parseArp(p);
        if (r !== null) {
          expect([1, 2]).toContain(r.op);
          expect(r.sha.length).toBe(6);
          expect(r.tha.length).toBe(6);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('emit then parse gives the repr back', () => {
    const macArb = fc.uint8Array({ minLength: 6, maxLength: 6 });
    const ipArb = fc.nat({ max: 0xffffffff });
    fc.assert(
      fc.property(fc.constantFrom(1, 2), macArb, ipArb, macArb, ipArb, (op, sha, spa, tha, tpa) => {
        const r = { op, sha, spa, tha, tpa };
        const b = new Uint8Array(ARP_LEN);
        emitArp(r, b);
        expect(parseArp(ArpPacket.check(b)!)).toEqual(r);
      }),
    );
  });
});
