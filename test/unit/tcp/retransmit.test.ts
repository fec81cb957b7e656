import { describe, expect, it } from 'vitest';
import { TcpState } from '../../../netstack/tcp/state.js';
import { pattern, RawPeer } from './harness.js';

const ACK = 0x10;

describe('TCP retransmission and loss recovery', () => {
  it('RTO: retransmits at 200 ms then backs off exponentially; ETIMEDOUT after maxRetries', () => {
    const p = new RawPeer({ maxRetries: 4 });
    p.handshake();
    let err = '';
    p.conn.on('error', (e) => (err = e.code));
    const t0 = p.clock.now();
    p.conn.write(pattern(1000));
    const [seg] = p.take();
    expect(seg!.payloadLen).toBe(1000);
    const times: number[] = [];
    for (let i = 0; i < 400 && p.conn.state !== TcpState.CLOSED; i++) {
      p.clock.advance(50);
      for (const s of p.take()) {
        expect(s.seq).toBe(seg!.seq);
        times.push(p.clock.now() - t0);
      }
    }
    // RTT measured ~0 in the handshake: RTO = the 200 ms floor, then 400, 800, 1600 (RFC 6298 §5.5).
    expect(times).toEqual([200, 600, 1400, 3000]);
    expect(err).toBe('ETIMEDOUT');
    expect(p.clock.now() - t0).toBe(3000 + 3200); // the 5th expiry gives up
    expect(p.conn.state).toBe(TcpState.CLOSED);
    expect(p.stack.stats().connections).toBe(0);
  });

  it("an ACK of new data restarts the timer and resets the backoff (Karn's rule: no sample from the retransmission)", () => {
    const p = new RawPeer({}, { mss: 1000 }); // no timestamps: RTT by timing one segment
    p.handshake();
    p.conn.write(pattern(500));
    p.clock.advance(200);
    p.clock.advance(400);
    expect(p.take().length).toBe(3); // original + retransmissions at 200 and 600 ms
    expect(p.conn.rtt.backoff).toBe(2);
    p.send({ ack: (p.ack + 500) >>> 0 });
    expect(p.conn.rtt.backoff).toBe(0);
    expect(p.conn.rtt.srtt).toBe(0); // only the handshake sample: the data segment was retransmitted
  });

  it('fast retransmit on the third duplicate ACK, then NewReno partial ACKs (no SACK)', () => {
    const p = new RawPeer({ congestion: 'newreno' }, { mss: 1000 });
    p.handshake();
    p.conn.write(pattern(10_000));
    const segs = p.take();
    expect(segs.length).toBe(10); // initial window: 10 segments (RFC 6928)
    const base = segs[0]!.seq;
    // Segments 1 and 3 lost; the receiver ACKs segment 0, then dupacks for 2, 4, 5, ...
    p.send({ ack: (base + 1000) >>> 0 });
    p.send({ ack: (base + 1000) >>> 0 });
    p.send({ ack: (base + 1000) >>> 0 });
    expect(p.take().length).toBe(0);
    p.send({ ack: (base + 1000) >>> 0 }); // third dupack
    const rtx = p.take();
    expect(rtx.length).toBe(1);
    expect(rtx[0]!.seq).toBe((base + 1000) >>> 0);
    expect(p.counters.get('tcp.fast_retransmit')).toBe(1);
    expect(p.conn.inRecovery).toBe(true);
    // Partial ACK (up to the second hole): retransmit it at once (RFC 6582).
    p.send({ ack: (base + 3000) >>> 0 });
    const rtx2 = p.take();
    expect(rtx2[0]!.seq).toBe((base + 3000) >>> 0);
    // Full ACK: recovery ends.
    p.send({ ack: (base + 10_000) >>> 0 });
    expect(p.conn.inRecovery).toBe(false);
    expect(p.counters.get('tcp.retransmit.timeouts')).toBe(0);
  });

  it('SACK recovery retransmits two holes of one window without waiting for an RTO (RFC 6675)', () => {
    const p = new RawPeer();
    p.handshake();
    const mss = p.conn.mss;
    p.conn.write(pattern(10 * mss));
    const segs = p.take();
    expect(segs.length).toBe(10);
    const s = (i: number): number => (segs[0]!.seq + i * mss) >>> 0;
    // Lost: 1 and 4. ACK segment 0, then SACK 2, 3, 5, 6, 7, 8, 9 as they "arrive".
    p.send({ ack: s(1) });
    const arrivals = [2, 3, 5, 6, 7, 8, 9];
    const blocks: Array<[number, number]> = [];
    const retransmitted: number[] = [];
    for (const i of arrivals) {
      const last = blocks.at(-1);
      if (last && last[1] === s(i)) last[1] = s(i + 1);
      else blocks.push([s(i), s(i + 1)]);
      const sb = [...blocks].reverse().flat();
      p.send({ ack: s(1), sackBlocks: sb.slice(0, 6) });
      for (const x of p.take()) if (x.payloadLen > 0) retransmitted.push(x.seq);
    }
    expect(retransmitted).toContain(s(1));
    expect(retransmitted).toContain(s(4));
    expect(retransmitted.filter((x) => x !== s(1) && x !== s(4))).toEqual([]);
    expect(p.counters.get('tcp.fast_retransmit')).toBe(1);
    p.send({ ack: s(10) });
    expect(p.conn.inRecovery).toBe(false);
    expect(p.counters.get('tcp.retransmit.timeouts')).toBe(0);
    expect(p.conn.bufferedAmount).toBe(0);
  });

  it('ignores SACK blocks outside (snd.una, snd.max] (RFC 2883 D-SACK, bogus blocks)', () => {
    const p = new RawPeer();
    p.handshake();
    p.conn.write(pattern(3000));
    const [s0] = p.take();
    p.send({ ack: s0!.seq, sackBlocks: [(s0!.seq + 100_000) >>> 0, (s0!.seq + 200_000) >>> 0, (s0!.seq - 10) >>> 0, s0!.seq] });
    expect(p.conn.sb.isEmpty).toBe(true);
    void ACK;
  });
});
