/**
 * IPv4 reassembly (RFC 791 §3.2, with RFC 815's hole bookkeeping reduced to a sorted list).
 *
 * A guest can send fragments forever, so everything is bounded: datagrams in progress,
 * total bytes held, fragments per datagram, and a timeout (30 s, Linux's ipfrag_time). An
 * overlapping fragment discards the whole datagram — overlaps have no legitimate use and are
 * the classic evasion trick (the same rule RFC 5722 makes for IPv6).
 */
import type { Counters } from '../counters.js';
import type { Clock, Timer } from '../time.js';
import { checksum } from '../wire/checksum.js';
import { IPV4_HLEN, IPV4_MAX_LEN, type Ipv4Packet } from '../wire/ipv4.js';

interface Frag {
  off: number;
  data: Uint8Array;
}

interface Datagram {
  key: string;
  frags: Frag[];
  bytes: number;
  /** Total payload length, known once the last fragment (MF=0) arrived. */
  total: number;
  header: Uint8Array | null;
  timer: Timer;
}

export interface ReassemblyOptions {
  clock: Clock;
  counters: Counters;
  timeoutMs?: number;
  maxDatagrams?: number;
  maxBytes?: number;
  maxFragsPerDatagram?: number;
}

export class Reassembler {
  private readonly table = new Map<string, Datagram>();
  private bytes = 0;
  private readonly timeoutMs: number;
  private readonly maxDatagrams: number;
  private readonly maxBytes: number;
  private readonly maxFrags: number;

  constructor(private readonly o: ReassemblyOptions) {
    this.timeoutMs = o.timeoutMs ?? 30_000;
    this.maxDatagrams = o.maxDatagrams ?? 64;
    this.maxBytes = o.maxBytes ?? 4 * 1024 * 1024;
    this.maxFrags = o.maxFragsPerDatagram ?? 64;
  }

  get inProgress(): number {
    return this.table.size;
  }

  /**
   * Add one fragment. Returns the reassembled IPv4 packet (a fresh buffer: the header of the
   * first fragment with MF/offset cleared, length and checksum fixed) when complete, else null.
   */
  add(p: Ipv4Packet): Uint8Array | null {
    const c = this.o.counters;
    const key = `${p.src}|${p.dst}|${p.protocol}|${p.ident}`;
    const off = p.fragOffset;
    const data = p.payload;
    const more = p.moreFragments;
    if (more && data.length % 8 !== 0) {
      c.inc('ipv4.drop.frag_bad_len');
      return null;
    }
    if (off + data.length > IPV4_MAX_LEN - IPV4_HLEN) {
      c.inc('ipv4.drop.frag_too_big');
      return null;
    }
    let d = this.table.get(key);
    if (d === undefined) {
      if (this.table.size >= this.maxDatagrams) {
        c.inc('ipv4.drop.frag_table_full');
        return null;
      }
      const nd: Datagram = {
        key,
        frags: [],
        bytes: 0,
        total: -1,
        header: null,
        timer: this.o.clock.timer(() => this.expire(nd)),
      };
      d = nd;
      this.table.set(key, d);
      d.timer.arm(this.timeoutMs);
    }
    if (this.bytes + data.length > this.maxBytes) {
      c.inc('ipv4.drop.frag_memory');
      this.discard(d);
      return null;
    }
    if (d.frags.length >= this.maxFrags) {
      c.inc('ipv4.drop.frag_too_many');
      this.discard(d);
      return null;
    }
    // Insert sorted by offset, rejecting overlaps (exact duplicates are dropped silently:
    // retransmitted fragments are legitimate).
    const end = off + data.length;
    let i = 0;
    while (i < d.frags.length && d.frags[i]!.off < off) i++;
    const prev = d.frags[i - 1];
    const next = d.frags[i];
    if (next && next.off === off && next.data.length === data.length) {
      c.inc('ipv4.frag_duplicate');
      return null;
    }
    if ((prev && prev.off + prev.data.length > off) || (next && next.off < end)) {
      c.inc('ipv4.drop.frag_overlap');
      this.discard(d);
      return null;
    }
    if (!more) {
      if (d.total >= 0 && d.total !== end) {
        c.inc('ipv4.drop.frag_overlap');
        this.discard(d);
        return null;
      }
      d.total = end;
    }
    if (d.total >= 0 && end > d.total) {
      c.inc('ipv4.drop.frag_overlap');
      this.discard(d);
      return null;
    }
    d.frags.splice(i, 0, { off, data: data.slice() });
    d.bytes += data.length;
    this.bytes += data.length;
    if (off === 0) d.header = p.header.slice();

    if (d.header !== null && d.total >= 0 && d.header.length + d.total > IPV4_MAX_LEN) {
      // The first fragment's options make the whole too long for a total-length field.
      c.inc('ipv4.drop.frag_too_big');
      this.discard(d);
      return null;
    }
    if (d.total < 0 || d.header === null) {
      c.inc('ipv4.frag_held');
      return null;
    }
    // Complete when the fragments tile [0, total) without gaps.
    let at = 0;
    for (const f of d.frags) {
      if (f.off !== at) {
        c.inc('ipv4.frag_held');
        return null;
      }
      at += f.data.length;
    }
    if (at !== d.total) {
      c.inc('ipv4.frag_held');
      return null;
    }

    const hl = d.header.length;
    const out = new Uint8Array(hl + d.total);
    out.set(d.header, 0);
    for (const f of d.frags) out.set(f.data, hl + f.off);
    const tl = hl + d.total;
    out[2] = tl >> 8;
    out[3] = tl & 0xff;
    out[6] &= 0x40; // keep DF, clear MF and the offset
    out[7] = 0;
    out[10] = 0;
    out[11] = 0;
    const sum = checksum(out, 0, hl);
    out[10] = sum >> 8;
    out[11] = sum & 0xff;
    this.discard(d);
    c.inc('ipv4.reassembled');
    return out;
  }

  private expire(d: Datagram): void {
    if (this.table.get(d.key) !== d) return;
    this.o.counters.inc('ipv4.drop.frag_timeout');
    this.discard(d);
  }

  private discard(d: Datagram): void {
    d.timer.cancel();
    if (this.table.get(d.key) === d) this.table.delete(d.key);
    this.bytes -= d.bytes;
    d.bytes = 0;
    d.frags = [];
  }

  clear(): void {
    for (const d of [...this.table.values()]) this.discard(d);
  }
}
