/**
 * Network configuration and its defaults.
 *
 * The defaults are gvisor-tap-vsock's, so existing setups keep working: subnet
 * 192.168.127.0/24, gateway .1, host alias .254, first lease .2, MTU 1500, and the gateway
 * MAC 5a:94:ef:e4:0c:dd.
 */
import { type Ip4, type Mac, type Subnet, inSubnet, ip4str, mac, parseSubnet, subnetBroadcast, subnetHost } from './addr.js';

export interface NetworkConfig {
  subnet: Subnet;
  gatewayIp: Ip4;
  gatewayMac: Mac;
  /** Reaches the host's 127.0.0.1 (when hostLoopback); null disables the alias entirely. */
  hostAlias: Ip4 | null;
  hostLoopback: boolean;
  /** First and last addresses of the DHCP pool. */
  poolStart: Ip4;
  poolEnd: Ip4;
  mtu: number;
  /** DNS zone served by the gateway. */
  zone: string;
  /** Domain name and search list handed out by DHCP. */
  domain: string;
  search: string[];
  leaseTimeSec: number;
  /** Upstream DNS servers; empty means "read /etc/resolv.conf". */
  dnsUpstreams: { host: string; port: number }[];
  staticLeases: { mac: Mac; ip: Ip4; hostname?: string }[];
}

export interface NetworkConfigInput {
  subnet?: string;
  gatewayIp?: string;
  gatewayMac?: string;
  hostAlias?: string | null;
  hostLoopback?: boolean;
  mtu?: number;
  zone?: string;
  domain?: string;
  search?: string[];
  leaseTimeSec?: number;
  dnsUpstreams?: { host: string; port: number }[];
  staticLeases?: { mac: string; ip: string; hostname?: string }[];
}

export const DEFAULT_SUBNET = '192.168.127.0/24';
export const DEFAULT_GATEWAY_MAC = '5a:94:ef:e4:0c:dd';
export const MIN_MTU = 576;
export const MAX_MTU = 65520;

/** Build a full configuration; throws RangeError with a readable message on bad input. */
export function networkConfig(input: NetworkConfigInput = {}): NetworkConfig {
  const subnet = parseSubnet(input.subnet ?? DEFAULT_SUBNET);
  const gatewayIp = input.gatewayIp ? parseIn(subnet, input.gatewayIp, 'gateway') : subnetHost(subnet, 1);
  const hostAlias =
    input.hostAlias === null ? null : input.hostAlias ? parseIn(subnet, input.hostAlias, 'host alias') : subnetHost(subnet, -1);
  const mtu = input.mtu ?? 1500;
  if (!Number.isInteger(mtu) || mtu < MIN_MTU || mtu > MAX_MTU) {
    throw new RangeError(`MTU must be an integer from ${MIN_MTU} to ${MAX_MTU}: ${mtu}`);
  }
  const zone = (input.zone ?? 'tender.internal').replace(/\.$/, '').toLowerCase();
  const staticLeases = (input.staticLeases ?? []).map((l) => ({
    mac: mac(l.mac),
    ip: parseIn(subnet, l.ip, 'static lease'),
    hostname: l.hostname,
  }));
  // The pool runs from .2 (gvisor-tap-vsock's first lease) to the address before the
  // broadcast, skipping the gateway and host alias (the DHCP server excludes them).
  const poolStart = subnetHost(subnet, 2);
  const poolEnd = (subnetBroadcast(subnet) - 1) >>> 0;
  return {
    subnet,
    gatewayIp,
    gatewayMac: mac(input.gatewayMac ?? DEFAULT_GATEWAY_MAC),
    hostAlias,
    hostLoopback: input.hostLoopback ?? true,
    poolStart,
    poolEnd,
    mtu,
    zone,
    domain: input.domain ?? zone,
    search: input.search ?? [zone],
    leaseTimeSec: input.leaseTimeSec ?? 3600,
    dnsUpstreams: input.dnsUpstreams ?? [],
    staticLeases,
  };
}

function parseIn(subnet: Subnet, s: string, what: string): Ip4 {
  const m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(s);
  if (!m || m.slice(1).some((x) => Number(x) > 255)) throw new RangeError(`${what}: not an IPv4 address: ${s}`);
  const a = m.slice(1).reduce((acc, x) => acc * 256 + Number(x), 0) >>> 0;
  if (!inSubnet(subnet, a)) throw new RangeError(`${what} ${s} is outside the subnet ${ip4str(subnet.network)}/${subnet.prefix}`);
  if (a === subnet.network || a === subnetBroadcast(subnet)) throw new RangeError(`${what} ${s} is the network or broadcast address`);
  return a;
}
