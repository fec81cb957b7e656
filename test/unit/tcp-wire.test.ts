import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ip4 } from '../../netstack/addr.js';
import {
  emitTcp, newTcpRepr, parseTcp, parseTcpInto, TcpFlag, TcpSegment, tcpHeaderLen, type TcpRepr,
} from '../../netstack/wire/tcp.js';

const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));

// Captured with tcpdump on a veth pair between two network namespaces (TX checksum offload
// off, so checksums are final): `curl http://10.99.0.2:8080/` against
// `socat TCP-LISTEN:8080 SYSTEM:'echo hello'`, Linux 6.x. TCP header + payload only.
const CLIENT = ip4('10.99.0.1');
const SERVER = ip4('10.99.0.2');
const SYN = hex([
  'a674 1f90', //             src port 42612, dst port 8080
  'fb646bda 00000000', //     seq 4217662426, ack 0
  'a0 02 faf0', //            data offset 10 words (40 bytes), flags SYN, window 64240
  'cd9f 0000', //             checksum, urgent pointer
  '02 04 05b4', //            MSS 1460
  '04 02', //                 SACK permitted
  '08 0a aa42931d 00000000', // timestamps: tsval, tsecr 0
  '01 03 03 0a', //           NOP, window scale 10
].join(''));
const SYN_ACK = hex('1f90a67413f4f884fb646bdba012fe8892350000020405b40402080a5630d517aa42931d0103030a');
/** curl's request: ACK|PSH, 78 bytes of "GET / HTTP/1.1 ...". */
const REQUEST = hex('a6741f90fb646bdb13f4f8858018003f398e00000101080aaa42931d5630d517474554202f20485454502f312e310d0a486f73743a2031302e39392e302e323a383038300d0a557365722d4167656e743a206375726c2f372e38382e310d0a4163636570743a202a2f2a0d0a0d0a');
/** The server's "hello\n". */
const REPLY = hex('1f90a67413f4f885fb646c29801800407ada00000101080a5630d552aa42931d68656c6c6f0a');
const FIN = hex('1f90a67413f4f88bfb646c2980110040be8200000101080a5630d552aa429358');

describe('TCP wire format', () => {
  it('SYN from Linux: view, parse, checksum, emit byte-identical', () => {
    const raw = hex('a6741f90fb646bda00000000a002faf0cd9f0000020405b40402080aaa42931d000000000103030a');
    expect(Buffer.compare(SYN, raw)).toBe(0); // the annotation is the capture
    const v = TcpSegment.check(raw) as TcpSegment;
    expect(v.srcPort).toBe(42612);
    expect(v.dstPort).toBe(8080);
    expect(v.seq).toBe(4217662426);
    expect(v.headerLen).toBe(40);
    expect(v.flags).toBe(TcpFlag.SYN);
    expect(v.window).toBe(64240);
    expect(v.verifyChecksum(CLIENT, SERVER)).toBe(true);
    const r = parseTcp(raw)!;
    expect(r).toMatchObject({ mss: 1460, wscale: 10, sackPermitted: true, tsPresent: true, tsval: 0xaa42931d, tsecr: 0, payloadLen: 0 });
    const out = new Uint8Array(60);
    const n = emitTcp(r, null, out, 0, CLIENT, SERVER);
    expect(Buffer.from(out.subarray(0, n)).toString('hex')).toBe(Buffer.from(raw).toString('hex'));
  });

  it('SYN-ACK, data, reply and FIN from Linux round-trip through parse/emit', () => {
    for (const [seg, src, dst] of [
      [SYN_ACK, SERVER, CLIENT], [REQUEST, CLIENT, SERVER], [REPLY, SERVER, CLIENT], [FIN, SERVER, CLIENT],
    ] as const) {
      expect(new TcpSegment(seg).verifyChecksum(src, dst)).toBe(true);
      const r = parseTcp(seg)!;
      const payload = seg.subarray(r.headerLen);
      const out = new Uint8Array(seg.length);
      const n = emitTcp(r, payload, out, 0, src, dst);
      expect(n).toBe(seg.length);
      expect(Buffer.from(out).toString('hex')).toBe(Buffer.from(seg).toString('hex'));
    }
    const req = parseTcp(REQUEST)!;
    expect(req.flags).toBe(TcpFlag.ACK | TcpFlag.PSH);
    expect(req.payloadLen).toBe(78);
    expect(req.window).toBe(63); // scaled by 2^10 on that connection
    expect(Buffer.from(REPLY.subarray(parseTcp(REPLY)!.headerLen)).toString()).toBe('hello\n');
    expect(parseTcp(FIN)!.flags).toBe(TcpFlag.ACK | TcpFlag.FIN);
    // A flipped bit fails the checksum.
    const bad = REPLY.slice();
    bad[25] = bad[25]! ^ 1;
    expect(new TcpSegment(bad).verifyChecksum(SERVER, CLIENT)).toBe(false);
  });

  it('rejects malformed headers and option lengths; skips unknown options', () => {
    expect(parseTcp(new Uint8Array(19))).toBeNull();
    const base = SYN_ACK.slice();
    base[12] = 0x40; // data offset 4
    expect(parseTcp(base)).toBeNull();
    const past = SYN_ACK.slice(0, 30); // data offset 10 but only 30 bytes
    expect(TcpSegment.check(past)).toBe('bad_offset');
    const r = newTcpRepr();
    const overrun = SYN_ACK.slice();
    overrun[21] = 40; // MSS option claiming 40 bytes
    expect(parseTcpInto(overrun, r)).toBe('bad_option');
    const zeroLen = SYN_ACK.slice();
    zeroLen[21] = 0;
    expect(parseTcpInto(zeroLen, r)).toBe('bad_option');
    // Unknown option kind 0xfd (experimental), length 4, then END.
    const unk = hex('1f90a67413f4f884fb646bdb6012fe8800000000fd04abcd');
    expect(parseTcp(unk)).toMatchObject({ mss: 0, wscale: -1, headerLen: 24 });
    // Known kind with a wrong length is ignored, not trusted.
    const wrong = hex('1f90a67413f4f884fb646bdb6012fe880000000002030500');
    expect(parseTcp(wrong)!.mss).toBe(0);
  });

  it('window scale above 14 is clamped (RFC 7323 §2.3)', () => {
    const s = SYN_ACK.slice();
    s[39] = 20;
    expect(parseTcp(s)!.wscale).toBe(14);
  });

  it('property: parse never throws and never depends on bytes past the segment', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 80 }), fc.uint8Array({ minLength: 1, maxLength: 16 }), (bytes, tail) => {
        // Place the segment at the start of a larger buffer whose tail is random: a parser
        // that reads past the view would see the tail and produce a different result.
        const big = new Uint8Array(bytes.length + tail.length);
        big.set(bytes);
        big.set(tail, bytes.length);
        const view = big.subarray(0, bytes.length);
        const a = parseTcp(bytes);
        const b = parseTcp(view);
        expect(b).toEqual(a);
        if (a) {
          expect(a.headerLen).toBeGreaterThanOrEqual(20);
          expect(a.headerLen + a.payloadLen).toBe(bytes.length);
          expect(a.sackBlocks.length).toBeLessThanOrEqual(8);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('property: parse(emit(repr)) is the identity on the fields', () => {
    const u32 = fc.integer({ min: 0, max: 0xffffffff });
    const arbRepr = fc.record({
      srcPort: fc.integer({ min: 1, max: 65535 }),
      dstPort: fc.integer({ min: 1, max: 65535 }),
      seq: u32,
      ack: u32,
      flags: fc.integer({ min: 0, max: 255 }),
      window: fc.integer({ min: 0, max: 65535 }),
      urgent: fc.integer({ min: 0, max: 65535 }),
      mss: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 65535 })),
      wscale: fc.integer({ min: -1, max: 14 }),
      sackPermitted: fc.boolean(),
      tsPresent: fc.boolean(),
      tsval: u32,
      tsecr: u32,
      nBlocks: fc.integer({ min: 0, max: 4 }),
      blocks: fc.array(u32, { minLength: 8, maxLength: 8 }),
      payload: fc.uint8Array({ maxLength: 64 }),
    });
    fc.assert(
      fc.property(arbRepr, (x) => {
        const r: TcpRepr = {
          ...newTcpRepr(), ...x,
          sackBlocks: x.blocks.slice(0, 2 * x.nBlocks),
          tsval: x.tsPresent ? x.tsval : 0, tsecr: x.tsPresent ? x.tsecr : 0,
          payloadLen: x.payload.length,
        };
        // Options must fit in 40 bytes; SACK blocks are trimmed to 3 beside timestamps.
        if (tcpHeaderLen(r) > 60) return;
        const buf = new Uint8Array(60 + x.payload.length);
        const n = emitTcp(r, x.payload, buf, 0, 1, 2);
        const seg = buf.subarray(0, n);
        expect(new TcpSegment(seg).verifyChecksum(1, 2)).toBe(true);
        const p = parseTcp(seg)!;
        const maxBlocks = r.tsPresent ? 3 : 4;
        expect(p).toMatchObject({
          srcPort: r.srcPort, dstPort: r.dstPort, seq: r.seq, ack: r.ack, flags: r.flags, window: r.window,
          urgent: r.urgent, mss: r.mss, wscale: r.wscale, sackPermitted: r.sackPermitted, tsPresent: r.tsPresent,
          tsval: r.tsval, tsecr: r.tsecr, payloadLen: x.payload.length,
        });
        expect(p.sackBlocks).toEqual(r.sackBlocks.slice(0, 2 * Math.min(maxBlocks, x.nBlocks)));
        expect(Buffer.compare(seg.subarray(p.headerLen), x.payload)).toBe(0);
      }),
      { numRuns: 2000 },
    );
  });
});
