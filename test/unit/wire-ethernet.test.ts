/**
 * Ethernet II / 802.1Q views and reprs against real frames from the Linux kernel
 * (test/fixtures/captured.ts says how they were captured).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ETH_HLEN, EtherType, EthernetFrame, emitEthernet, ethernetHeaderLen, parseEthernet, writeEthernetHeader } from '../../netstack/wire/ethernet.js';
import * as C from '../fixtures/captured.js';
import { GUEST_MAC, GW_MAC, hex, hostileBytes, inRange, tagged, toHex, within } from '../helpers/frames.js';

const REAL = Object.values(C).map(hex);

describe('EthernetFrame on real frames', () => {
  it('deconstructs an untagged frame (the kernel echo request)', () => {
    const f = EthernetFrame.check(hex(C.ECHO_REQUEST_TO_1))!;
    expect(f).not.toBeNull();
    expect(f.dst).toEqual(GW_MAC);
    expect(f.src).toEqual(GUEST_MAC);
    expect(f.outerType).toBe(EtherType.IPv4);
    expect(f.tagged).toBe(false);
    expect(f.etherType).toBe(EtherType.IPv4);
    expect(f.headerLen).toBe(14);
    expect(f.payload.length).toBe(84);
    expect(f.payload[0]).toBe(0x45);
  });

  it('deconstructs a broadcast ARP frame', () => {
    const f = EthernetFrame.check(hex(C.ARP_REQUEST_FOR_1))!;
    expect(toHex(f.dst)).toBe('ffffffffffff');
    expect(f.etherType).toBe(EtherType.ARP);
    expect(f.payload.length).toBe(28);
  });

  it('deconstructs an 802.1Q-tagged frame (VID 10, PCP 5)', () => {
    // The test kernel has no 8021q module, so this is the kernel echo request with a tag
    // inserted the way an 802.1Q port inserts it (after the source MAC).
    const f = EthernetFrame.check(tagged(hex(C.ECHO_REQUEST_TO_1), (5 << 13) | 10))!;
    expect(f.tagged).toBe(true);
    expect(f.outerType).toBe(0x8100);
    expect(f.vlanTci & 0x0fff).toBe(10);
    expect(f.vlanTci >> 13).toBe(5);
    expect(f.etherType).toBe(EtherType.IPv4);
    expect(f.headerLen).toBe(18);
    expect(f.payload).toEqual(hex(C.ECHO_REQUEST_TO_1).subarray(14));
  });

  it('parses, and constructs the same header bytes from the repr (untagged and tagged)', () => {
    for (const raw of [hex(C.ECHO_REQUEST_TO_1), hex(C.ARP_REPLY_FROM_1), tagged(hex(C.UDP_TO_5000), 10)]) {
      const f = EthernetFrame.check(raw)!;
      const r = parseEthernet(f);
      expect(r.dst).toEqual(raw.subarray(0, 6));
      expect(r.src).toEqual(raw.subarray(6, 12));
      const out = new Uint8Array(ethernetHeaderLen(r));
      expect(emitEthernet(r, out)).toBe(f.headerLen);
      expect(toHex(out)).toBe(toHex(raw.subarray(0, f.headerLen)));
    }
    const r = parseEthernet(EthernetFrame.check(hex(C.ECHO_REQUEST_TO_1))!);
    expect(r).toEqual({ dst: GW_MAC, src: GUEST_MAC, etherType: 0x0800 });
    expect(r.vlanTci).toBeUndefined();
  });

  it('writeEthernetHeader builds the captured header', () => {
    const raw = hex(C.ECHO_REPLY_FROM_1);
    const out = new Uint8Array(14);
    writeEthernetHeader(out, 0, GUEST_MAC, GW_MAC, EtherType.IPv4);
    expect(toHex(out)).toBe(toHex(raw.subarray(0, 14)));
  });

  it('rejects runts and a tagged frame cut inside its tag', () => {
    expect(EthernetFrame.check(new Uint8Array(13))).toBeNull();
    expect(EthernetFrame.check(new Uint8Array(14))).not.toBeNull();
    const t = tagged(hex(C.ECHO_REQUEST_TO_1), 10);
    expect(EthernetFrame.check(t.subarray(0, 17))).toBeNull();
    expect(EthernetFrame.check(t.subarray(0, 18))!.payload.length).toBe(0);
  });

  it('keeps unknown EtherTypes as numbers', () => {
    const f = EthernetFrame.check(hex('ffffffffffff020000000002abcd'))!;
    expect(f.etherType).toBe(0xabcd);
    expect(parseEthernet(f).etherType).toBe(0xabcd);
  });

  // Regression (was a bug): the repr does not keep the TPID, so an 802.1ad (QinQ, 0x88a8) frame, which
  // `tagged` accepts, is re-emitted as 0x8100. Fix: keep `vlanTpid` in EthernetRepr (or treat
  // only 0x8100 as tagged).
  it('round-trips the TPID of a QinQ (0x88a8) frame', () => {
    const raw = tagged(hex(C.ECHO_REQUEST_TO_1), 10, EtherType.QinQ);
    const r = parseEthernet(EthernetFrame.check(raw)!);
    const out = new Uint8Array(ethernetHeaderLen(r));
    emitEthernet(r, out);
    expect(toHex(out)).toBe(toHex(raw.subarray(0, 18)));
  });
});

describe('EthernetFrame properties', () => {
  it('never throws on hostile bytes and every accessor stays in bounds', () => {
    const real = [...REAL, tagged(hex(C.ECHO_REQUEST_TO_1), 10)];
    fc.assert(
      fc.property(hostileBytes(real), (b) => {
        const f = EthernetFrame.check(b);
        if (f === null) {
          expect(b.length < ETH_HLEN || (b.length < 18 && [0x8100, 0x88a8].includes((b[12]! << 8) | b[13]!))).toBe(true);
          return;
        }
        expect(within(f.dst, b) && f.dst.length === 6).toBe(true);
        expect(within(f.src, b) && f.src.length === 6).toBe(true);
        expect(inRange(f.outerType, 0xffff)).toBe(true);
        expect(inRange(f.etherType, 0xffff)).toBe(true);
        if (f.tagged) expect(inRange(f.vlanTci, 0xffff)).toBe(true);
        expect(within(f.payload, b)).toBe(true);
        expect(f.payload.length).toBe(b.length - f.headerLen);
        const r = parseEthernet(f);
        expect(inRange(r.etherType, 0xffff)).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });

  it('emit then parse gives the repr back', () => {
    const macArb = fc.uint8Array({ minLength: 6, maxLength: 6 });
    fc.assert(
      fc.property(
        macArb,
        macArb,
        fc.nat(0xffff),
        fc.option(fc.nat(0xffff), { nil: undefined }),
        (dst, src, etherType, vlanTci) => {
          if (vlanTci === undefined && (etherType === 0x8100 || etherType === 0x88a8)) return;
          const r = vlanTci === undefined ? { dst, src, etherType } : { dst, src, etherType, vlanTci };
          const b = new Uint8Array(ethernetHeaderLen(r) + 4);
          expect(emitEthernet(r, b)).toBe(ethernetHeaderLen(r));
          const f = EthernetFrame.check(b)!;
          expect(parseEthernet(f)).toEqual(r);
        },
      ),
    );
  });
});
