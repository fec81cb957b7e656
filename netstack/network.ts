/**
 * A userspace network, wired top to bottom in one place (as gvisor-tap-vsock does): the
 * switch, the gateway interface on it, UDP (and later TCP) on the gateway, and the services
 * as ordinary clients of them — DHCP, DNS, the UDP NAT. Links (TAP, QEMU sockets, vfkit) are
 * added as switch ports.
 */
import { type Ip4, type Mac, ip4str, macStr } from './addr.js';
import { type NetworkConfig, networkConfig } from './config.js';
import { Counters } from './counters.js';
import { Gateway } from './iface/gateway.js';
import type { Link } from './link/link.js';
import { Switch, type SwitchPort } from './link/switch.js';
import { DhcpServer } from './services/dhcp.js';
import { DnsService, readResolvConf } from './services/dns.js';
import { UdpNat } from './services/udp-nat.js';
import { type Clock, SystemClock } from './time.js';
import { UdpLayer } from './udp/udp-layer.js';
import { DHCP_CLIENT_PORT, DHCP_SERVER_PORT, dhcpEmittedLength, emitDhcp, parseDhcp } from './wire/dhcpv4.js';

/** The subset of a pino logger the stack uses. */
export interface NetLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  debug(obj: object, msg?: string): void;
}

const nullLogger: NetLogger = { info() {}, warn() {}, debug() {} };

export interface NetworkOptions {
  config?: NetworkConfig;
  clock?: Clock;
  counters?: Counters;
  log?: NetLogger;
  /** Host resolution for the DNS fallback (injectable for tests). */
  hostLookup?: (name: string, family: 4 | 6) => Promise<string[]>;
}

export class Network {
  readonly config: NetworkConfig;
  readonly clock: Clock;
  readonly counters: Counters;
  readonly switch: Switch;
  readonly gateway: Gateway;
  readonly udp: UdpLayer;
  readonly udpNat: UdpNat;
  readonly dhcp: DhcpServer;
  readonly dns: DnsService;
  private readonly log: NetLogger;
  private closed = false;

  constructor(opts: NetworkOptions = {}) {
    const cfg = (this.config = opts.config ?? networkConfig());
    this.clock = opts.clock ?? new SystemClock();
    this.counters = opts.counters ?? new Counters();
    this.log = opts.log ?? nullLogger;
    const { clock, counters } = this;

    this.switch = new Switch({
      clock,
      counters,
      onPortDown: (p, reason) => this.log.info({ port: p.id, link: p.link.name, reason }, 'link down'),
    });
    const addresses: Ip4[] = [cfg.gatewayIp];
    if (cfg.hostAlias !== null) addresses.push(cfg.hostAlias);
    this.gateway = new Gateway({ clock, counters, mac: cfg.gatewayMac, subnet: cfg.subnet, addresses, mtu: cfg.mtu });
    this.switch.addPort(this.gateway);
    this.udp = new UdpLayer(this.gateway, counters);
    this.udpNat = new UdpNat({
      clock,
      counters,
      udp: this.udp,
      gateway: this.gateway,
      hostAlias: cfg.hostAlias,
      hostLoopback: cfg.hostLoopback,
    });

    // DHCP: bound on every gateway address and the broadcasts (ip 0).
    const reserved = [cfg.gatewayIp, ...(cfg.hostAlias !== null ? [cfg.hostAlias] : [])];
    this.dhcp = new DhcpServer(
      {
        subnet: cfg.subnet,
        serverIp: cfg.gatewayIp,
        poolStart: cfg.poolStart,
        poolEnd: cfg.poolEnd,
        router: cfg.gatewayIp,
        dns: [cfg.gatewayIp],
        domainName: cfg.domain,
        searchList: cfg.search,
        mtu: cfg.mtu,
        leaseTimeSec: cfg.leaseTimeSec,
        staticLeases: cfg.staticLeases,
        reserved,
      },
      clock,
      counters,
    );
    const dhcpOut = new Uint8Array(1500);
    this.udp.bind(0, DHCP_SERVER_PORT, (d) => {
      const req = parseDhcp(d.payload);
      if (typeof req === 'string') {
        counters.inc(`dhcp.drop.${req}`);
        return;
      }
      const reply = this.dhcp.handle(req, { srcIp: d.srcIp, srcMac: d.srcMac });
      if (reply === null) return;
      const n = dhcpEmittedLength(reply.repr);
      const buf = n <= dhcpOut.length ? dhcpOut : new Uint8Array(n);
      const len = emitDhcp(reply.repr, buf, 0);
      const port = reply.dstPort ?? DHCP_CLIENT_PORT;
      this.udp.send(cfg.gatewayIp, DHCP_SERVER_PORT, reply.dstIp, port, buf.subarray(0, len), { dstMac: reply.dstMac });
    });

    // DNS on the gateway's addresses.
    const upstreams = cfg.dnsUpstreams.length > 0 ? cfg.dnsUpstreams : safeResolvConf(this.log);
    this.dns = new DnsService({
      zone: cfg.zone,
      upstreams,
      clock,
      counters,
      hostLookup: opts.hostLookup,
      gateway: ip4str(cfg.gatewayIp),
      host: cfg.hostAlias !== null ? ip4str(cfg.hostAlias) : undefined,
    });
    this.dhcp.onLease = (l) => {
      if (l.hostname) this.dns.records.add(`${l.hostname}.${cfg.zone}`, l.ip);
    };
    this.udp.bind(0, 53, (d) => {
      const q = d.payload.slice();
      const { srcIp, srcPort, dstIp } = d;
      void this.dns.query(q, { ip: ip4str(srcIp), port: srcPort, transport: 'udp' }).then((resp) => {
        if (resp !== null && !this.closed) this.udp.send(dstIp, 53, srcIp, srcPort, resp);
      });
    });
    this.log.debug({ upstreams }, 'dns upstreams');
  }

  /** Attach a link (a machine, a namespace) as a switch port. */
  addLink(link: Link): SwitchPort {
    return this.switch.addPort(link);
  }

  /** Publish a name in the zone (`<name>.<zone>` → ip). */
  addHost(name: string, ip: Ip4): void {
    this.dns.records.add(`${name}.${this.config.zone}`, ip4str(ip));
  }

  summary(): Record<string, string> {
    const c = this.config;
    return {
      subnet: `${ip4str(c.subnet.network)}/${c.subnet.prefix}`,
      gateway: ip4str(c.gatewayIp),
      gatewayMac: macStr(c.gatewayMac),
      hostAlias: c.hostAlias !== null ? ip4str(c.hostAlias) : 'none',
      mtu: String(c.mtu),
    };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.udpNat.close();
    this.dns.close();
    this.switch.close();
    this.gateway.close();
    if (this.clock instanceof SystemClock) this.clock.stop();
  }
}

function safeResolvConf(log: NetLogger): { host: string; port: number }[] {
  try {
    return readResolvConf();
  } catch (err) {
    log.warn({ err: String(err) }, 'cannot read /etc/resolv.conf; DNS falls back to the host resolver');
    return [];
  }
}

export type { Mac };
