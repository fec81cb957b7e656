/**
 * The sender's SACK scoreboard (RFC 6675 §3): which ranges above snd.una the peer reported
 * as received. Absolute sequence numbers, sorted, merged; a bounded number of ranges (a peer
 * cannot make it grow: extra ranges are ignored, which only makes recovery more
 * conservative).
 *
 * Loss rule (RFC 6675 §4 IsLost): a hole is lost once more than (DupThresh - 1) * SMSS bytes
 * are SACKed above it. Holes are classified as a whole (every byte of one hole has the same
 * SACKed bytes above it).
 */
import { seqDiff, seqGe, seqGt, seqLe, seqLt, seqMax, seqMin } from './seq.js';

export const DUP_THRESH = 3;
const MAX_RANGES = 32;

export class Scoreboard {
  /** Flat [left0, right0, ...], absolute, ascending. */
  private r: number[] = [];
  /** Total SACKed bytes. */
  sacked = 0;

  get isEmpty(): boolean {
    return this.r.length === 0;
  }

  /** Highest SACKed sequence (right edge), or `una` when empty. */
  highest(una: number): number {
    return this.r.length ? this.r[this.r.length - 1]! : una;
  }

  /** Merge the peer's blocks; ignore blocks outside (una, sndMax] (D-SACK, stale or bogus). */
  update(blocks: readonly number[], una: number, sndMax: number): void {
    for (let b = 0; b + 1 < blocks.length; b += 2) {
      let l = blocks[b]!;
      const rr = blocks[b + 1]!;
      if (!seqLt(l, rr) || seqGt(rr, sndMax) || seqLe(rr, una)) continue;
      if (seqLt(l, una)) l = una;
      this.add(l, rr);
    }
  }

  private add(l: number, rr: number): void {
    const r = this.r;
    let i = 0;
    while (i < r.length && seqLt(r[i + 1]!, l)) i += 2;
    let j = i;
    while (j < r.length && seqLe(r[j]!, rr)) j += 2;
    if (i === j) {
      if (r.length >= MAX_RANGES * 2) return;
      r.splice(i, 0, l, rr);
    } else {
      r.splice(i, j - i, seqMin(l, r[i]!), seqMax(rr, r[j - 1]!));
    }
    this.recount();
  }

  /** snd.una advanced: forget everything below it. */
  advance(una: number): void {
    const r = this.r;
    let k = 0;
    while (k < r.length && seqLe(r[k + 1]!, una)) k += 2;
    if (k > 0) r.splice(0, k);
    if (r.length && seqLt(r[0]!, una)) r[0] = una;
    this.recount();
  }

  clear(): void {
    this.r.length = 0;
    this.sacked = 0;
  }

  private recount(): void {
    let s = 0;
    for (let k = 0; k < this.r.length; k += 2) s += seqDiff(this.r[k + 1]!, this.r[k]!);
    this.sacked = s;
  }

  isSacked(seq: number): boolean {
    for (let k = 0; k < this.r.length; k += 2) if (seqGe(seq, this.r[k]!) && seqLt(seq, this.r[k + 1]!)) return true;
    return false;
  }

  /** SACKed bytes above `seq`. */
  sackedAbove(seq: number): number {
    let s = 0;
    for (let k = this.r.length - 2; k >= 0; k -= 2) {
      if (seqLe(this.r[k + 1]!, seq)) break;
      s += seqDiff(this.r[k + 1]!, seqMax(this.r[k]!, seq));
    }
    return s;
  }

  isLost(seq: number, mss: number): boolean {
    return this.sackedAbove(seq) > (DUP_THRESH - 1) * mss;
  }

  /**
   * RFC 6675 NextSeg rule (1): the first byte >= `from` that is in a hole deemed lost, and
   * how many bytes of that hole follow it. Returns -1 when there is none.
   */
  nextLost(from: number, una: number, mss: number, out: { len: number }): number {
    let holeStart = una;
    for (let k = 0; k < this.r.length; k += 2) {
      const holeEnd = this.r[k]!;
      const s = seqMax(holeStart, from);
      if (seqLt(s, holeEnd) && this.isLost(s, mss)) {
        out.len = seqDiff(holeEnd, s);
        return s;
      }
      holeStart = this.r[k + 1]!;
    }
    return -1;
  }

  /**
   * RFC 6675 SetPipe: bytes believed in flight between una and sndMax — not SACKed, and
   * either not lost or already retransmitted (below highRxt).
   */
  pipe(una: number, sndMax: number, highRxt: number, mss: number): number {
    let p = 0;
    let holeStart = una;
    const n = this.r.length;
    for (let k = 0; k <= n; k += 2) {
      const holeEnd = k < n ? this.r[k]! : sndMax;
      if (seqLt(holeStart, holeEnd)) {
        const lost = k < n && this.isLost(holeStart, mss);
        if (!lost) p += seqDiff(holeEnd, holeStart);
        else if (seqGt(highRxt, holeStart)) p += seqDiff(seqMin(highRxt, holeEnd), holeStart);
      }
      if (k < n) holeStart = this.r[k + 1]!;
    }
    return p;
  }

  ranges(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let k = 0; k < this.r.length; k += 2) out.push([this.r[k]!, this.r[k + 1]!]);
    return out;
  }
}
