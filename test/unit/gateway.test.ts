/**
 * The gateway on a switch, with a ChannelLink as the guest. Inputs are real frames sent by
 * the Linux kernel (test/fixtures/captured.ts); where the kernel playing the gateway answered,
 * our answer is compared with its answer byte for byte, except the IP identification and
 * (therefore) the header checksum, which are the sender's choice.
 */
import fc from 'fast-check';
import { beforeEach, describe, expect, it } from 'vitest';
import { BROADCAST_MAC, ip4, mac, parseSubnet } from '../../netstack/addr.js';
import { Counters } from '../../netstack/counters.js';
import { Gateway, HEADROOM } from '../../netstack/iface/gateway.js';
import { ChannelLink } from '../../netstack/link/memory.js';
import { Switch } from '../../netstack/link/switch.js';
import { ManualClock } from '../../netstack/time.js';
import { type UdpDatagram, UdpLayer } from '../../netstack/udp/udp-layer.js';
import { ArpPacket, parseArp } from '../../netstack/wire/arp.js';
import { checksum } from '../../netstack/wire/checksum.js';
import { EthernetFrame } from '../../netstack/wire/ethernet.js';
import { IcmpPacket, parseIcmp } from '../../netstack/wire/icmpv4.js';
import { Ipv4Packet } from '../../netstack/wire/ipv4.js';
import * as C from '../fixtures/captured.js';
import { GUEST_MAC, GW_MAC, ethFrame, fixIpv4Checksum, hex, hostileBytes, ipv4Frame, padded, tagged, toHex, udpFrame } from '../helpers/frames.js';

const GW1 = ip4('192.168.127.1');
const GW254 = ip4('192.168.127.254');
const GUEST = ip4('192.168.127.2');

interface Net {
  clock: ManualClock;
  counters: Counters;
  sw: Switch;
  gw: Gateway;
  guest: ChannelLink;
  udp: UdpLayer;
}

function makeNet(): Net {
  const clock = new ManualClock();
  const counters = new Counters();
  const sw = new Switch({ clock, counters });
  const gw = new Gateway({ clock, counters, mac: GW_MAC, subnet: parseSubnet('192.168.127.0/24'), addresses: [GW1, GW254], mtu: 1500 });
  sw.addPort(gw);
  const guest = new ChannelLink('guest');
  sw.addPort(guest);
  const udp = new UdpLayer(gw, counters);
  return { clock, counters, sw, gw, guest, udp };
}

/** Hex of a frame with the IP identification and header checksum blanked (sender's choice). */
function sansIdent(f: Uint8Array): string {
  const c = f.slice();
  c.fill(0, 18, 20);
  c.fill(0, 24, 26);
  return toHex(c);
}

function ipOf(f: Uint8Array): Ipv4Packet {
  const p = Ipv4Packet.check(f.subarray(14));
  if (typeof p === 'string') throw new Error(`bad ip: ${p}`);
  return p;
}

let n: Net;
beforeEach(() => {
  n = makeNet();
});

describe('Gateway: ARP', () => {
  it('answers the kernel ARP requests for .1 and .254 like the kernel did (padded to 60)', () => {
    for (const [req, kernelReply] of [[C.ARP_REQUEST_FOR_1, C.ARP_REPLY_FROM_1], [C.ARP_REQUEST_FOR_254, C.ARP_REPLY_FROM_254]] as const) {
      n.guest.inject(hex(req));
      const out = n.guest.take();
      expect(out.length).toBe(1);
      expect(out[0]!.length).toBe(60);
      expect(toHex(out[0]!.subarray(0, 42))).toBe(toHex(hex(kernelReply)));
      expect(out[0]!.subarray(42).every((b) => b === 0)).toBe(true);
    }
    expect(n.counters.get('arp.tx_reply')).toBe(2);
    expect(n.gw.neighbors.lookup(GUEST)).toEqual(GUEST_MAC);
  });

  it('answers a padded (60-byte, as from a NIC) request', () => {
    n.guest.inject(padded(hex(C.ARP_REQUEST_FOR_1)));
    expect(n.guest.take().length).toBe(1);
  });

  it('stays silent for other addresses', () => {
    for (const target of ['192.168.127.2', '192.168.127.3', '192.168.127.255', '10.0.0.1']) {
      const f = hex(C.ARP_REQUEST_FOR_1);
      f.set(hex(ip4(target).toString(16).padStart(8, '0')), 38);
      n.guest.inject(f);
    }
    expect(n.guest.take()).toEqual([]);
    expect(n.counters.get('arp.not_for_us')).toBe(4);
  });

  it('answers an ARP probe (sender 0.0.0.0, RFC 5227) without learning it', () => {
    const f = hex(C.ARP_REQUEST_FOR_1);
    f.fill(0, 28, 32);
    n.guest.inject(f);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    const r = parseArp(ArpPacket.check(out[0]!.subarray(14))!)!;
    expect(r).toMatchObject({ op: 2, spa: GW1, tpa: 0, tha: GUEST_MAC });
    expect(n.gw.neighbors.list()).toEqual([]);
  });

  it('drops truncated and non-Ethernet/IPv4 ARP', () => {
    n.guest.inject(hex(C.ARP_REQUEST_FOR_1).subarray(0, 41));
    const f = hex(C.ARP_REQUEST_FOR_1);
    f[15] = 6; // htype 6 (IEEE 802)
    n.guest.inject(f);
    expect(n.counters.get('arp.drop.truncated')).toBe(1);
    expect(n.counters.get('arp.drop.unsupported')).toBe(1);
    expect(n.guest.take()).toEqual([]);
  });
});

describe('Gateway: ICMP echo', () => {
  it('answers the kernel echo request to .1 with the kernel reply (ident aside), no ARP needed', () => {
    n.guest.inject(hex(C.ECHO_REQUEST_TO_1));
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(sansIdent(out[0]!)).toBe(sansIdent(hex(C.ECHO_REPLY_FROM_1)));
    expect(checksum(out[0]!, 14, 20)).toBe(0);
    expect(n.counters.get('icmp.echo_reply')).toBe(1);
    // The guest's MAC was gleaned from the request itself.
    expect(n.gw.neighbors.lookup(GUEST)).toEqual(GUEST_MAC);
  });

  it('answers .254 too', () => {
    n.guest.inject(hex(C.ECHO_REQUEST_TO_254));
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(sansIdent(out[0]!)).toBe(sansIdent(hex(C.ECHO_REPLY_FROM_254)));
  });

  it('answers a captured request rewritten to other addresses, with identical id/seq/data', () => {
    const f = hex(C.ECHO_REQUEST_TO_1);
    const ip = ipOf(f);
    ip.setSrc(ip4('192.168.127.77'));
    ip.setDst(GW254);
    f.set(mac('02:00:00:00:00:77'), 6);
    n.guest.inject(f);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(toHex(out[0]!.subarray(0, 6))).toBe('020000000077');
    const rip = ipOf(out[0]!);
    expect([rip.src, rip.dst]).toEqual([GW254, ip4('192.168.127.77')]);
    const req = parseIcmp(IcmpPacket.check(ip.payload) as IcmpPacket)!;
    const rep = parseIcmp(IcmpPacket.check(rip.payload) as IcmpPacket)!;
    expect(rep).toEqual({ ...req, type: 0 });
  });

  it('answers an echo request carrying IP options (ping -R) with the same id/seq/data', () => {
    n.guest.inject(hex(C.RR_ECHO_REQUEST));
    const out = n.guest.take();
    expect(out.length).toBe(1);
    const rip = ipOf(out[0]!);
    // We do not echo Record Route (RFC 1122 §3.2.2.6 says SHOULD); the kernel does.
    expect(rip.headerLen).toBe(20);
    const kernel = ipOf(hex(C.RR_ECHO_REPLY));
    expect(toHex(rip.payload)).toBe(toHex(kernel.payload));
  });

  it('reassembles the real fragmented request and fragments the reply like the kernel', () => {
    n.guest.inject(hex(C.FRAG_REQUEST_1));
    expect(n.guest.take()).toEqual([]);
    n.guest.inject(hex(C.FRAG_REQUEST_2));
    const out = n.guest.take();
    expect(out.length).toBe(2);
    expect(sansIdent(out[0]!)).toBe(sansIdent(hex(C.FRAG_REPLY_1)));
    expect(sansIdent(out[1]!)).toBe(sansIdent(hex(C.FRAG_REPLY_2)));
    const [a, b] = out.map(ipOf);
    expect(a!.ident).toBe(b!.ident);
    expect(n.counters.get('ipv4.reassembled')).toBe(1);
    expect(n.counters.get('ipv4.tx_fragmented')).toBe(1);
  });

  it('reassembles fragments arriving in reverse order', () => {
    n.guest.inject(hex(C.FRAG_REQUEST_2), hex(C.FRAG_REQUEST_1));
    const out = n.guest.take();
    expect(out.map(sansIdent)).toEqual([sansIdent(hex(C.FRAG_REPLY_1)), sansIdent(hex(C.FRAG_REPLY_2))]);
  });

  it('does not answer echo to another subnet host or to a broadcast', () => {
    const other = hex(C.ECHO_REQUEST_TO_1);
    ipOf(other).setDst(ip4('192.168.127.9'));
    const bcast = hex(C.ECHO_REQUEST_TO_1);
    ipOf(bcast).setDst(ip4('192.168.127.255'));
    n.guest.inject(other, bcast);
    expect(n.guest.take()).toEqual([]);
    expect(n.counters.get('ipv4.drop.no_route')).toBe(1);
    expect(n.counters.get('ipv4.drop.broadcast')).toBe(1);
  });
});

describe('Gateway: drops are counted by name', () => {
  const cases: [string, () => Uint8Array][] = [
    ['ipv4.drop.bad_checksum', () => { const f = hex(C.ECHO_REQUEST_TO_1); f[22] = 1; return f; }],
    ['ipv4.drop.truncated', () => hex(C.ECHO_REQUEST_TO_1).subarray(0, 90)],
    ['ipv4.drop.truncated', () => hex(C.ECHO_REQUEST_TO_1).subarray(0, 30)],
    ['ipv4.drop.bad_version', () => { const f = hex(C.ECHO_REQUEST_TO_1); f[14] = 0x65; return f; }],
    ['ipv4.drop.bad_header_len', () => { const f = hex(C.ECHO_REQUEST_TO_1); f[14] = 0x43; return f; }],
    ['ipv4.drop.bad_total_len', () => { const f = hex(C.ECHO_REQUEST_TO_1); f[16] = 0; f[17] = 10; fixIpv4Checksum(f); return f; }],
    ['ipv4.drop.multicast', () => { const f = hex(C.ECHO_REQUEST_TO_1); ipOf(f).setDst(ip4('224.0.0.251')); return f; }],
    ['ipv4.drop.bad_src', () => { const f = hex(C.ECHO_REQUEST_TO_1); ipOf(f).setSrc(ip4('192.168.127.255')); return f; }],
    ['ipv4.drop.bad_src', () => { const f = hex(C.ECHO_REQUEST_TO_1); ipOf(f).setSrc(ip4('239.1.2.3')); return f; }],
    ['icmp.drop.bad_checksum', () => { const f = hex(C.ECHO_REQUEST_TO_1); f[60]! ^= 1; return f; }],
    ['icmp.drop.truncated', () => ipv4Frame(GW_MAC, GUEST_MAC, { src: GUEST, dst: GW1, protocol: 1, ttl: 64 }, new Uint8Array(4))],
    ['eth.drop.truncated', () => hex(C.ECHO_REQUEST_TO_1).subarray(0, 14)], // sent as 13 bytes, see below
    ['eth.drop.vlan_tagged', () => tagged(hex(C.ECHO_REQUEST_TO_1), 10)],
    ['eth.drop.ipv6_unsupported', () => ethFrame(GW_MAC, GUEST_MAC, 0x86dd, new Uint8Array(40))],
    ['eth.drop.unknown_ethertype', () => ethFrame(GW_MAC, GUEST_MAC, 0x88cc, new Uint8Array(40))],
    ['eth.not_for_us', () => { const f = hex(C.ECHO_REQUEST_TO_1); f.set(mac('01:00:5e:00:00:fb'), 0); return f; }],
    ['eth.not_for_us', () => { const f = hex(C.ECHO_REQUEST_TO_1); f.set(mac('02:00:00:00:00:99'), 0); return f; }],
  ];
  for (const [name, make] of cases) {
    it(name, () => {
      const f = make();
      // A 14-byte frame reaches the gateway; shorter ones stop at the switch.
      n.guest.inject(f.length === 14 ? f.subarray(0, 13) : f);
      if (f.length === 14) {
        expect(n.counters.get('switch.drop.runt')).toBe(1);
        n.gw.send(f.subarray(0, 13));
      }
      expect(n.counters.get(name)).toBe(1);
      expect(n.guest.take()).toEqual([]);
      expect(n.gw.lastError).toBeNull();
    });
  }
});

describe('Gateway: UDP', () => {
  it('delivers the real datagram to a bound port', () => {
    const got: UdpDatagram[] = [];
    n.udp.bind(GW1, 5000, (d) => got.push({ ...d, payload: d.payload.slice() }));
    n.guest.inject(hex(C.UDP_TO_5000));
    expect(got.length).toBe(1);
    expect(got[0]).toMatchObject({ srcIp: GUEST, srcPort: 40000, dstIp: GW1, dstPort: 5000 });
    expect(new TextDecoder().decode(got[0]!.payload)).toBe('hello-tender');
    expect(got[0]!.srcMac).toEqual(GUEST_MAC);
  });

  it('answers a datagram to an unbound port of .1 with port unreachable quoting header + 8 bytes', () => {
    const req = hex(C.UDP_TO_5001);
    n.guest.inject(req);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    const ip = ipOf(out[0]!);
    expect([ip.src, ip.dst, ip.protocol]).toEqual([GW1, GUEST, 1]);
    expect(toHex(out[0]!.subarray(0, 12))).toBe(toHex(hex(C.ICMP_PORT_UNREACHABLE).subarray(0, 12)));
    const icmp = IcmpPacket.check(ip.payload) as IcmpPacket;
    expect(icmp).toBeInstanceOf(IcmpPacket);
    expect([icmp.type, icmp.code]).toEqual([3, 3]);
    // The kernel quotes all 32 bytes; RFC 792 asks for the header + 64 bits, which is what we send.
    expect(toHex(icmp.payload)).toBe(toHex(req.subarray(14, 14 + 28)));
    expect(n.counters.get('udp.drop.port_unreachable')).toBe(1);
  });

  it('sends to a known neighbour without ARP', () => {
    n.guest.inject(hex(C.UDP_TO_5000)); // port unreachable, and the guest's MAC is gleaned
    n.guest.take();
    expect(n.udp.send(GW1, 53, GUEST, 40000, new Uint8Array([1, 2, 3]))).toBe(true);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(toHex(out[0]!.subarray(0, 6))).toBe(toHex(GUEST_MAC));
    expect(EthernetFrame.check(out[0]!)!.etherType).toBe(0x0800);
  });
});

describe('Gateway: neighbour resolution', () => {
  const PEER = ip4('192.168.127.77');
  const PEER_MAC = mac('02:00:00:00:00:77');

  function arpRequests(frames: Uint8Array[]): number[] {
    return frames
      .filter((f) => EthernetFrame.check(f)?.etherType === 0x0806)
      .map((f) => parseArp(ArpPacket.check(f.subarray(14))!)!)
      .filter((r) => r.op === 1)
      .map((r) => r.tpa);
  }

  it('asks 3 times, 1 s apart, then drops and counts the waiting packets', async () => {
    n.udp.send(GW1, 53, PEER, 1000, new Uint8Array(10));
    n.udp.send(GW1, 53, PEER, 1000, new Uint8Array(10));
    let out = n.guest.take();
    expect(arpRequests(out)).toEqual([PEER]);
    expect(toHex(out[0]!.subarray(0, 6))).toBe('ffffffffffff');
    const r = parseArp(ArpPacket.check(out[0]!.subarray(14))!)!;
    expect(r).toMatchObject({ spa: GW1, sha: GW_MAC });
    n.clock.advance(999);
    expect(n.guest.take()).toEqual([]);
    n.clock.advance(1);
    expect(arpRequests(n.guest.take())).toEqual([PEER]);
    n.clock.advance(1000);
    expect(arpRequests(n.guest.take())).toEqual([PEER]);
    n.clock.advance(1000);
    out = n.guest.take();
    expect(out).toEqual([]);
    expect(n.counters.get('arp.drop.unresolved')).toBe(2);
    expect(n.counters.get('arp.tx_request')).toBe(3);
    n.clock.advance(10_000);
    expect(n.guest.take()).toEqual([]);
    await Promise.resolve(); // let the gateway's end-of-burst microtask run
  });

  it('sends the waiting packets once the ARP reply arrives, to the learned MAC', () => {
    n.udp.send(GW1, 53, PEER, 1000, new Uint8Array([9, 9]));
    n.guest.take();
    const reply = ethFrame(GW_MAC, PEER_MAC, 0x0806, hex(C.ARP_REPLY_FROM_1).subarray(14));
    // An ARP reply from PEER to .1: sha/spa = PEER, tha/tpa = gateway.
    reply.set(PEER_MAC, 22);
    reply.set(hex('c0a87f4d'), 28);
    reply.set(GW_MAC, 32);
    reply.set(hex('c0a87f01'), 38);
    n.guest.inject(reply);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(toHex(out[0]!.subarray(0, 6))).toBe(toHex(PEER_MAC));
    expect(ipOf(out[0]!).dst).toBe(PEER);
    n.clock.advance(5000);
    expect(n.guest.take()).toEqual([]);
    expect(n.counters.get('arp.drop.unresolved')).toBe(0);
  });

  it('fragments a datagram to an unresolved neighbour and sends every fragment once resolved', () => {
    n.udp.send(GW1, 53, PEER, 1000, new Uint8Array(3000));
    n.guest.take();
    const f = ethFrame(GW_MAC, PEER_MAC, 0x0806, new Uint8Array(28));
    f.set(hex('0001080006040001'), 14);
    f.set(PEER_MAC, 22);
    f.set(hex('c0a87f4d'), 28);
    f.set(hex('c0a87f01'), 38);
    n.guest.inject(f); // a request from PEER for .1: answered, and PEER is learned
    const out = n.guest.take().filter((x) => EthernetFrame.check(x)!.etherType === 0x0800);
    expect(out.length).toBe(3);
    expect(out.map((x) => ipOf(x).fragOffset)).toEqual([0, 1480, 2960]);
    for (const x of out) expect(toHex(x.subarray(0, 6))).toBe(toHex(PEER_MAC));
  });
});

describe('Gateway: hostile input', () => {
  const FROM_GUEST = [
    C.ARP_REQUEST_FOR_1, C.ARP_REQUEST_FOR_254, C.ARP_REPLY_FROM_1, C.ECHO_REQUEST_TO_1, C.ECHO_REQUEST_TO_254,
    C.FRAG_REQUEST_1, C.FRAG_REQUEST_2, C.RR_ECHO_REQUEST, C.UDP_TO_5000, C.UDP_TO_5001, C.ICMP_PORT_UNREACHABLE,
  ].map(hex);

  /** Frames that get past the Ethernet and (often) the IPv4 checks, so deeper layers are fuzzed. */
  const deep = fc
    .tuple(hostileBytes(FROM_GUEST), fc.boolean(), fc.boolean())
    .map(([f, toGw, fixIp]) => {
      if (f.length >= 14) f.set(toGw ? GW_MAC : BROADCAST_MAC, 0);
      if (f.length >= 14) f.set(GUEST_MAC, 6);
      if (fixIp && f.length >= 34 && f[12] === 0x08 && f[13] === 0x00) {
        const hl = (f[14]! & 0x0f) * 4;
        if (hl >= 20 && 14 + hl <= f.length) fixIpv4Checksum(f);
      }
      return f;
    });
  const anyFrame = fc.oneof(deep, deep, hostileBytes(FROM_GUEST), fc.uint8Array({ maxLength: 100 }));
  const step = fc.tuple(anyFrame, fc.nat(40_000));

  /** Counters that only say the switch moved the frame on, not what became of it. */
  const transit = new Set(['switch.flood', 'switch.flood_unknown', 'switch.forward']);
  const accounted = (c: Counters) => c.sum((k) => !transit.has(k));

  // A fragment held for reassembly is accounted for (ipv4.frag_held), so "what happened to
  // this frame" always has an answer.
  it('a fragment held for reassembly moves a counter', () => {
    const before = accounted(n.counters);
    n.guest.inject(hex(C.FRAG_REQUEST_1));
    expect(accounted(n.counters)).toBeGreaterThan(before);
  });

  // An ARP reply addressed to us (the answer to our own request) is counted (arp.rx_reply).
  it('an ARP reply to us moves a counter', () => {
    const before = accounted(n.counters);
    const f = hex(C.ARP_REPLY_FROM_1);
    // Swap roles: a reply from the guest to .1.
    f.set(GW_MAC, 0);
    f.set(GUEST_MAC, 6);
    f.set(GUEST_MAC, 22);
    f.set(hex('c0a87f02'), 28);
    f.set(GW_MAC, 32);
    f.set(hex('c0a87f01'), 38);
    n.guest.inject(f);
    expect(accounted(n.counters)).toBeGreaterThan(before);
  });

  it('never throws, never records an internal error, and accounts for every frame', () => {
    fc.assert(
      fc.property(fc.array(step, { minLength: 1, maxLength: 25 }), (steps) => {
        const net = makeNet();
        net.udp.bind(GW1, 5000, () => {});
        for (const [f, wait] of steps) {
          const before = accounted(net.counters);
          net.guest.inject(f);
          expect(net.gw.lastError).toBeNull();
          if (accounted(net.counters) === before) {
            throw new Error(`frame not accounted for: ${toHex(f).slice(0, 160)}`);
          }
          net.guest.take();
          net.clock.advance(wait);
        }
        expect(net.gw.lastError).toBeNull();
        expect(net.counters.get('gateway.drop.internal_error')).toBe(0);
      }),
      { numRuns: 600 },
    );
  });

  it('every frame the gateway emits is well-formed', () => {
    fc.assert(
      fc.property(fc.array(step, { minLength: 1, maxLength: 25 }), (steps) => {
        const net = makeNet();
        for (const [f, wait] of steps) {
          net.guest.inject(f);
          net.clock.advance(wait);
          for (const o of net.guest.take()) {
            const e = EthernetFrame.check(o)!;
            expect(e).not.toBeNull();
            expect(toHex(e.src)).toBe(toHex(GW_MAC));
            expect(o.length).toBeLessThanOrEqual(1514);
            if (e.etherType === 0x0800) {
              const ip = Ipv4Packet.check(e.payload);
              expect(ip).toBeInstanceOf(Ipv4Packet);
              if (ip instanceof Ipv4Packet && ip.protocol === 1 && !ip.isFragment) expect(IcmpPacket.check(ip.payload)).toBeInstanceOf(IcmpPacket);
            } else {
              expect(e.etherType).toBe(0x0806);
            }
          }
        }
      }),
      { numRuns: 300 },
    );
  });
});

describe('Gateway: output API', () => {
  it('send4 drops off-subnet destinations and too-big DF packets, counting them', () => {
    expect(n.gw.send4(GW1, ip4('10.0.0.1'), 17, 8)).toBe(false);
    expect(n.counters.get('ipv4.drop.tx_no_route')).toBe(1);
    n.gw.neighbors.learn(GUEST, GUEST_MAC);
    expect(n.gw.send4(GW1, GUEST, 17, 1481, 0, { df: true })).toBe(false);
    expect(n.counters.get('ipv4.drop.tx_too_big')).toBe(1);
    expect(n.gw.send4(GW1, GUEST, 17, 1480, 0, { df: true })).toBe(true);
    const out = n.guest.take();
    expect(out.length).toBe(1);
    expect(out[0]!.length).toBe(1514);
    expect(ipOf(out[0]!).dontFragment).toBe(true);
    expect(HEADROOM).toBe(34);
  });
});
