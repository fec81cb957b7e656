/**
 * `tender netns TARGET`: serve one network namespace as a machine on the userspace network,
 * the way slirp4netns and pasta do: a TAP inside the namespace, the stack in this process,
 * until SIGINT/SIGTERM.
 */
import { type Mac, ip4str, mac as parseMac, macStr, randomMac, subnetHost } from '../../netstack/addr.js';
import { networkConfig } from '../../netstack/config.js';
import type { Link } from '../../netstack/link/link.js';
import { PcapWriter, capture } from '../../netstack/link/pcap.js';
import { Network } from '../../netstack/network.js';
import { parseUpstream } from '../../netstack/services/dns.js';
import { ForwardSpecError, parseForwardSpec, type ForwardSpec } from '../../netstack/services/forward-spec.js';
import { ForwardError, type Forward } from '../../netstack/services/forwards.js';
import { createApi, listenUnix, type Api } from '../api/server.js';
import { registerNetworkRoutes } from '../api/network-routes.js';
import { TenderError, fromSystemError } from '../errors.js';
import type { Logger } from '../log.js';
import { configureNetns, resolveNetns, unconfigureNetns } from '../netns.js';

export interface NetnsOptions {
  ifname: string;
  mtu: string;
  mac?: string;
  subnet?: string;
  configure?: boolean;
  dnsUpstream: string[];
  pcap?: string;
  hostLoopback: boolean;
  forward?: string[];
  apiSocket?: string;
  /** false: plain TAP frames, no virtio-net header (commander's --no-offload). */
  offload?: boolean;
}

export interface ServedNetns {
  network: Network;
  link: Link;
  mac: Mac;
  /** The forwards set up from --forward (with the ports actually bound). */
  forwards: Forward[];
  api: Api | null;
  /** The address --configure assigned (or the address DHCP will give this MAC first). */
  address: string;
  stop(): Promise<void>;
}

export function validateIfname(name: string): string {
  if (name.length === 0 || Buffer.byteLength(name) > 15 || /[\s/:]/.test(name) || name === '.' || name === '..') {
    throw new TenderError('BAD_IFNAME', `bad interface name "${name}": 1 to 15 bytes, no whitespace, '/' or ':'`);
  }
  return name;
}

export function parseMtu(s: string): number {
  const n = Number(s);
  if (!/^\d+$/.test(s) || n < 576 || n > 65520) throw new TenderError('BAD_MTU', `bad MTU "${s}": an integer from 576 to 65520`);
  return n;
}

export function parseMacOption(s: string): Mac {
  let m: Mac;
  try {
    m = parseMac(s);
  } catch {
    throw new TenderError('BAD_MAC', `bad MAC address "${s}": six hex octets like 02:00:00:00:00:01`);
  }
  if (m[0]! & 1) throw new TenderError('BAD_MAC', `bad MAC address "${s}": a group (multicast) address cannot be an interface address`);
  return m;
}

/** Start serving; resolves once the TAP is up and the stack is running. */
export async function serveNetns(target: string, o: NetnsOptions, log: Logger): Promise<ServedNetns> {
  const ifname = validateIfname(o.ifname);
  const mtu = parseMtu(o.mtu);
  const mac = o.mac ? parseMacOption(o.mac) : randomMac();
  const upstreams = o.dnsUpstream.map((u) => {
    try {
      return parseUpstream(u);
    } catch (err) {
      throw new TenderError('BAD_UPSTREAM', `bad --dns-upstream "${u}": ${(err as Error).message}`);
    }
  });
  let config;
  try {
    config = networkConfig({ subnet: o.subnet, mtu, hostLoopback: o.hostLoopback, dnsUpstreams: upstreams });
  } catch (err) {
    const msg = (err as Error).message;
    throw new TenderError(/subnet|prefix/.test(msg) ? 'BAD_SUBNET' : 'BAD_ARGUMENT', msg);
  }
  const specs: ForwardSpec[] = [];
  for (const f of o.forward ?? []) {
    try {
      specs.push(...parseForwardSpec(f));
    } catch (err) {
      if (err instanceof ForwardSpecError) throw new TenderError('BAD_FORWARD_SPEC', err.message);
      throw err;
    }
  }
  const address = subnetHost(config.subnet, 2);
  // The namespace's own MAC always gets .2, whether it is configured directly or asks DHCP.
  config.staticLeases.push({ mac, ip: address });

  const ns = resolveNetns(target);
  const { TapLink } = await loadTap();
  let link: Link;
  try {
    link = TapLink.open({ ifname, netns: { path: ns.path }, mtu, mac, offload: o.offload !== false });
  } catch (err) {
    throw fromSystemError(err, `cannot create TAP "${ifname}" in ${ns.path}`);
  }

  let pcap: PcapWriter | null = null;
  if (o.pcap) {
    try {
      pcap = await PcapWriter.open(o.pcap);
    } catch (err) {
      link.close();
      throw new TenderError('PCAP_FAILED', `cannot write capture file ${o.pcap}: ${(err as Error).message}`);
    }
    link = capture(link, pcap);
  }

  const network = new Network({ config, log });
  network.addLink(link);

  const forwards: Forward[] = [];
  let api: Api | null = null;
  const cleanup = async () => {
    await api?.close();
    network.close();
    await pcap?.close();
  };
  try {
    for (const s of specs) forwards.push(await network.forwards.add(s, address));
    if (o.apiSocket) {
      api = await createApi({ log, title: 'tender network API' });
      registerNetworkRoutes(api, network);
      await listenUnix(api, o.apiSocket);
    }
  } catch (err) {
    await cleanup();
    if (err instanceof ForwardError) throw new TenderError(err.code, err.message);
    throw err;
  }

  let resolvConf: string | null = null;
  if (o.configure) {
    try {
      const r = await configureNetns(ns, {
        ifname,
        address: ip4str(address),
        prefix: config.subnet.prefix,
        gateway: ip4str(config.gatewayIp),
        nameserver: ip4str(config.gatewayIp),
        search: config.search,
      });
      resolvConf = r.resolvConf;
      if (r.note) log.warn({}, r.note);
    } catch (err) {
      await cleanup();
      throw err;
    }
  }

  log.info(
    {
      netns: ns.path,
      ifname,
      mac: macStr(mac),
      ...network.summary(),
      address: o.configure ? `${ip4str(address)}/${config.subnet.prefix}` : 'via DHCP',
      dnsUpstreams: upstreams.length ? upstreams.map((u) => `${u.host}:${u.port}`) : 'from /etc/resolv.conf',
      pcap: o.pcap ?? null,
      hostLoopback: o.hostLoopback,
      forwards: forwards.map((f) => f.spec),
      apiSocket: o.apiSocket ?? null,
    },
    'serving network namespace',
  );

  let stopped = false;
  return {
    network,
    link,
    mac,
    forwards,
    api,
    address: ip4str(address),
    async stop() {
      if (stopped) return;
      stopped = true;
      await cleanup();
      unconfigureNetns(resolvConf);
    },
  };
}

async function loadTap(): Promise<typeof import('../../netstack/link/tap.js')> {
  try {
    return await import('../../netstack/link/tap.js');
  } catch (err) {
    throw new TenderError('NATIVE_UNAVAILABLE', `the native addon is not available: ${(err as Error).message}`, { cause: err });
  }
}
