/**
 * Named counters. Every dropped packet increments exactly one counter naming the layer and
 * the reason (`ipv4.drop.bad_checksum`), so "why was this packet dropped" always has an
 * answer; the API exposes `snapshot()`.
 *
 * Names are dotted: `<layer>.<what>[.<reason>]`. Drops use `<layer>.drop.<reason>`.
 */
export class Counters {
  private readonly values = new Map<string, number>();

  inc(name: string, n = 1): void {
    this.values.set(name, (this.values.get(name) ?? 0) + n);
  }

  get(name: string): number {
    return this.values.get(name) ?? 0;
  }

  /** Sum of every counter under a prefix (e.g. all drops: `drop` matches `*.drop.*`). */
  sum(filter: (name: string) => boolean): number {
    let s = 0;
    for (const [k, v] of this.values) if (filter(k)) s += v;
    return s;
  }

  /** Total of all `*.drop.*` counters. */
  drops(): number {
    return this.sum((k) => k.includes('.drop.'));
  }

  snapshot(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const k of [...this.values.keys()].sort()) out[k] = this.values.get(k)!;
    return out;
  }
}
