/**
 * The DNS forwarder against a real upstream: dnsmasq on the loopback, on a random high port.
 * Every forwarded answer must be byte-identical to what dnsmasq returns when asked directly.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import net from 'node:net';
import os from 'node:os';
import type { AddressInfo } from 'node:net';
import dnsPacket from 'dns-packet';
import { DnsService, type DnsServiceOptions } from '../../netstack/services/dns.js';
import { Counters } from '../../netstack/counters.js';
import { SystemClock } from '../../netstack/time.js';

/** dns-packet decodes `rcode` though @types/dns-packet does not declare it. */
const decode = (m: Uint8Array) => dnsPacket.decode(Buffer.from(m)) as dnsPacket.DecodedPacket & { rcode: string };

const UDP = { ip: '192.168.127.2', port: 40000, transport: 'udp' as const };
const TCP = { ...UDP, transport: 'tcp' as const };

const hasV6Loopback = Object.values(os.networkInterfaces())
  .flat()
  .some((i) => i?.address === '::1');

const BIG = ['a', 'b', 'c'].map((c) => c.repeat(200));

let dnsmasq: ChildProcess | null = null;
let port = 0;

function dnsmasqArgs(p: number): string[] {
  return [
    '--no-daemon',
    '--conf-file=/dev/null',
    '--pid-file=',
    '--no-resolv',
    '--no-hosts',
    `--port=${p}`,
    `--listen-address=127.0.0.1${hasV6Loopback ? ',::1' : ''}`,
    '--bind-interfaces',
    '--local=/e2e.test/', // we own e2e.test: unknown names are NXDOMAIN, never forwarded
    '--host-record=www.e2e.test,10.20.30.40,fd00::4040',
    '--host-record=v4only.e2e.test,10.20.30.41',
    '--address=/wild.e2e.test/10.20.30.42',
    '--cname=alias.e2e.test,www.e2e.test',
    '--txt-record=txt.e2e.test,v=spf1 -all,second string',
    `--txt-record=big.e2e.test,${BIG.join(',')}`,
    '--srv-host=_http._tcp.e2e.test,www.e2e.test,8080,10,20',
    '--mx-host=e2e.test,mail.e2e.test,10',
    // CAA (257): flags 0, tag "issue", value "letsencrypt.org" (RFC 8659 §4.1)
    '--dns-rr=caa.e2e.test,257,000569737375656c657473656e63727970742e6f7267',
    // HTTPS (65): priority 1, target ".", alpn="h2" (RFC 9460 §2.2)
    '--dns-rr=https.e2e.test,65,00010000010003026832',
  ];
}

function udpQuery(host: string, p: number, msg: Uint8Array, waitMs = 2000): Promise<Buffer | null> {
  return new Promise((resolve) => {
    const s = dgram.createSocket(net.isIPv6(host) ? 'udp6' : 'udp4');
    const t = setTimeout(() => done(null), waitMs);
    const done = (r: Buffer | null): void => {
      clearTimeout(t);
      s.close();
      resolve(r);
    };
    s.on('message', (m) => done(m));
    s.on('error', () => done(null));
    s.send(msg, p, host);
  });
}

function tcpQuery(host: string, p: number, msg: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port: p });
    const len = Buffer.alloc(2);
    len.writeUInt16BE(msg.length);
    s.on('connect', () => s.write(Buffer.concat([len, msg])));
    let acc = Buffer.alloc(0);
    s.on('data', (d) => {
      acc = Buffer.concat([acc, d]);
      if (acc.length >= 2 && acc.length >= 2 + acc.readUInt16BE(0)) {
        s.destroy();
        resolve(acc.subarray(2, 2 + acc.readUInt16BE(0)));
      }
    });
    s.on('error', reject);
  });
}

function q(name: string, type: string, opts: { id?: number; edns?: boolean } = {}): Buffer {
  return dnsPacket.encode({
    type: 'query',
    id: opts.id ?? 0xbeef,
    flags: dnsPacket.RECURSION_DESIRED,
    questions: [{ name, type: type as 'A' }],
    additionals: opts.edns
      ? [{ type: 'OPT', name: '.', udpPayloadSize: 4096, extendedRcode: 0, ednsVersion: 0, flags: dnsPacket.DNSSEC_OK, flag_do: true, options: [] }]
      : [],
  });
}

/**
 * `via` must be the bytes dnsmasq sends. dnsmasq itself varies the order of the additional
 * section between two identical queries (the A/AAAA of an SRV target come from its cache in
 * LRU order), so when the bytes differ, they must differ only there: same length, same header,
 * same sections with the additional records as a set.
 */
function expectSameReply(via: Uint8Array | null, direct: Uint8Array | null): void {
  expect(via).not.toBeNull();
  expect(direct).not.toBeNull();
  const a = Buffer.from(via!);
  const b = Buffer.from(direct!);
  if (a.equals(b)) return;
  expect(a.length).toBe(b.length);
  expect(a.subarray(0, 12).toString('hex')).toBe(b.subarray(0, 12).toString('hex'));
  const norm = (m: Buffer) => {
    const d = decode(m);
    return { ...d, additionals: d.additionals!.map((x) => JSON.stringify(x)).sort() };
  };
  expect(norm(a)).toEqual(norm(b));
}

/** A UDP port with nobody reading it: queries sent there vanish (an upstream that is down but not refusing). */
async function blackhole(): Promise<{ port: number; close: () => void }> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  s.on('message', () => {});
  return { port: (s.address() as AddressInfo).port, close: () => s.close() };
}

/** A UDP port nobody is bound to: the kernel answers ICMP port unreachable. */
async function closedPort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', r));
  const p = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return p;
}

const open: { dns: DnsService; clock: SystemClock }[] = [];
function service(over: Partial<DnsServiceOptions>): { dns: DnsService; counters: Counters } {
  const counters = new Counters();
  const clock = new SystemClock();
  const dns = new DnsService({
    zone: 'tender.internal',
    upstreams: [{ host: '127.0.0.1', port }],
    clock,
    counters,
    gateway: '192.168.127.1',
    hostLookup: async () => [],
    ...over,
  });
  open.push({ dns, clock });
  return { dns, counters };
}

beforeAll(async () => {
  // A random high port; retry if it happens to be taken.
  for (let tries = 0; tries < 5 && !dnsmasq; tries++) {
    const p = 20000 + Math.floor(Math.random() * 40000);
    const child = spawn('dnsmasq', dnsmasqArgs(p), { stdio: ['ignore', 'ignore', 'pipe'] });
    let exited = false;
    child.on('exit', () => (exited = true));
    child.on('error', () => (exited = true));
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    // Poll until it answers (bounded), or it exits (port in use).
    for (let i = 0; i < 100 && !exited; i++) {
      const r = await udpQuery('127.0.0.1', p, q('www.e2e.test', 'A'), 50);
      if (r) {
        dnsmasq = child;
        port = p;
        break;
      }
    }
    if (!dnsmasq) {
      child.kill();
      if (tries === 4) throw new Error(`dnsmasq did not start: ${stderr}`);
    }
  }
});

afterAll(() => {
  for (const { dns, clock } of open) {
    dns.close();
    clock.stop();
  }
  dnsmasq?.kill();
});

describe('forwarding to dnsmasq, byte for byte', () => {
  const cases: [string, string, boolean][] = [
    ['www.e2e.test', 'A', false],
    ['WWW.E2E.test', 'A', false],
    ['www.e2e.test', 'AAAA', true],
    ['v4only.e2e.test', 'AAAA', false], // NODATA as dnsmasq says it
    ['x.wild.e2e.test', 'A', true],
    ['alias.e2e.test', 'A', false], // CNAME + A
    ['txt.e2e.test', 'TXT', true],
    ['_http._tcp.e2e.test', 'SRV', false],
    ['e2e.test', 'MX', true],
    ['caa.e2e.test', 'CAA', false],
    ['https.e2e.test', 'UNKNOWN_65', true],
    ['40.30.20.10.in-addr.arpa', 'PTR', false],
    ['nosuch.e2e.test', 'A', false], // NXDOMAIN
    ['nosuch.e2e.test', 'A', true],
    ['elsewhere.example', 'A', false], // REFUSED: dnsmasq has no server for it
  ];
  for (const [name, type, edns] of cases) {
    it(`${type} ${name}${edns ? ' (EDNS, DO)' : ''}`, async () => {
      const { dns, counters } = service({});
      const msg = q(name, type, { edns, id: 0x1000 + name.length });
      const direct = await udpQuery('127.0.0.1', port, msg);
      expect(direct).not.toBeNull();
      expectSameReply(await dns.query(msg, UDP), direct);
      expect(counters.get('dns.upstream.udp')).toBe(1);
    });
  }

  it('sanity: what dnsmasq said is what we expected it to say', async () => {
    const { dns } = service({});
    const d = (m: Uint8Array | null) => decode(Buffer.from(m!));
    expect(d(await dns.query(q('nosuch.e2e.test', 'A'), UDP)).rcode).toBe('NXDOMAIN');
    expect(d(await dns.query(q('www.e2e.test', 'AAAA'), UDP)).answers).toMatchObject([{ type: 'AAAA', data: 'fd00::4040' }]);
    expect(d(await dns.query(q('txt.e2e.test', 'TXT'), UDP)).answers).toHaveLength(1);
    expect(d(await dns.query(q('_http._tcp.e2e.test', 'SRV'), UDP)).answers).toMatchObject([{ type: 'SRV', data: { port: 8080 } }]);
    expect(d(await dns.query(q('e2e.test', 'MX'), UDP)).answers).toMatchObject([{ type: 'MX', data: { exchange: 'mail.e2e.test' } }]);
    // Built-in names never reach the upstream.
    expect(d(await dns.query(q('gateway.tender.internal', 'A'), UDP)).answers).toMatchObject([{ data: '192.168.127.1' }]);
  });

  it('many clients with the same ID at once each get their own answer', async () => {
    const { dns } = service({});
    const names = Array.from({ length: 20 }, (_, i) => (i % 2 ? 'www.e2e.test' : 'v4only.e2e.test'));
    const replies = await Promise.all(names.map((n, i) => dns.query(q(n, 'A', { id: 7 }), { ...UDP, port: 30000 + i })));
    replies.forEach((r, i) => {
      const d = decode(Buffer.from(r!));
      expect(d.id).toBe(7);
      expect(d.answers).toMatchObject([{ name: names[i], data: i % 2 ? '10.20.30.40' : '10.20.30.41' }]);
    });
  });

  it.skipIf(!hasV6Loopback)('IPv6 upstream [::1]', async () => {
    const { dns } = service({ upstreams: [{ host: '::1', port }] });
    const msg = q('www.e2e.test', 'AAAA');
    const direct = await udpQuery('::1', port, msg);
    expect(Buffer.from((await dns.query(msg, UDP))!).toString('hex')).toBe(direct!.toString('hex'));
  });
});

describe('TCP', () => {
  it('a truncated UDP reply is returned as is; the TCP retry gets the whole answer', async () => {
    const { dns, counters } = service({});
    const msg = q('big.e2e.test', 'TXT'); // no EDNS: 512-byte limit, three 200-byte strings
    const direct = await udpQuery('127.0.0.1', port, msg);
    const via = Buffer.from((await dns.query(msg, UDP))!);
    expect(via.toString('hex')).toBe(direct!.toString('hex'));
    expect(decode(via).flag_tc).toBe(true);

    const directTcp = await tcpQuery('127.0.0.1', port, msg);
    const viaTcp = Buffer.from((await dns.query(msg, TCP))!);
    expect(viaTcp.toString('hex')).toBe(directTcp.toString('hex'));
    const d = decode(viaTcp);
    expect(d.flag_tc).toBe(false);
    expect(d.answers).toHaveLength(1);
    expect((d.answers![0] as dnsPacket.TxtAnswer).data).toEqual(BIG.map((s) => Buffer.from(s)));
    expect(counters.get('dns.upstream.tcp')).toBe(1);
  });

  it('TCP forwarding of an ordinary query is byte-identical', async () => {
    const { dns } = service({});
    const msg = q('_http._tcp.e2e.test', 'SRV', { edns: true });
    expectSameReply(await dns.query(msg, TCP), await tcpQuery('127.0.0.1', port, msg));
  });

  it('TCP to a closed port fails over to the next upstream', async () => {
    const dead = await closedPort();
    const { dns, counters } = service({ upstreams: [{ host: '127.0.0.1', port: dead }, { host: '127.0.0.1', port }] });
    const msg = q('www.e2e.test', 'A');
    const directTcp = await tcpQuery('127.0.0.1', port, msg);
    expect(Buffer.from((await dns.query(msg, TCP))!).toString('hex')).toBe(directTcp.toString('hex'));
    expect(counters.get('dns.upstream.error')).toBe(1);
  });
});

describe('upstream failures', () => {
  it('timeout on the first upstream, answer from the second; the second is then preferred', async () => {
    const hole = await blackhole();
    try {
      const { dns, counters } = service({
        upstreams: [{ host: '127.0.0.1', port: hole.port }, { host: '127.0.0.1', port }],
        timeoutMs: 150,
      });
      const msg = q('www.e2e.test', 'A');
      const direct = await udpQuery('127.0.0.1', port, msg);
      expect(Buffer.from((await dns.query(msg, UDP))!).toString('hex')).toBe(direct!.toString('hex'));
      expect(counters.get('dns.upstream.timeout')).toBe(1);
      await dns.query(msg, UDP);
      expect(counters.get('dns.upstream.timeout')).toBe(1);
    } finally {
      hole.close();
    }
  });

  it('all upstreams time out: A/AAAA from hostLookup, others SERVFAIL', async () => {
    const hole = await blackhole();
    try {
      const { dns, counters } = service({
        upstreams: [{ host: '127.0.0.1', port: hole.port }],
        timeoutMs: 100,
        hostLookup: async (name, family) => (name === 'fromhosts.example' && family === 4 ? ['10.77.0.1'] : []),
      });
      const a = decode(Buffer.from((await dns.query(q('fromhosts.example', 'A'), UDP))!));
      expect(a.rcode).toBe('NOERROR');
      expect(a.answers).toMatchObject([{ type: 'A', data: '10.77.0.1' }]);
      expect(counters.get('dns.upstream.timeout')).toBe(2); // one upstream, two attempts
      expect(counters.get('dns.fallback')).toBe(1);
      const mx = decode(Buffer.from((await dns.query(q('fromhosts.example', 'MX'), UDP))!));
      expect(mx.rcode).toBe('SERVFAIL');
    } finally {
      hole.close();
    }
  });

  it('upstream refusing (ICMP port unreachable): fails over at once to getaddrinfo (/etc/hosts)', async () => {
    const dead = await closedPort();
    // The default hostLookup: node:dns lookup, i.e. getaddrinfo, which reads /etc/hosts.
    const { dns, counters } = service({ upstreams: [{ host: '127.0.0.1', port: dead }], timeoutMs: 5000, hostLookup: undefined });
    const r = decode(Buffer.from((await dns.query(q('localhost', 'A'), UDP))!));
    expect(r.rcode).toBe('NOERROR');
    expect(r.answers).toMatchObject([{ type: 'A', data: '127.0.0.1' }]);
    expect(counters.get('dns.upstream.error')).toBeGreaterThanOrEqual(1);
    expect(counters.get('dns.upstream.timeout')).toBe(0);
  });
});
