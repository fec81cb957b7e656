/**
 * Timer expiry. Each connection has one main timer whose meaning is `timerKind` (see
 * updateTimer in output.ts) and one delayed-ACK timer. Both are `Timer`s of the injected
 * clock, re-armed, never allocated per segment.
 */
import type { TcpConnection } from './connection.js';
import { TcpFlag } from '../wire/tcp.js';
import { acceptableSeq, output, retransmitFirst, sendSyn, sendSynAck, transmit, updateTimer } from './output.js';
import { seqAdd, seqDiff, seqGt } from './seq.js';
import { TcpState } from './state.js';

const { ACK, RST } = TcpFlag;

export enum TimerKind {
  NONE = 0,
  RTX = 1,
  PERSIST = 2,
  KEEPALIVE = 3,
  FIN_WAIT_2 = 4,
  TIME_WAIT = 5,
}

export function onMainTimer(c: TcpConnection): void {
  switch (c.timerKind) {
    case TimerKind.RTX:
      onRetransmitTimeout(c);
      break;
    case TimerKind.PERSIST:
      onPersist(c);
      break;
    case TimerKind.KEEPALIVE:
      onKeepalive(c);
      break;
    case TimerKind.FIN_WAIT_2:
      onFinWait2(c);
      break;
    case TimerKind.TIME_WAIT:
      c.ctx.counters.inc('tcp.timewait.expired');
      c.closeNow(null);
      break;
    default:
      break;
  }
  c.emitPending(true);
}

export function onDelackTimer(c: TcpConnection): void {
  if (c.state === TcpState.CLOSED) return;
  c.ackNow = true;
  output(c);
}

/**
 * RFC 6298 §5.4-5.7: retransmit the earliest unacknowledged segment, back off the timer.
 * RFC 5681 §3.1: ssthresh from the flight size, cwnd to one segment. Data is resent
 * go-back-N from snd.una as the window reopens (the receiver's out-of-order queue makes
 * that cheap: duplicate bytes are ACKed, not stored twice). Too many expirations abort the
 * connection with ETIMEDOUT (SYN_SENT/SYN_RECEIVED use the smaller SYN retry budget).
 */
function onRetransmitTimeout(c: TcpConnection): void {
  const cfg = c.ctx.cfg;
  c.ctx.counters.inc('tcp.retransmit.timeouts');
  const syn = c.state === TcpState.SYN_SENT || c.state === TcpState.SYN_RECEIVED;
  c.rtxCount++;
  if (c.rtxCount > (syn ? cfg.synRetries : cfg.maxRetries)) {
    c.abort('ETIMEDOUT');
    return;
  }
  c.rtt.onTimeout();
  c.rttTime = -1; // Karn's rule: never time a retransmitted segment
  if (c.state === TcpState.SYN_SENT) {
    sendSyn(c);
  } else if (c.state === TcpState.SYN_RECEIVED) {
    sendSynAck(c);
  } else {
    const flight = seqDiff(c.sndMax, c.sndUna);
    c.cc.onTimeout(flight, c.ctx.clock.now());
    c.inRecovery = false;
    c.dupAcks = 0;
    c.recover = c.sndMax;
    // RFC 6675 §5.1: after an RTO the scoreboard is not trusted for retransmission.
    c.sb.clear();
    c.sndNxt = c.sndUna;
    c.timerKind = TimerKind.NONE;
    output(c);
    if (c.sndNxt === c.sndUna) retransmitFirst(c); // window closed: still probe with the first segment
  }
  c.timerKind = TimerKind.RTX;
  c.timer.arm(c.rtt.rto);
}

/**
 * Zero-window probe (RFC 9293 §3.8.6.1): one byte beyond the closed window, with backoff.
 * The byte does not advance sndNxt, so the connection stays in "persist" (not
 * "retransmit"): a receiver that keeps answering with a zero window is never timed out
 * (RFC 9293 §3.8.6.1 / RFC 1122 4.2.2.17); one that stops answering is, after maxRetries.
 */
function onPersist(c: TcpConnection): void {
  const off = seqDiff(c.sndNxt, c.sndUna);
  if (c.sndBuf.length - off <= 0 || c.state === TcpState.CLOSED) {
    updateTimer(c);
    return;
  }
  if (c.sndWnd > off) {
    // A window too small for sender SWS avoidance to use: the override timeout
    // (RFC 9293 §3.8.6.2.1) sends what fits (Linux tcp_write_wakeup does the same).
    const len = Math.min(c.sndWnd - off, c.sndBuf.length - off, c.mss);
    transmit(c, c.sndNxt, len, ACK);
    c.sndNxt = seqAdd(c.sndNxt, len);
    if (seqGt(c.sndNxt, c.sndMax)) c.sndMax = c.sndNxt;
    c.timerKind = TimerKind.NONE;
    updateTimer(c);
    return;
  }
  c.probes++;
  if (c.probes > c.ctx.cfg.maxRetries) {
    c.abort('ETIMEDOUT');
    return;
  }
  c.ctx.counters.inc('tcp.zero_window_probe');
  transmit(c, c.sndNxt, 1, ACK);
  const end = seqAdd(c.sndNxt, 1);
  if (seqGt(end, c.sndMax)) c.sndMax = end;
  c.rtt.onTimeout();
  c.timerKind = TimerKind.PERSIST;
  c.timer.arm(c.rtt.rto);
}

/**
 * Keepalive (RFC 9293 §3.8.4 / RFC 1122 4.2.3.6): after `idle` without anything received,
 * send <SEQ=SND.UNA-1> with no data (the peer must ACK it), every interval, up to `probes`
 * times, then abort with ETIMEDOUT. Any segment received resets the count (input.ts).
 */
function onKeepalive(c: TcpConnection): void {
  const ka = c.ctx.cfg.keepalive ?? { idleMs: c.keepaliveIdle, intervalMs: 75_000, probes: 9 };
  const now = c.ctx.clock.now();
  if (c.probes === 0 && now - c.lastRecvTime < c.keepaliveIdle) {
    c.timer.armAt(c.lastRecvTime + c.keepaliveIdle);
    return;
  }
  if (c.probes >= ka.probes) {
    c.abort('ETIMEDOUT');
    return;
  }
  c.probes++;
  c.ctx.counters.inc('tcp.keepalive.probes');
  transmit(c, seqAdd(c.sndUna, -1), 0, ACK);
  c.timer.arm(ka.intervalMs);
}

/** FIN_WAIT_2 idle (Linux tcp_fin_timeout): the peer never sent its FIN. */
function onFinWait2(c: TcpConnection): void {
  const now = c.ctx.clock.now();
  const at = c.lastRecvTime + c.ctx.cfg.finWait2Ms;
  if (now < at) {
    c.timer.armAt(at);
    return;
  }
  c.ctx.counters.inc('tcp.finwait2.timeout');
  // Linux answers a late segment with RST once the socket is gone; say so now.
  transmit(c, acceptableSeq(c), 0, ACK | RST);
  c.closeNow(null);
}

