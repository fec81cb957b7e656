/**
 * `tender demo`: the README's first command. Creates a throwaway network namespace, serves it,
 * and shows the userspace network doing its job with the kernel's own stack as the guest:
 * a DHCP lease, ping to the gateway and host alias, DNS for built-in and forwarded names,
 * and a UDP round trip to a server on the host's loopback through the NAT.
 *
 * Everything stays on this machine: the upstream DNS server is a dnsmasq on 127.0.0.1 started
 * here, and the UDP server listens on 127.0.0.1.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import http from 'node:http';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TenderError } from '../errors.js';
import { createLogger } from '../log.js';
import { serveNetns } from './netns.js';

const run = promisify(execFile);

const REQUIRED: [string, string][] = [
  ['ip', 'iproute2'],
  ['busybox', 'busybox'],
  ['dig', 'dnsutils'],
  ['dnsmasq', 'dnsmasq-base'],
  ['nsenter', 'util-linux'],
  ['curl', 'curl'],
];

async function which(cmd: string): Promise<boolean> {
  try {
    await run('sh', ['-c', `command -v ${cmd}`]);
    return true;
  } catch {
    return false;
  }
}

function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = dgram.createSocket('udp4');
    s.once('error', reject);
    s.bind(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

const UDHCPC_SCRIPT = `#!/bin/sh
# Applies the lease like busybox's example script, and records the options for the demo.
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr replace "$ip/\${mask:-24}" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    env | grep -E '^(ip|mask|router|dns|domain|search|mtu|lease|serverid|subnet)=' | sort > "$LEASE_FILE"
    ;;
esac
exit 0
`;

export async function runDemo(opts: { keep: boolean }): Promise<void> {
  if (process.getuid?.() !== 0) {
    throw new TenderError('PERMISSION_DENIED', 'the demo creates a network namespace and a TAP device: run it as root (sudo)');
  }
  const missing: string[] = [];
  for (const [cmd, pkg] of REQUIRED) if (!(await which(cmd))) missing.push(`${cmd} (Debian package ${pkg})`);
  if (missing.length) throw new TenderError('BAD_ARGUMENT', `the demo needs: ${missing.join(', ')}; scripts/demo installs them`);

  const out = (s: string) => process.stdout.write(s + '\n');
  const ns = `tender-demo-${process.pid}`;
  const dir = mkdtempSync(join(tmpdir(), 'tender-demo-'));
  const leaseFile = join(dir, 'lease');
  const script = join(dir, 'udhcpc.script');
  writeFileSync(script, UDHCPC_SCRIPT);
  chmodSync(script, 0o755);
  const log = createLogger(process.env.TENDER_LOG ?? 'warn');
  let dnsmasq: ChildProcess | null = null;
  let udpServer: dgram.Socket | null = null;
  let httpServer: http.Server | null = null;
  let served: Awaited<ReturnType<typeof serveNetns>> | null = null;
  const exec = async (cmd: string[], env: Record<string, string> = {}) =>
    (await run('ip', ['netns', 'exec', ns, ...cmd], { env: { ...process.env, ...env }, timeout: 20_000 })).stdout.trim();
  const step = async (title: string, f: () => Promise<string>) => {
    try {
      const r = await f();
      out(`  ok    ${title}${r ? `\n        ${r.split('\n').join('\n        ')}` : ''}`);
      return true;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      out(`  FAIL  ${title}: ${(e.stderr || e.message).trim()}`);
      return false;
    }
  };

  try {
    await run('ip', ['netns', 'add', ns]);
    // A local upstream DNS server, so forwarding is shown without leaving the machine.
    const dnsPort = await freeUdpPort();
    dnsmasq = spawn(
      'dnsmasq',
      [
        '--no-daemon', '--no-resolv', '--no-hosts', '--bind-interfaces', '--listen-address=127.0.0.1', `--port=${dnsPort}`,
        '--address=/demo.example/198.51.100.7', '--txt-record=demo.example,forwarded by tender to a local dnsmasq',
        `--pid-file=${join(dir, 'dnsmasq.pid')}`,
      ],
      { stdio: 'ignore' },
    );
    udpServer = dgram.createSocket('udp4');
    udpServer.on('message', (m, r) => udpServer!.send(Buffer.concat([Buffer.from('echo: '), m]), r.port, r.address));
    await new Promise<void>((r) => udpServer!.bind(0, '127.0.0.1', r));
    const udpPort = udpServer.address().port;
    httpServer = http.createServer((_q, r) => r.end('hello over TCP from the host'));
    await new Promise<void>((r) => httpServer!.listen(0, '127.0.0.1', r));
    const httpPort = (httpServer.address() as { port: number }).port;

    served = await serveNetns(ns, { ifname: 'eth0', mtu: '1500', dnsUpstream: [`127.0.0.1:${dnsPort}`], hostLoopback: true }, log);
    // curl inside the namespace resolves names through the gateway's DNS (ip netns exec reads /etc/netns/NS).
    mkdirSync(`/etc/netns/${ns}`, { recursive: true });
    writeFileSync(`/etc/netns/${ns}/resolv.conf`, 'nameserver 192.168.127.1\nsearch tender.internal\n');
    out(`tender is serving network namespace "${ns}" (eth0, ${served.network.summary().subnet}, gateway ${served.network.summary().gateway})\n`);

    let ok = true;
    ok &&= await step('DHCP lease from the gateway (busybox udhcpc)', async () => {
      await exec(['busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-f', '-t', '5', '-T', '1', '-s', script], { LEASE_FILE: leaseFile });
      return readFileSync(leaseFile, 'utf8').trim().split('\n').join('  ');
    });
    await step('ping the gateway 192.168.127.1', async () => (await exec(['ping', '-c', '2', '-W', '2', '192.168.127.1'])).split('\n').slice(-2).join('\n'));
    await step('ping the host alias 192.168.127.254', async () => (await exec(['ping', '-c', '1', '-W', '2', '192.168.127.254'])).split('\n').slice(-1).join(''));
    await step('DNS: built-in name gateway.tender.internal', async () => `→ ${await exec(['dig', '+short', '+time=2', '@192.168.127.1', 'gateway.tender.internal'])}`);
    await step('DNS: host.docker.internal (compatibility alias)', async () => `→ ${await exec(['dig', '+short', '+time=2', '@192.168.127.1', 'host.docker.internal'])}`);
    await step('DNS: TXT demo.example, forwarded unchanged to the upstream', async () => `→ ${await exec(['dig', '+short', '+time=2', '@192.168.127.1', 'TXT', 'demo.example'])}`);
    await step(`UDP NAT: round trip to a server on the host's 127.0.0.1:${udpPort} via 192.168.127.254`, async () => {
      const js = `const s=require('dgram').createSocket('udp4');s.on('message',m=>{console.log(String(m));process.exit(0)});s.send('hello from the namespace',${udpPort},'192.168.127.254');setTimeout(()=>{console.error('no reply');process.exit(1)},3000)`;
      return `→ ${await exec([process.execPath, '-e', js])}`;
    });
    await step(`TCP NAT: curl http://host.tender.internal:${httpPort}/ (a web server on the host's loopback)`, async () =>
      `→ ${await exec(['curl', '-sS', '--max-time', '5', `http://host.tender.internal:${httpPort}/`])}`,
    );
    const c = served.network.counters;
    out(`\ncounters: ${JSON.stringify({ dhcp: c.get('dhcp.tx.ack'), 'udp_nat.flows': c.get('udp_nat.flows_opened'), 'icmp.echo': c.get('icmp.echo_reply'), drops: c.drops() })}`);
    if (!ok) process.exitCode = 1;
    if (opts.keep) {
      out(`\nleaving "${ns}" served; try: ip netns exec ${ns} sh   (Ctrl-C here to stop)`);
      await new Promise<void>((r) => {
        process.once('SIGINT', r);
        process.once('SIGTERM', r);
      });
    }
  } finally {
    await served?.stop();
    dnsmasq?.kill();
    udpServer?.close();
    httpServer?.close();
    await run('ip', ['netns', 'del', ns]).catch(() => {});
    rmSync(`/etc/netns/${ns}`, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
}
