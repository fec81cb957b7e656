/** ICMPv4 (RFC 792) against messages produced by ping and the Linux kernel (see fixtures/captured.ts). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { checksum } from '../../netstack/wire/checksum.js';
import { ICMP_HLEN, IcmpPacket, type IcmpRepr, IcmpType, UnreachCode, emitIcmp, icmpLen, icmpQuote, parseIcmp } from '../../netstack/wire/icmpv4.js';
import * as C from '../fixtures/captured.js';
import { hex, hostileBytes, inRange, toHex, within } from '../helpers/frames.js';

/** The ICMP message of a captured frame with a 20-byte IP header. */
const icmpOf = (h: string) => hex(h).subarray(34);
function must(b: Uint8Array): IcmpPacket {
  const p = IcmpPacket.check(b);
  if (typeof p === 'string') throw new Error(p);
  return p;
}

describe('IcmpPacket on real messages', () => {
  it("deconstructs ping's echo request", () => {
    const p = must(icmpOf(C.ECHO_REQUEST_TO_1));
    expect(p.type).toBe(IcmpType.EchoRequest);
    expect(p.code).toBe(0);
    expect(p.checksum).toBe(0x8753);
    expect(p.ident).toBe(0x34f2);
    expect(p.seq).toBe(1);
    expect(p.isError).toBe(false);
    expect(p.payload.length).toBe(56);
    // iputils fills the data after its 16-byte timestamp with 0x10, 0x11, ...
    expect(p.payload[16]).toBe(0x10);
    expect(p.payload[55]).toBe(0x37);
  });

  it("deconstructs the kernel's port unreachable", () => {
    const p = must(icmpOf(C.ICMP_PORT_UNREACHABLE));
    expect(p.type).toBe(IcmpType.DestUnreachable);
    expect(p.code).toBe(UnreachCode.Port);
    expect(p.isError).toBe(true);
    // Linux quotes the whole offending datagram (up to 576 bytes total), here 32 bytes.
    expect(p.payload.length).toBe(32);
    expect(toHex(p.payload)).toBe(toHex(hex(C.UDP_TO_5001).subarray(14)));
  });

  it('parses, and constructs byte-identical messages from the repr (echo reply, port unreachable)', () => {
    const req = parseIcmp(must(icmpOf(C.ECHO_REQUEST_TO_1)));
    expect(req).toMatchObject({ type: IcmpType.EchoRequest, ident: 0x34f2, seq: 1 });
    if (req === null || !('data' in req)) throw new Error('not echo');
    // Our echo reply for the request equals the kernel's reply, checksum included.
    const reply: IcmpRepr = { type: IcmpType.EchoReply, ident: req.ident, seq: req.seq, data: req.data };
    const out = new Uint8Array(icmpLen(reply));
    expect(emitIcmp(reply, out)).toBe(64);
    expect(toHex(out)).toBe(toHex(icmpOf(C.ECHO_REPLY_FROM_1)));

    const unreach = parseIcmp(must(icmpOf(C.ICMP_PORT_UNREACHABLE)));
    expect(unreach).toEqual({ type: 3, code: 3, nextHopMtu: undefined, quote: hex(C.UDP_TO_5001).subarray(14) });
    const out2 = new Uint8Array(icmpLen(unreach!));
    emitIcmp(unreach!, out2);
    expect(toHex(out2)).toBe(toHex(icmpOf(C.ICMP_PORT_UNREACHABLE)));
  });

  it('verifies the checksum of a reassembled 1608-byte echo request', () => {
    const data = new Uint8Array(1608);
    data.set(hex(C.FRAG_REQUEST_1).subarray(34), 0);
    data.set(hex(C.FRAG_REQUEST_2).subarray(34), 1480);
    const p = must(data);
    expect(p.type).toBe(IcmpType.EchoRequest);
    expect(p.payload.length).toBe(1600);
  });

  it('builds an echo reply in place over the request without copying the data', () => {
    const b = icmpOf(C.ECHO_REQUEST_TO_1).slice();
    const p = must(b);
    emitIcmp({ type: IcmpType.EchoReply, ident: p.ident, seq: p.seq, data: b.subarray(ICMP_HLEN) }, b, 0);
    expect(toHex(b)).toBe(toHex(icmpOf(C.ECHO_REPLY_FROM_1)));
  });

  it('rejects truncation and bad checksums; ignores unknown types and bad echo codes', () => {
    expect(IcmpPacket.check(new Uint8Array(7))).toBe('truncated');
    const b = icmpOf(C.ECHO_REQUEST_TO_1).slice();
    b[20]! ^= 1;
    expect(IcmpPacket.check(b)).toBe('bad_checksum');
    expect(IcmpPacket.check(icmpOf(C.ECHO_REQUEST_TO_1).subarray(0, 63))).toBe('bad_checksum');
    const odd = new Uint8Array(8);
    for (const [t, c] of [[13, 0], [5, 1], [8, 1], [0, 9]]) {
      odd[0] = t!;
      odd[1] = c!;
      odd[2] = 0;
      odd[3] = 0;
      const s = checksum(odd, 0, 8);
      odd[2] = s >> 8;
      odd[3] = s & 0xff;
      expect(parseIcmp(must(odd))).toBeNull();
    }
  });

  it('icmpQuote takes the IP header plus 8 bytes (RFC 792)', () => {
    const ip = hex(C.UDP_TO_5000).subarray(14);
    const q = icmpQuote(ip, 20);
    expect(q.length).toBe(28);
    expect(within(q, ip)).toBe(true);
    const rr = hex(C.RR_ECHO_REQUEST).subarray(14);
    expect(icmpQuote(rr, 60).length).toBe(68);
    expect(icmpQuote(ip.subarray(0, 24), 20).length).toBe(24);
  });
});

describe('IcmpPacket properties', () => {
  const REAL = [C.ECHO_REQUEST_TO_1, C.ECHO_REPLY_FROM_1, C.ECHO_REQUEST_TO_254, C.ICMP_PORT_UNREACHABLE].map(icmpOf);

  it('never throws and every accessor stays in bounds', () => {
    fc.assert(
      fc.property(hostileBytes(REAL, 200), (b) => {
        const p = IcmpPacket.check(b);
        if (typeof p === 'string') {
          expect(['truncated', 'bad_checksum']).toContain(p);
          return;
        }
        for (const v of [p.type, p.code]) expect(inRange(v, 0xff)).toBe(true);
        for (const v of [p.checksum, p.ident, p.seq, p.nextHopMtu]) expect(inRange(v, 0xffff)).toBe(true);
        expect(within(p.payload, b) && p.payload.length === b.length - ICMP_HLEN).toBe(true);
        const r = parseIcmp(p);
        if (r !== null) expect(icmpLen(r)).toBe(b.length);
      }),
      { numRuns: 3000 },
    );
  });

  it('random bytes with a fixed-up checksum parse without throwing', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 8, maxLength: 100 }), (b) => {
        b[2] = 0;
        b[3] = 0;
        const s = checksum(b, 0, b.length);
        b[2] = s >> 8;
        b[3] = s & 0xff;
        const p = must(b);
        parseIcmp(p);
      }),
    );
  });

  it('emit then check+parse gives the repr back', () => {
    const u16 = fc.nat(0xffff);
    const bytes = fc.uint8Array({ maxLength: 600 });
    const repr: fc.Arbitrary<IcmpRepr> = fc.oneof(
      fc.record({ type: fc.constantFrom(IcmpType.EchoRequest, IcmpType.EchoReply), ident: u16, seq: u16, data: bytes }),
      fc.record({ type: fc.constant(IcmpType.DestUnreachable), code: fc.nat(15).filter((c) => c !== 4), quote: bytes }),
      fc.record({ type: fc.constant(IcmpType.DestUnreachable), code: fc.constant(4), nextHopMtu: u16, quote: bytes }),
      fc.record({ type: fc.constant(IcmpType.TimeExceeded), code: fc.nat(1), quote: bytes }),
    );
    fc.assert(
      fc.property(repr, (r) => {
        const b = new Uint8Array(icmpLen(r));
        expect(emitIcmp(r, b)).toBe(b.length);
        expect(parseIcmp(must(b))).toEqual(r);
      }),
    );
  });
});
