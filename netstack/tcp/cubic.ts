/**
 * CUBIC congestion control (RFC 9438), in bytes with the curve computed in segments.
 *
 * W_cubic(t) = C (t - K)^3 + W_max, K = cbrt(W_max (1 - beta) / C), with C = 0.4 and
 * beta = 0.7 (§4.2, §4.6), fast convergence (§4.7), and the Reno-friendly estimate W_est
 * (§4.3) so CUBIC is never slower than Reno on short-RTT paths (which a local guest is: the
 * Reno-friendly region is where most of tender's connections live).
 */
import { type CongestionControl, initialWindow } from './congestion.js';

const C = 0.4;
const BETA = 0.7;
/** §4.3: alpha_cubic = 3 (1 - beta) / (1 + beta). */
const ALPHA = (3 * (1 - BETA)) / (1 + BETA);

export class Cubic implements CongestionControl {
  readonly name = 'cubic';
  cwnd: number;
  ssthresh = Number.MAX_SAFE_INTEGER;
  /** Window (segments) before the last reduction; 0 until the first loss. */
  private wMax = 0;
  /** Start of the current congestion-avoidance epoch (ms), or -1. */
  private epoch = -1;
  private k = 0;
  /** Reno-friendly window estimate, segments. */
  private wEst = 0;
  /** Fractional segment growth carried between ACKs. */
  private acc = 0;

  constructor(private readonly mss: number) {
    this.cwnd = initialWindow(mss);
  }

  onAck(acked: number, now: number, rtt: number): void {
    if (this.cwnd < this.ssthresh) {
      this.cwnd += acked; // slow start (§4.10)
      return;
    }
    const mss = this.mss;
    const cwndSeg = this.cwnd / mss;
    if (this.epoch < 0) {
      this.epoch = now;
      if (this.wMax <= cwndSeg) {
        // No reduction yet (or we are already above the old maximum): start at the plateau.
        this.wMax = cwndSeg;
        this.k = 0;
      } else {
        this.k = Math.cbrt((this.wMax - cwndSeg) / C);
      }
      this.wEst = cwndSeg;
    }
    const t = (now - this.epoch) / 1000;
    const rttS = rtt / 1000;
    const ackedSeg = acked / mss;
    // §4.3: W_est grows by alpha_cubic segments per cwnd acknowledged.
    this.wEst += (ALPHA * ackedSeg) / cwndSeg;
    // §4.4: target is W_cubic one RTT ahead, clamped to [cwnd, 1.5 cwnd].
    const d = t + rttS - this.k;
    let target = C * d * d * d + this.wMax;
    target = Math.min(Math.max(target, cwndSeg), 1.5 * cwndSeg);
    let grow: number;
    if (this.wEst > target) {
      grow = this.wEst - cwndSeg; // Reno-friendly region (§4.3)
    } else {
      grow = ((target - cwndSeg) / cwndSeg) * ackedSeg; // concave / convex (§4.4, §4.5)
    }
    if (grow > 0) {
      this.acc += grow * mss;
      const whole = Math.floor(this.acc);
      this.cwnd += whole;
      this.acc -= whole;
    }
  }

  onLoss(flight: number, _now: number): void {
    const cwndSeg = Math.max(this.cwnd, flight) / this.mss;
    // §4.7 fast convergence: release bandwidth to newer flows when the plateau keeps dropping.
    this.wMax = cwndSeg < this.wMax ? (cwndSeg * (1 + BETA)) / 2 : cwndSeg;
    this.ssthresh = Math.max(Math.floor(cwndSeg * BETA * this.mss), 2 * this.mss);
    this.cwnd = this.ssthresh;
    this.epoch = -1;
    this.acc = 0;
  }

  onTimeout(flight: number, now: number): void {
    this.onLoss(flight, now);
    this.cwnd = this.mss; // §4.8: cwnd restarts from one segment after an RTO
  }
}
