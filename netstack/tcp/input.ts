/**
 * Segment arrival for an existing connection: RFC 9293 §3.10.7.3 (SYN-SENT) and §3.10.7.4
 * (every other state), in the RFC's order — PAWS, sequence check, RST, SYN, ACK, data, FIN —
 * with RFC 5961's stricter RST/SYN/ACK checks, RFC 7323 timestamps, SACK processing and
 * loss detection (RFC 5681 dupacks, RFC 6582 NewReno, RFC 6675 SACK recovery).
 *
 * Nothing is sent from here except RSTs, challenge ACKs and fast retransmissions; ordinary
 * ACKs and new data go out at flush() (output.ts), so one batch of segments yields one ACK.
 */
import { TcpFlag, type TcpRepr } from '../wire/tcp.js';
import { Ev, type TcpConnection } from './connection.js';
import { TcpError } from './errors.js';
import { SCALE, challengeAck, retransmitFirst, sendAck, sendRst, updateTimer, tsNow } from './output.js';
import { DUP_THRESH } from './scoreboard.js';
import { seqAdd, seqDiff, seqGe, seqGt, seqLe, seqLt } from './seq.js';
import { canReceive, TcpState } from './state.js';
import { TimerKind } from './timers.js';

const { FIN, SYN, RST, ACK } = TcpFlag;

export function segmentArrives(c: TcpConnection, s: TcpRepr, payload: Uint8Array): void {
  const counters = c.ctx.counters;
  if (c.state === TcpState.SYN_SENT) {
    synSent(c, s);
    return;
  }
  if (c.state === TcpState.CLOSED) return;
  const f = s.flags;
  const now = c.ctx.clock.now();

  // RFC 7323 §5.3 PAWS: a timestamp older than TS.Recent marks an old duplicate.
  // (The 24-day idle exception of §5.5 is not needed: tsRecent is refreshed by keepalive or
  // the connection is gone long before.)
  if (c.tsOk && s.tsPresent && !(f & RST) && seqLt(s.tsval, c.tsRecent)) {
    counters.inc('tcp.drop.paws');
    c.ackNow = true;
    c.markDirty();
    return;
  }

  if (c.state === TcpState.SYN_RECEIVED && f & SYN && s.seq === c.irs) {
    if (!(f & ACK)) {
      // A retransmitted SYN: our SYN-ACK was lost. Answer it again.
      c.ackNow = true;
      c.markDirty();
      return;
    }
    // Simultaneous open (§3.5 figure 8, lines 5-6): the peer's SYN-ACK repeats the SYN we
    // already have; what matters is its ACK. Consume the SYN and process the rest.
    s.flags &= ~SYN;
    s.seq = seqAdd(s.seq, 1);
    segmentArrives(c, s, payload);
    return;
  }

  // First: sequence acceptability (RFC 9293 §3.10.7.4, the four cases).
  const segLen = payload.length + (f & SYN ? 1 : 0) + (f & FIN ? 1 : 0);
  const wnd = Math.max(0, seqDiff(c.rcvAdvRight, c.rcvNxt));
  let ok: boolean;
  if (segLen === 0) {
    ok = wnd === 0 ? s.seq === c.rcvNxt : inWindow(s.seq, c.rcvNxt, wnd);
  } else if (wnd === 0) {
    // Linux (tcp_data_queue) accepts a bare FIN at rcv.nxt into a zero window: senders
    // do send them, and refusing would stall the close.
    ok = payload.length === 0 && (f & FIN) !== 0 && s.seq === c.rcvNxt;
  } else {
    ok = inWindow(s.seq, c.rcvNxt, wnd) || inWindow(seqAdd(s.seq, segLen - 1), c.rcvNxt, wnd);
  }
  if (!ok) {
    counters.inc('tcp.drop.out_of_window');
    if (f & RST) return; // §3.10.7.4: an unacceptable RST is dropped silently
    if (c.state === TcpState.TIME_WAIT && f & FIN) {
      // Retransmitted FIN: our last ACK was lost. ACK again and restart 2MSL (§3.10.7.4).
      c.timer.arm(c.ctx.cfg.timeWaitMs);
    }
    // §3.10.7.4: an unacceptable segment is answered with an ACK (an old duplicate means
    // our ACK was lost). ackNow coalesces a burst of them into one ACK per flush().
    c.ackNow = true;
    c.markDirty();
    return;
  }
  // A valid segment: it proves the peer alive.
  c.lastRecvTime = now;
  // Answered probes (zero-window or keepalive) never count towards an abort.
  c.probes = 0;
  if (c.tsOk && s.tsPresent && seqLe(s.seq, c.lastAckSent)) c.tsRecent = s.tsval; // RFC 7323 §4.3

  // Second: RST (RFC 5961 §3.2): only an exact match resets; in-window gets a challenge ACK.
  if (f & RST) {
    if (s.seq !== c.rcvNxt) {
      counters.inc('tcp.drop.rst_invalid');
      challengeAck(c);
      return;
    }
    counters.inc('tcp.rst.received');
    switch (c.state) {
      case TcpState.SYN_RECEIVED:
        c.closeNow(new TcpError(c.active ? 'ECONNREFUSED' : 'ECONNRESET'));
        return;
      case TcpState.CLOSING:
      case TcpState.LAST_ACK:
      case TcpState.TIME_WAIT:
        c.closeNow(null);
        return;
      default:
        c.closeNow(new TcpError('ECONNRESET'));
        return;
    }
  }

  // Fourth: SYN in a synchronized state (RFC 5961 §4.2): challenge ACK, never a reset.
  if (f & SYN) {
    counters.inc('tcp.drop.syn_in_window');
    challengeAck(c);
    return;
  }

  // Fifth: ACK.
  if (!(f & ACK)) {
    counters.inc('tcp.drop.no_ack');
    return;
  }
  if (c.state === TcpState.SYN_RECEIVED) {
    if (!(seqLt(c.sndUna, s.ack) && seqLe(s.ack, c.sndMax))) {
      counters.inc('tcp.drop.bad_ack');
      sendRst(c, s.ack, false);
      return;
    }
    // Our SYN is acknowledged.
    if (c.rtxCount === 0) c.rtt.sample(now - c.synTime);
    c.sndUna = seqAdd(c.iss, 1);
    c.sndWnd = s.window * SCALE[c.sndWscale]!;
    c.maxSndWnd = c.sndWnd;
    c.sndWl1 = s.seq;
    c.sndWl2 = s.ack;
    c.establish();
    c.timer.cancel();
    c.timerKind = TimerKind.NONE;
  }
  if (!processAck(c, s, payload.length, now)) return;

  switch (c.state) {
    case TcpState.FIN_WAIT_1:
      if (c.finAcked) {
        c.state = TcpState.FIN_WAIT_2;
        c.timerKind = TimerKind.NONE;
      }
      break;
    case TcpState.CLOSING:
      if (c.finAcked) c.enterTimeWait();
      break;
    case TcpState.LAST_ACK:
      if (c.finAcked) {
        c.closeNow(null);
        return;
      }
      break;
    default:
      break;
  }

  // Seventh: segment text.
  if (payload.length > 0) {
    if (canReceive(c.state)) receiveData(c, s.seq, payload);
    else counters.inc('tcp.drop.data_after_fin');
  }

  // Eighth: FIN (possibly ahead of a hole: remembered until the data before it arrives).
  if (f & FIN && !c.finReceived) {
    c.hasRcvFin = true;
    c.rcvFinSeq = seqAdd(s.seq, payload.length);
    if (seqGt(c.rcvFinSeq, c.rcvNxt)) c.ackNow = true; // FIN beyond a hole: dupack now
  }
  if (c.hasRcvFin && !c.finReceived && c.rcvNxt === c.rcvFinSeq) processFin(c);
  c.markDirty();
}

function inWindow(seq: number, start: number, wnd: number): boolean {
  const d = seqDiff(seq, start);
  return d >= 0 && d < wnd;
}

/** RFC 9293 §3.10.7.3. */
function synSent(c: TcpConnection, s: TcpRepr): void {
  const f = s.flags;
  const counters = c.ctx.counters;
  if (f & ACK && (seqLe(s.ack, c.iss) || seqGt(s.ack, c.sndMax))) {
    counters.inc('tcp.drop.bad_ack');
    if (!(f & RST)) sendRst(c, s.ack, false);
    return;
  }
  if (f & RST) {
    if (f & ACK) {
      counters.inc('tcp.rst.received');
      c.closeNow(new TcpError('ECONNREFUSED'));
    } else {
      counters.inc('tcp.drop.rst_invalid');
    }
    return;
  }
  if (!(f & SYN)) {
    counters.inc('tcp.drop.no_syn');
    return;
  }
  c.irs = s.seq;
  c.rcvNxt = seqAdd(s.seq, 1);
  negotiate(c, s);
  c.lastRecvTime = c.ctx.clock.now();
  if (f & ACK) {
    if (c.rtxCount === 0) c.rtt.sample(c.ctx.clock.now() - c.synTime);
    c.sndUna = s.ack;
    if (seqLt(c.sndNxt, c.sndUna)) c.sndNxt = c.sndUna;
    c.sndWnd = s.window; // RFC 7323 §2.2: the window of a SYN is never scaled
    c.maxSndWnd = c.sndWnd;
    c.sndWl1 = s.seq;
    c.sndWl2 = s.ack;
    c.establish();
    c.timer.cancel();
    c.timerKind = TimerKind.NONE;
    c.ackNow = true;
  } else {
    // Simultaneous open (§3.5 figure 8): SYN_RECEIVED, answer with SYN-ACK (same ISS).
    counters.inc('tcp.simultaneous_open');
    c.state = TcpState.SYN_RECEIVED;
    c.sndWnd = s.window;
    c.sndWl1 = s.seq;
    c.ackNow = true;
  }
  c.markDirty();
}

/**
 * Adopt the options of the peer's SYN (we always offered all of them in ours, subject to
 * configuration). RFC 7323 §1.3/§2.2: window scaling only if both sides sent the option.
 */
export function negotiate(c: TcpConnection, s: TcpRepr): void {
  const cfg = c.ctx.cfg;
  const wsOk = cfg.windowScaling && s.wscale >= 0;
  c.sndWscale = wsOk ? s.wscale : 0;
  c.sackOk = cfg.sack && s.sackPermitted;
  c.tsOk = cfg.timestamps && s.tsPresent;
  if (c.tsOk) c.tsRecent = s.tsval;
  // RFC 9293 §3.7.1: 536 when the peer sent no MSS option.
  const peerMss = s.mss > 0 ? s.mss : 536;
  const ourMax = c.ctx.ip.mtuTo(c.remoteIp) - 40;
  c.mss = Math.max(64, Math.min(peerMss, ourMax) - (c.tsOk ? 12 : 0));
  c.setupReceive(wsOk);
  c.rcvAdvRight = seqAdd(c.rcvNxt, Math.min(65535, c.rcvCap));
}

/**
 * ACK processing for synchronized states. Returns false if the segment must be dropped.
 */
function processAck(c: TcpConnection, s: TcpRepr, plen: number, now: number): boolean {
  const ack = s.ack;
  const counters = c.ctx.counters;
  if (seqGt(ack, c.sndMax)) {
    // §3.10.7.4: ACK of something not yet sent: ACK back and drop.
    counters.inc('tcp.drop.bad_ack');
    c.ackNow = true;
    c.markDirty();
    return false;
  }
  // RFC 5961 §5.2: an ACK older than what the peer could have seen is suspect.
  if (seqLt(ack, seqAdd(c.sndUna, -Math.max(c.maxSndWnd, 1)))) {
    counters.inc('tcp.drop.bad_ack');
    challengeAck(c);
    return false;
  }
  const wnd = s.window * SCALE[c.sndWscale]!;
  if (c.sackOk && s.sackBlocks.length > 0) c.sb.update(s.sackBlocks, c.sndUna, c.sndMax);

  if (seqGt(ack, c.sndUna)) {
    newAck(c, s, ack, now);
  } else if (ack === c.sndUna && plen === 0 && !(s.flags & (SYN | FIN)) && wnd === c.sndWnd && c.sndMax !== c.sndUna) {
    dupAck(c);
  }
  // Window update (§3.10.7.4: SND.WL1 / SND.WL2 prevent old segments from updating it).
  if (seqLt(c.sndWl1, s.seq) || (c.sndWl1 === s.seq && seqLe(c.sndWl2, ack))) {
    c.sndWnd = wnd;
    c.sndWl1 = s.seq;
    c.sndWl2 = ack;
    if (wnd > c.maxSndWnd) c.maxSndWnd = wnd;
    if (wnd > 0 && c.timerKind === TimerKind.PERSIST) {
      c.probes = 0;
      c.rtt.resetBackoff();
      c.timerKind = TimerKind.NONE; // output() will send, or re-arm
    }
  }
  // RFC 6675 §5: SACK information alone may reveal the first segment as lost.
  if (c.sackOk && !c.inRecovery && !c.sb.isEmpty && seqGt(c.sndUna, c.recover) && c.sb.isLost(c.sndUna, c.mss)) {
    enterRecovery(c, now);
  }
  return true;
}

function newAck(c: TcpConnection, s: TcpRepr, ack: number, now: number): void {
  const acked = seqDiff(ack, c.sndUna);
  const dataAcked = Math.min(acked, c.sndBuf.length);
  const flightBefore = seqDiff(c.sndNxt, c.sndUna);
  c.sndBuf.consume(dataAcked);
  c.bytesOut += dataAcked;
  if (acked > dataAcked && c.finQueued) c.finAcked = true;
  c.sndUna = ack;
  if (seqLt(c.sndNxt, c.sndUna)) c.sndNxt = c.sndUna;
  c.sb.advance(ack);

  // RTT (RFC 7323 §4 RTTM with timestamps; else one timed segment, Karn's rule).
  if (c.tsOk && s.tsPresent && s.tsecr !== 0) {
    c.rtt.sample(seqDiff(tsNow(c), s.tsecr));
  } else if (c.rttTime >= 0 && seqGe(ack, c.rttSeq)) {
    c.rtt.sample(now - c.rttTime);
    c.rttTime = -1;
  }
  c.rtt.resetBackoff();
  c.rtxCount = 0;

  if (c.inRecovery) {
    if (seqGe(ack, c.recover)) {
      // Full ACK: leave recovery (RFC 6582 §3.2 step 3 / RFC 6675 §5 (A)).
      c.inRecovery = false;
      c.dupAcks = 0;
      if (!c.sackOk) {
        const flight = seqDiff(c.sndMax, c.sndUna);
        c.cc.cwnd = Math.min(c.cc.ssthresh, Math.max(flight, c.mss) + c.mss);
      } else {
        c.cc.cwnd = c.cc.ssthresh;
      }
    } else if (!c.sackOk) {
      // NewReno partial ACK (RFC 6582 §3.2 step 4): resend the next hole, deflate.
      retransmitFirst(c);
      c.cc.cwnd = Math.max(c.cc.cwnd - dataAcked, 0) + c.mss;
    } else if (seqLt(c.highRxt, c.sndUna)) {
      c.highRxt = c.sndUna;
    }
  } else {
    c.dupAcks = 0;
    // Grow cwnd only when it was the limit (Linux tcp_is_cwnd_limited): an application-
    // limited sender must not inflate it.
    if (flightBefore * 2 >= c.cc.cwnd || c.cc.cwnd < c.cc.ssthresh && flightBefore + c.mss * 2 >= c.cc.cwnd / 2) {
      c.cc.onAck(dataAcked, now, c.rtt.srtt);
    }
  }
  // RFC 6298 §5.3: restart the timer on new data acknowledged.
  if (seqGt(c.sndNxt, c.sndUna)) {
    c.timerKind = TimerKind.RTX;
    c.timer.arm(c.rtt.rto);
  } else if (c.timerKind === TimerKind.RTX) {
    c.timerKind = TimerKind.NONE;
    c.timer.cancel();
    updateTimer(c);
  }
  if (c.needDrain && c.sndBuf.length <= c.ctx.cfg.sndBuf / 2) c.pending |= Ev.DRAIN;
}

/** RFC 5681 §3.2 duplicate ACK. */
function dupAck(c: TcpConnection): void {
  c.dupAcks++;
  c.ctx.counters.inc('tcp.dupacks');
  if (!c.inRecovery) {
    // RFC 6582 §3.2 step 2: no new recovery for dupacks of data sent before the last one ended.
    if (c.dupAcks === DUP_THRESH && seqGt(c.sndUna, c.recover)) enterRecovery(c, c.ctx.clock.now());
  } else if (!c.sackOk) {
    c.cc.cwnd += c.mss; // NewReno: each dupack means a segment left the network
  }
}

/** Fast retransmit and the start of fast recovery. */
function enterRecovery(c: TcpConnection, now: number): void {
  c.ctx.counters.inc('tcp.fast_retransmit');
  c.inRecovery = true;
  c.recover = c.sndMax;
  const flight = seqDiff(c.sndMax, c.sndUna);
  c.cc.onLoss(flight, now);
  c.highRxt = c.sndUna;
  retransmitFirst(c);
  if (!c.sackOk) c.cc.cwnd = c.cc.ssthresh + DUP_THRESH * c.mss; // RFC 6582 §3.2 step 3
  c.timerKind = TimerKind.RTX;
  c.timer.arm(c.rtt.rto);
}

/**
 * In-window data: in-order bytes are appended to the receive ring; out-of-order bytes are
 * written at their offset and recorded in the Assembler (bounded: beyond `maxOooRanges`
 * holes the segment is dropped and counted). Bytes before rcv.nxt (overlap with what we
 * have) and beyond the advertised window are trimmed.
 */
function receiveData(c: TcpConnection, seq: number, payload: Uint8Array): void {
  let start = seqDiff(seq, c.rcvNxt);
  let data = payload;
  if (start < 0) {
    data = data.subarray(-start);
    start = 0;
  }
  const limit = seqDiff(c.rcvAdvRight, c.rcvNxt);
  if (start + data.length > limit) {
    c.ctx.counters.inc('tcp.rx.trimmed_beyond_window');
    data = data.subarray(0, Math.max(0, limit - start));
  }
  if (data.length === 0) {
    c.ackNow = true; // duplicate data: ACK at once (RFC 5681 §4.2)
    return;
  }
  const ring = c.rcvRing;
  const base = ring.length;
  if (start === 0 && base === 0 && c.asm.isEmpty && c.directSink !== null && !c.paused) {
    // In order with nothing queued before it: straight to the application's sink (the host
    // socket of a bridged connection), skipping the copy into the ring, the copy out of it and
    // the buffer allocated for 'data' (per 64 KiB super-segment on an upload). What the sink
    // does not take goes into the ring as usual, behind it.
    const took = c.directSink(data);
    if (took > 0) {
      c.rcvNxt = seqAdd(c.rcvNxt, took);
      c.bytesIn += took;
      c.ackBytes += took;
      data = data.subarray(took);
      if (data.length === 0) {
        ackPolicy(c);
        return;
      }
    }
  }
  if (!ring.ensure(base + start + data.length)) {
    c.ctx.counters.inc('tcp.drop.rcvbuf_full');
    c.ackNow = true;
    return;
  }
  let advanced: number;
  if (start === 0 && c.asm.isEmpty) {
    ring.writeAt(base, data);
    advanced = data.length;
  } else {
    if (!c.asm.add(start, start + data.length)) {
      c.ctx.counters.inc('tcp.drop.ooo_holes');
      c.ackNow = true;
      return;
    }
    ring.writeAt(base + start, data);
    advanced = c.asm.popFront();
    // Out-of-order arrival or a filled gap: ACK at once (RFC 5681 §4.2). An out-of-order
    // segment gets its own duplicate ACK right now, not one per batch: without SACK the
    // sender counts dupacks to detect the loss (and with SACK each carries fresher blocks).
    c.ackNow = true;
    if (advanced === 0) {
      c.ctx.counters.inc('tcp.rx.out_of_order');
      sendAck(c);
    }
  }
  if (advanced > 0) {
    ring.length += advanced;
    c.rcvNxt = seqAdd(c.rcvNxt, advanced);
    c.bytesIn += advanced;
    c.ackBytes += advanced;
    ackPolicy(c);
  }
}

/**
 * Delayed ACK (RFC 9293 §3.8.6.3; Linux): every second full segment or in quickack mode
 * (connection start); otherwise within delayedAckMs. (PSH does not force an ACK, as in
 * Linux: a reply usually follows and carries it.)
 */
function ackPolicy(c: TcpConnection): void {
  const fullSeg = c.rcvMss - (c.tsOk ? 12 : 0);
  if (c.ackBytes >= 2 * fullSeg || c.quickAcks > 0) c.ackNow = true;
  else if (!c.ackNow) c.delack.armIfIdle(c.ctx.cfg.delayedAckMs);
}

/** The peer's FIN reached rcv.nxt (RFC 9293 §3.10.7.4 eighth). */
function processFin(c: TcpConnection): void {
  c.finReceived = true;
  c.rcvNxt = seqAdd(c.rcvNxt, 1);
  c.ackNow = true;
  c.ctx.counters.inc('tcp.fin.received');
  switch (c.state) {
    case TcpState.SYN_RECEIVED:
    case TcpState.ESTABLISHED:
      c.state = TcpState.CLOSE_WAIT;
      break;
    case TcpState.FIN_WAIT_1:
      if (c.finAcked) c.enterTimeWait();
      else c.state = TcpState.CLOSING; // simultaneous close (§3.6 figure 13)
      break;
    case TcpState.FIN_WAIT_2:
      c.enterTimeWait();
      break;
    default:
      break;
  }
}
