/**
 * TCP segment format (RFC 9293 §3.1) and the options the engine speaks: MSS (RFC 9293
 * §3.7.1), window scale and timestamps (RFC 7323), SACK-permitted and SACK (RFC 2018).
 *
 * `TcpSegment` is the view: named field accessors over the bytes, valid once `check` passed
 * (no accessor then reads past the data offset or the buffer). `TcpRepr` is the meaning:
 * `parseTcp` fills one (reusable, so the receive path allocates nothing) and `emitTcp`
 * writes one back, computing the checksum.
 */
import type { Ip4 } from '../addr.js';
import { finish, fold, pseudoSum4, sum16 } from './checksum.js';

export const TCP_HLEN = 20;
/** Largest header: data offset 15 words. */
export const TCP_MAX_HLEN = 60;
export const TCP_PROTO = 6;

export const TcpFlag = {
  FIN: 0x01,
  SYN: 0x02,
  RST: 0x04,
  PSH: 0x08,
  ACK: 0x10,
  URG: 0x20,
  ECE: 0x40,
  CWR: 0x80,
} as const;

/** Option kinds (IANA "TCP Option Kind Numbers"). */
export const TcpOpt = {
  END: 0,
  NOP: 1,
  MSS: 2,
  WSCALE: 3,
  SACK_PERMITTED: 4,
  SACK: 5,
  TIMESTAMPS: 8,
} as const;

/** RFC 7323 §2.3: shift counts above 14 are treated as 14. */
export const MAX_WSCALE = 14;
/** At most 4 SACK blocks fit in 40 bytes of options (3 alongside timestamps). */
export const MAX_SACK_BLOCKS = 4;

export type TcpDropReason = 'truncated' | 'bad_offset' | 'bad_option';

/** Zero-copy view over one TCP segment (header + payload). */
export class TcpSegment {
  constructor(readonly buf: Uint8Array) {}

  /** Length checks: the fixed header fits and the data offset lies within the buffer. */
  static check(buf: Uint8Array): TcpSegment | TcpDropReason {
    if (buf.length < TCP_HLEN) return 'truncated';
    const hlen = (buf[12]! >> 4) * 4;
    if (hlen < TCP_HLEN || hlen > buf.length) return 'bad_offset';
    return new TcpSegment(buf);
  }

  get srcPort(): number { return (this.buf[0]! << 8) | this.buf[1]!; }
  get dstPort(): number { return (this.buf[2]! << 8) | this.buf[3]!; }
  get seq(): number { return readU32(this.buf, 4); }
  get ack(): number { return readU32(this.buf, 8); }
  /** Header length in bytes (data offset × 4). */
  get headerLen(): number { return (this.buf[12]! >> 4) * 4; }
  get flags(): number { return this.buf[13]!; }
  get window(): number { return (this.buf[14]! << 8) | this.buf[15]!; }
  get checksum(): number { return (this.buf[16]! << 8) | this.buf[17]!; }
  get urgent(): number { return (this.buf[18]! << 8) | this.buf[19]!; }
  get options(): Uint8Array { return this.buf.subarray(TCP_HLEN, this.headerLen); }
  get payload(): Uint8Array { return this.buf.subarray(this.headerLen); }

  /** True when the checksum over the pseudo-header and the whole segment verifies. */
  verifyChecksum(src: Ip4, dst: Ip4): boolean {
    return tcpChecksumOk(this.buf, src, dst);
  }
}

/** Checksum check over the pseudo-header and all of `seg` (RFC 9293 §3.1), without a view object. */
export function tcpChecksumOk(seg: Uint8Array, src: Ip4, dst: Ip4): boolean {
  const len = seg.length;
  return finish(sum16(seg, 0, len, pseudoSum4(src, dst, TCP_PROTO, len))) === 0;
}

/** The meaningful fields of a segment. Absent options: mss 0, wscale -1, tsPresent false. */
export interface TcpRepr {
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  /** The raw 16-bit window field (unscaled). */
  window: number;
  urgent: number;
  mss: number;
  wscale: number;
  sackPermitted: boolean;
  /** SACK blocks as flat [left0, right0, left1, right1, ...]; at most MAX_SACK_BLOCKS pairs. */
  sackBlocks: number[];
  tsPresent: boolean;
  tsval: number;
  tsecr: number;
  /** Header length (parse: as received; emit: computed). */
  headerLen: number;
  payloadLen: number;
}

export function newTcpRepr(): TcpRepr {
  return {
    srcPort: 0, dstPort: 0, seq: 0, ack: 0, flags: 0, window: 0, urgent: 0,
    mss: 0, wscale: -1, sackPermitted: false, sackBlocks: [], tsPresent: false, tsval: 0, tsecr: 0,
    headerLen: TCP_HLEN, payloadLen: 0,
  };
}

/**
 * Parse `buf` (a whole segment) into `out`. Returns a drop reason for a malformed segment:
 * data offset below 5 or past the end, or an option whose length is below 2 or overruns the
 * option area (RFC 9293 §3.1: a receiver must not loop or read past the header on such
 * input). Options with a known kind but the wrong length are ignored, as Linux does;
 * unknown kinds are skipped by their length. The checksum is not checked here.
 */
export function parseTcpInto(buf: Uint8Array, out: TcpRepr): TcpDropReason | null {
  if (buf.length < TCP_HLEN) return 'truncated';
  const hlen = (buf[12]! >> 4) * 4;
  if (hlen < TCP_HLEN || hlen > buf.length) return 'bad_offset';
  out.srcPort = (buf[0]! << 8) | buf[1]!;
  out.dstPort = (buf[2]! << 8) | buf[3]!;
  out.seq = readU32(buf, 4);
  out.ack = readU32(buf, 8);
  out.flags = buf[13]!;
  out.window = (buf[14]! << 8) | buf[15]!;
  out.urgent = (buf[18]! << 8) | buf[19]!;
  out.mss = 0;
  out.wscale = -1;
  out.sackPermitted = false;
  // Guarded: storing an array's length always calls into the runtime, even when it is 0 already.
  if (out.sackBlocks.length !== 0) out.sackBlocks.length = 0;
  out.tsPresent = false;
  out.tsval = 0;
  out.tsecr = 0;
  out.headerLen = hlen;
  out.payloadLen = buf.length - hlen;
  let i = TCP_HLEN;
  while (i < hlen) {
    const kind = buf[i]!;
    if (kind === TcpOpt.END) break;
    if (kind === TcpOpt.NOP) {
      i++;
      continue;
    }
    if (i + 1 >= hlen) return 'bad_option';
    const len = buf[i + 1]!;
    if (len < 2 || i + len > hlen) return 'bad_option';
    switch (kind) {
      case TcpOpt.MSS:
        if (len === 4) out.mss = (buf[i + 2]! << 8) | buf[i + 3]!;
        break;
      case TcpOpt.WSCALE:
        if (len === 3) out.wscale = Math.min(buf[i + 2]!, MAX_WSCALE);
        break;
      case TcpOpt.SACK_PERMITTED:
        if (len === 2) out.sackPermitted = true;
        break;
      case TcpOpt.SACK:
        if ((len - 2) % 8 === 0) {
          for (let j = i + 2; j + 8 <= i + len && out.sackBlocks.length < MAX_SACK_BLOCKS * 2; j += 8) {
            out.sackBlocks.push(readU32(buf, j), readU32(buf, j + 4));
          }
        }
        break;
      case TcpOpt.TIMESTAMPS:
        if (len === 10) {
          out.tsPresent = true;
          out.tsval = readU32(buf, i + 2);
          out.tsecr = readU32(buf, i + 6);
        }
        break;
      default:
        break; // unknown: skipped by its length
    }
    i += len;
  }
  return null;
}

/** Allocating convenience for tests and tools; the engine uses `parseTcpInto`. */
export function parseTcp(buf: Uint8Array): TcpRepr | null {
  const r = newTcpRepr();
  return parseTcpInto(buf, r) === null ? r : null;
}

/** Length of the options `emitTcp` writes for `r`, padded to a multiple of 4. */
export function tcpOptionsLen(r: TcpRepr): number {
  let n = 0;
  if (r.mss > 0) n += 4;
  if (r.tsPresent) n += 12; // NOP NOP TS, or SACK_PERM TS (same length)
  else if (r.sackPermitted) n += 4; // NOP NOP SACK_PERM
  if (r.wscale >= 0) n += 4; // NOP WS
  const blocks = Math.min(r.sackBlocks.length >> 1, r.tsPresent ? 3 : MAX_SACK_BLOCKS);
  if (blocks > 0) n += 4 + 8 * blocks; // NOP NOP SACK len
  return n;
}

export function tcpHeaderLen(r: TcpRepr): number {
  return TCP_HLEN + tcpOptionsLen(r);
}

/**
 * Write the segment for `r` at `buf[off..]`: header, options (in the order and padding Linux
 * uses, so captures compare byte for byte), the payload, and the checksum. `payload` may be
 * null when the caller already placed `r.payloadLen` bytes at `off + tcpHeaderLen(r)` (the
 * engine copies straight from its send buffer into the IP scratch). Returns the segment
 * length. The caller guarantees room in `buf`.
 */
/**
 * `partialChecksum`: write only the folded pseudo-header sum, for a device that completes the
 * checksum (virtio-net NEEDS_CSUM, as Linux's tcp_v4_send_check does with CHECKSUM_PARTIAL).
 */
export function emitTcp(r: TcpRepr, payload: Uint8Array | null, buf: Uint8Array, off: number, src: Ip4, dst: Ip4, partialChecksum = false): number {
  const hlen = tcpHeaderLen(r);
  const plen = payload ? payload.length : r.payloadLen;
  buf[off] = r.srcPort >> 8;
  buf[off + 1] = r.srcPort & 0xff;
  buf[off + 2] = r.dstPort >> 8;
  buf[off + 3] = r.dstPort & 0xff;
  writeU32(buf, off + 4, r.seq);
  writeU32(buf, off + 8, r.ack);
  buf[off + 12] = (hlen / 4) << 4;
  buf[off + 13] = r.flags;
  buf[off + 14] = (r.window >> 8) & 0xff;
  buf[off + 15] = r.window & 0xff;
  buf[off + 16] = 0;
  buf[off + 17] = 0;
  buf[off + 18] = r.urgent >> 8;
  buf[off + 19] = r.urgent & 0xff;
  let i = off + TCP_HLEN;
  if (r.mss > 0) {
    buf[i++] = TcpOpt.MSS;
    buf[i++] = 4;
    buf[i++] = r.mss >> 8;
    buf[i++] = r.mss & 0xff;
  }
  if (r.tsPresent) {
    if (r.sackPermitted) {
      buf[i++] = TcpOpt.SACK_PERMITTED;
      buf[i++] = 2;
    } else {
      buf[i++] = TcpOpt.NOP;
      buf[i++] = TcpOpt.NOP;
    }
    buf[i++] = TcpOpt.TIMESTAMPS;
    buf[i++] = 10;
    writeU32(buf, i, r.tsval);
    writeU32(buf, i + 4, r.tsecr);
    i += 8;
  } else if (r.sackPermitted) {
    buf[i++] = TcpOpt.NOP;
    buf[i++] = TcpOpt.NOP;
    buf[i++] = TcpOpt.SACK_PERMITTED;
    buf[i++] = 2;
  }
  if (r.wscale >= 0) {
    buf[i++] = TcpOpt.NOP;
    buf[i++] = TcpOpt.WSCALE;
    buf[i++] = 3;
    buf[i++] = r.wscale;
  }
  const blocks = Math.min(r.sackBlocks.length >> 1, r.tsPresent ? 3 : MAX_SACK_BLOCKS);
  if (blocks > 0) {
    buf[i++] = TcpOpt.NOP;
    buf[i++] = TcpOpt.NOP;
    buf[i++] = TcpOpt.SACK;
    buf[i++] = 2 + 8 * blocks;
    for (let b = 0; b < blocks; b++) {
      writeU32(buf, i, r.sackBlocks[2 * b]!);
      writeU32(buf, i + 4, r.sackBlocks[2 * b + 1]!);
      i += 8;
    }
  }
  if (payload) buf.set(payload, off + hlen);
  const len = hlen + plen;
  const c = partialChecksum ? fold(pseudoSum4(src, dst, TCP_PROTO, len)) : finish(sum16(buf, off, len, pseudoSum4(src, dst, TCP_PROTO, len)));
  buf[off + 16] = c >> 8;
  buf[off + 17] = c & 0xff;
  return len;
}

export function readU32(b: Uint8Array, off: number): number {
  return ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
}

export function writeU32(b: Uint8Array, off: number, v: number): void {
  b[off] = v >>> 24;
  b[off + 1] = (v >>> 16) & 0xff;
  b[off + 2] = (v >>> 8) & 0xff;
  b[off + 3] = v & 0xff;
}

/** Human-readable flags ("SA", "FPA", ...) for logs and test failures. */
export function tcpFlagsStr(f: number): string {
  let s = '';
  if (f & TcpFlag.SYN) s += 'S';
  if (f & TcpFlag.FIN) s += 'F';
  if (f & TcpFlag.RST) s += 'R';
  if (f & TcpFlag.PSH) s += 'P';
  if (f & TcpFlag.ACK) s += 'A';
  if (f & TcpFlag.URG) s += 'U';
  return s || '.';
}
