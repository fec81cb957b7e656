import { describe, expect, it } from 'vitest';
import { Assembler } from '../../../netstack/tcp/assembler.js';
import { NewReno } from '../../../netstack/tcp/congestion.js';
import { Cubic } from '../../../netstack/tcp/cubic.js';
import { ByteRing } from '../../../netstack/tcp/ring.js';
import { RttEstimator } from '../../../netstack/tcp/rtt.js';
import { Scoreboard } from '../../../netstack/tcp/scoreboard.js';
import { seqGt, seqLt } from '../../../netstack/tcp/seq.js';

describe('TCP engine parts', () => {
  it('sequence comparisons survive wrap-around', () => {
    expect(seqLt(0xfffffff0, 0x10)).toBe(true);
    expect(seqGt(0x10, 0xfffffff0)).toBe(true);
    expect(seqLt(5, 5)).toBe(false);
  });

  it('RTT estimator follows RFC 6298 (alpha 1/8, beta 1/4, K 4) with a 200 ms floor', () => {
    const r = new RttEstimator(200);
    expect(r.rto).toBe(1000); // §2.1
    r.sample(100);
    expect(r.srtt).toBe(100);
    expect(r.rttvar).toBe(50);
    expect(r.rto).toBe(300); // 100 + 4*50
    r.sample(200);
    expect(r.rttvar).toBeCloseTo(0.75 * 50 + 0.25 * 100);
    expect(r.srtt).toBeCloseTo(0.875 * 100 + 0.125 * 200);
    r.onTimeout();
    r.onTimeout();
    expect(r.rto).toBeCloseTo(4 * (112.5 + 4 * 62.5));
    const small = new RttEstimator(200);
    small.sample(0.05);
    expect(small.rto).toBe(200);
    for (let i = 0; i < 20; i++) small.onTimeout();
    expect(small.rto).toBe(120_000); // capped
  });

  it('CUBIC: multiplicative decrease by 0.7, then the cubic curve back to W_max at t = K', () => {
    const mss = 1000;
    const c = new Cubic(mss);
    c.cwnd = 100 * mss;
    c.ssthresh = 100 * mss; // in congestion avoidance
    c.onLoss(100 * mss, 0);
    expect(c.cwnd).toBe(70 * mss);
    expect(c.ssthresh).toBe(70 * mss);
    const K = Math.cbrt((100 * 0.3) / 0.4); // ≈ 4.22 s
    // One window of ACKs per 100 ms RTT.
    let t = 0;
    const rtt = 100;
    const at: Record<string, number> = {};
    while (t <= 8000) {
      c.onAck(c.cwnd, t, rtt);
      t += rtt;
      if (Math.abs(t / 1000 - K / 2) < 0.05) at.half = c.cwnd / mss;
      if (Math.abs(t / 1000 - K) < 0.05) at.k = c.cwnd / mss;
    }
    // Concave: most of the way back by K/2, plateau near W_max at K, convex beyond.
    expect(at.half!).toBeGreaterThan(85);
    expect(at.half!).toBeLessThan(100);
    expect(at.k!).toBeGreaterThan(97);
    expect(at.k!).toBeLessThan(104);
    expect(c.cwnd / mss).toBeGreaterThan(110);
    // Fast convergence: a loss below the previous W_max lowers the plateau (§4.7).
    const d = new Cubic(mss);
    d.cwnd = 100 * mss;
    d.ssthresh = 1;
    d.onLoss(100 * mss, 0);
    d.cwnd = 80 * mss;
    d.onLoss(80 * mss, 0);
    expect(d.cwnd).toBe(56 * mss);
    d.onTimeout(56 * mss, 0);
    expect(d.cwnd).toBe(mss);
  });

  it('NewReno: slow start doubles per window, congestion avoidance adds one MSS per window', () => {
    const r = new NewReno(1000);
    expect(r.cwnd).toBe(10_000);
    r.onAck(10_000);
    expect(r.cwnd).toBe(20_000);
    r.onLoss(20_000);
    expect(r.cwnd).toBe(10_000);
    r.onAck(10_000);
    expect(r.cwnd).toBe(11_000);
  });

  it('assembler merges, bounds the number of holes, and pops contiguous data', () => {
    const a = new Assembler(3);
    expect(a.add(10, 20)).toBe(true);
    expect(a.add(30, 40)).toBe(true);
    expect(a.add(50, 60)).toBe(true);
    expect(a.add(70, 80)).toBe(false); // a 4th range
    expect(a.add(15, 35)).toBe(true); // merges two
    expect(a.ranges()).toEqual([[10, 40], [50, 60]]);
    expect(a.popFront()).toBe(0);
    a.add(0, 10);
    expect(a.popFront()).toBe(40);
    expect(a.ranges()).toEqual([[10, 20]]);
    const out: number[] = [];
    a.sackBlocks(1000, 4, out);
    expect(out).toEqual([1010, 1020]);
  });

  it('byte ring wraps, grows lazily and keeps out-of-order bytes across growth', () => {
    const r = new ByteRing(1 << 20);
    expect(r.capacity).toBe(0);
    r.append(new Uint8Array(3000).fill(1));
    r.consume(2500);
    r.append(new Uint8Array(3000).fill(2)); // wraps in a 4096 ring
    expect(r.capacity).toBe(4096);
    expect(r.ensure(3500 + 5000)).toBe(true); // grow with data beyond `length`
    r.writeAt(8000, new Uint8Array([7]));
    const out = new Uint8Array(1);
    r.copyOut(8000, 1, out, 0);
    expect(out[0]).toBe(7);
    const all = r.read(3500);
    expect(all.slice(0, 500).every((x) => x === 1)).toBe(true);
    expect(all.slice(500).every((x) => x === 2)).toBe(true);
    expect(r.ensure(2 << 20)).toBe(false);
  });

  it('byte ring copies small and large ranges across the wrap point alike', () => {
    // copyOut has a byte loop for a few bytes and subarray copies above: both must wrap.
    const r = new ByteRing(1 << 20);
    r.append(new Uint8Array(4000));
    r.consume(4000 - 20); // head near the end of the 4096 ring
    r.consume(20);
    const data = Uint8Array.from({ length: 200 }, (_, i) => i);
    r.append(data); // starts at 4000: wraps after 96 bytes
    for (const [pos, n] of [[0, 1], [90, 12], [95, 2], [60, 33], [0, 200], [80, 40]] as const) {
      const out = new Uint8Array(n + 2).fill(0xee);
      r.copyOut(pos, n, out, 1);
      expect([...out]).toEqual([0xee, ...data.slice(pos, pos + n), 0xee]);
    }
    expect([...r.read(5)]).toEqual([0, 1, 2, 3, 4]);
  });

  it('scoreboard: loss by RFC 6675 IsLost, pipe, next lost hole', () => {
    const sb = new Scoreboard();
    const mss = 100;
    // una = 0, sent up to 1000; SACKed 200-500 and 600-700.
    sb.update([200, 500, 600, 700], 0, 1000);
    expect(sb.sacked).toBe(400);
    expect(sb.isLost(0, mss)).toBe(true); // 400 > 2*100 above
    expect(sb.isLost(500, mss)).toBe(false); // only 100 above
    const o = { len: 0 };
    expect(sb.nextLost(0, 0, mss, o)).toBe(0);
    expect(o.len).toBe(200);
    expect(sb.nextLost(200, 0, mss, o)).toBe(-1);
    // pipe: hole 0-200 lost and not retransmitted (0), hole 500-600 not lost (100), tail 700-1000 (300).
    expect(sb.pipe(0, 1000, 0, mss)).toBe(400);
    expect(sb.pipe(0, 1000, 100, mss)).toBe(500); // 100 bytes of the lost hole retransmitted
    sb.advance(550);
    expect(sb.ranges()).toEqual([[600, 700]]);
  });
});
