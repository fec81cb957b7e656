import { describe, expect, it, afterEach } from 'vitest';
import dgram from 'node:dgram';
import type { AddressInfo } from 'node:net';
import dnsPacket from 'dns-packet';
import fc from 'fast-check';
import { DnsService, type DnsServiceOptions } from '../../netstack/services/dns.js';
import { Counters } from '../../netstack/counters.js';
import { ManualClock, SystemClock } from '../../netstack/time.js';

/** dns-packet decodes `rcode` though @types/dns-packet does not declare it. */
const decode = (m: Uint8Array) => dnsPacket.decode(Buffer.from(m)) as dnsPacket.DecodedPacket & { rcode: string };

const UDP = { ip: '192.168.127.2', port: 40000, transport: 'udp' as const };

const services: DnsService[] = [];
afterEach(() => {
  for (const s of services.splice(0)) s.close();
});

function service(over: Partial<DnsServiceOptions> = {}): { dns: DnsService; counters: Counters; clock: ManualClock } {
  const counters = new Counters();
  const clock = new ManualClock();
  const dns = new DnsService({
    zone: 'tender.internal',
    upstreams: [],
    clock,
    counters,
    gateway: '192.168.127.1',
    host: '192.168.127.254',
    hostLookup: async () => [],
    ...over,
  });
  services.push(dns);
  return { dns, counters, clock };
}

function q(name: string, type: string, opts: { id?: number; edns?: boolean; rd?: boolean } = {}): Buffer {
  return dnsPacket.encode({
    type: 'query',
    id: opts.id ?? 0x1234,
    flags: opts.rd === false ? 0 : dnsPacket.RECURSION_DESIRED,
    questions: [{ name, type: type as 'A' }],
    additionals: opts.edns
      ? [{ type: 'OPT', name: '.', udpPayloadSize: 1232, extendedRcode: 0, ednsVersion: 0, flags: dnsPacket.DNSSEC_OK, flag_do: true, options: [] }]
      : [],
  });
}

async function ask(dns: DnsService, msg: Uint8Array) {
  const r = await dns.query(msg, UDP);
  expect(r).not.toBeNull();
  return decode(Buffer.from(r!));
}

/** Real queries captured with tcpdump on the loopback of a namespace, against dnsmasq 2.90. */
// `dig @127.0.0.1 gateway.tender.internal A` (DiG 9.18.49): RD, AD, EDNS0 udp 1232, COOKIE option.
const DIG_QUERY =
  'a64e0120000100000000000107676174657761790674656e64657208696e7465726e616c000001000100002904d000000000000c000a00083f3eb4803e5adade';
// `busybox nslookup -type=a gateway.tender.internal 127.0.0.1` (BusyBox 1.35.0): RD, no EDNS.
const BUSYBOX_QUERY = '84b70100000100000000000007676174657761790674656e64657208696e7465726e616c0000010001';
// dnsmasq's answer to the busybox query (for the "response sent to us" case).
const DNSMASQ_REPLY =
  '84b78580000100010000000007676174657761790674656e64657208696e7465726e616c0000010001c00c00010001000000000004c0a87f01';

const hex = (s: string) => Buffer.from(s, 'hex');

describe('captured queries', () => {
  it('parses and answers the dig query (EDNS, DO clear, cookie)', async () => {
    const { dns } = service();
    const b = hex(DIG_QUERY);
    // deconstruct: id 0xa64e, flags 0x0120 (RD, AD), 1 question, 1 additional (OPT)
    expect(b.readUInt16BE(0)).toBe(0xa64e);
    expect(b.readUInt16BE(2)).toBe(0x0120);
    const d = decode(b);
    expect(d.questions).toEqual([{ name: 'gateway.tender.internal', type: 'A', class: 'IN' }]);
    const r = await ask(dns, b);
    expect(r.id).toBe(0xa64e);
    expect(r.flag_qr && r.flag_aa && r.flag_rd && r.flag_ra).toBe(true);
    expect(r.rcode).toBe('NOERROR');
    expect(r.answers).toEqual([{ name: 'gateway.tender.internal', type: 'A', class: 'IN', ttl: 0, flush: false, data: '192.168.127.1' }]);
    const opt = r.additionals!.find((a) => a.type === 'OPT') as dnsPacket.OptAnswer;
    expect(opt.udpPayloadSize).toBe(1232);
    expect(opt.flag_do).toBe(false);
  });

  it('answers the busybox query as dnsmasq did', async () => {
    const { dns } = service();
    const r = Buffer.from((await dns.query(hex(BUSYBOX_QUERY), UDP))!);
    // dnsmasq --address= sets AA, RD, RA, TTL 0: so do we. The bytes differ only in that
    // dnsmasq compresses the answer's name (c00c) and dns-packet does not.
    expect(r.subarray(0, 41).toString('hex')).toBe(DNSMASQ_REPLY.slice(0, 82));
    expect(decode(r)).toEqual(decode(hex(DNSMASQ_REPLY)));
  });

  it('drops a response sent as a query', async () => {
    const { dns, counters } = service();
    expect(await dns.query(hex(DNSMASQ_REPLY), UDP)).toBeNull();
    expect(counters.get('dns.drop.response')).toBe(1);
  });

  it('never throws on truncations of the captured queries', async () => {
    const { dns, counters } = service();
    for (const h of [DIG_QUERY, BUSYBOX_QUERY]) {
      const b = hex(h);
      for (let n = 0; n < b.length; n++) {
        const r = await dns.query(b.subarray(0, n), UDP);
        if (n < 12) expect(r).toBeNull();
        else expect(decode(Buffer.from(r!)).rcode).toBe('FORMERR');
      }
    }
    expect(counters.get('dns.drop.malformed')).toBe(24);
  });
});

describe('built-in names', () => {
  it('answers gateway, host and their aliases, case-insensitively', async () => {
    const { dns, counters } = service();
    const cases: [string, string][] = [
      ['gateway.tender.internal', '192.168.127.1'],
      ['GateWay.Tender.Internal.', '192.168.127.1'],
      ['gateway.containers.internal', '192.168.127.1'],
      ['gateway.docker.internal', '192.168.127.1'],
      ['host.tender.internal', '192.168.127.254'],
      ['host.containers.internal', '192.168.127.254'],
      ['HOST.DOCKER.INTERNAL', '192.168.127.254'],
    ];
    for (const [name, addr] of cases) {
      const r = await ask(dns, q(name, 'A'));
      expect(r.rcode).toBe('NOERROR');
      expect(r.flag_aa).toBe(true);
      expect(r.answers).toHaveLength(1);
      // The answer carries the name as asked (0x20 case preserved).
      expect(r.answers![0]!.name).toBe(name.replace(/\.$/, ''));
      expect((r.answers![0] as { data: string }).data).toBe(addr);
    }
    expect(counters.get('dns.local')).toBe(cases.length);
  });

  it('NODATA with SOA for AAAA (and HTTPS, MX) of an IPv4-only name', async () => {
    const { dns } = service();
    for (const type of ['AAAA', 'UNKNOWN_65', 'MX', 'TXT']) {
      const r = await ask(dns, q('gateway.tender.internal', type));
      expect(r.rcode).toBe('NOERROR');
      expect(r.flag_aa).toBe(true);
      expect(r.answers).toEqual([]);
      expect(r.authorities).toHaveLength(1);
      expect(r.authorities![0]).toMatchObject({ type: 'SOA', name: 'tender.internal' });
    }
    const alias = await ask(dns, q('host.docker.internal', 'AAAA'));
    expect(alias.rcode).toBe('NOERROR');
    expect(alias.authorities![0]).toMatchObject({ type: 'SOA', name: 'docker.internal' });
  });

  it('NXDOMAIN for unknown names in the zone; apex SOA', async () => {
    const { dns } = service();
    for (const name of ['nosuch.tender.internal', 'a.b.gateway.tender.internal', 'x.TENDER.internal']) {
      const r = await ask(dns, q(name, 'A'));
      expect(r.rcode).toBe('NXDOMAIN');
      expect(r.flag_aa).toBe(true);
      expect(r.authorities![0]).toMatchObject({ type: 'SOA', name: 'tender.internal' });
    }
    const soa = await ask(dns, q('tender.internal', 'SOA'));
    expect(soa.rcode).toBe('NOERROR');
    expect(soa.answers![0]).toMatchObject({ type: 'SOA', data: { mname: 'gateway.tender.internal' } });
    const apexA = await ask(dns, q('tender.internal', 'A'));
    expect(apexA.rcode).toBe('NOERROR');
    expect(apexA.answers).toEqual([]);
  });

  it('PTR for built-in and machine addresses', async () => {
    const { dns } = service();
    dns.records.add('vm1.tender.internal', '192.168.127.2');
    dns.records.add('vm1.tender.internal', 'fd00::2');
    const r = await ask(dns, q('1.127.168.192.in-addr.arpa', 'PTR'));
    expect(r.flag_aa).toBe(true);
    expect(r.answers).toMatchObject([{ type: 'PTR', data: 'gateway.tender.internal' }]);
    const r2 = await ask(dns, q('2.127.168.192.IN-ADDR.ARPA', 'PTR'));
    expect(r2.answers).toMatchObject([{ type: 'PTR', data: 'vm1.tender.internal' }]);
    const r6 = await ask(dns, q('2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa', 'PTR'));
    expect(r6.answers).toMatchObject([{ type: 'PTR', data: 'vm1.tender.internal' }]);
    const aaaa = await ask(dns, q('vm1.tender.internal', 'AAAA'));
    expect(aaaa.answers).toMatchObject([{ type: 'AAAA', data: 'fd00::2' }]);
    const any = await ask(dns, q('vm1.tender.internal', 'ANY'));
    expect(any.answers!.map((a) => a.type)).toEqual(['A', 'AAAA']);
  });

  it('machine records come and go with the table', async () => {
    const { dns } = service();
    expect(dns.records.add('vm1.tender.internal', '192.168.127.3')).toBe(true);
    expect((await ask(dns, q('vm1.tender.internal', 'A'))).answers).toHaveLength(1);
    expect(dns.records.remove('vm1.tender.internal')).toBe(true);
    expect((await ask(dns, q('vm1.tender.internal', 'A'))).rcode).toBe('NXDOMAIN');
    // PTR for the removed address is no longer ours: forwarded, and with no upstream, SERVFAIL.
    expect((await ask(dns, q('3.127.168.192.in-addr.arpa', 'PTR'))).rcode).toBe('SERVFAIL');
  });

  it('addMachine/removeMachine publish <hostname>.<zone> from a DHCP hostname', async () => {
    const { dns } = service();
    expect(dns.addMachine('Alpine-VM.lan', '192.168.127.5')).toBe(true);
    expect(dns.addMachine('bad name', '192.168.127.6')).toBe(false);
    expect(dns.addMachine('', '192.168.127.6')).toBe(false);
    expect((await ask(dns, q('alpine-vm.tender.internal', 'A'))).answers).toMatchObject([{ data: '192.168.127.5' }]);
    expect(dns.removeMachine('alpine-vm')).toBe(true);
    expect((await ask(dns, q('alpine-vm.tender.internal', 'A'))).rcode).toBe('NXDOMAIN');
  });

  it('echoes EDNS with DO; BADVERS for EDNS version 1; REFUSED for class CH', async () => {
    const { dns } = service();
    const r = await ask(dns, q('gateway.tender.internal', 'A', { edns: true }));
    const opt = r.additionals!.find((a) => a.type === 'OPT') as dnsPacket.OptAnswer;
    expect(opt.flag_do).toBe(true);

    const v1 = dnsPacket.encode({
      type: 'query',
      id: 7,
      questions: [{ name: 'gateway.tender.internal', type: 'A' }],
      additionals: [{ type: 'OPT', name: '.', udpPayloadSize: 1232, extendedRcode: 0, ednsVersion: 1, flags: 0, flag_do: false, options: [] }],
    });
    const bv = await ask(dns, v1);
    const bvOpt = bv.additionals!.find((a) => a.type === 'OPT') as dnsPacket.OptAnswer;
    expect(bvOpt.extendedRcode).toBe(1); // (1 << 4) | 0 = 16 = BADVERS
    expect(bv.answers).toEqual([]);

    const ch = dnsPacket.encode({ type: 'query', id: 8, questions: [{ name: 'gateway.tender.internal', type: 'A', class: 'CH' }] });
    expect((await ask(dns, ch)).rcode).toBe('REFUSED');
  });

  it('truncates an oversized UDP answer (TC), not over TCP', async () => {
    const { dns } = service();
    for (let i = 1; i <= 60; i++) dns.records.add('many.tender.internal', `10.0.0.${i}`);
    const r = await ask(dns, q('many.tender.internal', 'A'));
    expect(r.flag_tc).toBe(true);
    expect(r.answers).toEqual([]);
    const t = await dns.query(q('many.tender.internal', 'A'), { ...UDP, transport: 'tcp' });
    expect(decode(Buffer.from(t!)).answers).toHaveLength(60);
  });
});

describe('malformed and unusual queries', () => {
  it('FORMERR for 2 questions, no question, a bad name; NOTIMP for opcode UPDATE', async () => {
    const { dns, counters } = service();
    const two = dnsPacket.encode({ type: 'query', id: 1, questions: [{ name: 'a.b', type: 'A' }, { name: 'c.d', type: 'A' }] });
    const none = dnsPacket.encode({ type: 'query', id: 2, questions: [] });
    const badLabel = hex('000301000001000000000000' + '416100' + '00010001'); // label length 0x41 > 63
    for (const m of [two, none, badLabel]) {
      const r = await ask(dns, m);
      expect(r.rcode).toBe('FORMERR');
      expect(r.id).toBe(m.readUInt16BE(0));
      expect(r.questions).toEqual([]);
    }
    expect(counters.get('dns.formerr')).toBe(3);
    const upd = Buffer.from(q('gateway.tender.internal', 'SOA'));
    upd[2] = (5 << 3) | (upd[2]! & 0x87); // opcode 5 = UPDATE (RFC 2136)
    const r = await ask(dns, upd);
    expect(r.rcode).toBe('NOTIMP');
    expect(r.questions).toHaveLength(1);
  });

  it('SERVFAIL when no upstream and no fallback; fallback answers A and NODATA for AAAA', async () => {
    const lookups: string[] = [];
    const { dns, counters } = service({
      hostLookup: async (name, family) => {
        lookups.push(`${name}/${family}`);
        return name === 'myhost.example' && family === 4 ? ['10.1.2.3'] : [];
      },
    });
    const a = await ask(dns, q('MyHost.example', 'A'));
    expect(a.rcode).toBe('NOERROR');
    expect(a.flag_aa).toBe(false);
    expect(a.answers).toMatchObject([{ name: 'MyHost.example', type: 'A', data: '10.1.2.3' }]);
    const aaaa = await ask(dns, q('myhost.example', 'AAAA'));
    expect(aaaa.rcode).toBe('NOERROR');
    expect(aaaa.answers).toEqual([]);
    const none = await ask(dns, q('nothing.example', 'A'));
    expect(none.rcode).toBe('SERVFAIL');
    const mx = await ask(dns, q('myhost.example', 'MX'));
    expect(mx.rcode).toBe('SERVFAIL');
    expect(counters.get('dns.fallback')).toBe(2);
    expect(counters.get('dns.servfail')).toBe(2);
    expect(lookups).toContain('myhost.example/4');
  });

  it('a hung or throwing hostLookup never hangs or rejects the query', async () => {
    const { dns, clock, counters } = service({
      timeoutMs: 100,
      hostLookup: (name) => {
        if (name === 'throws.example') throw new Error('boom');
        return new Promise(() => {}); // never settles
      },
    });
    expect((await ask(dns, q('throws.example', 'A'))).rcode).toBe('SERVFAIL');
    const p = dns.query(q('hangs.example', 'A'), UDP);
    // Let the forwarder give up (no upstreams) and the lookup start, then run its timers.
    for (let i = 0; i < 10; i++) {
      await new Promise((r) => setImmediate(r));
      clock.advance(100);
    }
    const r = decode(Buffer.from((await p)!));
    expect(r.rcode).toBe('SERVFAIL');
    expect(counters.get('dns.fallback_timeout')).toBeGreaterThanOrEqual(1);
  });

  it('property: arbitrary bytes never reject, throw or crash', async () => {
    const { dns } = service();
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 600 }), fc.constantFrom('udp' as const, 'tcp' as const), async (bytes, transport) => {
        const r = await dns.query(bytes, { ...UDP, transport });
        if (r !== null) expect(r.length).toBeGreaterThanOrEqual(12);
      }),
      { numRuns: 2000 },
    );
  });

  it('property: a real query with random bytes flipped or cut never rejects', async () => {
    const { dns } = service();
    const base = hex(DIG_QUERY);
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(base.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        fc.nat(base.length),
        async (flips, cut) => {
          const b = Buffer.from(base);
          for (const [i, v] of flips) b[i] = v;
          const r = await dns.query(b.subarray(0, cut), UDP);
          if (r !== null) expect(r.length).toBeGreaterThanOrEqual(12);
        },
      ),
      { numRuns: 1000 },
    );
  });
});

describe('forwarding: ID remapping (scripted upstream on loopback)', () => {
  it('two clients with the same ID concurrently each get their own answer, ID restored', async () => {
    // An upstream that holds the first two queries and answers them in reverse order, so
    // both are outstanding at once and a reply can only find its query by the remapped ID.
    const up = dgram.createSocket('udp4');
    await new Promise<void>((r) => up.bind(0, '127.0.0.1', r));
    const seen: { id: number; name: string; rinfo: dgram.RemoteInfo }[] = [];
    up.on('message', (m, rinfo) => {
      const d = decode(m);
      seen.push({ id: d.id!, name: d.questions![0]!.name, rinfo });
      if (seen.length === 2) {
        for (const s of [...seen].reverse()) {
          const reply = dnsPacket.encode({
            type: 'response',
            id: s.id,
            flags: dnsPacket.RECURSION_DESIRED | dnsPacket.RECURSION_AVAILABLE,
            questions: [{ name: s.name, type: 'A' }],
            answers: [{ name: s.name, type: 'A', ttl: 60, data: s.name.startsWith('one') ? '10.0.0.1' : '10.0.0.2' }],
          });
          up.send(reply, s.rinfo.port, s.rinfo.address);
        }
      }
    });
    const counters = new Counters();
    const clock = new SystemClock();
    const dns = new DnsService({
      zone: 'tender.internal',
      upstreams: [{ host: '127.0.0.1', port: (up.address() as AddressInfo).port }],
      clock,
      counters,
      timeoutMs: 10_000,
      hostLookup: async () => [],
    });
    services.push(dns);
    try {
      const [r1, r2] = await Promise.all([
        dns.query(q('one.example', 'A', { id: 0x4242 }), { ...UDP, port: 1111 }),
        dns.query(q('two.example', 'A', { id: 0x4242 }), { ...UDP, ip: '192.168.127.3' }),
      ]);
      expect(seen).toHaveLength(2);
      expect(seen[0]!.id).not.toBe(seen[1]!.id);
      const d1 = decode(Buffer.from(r1!));
      const d2 = decode(Buffer.from(r2!));
      expect(d1.id).toBe(0x4242);
      expect(d2.id).toBe(0x4242);
      expect(d1.answers).toMatchObject([{ name: 'one.example', data: '10.0.0.1' }]);
      expect(d2.answers).toMatchObject([{ name: 'two.example', data: '10.0.0.2' }]);
      expect(counters.get('dns.upstream.udp')).toBe(2);
    } finally {
      clock.stop();
      up.close();
    }
  });

  it('a reply with the right ID but another question is dropped (RFC 5452 §9.1)', async () => {
    const up = dgram.createSocket('udp4');
    await new Promise<void>((r) => up.bind(0, '127.0.0.1', r));
    up.on('message', (m, rinfo) => {
      const d = decode(m);
      const spoof = dnsPacket.encode({
        type: 'response',
        id: d.id!,
        questions: [{ name: 'evil.example', type: 'A' }],
        answers: [{ name: 'evil.example', type: 'A', data: '6.6.6.6' }],
      });
      const good = dnsPacket.encode({
        type: 'response',
        id: d.id!,
        questions: d.questions,
        answers: [{ name: d.questions![0]!.name, type: 'A', data: '10.9.9.9' }],
      });
      up.send(spoof, rinfo.port, rinfo.address, () => up.send(good, rinfo.port, rinfo.address));
    });
    const counters = new Counters();
    const clock = new SystemClock();
    const dns = new DnsService({
      zone: 'tender.internal',
      upstreams: [{ host: '127.0.0.1', port: (up.address() as AddressInfo).port }],
      clock,
      counters,
      hostLookup: async () => [],
    });
    services.push(dns);
    try {
      const r = decode(Buffer.from((await dns.query(q('Good.Example', 'A'), UDP))!));
      expect(r.answers).toMatchObject([{ data: '10.9.9.9' }]);
      expect(counters.get('dns.drop.upstream_unmatched')).toBe(1);
    } finally {
      clock.stop();
      up.close();
    }
  });

  it('bounds outstanding forwarded queries', async () => {
    const up = dgram.createSocket('udp4'); // never answers
    await new Promise<void>((r) => up.bind(0, '127.0.0.1', r));
    const counters = new Counters();
    const clock = new ManualClock();
    const dns = new DnsService({
      zone: 'tender.internal',
      upstreams: [{ host: '127.0.0.1', port: (up.address() as AddressInfo).port }],
      clock,
      counters,
      maxOutstanding: 2,
      timeoutMs: 1000,
      hostLookup: async () => [],
    });
    services.push(dns);
    try {
      const p1 = dns.query(q('a.example', 'A', { id: 1 }), UDP);
      const p2 = dns.query(q('b.example', 'A', { id: 2 }), UDP);
      expect(await dns.query(q('c.example', 'A', { id: 3 }), UDP)).toBeNull();
      expect(counters.get('dns.drop.overload')).toBe(1);
      // Two attempts each (one upstream, tried twice), then SERVFAIL (the fallback finds nothing).
      clock.advance(1000);
      clock.advance(1000);
      const [r1, r2] = await Promise.all([p1, p2]);
      expect(decode(Buffer.from(r1!)).rcode).toBe('SERVFAIL');
      expect(decode(Buffer.from(r2!)).rcode).toBe('SERVFAIL');
      expect(counters.get('dns.upstream.timeout')).toBe(4);
      // Slots are free again.
      const p4 = dns.query(q('d.example', 'A', { id: 4 }), UDP);
      dns.close();
      expect(await p4).toBeNull();
    } finally {
      up.close();
    }
  });
});
