/**
 * The DHCP server against the real clients, before the whole stack exists: a TAP inside a
 * namespace we create, and in this process a minimal responder (ARP for the gateway, UDP
 * port 67 to DhcpServer, replies framed as Ethernet/IPv4/UDP). busybox udhcpc, ISC
 * dhclient and systemd-networkd each run in the namespace and must configure the address,
 * router, DNS, domain, search list and MTU from our replies, renew, and release.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTap, FrameIO } from '../../native/index.js';
import { ip4, ip4str, mac, parseSubnet } from '../../netstack/addr.js';
import { Counters } from '../../netstack/counters.js';
import { DhcpServer } from '../../netstack/services/dhcp.js';
import { ManualClock } from '../../netstack/time.js';
import { ArpOp, ArpPacket, emitArp, parseArp } from '../../netstack/wire/arp.js';
import { dhcpEmittedLength, emitDhcp } from '../../netstack/wire/dhcpv4.js';
import { ETH_HLEN, EtherType, EthernetFrame, writeEthernetHeader } from '../../netstack/wire/ethernet.js';
import { IPV4_HLEN, IpProto, Ipv4Packet, emitIpv4 } from '../../netstack/wire/ipv4.js';
import { UDP_HLEN, UdpPacket, emitUdpHeader } from '../../netstack/wire/udp.js';
import { addNetns, delNetns, isRoot, nsExec, nsName, waitFor } from '../helpers/netns.js';

const GW = ip4('192.168.127.1');
const GW_MAC = mac('5a:94:ef:e4:0c:dd');
const GUEST_MAC = '52:54:00:12:34:56';

const canRun = isRoot && fs.existsSync('/dev/net/tun');
let ns = '';
let io: FrameIO | null = null;
let tmp = '';
let server: DhcpServer;
const counters = new Counters();
const out = new Uint8Array(2048);

/** Answer ARP for the gateway and hand UDP port 67 to the server: just enough of a stack. */
function onFrame(frame: Uint8Array): void {
  const eth = EthernetFrame.check(frame);
  if (!eth || eth.tagged) return;
  if (eth.etherType === EtherType.ARP) {
    const p = ArpPacket.check(eth.payload);
    const a = p && parseArp(p);
    if (!a || a.op !== ArpOp.Request || a.tpa !== GW) return;
    writeEthernetHeader(out, 0, a.sha, GW_MAC, EtherType.ARP);
    const n = emitArp({ op: ArpOp.Reply, sha: GW_MAC, spa: GW, tha: a.sha, tpa: a.spa }, out, ETH_HLEN);
    send(ETH_HLEN + n);
    return;
  }
  if (eth.etherType !== EtherType.IPv4) return;
  const ip = Ipv4Packet.check(eth.payload);
  if (typeof ip === 'string' || ip.protocol !== IpProto.UDP) return;
  const udp = UdpPacket.check(ip.payload, ip.src, ip.dst);
  if (typeof udp === 'string' || udp.dstPort !== 67) return;
  const rep = server.handlePacket(udp.payload, { srcIp: ip.src, srcMac: eth.src });
  if (!rep) return;
  const dlen = dhcpEmittedLength(rep.repr);
  const udpOff = ETH_HLEN + IPV4_HLEN;
  emitDhcp(rep.repr, out, udpOff + UDP_HLEN);
  emitUdpHeader({ srcPort: 67, dstPort: rep.dstPort }, dlen, out, udpOff, GW, rep.dstIp);
  emitIpv4({ src: GW, dst: rep.dstIp, protocol: IpProto.UDP, payloadLen: UDP_HLEN + dlen, ttl: 64 }, out, ETH_HLEN);
  writeEthernetHeader(out, 0, rep.dstMac, GW_MAC, EtherType.IPv4);
  send(udpOff + UDP_HLEN + dlen);
}

function send(len: number): void {
  io!.writeBatch(out, Uint32Array.of(0), Uint32Array.of(len), 1);
}

/** A fresh server per client, so each starts from an empty table. */
function newServer(): void {
  server = new DhcpServer(
    {
      subnet: parseSubnet('192.168.127.0/24'),
      serverIp: GW,
      reserved: [ip4('192.168.127.254')],
      domainName: 'tender.internal',
      searchList: ['tender.internal', 'example.com'],
      mtu: 1400,
      leaseTimeSec: 3600,
    },
    new ManualClock(0),
    counters,
  );
}

async function flush(): Promise<void> {
  await nsExec(ns, ['ip', 'addr', 'flush', 'dev', 'eth0']);
  await nsExec(ns, ['ip', 'link', 'set', 'eth0', 'mtu', '1500']);
}

const children: ChildProcess[] = [];
function start(cmd: string[]): ChildProcess {
  const c = spawn('ip', ['netns', 'exec', ns, ...cmd], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(c);
  return c;
}

const read = (f: string): string => (fs.existsSync(f) ? fs.readFileSync(f, 'utf8') : '');

describe.skipIf(!canRun)('DHCP server with real clients', () => {
  beforeAll(async () => {
    ns = nsName('dhcp');
    await addNetns(ns);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-dhcp-'));
    const tap = createTap({ name: 'eth0', netns: { name: ns }, mac: GUEST_MAC });
    io = new FrameIO({
      fd: tap.fd,
      socket: false,
      slotSize: 2048,
      onFrames(buf, count, lengths) {
        for (let i = 0; i < count; i++) onFrame(buf.subarray(i * 2048, i * 2048 + lengths[i]!));
      },
      onError() {},
    });
  });

  afterAll(async () => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    io?.close();
    if (ns) await delNetns(ns);
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it.skipIf(!fs.existsSync('/bin/busybox') && !fs.existsSync('/usr/bin/busybox'))(
    'busybox udhcpc: bound with every option, renews, releases',
    async () => {
      newServer();
      const env = path.join(tmp, 'udhcpc.env');
      const script = path.join(tmp, 'udhcpc.sh');
      fs.writeFileSync(script, `#!/bin/sh
echo "$1 ip=$ip subnet=$subnet router=$router dns=$dns domain=$domain search=$search mtu=$mtu lease=$lease serverid=$serverid" >> ${env}
case "$1" in bound|renew) ip addr replace $ip/24 dev $interface ;; deconfig) ip addr flush dev $interface ;; esac
`, { mode: 0o755 });
      const c = start(['busybox', 'udhcpc', '-f', '-R', '-i', 'eth0', '-s', script, '-x', 'hostname:vmbox',
        '-O', 'search', '-O', 'mtu', '-O', 'domain', '-t', '5', '-T', '1']);
      await waitFor(() => read(env).includes('bound '), 15_000);
      expect(read(env)).toContain(
        'bound ip=192.168.127.2 subnet=255.255.255.0 router=192.168.127.1 dns=192.168.127.1 domain=tender.internal ' +
        'search=tender.internal example.com mtu=1400 lease=3600 serverid=192.168.127.1',
      );
      expect(server.leases()).toMatchObject([{ mac: GUEST_MAC, ip: '192.168.127.2', hostname: 'vmbox' }]);
      c.kill('SIGUSR1'); // renew: unicast to the server, so ARP for the gateway first
      await waitFor(() => read(env).includes('renew '), 10_000);
      c.kill('SIGTERM'); // -R: release on exit
      await waitFor(() => server.leases().length === 0, 10_000);
      expect(counters.get('dhcp.lease.released')).toBe(1);
      await flush();
    },
  );

  it.skipIf(!fs.existsSync('/sbin/dhclient'))('ISC dhclient: bound, INIT-REBOOT, release', async () => {
    newServer();
    const env = path.join(tmp, 'dhclient.env');
    const conf = path.join(tmp, 'dhclient.conf');
    const script = path.join(tmp, 'dhclient.sh');
    const leasesFile = path.join(tmp, 'dhclient.leases');
    fs.writeFileSync(conf, 'send host-name "dhbox";\nrequest subnet-mask, broadcast-address, routers, domain-name, ' +
      'domain-name-servers, domain-search, host-name, interface-mtu;\n');
    fs.writeFileSync(script, `#!/bin/sh
echo "$reason ip=$new_ip_address router=$new_routers dns=$new_domain_name_servers domain=$new_domain_name search=$new_domain_search mtu=$new_interface_mtu" >> ${env}
case "$reason" in BOUND|RENEW|REBOOT) ip addr replace $new_ip_address/24 dev $interface ;; esac
`, { mode: 0o755 });
    const args = (pid: string) => ['dhclient', '-1', '-d', '-cf', conf, '-sf', script, '-lf', leasesFile, '-pf', path.join(tmp, pid), 'eth0'];
    // -d keeps it in the foreground (so it is our child); kill it once bound.
    let c = start(args('d1.pid'));
    await waitFor(() => read(env).includes('BOUND '), 20_000);
    c.kill('SIGKILL');
    expect(read(env)).toContain(
      'BOUND ip=192.168.127.2 router=192.168.127.1 dns=192.168.127.1 domain=tender.internal ' +
      'search=tender.internal. example.com. mtu=1400',
    );
    expect(server.leases()).toMatchObject([{ ip: '192.168.127.2', hostname: 'dhbox' }]);
    // Restart of tender (fresh server) + restart of dhclient: it asks for its address back.
    newServer();
    c = start(args('d2.pid'));
    await waitFor(() => read(env).includes('REBOOT '), 20_000);
    c.kill('SIGKILL');
    expect(server.leases()).toMatchObject([{ ip: '192.168.127.2' }]);
    await nsExec(ns, ['dhclient', '-r', '-cf', conf, '-sf', script, '-lf', leasesFile, '-pf', path.join(tmp, 'd3.pid'), 'eth0']);
    await waitFor(() => server.leases().length === 0, 10_000);
    await flush();
  });

  it.skipIf(!fs.existsSync('/lib/systemd/systemd-networkd'))('systemd-networkd: address, MTU, DNS, domains', async () => {
    newServer();
    const netdir = path.join(tmp, 'network');
    fs.mkdirSync(netdir);
    fs.writeFileSync(path.join(netdir, '10-eth0.network'),
      '[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n[DHCPv4]\nHostname=ndbox\nUseMTU=yes\nUseDomains=yes\n');
    // Its own mount namespace: our .network directory, a private /run, and a read-only
    // /sys, which tells networkd there is no udev to wait for (as in a container).
    const run = path.join(tmp, 'networkd.sh');
    fs.writeFileSync(run, `umount /sys 2>/dev/null; mount -t sysfs -o ro sysfs /sys
mount --bind ${netdir} /etc/systemd/network
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/netif && chown systemd-network: /run/systemd/netif 2>/dev/null
exec /lib/systemd/systemd-networkd
`);
    const c = start(['unshare', '-m', '--propagation', 'private', 'sh', run]);
    const link = async () => nsExec(ns, ['ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0']);
    await waitFor(async () => (await link()).includes('192.168.127.2/24'), 20_000, 100);
    expect(await nsExec(ns, ['ip', 'link', 'show', 'eth0'])).toContain('mtu 1400');
    expect(await nsExec(ns, ['ip', 'route', 'show', 'default'])).toContain('via 192.168.127.1');
    // networkd's lease file, seen through its mount namespace.
    const leaseFile = `/proc/${c.pid}/root/run/systemd/netif/leases/`;
    const lease = await waitFor(() => {
      const files = fs.existsSync(leaseFile) ? fs.readdirSync(leaseFile) : [];
      return files.length ? read(leaseFile + files[0]) : '';
    }, 5_000);
    expect(lease).toContain('DNS=192.168.127.1');
    expect(lease).toContain('DOMAINNAME=tender.internal');
    expect(lease).toContain('DOMAIN_SEARCH_LIST=tender.internal example.com');
    expect(lease).toContain('MTU=1400');
    expect(server.leases()).toMatchObject([{ ip: '192.168.127.2', hostname: 'ndbox' }]);
    // networkd sends RELEASE on stop by unicast UDP, then drops the address at once. With
    // no neighbour entry for the gateway yet (all its DHCP went through a packet socket),
    // the RELEASE waits for ARP and dies with the address: seen here, and a reason for the
    // gateway to get itself into guests' neighbour caches. Here we put it there.
    await nsExec(ns, ['ip', 'neigh', 'replace', ip4str(GW), 'lladdr', '5a:94:ef:e4:0c:dd', 'dev', 'eth0']);
    c.kill('SIGTERM');
    await waitFor(() => server.leases().length === 0, 10_000);
    await flush();
  });

  it('counted no drops', () => {
    expect(counters.drops()).toBe(0);
  });
});
