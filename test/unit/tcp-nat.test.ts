/**
 * The TCP NAT's mapping of host dial outcomes to what the guest sees, with the dial injected
 * (real refused ports are tested end to end; unreachable networks cannot be produced on this
 * machine without sending packets off it).
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { describe, expect, it } from 'vitest';
import { ip4 } from '../../netstack/addr.js';
import { networkConfig } from '../../netstack/config.js';
import { Counters } from '../../netstack/counters.js';
import { ChannelLink } from '../../netstack/link/memory.js';
import { Network } from '../../netstack/network.js';
import { TcpNat } from '../../netstack/services/tcp-nat.js';
import { ManualClock } from '../../netstack/time.js';
import { EthernetFrame } from '../../netstack/wire/ethernet.js';
import { IpProto, Ipv4Packet } from '../../netstack/wire/ipv4.js';
import { TcpFlag, emitTcp, newTcpRepr } from '../../netstack/wire/tcp.js';
import { GUEST_MAC, GW_MAC, ipv4Frame } from '../helpers/frames.js';

const GUEST = ip4('192.168.127.2');

function syn(dst: number, dport: number): Uint8Array {
  const r = newTcpRepr();
  r.srcPort = 40000;
  r.dstPort = dport;
  r.seq = 1000;
  r.flags = TcpFlag.SYN;
  r.window = 64240;
  r.mss = 1460;
  const seg = new Uint8Array(60);
  const n = emitTcp(r, null, seg, 0, GUEST, dst);
  return ipv4Frame(GW_MAC, GUEST_MAC, { src: GUEST, dst, protocol: IpProto.TCP, ttl: 64 }, seg.subarray(0, n));
}

function setup(outcome: (s: EventEmitter) => void) {
  const clock = new ManualClock();
  const counters = new Counters();
  const net_ = new Network({ config: networkConfig({ dnsUpstreams: [{ host: '127.0.0.1', port: 9 }] }), clock, counters });
  const guest = new ChannelLink('guest');
  net_.addLink(guest);
  let dials = 0;
  // Replace the NAT's dialer: the socket reports the scripted outcome on the next tick.
  const nat = new TcpNat({
    counters,
    tcp: net_.tcp,
    gateway: net_.gateway,
    hostAlias: net_.config.hostAlias,
    hostLoopback: true,
    maxPendingPerGuest: 2,
    dial: () => {
      dials++;
      const s = new EventEmitter() as EventEmitter & { destroy(): void };
      s.destroy = () => {};
      queueMicrotask(() => outcome(s));
      return s as unknown as net.Socket;
    },
  });
  return { net: net_, guest, nat, counters, dials: () => dials };
}

function ipOut(frames: Uint8Array[]): Ipv4Packet[] {
  return frames.map((f) => EthernetFrame.check(f)!).filter((e) => e.etherType === 0x0800).map((e) => new Ipv4Packet(e.payload));
}

describe('TCP NAT dial outcomes', () => {
  it.each([
    ['ENETUNREACH', 0],
    ['EHOSTUNREACH', 1],
    ['EACCES', 13],
  ])('%s becomes ICMP unreachable code %i quoting the SYN', async (code, icmpCode) => {
    const t = setup((s) => s.emit('error', Object.assign(new Error(code), { code })));
    t.guest.inject(syn(ip4('203.0.113.5'), 80));
    await new Promise((r) => setTimeout(r, 5));
    const icmp = ipOut(t.guest.take()).filter((p) => p.protocol === IpProto.ICMP);
    expect(icmp).toHaveLength(1);
    const p = icmp[0]!.payload;
    expect([p[0], p[1]]).toEqual([3, icmpCode]);
    // The quote names the original destination and ports, so the guest's socket gets the error.
    expect(icmp[0]!.src).toBe(ip4('203.0.113.5'));
    const q = p.subarray(8);
    expect(new Ipv4Packet(q).dst).toBe(ip4('203.0.113.5'));
    expect((q[20]! << 8) | q[21]!).toBe(40000);
    t.net.close();
  });

  it('ECONNREFUSED becomes a RST', async () => {
    const t = setup((s) => s.emit('error', Object.assign(new Error('refused'), { code: 'ECONNREFUSED' })));
    t.guest.inject(syn(ip4('203.0.113.5'), 81));
    await new Promise((r) => setTimeout(r, 5));
    const tcp = ipOut(t.guest.take()).filter((p) => p.protocol === IpProto.TCP);
    expect(tcp).toHaveLength(1);
    expect(tcp[0]!.payload[13]! & TcpFlag.RST).toBeTruthy();
    t.net.close();
  });

  it('answers nothing while the dial is pending, and bounds pending dials per guest', async () => {
    const t = setup(() => {});
    for (let port = 1; port <= 4; port++) t.guest.inject(syn(ip4('203.0.113.5'), port));
    // A retransmitted SYN of a pending tuple does not dial again.
    t.guest.inject(syn(ip4('203.0.113.5'), 1));
    await new Promise((r) => setTimeout(r, 5));
    expect(ipOut(t.guest.take()).filter((p) => p.protocol === IpProto.TCP)).toHaveLength(0);
    expect(t.dials()).toBe(2);
    expect(t.counters.get('tcp_nat.drop.pending_limit')).toBe(2);
    t.net.close();
  });
});
