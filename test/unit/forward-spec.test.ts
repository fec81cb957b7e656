import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ForwardSpecError, formatForward, parseForwardSpec } from '../../netstack/services/forward-spec.js';

describe('forward specs (Docker grammar)', () => {
  it('defaults to 127.0.0.1 and tcp', () => {
    expect(parseForwardSpec('8080:80')).toEqual([{ protocol: 'tcp', hostIp: '127.0.0.1', hostPort: 8080, guestPort: 80 }]);
  });

  it('takes a host address, a protocol, IPv6 in brackets', () => {
    expect(parseForwardSpec('0.0.0.0:5353:53/udp')).toEqual([{ protocol: 'udp', hostIp: '0.0.0.0', hostPort: 5353, guestPort: 53 }]);
    expect(parseForwardSpec('[::1]:8080:80')).toEqual([{ protocol: 'tcp', hostIp: '::1', hostPort: 8080, guestPort: 80 }]);
    expect(parseForwardSpec('[::]:8080:80/UDP')[0]!.protocol).toBe('udp');
  });

  it('expands equal-length ranges', () => {
    const r = parseForwardSpec('8000-8002:9000-9002');
    expect(r.map((f) => [f.hostPort, f.guestPort])).toEqual([[8000, 9000], [8001, 9001], [8002, 9002]]);
  });

  it('accepts 0 or an empty host port for a free port', () => {
    expect(parseForwardSpec('0:80')[0]!.hostPort).toBe(0);
    expect(parseForwardSpec('127.0.0.1::80')[0]).toEqual({ protocol: 'tcp', hostIp: '127.0.0.1', hostPort: 0, guestPort: 80 });
  });

  it.each([
    '', '80', '8080:80/sctp', '70000:80', '80:0', '8000-8010:80-81', '10-5:10-5', '[::1:8080:80', '[1.2.3.4]:1:2',
    '::1:8080:80', '1.2.3:80:80', 'a:b', '1:2:3:4', '0:80-81',
  ])('rejects %j with a clear error', (s) => {
    expect(() => parseForwardSpec(s)).toThrow(ForwardSpecError);
  });

  it('never throws anything but ForwardSpecError, and round-trips what it accepts', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 40 }), (s) => {
        try {
          for (const f of parseForwardSpec(s)) expect(parseForwardSpec(formatForward(f))).toEqual([f]);
        } catch (e) {
          expect(e).toBeInstanceOf(ForwardSpecError);
        }
      }),
    );
    fc.assert(
      fc.property(fc.constantFrom('127.0.0.1', '0.0.0.0', '[::1]'), fc.integer({ min: 0, max: 65535 }), fc.integer({ min: 1, max: 65535 }), fc.constantFrom('tcp', 'udp'), (h, hp, gp, p) => {
        const [f] = parseForwardSpec(`${h}:${hp}:${gp}/${p}`);
        expect(f).toEqual({ protocol: p, hostIp: h.replace(/[[\]]/g, ''), hostPort: hp, guestPort: gp });
      }),
    );
  });
});
