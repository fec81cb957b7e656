/**
 * Where the DNS forwarder sends queries: `--dns-upstream ADDR[:PORT]` (repeatable) or the
 * host's /etc/resolv.conf.
 *
 * Loopback nameservers (127.0.0.53 of systemd-resolved, 127.0.0.1 of a local dnsmasq) are kept:
 * the forwarder's sockets live on the host, where those addresses are reachable, and going
 * through them keeps the host's per-domain routing (split DNS, VPN resolvers).
 */
import { readFileSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';

export interface Upstream {
  /** An IP literal (IPv4 dotted quad or IPv6 without brackets or scope). */
  host: string;
  port: number;
}

const DEFAULT_PORT = 53;

function parsePort(s: string, whole: string): number {
  if (!/^\d{1,5}$/.test(s)) throw new RangeError(`bad DNS upstream port: ${whole}`);
  const port = Number(s);
  if (port < 1 || port > 65535) throw new RangeError(`bad DNS upstream port: ${whole}`);
  return port;
}

/**
 * Parse `1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]` or `[::1]:53`. A bare IPv6 address takes no
 * port (the colons are the address's); brackets are needed to give one, as in URLs (RFC 3986
 * §3.2.2). Throws a RangeError on anything else (this is configuration, checked at startup).
 */
export function parseUpstream(s: string): Upstream {
  const t = s.trim();
  const br = /^\[([^\]]+)\](?::(.*))?$/.exec(t);
  if (br) {
    const host = stripScope(br[1]!);
    if (!isIPv6(host)) throw new RangeError(`bad DNS upstream address: ${s}`);
    return { host, port: br[2] === undefined ? DEFAULT_PORT : parsePort(br[2], s) };
  }
  if (isIPv6(stripScope(t))) return { host: stripScope(t), port: DEFAULT_PORT };
  const colon = t.lastIndexOf(':');
  const host = colon >= 0 ? t.slice(0, colon) : t;
  if (!isIPv4(host)) throw new RangeError(`bad DNS upstream address: ${s}`);
  return { host, port: colon >= 0 ? parsePort(t.slice(colon + 1), s) : DEFAULT_PORT };
}

/** `fe80::1%eth0` → `fe80::1`: a socket address string takes no zone here. */
function stripScope(a: string): string {
  const i = a.indexOf('%');
  return i >= 0 ? a.slice(0, i) : a;
}

/**
 * The `nameserver` lines of a resolv.conf(5), in order, duplicates removed. Comments start
 * with `#` or `;` (resolv.conf(5); glibc also ignores anything after the address). Lines that
 * do not hold an IP literal are skipped, as glibc's res_init does. All entries are returned,
 * not only glibc's first three (MAXNS): the forwarder tries them in turn.
 */
export function upstreamsFromResolvConf(text: string): Upstream[] {
  const out: Upstream[] = [];
  const seen = new Set<string>();
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.replace(/[#;].*$/, '').trim();
    const m = /^nameserver\s+(\S+)/.exec(line);
    if (!m) continue;
    const host = stripScope(m[1]!);
    if (!isIPv4(host) && !isIPv6(host)) continue;
    const key = host.toLowerCase();
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ host, port: DEFAULT_PORT });
  }
  return out;
}

/** Upstreams from a resolv.conf file; an unreadable file gives none (the forwarder then falls back). */
export function readResolvConf(path = '/etc/resolv.conf'): Upstream[] {
  try {
    return upstreamsFromResolvConf(readFileSync(path, 'utf8'));
  } catch {
    return [];
  }
}
