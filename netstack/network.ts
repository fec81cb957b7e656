/**
 * A userspace network, wired top to bottom in one place (as gvisor-tap-vsock does): the
 * switch, the gateway interface on it, UDP (and later TCP) on the gateway, and the services
 * as ordinary clients of them — DHCP, DNS, the UDP NAT. Links (TAP, QEMU sockets, vfkit) are
 * added as switch ports.
 */
import { EventEmitter } from 'node:events';
import { type Ip4, type Mac, ip4str, macStr } from './addr.js';
import { type NetworkConfig, networkConfig } from './config.js';
import { Counters } from './counters.js';
import { Gateway } from './iface/gateway.js';
import type { Link } from './link/link.js';
import { Switch, type SwitchPort } from './link/switch.js';
import { DhcpServer } from './services/dhcp.js';
import { DnsService, readResolvConf } from './services/dns.js';
import { UdpNat } from './services/udp-nat.js';
import { Forwards } from './services/forwards.js';
import { serveDnsTcp } from './services/dns-tcp.js';
import { TcpNat } from './services/tcp-nat.js';
import { TcpStack } from './tcp/stack.js';
import { type OffloadPort, TcpOffloader } from './tcp/offload.js';
import { FdFrameLink } from './link/fd-link.js';
import type { TcpConnection } from './tcp/connection.js';
import { IpProto } from './wire/ipv4.js';
import { type Clock, SystemClock } from './time.js';
import { UdpLayer } from './udp/udp-layer.js';
import { DHCP_SERVER_PORT, dhcpEmittedLength, emitDhcp } from './wire/dhcpv4.js';

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
  /**
   * The TCP offload for links over the native FrameIO (tcp/offload.ts). Default on; the
   * environment variable TENDER_TCP_OFFLOAD=0 turns it off (for A/B measurements).
   */
  tcpOffload?: boolean;
}

export interface LeaseEvent {
  event: 'bound' | 'released' | 'expired' | 'declined';
  mac: string;
  ip: string;
  hostname?: string;
}

export class Network extends EventEmitter<{ lease: [LeaseEvent] }> {
  readonly config: NetworkConfig;
  readonly clock: Clock;
  readonly counters: Counters;
  readonly switch: Switch;
  readonly gateway: Gateway;
  readonly udp: UdpLayer;
  readonly udpNat: UdpNat;
  readonly dhcp: DhcpServer;
  readonly dns: DnsService;
  readonly forwards: Forwards;
  readonly tcp: TcpStack;
  readonly tcpNat: TcpNat;
  /** Null when the offload is off. */
  readonly offloader: TcpOffloader | null;
  private readonly offloadPorts = new WeakMap<Link, OffloadPort>();
  /** TCP services on the gateway's own address (DNS; USB/IP for machines): port → handler. */
  private readonly localTcp = new Map<number, (conn: TcpConnection) => void>();
  private readonly log: NetLogger;
  private readonly ports: SwitchPort[] = [];
  private defaultGuestIp: Ip4 | null;
  private closed = false;

  constructor(opts: NetworkOptions = {}) {
    super();
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
    if (cfg.hostAlias !== null) this.udp.forwardedAddresses.add(cfg.hostAlias);
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
      const reply = this.dhcp.handlePacket(d.payload, { srcIp: d.srcIp, srcMac: d.srcMac });
      if (reply === null) return;
      const n = dhcpEmittedLength(reply.repr);
      const buf = n <= dhcpOut.length ? dhcpOut : new Uint8Array(n);
      const len = emitDhcp(reply.repr, buf, 0);
      // No ARP for the destination: the client has no address yet (RFC 2131 §4.1).
      this.udp.send(cfg.gatewayIp, DHCP_SERVER_PORT, reply.dstIp, reply.dstPort, buf.subarray(0, len), { dstMac: reply.dstMac });
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
      // Without host loopback the alias leads nowhere useful, so host.* names are forwarded.
      host: cfg.hostAlias !== null && cfg.hostLoopback ? ip4str(cfg.hostAlias) : undefined,
    });
    // Leases publish `<hostname>.<zone>`, and withdraw it when they end.
    this.dhcp.onLease = (l) => {
      this.emit('lease', { event: l.event, mac: l.mac, ip: ip4str(l.ip), hostname: l.hostname });
      if (!l.hostname) return;
      if (l.event === 'bound') this.dns.addMachine(l.hostname, ip4str(l.ip));
      else this.dns.removeMachine(l.hostname, ip4str(l.ip));
    };
    this.udp.bind(0, 53, (d) => {
      const q = d.payload.slice();
      const { srcIp, srcPort, dstIp } = d;
      void this.dns.query(q, { ip: ip4str(srcIp), port: srcPort, transport: 'udp' }).then((resp) => {
        if (resp !== null && !this.closed) this.udp.send(dstIp, 53, srcIp, srcPort, resp);
      });
    });
    this.log.debug({ upstreams }, 'dns upstreams');

    // TCP: the engine on the gateway, the NAT for guest connections, DNS over TCP on :53.
    this.tcp = new TcpStack({ clock, counters, ip: this.gateway });
    const tcp = this.tcp;
    const offloadOn = opts.tcpOffload ?? process.env.TENDER_TCP_OFFLOAD !== '0';
    this.offloader = offloadOn
      ? new TcpOffloader({
          clock,
          counters,
          route: (ip) => {
            const mac = this.gateway.neighbors.lookup(ip);
            if (mac === null) return null;
            const link = this.switch.linkFor(mac, true);
            const port = link === null ? undefined : this.offloadPorts.get(link);
            return port === undefined ? null : { port, mac };
          },
        })
      : null;
    tcp.offloader = this.offloader;
    this.gateway.register(IpProto.TCP, {
      input: (ip, _mac, csumOk) => tcp.input(ip.src, ip.dst, ip.payload, csumOk),
      flush: () => tcp.flush(),
    });
    this.tcpNat = new TcpNat({
      counters,
      tcp,
      gateway: this.gateway,
      hostAlias: cfg.hostAlias,
      hostLoopback: cfg.hostLoopback,
      local: this.localTcp,
    });
    this.localTcp.set(53, (conn) => serveDnsTcp(conn, this.dns, counters));

    this.defaultGuestIp = cfg.poolStart;
    this.forwards = new Forwards({
      clock,
      counters,
      udp: this.udp,
      tcp,
      subnet: cfg.subnet,
      aliasIp: cfg.hostAlias ?? cfg.gatewayIp,
    });
  }

  /**
   * Serve TCP `port` on the gateway address, inside the virtual network only (never on a host
   * interface): each connection from a guest goes to `handler`.
   */
  serveTcp(port: number, handler: (conn: TcpConnection) => void): () => void {
    if (this.localTcp.has(port)) throw new Error(`gateway TCP port ${port} is already served`);
    this.localTcp.set(port, handler);
    return () => {
      if (this.localTcp.get(port) === handler) this.localTcp.delete(port);
    };
  }

  /** The guest a forward goes to when none is named (the namespace served by `tender netns`). */
  defaultGuest(): string | null {
    return this.defaultGuestIp === null ? null : ip4str(this.defaultGuestIp);
  }

  setDefaultGuest(ip: Ip4 | null): void {
    this.defaultGuestIp = ip;
  }

  /** Everything the API's /v1/stats shows: every counter, per-link traffic, table sizes. */
  stats(): Record<string, unknown> {
    return {
      counters: this.counters.snapshot(),
      drops: this.counters.drops(),
      links: this.ports.map((p) => ({ port: p.id, name: p.link.name, mtu: p.link.mtu, ...p.link.stats })),
      gateway: { ...this.gateway.stats },
      macTable: this.switch.macTable().length,
      neighbors: this.gateway.neighbors.list().length,
      leases: this.dhcp.leases().length,
      udpNatFlows: this.udpNat.flowCount,
      tcp: this.tcp.stats(),
      tcpOffload: this.offloadStats(),
      tcpNatActive: this.tcpNat.active,
      forwards: this.forwards.list().length,
    };
  }

  /** Attach a link (a machine, a namespace) as a switch port. */
  addLink(link: Link): SwitchPort {
    const p = this.switch.addPort(link);
    this.ports.push(p);
    // Only a link the switch reaches directly: a capture must see every frame.
    if (this.offloader !== null && link instanceof FdFrameLink) {
      const off = this.offloader;
      try {
        const port = link.enableOffload(this.config.gatewayMac, (id) => off.exited(id));
        if (port !== null) this.offloadPorts.set(link, port);
      } catch (err) {
        // An addon without the offload (an older build): the engine does everything.
        this.log.warn({ link: link.name, err: String(err) }, 'tcp offload unavailable');
      }
    }
    return p;
  }

  /** The TCP offload's totals over all links (`null` when off). */
  offloadStats(): Record<string, number> | null {
    if (this.offloader === null) return null;
    const sum: Record<string, number> = { held: this.offloader.size };
    for (const p of this.ports) {
      const l = p.link;
      const o = l instanceof FdFrameLink ? l.offloadCounters() : null;
      if (o) for (const [k, v] of Object.entries(o)) if (k !== 'flows') sum[k] = (sum[k] ?? 0) + v;
    }
    return sum;
  }

  /** Publish a name in the zone (`<name>.<zone>` → ip). */
  addHost(name: string, ip: Ip4): boolean {
    return this.dns.addMachine(name, ip4str(ip));
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
    this.forwards.close();
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
