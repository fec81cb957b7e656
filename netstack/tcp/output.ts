/**
 * The send path: building segments straight into the IP layer's scratch buffer (payload
 * copied once, from the send ring), deciding how much may be sent (peer window, congestion
 * window, sender SWS avoidance, optional Nagle), loss-recovery transmission (NewReno,
 * RFC 6582; SACK-based, RFC 6675), the advertised receive window, and which timer runs.
 */
import { MAX_WSCALE, TcpFlag, tcpHeaderLen, emitTcp, TCP_PROTO, TCP_HLEN } from '../wire/tcp.js';
import type { TcpConnection } from './connection.js';
import { seqAdd, seqDiff, seqGt, seqLe, seqLt, seqMax } from './seq.js';
import { TcpState } from './state.js';
import { TimerKind } from './timers.js';

const { FIN, SYN, RST, PSH, ACK } = TcpFlag;

/** Current timestamp clock value for this connection (1 ms ticks, RFC 7323 §5.4). */
export function tsNow(c: TcpConnection): number {
  return (Math.floor(c.ctx.clock.now()) + c.tsOffset) >>> 0;
}

/**
 * Emit one segment: `len` payload bytes from the send ring at `seq` (0 for control
 * segments). ACK-bearing segments carry rcvNxt, the current window and, when we hold
 * out-of-order data, SACK blocks (if they fit next to the payload).
 */
export function transmit(c: TcpConnection, seq: number, len: number, flags: number): boolean {
  const ctx = c.ctx;
  const ip = ctx.ip;
  const r = ctx.tx;
  const syn = (flags & SYN) !== 0;
  r.srcPort = c.localPort;
  r.dstPort = c.remotePort;
  r.seq = seq >>> 0;
  r.ack = flags & ACK ? c.rcvNxt : 0;
  r.flags = flags;
  r.urgent = 0;
  r.mss = 0;
  r.wscale = -1;
  r.sackPermitted = false;
  // Guarded: storing an array's length always calls into the runtime, even when it is 0 already.
  if (r.sackBlocks.length !== 0) r.sackBlocks.length = 0;
  r.tsPresent = false;
  if (syn) {
    // RFC 7323 §2.2: the window in a SYN is never scaled.
    r.window = Math.min(65535, c.rcvCap);
    r.mss = c.rcvMss;
    const passive = (flags & ACK) !== 0 && !c.active;
    // In a SYN-ACK, only echo what the peer offered (RFC 7323 §1.3, RFC 2018 §2).
    r.wscale = (passive ? c.wsAgreed : c.wscaleOffer >= 0) ? c.wscaleOffer : -1;
    r.sackPermitted = passive ? c.sackOk : ctx.cfg.sack;
    r.tsPresent = passive ? c.tsOk : ctx.cfg.timestamps;
  } else {
    r.window = flags & ACK ? advertiseWindow(c) : 0;
    r.tsPresent = c.tsOk;
  }
  if (r.tsPresent) {
    r.tsval = tsNow(c);
    r.tsecr = flags & ACK ? c.tsRecent : 0;
  }
  if (!syn && c.sackOk && flags & ACK && !c.asm.isEmpty) {
    c.asm.sackBlocks(c.rcvNxt, r.tsPresent ? 3 : 4, r.sackBlocks);
    // Options must not push a full segment past the MTU: drop SACK from such data segments.
    if (len > 0 && tcpHeaderLen(r) - TCP_HLEN + len > c.mss + (r.tsPresent ? 12 : 0)) r.sackBlocks.length = 0;
  }
  r.payloadLen = len;
  // snd.max is the highest sequence ever sent, whoever sends (probes and forced
  // retransmissions included): ACKs up to it are acceptable. A RST's sequence number may be
  // the peer's (bogus) ACK value (§3.10.7.1): it must not move snd.max.
  if (!(flags & RST)) {
    const end = seqAdd(seq, len + (flags & FIN ? 1 : 0) + (syn ? 1 : 0));
    if (seqGt(end, c.sndMax)) c.sndMax = end;
  }
  const hlen = tcpHeaderLen(r);
  if (len > 0) c.sndBuf.copyOut(seqDiff(seq, c.sndUna), len, ip.scratch, ip.headroom + hlen);
  const n = emitTcp(r, null, ip.scratch, ip.headroom, c.localIp, c.remoteIp, ip.csumOffload === true);
  if (flags & ACK) {
    c.lastAckSent = c.rcvNxt;
    c.ackNow = false;
    c.ackBytes = 0;
    c.delack.cancel();
    if (c.quickAcks > 0) c.quickAcks--;
  }
  // A super-segment (TSO) is cut into c.mss pieces by the device or the switch.
  return ip.send4(c.localIp, c.remoteIp, TCP_PROTO, n, len > c.mss ? c.mss : 0);
}

export function sendSyn(c: TcpConnection): void {
  c.sndNxt = seqAdd(c.iss, 1);
  c.sndMax = c.sndNxt;
  transmit(c, c.iss, 0, SYN);
}

export function sendSynAck(c: TcpConnection): void {
  c.sndNxt = seqAdd(c.iss, 1);
  c.sndMax = c.sndNxt;
  transmit(c, c.iss, 0, SYN | ACK);
}

/**
 * Sequence number for segments without data (ACKs, RSTs): the highest sent, clipped to the
 * peer's window (Linux tcp_acceptable_seq). Not sndNxt: after an RTO pulls sndNxt back for
 * go-back-N, a pure ACK stamped with it would fall before the peer's rcv.nxt, fail its
 * acceptability test (RFC 9293 §3.10.7.4) and be dropped with the ACK it carries — two such
 * peers deadlock (found by the fault-injection property test).
 */
export function acceptableSeq(c: TcpConnection): number {
  const wndEnd = seqAdd(c.sndUna, c.sndWnd);
  return seqLe(c.sndMax, wndEnd) ? c.sndMax : seqMax(wndEnd, c.sndNxt);
}

export function sendAck(c: TcpConnection): void {
  transmit(c, acceptableSeq(c), 0, ACK);
}

/** RST from a connection: <SEQ=seq><CTL=RST(,ACK)>. */
export function sendRst(c: TcpConnection, seq: number, withAck: boolean): void {
  transmit(c, seq, 0, withAck ? RST | ACK : RST);
}

/** RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate-limited stack-wide (§7). */
export function challengeAck(c: TcpConnection): void {
  if (c.ctx.allowChallengeAck()) {
    c.ctx.counters.inc('tcp.challenge_ack');
    sendAck(c);
  } else {
    c.ctx.counters.inc('tcp.challenge_ack_limited');
  }
}

/**
 * 2^shift for the window-scale shifts 0..14 (RFC 7323 §2.3; the parser caps a peer's shift at
 * 14 and we never offer more). A table because `2 ** shift` with a variable shift is a call
 * to Math.pow, once or twice per segment.
 */
export const SCALE: readonly number[] = Array.from({ length: MAX_WSCALE + 1 }, (_, i) => 2 ** i);

/**
 * The window field for an outgoing ACK, updating rcvAdvRight. The right edge never moves
 * left (RFC 9293 §3.8.6.2.1: shrinking the window is strongly discouraged), and moves right
 * only by at least min(buffer/2, MSS) (receiver SWS avoidance, RFC 9293 §3.8.6.2.2). The
 * scaled field is rounded up so the edge never shrinks through rounding; the receive ring
 * has one scale unit of slack for that.
 */
export function advertiseWindow(c: TcpConnection): number {
  const avail = Math.max(0, c.rcvCap - c.rcvRing.length);
  let right = seqAdd(c.rcvNxt, avail);
  if (seqDiff(right, c.rcvAdvRight) < Math.min(c.rcvCap >> 1, c.rcvMss)) right = seqMax(c.rcvAdvRight, c.rcvNxt);
  const wnd = seqDiff(right, c.rcvNxt);
  const ws = c.rcvWscale;
  let field = Math.ceil(wnd / SCALE[ws]!);
  if (field > 0xffff) field = 0xffff;
  c.rcvAdvRight = seqAdd(c.rcvNxt, field * SCALE[ws]!);
  return field;
}

/**
 * After the application read (resume): if the window had (nearly) closed and can now open
 * by a useful amount, tell the peer at once instead of waiting for its next probe.
 */
export function maybeWindowUpdate(c: TcpConnection): void {
  if (c.state === TcpState.CLOSED || c.state === TcpState.SYN_SENT || c.state === TcpState.TIME_WAIT) return;
  const promised = seqDiff(c.rcvAdvRight, c.rcvNxt);
  const avail = Math.max(0, c.rcvCap - c.rcvRing.length);
  const thresh = Math.min(c.rcvCap >> 1, c.rcvMss);
  if (promised < c.rcvCap >> 1 && avail - promised >= thresh) {
    c.ctx.counters.inc('tcp.window_update');
    sendAck(c);
  }
}

/** Bytes in the send ring not yet sent (from sndNxt). Negative when the FIN was sent. */
function unsent(c: TcpConnection): number {
  return c.sndBuf.length - seqDiff(c.sndNxt, c.sndUna);
}

/**
 * Send what may be sent now, then an ACK if one is owed and no segment carried it, then
 * pick the timer. Called after input (at flush), after write()/end(), and from timers.
 */
export function output(c: TcpConnection, cork = false): void {
  switch (c.state) {
    case TcpState.CLOSED:
    case TcpState.SYN_SENT:
    case TcpState.SYN_RECEIVED:
      if (c.ackNow && c.state === TcpState.SYN_RECEIVED) sendSynAck(c);
      c.ackNow = false;
      updateTimer(c);
      return;
    case TcpState.TIME_WAIT:
      if (c.ackNow) sendAck(c);
      return;
    default:
      break;
  }
  let sent = false;
  if (c.inRecovery && c.sackOk) sent = sackRecoverySend(c);
  if (sendData(c, cork)) sent = true;
  if (c.ackNow && !sent) sendAck(c);
  updateTimer(c);
}

/** Normal transmission from sndNxt, limited by min(peer window, cwnd). */
function sendData(c: TcpConnection, cork = false): boolean {
  let sent = false;
  const tso = c.ctx.ip.tsoMax ?? 0;
  const segMax = tso > c.mss ? Math.floor(tso / c.mss) * c.mss : c.mss;
  const fin = c.finQueued && !c.finAcked;
  for (;;) {
    const queued = c.sndBuf.length;
    const off = seqDiff(c.sndNxt, c.sndUna);
    const avail = queued - off;
    if (avail < 0) break; // FIN already sent
    const flight = off;
    const wnd = Math.min(c.sndWnd, c.cc.cwnd);
    const usable = wnd - flight;
    // With TSO, one super-segment carries as many whole MSS as the window allows (as Linux's
    // tcp_tso_autosize, minus the pacing): fewer, larger writes for the same bytes on the wire.
    let len = Math.min(avail, segMax, Math.max(0, usable));
    if (len < avail && len < c.mss) {
      // Window-limited small segment: sender SWS avoidance (RFC 9293 §3.8.6.2.1) sends it
      // only if it is at least half the largest window the peer offered.
      if (len < c.maxSndWnd / 2) len = 0;
    }
    if (len > 0 && len < c.mss && c.nagle && flight > 0 && !(fin && len === avail)) len = 0;
    const withFin = fin && len === avail;
    if (len === 0 && !withFin) break;
    // Autocorking (as Linux's tcp_autocorking): a write that leaves a partial segment while
    // data is in flight holds it until the end of the I/O turn; an ACK or the uncork sends it.
    if (cork && !withFin && len === avail && len < segMax && flight > 0) {
      c.ctx.uncorkLater(c);
      break;
    }
    // A bare FIN is sent even into a zero window (Linux accepts it, see input.ts).
    const seq = c.sndNxt;
    let flags = ACK;
    if (withFin) flags |= FIN;
    if (len > 0 && len === avail) flags |= PSH;
    if (c.rttTime < 0 && len > 0 && !seqLt(seq, c.sndMax)) {
      // Time this segment (RFC 6298 without timestamps; Karn: only new data, see timers.ts).
      c.rttSeq = seqAdd(seq, len);
      c.rttTime = c.ctx.clock.now();
    }
    const again = seqLt(seq, c.sndMax);
    transmit(c, seq, len, flags);
    if (again) c.ctx.counters.inc('tcp.retransmit.segments');
    c.sndNxt = seqAdd(seq, len + (withFin ? 1 : 0));
    if (seqGt(c.sndNxt, c.sndMax)) c.sndMax = c.sndNxt;
    sent = true;
    if (withFin) break;
  }
  return sent;
}

const holeOut = { len: 0 };

/**
 * RFC 6675 §5 step (C): while cwnd - pipe >= 1 SMSS, send NextSeg — a lost hole first
 * (rule 1), else new data (rule 2). During SACK recovery sndNxt stays at sndMax.
 */
function sackRecoverySend(c: TcpConnection): boolean {
  let sent = false;
  for (let guard = 0; guard < 1024; guard++) {
    const pipe = c.sb.pipe(c.sndUna, c.sndMax, c.highRxt, c.mss);
    if (c.cc.cwnd - pipe < c.mss) break;
    const s = c.sb.nextLost(seqMax(c.highRxt, c.sndUna), c.sndUna, c.mss, holeOut);
    if (s >= 0) {
      const inBuf = c.sndBuf.length - seqDiff(s, c.sndUna);
      const len = Math.min(c.mss, holeOut.len, inBuf);
      if (len <= 0) break;
      transmit(c, s, len, ACK);
      c.ctx.counters.inc('tcp.retransmit.segments');
      c.highRxt = seqAdd(s, len);
      sent = true;
      continue;
    }
    // Rule 2: new data, within the peer's window.
    const off = seqDiff(c.sndMax, c.sndUna);
    const avail = c.sndBuf.length - off;
    const wndRoom = c.sndWnd - off;
    const len = Math.min(avail, c.mss, wndRoom);
    if (len <= 0 || (len < c.mss && len < avail)) break;
    transmit(c, c.sndMax, len, len === avail ? ACK | PSH : ACK);
    c.sndMax = seqAdd(c.sndMax, len);
    c.sndNxt = c.sndMax;
    sent = true;
  }
  return sent;
}

/** Retransmit the first unacknowledged segment (fast retransmit; NewReno partial ACK). */
export function retransmitFirst(c: TcpConnection): void {
  const len = Math.min(c.mss, c.sndBuf.length);
  if (len > 0) {
    transmit(c, c.sndUna, len, ACK);
  } else if (c.finQueued && !c.finAcked) {
    transmit(c, c.sndUna, 0, ACK | FIN);
  } else {
    return;
  }
  c.ctx.counters.inc('tcp.retransmit.segments');
  c.rttTime = -1; // Karn's rule
  if (c.sackOk) c.highRxt = seqMax(c.highRxt, seqAdd(c.sndUna, len));
}

/**
 * One timer slot per connection, as a tagged union (smoltcp's design): retransmission while
 * anything is in flight; else the persist timer while data waits on a zero window; else the
 * FIN_WAIT_2 idle timer; else keepalive. TIME_WAIT owns the slot on its own.
 */
export function updateTimer(c: TcpConnection): void {
  if (c.state === TcpState.CLOSED) {
    c.timer.cancel();
    c.timerKind = TimerKind.NONE;
    return;
  }
  if (c.state === TcpState.TIME_WAIT) return;
  if (seqGt(c.sndNxt, c.sndUna)) {
    if (c.timerKind !== TimerKind.RTX || !c.timer.armed) {
      c.timerKind = TimerKind.RTX;
      c.timer.arm(c.rtt.rto);
    }
    return;
  }
  const waiting = unsent(c) > 0;
  if (waiting && (c.state === TcpState.ESTABLISHED || c.state === TcpState.CLOSE_WAIT ||
      c.state === TcpState.FIN_WAIT_1 || c.state === TcpState.LAST_ACK)) {
    // Nothing in flight yet data is queued: the window is (too) small. Probe it.
    if (c.timerKind !== TimerKind.PERSIST || !c.timer.armed) {
      c.timerKind = TimerKind.PERSIST;
      c.timer.arm(c.rtt.rto);
    }
    return;
  }
  if (c.state === TcpState.FIN_WAIT_2) {
    if (c.timerKind !== TimerKind.FIN_WAIT_2 || !c.timer.armed) {
      c.timerKind = TimerKind.FIN_WAIT_2;
      c.timer.armAt(c.lastRecvTime + c.ctx.cfg.finWait2Ms);
    }
    return;
  }
  if (c.keepaliveOn && (c.state === TcpState.ESTABLISHED || c.state === TcpState.CLOSE_WAIT)) {
    if (c.timerKind !== TimerKind.KEEPALIVE || !c.timer.armed) {
      c.timerKind = TimerKind.KEEPALIVE;
      c.probes = 0;
      c.timer.armAt(c.lastRecvTime + c.keepaliveIdle);
    }
    return;
  }
  c.timer.cancel();
  c.timerKind = TimerKind.NONE;
}

