import { describe, expect, it } from 'vitest';
import { TcpState } from '../../../netstack/tcp/state.js';
import { A_IP, B_IP, collect, Pair, RawPeer } from './harness.js';

const SYN = 0x02, RST = 0x04, ACK = 0x10;

describe('TCP limits and edge cases', () => {
  it('pending SYNs and connections are bounded; excess SYNs are dropped and counted', () => {
    const p = new RawPeer({ maxPendingSyns: 3, maxConnections: 5 });
    const held: Array<import('../../../netstack/tcp/stack.js').PendingSyn> = [];
    p.stack.onSyn = (s) => held.push(s);
    for (let i = 0; i < 5; i++) p.send({ flags: SYN, srcPort: 2000 + i, seq: 1, ack: 0 });
    expect(held.length).toBe(3);
    expect(p.counters.get('tcp.drop.syn_backlog')).toBe(2);
    for (const h of held) h.accept();
    held.length = 0;
    for (let i = 0; i < 5; i++) p.send({ flags: SYN, srcPort: 3000 + i, seq: 1, ack: 0 });
    for (const h of held) h.accept();
    expect(p.stack.stats().connections).toBe(5);
    expect(p.counters.get('tcp.drop.conn_limit')).toBe(3);
    expect(() => p.stack.connect({ localIp: A_IP, localPort: 1, remoteIp: B_IP, remotePort: 1 })).toThrow(/too many/);
  });

  it('SYN_RECEIVED: an unacceptable ACK gets <SEQ=SEG.ACK><CTL=RST>; an exact RST ends the half-open connection', () => {
    const p = new RawPeer();
    p.stack.onSyn = (s) => (p.conn = s.accept());
    p.send({ flags: SYN, seq: 100, ack: 0, mss: 1460 });
    const [synack] = p.take();
    p.send({ flags: ACK, seq: 101, ack: (synack!.seq + 99) >>> 0 });
    const [rst] = p.take();
    expect(rst!.flags).toBe(RST);
    expect(rst!.seq).toBe((synack!.seq + 99) >>> 0);
    expect(p.conn.state).toBe(TcpState.SYN_RECEIVED);
    // The bogus ACK did not widen what counts as acceptable.
    expect(p.conn.sndMax).toBe((synack!.seq + 1) >>> 0);
    let err = '';
    p.conn.on('error', (e) => (err = e.code));
    p.send({ flags: RST, seq: 101 });
    expect(p.conn.state).toBe(TcpState.CLOSED);
    expect(err).toBe('ECONNRESET');
  });

  it('an ACK for data never sent is answered with an ACK and dropped', () => {
    const p = new RawPeer();
    p.handshake();
    const rx = collect(p.conn);
    p.send({ ack: (p.ack + 1000) >>> 0 }, new Uint8Array([1, 2, 3]), false);
    const [ack] = p.take();
    expect(ack!.flags).toBe(ACK);
    expect(p.counters.get('tcp.drop.bad_ack')).toBe(1);
    expect(rx.length()).toBe(0);
  });

  it('data written before the handshake completes is sent once it does; end() before connect closes after it', () => {
    const p = new Pair();
    let cb: import('../../../netstack/tcp/connection.js').TcpConnection | null = null;
    p.b.onSyn = (s) => (cb = s.accept());
    const ca = p.a.connect({ localIp: A_IP, localPort: 4321, remoteIp: B_IP, remotePort: 80 });
    expect(ca.write(new Uint8Array([1, 2, 3]))).toBe(true);
    ca.end();
    let got: number[] = [];
    let ended = false;
    p.b.onSyn = (s) => {
      cb = s.accept();
      cb.on('data', (d) => (got = [...got, ...d]));
      cb.on('end', () => (ended = true));
    };
    p.pump();
    expect(got).toEqual([1, 2, 3]);
    expect(ended).toBe(true);
    expect(ca.state).toBe(TcpState.FIN_WAIT_2);
    void cb;
  });

  it('write() after end() reports EPIPE', () => {
    const p = new Pair();
    const { ca } = p.open();
    ca.end();
    let err = '';
    ca.on('error', (e) => (err = e.code));
    expect(ca.write(new Uint8Array(1))).toBe(false);
    expect(err).toBe('EPIPE');
  });
});
