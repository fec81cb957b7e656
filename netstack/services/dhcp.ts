/**
 * DHCPv4 server (RFC 2131 §4.3), pure protocol logic: the stack's UDP layer hands it parsed
 * requests from port 68 and sends the replies it returns from port 67. No sockets, no
 * wall clock: offers and leases time out on the injected Clock.
 *
 * We are the only server on a virtual network we own, so we behave as an *authoritative*
 * server (like dnsmasq --dhcp-authoritative): a REQUEST for an address we have no record
 * of is ACKed when the address is free, which keeps guests on their address across a
 * restart of tender, and NAKed when it is wrong, so a guest moved to another subnet
 * recovers at once instead of waiting out its old lease.
 *
 * Addresses live in dhcp-leases.ts; this file decides what to answer and where to send it.
 */
import {
  BROADCAST_MAC, IP4_BROADCAST, type Ip4, type Mac, type Subnet,
  inSubnet, ip4str, macEq, macStr, subnetBroadcast, subnetHost,
} from '../addr.js';
import type { Counters } from '../counters.js';
import type { Clock } from '../time.js';
import {
  BootpOp, DHCP_CLIENT_PORT, DHCP_DEFAULT_MAX_MESSAGE, DHCP_SERVER_PORT, DhcpMessageType as MT,
  type DhcpRepr, dhcpEmittedLength, emptyDhcpRepr, parseDhcp,
} from '../wire/dhcpv4.js';
import { type LeaseRecord, LeaseTable, type StaticLease } from './dhcp-leases.js';

export interface DhcpServerConfig {
  subnet: Subnet;
  /** Our address: server identifier (option 54) and source of replies. */
  serverIp: Ip4;
  /** Default: .2 of the subnet. */
  poolStart?: Ip4;
  /** Default: broadcast - 2 (.253 in a /24: .254 is the host alias). */
  poolEnd?: Ip4;
  /** Default: serverIp. */
  router?: Ip4;
  /** Default: [serverIp]. */
  dns?: Ip4[];
  domainName?: string;
  searchList?: string[];
  mtu?: number;
  /** Default 3600. */
  leaseTimeSec?: number;
  staticLeases?: StaticLease[];
  /** Addresses never handed out dynamically (e.g. the host alias .254). */
  reserved?: Ip4[];
  /** How long an OFFER holds its address for the client's REQUEST. Default 60 s. */
  offerHoldSec?: number;
  /** How long a DECLINEd address stays unused (RFC 2131 §4.3.3). Default 600 s. */
  declineHoldSec?: number;
  /**
   * Offered or bound addresses one MAC may hold under different client ids (a guest with
   * several DHCP clients on one interface). Bounds how fast one guest can drain the pool
   * by inventing client ids. Default 4.
   */
  maxLeasesPerMac?: number;
}

/** Where a reply goes (§4.1); the source is always serverIp:67. */
export interface DhcpReply {
  repr: DhcpRepr;
  dstIp: Ip4;
  dstMac: Mac;
  /** 68, or 67 when sent to a relay agent. */
  dstPort: number;
  broadcast: boolean;
}

export interface DhcpLease {
  mac: string;
  ip: string;
  hostname?: string;
  /** Clock ms. */
  expiresAt: number;
}

export interface DhcpLeaseEvent {
  event: 'bound' | 'released' | 'expired' | 'declined';
  mac: string;
  ip: Ip4;
  /** Sanitised to one DNS label, or the static lease's name; absent when unusable. */
  hostname?: string;
}

export interface DhcpRequestMeta {
  /** IP source of the datagram (0.0.0.0 for clients without an address). */
  srcIp: Ip4;
  /** Ethernet source of the frame. */
  srcMac: Mac;
}

/** One DNS label; anything else a guest calls itself is not published. */
const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

export function sanitizeHostname(h: string | null | undefined): string | undefined {
  if (!h) return undefined;
  const first = h.split('.')[0]!.toLowerCase();
  return LABEL.test(first) ? first : undefined;
}

function hex(b: Uint8Array): string {
  let s = '';
  for (const x of b) s += x.toString(16).padStart(2, '0');
  return s;
}

const TYPE_NAMES: Record<number, string> = {
  1: 'discover', 2: 'offer', 3: 'request', 4: 'decline', 5: 'ack', 6: 'nak', 7: 'release', 8: 'inform',
};

export class DhcpServer {
  readonly table: LeaseTable;
  /** Lease changes, so DNS can publish `<hostname>.tender.internal`. */
  onLease: ((e: DhcpLeaseEvent) => void) | null = null;

  private readonly serverIp: Ip4;
  private readonly router: Ip4;
  private readonly dns: Ip4[];
  private readonly leaseSec: number;
  private readonly offerMs: number;
  private readonly declineMs: number;

  constructor(
    readonly cfg: DhcpServerConfig,
    private readonly clock: Clock,
    private readonly counters: Counters,
  ) {
    const sn = cfg.subnet;
    this.serverIp = cfg.serverIp;
    this.router = cfg.router ?? cfg.serverIp;
    this.dns = cfg.dns ?? [cfg.serverIp];
    this.leaseSec = cfg.leaseTimeSec ?? 3600;
    this.offerMs = (cfg.offerHoldSec ?? 60) * 1000;
    this.declineMs = (cfg.declineHoldSec ?? 600) * 1000;
    const excluded = new Set<Ip4>([cfg.serverIp, this.router, ...(cfg.reserved ?? [])]);
    for (const s of cfg.staticLeases ?? []) excluded.add(s.ip);
    this.table = new LeaseTable(
      {
        subnet: sn,
        poolStart: cfg.poolStart ?? subnetHost(sn, 2),
        poolEnd: cfg.poolEnd ?? subnetHost(sn, -2),
        excluded,
        staticLeases: cfg.staticLeases ?? [],
      },
      clock,
    );
    this.table.onExpire = (r) => {
      this.counters.inc('dhcp.lease.expired');
      this.emit('expired', r);
    };
  }

  /** Parse a UDP payload from port 68 and handle it; drops are counted as `dhcp.drop.<reason>`. */
  handlePacket(payload: Uint8Array, meta: DhcpRequestMeta): DhcpReply | null {
    const req = parseDhcp(payload);
    if (typeof req === 'string') {
      this.counters.inc(`dhcp.drop.${req}`);
      return null;
    }
    return this.handle(req, meta);
  }

  /** Handle one request; returns the reply and where to send it, or null (dropped and counted). */
  handle(req: DhcpRepr, meta: DhcpRequestMeta): DhcpReply | null {
    if (req.op !== BootpOp.Request) return this.drop('not_request');
    // Only Ethernet: chaddr is where unicast replies go and what static leases match.
    if (req.htype !== 1 || req.hlen !== 6) return this.drop('bad_htype');
    // Without a relay, a client sends from its own MAC. Insisting on it stops one guest
    // from releasing, declining or taking over another's lease (or static lease) by
    // writing the other's chaddr.
    if (req.giaddr === 0 && !macEq(req.chaddr, meta.srcMac)) return this.drop('chaddr_mismatch');
    const name = TYPE_NAMES[req.messageType];
    if (name) this.counters.inc(`dhcp.rx.${name}`);
    switch (req.messageType) {
      case MT.Discover: return this.discover(req, meta);
      case MT.Request: return this.request(req, meta);
      case MT.Decline: this.decline(req); return null;
      case MT.Release: this.release(req); return null;
      case MT.Inform: return this.inform(req, meta);
      default: return this.drop('unexpected_type');
    }
  }

  /** Bound leases, for the API (`GET /services/dhcp/leases`) and DNS. */
  leases(): DhcpLease[] {
    return this.table.bound().map((r) => ({
      mac: macStr(r.mac),
      ip: ip4str(r.ip),
      ...(r.hostname !== undefined ? { hostname: r.hostname } : {}),
      expiresAt: r.expiresAt,
    }));
  }

  // -------------------------------------------------------------------------------------

  private drop(reason: string): null {
    this.counters.inc(`dhcp.drop.${reason}`);
    return null;
  }

  private emit(event: DhcpLeaseEvent['event'], r: LeaseRecord): void {
    if (!this.onLease) return;
    const e: DhcpLeaseEvent = { event, mac: macStr(r.mac), ip: r.ip };
    if (r.hostname !== undefined) e.hostname = r.hostname;
    this.onLease(e);
  }

  /** RFC 2131 §4.2: the client identifier when present, chaddr otherwise. */
  private key(req: DhcpRepr): string {
    return req.clientId ? `id:${hex(req.clientId)}` : `mac:${macStr(req.chaddr)}`;
  }

  private hostnameFor(req: DhcpRepr): string | undefined {
    return this.table.staticFor(req.chaddr)?.hostname ?? sanitizeHostname(req.hostname);
  }

  /** §4.3.1: choose the address to offer. */
  private discover(req: DhcpRepr, meta: DhcpRequestMeta): DhcpReply | null {
    const key = this.key(req);
    const st = this.table.staticFor(req.chaddr);
    let ip: Ip4 | null = null;
    if (st) {
      ip = st.ip; // static leases first
    } else {
      if (this.table.othersOfMac(req.chaddr, key) >= (this.cfg.maxLeasesPerMac ?? 4)) return this.drop('mac_limit');
      const mine = this.table.byClient(key);
      if (mine && this.table.available(mine.ip, key, req.chaddr)) ip = mine.ip;
      else if (req.requestedIp !== null && this.table.available(req.requestedIp, key, req.chaddr)) ip = req.requestedIp;
      else ip = this.table.pickFree();
    }
    if (ip === null) return this.drop('pool_exhausted');
    const cur = this.table.byAddress(ip);
    // A DISCOVER from a client that still holds a bound lease keeps the lease as it is:
    // the offer is for the same address and the lease timer must not shrink to an offer's.
    if (!(cur && cur.key === key && cur.state === 'bound')) {
      this.table.assign(key, req.chaddr, ip, 'offered', this.offerMs, this.hostnameFor(req));
    }
    return this.reply(req, meta, MT.Offer, ip);
  }

  /** §4.3.2: the client's state is told apart by server id, requested IP and ciaddr. */
  private request(req: DhcpRepr, meta: DhcpRequestMeta): DhcpReply | null {
    const key = this.key(req);
    if (req.serverId !== null) {
      // SELECTING. Another server's id: the client chose it; let our offer go.
      if (req.serverId !== this.serverIp) {
        const mine = this.table.byClient(key);
        if (mine && mine.state === 'offered') this.table.free(mine);
        return this.drop('other_server');
      }
      // RFC 2131 §4.3.2: ciaddr MUST be zero and 'requested IP address' MUST be filled in;
      // some clients put the address in ciaddr instead, so accept that too.
      const ip = req.requestedIp ?? (req.ciaddr || null);
      if (ip === null) return this.drop('bad_request');
      return this.commit(req, meta, key, ip);
    }
    if (req.requestedIp !== null && req.ciaddr === 0) {
      // INIT-REBOOT: the client remembers an address. NAK it if wrong for this network.
      return this.commit(req, meta, key, req.requestedIp);
    }
    if (req.ciaddr !== 0) {
      // RENEWING (unicast) or REBINDING (broadcast): extend the lease on ciaddr.
      return this.commit(req, meta, key, req.ciaddr);
    }
    return this.drop('bad_request');
  }

  /** ACK `ip` to the client if it may have it, NAK otherwise. */
  private commit(req: DhcpRepr, meta: DhcpRequestMeta, key: string, ip: Ip4): DhcpReply {
    const mine = this.table.byClient(key);
    const st = this.table.staticFor(req.chaddr);
    let ok: boolean;
    if (st) ok = st.ip === ip;
    // The client was offered or holds another address: send it back to DISCOVER to get
    // that one, so a client keeps one address instead of collecting several.
    else if (mine && mine.ip !== ip && mine.state !== 'free') ok = false;
    else ok = this.table.available(ip, key, req.chaddr);
    if (!ok) return this.nak(req, meta, inSubnet(this.cfg.subnet, ip) ? 'address not available' : 'wrong network');
    const r = this.table.assign(key, req.chaddr, ip, 'bound', this.leaseSec * 1000, this.hostnameFor(req));
    this.emit('bound', r);
    return this.reply(req, meta, MT.Ack, ip);
  }

  /** §4.3.3: the client found the address in use (ARP); keep it out of the pool a while. */
  private decline(req: DhcpRepr): void {
    if (req.serverId !== null && req.serverId !== this.serverIp) { this.drop('other_server'); return; }
    const ip = req.requestedIp;
    const r = ip !== null ? this.table.byAddress(ip) : undefined;
    // Only the holder may decline: otherwise one guest could empty the pool for everyone.
    if (!r || r.key !== this.key(req)) { this.drop('decline_not_holder'); return; }
    this.table.decline(r, this.declineMs);
    this.counters.inc('dhcp.lease.declined');
    this.emit('declined', r);
  }

  /** §4.3.4: the client gives ciaddr back. The record stays, for the same client next time. */
  private release(req: DhcpRepr): void {
    if (req.serverId !== null && req.serverId !== this.serverIp) { this.drop('other_server'); return; }
    const r = this.table.byAddress(req.ciaddr);
    if (!r || r.key !== this.key(req) || r.state === 'free') { this.drop('release_not_holder'); return; }
    const wasBound = r.state === 'bound';
    this.table.free(r);
    this.counters.inc('dhcp.lease.released');
    if (wasBound) this.emit('released', r);
  }

  /** §4.3.5: configuration only, for a client that configured its address itself. */
  private inform(req: DhcpRepr, meta: DhcpRequestMeta): DhcpReply {
    const rep = this.reply(req, meta, MT.Ack, 0);
    // RFC 2131 §4.3.5: send to ciaddr; many clients leave it zero, so fall back to the
    // datagram's source (RFC 2131 errata / what ISC dhcpd does).
    if (req.giaddr === 0 && req.ciaddr === 0 && meta.srcIp !== 0) {
      rep.dstIp = meta.srcIp;
      rep.dstMac = meta.srcMac.slice(0, 6);
      rep.broadcast = false;
    }
    return rep;
  }

  private base(req: DhcpRepr, type: number): DhcpRepr {
    const r = emptyDhcpRepr();
    r.op = BootpOp.Reply;
    r.messageType = type;
    r.htype = req.htype;
    r.hlen = req.hlen;
    r.xid = req.xid;
    r.broadcast = req.broadcast;
    r.giaddr = req.giaddr;
    r.chaddr = req.chaddr.slice(0, 6);
    r.serverId = this.serverIp;
    return r;
  }

  /** OFFER / ACK (yiaddr = 0 for INFORM) with the configuration options (RFC 2131 Table 3). */
  private reply(req: DhcpRepr, meta: DhcpRequestMeta, type: number, yiaddr: Ip4): DhcpReply {
    const r = this.base(req, type);
    const sn = this.cfg.subnet;
    const inform = req.messageType === MT.Inform;
    r.yiaddr = yiaddr;
    // Table 3: ciaddr is copied into an ACK (renew, inform), zero in an OFFER.
    r.ciaddr = type === MT.Ack ? req.ciaddr : 0;
    if (!inform) {
      // §4.4.5 defaults: T1 = 0.5, T2 = 0.875 of the lease.
      r.leaseTime = this.leaseSec;
      r.renewalTime = Math.floor(this.leaseSec / 2);
      r.rebindingTime = Math.floor((this.leaseSec * 7) / 8);
    }
    r.subnetMask = sn.mask;
    r.broadcastAddress = subnetBroadcast(sn);
    r.routers = [this.router];
    r.dnsServers = this.dns.slice();
    if (this.cfg.mtu !== undefined) r.mtu = this.cfg.mtu;
    if (this.cfg.domainName) r.domainName = this.cfg.domainName;
    if (this.cfg.searchList && this.cfg.searchList.length > 0) r.searchList = this.cfg.searchList.slice();
    const st = yiaddr !== 0 ? this.table.staticFor(req.chaddr) : undefined;
    if (st?.hostname) r.hostname = st.hostname;
    r.optionOrder = req.parameterRequestList;
    this.fit(r, req);
    this.counters.inc(`dhcp.tx.${TYPE_NAMES[type]}`);
    return this.address(req, meta, r, false);
  }

  private nak(req: DhcpRepr, meta: DhcpRequestMeta, message: string): DhcpReply {
    const r = this.base(req, MT.Nak);
    r.message = message;
    this.counters.inc('dhcp.tx.nak');
    return this.address(req, meta, r, true);
  }

  /**
   * Keep the reply within what the client accepts (option 57, else 576-byte datagrams,
   * §2): drop the search list, then the domain name. We never overload sname/file.
   */
  private fit(r: DhcpRepr, req: DhcpRepr): void {
    const max = req.maxMessageSize !== null ? req.maxMessageSize - 28 : DHCP_DEFAULT_MAX_MESSAGE;
    if (dhcpEmittedLength(r) <= max) return;
    this.counters.inc('dhcp.reply.options_trimmed');
    r.searchList = null;
    if (dhcpEmittedLength(r) <= max) return;
    r.domainName = null;
    r.hostname = null;
  }

  /** RFC 2131 §4.1, "If the 'giaddr' field ... is zero" paragraph, in order. */
  private address(req: DhcpRepr, meta: DhcpRequestMeta, r: DhcpRepr, isNak: boolean): DhcpReply {
    if (req.giaddr !== 0) {
      // Through a relay: to its server port, at the MAC the request came from (the relay's
      // or its router's); a NAK asks it to broadcast (Table 3).
      if (isNak) r.broadcast = true;
      return { repr: r, dstIp: req.giaddr, dstMac: meta.srcMac.slice(0, 6), dstPort: DHCP_SERVER_PORT, broadcast: false };
    }
    if (isNak) {
      return { repr: r, dstIp: IP4_BROADCAST, dstMac: BROADCAST_MAC.slice(), dstPort: DHCP_CLIENT_PORT, broadcast: true };
    }
    if (req.ciaddr !== 0) {
      return { repr: r, dstIp: req.ciaddr, dstMac: req.chaddr.slice(0, 6), dstPort: DHCP_CLIENT_PORT, broadcast: false };
    }
    if (req.broadcast || r.yiaddr === 0) {
      return { repr: r, dstIp: IP4_BROADCAST, dstMac: BROADCAST_MAC.slice(), dstPort: DHCP_CLIENT_PORT, broadcast: true };
    }
    // The client has no address yet but can take unicast: send to yiaddr at chaddr
    // directly (no ARP: the client could not answer it).
    return { repr: r, dstIp: r.yiaddr, dstMac: req.chaddr.slice(0, 6), dstPort: DHCP_CLIENT_PORT, broadcast: false };
  }
}
