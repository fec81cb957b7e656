/**
 * The 12-byte DNS header (RFC 1035 §4.1.1) and the question section's raw extent.
 *
 * dns-packet does the real wire work (parse and emit of whole messages). These helpers exist
 * for what dns-packet cannot do without re-encoding: a forwarder must pass the upstream's
 * reply through byte for byte, so it only reads and patches the ID, checks the flags, and
 * compares the raw question bytes. Every reader checks the length first, so nothing here can
 * read out of bounds or throw on hostile input.
 *
 *                                 1  1  1  1  1  1
 *   0  1  2  3  4  5  6  7  8  9  0  1  2  3  4  5
 *  +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
 *  |                      ID                       |
 *  |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
 *  |                    QDCOUNT                    |
 *  |                    ANCOUNT                    |
 *  |                    NSCOUNT                    |
 *  |                    ARCOUNT                    |
 *  +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
 */

export const HEADER_LEN = 12;

export const FLAG_QR = 0x8000;
export const FLAG_AA = 0x0400;
export const FLAG_TC = 0x0200;
export const FLAG_RD = 0x0100;
export const FLAG_RA = 0x0080;
export const FLAG_CD = 0x0010;

export const enum Rcode {
  NoError = 0,
  FormErr = 1,
  ServFail = 2,
  NxDomain = 3,
  NotImp = 4,
  Refused = 5,
}

export function readId(b: Uint8Array): number {
  return (b[0]! << 8) | b[1]!;
}

export function writeId(b: Uint8Array, id: number): void {
  b[0] = id >>> 8;
  b[1] = id & 0xff;
}

export function readFlags(b: Uint8Array): number {
  return (b[2]! << 8) | b[3]!;
}

export function opcodeOf(flags: number): number {
  return (flags >>> 11) & 0xf;
}

export function rcodeOf(flags: number): number {
  return flags & 0xf;
}

export function readQdcount(b: Uint8Array): number {
  return (b[4]! << 8) | b[5]!;
}

/**
 * End offset of the first question (name + QTYPE + QCLASS), or -1 when it does not fit.
 * Only uncompressed labels are accepted: the first name of a message has nothing earlier to
 * point at (RFC 1035 §4.1.4 pointers refer to prior occurrences), and no real client sends
 * one. Labels are at most 63 bytes and names at most 255 (RFC 1035 §2.3.4).
 */
export function questionEnd(b: Uint8Array): number {
  let off = HEADER_LEN;
  let nameLen = 0;
  for (;;) {
    if (off >= b.length) return -1;
    const len = b[off]!;
    if (len === 0) {
      off += 1;
      break;
    }
    if (len > 63) return -1;
    nameLen += len + 1;
    if (nameLen > 254) return -1;
    off += len + 1;
  }
  off += 4;
  return off <= b.length ? off : -1;
}

/**
 * Whether two messages carry the same first question, compared as raw bytes with ASCII case
 * folded: a 0x20-randomising client (draft-vixie-dnsext-dns0x20) or an upstream that
 * normalises case must still match. Folding length bytes is harmless: a label length in
 * 'A'..'Z' (65..90) is above the 63 limit and was rejected by `questionEnd`.
 */
export function sameQuestion(a: Uint8Array, aEnd: number, b: Uint8Array): boolean {
  if (b.length < aEnd) return false;
  for (let i = HEADER_LEN; i < aEnd; i++) {
    let x = a[i]!;
    let y = b[i]!;
    if (x >= 0x41 && x <= 0x5a) x |= 0x20;
    if (y >= 0x41 && y <= 0x5a) y |= 0x20;
    if (x !== y) return false;
  }
  return true;
}

/**
 * A bodiless response to `query`: same ID and opcode, RD copied, QR set, the given RCODE,
 * and the question echoed when `qEnd` > 0 (RFC 1035 §4.1.1; FORMERR echoes nothing since the
 * question is what could not be read). Used for FORMERR, SERVFAIL, NOTIMP and REFUSED.
 */
export function errorResponse(query: Uint8Array, rcode: number, qEnd: number): Uint8Array {
  const len = qEnd > 0 ? qEnd : HEADER_LEN;
  const out = new Uint8Array(len);
  out.set(query.subarray(0, len));
  const qflags = readFlags(query);
  const flags = FLAG_QR | (qflags & (0x7800 | FLAG_RD | FLAG_CD)) | FLAG_RA | (rcode & 0xf);
  out[2] = flags >>> 8;
  out[3] = flags & 0xff;
  out[4] = 0;
  out[5] = qEnd > 0 ? 1 : 0;
  out.fill(0, 6, 12);
  return out;
}
