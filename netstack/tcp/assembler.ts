/**
 * Out-of-order bookkeeping for the receive side: which byte ranges beyond rcv.nxt are
 * already held in the receive ring. The bytes themselves sit in the ring at their offset
 * (so reassembly costs no extra memory beyond the receive buffer); this only tracks ranges.
 *
 * Ranges are offsets relative to rcv.nxt, sorted, disjoint and non-adjacent. Their number is
 * capped (`maxRanges`, i.e. holes): a flood of tiny scattered segments cannot make the list
 * grow without bound; a segment that would need one more range is refused and the caller
 * counts the drop (the peer retransmits it later).
 *
 * For SACK generation (RFC 2018 §4) it remembers which range received the latest segment, so
 * that range is reported first.
 */
export class Assembler {
  /** Flat [start0, end0, start1, end1, ...]. */
  private r: number[] = [];
  /** Start offset of the range that got the most recent segment, or -1. */
  private recentStart = -1;

  constructor(readonly maxRanges: number) {}

  get isEmpty(): boolean {
    return this.r.length === 0;
  }

  get rangeCount(): number {
    return this.r.length >> 1;
  }

  /** End offset of the furthest range (0 when empty). */
  get extent(): number {
    return this.r.length ? this.r[this.r.length - 1]! : 0;
  }

  /** Record [start, end) as present. False (nothing changed) if it would exceed maxRanges. */
  add(start: number, end: number): boolean {
    if (end <= start) return true;
    const r = this.r;
    // First range whose end >= start (can merge or lies after).
    let i = 0;
    while (i < r.length && r[i + 1]! < start) i += 2;
    // Ranges [i, j) overlap or touch [start, end).
    let j = i;
    while (j < r.length && r[j]! <= end) j += 2;
    if (i === j) {
      if (r.length >= this.maxRanges * 2) return false;
      r.splice(i, 0, start, end);
    } else {
      const s = Math.min(start, r[i]!);
      const e = Math.max(end, r[j - 1]!);
      r.splice(i, j - i, s, e);
    }
    this.recentStart = r[i]!;
    return true;
  }

  /**
   * If a range starts at offset 0 (data just became contiguous with rcv.nxt), remove it and
   * return its length; shift the others down by it. Returns 0 otherwise.
   */
  popFront(): number {
    const r = this.r;
    if (r.length === 0 || r[0] !== 0) return 0;
    const n = r[1]!;
    r.splice(0, 2);
    for (let k = 0; k < r.length; k++) r[k] = r[k]! - n;
    this.recentStart = this.recentStart === 0 ? -1 : this.recentStart - n;
    return n;
  }

  /**
   * Append up to `max` SACK blocks (absolute sequence numbers, rcv.nxt + offset) to `out`:
   * the range holding the most recent segment first, then the others from the highest down.
   */
  sackBlocks(rcvNxt: number, max: number, out: number[]): void {
    const r = this.r;
    let n = 0;
    let recentIdx = -1;
    for (let k = 0; k < r.length; k += 2) if (r[k] === this.recentStart) recentIdx = k;
    if (recentIdx >= 0) {
      out.push((rcvNxt + r[recentIdx]!) >>> 0, (rcvNxt + r[recentIdx + 1]!) >>> 0);
      n++;
    }
    for (let k = r.length - 2; k >= 0 && n < max; k -= 2) {
      if (k === recentIdx) continue;
      out.push((rcvNxt + r[k]!) >>> 0, (rcvNxt + r[k + 1]!) >>> 0);
      n++;
    }
  }

  clear(): void {
    this.r.length = 0;
    this.recentStart = -1;
  }

  /** Ranges as [start, end] pairs, for tests. */
  ranges(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let k = 0; k < this.r.length; k += 2) out.push([this.r[k]!, this.r[k + 1]!]);
    return out;
  }
}
