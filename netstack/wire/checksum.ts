/**
 * The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
 *
 * `sum16` returns the 32-bit running sum of 16-bit big-endian words (not folded), so the
 * pseudo-header and the payload can be summed separately and combined with `fold`.
 */
import type { Ip4 } from '../addr.js';

export function sum16(b: Uint8Array, off: number, len: number, initial = 0): number {
  if (len < 32) return sum16Small(b, off, len, initial);
  // RFC 1071 §2(B): the sum is byte-order independent, so add little-endian 32-bit words
  // (four bytes per read, which V8 compiles to plain loads), fold, then swap the bytes.
  // Two accumulators of at most 2^33 per step stay exact in a double far beyond 64 KiB.
  const dv = new DataView(b.buffer, b.byteOffset + off, len);
  let s0 = 0;
  let s1 = 0;
  let i = 0;
  const n16 = len & ~15;
  for (; i < n16; i += 16) {
    s0 += dv.getUint32(i, true) + dv.getUint32(i + 4, true);
    s1 += dv.getUint32(i + 8, true) + dv.getUint32(i + 12, true);
  }
  let s = s0 + s1;
  const n4 = len & ~3;
  for (; i < n4; i += 4) s += dv.getUint32(i, true);
  s = fold(s);
  s = ((s & 0xff) << 8) | (s >>> 8);
  return sum16Small(b, off + i, len - i, s + initial);
}

function sum16Small(b: Uint8Array, off: number, len: number, initial: number): number {
  let s = initial;
  const end = off + len;
  let i = off;
  for (; i + 1 < end; i += 2) s += (b[i]! << 8) | b[i + 1]!;
  if (i < end) s += b[i]! << 8;
  return s;
}

export function fold(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 0x10000);
  return s;
}

/** One's complement of the folded sum: the value to store in a checksum field. */
export function finish(s: number): number {
  return ~fold(s) & 0xffff;
}

export function checksum(b: Uint8Array, off: number, len: number, initial = 0): number {
  return finish(sum16(b, off, len, initial));
}

/** Sum of the IPv4 pseudo-header (RFC 768 / RFC 9293 §3.1). */
export function pseudoSum4(src: Ip4, dst: Ip4, proto: number, len: number): number {
  return (src >>> 16) + (src & 0xffff) + (dst >>> 16) + (dst & 0xffff) + proto + len;
}

/**
 * RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for a 16-bit field changing from m to m'.
 */
export function update16(hc: number, oldWord: number, newWord: number): number {
  const s = (~hc & 0xffff) + (~oldWord & 0xffff) + (newWord & 0xffff);
  return ~fold(s) & 0xffff;
}

/** Incremental update for a 32-bit field (an IPv4 address) changing. */
export function update32(hc: number, oldVal: number, newVal: number): number {
  const s =
    (~hc & 0xffff) +
    (~(oldVal >>> 16) & 0xffff) + (~oldVal & 0xffff) +
    (newVal >>> 16) + (newVal & 0xffff);
  return ~fold(s) & 0xffff;
}
