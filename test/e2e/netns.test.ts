/**
 * `tender netns` end to end, with the Linux kernel's own stack in a network namespace as the
 * guest and real clients (busybox udhcpc, isc dhclient, dig, ping, scapy) and a real upstream
 * (dnsmasq on 127.0.0.1). One served namespace for the whole file.
 */
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import dgram from 'node:dgram';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveNetns, type ServedNetns } from '../../src/commands/netns.js';
import { createLogger } from '../../src/log.js';
import { UDHCPC_SCRIPT, addNetns, delNetns, hasCommand, isRoot, nsExec, nsName, run, startDnsmasq, waitFor } from '../helpers/netns.js';

const canRun = isRoot && (await hasCommand('dnsmasq')) && (await hasCommand('dig'));

describe.skipIf(!canRun)('tender netns, end to end', () => {
  const ns = nsName('e2e');
  const dir = mkdtempSync(join(tmpdir(), 'tender-e2e-'));
  const pcapFile = join(dir, 'capture.pcap');
  let served: ServedNetns;
  let upstream: Awaited<ReturnType<typeof startDnsmasq>>;
  let echo: dgram.Socket;
  let echoPort: number;

  beforeAll(async () => {
    await addNetns(ns);
    upstream = await startDnsmasq([
      '--host-record=www.example.test,198.51.100.10,2001:db8::10',
      '--txt-record=txt.example.test,"v=tender test",second',
      '--srv-host=_http._tcp.example.test,www.example.test,8080,10,20',
      '--mx-host=example.test,mail.example.test,5',
      '--address=/nx.example.test/',
    ]);
    echo = dgram.createSocket('udp4');
    echo.on('message', (m, r) => echo.send(Buffer.concat([Buffer.from('echo:'), m]), r.port, r.address));
    await new Promise<void>((r) => echo.bind(0, '127.0.0.1', r));
    echoPort = echo.address().port;
    served = await serveNetns(
      ns,
      { ifname: 'eth0', mtu: '1500', dnsUpstream: [`127.0.0.1:${upstream.port}`], hostLoopback: true, pcap: pcapFile },
      createLogger('warn'),
    );
    writeFileSync(join(dir, 'udhcpc.script'), UDHCPC_SCRIPT);
    chmodSync(join(dir, 'udhcpc.script'), 0o755);
  });

  afterAll(async () => {
    await served?.stop();
    upstream?.stop();
    echo?.close();
    await delNetns(ns);
    rmSync(dir, { recursive: true, force: true });
  });

  it('creates the TAP inside the namespace, up, with the MTU', async () => {
    const links = JSON.parse(await nsExec(ns, ['ip', '-j', 'link', 'show', 'eth0']));
    expect(links[0].mtu).toBe(1500);
    expect(links[0].flags).toContain('UP');
  });

  it('busybox udhcpc gets a lease with every option', async () => {
    const lease = join(dir, 'lease');
    await nsExec(ns, ['busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-f', '-t', '5', '-T', '1', '-s', join(dir, 'udhcpc.script'), '-O', 'search'], {
      env: { LEASE_FILE: lease },
    });
    const vars = Object.fromEntries(
      readFileSync(lease, 'utf8')
        .trim()
        .split('\n')
        .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
    );
    expect(vars).toMatchObject({
      ip: '192.168.127.2',
      mask: '24',
      subnet: '255.255.255.0',
      router: '192.168.127.1',
      dns: '192.168.127.1',
      domain: 'tender.internal',
      search: 'tender.internal',
      mtu: '1500',
      serverid: '192.168.127.1',
      lease: '3600',
    });
    const addr = await nsExec(ns, ['ip', '-4', '-o', 'addr', 'show', 'eth0']);
    expect(addr).toContain('192.168.127.2/24');
    expect(served.network.dhcp.leases().some((l) => l.ip === '192.168.127.2')).toBe(true);
  });

  it('isc dhclient gets the same lease', async () => {
    if (!(await hasCommand('dhclient'))) return;
    const leases = join(dir, 'dhclient.leases');
    const script = join(dir, 'dhclient-script');
    writeFileSync(script, '#!/bin/sh\nexit 0\n');
    chmodSync(script, 0o755);
    await nsExec(ns, ['dhclient', '-1', '-4', '-v', '-sf', script, '-lf', leases, '-pf', join(dir, 'dhclient.pid'), 'eth0'], { timeout: 30_000 });
    const text = readFileSync(leases, 'utf8');
    expect(text).toContain('fixed-address 192.168.127.2;');
    expect(text).toContain('option routers 192.168.127.1;');
    expect(text).toContain('option domain-name-servers 192.168.127.1;');
    expect(text).toMatch(/option interface-mtu 1500;/);
    expect(text).toMatch(/option domain-search "tender.internal.";/);
    await nsExec(ns, ['dhclient', '-r', '-sf', script, '-lf', leases, '-pf', join(dir, 'dhclient.pid'), 'eth0']).catch(() => {});
    // The release freed the lease; take it back for the remaining tests.
    await nsExec(ns, ['busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-f', '-t', '5', '-T', '1', '-s', join(dir, 'udhcpc.script')], {
      env: { LEASE_FILE: join(dir, 'lease2') },
    });
  });

  it('answers ping on the gateway and the host alias', async () => {
    await nsExec(ns, ['ping', '-c', '2', '-i', '0.2', '-W', '2', '192.168.127.1']);
    await nsExec(ns, ['ping', '-c', '2', '-i', '0.2', '-W', '2', '192.168.127.254']);
    // A large ping is fragmented by the kernel, reassembled by us, and our reply is fragmented.
    await nsExec(ns, ['ping', '-c', '1', '-s', '4000', '-W', '2', '192.168.127.1']);
    expect(served.network.counters.get('ipv4.reassembled')).toBeGreaterThan(0);
  });

  const dig = (args: string[]) => nsExec(ns, ['dig', '+time=2', '+tries=2', '@192.168.127.1', ...args]);
  const digShort = async (args: string[]) => (await dig(['+short', ...args])).trim();

  it('resolves the built-in names', async () => {
    expect(await digShort(['gateway.tender.internal'])).toBe('192.168.127.1');
    expect(await digShort(['host.tender.internal'])).toBe('192.168.127.254');
    expect(await digShort(['host.containers.internal'])).toBe('192.168.127.254');
    expect(await digShort(['HOST.DOCKER.INTERNAL'])).toBe('192.168.127.254');
    const nx = await dig(['nosuch.tender.internal']);
    expect(nx).toContain('status: NXDOMAIN');
    expect(nx).toMatch(/flags:[^;]*\baa\b/);
  });

  it('forwards every record type unchanged to the upstream', async () => {
    for (const q of [['A', 'www.example.test'], ['AAAA', 'www.example.test'], ['TXT', 'txt.example.test'], ['SRV', '_http._tcp.example.test'], ['MX', 'example.test']]) {
      const viaUs = await digShort([q[0]!, q[1]!]);
      const direct = (await run('dig', ['+short', '+time=2', '-p', String(upstream.port), '@127.0.0.1', q[0]!, q[1]!])).stdout.trim();
      expect(viaUs, q.join(' ')).toBe(direct);
      expect(viaUs.length, q.join(' ')).toBeGreaterThan(0);
    }
    expect(await dig(['A', 'nope.nx.example.test'])).toContain('status: NXDOMAIN');
  });

  it('carries UDP to a host socket through the host alias, and back', async () => {
    const js = `const s=require('dgram').createSocket('udp4');s.on('message',m=>{process.stdout.write(String(m));process.exit(0)});s.send('ping-over-nat',${echoPort},'192.168.127.254');setTimeout(()=>process.exit(3),5000)`;
    expect(await nsExec(ns, [process.execPath, '-e', js])).toBe('echo:ping-over-nat');
    expect(served.network.udpNat.flowCount).toBeGreaterThan(0);
  });

  it('reports a refused UDP port as ICMP port unreachable', async () => {
    // Connected UDP sockets surface ICMP port unreachable as ECONNREFUSED.
    const closed = await new Promise<number>((resolve) => {
      const s = dgram.createSocket('udp4');
      s.bind(0, '127.0.0.1', () => {
        const p = s.address().port;
        s.close(() => resolve(p));
      });
    });
    const js = `const s=require('dgram').createSocket('udp4');s.on('error',e=>{process.stdout.write(e.code);process.exit(0)});s.connect(${closed},'192.168.127.254',()=>{s.send('x');setTimeout(()=>s.send('y'),300)});setTimeout(()=>process.exit(3),5000)`;
    expect(await nsExec(ns, [process.execPath, '-e', js])).toBe('ECONNREFUSED');
  });

  it('survives thousands of malformed frames and keeps serving', async () => {
    const before = served.network.counters.drops();
    const py = `
import random
from scapy.all import Ether, IP, UDP, TCP, ICMP, ARP, Raw, fuzz, sendp, conf
conf.verb = 0
random.seed(7)
gw = "5a:94:ef:e4:0c:dd"
frames = []
for i in range(600):
    frames.append(Ether(dst=gw)/Raw(bytes(random.getrandbits(8) for _ in range(random.randint(0, 120)))))
for i in range(600):
    frames.append(fuzz(Ether(dst=gw)/IP(dst="192.168.127.1")/UDP(dport=53)))
for i in range(300):
    frames.append(fuzz(Ether(dst=gw)/IP(dst="192.168.127.1", ihl=random.randint(0, 15), len=random.randint(0, 2000))/ICMP()))
for i in range(300):
    p = bytes(Ether(dst=gw)/IP(dst="192.168.127.1", flags="MF", frag=random.randint(0, 8000))/Raw(b"x" * random.randint(0, 1400)))
    frames.append(Ether(p[:random.randint(14, len(p))]))
for i in range(300):
    frames.append(fuzz(Ether(dst="ff:ff:ff:ff:ff:ff")/ARP()))
for i in range(300):
    frames.append(Ether(dst=gw)/IP(dst="192.168.127.1")/UDP(dport=67, sport=68)/Raw(bytes(random.getrandbits(8) for _ in range(random.randint(0, 600)))))
sendp(frames, iface="eth0")
print(len(frames))
`;
    const n = Number((await nsExec(ns, ['/usr/bin/python3', '-c', py], { timeout: 120_000 })).trim());
    expect(n).toBe(2400);
    await waitFor(() => served.network.counters.drops() > before + 500, 10_000);
    expect(served.network.gateway.lastError).toBeNull();
    // Still serving.
    await nsExec(ns, ['ping', '-c', '1', '-W', '2', '192.168.127.1']);
    expect(await digShort(['gateway.tender.internal'])).toBe('192.168.127.1');
  }, 180_000);

  it('writes a pcap that tshark reads', async () => {
    await served.stop();
    const out = (await run('tshark', ['-r', pcapFile, '-T', 'fields', '-e', 'frame.protocols'], { maxBuffer: 64 * 1024 * 1024 })).stdout;
    expect(out).toContain('dhcp');
    expect(out).toContain('dns');
    expect(out).toContain('icmp');
    expect(out).toContain('arp');
  });
});
