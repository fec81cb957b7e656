/**
 * Port forward specs in Docker's grammar: `[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]`.
 *
 * - IPv6 host addresses go in brackets: `[::1]:8080:80`.
 * - Equal-length ranges: `8000-8010:8000-8010` (one spec per port).
 * - Host port 0, or an empty host port (`127.0.0.1::80`), asks for a free port, reported back
 *   when the listener is bound.
 * - The default host address is 127.0.0.1: exposing on every interface is an explicit
 *   `0.0.0.0:` (Docker defaults to all interfaces, which surprises people on laptops).
 */
import { isIPv4, isIPv6 } from 'node:net';

export type ForwardProtocol = 'tcp' | 'udp';

export interface ForwardSpec {
  protocol: ForwardProtocol;
  hostIp: string;
  /** 0 = any free port. */
  hostPort: number;
  guestPort: number;
}

export class ForwardSpecError extends Error {
  readonly code = 'BAD_FORWARD_SPEC';
}

const DEFAULT_HOST_IP = '127.0.0.1';

function fail(spec: string, why: string): never {
  throw new ForwardSpecError(`bad forward "${spec}": ${why}; expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]`);
}

function parsePortRange(spec: string, s: string, what: string, allowZero: boolean): [number, number] {
  const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(s);
  if (!m) fail(spec, `${what} "${s}" is not a port or a range`);
  const a = Number(m[1]);
  const b = m[2] === undefined ? a : Number(m[2]);
  if (a > 65535 || b > 65535) fail(spec, `${what} ${s} is above 65535`);
  if (a === 0 && !(allowZero && b === 0)) fail(spec, `${what} 0 is not allowed here`);
  if (b < a) fail(spec, `${what} range ${s} runs backwards`);
  return [a, b];
}

/** Parse one spec into one ForwardSpec per port. Throws ForwardSpecError. */
export function parseForwardSpec(spec: string): ForwardSpec[] {
  let rest = spec.trim();
  if (rest === '') fail(spec, 'empty');
  let protocol: ForwardProtocol = 'tcp';
  const slash = rest.lastIndexOf('/');
  if (slash >= 0) {
    const p = rest.slice(slash + 1).toLowerCase();
    if (p !== 'tcp' && p !== 'udp') fail(spec, `protocol "${p}" is not tcp or udp`);
    protocol = p;
    rest = rest.slice(0, slash);
  }
  let hostIp = DEFAULT_HOST_IP;
  if (rest.startsWith('[')) {
    const close = rest.indexOf(']');
    if (close < 0) fail(spec, 'unclosed [ in the host address');
    hostIp = rest.slice(1, close);
    if (!isIPv6(hostIp)) fail(spec, `"${hostIp}" is not an IPv6 address`);
    if (rest[close + 1] !== ':') fail(spec, 'expected ":" after the bracketed host address');
    rest = rest.slice(close + 2);
  }
  const parts = rest.split(':');
  let hostPorts: string;
  let guestPorts: string;
  if (parts.length === 2) {
    [hostPorts, guestPorts] = parts as [string, string];
  } else if (parts.length === 3 && hostIp === DEFAULT_HOST_IP && !spec.trim().startsWith('[')) {
    hostIp = parts[0]!;
    if (!isIPv4(hostIp)) fail(spec, `"${hostIp}" is not an IPv4 address (IPv6 goes in brackets)`);
    hostPorts = parts[1]!;
    guestPorts = parts[2]!;
  } else if (parts.length === 1) {
    fail(spec, 'a guest port alone is ambiguous; give HOSTPORT:GUESTPORT (0 for a free host port)');
  } else {
    fail(spec, 'too many ":"');
  }
  if (hostPorts === '') hostPorts = '0';
  const [ha, hb] = parsePortRange(spec, hostPorts, 'host port', true);
  const [ga, gb] = parsePortRange(spec, guestPorts, 'guest port', false);
  if (ha === 0) {
    if (ga !== gb) fail(spec, 'a free host port (0) cannot map a guest port range');
    return [{ protocol, hostIp, hostPort: 0, guestPort: ga }];
  }
  if (hb - ha !== gb - ga) fail(spec, `host range ${hostPorts} and guest range ${guestPorts} differ in length`);
  const out: ForwardSpec[] = [];
  for (let i = 0; i <= hb - ha; i++) out.push({ protocol, hostIp, hostPort: ha + i, guestPort: ga + i });
  return out;
}

/** The canonical text of one forward (brackets for IPv6). */
export function formatForward(f: ForwardSpec): string {
  const host = f.hostIp.includes(':') ? `[${f.hostIp}]` : f.hostIp;
  return `${host}:${f.hostPort}:${f.guestPort}/${f.protocol}`;
}
