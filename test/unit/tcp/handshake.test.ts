import { describe, expect, it } from 'vitest';
import { TcpState } from '../../../netstack/tcp/state.js';
import { TcpFlag } from '../../../netstack/wire/tcp.js';
import { A_IP, B_IP, collect, inject, makeStack, FakeIp, Pair } from './harness.js';
import { ManualClock } from '../../../netstack/time.js';

const { SYN, ACK, RST, FIN } = TcpFlag;

describe('TCP handshake', () => {
  it('three-way handshake negotiates MSS, window scale, SACK and timestamps', () => {
    const p = new Pair();
    let connected = 0;
    const { ca, cb } = p.open();
    ca.on('connect', () => connected++);
    expect(ca.state).toBe(TcpState.ESTABLISHED);
    expect(cb!.state).toBe(TcpState.ESTABLISHED);
    const [syn, synack, ack] = p.log;
    expect(syn!.r.flags).toBe(SYN);
    expect(syn!.r.mss).toBe(1460);
    expect(syn!.r.wscale).toBe(7); // 4 MiB receive buffer
    expect(syn!.r.sackPermitted).toBe(true);
    expect(syn!.r.tsPresent).toBe(true);
    expect(syn!.r.window).toBe(65535);
    expect(synack!.r.flags).toBe(SYN | ACK);
    expect(synack!.r.ack).toBe((syn!.r.seq + 1) >>> 0);
    expect(synack!.r.wscale).toBe(7);
    expect(synack!.r.tsecr).toBe(syn!.r.tsval);
    expect(ack!.r.flags).toBe(ACK);
    expect(ca.sackOk && ca.tsOk && ca.wsAgreed).toBe(true);
    expect(ca.mss).toBe(1460 - 12);
    expect(p.log.length).toBe(3);
    expect(connected).toBe(0); // connect was emitted during open(), before this listener
  });

  it("options absent in the peer's SYN are not used (no window scaling: window capped at 65535)", () => {
    const clock = new ManualClock();
    const ip = new FakeIp();
    const { stack } = makeStack(clock, ip);
    let conn = null as null | import('../../../netstack/tcp/connection.js').TcpConnection;
    stack.onSyn = (s) => {
      expect(s.options).toEqual({ mss: 0, wscale: -1, sackPermitted: false, timestamps: false, window: 8192 });
      conn = s.accept();
    };
    inject(stack, A_IP, B_IP, { srcPort: 1234, dstPort: 80, seq: 100, flags: SYN, window: 8192 });
    const [synack] = ip.take();
    expect(synack!.flags).toBe(SYN | ACK);
    expect(synack!.wscale).toBe(-1);
    expect(synack!.sackPermitted).toBe(false);
    expect(synack!.tsPresent).toBe(false);
    expect(synack!.mss).toBe(1460);
    inject(stack, A_IP, B_IP, { srcPort: 1234, dstPort: 80, seq: 101, ack: synack!.seq + 1, flags: ACK, window: 8192 });
    expect(conn!.state).toBe(TcpState.ESTABLISHED);
    expect(conn!.mss).toBe(536); // RFC 9293 §3.7.1 default without an MSS option
    expect(conn!.rcvCap).toBe(65535);
    // Data: the window we advertise is the unscaled 16-bit value.
    inject(stack, A_IP, B_IP, { srcPort: 1234, dstPort: 80, seq: 101, ack: synack!.seq + 1, flags: ACK, window: 8192 }, new Uint8Array(100));
    const acks = ip.take();
    expect(acks.at(-1)!.ack).toBe(201);
    // Receiver SWS avoidance (RFC 9293 §3.8.6.2.2): 100 bytes read is less than one MSS, so
    // the right edge stays where it was and the window shows 65535 - 100.
    expect(acks.at(-1)!.window).toBe(65435);
  });

  it('SYN to a port without a handler gets RST,ACK (RFC 9293 §3.10.7.1)', () => {
    const p = new Pair();
    let err: string | null = null;
    let closed = false;
    const ca = p.a.connect({ localIp: A_IP, localPort: 5555, remoteIp: B_IP, remotePort: 81 });
    ca.on('error', (e) => (err = e.code));
    ca.on('close', () => (closed = true));
    p.pump();
    const rst = p.log[1]!.r;
    expect(rst.flags).toBe(RST | ACK);
    expect(rst.seq).toBe(0);
    expect(rst.ack).toBe((p.log[0]!.r.seq + 1) >>> 0);
    expect(err).toBe('ECONNREFUSED');
    expect(closed).toBe(true);
    expect(ca.state).toBe(TcpState.CLOSED);
    expect(p.cb.get('tcp.drop.no_socket')).toBe(1);
  });

  it('onSyn reset() refuses; drop() lets the SYN be retransmitted; a pending SYN is offered once', () => {
    const p = new Pair();
    const seen: number[] = [];
    let pend: import('../../../netstack/tcp/stack.js').PendingSyn | null = null;
    p.b.onSyn = (s) => {
      seen.push(p.clock.now());
      pend = s;
    };
    const ca = p.a.connect({ localIp: A_IP, localPort: 5556, remoteIp: B_IP, remotePort: 80 });
    p.run(3500); // SYN at 0, retransmissions at 1 s and 3 s (RFC 6298 backoff)
    expect(seen.length).toBe(1);
    expect(p.cb.get('tcp.syn.pending_retransmit')).toBe(2);
    expect(p.log.filter((l) => l.fromA && l.r.flags === SYN).map((l) => l.r.seq).every((s, _i, a) => s === a[0])).toBe(true);
    // Now the dial "succeeds".
    const cb = pend!.accept();
    p.pump();
    expect(cb.state).toBe(TcpState.ESTABLISHED);
    expect(ca.state).toBe(TcpState.ESTABLISHED);
    expect(() => pend!.accept()).toThrow();
  });

  it('SYN retries exhausted: ETIMEDOUT', () => {
    const p = new Pair({ synRetries: 2 });
    p.setFaults({ filter: () => false });
    let err = '';
    const ca = p.a.connect({ localIp: A_IP, localPort: 5557, remoteIp: B_IP, remotePort: 80 });
    ca.on('error', (e) => (err = e.code));
    p.run(1000 + 2000 + 4000 - 1);
    expect(ca.state).toBe(TcpState.SYN_SENT);
    p.run(2);
    expect(err).toBe('ETIMEDOUT');
    expect(ca.state).toBe(TcpState.CLOSED);
    expect(p.ca.get('tcp.retransmit.timeouts')).toBe(3);
  });

  it('simultaneous open (RFC 9293 §3.5 figure 8)', () => {
    const p = new Pair();
    const ca = p.a.connect({ localIp: A_IP, localPort: 7000, remoteIp: B_IP, remotePort: 7001 });
    const cb = p.b.connect({ localIp: B_IP, localPort: 7001, remoteIp: A_IP, remotePort: 7000 });
    const ev: string[] = [];
    ca.on('connect', () => ev.push('a'));
    cb.on('connect', () => ev.push('b'));
    p.pump();
    expect(ca.state).toBe(TcpState.ESTABLISHED);
    expect(cb.state).toBe(TcpState.ESTABLISHED);
    expect(ev.sort()).toEqual(['a', 'b']);
    expect(p.ca.get('tcp.simultaneous_open')).toBe(1);
    const flags = p.log.map((l) => l.r.flags);
    expect(flags.slice(0, 2)).toEqual([SYN, SYN]);
    expect(flags.filter((f) => f === (SYN | ACK)).length).toBeGreaterThanOrEqual(1);
    // Data flows both ways afterwards.
    const ra = collect(ca);
    const rb = collect(cb);
    ca.write(new Uint8Array([1, 2, 3]));
    cb.write(new Uint8Array([4, 5]));
    p.pump();
    expect([...rb.bytes()]).toEqual([1, 2, 3]);
    expect([...ra.bytes()]).toEqual([4, 5]);
    void FIN;
  });
});
