/**
 * Software fallbacks for offloads, as the Linux kernel's GSO layer does for a device that
 * lacks them: completing a partial L4 checksum, and cutting a TCPv4 super-segment into
 * MSS-sized segments, each with its own IPv4 total length, identification, header checksum,
 * TCP sequence number, flags and checksum.
 *
 * Used by the switch when a frame carrying offload state is delivered to a link that did not
 * declare the offload. Output frames are built in one reusable buffer and handed to `emit`
 * (borrowed, per the Link rule).
 */
import type { Counters } from '../counters.js';
import { checksum, finish, fold, sum16 } from '../wire/checksum.js';
import { CSUM_PARTIAL, type FrameMeta, GSO_TCPV4, type LinkOffloads } from './link.js';

// Output buffers, one per nesting level: emitting can re-enter (a link that answers
// synchronously), and an inner call must not overwrite a frame the outer loop still builds.
const pool: Uint8Array[] = [];
let depth = 0;

/** True when `meta` asks for something `caps` cannot do. */
export function needsSoftware(meta: FrameMeta, caps: LinkOffloads | undefined): boolean {
  if (meta.gsoType === GSO_TCPV4) return !caps?.tso4;
  return (meta.flags & CSUM_PARTIAL) !== 0 && !caps?.csum;
}

/**
 * Resolve `meta` in software and emit plain frames (or, for a link with checksum offload but
 * no TSO, segments that still carry partial checksums — we complete them anyway: it is cheap
 * next to the copy and keeps one code path).
 */
export function softwareOffload(frame: Uint8Array, meta: FrameMeta, counters: Counters, emit: (f: Uint8Array) => void): void {
  const out = pool[depth] ?? (pool[depth] = new Uint8Array(65536 + 64));
  depth++;
  try {
    resolve(out, frame, meta, counters, emit);
  } finally {
    depth--;
  }
}

function resolve(out: Uint8Array, frame: Uint8Array, meta: FrameMeta, counters: Counters, emit: (f: Uint8Array) => void): void {
  if (meta.gsoType === GSO_TCPV4 && meta.gsoSize > 0) {
    segmentTcp4(out, frame, meta, counters, emit);
    return;
  }
  if (meta.flags & CSUM_PARTIAL) {
    const n = frame.length;
    if (n > out.length || meta.csumStart + meta.csumOffset + 2 > n) {
      counters.inc('offload.drop.bad_csum_meta');
      return;
    }
    out.set(frame);
    completeChecksum(out, n, meta.csumStart, meta.csumOffset);
    counters.inc('offload.sw_csum');
    emit(out.subarray(0, n));
    return;
  }
  emit(frame);
}

/**
 * The partial checksum field holds the folded pseudo-header sum: add the bytes from
 * csumStart to the end (with the field as it is) and store the complement.
 */
function completeChecksum(b: Uint8Array, n: number, start: number, offset: number): void {
  const c = finish(sum16(b, start, n - start));
  b[start + offset] = c >> 8;
  b[start + offset + 1] = c & 0xff;
}

function segmentTcp4(out: Uint8Array, frame: Uint8Array, meta: FrameMeta, counters: Counters, emit: (f: Uint8Array) => void): void {
  // Ethernet (14, untagged) + IPv4 + TCP.
  const l2 = 14;
  if (frame.length < l2 + 20 || frame[12] !== 0x08 || frame[13] !== 0x00) {
    counters.inc('offload.drop.bad_gso_frame');
    return;
  }
  const ihl = (frame[l2]! & 0x0f) * 4;
  const l4 = l2 + ihl;
  if (frame.length < l4 + 20 || frame[l2 + 9] !== 6) {
    counters.inc('offload.drop.bad_gso_frame');
    return;
  }
  const thl = (frame[l4 + 12]! >> 4) * 4;
  const hdr = l4 + thl;
  const mss = meta.gsoSize;
  if (thl < 20 || frame.length < hdr || mss <= 0) {
    counters.inc('offload.drop.bad_gso_frame');
    return;
  }
  const payload = frame.length - hdr;
  const seq0 = ((frame[l4 + 4]! << 24) | (frame[l4 + 5]! << 16) | (frame[l4 + 6]! << 8) | frame[l4 + 7]!) >>> 0;
  const flags0 = frame[l4 + 13]!;
  const id0 = (frame[l2 + 4]! << 8) | frame[l2 + 5]!;
  const srcDstSum = sum16(frame, l2 + 12, 8);
  counters.inc('offload.sw_gso');
  let i = 0;
  for (let off = 0; off < payload || (off === 0 && payload === 0); off += mss, i++) {
    const n = Math.min(mss, payload - off);
    const last = off + n >= payload;
    out.set(frame.subarray(0, hdr), 0);
    out.set(frame.subarray(hdr + off, hdr + off + n), hdr);
    // IPv4: total length, identification (incremented per segment, as Linux does), checksum.
    const tl = ihl + thl + n;
    out[l2 + 2] = tl >> 8;
    out[l2 + 3] = tl & 0xff;
    const id = (id0 + i) & 0xffff;
    out[l2 + 4] = id >> 8;
    out[l2 + 5] = id & 0xff;
    out[l2 + 10] = 0;
    out[l2 + 11] = 0;
    const ipc = checksum(out, l2, ihl);
    out[l2 + 10] = ipc >> 8;
    out[l2 + 11] = ipc & 0xff;
    // TCP: sequence number; FIN and PSH only on the last segment (CWR only on the first).
    const seq = (seq0 + off) >>> 0;
    out[l4 + 4] = seq >>> 24;
    out[l4 + 5] = (seq >>> 16) & 0xff;
    out[l4 + 6] = (seq >>> 8) & 0xff;
    out[l4 + 7] = seq & 0xff;
    let fl = flags0;
    if (!last) fl &= ~0x09; // FIN, PSH
    if (i > 0) fl &= ~0x80; // CWR
    out[l4 + 13] = fl;
    out[l4 + 16] = 0;
    out[l4 + 17] = 0;
    const len = thl + n;
    const c = finish(sum16(out, l4, len, srcDstSum + 6 + len));
    out[l4 + 16] = c >> 8;
    out[l4 + 17] = c & 0xff;
    emit(out.subarray(0, hdr + n));
    if (last) break;
  }
}

export { fold };
