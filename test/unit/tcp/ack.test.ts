import { describe, expect, it } from 'vitest';
import { emitTcp, newTcpRepr } from '../../../netstack/wire/tcp.js';
import { A_IP, B_IP, Pair, RawPeer } from './harness.js';

describe('TCP ACK policy and Nagle', () => {
  it('delayed ACK: quickack at the start, then every second full segment or after 40 ms', () => {
    const p = new RawPeer();
    p.handshake();
    const mss = 1448;
    // Quickack mode: the first segments are ACKed at once (Linux, to speed up slow start).
    for (let i = 0; i < 16; i++) p.send({}, new Uint8Array(100));
    const quick = p.take().length;
    expect(quick).toBe(15); // the SYN-ACK used one of the 16
    p.send({}, new Uint8Array(100));
    expect(p.take().length).toBe(0);
    p.clock.advance(39);
    expect(p.take().length).toBe(0);
    p.clock.advance(1);
    const [late] = p.take();
    expect(late!.ack).toBe(p.seq);
    // Two full segments in one batch: ACK at flush, no timer needed.
    p.send({}, new Uint8Array(mss));
    expect(p.take().length).toBe(0);
    p.send({}, new Uint8Array(mss));
    expect(p.take().length).toBe(1);
  });

  it('a batch of segments is acknowledged once, at flush()', () => {
    const p = new RawPeer();
    p.handshake();
    p.conn.quickAcks = 0;
    for (let i = 0; i < 10; i++) {
      // Without flush between segments: what the IPv4 layer does for one received batch.
      p.stack.input(B_IP, A_IP, buildSeg(p, 1448));
    }
    expect(p.take().length).toBe(0);
    p.stack.flush();
    const acks = p.take();
    expect(acks.length).toBe(1);
    expect(acks[0]!.ack).toBe(p.seq);
  });

  it('Nagle (opt-in): small segments wait for the ACK of outstanding data', () => {
    const p = new Pair({ nagle: true });
    const { ca } = p.open();
    ca.write(new Uint8Array(10));
    ca.write(new Uint8Array(10));
    ca.write(new Uint8Array(10));
    const sentFromA = (): number[] => p.ipA.sent.map((x) => x.seg.length - 32);
    expect(sentFromA()).toEqual([10]); // 20 bytes wait
    p.pump();
    expect(p.log.filter((l) => l.fromA && l.len > 0).map((l) => l.len)).toEqual([10, 20]);
    // Off by default; instead, autocorking holds a small write made while data is in flight
    // only until the end of the I/O turn (the deferred callback), not until an ACK.
    const deferred: (() => void)[] = [];
    const q = new Pair({ defer: (fn: () => void) => deferred.push(fn) });
    const { ca: cq } = q.open();
    cq.write(new Uint8Array(10));
    cq.write(new Uint8Array(10));
    cq.write(new Uint8Array(10));
    expect(q.ipA.sent.map((x) => x.seg.length - 32)).toEqual([10]);
    for (const f of deferred.splice(0)) f();
    expect(q.ipA.sent.map((x) => x.seg.length - 32)).toEqual([10, 20]);
  });
});

/** One data segment from the peer, emitted by hand so the test controls flush(). */
function buildSeg(p: RawPeer, n: number): Uint8Array {
  const r = { ...newTcpRepr(), srcPort: p.port, dstPort: 80, seq: p.seq, ack: p.ack, flags: 0x10, window: 65535, tsPresent: true, tsval: p.ts, tsecr: 0, payloadLen: n };
  const buf = new Uint8Array(60 + n);
  const len = emitTcp(r, new Uint8Array(n), buf, 0, B_IP, A_IP);
  p.seq = (p.seq + n) >>> 0;
  return buf.slice(0, len);
}
