import { describe, expect, it } from 'vitest';
import { TcpState } from '../../../netstack/tcp/state.js';
import { collect, Pair, RawPeer } from './harness.js';

const FIN = 0x01, SYN = 0x02, RST = 0x04, ACK = 0x10;

describe('TCP close, reset and timers', () => {
  it('half-close: A ends, B keeps sending, then B ends; A lingers in TIME_WAIT for 2MSL', () => {
    const p = new Pair();
    const { ca, cb } = p.open();
    const ra = collect(ca);
    const rb = collect(cb!);
    ca.end();
    p.pump();
    expect(ca.state).toBe(TcpState.FIN_WAIT_2);
    expect(cb!.state).toBe(TcpState.CLOSE_WAIT);
    expect(rb.ended).toBe(true);
    cb!.write(new Uint8Array([9, 8, 7]));
    p.pump();
    expect([...ra.bytes()]).toEqual([9, 8, 7]);
    cb!.end();
    p.pump();
    expect(cb!.state).toBe(TcpState.CLOSED);
    expect(ca.state).toBe(TcpState.TIME_WAIT);
    expect(ra.ended).toBe(true);
    p.run(59_999);
    expect(ca.state).toBe(TcpState.TIME_WAIT);
    p.run(2);
    expect(ca.state).toBe(TcpState.CLOSED);
    expect(p.a.stats().connections).toBe(0);
  });

  it('simultaneous close: FIN_WAIT_1 → CLOSING → TIME_WAIT on both sides (RFC 9293 §3.6 figure 13)', () => {
    const p = new Pair();
    const { ca, cb } = p.open();
    ca.end();
    cb!.end();
    expect(ca.state).toBe(TcpState.FIN_WAIT_1);
    // Deliver both FINs crossing each other: each side sees the other's FIN before the ACK of its own.
    const seen: string[] = [];
    p.setFaults({ filter: (r, fromA) => (seen.push(`${fromA ? 'a' : 'b'}:${r.flags}`), true) });
    p.pump();
    expect(ca.state).toBe(TcpState.TIME_WAIT);
    expect(cb!.state).toBe(TcpState.TIME_WAIT);
    expect(seen.slice(0, 2)).toEqual([`a:${FIN | ACK}`, `b:${FIN | ACK}`]);
  });

  it('FIN_WAIT_2 times out after finWait2Ms of silence', () => {
    const p = new Pair({ finWait2Ms: 5000 });
    const { ca, cb } = p.open();
    ca.end();
    p.pump();
    expect(ca.state).toBe(TcpState.FIN_WAIT_2);
    p.run(2000);
    cb!.write(new Uint8Array([1])); // activity restarts the idle clock
    p.pump();
    p.run(4999);
    expect(ca.state).toBe(TcpState.FIN_WAIT_2);
    p.run(2);
    expect(ca.state).toBe(TcpState.CLOSED);
    expect(p.ca.get('tcp.finwait2.timeout')).toBe(1);
  });

  it('RST: exact sequence resets; in-window gets a challenge ACK; out of window is ignored (RFC 5961 §3)', () => {
    const p = new RawPeer();
    p.handshake();
    let err = '';
    p.conn.on('error', (e) => (err = e.code));
    p.send({ flags: RST, seq: (p.seq + 5000) >>> 0 });
    let out = p.take();
    expect(out.length).toBe(1);
    expect(out[0]!.flags).toBe(ACK); // challenge ACK
    expect(out[0]!.ack).toBe(p.seq);
    expect(p.conn.state).toBe(TcpState.ESTABLISHED);
    expect(p.counters.get('tcp.drop.rst_invalid')).toBe(1);
    p.send({ flags: RST, seq: (p.seq + 100_000_000) >>> 0 });
    expect(p.take().length).toBe(0);
    expect(p.conn.state).toBe(TcpState.ESTABLISHED);
    expect(p.counters.get('tcp.drop.out_of_window')).toBe(1);
    p.send({ flags: RST, seq: p.seq });
    expect(p.conn.state).toBe(TcpState.CLOSED);
    expect(err).toBe('ECONNRESET');
    out = p.take();
    expect(out.length).toBe(0);
  });

  it('a SYN on an established connection gets a challenge ACK, not a reset (RFC 5961 §4)', () => {
    const p = new RawPeer();
    p.handshake();
    p.send({ flags: SYN, seq: (p.seq + 10) >>> 0, mss: 1460 });
    const out = p.take();
    expect(out.length).toBe(1);
    expect(out[0]!.flags).toBe(ACK);
    expect(p.conn.state).toBe(TcpState.ESTABLISHED);
  });

  it('challenge ACKs are rate-limited stack-wide (RFC 5961 §7)', () => {
    const p = new RawPeer({ challengeAckLimit: 10 });
    p.handshake();
    for (let i = 0; i < 50; i++) p.send({ flags: RST, seq: (p.seq + 1 + i) >>> 0 });
    expect(p.take().length).toBe(10);
    expect(p.counters.get('tcp.challenge_ack_limited')).toBe(40);
    p.clock.advance(1000);
    p.send({ flags: RST, seq: (p.seq + 1) >>> 0 });
    expect(p.take().length).toBe(1);
  });

  it('segments for no connection get RSTs per RFC 9293 §3.10.7.1; RSTs get nothing', () => {
    const p = new RawPeer();
    p.send({ flags: ACK, ack: 12345 }, new Uint8Array(10));
    let [r] = p.take();
    expect(r!.flags).toBe(RST);
    expect(r!.seq).toBe(12345);
    p.send({ flags: FIN, seq: 777, ack: 0 }, new Uint8Array(10));
    [r] = p.take();
    expect(r!.flags).toBe(RST | ACK);
    expect(r!.ack).toBe(777 + 10 + 1);
    p.send({ flags: RST, seq: 1 });
    expect(p.take().length).toBe(0);
    expect(p.counters.get('tcp.drop.no_socket')).toBe(3);
  });

  it('TIME_WAIT: a retransmitted FIN is re-ACKed; a new SYN with a newer timestamp reuses the tuple (RFC 6191)', () => {
    const p = new RawPeer({ timeWaitMs: 60_000 });
    p.handshake();
    const first = p.conn;
    first.end();
    const [fin] = p.take();
    expect(fin!.flags & FIN).toBe(FIN);
    p.ack = (p.ack + 1) >>> 0;
    p.ts += 10;
    p.send({ flags: FIN | ACK });
    p.seq = (p.seq + 1) >>> 0;
    expect(first.state).toBe(TcpState.TIME_WAIT);
    p.take();
    // Our ACK was lost: the peer retransmits its FIN.
    p.send({ flags: FIN | ACK, seq: (p.seq - 1) >>> 0 });
    const re = p.take();
    expect(re.length).toBe(1);
    expect(re[0]!.ack).toBe(p.seq);
    // An old SYN (same timestamp) does not reuse it.
    let offered = 0;
    p.stack.onSyn = (s) => {
      offered++;
      p.conn = s.accept();
    };
    p.send({ flags: SYN, seq: (p.seq + 1000) >>> 0, ack: 0, mss: 1460, tsval: p.ts, tsPresent: true });
    expect(offered).toBe(0);
    // A newer one does.
    p.ts += 100;
    p.send({ flags: SYN, seq: (p.seq + 1000) >>> 0, ack: 0, mss: 1460, tsval: p.ts, tsPresent: true, wscale: 7, sackPermitted: true });
    expect(offered).toBe(1);
    expect(p.counters.get('tcp.timewait.reused')).toBe(1);
    expect(p.conn).not.toBe(first);
    expect(p.conn.state).toBe(TcpState.SYN_RECEIVED);
    const out = p.take();
    expect(out.at(-1)!.flags).toBe(SYN | ACK);
  });

  it('TIME_WAIT reuse without timestamps needs a higher sequence number', () => {
    const p = new RawPeer({}, { mss: 1460 });
    p.handshake();
    p.conn.end();
    p.take();
    p.ack = (p.ack + 1) >>> 0;
    p.send({ flags: FIN | ACK });
    p.seq = (p.seq + 1) >>> 0;
    expect(p.conn.state).toBe(TcpState.TIME_WAIT);
    let offered = 0;
    p.stack.onSyn = (s) => {
      offered++;
      s.drop();
    };
    p.send({ flags: SYN, seq: (p.seq - 100) >>> 0, ack: 0 });
    expect(offered).toBe(0);
    p.send({ flags: SYN, seq: (p.seq + 100_000) >>> 0, ack: 0 });
    expect(offered).toBe(1);
  });

  it('keepalive: probes after the idle time, answered probes keep it alive, silence aborts', () => {
    const p = new Pair({ keepalive: { idleMs: 10_000, intervalMs: 1000, probes: 3 } });
    const { ca } = p.open();
    let err = '';
    ca.on('error', (e) => (err = e.code));
    p.run(9_999);
    expect(p.ca.get('tcp.keepalive.probes')).toBe(0);
    p.run(2);
    expect(p.ca.get('tcp.keepalive.probes')).toBe(1);
    const probe = p.log.at(-2)!;
    expect(probe.fromA).toBe(true);
    expect(probe.r.seq).toBe((ca.sndUna - 1) >>> 0); // SEG.SEQ = SND.UNA - 1, no data
    expect(p.log.at(-1)!.fromA).toBe(false); // B answered with an ACK
    p.run(10_000);
    expect(p.ca.get('tcp.keepalive.probes')).toBe(2);
    expect(ca.state).toBe(TcpState.ESTABLISHED);
    // B vanishes.
    p.setFaults({ filter: () => false });
    p.run(10_000 + 3 * 1000 + 1);
    expect(err).toBe('ETIMEDOUT');
    expect(ca.state).toBe(TcpState.CLOSED);
  });

  it('destroy() sends RST and the peer reports ECONNRESET', () => {
    const p = new Pair();
    const { ca, cb } = p.open();
    let err = '';
    let hadError: boolean | null = null;
    cb!.on('error', (e) => (err = e.code));
    cb!.on('close', (h) => (hadError = h));
    ca.destroy();
    p.pump();
    expect(err).toBe('ECONNRESET');
    expect(hadError).toBe(true);
    expect(p.a.stats().connections + p.b.stats().connections).toBe(0);
  });
});
