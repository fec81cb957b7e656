/**
 * DHCP server logic driven by a ManualClock: RFC 2131 §4.3 message handling and §4.1 reply
 * addressing. The captured udhcpc/dhclient/networkd messages (dhcp-captures.ts) are fed
 * through `handlePacket` as they came off the wire; the rest uses built requests.
 */
import fc from 'fast-check';
import { beforeEach, describe, expect, it } from 'vitest';
import { BROADCAST_MAC, IP4_BROADCAST, type Mac, ip4, mac, parseSubnet } from '../../netstack/addr.js';
import { Counters } from '../../netstack/counters.js';
import { DhcpServer, type DhcpLeaseEvent, type DhcpReply, type DhcpServerConfig, sanitizeHostname } from '../../netstack/services/dhcp.js';
import { ManualClock } from '../../netstack/time.js';
import {
  DhcpMessageType as MT, type DhcpRepr, dhcpEmittedLength, emitDhcp, emptyDhcpRepr, parseDhcp,
} from '../../netstack/wire/dhcpv4.js';
import {
  CAPTURES, DHCLIENT_DISCOVER, DHCLIENT_INIT_REBOOT, DHCLIENT_RELEASE, DHCLIENT_REQUEST, NETWORKD_DISCOVER,
  NETWORKD_RELEASE, NETWORKD_REQUEST, UDHCPC_DISCOVER, UDHCPC_RELEASE, UDHCPC_RENEW, UDHCPC_REQUEST,
} from './dhcp-captures.js';

const SUBNET = parseSubnet('192.168.127.0/24');
const GW = ip4('192.168.127.1');
const HOST = ip4('192.168.127.254');
const A = mac('52:54:00:00:00:0a');
const B = mac('52:54:00:00:00:0b');
const CAPTURED_MAC = mac('52:54:00:12:34:56');
const ip = (last: number) => ip4(`192.168.127.${last}`);

function baseConfig(over: Partial<DhcpServerConfig> = {}): DhcpServerConfig {
  return {
    subnet: SUBNET, serverIp: GW, reserved: [HOST], leaseTimeSec: 3600,
    domainName: 'tender.internal', searchList: ['tender.internal', 'example.com'], mtu: 1400,
    ...over,
  };
}

let clock: ManualClock;
let counters: Counters;
let events: DhcpLeaseEvent[];

function server(over: Partial<DhcpServerConfig> = {}): DhcpServer {
  const s = new DhcpServer(baseConfig(over), clock, counters);
  s.onLease = (e) => events.push(e);
  return s;
}

beforeEach(() => {
  clock = new ManualClock(1000);
  counters = new Counters();
  events = [];
});

let xid = 1;
function msg(type: number, chaddr: Mac, f: Partial<DhcpRepr> = {}): DhcpRepr {
  const r = emptyDhcpRepr();
  r.messageType = type;
  r.chaddr = chaddr.slice();
  r.xid = xid++;
  return Object.assign(r, f);
}
const meta = (m: Mac, srcIp = 0) => ({ srcIp, srcMac: m });

function ok(r: DhcpReply | null): DhcpReply {
  expect(r).not.toBeNull();
  return r!;
}

/** DISCOVER + REQUEST(SELECTING); returns the ACK. */
function dora(s: DhcpServer, m: Mac, f: Partial<DhcpRepr> = {}): DhcpReply {
  const offer = ok(s.handle(msg(MT.Discover, m, f), meta(m)));
  expect(offer.repr.messageType).toBe(MT.Offer);
  const ack = ok(s.handle(msg(MT.Request, m, { ...f, requestedIp: offer.repr.yiaddr, serverId: GW }), meta(m)));
  expect(ack.repr.messageType).toBe(MT.Ack);
  return ack;
}

describe('DHCP server with the captured clients', () => {
  it('busybox udhcpc: DISCOVER, REQUEST, unicast renew, RELEASE', () => {
    const s = server({ poolStart: ip(172) });
    const offer = ok(s.handlePacket(UDHCPC_DISCOVER, meta(CAPTURED_MAC)));
    const o = offer.repr;
    expect(o.op).toBe(2);
    expect(o.messageType).toBe(MT.Offer);
    expect(o.xid).toBe(0x502fd560);
    expect(o.yiaddr).toBe(ip(172));
    expect(o.ciaddr).toBe(0);
    expect(o.serverId).toBe(GW);
    // Everything udhcpc passes to its script: $subnet $router $dns $domain $search $mtu $lease.
    expect(o.subnetMask).toBe(ip4('255.255.255.0'));
    expect(o.routers).toEqual([GW]);
    expect(o.dnsServers).toEqual([GW]);
    expect(o.domainName).toBe('tender.internal');
    expect(o.searchList).toEqual(['tender.internal', 'example.com']);
    expect(o.mtu).toBe(1400);
    expect(o.leaseTime).toBe(3600);
    expect(o.renewalTime).toBe(1800);
    expect(o.rebindingTime).toBe(3150);
    expect(o.broadcastAddress).toBe(ip(255));
    // udhcpc does not set the broadcast bit: unicast to yiaddr at chaddr (§4.1).
    expect(offer).toMatchObject({ dstIp: ip(172), dstPort: 68, broadcast: false });
    expect(offer.dstMac).toEqual(CAPTURED_MAC);
    // Options in udhcpc's parameter request list order after 53 (1 3 6 12 15 26 28 42 119).
    const bytes = new Uint8Array(dhcpEmittedLength(o));
    emitDhcp(o, bytes, 0);
    expect(bytes.length).toBeLessThanOrEqual(576 - 28);
    expect(parseDhcp(bytes)).toMatchObject({ yiaddr: ip(172), searchList: o.searchList });

    const ack = ok(s.handlePacket(UDHCPC_REQUEST, meta(CAPTURED_MAC)));
    expect(ack.repr.messageType).toBe(MT.Ack);
    expect(ack.repr.yiaddr).toBe(ip(172));
    expect(s.leases()).toEqual([{ mac: '52:54:00:12:34:56', ip: '192.168.127.172', hostname: 'vmbox', expiresAt: 1000 + 3600_000 }]);
    expect(events).toEqual([{ event: 'bound', mac: '52:54:00:12:34:56', ip: ip(172), hostname: 'vmbox' }]);

    clock.advance(1800_000);
    const renew = ok(s.handlePacket(UDHCPC_RENEW, meta(CAPTURED_MAC, ip(172))));
    expect(renew.repr.messageType).toBe(MT.Ack);
    expect(renew.repr.ciaddr).toBe(ip(172));
    expect(renew).toMatchObject({ dstIp: ip(172), broadcast: false });
    expect(s.leases()[0]!.expiresAt).toBe(1000 + 1800_000 + 3600_000);

    expect(s.handlePacket(UDHCPC_RELEASE, meta(CAPTURED_MAC, ip(172)))).toBeNull();
    expect(s.leases()).toEqual([]);
    expect(events.at(-1)).toMatchObject({ event: 'released', ip: ip(172) });
    expect(counters.drops()).toBe(0);
  });

  it('ISC dhclient: DORA, INIT-REBOOT after a restart of the server, RELEASE', () => {
    const s = server({ poolStart: ip(172) });
    expect(ok(s.handlePacket(DHCLIENT_DISCOVER, meta(CAPTURED_MAC))).repr.yiaddr).toBe(ip(172));
    expect(ok(s.handlePacket(DHCLIENT_REQUEST, meta(CAPTURED_MAC))).repr.messageType).toBe(MT.Ack);
    // A fresh server (tender restarted) has no record: authoritative ACK of the free address.
    const s2 = server();
    const reboot = ok(s2.handlePacket(DHCLIENT_INIT_REBOOT, meta(CAPTURED_MAC)));
    expect(reboot.repr.messageType).toBe(MT.Ack);
    expect(reboot.repr.yiaddr).toBe(ip(172));
    expect(s2.handlePacket(DHCLIENT_RELEASE, meta(CAPTURED_MAC, ip(172)))).toBeNull();
    expect(s2.leases()).toEqual([]);
  });

  it('systemd-networkd: client id type 255 keys the lease, not the MAC', () => {
    const s = server({ poolStart: ip(172) });
    const offer = ok(s.handlePacket(NETWORKD_DISCOVER, meta(CAPTURED_MAC)));
    expect(offer.repr.yiaddr).toBe(ip(172));
    // networkd allows 1472-byte messages (option 57): nothing trimmed.
    expect(offer.repr.searchList).not.toBeNull();
    expect(ok(s.handlePacket(NETWORKD_REQUEST, meta(CAPTURED_MAC))).repr.messageType).toBe(MT.Ack);
    // Same MAC without that client id is another client: it gets another address.
    const other = ok(s.handle(msg(MT.Discover, CAPTURED_MAC), meta(CAPTURED_MAC)));
    expect(other.repr.yiaddr).not.toBe(ip(172));
    expect(s.handlePacket(NETWORKD_RELEASE, meta(CAPTURED_MAC, ip(172)))).toBeNull();
    expect(s.leases()).toEqual([]);
  });

  it('server-side captures (OFFER/ACK from dnsmasq) are not requests', () => {
    const s = server();
    for (const b of Object.values(CAPTURES)) s.handlePacket(b, meta(CAPTURED_MAC));
    expect(counters.get('dhcp.drop.not_request')).toBe(2);
  });
});

describe('DHCP server: allocation', () => {
  it('hands out .2 first and never the gateway, host alias, network or broadcast', () => {
    const s = server();
    const seen = new Set<number>();
    for (let i = 0; i < 252; i++) {
      const m = mac(`52:54:00:00:01:${i.toString(16).padStart(2, '0')}`);
      const a = dora(s, m).repr.yiaddr;
      if (i === 0) expect(a).toBe(ip(2));
      seen.add(a);
    }
    expect(seen.size).toBe(252); // .2 .. .253
    for (const a of [ip(0), GW, HOST, ip(255)]) expect(seen.has(a)).toBe(false);
    // Pool exhausted: no offer, counted.
    expect(s.handle(msg(MT.Discover, A), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.pool_exhausted')).toBe(1);
    expect(s.leases()).toHaveLength(252);
  });

  it('stable address per client, honours a free requested address, keeps the previous one', () => {
    const s = server();
    const first = dora(s, A).repr.yiaddr;
    expect(ok(s.handle(msg(MT.Discover, A), meta(A))).repr.yiaddr).toBe(first);
    expect(ok(s.handle(msg(MT.Discover, B, { requestedIp: ip(77) }), meta(B))).repr.yiaddr).toBe(ip(77));
    // A requested address held by another client is not offered.
    const c = mac('52:54:00:00:00:0c');
    const o = ok(s.handle(msg(MT.Discover, c, { requestedIp: first }), meta(c))).repr.yiaddr;
    expect(o).not.toBe(first);
    // Requests outside the pool are ignored, not honoured.
    const d = mac('52:54:00:00:00:0d');
    expect(ok(s.handle(msg(MT.Discover, d, { requestedIp: GW }), meta(d))).repr.yiaddr).not.toBe(GW);
    // Released, then back: the same address, even after others came and went.
    s.handle(msg(MT.Release, A, { ciaddr: first, serverId: GW }), meta(A, first));
    dora(s, mac('52:54:00:00:00:0e'));
    expect(dora(s, A).repr.yiaddr).toBe(first);
  });

  it('static lease wins, with its hostname, and its address is never given to others', () => {
    const s = server({ staticLeases: [{ mac: A, ip: ip(2), hostname: 'db' }] });
    expect(dora(s, B).repr.yiaddr).toBe(ip(3));
    const ack = dora(s, A, { requestedIp: ip(50) });
    expect(ack.repr.yiaddr).toBe(ip(2));
    expect(ack.repr.hostname).toBe('db');
    expect(s.leases().find((l) => l.ip === '192.168.127.2')).toMatchObject({ hostname: 'db' });
    // A static client asking for anything else is NAKed.
    const nak = ok(s.handle(msg(MT.Request, A, { requestedIp: ip(50) }), meta(A)));
    expect(nak.repr.messageType).toBe(MT.Nak);
  });

  it('offers are held only briefly; leases expire on the clock and free the address', () => {
    const s = server({ poolStart: ip(10), poolEnd: ip(10), offerHoldSec: 30, leaseTimeSec: 600 });
    expect(ok(s.handle(msg(MT.Discover, A), meta(A))).repr.yiaddr).toBe(ip(10));
    expect(s.handle(msg(MT.Discover, B), meta(B))).toBeNull(); // held for A
    clock.advance(30_000);
    expect(ok(s.handle(msg(MT.Discover, B), meta(B))).repr.yiaddr).toBe(ip(10)); // reclaimed
    const ack = ok(s.handle(msg(MT.Request, B, { requestedIp: ip(10), serverId: GW }), meta(B)));
    expect(ack.repr.leaseTime).toBe(600);
    expect(s.handle(msg(MT.Discover, A), meta(A))).toBeNull();
    clock.advance(599_999);
    expect(s.leases()).toHaveLength(1);
    clock.advance(1);
    expect(s.leases()).toHaveLength(0);
    expect(events.at(-1)).toMatchObject({ event: 'expired', ip: ip(10) });
    expect(counters.get('dhcp.lease.expired')).toBe(1);
    expect(ok(s.handle(msg(MT.Discover, A), meta(A))).repr.yiaddr).toBe(ip(10));
  });

  it('DECLINE keeps the address out of the pool for a while, only from its holder', () => {
    const s = server({ poolStart: ip(10), poolEnd: ip(11), declineHoldSec: 600 });
    const a = dora(s, A).repr.yiaddr;
    // B may not decline A's address.
    s.handle(msg(MT.Decline, B, { requestedIp: a, serverId: GW }), meta(B));
    expect(counters.get('dhcp.drop.decline_not_holder')).toBe(1);
    expect(s.leases()).toHaveLength(1);
    s.handle(msg(MT.Decline, A, { requestedIp: a, serverId: GW }), meta(A));
    expect(s.leases()).toHaveLength(0);
    expect(events.at(-1)).toMatchObject({ event: 'declined', ip: a });
    // A comes back: it gets the other address, and the declined one is not offered to anyone.
    const a2 = dora(s, A).repr.yiaddr;
    expect(a2).not.toBe(a);
    expect(s.handle(msg(MT.Discover, B), meta(B))).toBeNull();
    clock.advance(600_000);
    expect(ok(s.handle(msg(MT.Discover, B), meta(B))).repr.yiaddr).toBe(a);
  });
});

describe('DHCP server: REQUEST states (§4.3.2)', () => {
  let s: DhcpServer;
  beforeEach(() => { s = server(); });

  it('SELECTING with another server id: ignored, and our offer is let go', () => {
    const o = ok(s.handle(msg(MT.Discover, A), meta(A))).repr.yiaddr;
    expect(s.handle(msg(MT.Request, A, { requestedIp: o, serverId: ip4('10.0.0.1') }), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.other_server')).toBe(1);
    expect(ok(s.handle(msg(MT.Discover, B), meta(B))).repr.yiaddr).not.toBe(o); // still remembered for A
  });

  it('SELECTING for an address other than the offered one: NAK', () => {
    const o = ok(s.handle(msg(MT.Discover, A), meta(A))).repr.yiaddr;
    const r = ok(s.handle(msg(MT.Request, A, { requestedIp: o + 5, serverId: GW }), meta(A)));
    expect(r.repr.messageType).toBe(MT.Nak);
  });

  it('INIT-REBOOT with a wrong address: NAK, broadcast, no yiaddr, no lease options', () => {
    const r = ok(s.handle(msg(MT.Request, A, { requestedIp: ip4('10.1.2.3') }), meta(A)));
    expect(r.repr.messageType).toBe(MT.Nak);
    expect(r.repr.message).toBe('wrong network');
    expect(r.repr.yiaddr).toBe(0);
    expect(r.repr.leaseTime).toBeNull();
    expect(r.repr.serverId).toBe(GW);
    expect(r).toMatchObject({ dstIp: IP4_BROADCAST, broadcast: true, dstPort: 68 });
    expect(r.dstMac).toEqual(BROADCAST_MAC);
    // An address held by someone else: NAK too.
    const held = dora(s, B).repr.yiaddr;
    expect(ok(s.handle(msg(MT.Request, A, { requestedIp: held }), meta(A))).repr.messageType).toBe(MT.Nak);
    expect(counters.get('dhcp.tx.nak')).toBe(2);
  });

  it('INIT-REBOOT for a different address than the one the client holds: NAK (back to DISCOVER)', () => {
    const held = dora(s, A).repr.yiaddr;
    expect(ok(s.handle(msg(MT.Request, A, { requestedIp: held + 1 }), meta(A))).repr.messageType).toBe(MT.Nak);
    expect(ok(s.handle(msg(MT.Request, A, { requestedIp: held }), meta(A))).repr.messageType).toBe(MT.Ack);
  });

  it('RENEWING (unicast) and REBINDING (broadcast) extend the lease on ciaddr', () => {
    const a = dora(s, A).repr.yiaddr;
    clock.advance(1800_000);
    const renew = ok(s.handle(msg(MT.Request, A, { ciaddr: a }), meta(A, a)));
    expect(renew.repr).toMatchObject({ messageType: MT.Ack, yiaddr: a, ciaddr: a, leaseTime: 3600 });
    expect(renew).toMatchObject({ dstIp: a, broadcast: false });
    clock.advance(3150_000);
    const rebind = ok(s.handle(msg(MT.Request, A, { ciaddr: a, broadcast: true }), meta(A, a)));
    expect(rebind.repr.messageType).toBe(MT.Ack);
    // §4.1: ciaddr set wins over the broadcast bit.
    expect(rebind).toMatchObject({ dstIp: a, broadcast: false });
    clock.advance(3599_000);
    expect(s.leases()).toHaveLength(1);
    // Renewing an address that is someone else's: NAK.
    expect(ok(s.handle(msg(MT.Request, B, { ciaddr: a }), meta(B, a))).repr.messageType).toBe(MT.Nak);
  });

  it('a REQUEST with neither requested IP nor ciaddr is dropped', () => {
    expect(s.handle(msg(MT.Request, A), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.bad_request')).toBe(1);
  });
});

describe('DHCP server: INFORM, addressing, hostile input', () => {
  it('INFORM: ACK to ciaddr without yiaddr or lease time (§4.3.5)', () => {
    const s = server();
    const r = ok(s.handle(msg(MT.Inform, A, { ciaddr: ip(200) }), meta(A, ip(200))));
    expect(r.repr).toMatchObject({ messageType: MT.Ack, yiaddr: 0, ciaddr: ip(200), leaseTime: null, renewalTime: null, rebindingTime: null });
    expect(r.repr.routers).toEqual([GW]);
    expect(r.repr.dnsServers).toEqual([GW]);
    expect(r).toMatchObject({ dstIp: ip(200), broadcast: false });
    expect(s.leases()).toEqual([]);
    // ciaddr left zero: answer the datagram's source.
    const r2 = ok(s.handle(msg(MT.Inform, A), meta(A, ip(201))));
    expect(r2).toMatchObject({ dstIp: ip(201), broadcast: false });
  });

  it('§4.1 addressing: relay, broadcast bit, NAK through a relay', () => {
    const s = server();
    const relay = ip4('10.9.0.1');
    const relayMac = mac('02:00:00:00:00:99');
    const viaRelay = ok(s.handle(msg(MT.Discover, A, { giaddr: relay }), meta(relayMac, relay)));
    expect(viaRelay).toMatchObject({ dstIp: relay, dstPort: 67, broadcast: false });
    expect(viaRelay.dstMac).toEqual(relayMac);
    expect(viaRelay.repr.giaddr).toBe(relay);
    const bcast = ok(s.handle(msg(MT.Discover, B, { broadcast: true }), meta(B)));
    expect(bcast).toMatchObject({ dstIp: IP4_BROADCAST, broadcast: true });
    expect(bcast.repr.broadcast).toBe(true);
    const nak = ok(s.handle(msg(MT.Request, A, { giaddr: relay, requestedIp: ip4('10.0.0.1') }), meta(relayMac, relay)));
    expect(nak.repr.messageType).toBe(MT.Nak);
    expect(nak.repr.broadcast).toBe(true); // Table 3: relay must broadcast the NAK
    expect(nak).toMatchObject({ dstIp: relay, dstPort: 67 });
  });

  it('trims the search list when the reply would exceed 576-byte datagrams', () => {
    const long = Array.from({ length: 40 }, (_, i) => `zone${i}.example${i}.test`);
    const s = server({ searchList: long });
    const small = ok(s.handle(msg(MT.Discover, A), meta(A)));
    expect(small.repr.searchList).toBeNull();
    expect(small.repr.domainName).toBe('tender.internal');
    expect(dhcpEmittedLength(small.repr)).toBeLessThanOrEqual(548);
    expect(counters.get('dhcp.reply.options_trimmed')).toBe(1);
    const big = ok(s.handle(msg(MT.Discover, B, { maxMessageSize: 1500 }), meta(B)));
    expect(big.repr.searchList).toEqual(long);
  });

  it('drops bad hardware types, replies, unknown types and malformed bytes, counting each', () => {
    const s = server();
    expect(s.handle(msg(MT.Discover, A, { hlen: 16 }), meta(A))).toBeNull();
    expect(s.handle(msg(MT.Discover, A, { htype: 32 }), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.bad_htype')).toBe(2);
    // Another guest's chaddr from this guest's MAC: no offer, no release.
    expect(s.handle(msg(MT.Discover, A), meta(B))).toBeNull();
    expect(counters.get('dhcp.drop.chaddr_mismatch')).toBe(1);
    expect(s.handle(msg(MT.Offer, A), meta(A))).toBeNull();
    expect(s.handle(msg(42, A), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.unexpected_type')).toBe(2);
    const noType = UDHCPC_DISCOVER.slice();
    noType[240] = 0; // 53 -> pad: option 53 gone, its length and value read as options 1/1
    noType[241] = 0;
    noType[242] = 0;
    expect(s.handlePacket(noType, meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.no_message_type')).toBe(1);
    expect(s.handlePacket(UDHCPC_DISCOVER.subarray(0, 100), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.truncated')).toBe(1);
    expect(s.leases()).toEqual([]);
  });

  it('one MAC inventing client ids gets a bounded number of addresses', () => {
    const s = server({ maxLeasesPerMac: 2 });
    const id = (n: number) => Uint8Array.of(0, n);
    dora(s, A, { clientId: id(1) });
    dora(s, A, { clientId: id(2) });
    expect(s.handle(msg(MT.Discover, A, { clientId: id(3) }), meta(A))).toBeNull();
    expect(counters.get('dhcp.drop.mac_limit')).toBe(1);
    expect(s.leases()).toHaveLength(2);
    dora(s, B); // others are not affected
  });

  it('RELEASE of an address the client does not hold changes nothing', () => {
    const s = server();
    const a = dora(s, A).repr.yiaddr;
    s.handle(msg(MT.Release, B, { ciaddr: a }), meta(B, a));
    s.handle(msg(MT.Release, A, { ciaddr: a, serverId: ip4('10.0.0.1') }), meta(A, a));
    expect(s.leases()).toHaveLength(1);
    expect(counters.get('dhcp.drop.release_not_holder')).toBe(1);
    expect(counters.get('dhcp.drop.other_server')).toBe(1);
  });

  it('publishes only hostnames that are one DNS label', () => {
    expect(sanitizeHostname('VMBox')).toBe('vmbox');
    expect(sanitizeHostname('web.example.com')).toBe('web');
    expect(sanitizeHostname('-bad')).toBeUndefined();
    expect(sanitizeHostname('a b')).toBeUndefined();
    expect(sanitizeHostname('x'.repeat(64))).toBeUndefined();
    const s = server();
    dora(s, A, { hostname: 'evil name\n' });
    expect(s.leases()[0]!.hostname).toBeUndefined();
  });

  it('any sequence of requests from a few clients keeps the table consistent', () => {
    const macs = [A, B, mac('52:54:00:00:00:0c')];
    const step = fc.record({
      who: fc.integer({ min: 0, max: 2 }),
      type: fc.integer({ min: 1, max: 8 }),
      addr: fc.constantFrom(0, ip(10), ip(11), ip(12), ip4('10.0.0.1'), GW),
      sid: fc.constantFrom(null, GW, ip4('10.0.0.9')),
      useCiaddr: fc.boolean(),
      wait: fc.constantFrom(0, 0, 1000, 30_000, 600_000),
    });
    fc.assert(
      fc.property(fc.array(step, { maxLength: 40 }), (steps) => {
        clock = new ManualClock(0);
        counters = new Counters();
        const s = new DhcpServer(baseConfig({ poolStart: ip(10), poolEnd: ip(12), leaseTimeSec: 600 }), clock, counters);
        for (const st of steps) {
          const m = macs[st.who]!;
          const f: Partial<DhcpRepr> = { serverId: st.sid };
          if (st.addr) { if (st.useCiaddr) f.ciaddr = st.addr; else f.requestedIp = st.addr; }
          const rep = s.handle(msg(st.type, m, f), meta(m, f.ciaddr ?? 0));
          if (rep && rep.repr.yiaddr !== 0) {
            expect([ip(10), ip(11), ip(12)]).toContain(rep.repr.yiaddr);
          }
          clock.advance(st.wait);
          const ls = s.leases();
          // One bound lease per address and per client, all inside the pool.
          expect(new Set(ls.map((l) => l.ip)).size).toBe(ls.length);
          expect(new Set(ls.map((l) => l.mac)).size).toBe(ls.length);
          for (const l of ls) expect(['192.168.127.10', '192.168.127.11', '192.168.127.12']).toContain(l.ip);
          for (const l of ls) expect(l.expiresAt).toBeGreaterThan(clock.now());
        }
      }),
      { numRuns: 300 },
    );
  });
});
