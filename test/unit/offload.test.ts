/**
 * Software offloads (netstack/link/offload.ts): what a device without checksum/TSO offload
 * receives must be exactly what a kernel's GSO layer would have produced.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ip4 } from '../../netstack/addr.js';
import { Counters } from '../../netstack/counters.js';
import { CSUM_PARTIAL, GSO_NONE, GSO_TCPV4, newFrameMeta } from '../../netstack/link/link.js';
import { needsSoftware, softwareOffload } from '../../netstack/link/offload.js';
import { checksum, finish, pseudoSum4, sum16 } from '../../netstack/wire/checksum.js';
import { EtherType, writeEthernetHeader } from '../../netstack/wire/ethernet.js';
import { IpProto, Ipv4Packet, emitIpv4 } from '../../netstack/wire/ipv4.js';
import { TcpFlag, emitTcp, newTcpRepr } from '../../netstack/wire/tcp.js';

const SRC = ip4('192.168.127.254');
const DST = ip4('192.168.127.2');
const MAC_A = new Uint8Array([2, 0, 0, 0, 0, 1]);
const MAC_B = new Uint8Array([2, 0, 0, 0, 0, 2]);

/** A TCP super-segment as the gateway emits it: partial checksum, TSO meta. */
function superSegment(payload: Uint8Array, seq: number, flags: number, withTs: boolean) {
  const buf = new Uint8Array(14 + 20 + 60 + payload.length);
  const r = newTcpRepr();
  r.srcPort = 5201;
  r.dstPort = 40000;
  r.seq = seq;
  r.ack = 777;
  r.flags = flags;
  r.window = 1000;
  r.tsPresent = withTs;
  r.tsval = 1;
  r.tsecr = 2;
  r.payloadLen = payload.length;
  const hlenGuess = 14 + 20;
  const n = emitTcp(r, payload, buf, hlenGuess, SRC, DST, true);
  emitIpv4({ src: SRC, dst: DST, protocol: IpProto.TCP, payloadLen: n, ttl: 64, ident: 100 }, buf, 14);
  writeEthernetHeader(buf, 0, MAC_B, MAC_A, EtherType.IPv4);
  const frame = buf.subarray(0, 34 + n);
  const meta = newFrameMeta();
  meta.flags = CSUM_PARTIAL;
  meta.csumStart = 34;
  meta.csumOffset = 16;
  meta.gsoType = GSO_TCPV4;
  meta.hdrLen = 34 + (n - payload.length);
  return { frame, meta, hdr: n - payload.length };
}

function tcpChecksumOk(ipPkt: Ipv4Packet): boolean {
  const seg = ipPkt.payload;
  return finish(sum16(seg, 0, seg.length, pseudoSum4(ipPkt.src, ipPkt.dst, 6, seg.length))) === 0;
}

describe('software offloads', () => {
  it('knows when a link needs them', () => {
    const m = newFrameMeta();
    m.flags = CSUM_PARTIAL;
    expect(needsSoftware(m, undefined)).toBe(true);
    expect(needsSoftware(m, { csum: true, tso4: false })).toBe(false);
    m.gsoType = GSO_TCPV4;
    expect(needsSoftware(m, { csum: true, tso4: false })).toBe(true);
    expect(needsSoftware(m, { csum: true, tso4: true })).toBe(false);
  });

  it('completes a partial checksum', () => {
    const p = new Uint8Array(1000).map((_, i) => i * 31);
    const { frame, meta } = superSegment(p, 1, TcpFlag.ACK | TcpFlag.PSH, true);
    meta.gsoType = GSO_NONE;
    const out: Uint8Array[] = [];
    softwareOffload(frame, meta, new Counters(), (f) => out.push(f.slice()));
    expect(out).toHaveLength(1);
    expect(tcpChecksumOk(new Ipv4Packet(out[0]!.subarray(14)))).toBe(true);
  });

  it('cuts super-segments exactly as GSO would', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 60000 }),
        fc.integer({ min: 536, max: 1460 }),
        fc.nat(),
        fc.boolean(),
        fc.boolean(),
        (len, mss, seq, fin, ts) => {
          const payload = new Uint8Array(len).map((_, i) => (i * 7 + 3) & 255);
          const flags = TcpFlag.ACK | TcpFlag.PSH | (fin ? TcpFlag.FIN : 0);
          const { frame, meta, hdr } = superSegment(payload, seq >>> 0, flags, ts);
          meta.gsoSize = mss;
          const out: Uint8Array[] = [];
          softwareOffload(frame, meta, new Counters(), (f) => out.push(f.slice()));
          expect(out.length).toBe(Math.ceil(len / mss));
          const joined: number[] = [];
          out.forEach((f, i) => {
            const ipPkt = Ipv4Packet.check(f.subarray(14));
            expect(ipPkt).toBeInstanceOf(Ipv4Packet);
            const p = ipPkt as Ipv4Packet;
            expect(checksum(f, 14, 20)).toBe(0);
            expect(tcpChecksumOk(p)).toBe(true);
            expect(p.totalLen).toBeLessThanOrEqual(20 + hdr + mss);
            const seg = p.payload;
            const s = ((seg[4]! << 24) | (seg[5]! << 16) | (seg[6]! << 8) | seg[7]!) >>> 0;
            expect(s).toBe(((seq >>> 0) + i * mss) >>> 0);
            const last = i === out.length - 1;
            expect((seg[13]! & TcpFlag.FIN) !== 0).toBe(fin && last);
            expect((seg[13]! & TcpFlag.PSH) !== 0).toBe(last);
            joined.push(...seg.subarray(hdr));
          });
          expect(Uint8Array.from(joined)).toEqual(payload);
        },
      ),
      { numRuns: 60 },
    );
  });
});
