import { describe, expect, it } from 'vitest';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { parseUpstream, readResolvConf, upstreamsFromResolvConf } from '../../netstack/services/resolv-conf.js';

describe('parseUpstream', () => {
  it('accepts ADDR and ADDR:PORT, IPv6 bracketed for a port', () => {
    expect(parseUpstream('1.2.3.4')).toEqual({ host: '1.2.3.4', port: 53 });
    expect(parseUpstream('1.2.3.4:5353')).toEqual({ host: '1.2.3.4', port: 5353 });
    expect(parseUpstream('::1')).toEqual({ host: '::1', port: 53 });
    expect(parseUpstream('[::1]')).toEqual({ host: '::1', port: 53 });
    expect(parseUpstream('[::1]:53')).toEqual({ host: '::1', port: 53 });
    expect(parseUpstream('[2001:db8::1]:5300')).toEqual({ host: '2001:db8::1', port: 5300 });
    expect(parseUpstream('fe80::1%eth0')).toEqual({ host: 'fe80::1', port: 53 });
    expect(parseUpstream(' 127.0.0.53 ')).toEqual({ host: '127.0.0.53', port: 53 });
  });

  it('rejects garbage with a RangeError', () => {
    for (const bad of ['', 'dns.google', '1.2.3.4:', '1.2.3.4:0', '1.2.3.4:65536', '1.2.3.4:x', '[1.2.3.4]:53', '[::1]:', '::1:53:zz', '1.2.3']) {
      expect(() => parseUpstream(bad), bad).toThrow(RangeError);
    }
  });

  it('property: arbitrary strings either parse or throw RangeError', () => {
    fc.assert(
      fc.property(fc.string(), (s) => {
        try {
          const u = parseUpstream(s);
          expect(u.port).toBeGreaterThan(0);
        } catch (e) {
          expect(e).toBeInstanceOf(RangeError);
        }
      }),
    );
  });
});

describe('upstreamsFromResolvConf', () => {
  it('reads nameserver lines (v4, v6, scoped), skips comments, options and junk', () => {
    // A systemd-resolved stub file, plus what NetworkManager and a VPN client write.
    const text = [
      '# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).',
      '; another comment style',
      'nameserver 127.0.0.53',
      'options edns0 trust-ad',
      'search example.com',
      'nameserver 2001:4860:4860::8888',
      'nameserver fe80::1%enp0s3   # link-local with a zone',
      '   nameserver\t10.8.0.1',
      '#nameserver 9.9.9.9',
      'nameserver 127.0.0.53',
      'nameserver not-an-ip',
      'nameserver',
      'nameservers 1.1.1.1',
      'nameserver 8.8.8.8\r',
    ].join('\n');
    expect(upstreamsFromResolvConf(text)).toEqual([
      { host: '127.0.0.53', port: 53 },
      { host: '2001:4860:4860::8888', port: 53 },
      { host: 'fe80::1', port: 53 },
      { host: '10.8.0.1', port: 53 },
      { host: '8.8.8.8', port: 53 },
    ]);
  });

  it('readResolvConf reads a file; a missing file gives none', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tender-resolv-'));
    try {
      writeFileSync(join(dir, 'resolv.conf'), 'nameserver 192.0.2.1\n');
      expect(readResolvConf(join(dir, 'resolv.conf'))).toEqual([{ host: '192.0.2.1', port: 53 }]);
      expect(readResolvConf(join(dir, 'missing'))).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true });
    }
  });

  it('property: never throws', () => {
    fc.assert(fc.property(fc.string({ maxLength: 400 }), (s) => void upstreamsFromResolvConf(s)));
  });
});
