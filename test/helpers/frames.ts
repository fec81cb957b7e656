/**
 * Small helpers to turn captured hex into bytes and to build or mutate frames in tests.
 * Builders use the stack's own emitters, so they are only for inputs whose exact bytes do not
 * matter; anything checked byte for byte comes from test/fixtures/captured.ts.
 */
import fc from 'fast-check';
import { type Ip4, type Mac, mac } from '../../netstack/addr.js';
import { checksum } from '../../netstack/wire/checksum.js';
import { ETH_HLEN, EtherType, writeEthernetHeader } from '../../netstack/wire/ethernet.js';
import { IPV4_HLEN, IpProto, type Ipv4Repr, emitIpv4 } from '../../netstack/wire/ipv4.js';
import { emitUdp } from '../../netstack/wire/udp.js';

/** Bytes from hex; whitespace ignored. */
export function hex(s: string): Uint8Array {
  const t = s.replace(/\s+/g, '');
  if (t.length % 2 !== 0 || /[^0-9a-f]/i.test(t)) throw new Error('bad hex');
  const out = new Uint8Array(t.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(t.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function toHex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

export const GUEST_MAC: Mac = mac('02:00:00:00:00:02');
export const GW_MAC: Mac = mac('5a:94:ef:e4:0c:dd');

/**
 * Insert an 802.1Q tag after the source MAC, as a tagging switch port does (IEEE 802.1Q
 * §6.9: TPID 0x8100 then the TCI; the original EtherType follows).
 */
export function tagged(frame: Uint8Array, tci: number, tpid: number = EtherType.VLAN): Uint8Array {
  const out = new Uint8Array(frame.length + 4);
  out.set(frame.subarray(0, 12), 0);
  out[12] = tpid >> 8;
  out[13] = tpid & 0xff;
  out[14] = tci >> 8;
  out[15] = tci & 0xff;
  out.set(frame.subarray(12), 16);
  return out;
}

/** An Ethernet frame around `payload`. */
export function ethFrame(dst: Uint8Array, src: Uint8Array, etherType: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(ETH_HLEN + payload.length);
  writeEthernetHeader(f, 0, dst, src, etherType);
  f.set(payload, ETH_HLEN);
  return f;
}

/** An Ethernet + IPv4 frame (20-byte header) carrying `payload`. */
export function ipv4Frame(dst: Uint8Array, src: Uint8Array, r: Omit<Ipv4Repr, 'payloadLen'>, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(ETH_HLEN + IPV4_HLEN + payload.length);
  writeEthernetHeader(f, 0, dst, src, EtherType.IPv4);
  emitIpv4({ ...r, payloadLen: payload.length }, f, ETH_HLEN);
  f.set(payload, ETH_HLEN + IPV4_HLEN);
  return f;
}

/** An Ethernet + IPv4 + UDP frame. */
export function udpFrame(dstMac: Uint8Array, srcMac: Uint8Array, src: Ip4, sport: number, dst: Ip4, dport: number, payload: Uint8Array): Uint8Array {
  const u = new Uint8Array(8 + payload.length);
  emitUdp({ srcPort: sport, dstPort: dport }, payload, u, 0, src, dst);
  return ipv4Frame(dstMac, srcMac, { src, dst, protocol: IpProto.UDP, ttl: 64, ident: 0x1234 }, u);
}

/** Recompute the IPv4 header checksum of the packet at `off` in place. */
export function fixIpv4Checksum(b: Uint8Array, off = ETH_HLEN): void {
  const hl = (b[off]! & 0x0f) * 4;
  b[off + 10] = 0;
  b[off + 11] = 0;
  const c = checksum(b, off, hl);
  b[off + 10] = c >> 8;
  b[off + 11] = c & 0xff;
}

/** Pad a frame with zeros to the 60-byte Ethernet minimum, as a NIC does. */
export function padded(frame: Uint8Array, min = 60): Uint8Array {
  if (frame.length >= min) return frame;
  const out = new Uint8Array(min);
  out.set(frame);
  return out;
}

/**
 * Arbitrary inputs for parsers: random bytes, and real frames truncated and with bits flipped
 * (most interesting inputs are near-valid ones).
 */
export function hostileBytes(real: Uint8Array[], maxLen = 1600): fc.Arbitrary<Uint8Array> {
  const mutated = fc
    .tuple(
      fc.constantFrom(...real),
      fc.array(fc.tuple(fc.nat(), fc.nat(7)), { maxLength: 8 }),
      fc.option(fc.nat(), { nil: undefined }),
    )
    .map(([f, flips, cut]) => {
      const b = f.slice(0, cut === undefined ? f.length : cut % (f.length + 1));
      for (const [pos, bit] of flips) if (b.length > 0) b[pos % b.length]! ^= 1 << bit;
      return b;
    });
  return fc.oneof(fc.uint8Array({ maxLength: maxLen }), mutated, mutated);
}

/** True when `v` is a view lying entirely inside `buf`. */
export function within(v: Uint8Array, buf: Uint8Array): boolean {
  return v.buffer === buf.buffer && v.byteOffset >= buf.byteOffset && v.byteOffset + v.byteLength <= buf.byteOffset + buf.byteLength;
}

/** An integer in [0, max]. */
export function inRange(v: unknown, max: number): boolean {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max;
}
