/** Round-trip statistics for the TCP_RR benchmark, in microseconds. */
export interface RrStats {
  count: number;
  meanUs: number;
  medianUs: number;
  p99Us: number;
  minUs: number;
  /**
   * CPU time the stack's own process spent per round trip (warm-up included), from
   * /proc/PID/task/TID/schedstat around the whole client run; absent for veth (no process).
   * Less sensitive than wall time to other load on the machine.
   */
  stackCpuUs?: number;
  /** Median of the warm-up round trips (not counted in the others). */
  warmupMedianUs?: number;
  /** Interleaved runs (bench/run.ts): the median of each round, in run order. */
  roundMediansUs?: number[];
}

export function summarize(samplesUs: ArrayLike<number>): RrStats {
  const s = Float64Array.from(samplesUs).sort();
  const n = s.length;
  if (n === 0) return { count: 0, meanUs: NaN, medianUs: NaN, p99Us: NaN, minUs: NaN };
  let sum = 0;
  for (let i = 0; i < n; i++) sum += s[i];
  const median = n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  return { count: n, meanUs: sum / n, medianUs: median, p99Us: s[Math.min(n - 1, Math.ceil(n * 0.99) - 1)], minUs: s[0] };
}
