/**
 * Retransmission timeout (RFC 6298).
 *
 * Minimum RTO: 200 ms, as Linux (TCP_RTO_MIN), not the RFC's 1 s. tender's peers are a local
 * guest kernel (µs RTTs) and, through the NAT, host sockets; the guests are Linux and use
 * 200 ms themselves. RFC 6298 §2.4's 1 s floor would make every tail loss stall a connection
 * for a full second. The floor stays well above the delayed-ACK timer (40 ms here, 200 ms
 * max elsewhere), which is what the floor protects against (spurious retransmissions).
 *
 * Maximum RTO: 120 s (Linux TCP_RTO_MAX; RFC 6298 §2.5 allows a maximum of at least 60 s).
 */
export const RTO_MIN = 200;
export const RTO_MAX = 120_000;
/** RFC 6298 §2.1: initial RTO of 1 s. */
export const RTO_INITIAL = 1000;

export class RttEstimator {
  srtt = 0;
  rttvar = 0;
  /** The RTO without backoff. */
  private baseRto = RTO_INITIAL;
  /** Consecutive expirations (exponential backoff, §5.5). */
  backoff = 0;
  private sampled = false;

  constructor(private readonly minRto = RTO_MIN, private readonly maxRto = RTO_MAX) {}

  get hasSample(): boolean {
    return this.sampled;
  }

  /** Current RTO including backoff. */
  get rto(): number {
    // Read on every send (timer re-arm): skip `2 ** backoff` (a Math.pow call) in the usual case.
    if (this.backoff === 0) return Math.min(this.maxRto, this.baseRto);
    return Math.min(this.maxRto, this.baseRto * 2 ** this.backoff);
  }

  /**
   * One RTT measurement in ms (RFC 6298 §2.2/2.3; K = 4, alpha = 1/8, beta = 1/4). The caller
   * applies Karn's rule: no samples from retransmitted segments unless timestamps say which
   * transmission was acknowledged (RFC 7323 §4).
   */
  sample(rtt: number): void {
    if (rtt < 0) return;
    if (!this.sampled) {
      this.srtt = rtt;
      this.rttvar = rtt / 2;
      this.sampled = true;
    } else {
      this.rttvar = 0.75 * this.rttvar + 0.25 * Math.abs(this.srtt - rtt);
      this.srtt = 0.875 * this.srtt + 0.125 * rtt;
    }
    // G (clock granularity) is sub-millisecond here; 4*RTTVAR dominates.
    this.baseRto = Math.min(this.maxRto, Math.max(this.minRto, this.srtt + Math.max(1, 4 * this.rttvar)));
    // §5.7 note: a new sample after backoff collapses the backoff.
    this.backoff = 0;
  }

  /** The timer expired: double the RTO (§5.5). */
  onTimeout(): void {
    if (this.rto < this.maxRto) this.backoff++;
  }

  /** New data was acknowledged: stop backing off (the next sample recomputes anyway). */
  resetBackoff(): void {
    this.backoff = 0;
  }
}
