import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { DnsRecords, isValidName, normalizeName, reverseName } from '../../netstack/services/dns-records.js';

describe('DnsRecords', () => {
  it('adds, lists and removes A and AAAA records, names normalised', () => {
    const r = new DnsRecords();
    expect(r.add('VM1.Tender.Internal.', '192.168.127.2')).toBe(true);
    expect(r.add('vm1.tender.internal', '192.168.127.2')).toBe(true); // idempotent
    expect(r.add('vm1.tender.internal', 'FD00:0:0::2')).toBe(true);
    expect(r.list()).toEqual([
      { name: 'vm1.tender.internal', type: 'A', address: '192.168.127.2' },
      { name: 'vm1.tender.internal', type: 'AAAA', address: 'fd00::2' },
    ]);
    expect(r.resolve('vm1.TENDER.internal')).toEqual({ name: 'vm1.tender.internal', a: ['192.168.127.2'], aaaa: ['fd00::2'] });
    expect(r.namesForReverse('2.127.168.192.in-addr.arpa.')).toEqual(['vm1.tender.internal']);

    expect(r.remove('vm1.tender.internal', 'fd00::2')).toBe(true);
    expect(r.remove('vm1.tender.internal', 'fd00::2')).toBe(false);
    expect(r.resolve('vm1.tender.internal')!.aaaa).toEqual([]);
    expect(r.remove('vm1.tender.internal')).toBe(true);
    expect(r.resolve('vm1.tender.internal')).toBeUndefined();
    expect(r.namesForReverse('2.127.168.192.in-addr.arpa')).toEqual([]);
    expect(r.list()).toEqual([]);
  });

  it('refuses hostile names and addresses instead of throwing', () => {
    const r = new DnsRecords();
    for (const bad of ['', 'a..b', 'has space.tender.internal', '-x.tender.internal', 'x'.repeat(64) + '.t', 'a\u0000b', 'ünï.t']) {
      expect(r.add(bad, '10.0.0.1')).toBe(false);
    }
    for (const bad of ['10.0.0', '10.0.0.256', 'fd00::g', '', 'host']) expect(r.add('ok.t', bad)).toBe(false);
    expect(r.list()).toEqual([]);
  });

  it('aliases follow the target, which may come later', () => {
    const r = new DnsRecords();
    expect(r.alias('host.docker.internal', 'host.tender.internal')).toBe(true);
    expect(r.resolve('host.docker.internal')).toBeUndefined();
    r.add('host.tender.internal', '192.168.127.254');
    expect(r.resolve('HOST.docker.internal')!.a).toEqual(['192.168.127.254']);
    expect(r.unalias('host.docker.internal')).toBe(true);
    expect(r.resolve('host.docker.internal')).toBeUndefined();
  });

  it('helpers', () => {
    expect(normalizeName('A.B.')).toBe('a.b');
    expect(isValidName('my_host-1.tender.internal')).toBe(true);
    expect(reverseName('192.168.127.1')).toBe('1.127.168.192.in-addr.arpa');
    expect(reverseName('::1')).toBe('1' + '.0'.repeat(31) + '.ip6.arpa');
    expect(reverseName('nope')).toBeNull();
  });

  it('property: add/remove never throw on arbitrary strings', () => {
    fc.assert(
      fc.property(fc.string(), fc.string(), (name, addr) => {
        const r = new DnsRecords();
        r.add(name, addr);
        r.alias(name, addr);
        r.resolve(name);
        r.namesForReverse(name);
        r.remove(name, addr);
        r.remove(name);
      }),
    );
  });
});
