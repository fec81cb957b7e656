import { describe, expect, it } from 'vitest';
import { wscaleFor } from '../../../netstack/tcp/connection.js';
import { collect, Pair, pattern, RawPeer, writeAll } from './harness.js';

describe('TCP receive path', () => {
  it('out-of-order and overlapping segments are reassembled; SACK blocks describe the holes', () => {
    const p = new RawPeer();
    p.handshake();
    const rx = collect(p.conn);
    const data = pattern(400);
    const base = p.seq;
    const part = (a: number, b: number): void => p.send({ seq: (base + a) >>> 0 }, data.subarray(a, b), false);
    part(0, 100);
    let out = p.take();
    expect(out.at(-1)!.ack).toBe((base + 100) >>> 0);
    part(200, 300); // gap 100..200: immediate dupack with SACK
    out = p.take();
    expect(out.length).toBe(1);
    expect(out[0]!.ack).toBe((base + 100) >>> 0);
    expect(out[0]!.sackBlocks).toEqual([(base + 200) >>> 0, (base + 300) >>> 0]);
    part(350, 400); // a second hole
    out = p.take();
    // The most recent block first (RFC 2018 §4), then the older one.
    expect(out[0]!.sackBlocks).toEqual([(base + 350) >>> 0, (base + 400) >>> 0, (base + 200) >>> 0, (base + 300) >>> 0]);
    part(150, 250); // overlaps the first block's start
    out = p.take();
    expect(out[0]!.sackBlocks).toEqual([(base + 150) >>> 0, (base + 300) >>> 0, (base + 350) >>> 0, (base + 400) >>> 0]);
    part(50, 160); // overlaps delivered data and fills the first hole
    out = p.take();
    expect(out.at(-1)!.ack).toBe((base + 300) >>> 0);
    expect(out.at(-1)!.sackBlocks).toEqual([(base + 350) >>> 0, (base + 400) >>> 0]);
    part(290, 360);
    out = p.take();
    expect(out.at(-1)!.ack).toBe((base + 400) >>> 0);
    expect(out.at(-1)!.sackBlocks).toEqual([]);
    expect(Buffer.compare(rx.bytes(), data)).toBe(0);
    // An old duplicate is ACKed at once (RFC 5681 §4.2) and changes nothing.
    part(0, 100);
    expect(p.take().length).toBe(1);
    expect(rx.length()).toBe(400);
  });

  it('memory stays bounded under a flood of out-of-order segments', () => {
    const p = new RawPeer({ rcvBuf: 256 * 1024, maxOooRanges: 32 });
    p.handshake();
    const base = p.seq;
    const one = new Uint8Array(1);
    // 2000 one-byte segments at scattered offsets inside the window (every 4th byte, descending).
    for (let i = 2000; i > 0; i--) p.send({ seq: (base + 10 + i * 4) >>> 0 }, one, false);
    expect(p.conn.asm.rangeCount).toBeLessThanOrEqual(32);
    expect(p.counters.get('tcp.drop.ooo_holes')).toBe(2000 - 32);
    // And beyond the window: dropped without storing anything.
    for (let i = 0; i < 100; i++) p.send({ seq: (base + 300 * 1024 + i * 1000) >>> 0 }, new Uint8Array(1000), false);
    expect(p.counters.get('tcp.drop.out_of_window')).toBe(100);
    expect(p.conn.rcvRing.capacity).toBeLessThanOrEqual(256 * 1024 + 128 * 1024);
    // Out-of-order bytes never consume more than the receive buffer itself.
    expect(p.conn.rcvRing.capacity).toBeLessThanOrEqual(p.conn.rcvRing.max);
  });

  it('PAWS drops a segment with an old timestamp (RFC 7323 §5)', () => {
    const p = new RawPeer();
    p.handshake();
    const rx = collect(p.conn);
    p.ts = 500;
    p.send({}, new Uint8Array([1, 2, 3]));
    p.take();
    p.ts = 400; // older than TS.Recent
    p.send({}, new Uint8Array([4, 5, 6]));
    expect(p.counters.get('tcp.drop.paws')).toBe(1);
    const acks = p.take();
    expect(acks.length).toBe(1); // answered with an ACK
    expect([...rx.bytes()]).toEqual([1, 2, 3]);
  });

  it('window scaling: the shift follows the buffer; peer windows are scaled; ours cover the buffer', () => {
    expect(wscaleFor(65535)).toBe(0);
    expect(wscaleFor(65536)).toBe(1);
    expect(wscaleFor(4 * 1024 * 1024)).toBe(7);
    expect(wscaleFor(1 << 30)).toBe(14);
    const p = new RawPeer({}, { mss: 1460, wscale: 3, sackPermitted: true, tsPresent: true });
    const synack = p.handshake(1000);
    expect(synack.wscale).toBe(7);
    expect(synack.window).toBe(65535); // unscaled in the SYN-ACK
    expect(p.conn.sndWnd).toBe(8000); // 1000 << 3 from the first non-SYN segment on
    p.send({ window: 20000 }, new Uint8Array(10));
    const [ack] = p.take();
    // 4 MiB buffer >> 7, rounded up so the right edge never moves left.
    expect(ack!.window).toBe(Math.ceil((4 * 1024 * 1024) / 128));
    expect(p.conn.sndWnd).toBe(160000);
  });

  it('zero window: a paused receiver closes the window, the sender probes with backoff, resume() reopens', () => {
    const p = new Pair({}, { rcvBuf: 128 * 1024 });
    const { ca, cb } = p.open();
    const rx = collect(cb!);
    cb!.pause();
    const data = pattern(400 * 1024);
    writeAll(ca, data);
    p.run(100);
    expect(rx.length()).toBe(0);
    // Sender SWS avoidance holds back the last sliver (< 1 MSS) of the window...
    expect(cb!.rcvRing.length).toBeGreaterThan(128 * 1024 - ca.mss);
    p.run(300);
    // ...until the override timeout sends it: then the buffer is exactly full.
    expect(cb!.rcvRing.length).toBe(128 * 1024);
    expect(ca.sndWnd).toBe(0);
    const lastAck = p.log.filter((l) => !l.fromA).at(-1)!;
    expect(lastAck.r.window).toBe(0);
    // Persist timer: probes with exponential backoff; never an abort while answered.
    const probesAt: number[] = [];
    const t0 = p.clock.now();
    for (let i = 0; i < 200; i++) {
      const before = p.ca.get('tcp.zero_window_probe');
      p.run(100);
      if (p.ca.get('tcp.zero_window_probe') > before) probesAt.push(Math.round(p.clock.now() - t0));
    }
    expect(probesAt.length).toBeGreaterThanOrEqual(4);
    const gaps = probesAt.slice(1).map((t, i) => t - probesAt[i]!);
    for (let i = 1; i < gaps.length; i++) expect(gaps[i]!).toBeGreaterThanOrEqual(gaps[i - 1]!);
    expect(ca.state).toBe('FIN_WAIT_1');
    expect(rx.length()).toBe(0);
    // Resume: the buffered data is delivered, a window update goes out, the rest follows.
    cb!.resume();
    p.run(5000, () => rx.ended);
    expect(rx.ended).toBe(true);
    expect(Buffer.compare(rx.bytes(), data)).toBe(0);
    expect(p.cb.get('tcp.window_update')).toBeGreaterThanOrEqual(1);
  });

  it('zero-window probing never gives up while the receiver answers, but does when it goes silent', () => {
    const p = new Pair({ maxRetries: 3 }, { rcvBuf: 64 * 1024 });
    const { ca, cb } = p.open();
    cb!.pause();
    let err = '';
    ca.on('error', (e) => (err = e.code));
    ca.write(pattern(200 * 1024));
    p.run(10 * 60_000); // ten minutes of answered probes, far beyond maxRetries
    expect(ca.state).toBe('ESTABLISHED');
    expect(p.ca.get('tcp.zero_window_probe')).toBeGreaterThan(3);
    p.setFaults({ filter: () => false });
    p.run(10 * 60_000);
    expect(err).toBe('ETIMEDOUT');
  });

  it('backpressure on the sender: write() returns false above sndBuf and drain follows', () => {
    const p = new Pair({ sndBuf: 64 * 1024 });
    const { ca, cb } = p.open();
    const rx = collect(cb!);
    expect(ca.write(new Uint8Array(32 * 1024))).toBe(true);
    expect(ca.write(new Uint8Array(64 * 1024))).toBe(false);
    let drained = 0;
    ca.on('drain', () => drained++);
    p.run(1000);
    expect(drained).toBe(1);
    expect(rx.length()).toBe(96 * 1024);
  });
});

describe('TCP receive path: the direct sink (a bridged host socket)', () => {
  it('in-order data goes to the sink first; what it does not take follows as data, in order', () => {
    const p = new Pair();
    p.setFaults({ drop: 0.05, dup: 0.02, reorder: 0.1, seed: 11 });
    const { ca, cb } = p.open();
    const data = pattern(600_000, 3);
    let calls = 0;
    // The stream the application sees is what the sink took and what 'data' delivered, in
    // arrival order: one log for both. The sink takes everything, then half, then nothing, in
    // turn (a host socket filling up and draining).
    const log: Uint8Array[] = [];
    cb!.directSink = (d) => {
      const n = [d.length, Math.floor(d.length / 2), 0][calls++ % 3]!;
      if (n > 0) log.push(d.slice(0, n));
      return n;
    };
    cb!.on('data', (d) => log.push(d));
    let ended = false;
    cb!.on('end', () => (ended = true));
    writeAll(ca, data);
    p.run(20_000, () => ended);
    expect(ended).toBe(true);
    expect(Buffer.compare(Buffer.concat(log), data)).toBe(0);
    expect(cb!.bytesIn).toBe(data.length);
    expect(calls).toBeGreaterThan(10);
  });

  it('a paused connection does not use the sink (backpressure from the host socket)', () => {
    const p = new RawPeer();
    p.handshake();
    let sunk = 0;
    p.conn.directSink = (d) => ((sunk += d.length), d.length);
    p.conn.pause();
    const rx = collect(p.conn);
    p.send({}, pattern(1000), false);
    expect(sunk).toBe(0);
    p.conn.resume();
    expect(rx.length()).toBe(1000);
    p.send({ seq: (p.seq + 1000) >>> 0 }, pattern(500), false);
    expect(sunk).toBe(500);
  });
});
