/**
 * A hand-built peer for transport tests: answers ARP requests (RFC 826) and ICMP echo
 * requests (RFC 792) for one IPv4 address, byte by byte, with nothing of tender's own stack
 * involved, so a transport test fails only because of the transport.
 */
import { checksum } from '../../../netstack/wire/checksum.js';

export interface ResponderStats {
  frames: number;
  arpRequests: number;
  echoRequests: number;
  /** Largest frame received. */
  maxFrame: number;
  other: number;
}

function be16(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}

function eqBytes(a: Uint8Array, ao: number, b: Uint8Array, bo: number, n: number): boolean {
  for (let i = 0; i < n; i++) if (a[ao + i] !== b[bo + i]) return false;
  return true;
}

export function parseMac(s: string): Uint8Array {
  return Uint8Array.from(s.split(':').map((x) => parseInt(x, 16)));
}

export function parseIp(s: string): Uint8Array {
  return Uint8Array.from(s.split('.').map(Number));
}

/**
 * Returns a function that takes one received frame (borrowed) and returns the reply frame
 * (freshly allocated) or null.
 */
export function arpIcmpResponder(ipStr: string, macStr: string): { handle(f: Uint8Array): Uint8Array | null; stats: ResponderStats } {
  const ip = parseIp(ipStr);
  const mac = parseMac(macStr);
  const stats: ResponderStats = { frames: 0, arpRequests: 0, echoRequests: 0, maxFrame: 0, other: 0 };
  const handle = (f: Uint8Array): Uint8Array | null => {
    stats.frames++;
    stats.maxFrame = Math.max(stats.maxFrame, f.length);
    if (f.length < 14) return null;
    const type = be16(f, 12);
    if (type === 0x0806 && f.length >= 42) {
      // ARP: htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4, op 1 (request), target = us.
      if (be16(f, 14) !== 1 || be16(f, 16) !== 0x0800 || f[18] !== 6 || f[19] !== 4 || be16(f, 20) !== 1) return null;
      if (!eqBytes(f, 38, ip, 0, 4)) return null;
      stats.arpRequests++;
      const r = new Uint8Array(42);
      r.set(f.subarray(6, 12), 0); // to the requester
      r.set(mac, 6);
      r[12] = 0x08;
      r[13] = 0x06;
      r.set(f.subarray(14, 20), 14); // htype, ptype, hlen, plen as asked
      r[20] = 0;
      r[21] = 2; // reply
      r.set(mac, 22); // sender hw = us
      r.set(ip, 28);
      r.set(f.subarray(22, 32), 32); // target = the requester's sha + spa
      return r;
    }
    if (type === 0x0800 && f.length >= 14 + 20) {
      const ihl = (f[14]! & 0x0f) * 4;
      if (f[14]! >> 4 !== 4 || ihl < 20 || f[23] !== 1 || !eqBytes(f, 30, ip, 0, 4)) {
        stats.other++;
        return null;
      }
      const total = be16(f, 16);
      if (total < ihl + 8 || 14 + total > f.length || f[14 + ihl] !== 8) {
        stats.other++;
        return null;
      }
      stats.echoRequests++;
      // A copy (not f.slice: on a Buffer that is a view, and f is borrowed).
      const r = new Uint8Array(14 + total);
      r.set(f.subarray(0, 14 + total));
      r.set(f.subarray(6, 12), 0);
      r.set(mac, 6);
      // IP: swap addresses, fresh TTL, recompute the header checksum.
      r.set(f.subarray(30, 34), 26);
      r.set(f.subarray(26, 30), 30);
      r[22] = 64;
      r[24] = 0;
      r[25] = 0;
      const hc = checksum(r, 14, ihl);
      r[24] = hc >> 8;
      r[25] = hc & 0xff;
      // ICMP: type 0 (echo reply), same id/seq/data, recompute the checksum.
      const io = 14 + ihl;
      r[io] = 0;
      r[io + 2] = 0;
      r[io + 3] = 0;
      const ic = checksum(r, io, total - ihl);
      r[io + 2] = ic >> 8;
      r[io + 3] = ic & 0xff;
      return r;
    }
    stats.other++;
    return null;
  };
  return { handle, stats };
}
