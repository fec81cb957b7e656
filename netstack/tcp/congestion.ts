/**
 * Congestion control interface and NewReno (RFC 5681). The controller only decides cwnd and
 * ssthresh; loss detection and recovery (which segments to resend, fast recovery's cwnd
 * inflation, RFC 6675's pipe) live in the connection's send path.
 *
 * Units are bytes; `mss` is the sender's effective segment size.
 */
export interface CongestionControl {
  readonly name: string;
  cwnd: number;
  ssthresh: number;
  /** Bytes newly acknowledged outside recovery. `rtt` is the smoothed RTT in ms (0 if unknown). */
  onAck(acked: number, now: number, rtt: number): void;
  /** Loss detected by duplicate ACKs or SACK: set ssthresh (and cwnd) for fast recovery. */
  onLoss(flight: number, now: number): void;
  /** Retransmission timeout (RFC 5681 §3.1 eq. 4: ssthresh from flight, cwnd = 1 segment). */
  onTimeout(flight: number, now: number): void;
}

/** RFC 5681 §3.1 / RFC 6928: initial window of 10 segments (Linux's default). */
export function initialWindow(mss: number): number {
  return 10 * mss;
}

export class NewReno implements CongestionControl {
  readonly name = 'newreno';
  cwnd: number;
  ssthresh = Number.MAX_SAFE_INTEGER;
  /** Bytes acknowledged towards the next +1 MSS in congestion avoidance. */
  private acc = 0;

  constructor(private readonly mss: number) {
    this.cwnd = initialWindow(mss);
  }

  onAck(acked: number): void {
    if (this.cwnd < this.ssthresh) {
      // Slow start with appropriate byte counting (RFC 3465); the ACK batching of the stack
      // acknowledges many segments at once, so limit growth per ACK to what was acked.
      this.cwnd += acked;
      return;
    }
    // Congestion avoidance: +1 MSS per cwnd of data acknowledged (RFC 5681 §3.1, eq. 3 variant).
    this.acc += acked;
    if (this.acc >= this.cwnd) {
      this.acc -= this.cwnd;
      this.cwnd += this.mss;
    }
  }

  onLoss(flight: number): void {
    this.ssthresh = Math.max(Math.floor(flight / 2), 2 * this.mss);
    this.cwnd = this.ssthresh;
    this.acc = 0;
  }

  onTimeout(flight: number): void {
    this.ssthresh = Math.max(Math.floor(flight / 2), 2 * this.mss);
    this.cwnd = this.mss;
    this.acc = 0;
  }
}
