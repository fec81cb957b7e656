/**
 * The Internet checksum (RFC 1071) and its incremental update (RFC 1624), checked against
 * real kernel-produced headers and, by property, against full recomputation.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ip4 } from '../../netstack/addr.js';
import { checksum, finish, fold, pseudoSum4, sum16, update16, update32 } from '../../netstack/wire/checksum.js';
import { IpProto, Ipv4Packet, emitIpv4 } from '../../netstack/wire/ipv4.js';
import { ECHO_REQUEST_TO_1, RR_ECHO_REQUEST, UDP_TO_5000 } from '../fixtures/captured.js';
import { hex } from '../helpers/frames.js';

describe('checksum', () => {
  it('matches the RFC 1071 §3 worked example', () => {
    // 00 01 f2 03 f4 f5 f6 f7: the sum is 2ddf0, folded ddf2, complemented 220d.
    const b = hex('0001f203f4f5f6f7');
    expect(sum16(b, 0, 8)).toBe(0x2ddf0);
    expect(fold(0x2ddf0)).toBe(0xddf2);
    expect(checksum(b, 0, 8)).toBe(0x220d);
  });

  it('pads an odd trailing byte with zero (RFC 1071 §4.1)', () => {
    expect(checksum(hex('abcdef'), 0, 3)).toBe(checksum(hex('abcdef00'), 0, 4));
    expect(checksum(hex('ff'), 0, 1)).toBe(~0xff00 & 0xffff);
  });

  it('verifies the kernel-computed IPv4 header checksums (with and without options)', () => {
    for (const h of [ECHO_REQUEST_TO_1, RR_ECHO_REQUEST]) {
      const f = hex(h);
      const hl = (f[14]! & 0x0f) * 4;
      expect(checksum(f, 14, hl)).toBe(0);
      const stored = (f[24]! << 8) | f[25]!;
      f[24] = 0;
      f[25] = 0;
      expect(checksum(f, 14, hl)).toBe(stored);
    }
  });

  it('verifies the kernel-computed UDP checksum with the pseudo-header', () => {
    // socat .2:40000 -> .1:5000 "hello-tender"; UDP length 20, checksum 0x446d.
    const f = hex(UDP_TO_5000);
    const udp = f.subarray(34);
    const s = pseudoSum4(ip4('192.168.127.2'), ip4('192.168.127.1'), IpProto.UDP, 20);
    expect(finish(sum16(udp, 0, 20, s))).toBe(0);
    udp[6] = 0;
    udp[7] = 0;
    expect(finish(sum16(udp, 0, 20, s))).toBe(0x446d);
  });

  it('sums separately and combines (the pseudo-header trick)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(150), (b, cut) => {
        const c = (cut & ~1) > b.length ? b.length & ~1 : cut & ~1;
        expect(finish(sum16(b, c, b.length - c, sum16(b, 0, c)))).toBe(checksum(b, 0, b.length));
      }),
    );
  });
});

/** A valid random 20-byte IPv4 header. */
const header = fc
  .record({
    src: fc.nat({ max: 0xffffffff }),
    dst: fc.nat({ max: 0xffffffff }),
    protocol: fc.nat(255),
    payloadLen: fc.nat(1480),
    ttl: fc.nat(255),
    ident: fc.nat(0xffff),
    tos: fc.nat(255),
    dontFragment: fc.boolean(),
  })
  .map((r) => {
    const b = new Uint8Array(20 + r.payloadLen);
    emitIpv4(r, b, 0);
    return b;
  });

function fullChecksum(b: Uint8Array): number {
  const c = b.slice(0, 20);
  c[10] = 0;
  c[11] = 0;
  return checksum(c, 0, 20);
}

describe('incremental update (RFC 1624)', () => {
  it('update16 equals a full recomputation for any word change', () => {
    fc.assert(
      fc.property(header, fc.nat(9), fc.nat(0xffff), (b, w, nw) => {
        if (w === 5) return; // the checksum word itself
        const old = (b[2 * w]! << 8) | b[2 * w + 1]!;
        const hc = (b[10]! << 8) | b[11]!;
        b[2 * w] = nw >> 8;
        b[2 * w + 1] = nw & 0xff;
        expect(update16(hc, old, nw)).toBe(fullChecksum(b));
      }),
      { numRuns: 2000 },
    );
  });

  it('update32 equals a full recomputation for an address change', () => {
    fc.assert(
      fc.property(header, fc.boolean(), fc.nat({ max: 0xffffffff }), (b, isSrc, a) => {
        const off = isSrc ? 12 : 16;
        const old = ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
        const hc = (b[10]! << 8) | b[11]!;
        b[off] = a >>> 24;
        b[off + 1] = (a >>> 16) & 255;
        b[off + 2] = (a >>> 8) & 255;
        b[off + 3] = a & 255;
        expect(update32(hc, old, a)).toBe(fullChecksum(b));
      }),
      { numRuns: 2000 },
    );
  });

  it('Ipv4Packet.setSrc/setDst/setTtl keep the header valid and equal to a recomputation', () => {
    fc.assert(
      fc.property(
        header,
        fc.array(fc.oneof(fc.record({ f: fc.constant('src' as const), v: fc.nat({ max: 0xffffffff }) }), fc.record({ f: fc.constant('dst' as const), v: fc.nat({ max: 0xffffffff }) }), fc.record({ f: fc.constant('ttl' as const), v: fc.nat(255) })), { maxLength: 6 }),
        (b, ops) => {
          const p = Ipv4Packet.check(b);
          if (typeof p === 'string') throw new Error(p);
          for (const op of ops) {
            if (op.f === 'src') p.setSrc(op.v);
            else if (op.f === 'dst') p.setDst(op.v);
            else p.setTtl(op.v);
          }
          expect(checksum(b, 0, 20)).toBe(0);
          expect(p.checksum).toBe(fullChecksum(b));
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('rewrites a real header (the kernel echo request) like a full recomputation', () => {
    const f = hex(ECHO_REQUEST_TO_1);
    const p = Ipv4Packet.check(f.subarray(14));
    if (typeof p === 'string') throw new Error(p);
    p.setSrc(ip4('10.0.2.15'));
    p.setDst(ip4('10.0.2.2'));
    p.setTtl(63);
    expect(p.checksum).toBe(fullChecksum(f.subarray(14)));
    expect(Ipv4Packet.check(f.subarray(14))).toBeInstanceOf(Ipv4Packet);
  });
});

describe('sum16 fast path', () => {
  // The word-at-a-time sum must equal the textbook byte-pair loop for every length and alignment.
  const reference = (b: Uint8Array, off: number, len: number, initial: number) => {
    let s = initial;
    for (let i = 0; i < len; i += 2) s += (b[off + i]! << 8) | (i + 1 < len ? b[off + i + 1]! : 0);
    return s;
  };
  it('matches the byte-pair reference', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.nat(), fc.nat(), fc.nat({ max: 0xffffff }), (b, o, l, init) => {
        const off = b.length ? o % b.length : 0;
        const len = b.length - off ? l % (b.length - off + 1) : 0;
        expect(fold(sum16(b, off, len, init))).toBe(fold(reference(b, off, len, init)));
      }),
      { numRuns: 500 },
    );
  });
});
