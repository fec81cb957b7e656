/**
 * One TCP connection: its control block (RFC 9293 §3.3.1 variable names, camel-cased), the
 * socket-like API the NAT and the port forwarder use, and event delivery.
 *
 * Segment processing lives in input.ts, transmission in output.ts, timer expiry in
 * timers.ts; they operate on the public-but-internal fields below.
 *
 * Events (Node-like): 'connect', 'data' (an owned Uint8Array), 'end' (peer FIN, after all
 * data), 'error' (TcpError: ECONNRESET / ETIMEDOUT / ECONNREFUSED), 'close' (hadError),
 * 'drain' (the send buffer fell below half its high-water mark after write() returned false).
 *
 * Events are never emitted from the middle of segment processing: they are collected as
 * bits in `pending` and emitted at safe points (end of input for that segment, flush(),
 * timer expiry, API calls), so a handler that calls write()/destroy() always sees a
 * consistent control block. 'data' is delivered at flush() so a batch of segments becomes
 * one chunk (fewer, larger writes into the host socket). 'error' is emitted only when a
 * listener exists: the engine never throws into the IP layer.
 */
import { EventEmitter } from 'node:events';
import type { Timer } from '../time.js';
import { Assembler } from './assembler.js';
import type { StackContext } from './config.js';
import type { CongestionControl } from './congestion.js';
import { NewReno } from './congestion.js';
import { Cubic } from './cubic.js';
import { TcpError, type TcpErrorCode } from './errors.js';
import { acceptableSeq, output, sendRst, maybeWindowUpdate } from './output.js';
import { ByteRing } from './ring.js';
import { RttEstimator } from './rtt.js';
import { Scoreboard } from './scoreboard.js';
import { TcpState } from './state.js';
import type { OffloadHandle, OffloadHost } from './offload.js';
import { onDelackTimer, onMainTimer, TimerKind } from './timers.js';

export interface TcpConnectionEvents {
  connect: [];
  data: [Uint8Array];
  end: [];
  error: [TcpError];
  close: [boolean];
  drain: [];
}

export const Ev = {
  CONNECT: 1,
  END: 2,
  ERROR: 4,
  CLOSE: 8,
  DRAIN: 16,
} as const;

export interface TcpTuple {
  localIp: number;
  localPort: number;
  remoteIp: number;
  remotePort: number;
}

export class TcpConnection extends EventEmitter<TcpConnectionEvents> {
  state: TcpState = TcpState.CLOSED;
  readonly localIp: number;
  readonly localPort: number;
  readonly remoteIp: number;
  readonly remotePort: number;
  /** Data bytes received in order (delivered or buffered). */
  bytesIn = 0;
  /** Data bytes acknowledged by the peer. */
  bytesOut = 0;
  /** Autocorking: queued on the stack's uncork list. */
  corked = false;
  /** True for connect() (active open); false for an accepted SYN. */
  readonly active: boolean;

  // ---- send sequence space (RFC 9293 §3.3.1) ----
  iss = 0;
  sndUna = 0;
  /** Next sequence to send; may be pulled back to sndUna by an RTO (go-back-N). */
  sndNxt = 0;
  /** Highest sequence ever sent (+1): ACKs up to here are acceptable. */
  sndMax = 0;
  /** Peer's window in bytes (already scaled). */
  sndWnd = 0;
  sndWl1 = 0;
  sndWl2 = 0;
  /** Largest window the peer offered (RFC 5961 §5.2's MAX.SND.WND; sender SWS rule). */
  maxSndWnd = 0;
  sndWscale = 0;
  /** Bytes from sndUna on: sent-unacknowledged then unsent. */
  readonly sndBuf = new ByteRing(Infinity);
  /** end() was called: a FIN follows the queued data. */
  finQueued = false;
  finAcked = false;
  /** Effective payload per segment (peer MSS / our MTU, minus the timestamp option). */
  mss = 536;
  /** Segment size the peer is told (our MTU - 40): what we expect to receive. */
  rcvMss = 536;

  // ---- receive sequence space ----
  irs = 0;
  rcvNxt = 0;
  rcvWscale = 0;
  /** Buffer size we advertise against (capped to 65535 without window scaling). */
  rcvCap = 65535;
  /** Right edge of the last window we advertised; never moved left (RFC 9293 §3.8.6.2.1). */
  rcvAdvRight = 0;
  /** In-order unread data, followed by out-of-order data at its offset. */
  rcvRing: ByteRing;
  readonly asm: Assembler;
  /** A FIN was seen at `rcvFinSeq` (possibly beyond a hole). */
  hasRcvFin = false;
  rcvFinSeq = 0;
  /** The peer's FIN was processed (rcvNxt moved past it). */
  finReceived = false;

  // ---- options ----
  /** Window scale we offer in our SYN (or echo in a SYN-ACK). */
  readonly wscaleOffer: number;
  /** Both sides offered window scaling. */
  wsAgreed = false;
  sackOk = false;
  tsOk = false;
  tsRecent = 0;
  lastAckSent = 0;
  /** Per-connection timestamp offset (RFC 7323 §5.4). */
  tsOffset = 0;

  // ---- timers, RTT, congestion ----
  readonly timer: Timer;
  timerKind: TimerKind = TimerKind.NONE;
  readonly delack: Timer;
  readonly rtt: RttEstimator;
  cc: CongestionControl;
  readonly sb = new Scoreboard();
  /** Consecutive RTO expirations (or SYN retransmissions). */
  rtxCount = 0;
  /** Unanswered zero-window probes / keepalive probes. */
  probes = 0;
  /** RTT timing without timestamps: the sequence being timed and when it was sent (-1: none). */
  rttSeq = 0;
  rttTime = -1;
  /** When our SYN / SYN-ACK was first sent (handshake RTT sample). */
  synTime = 0;
  lastRecvTime = 0;
  dupAcks = 0;
  inRecovery = false;
  /** RFC 6582 `recover`: sndMax when recovery started. */
  recover = 0;
  /** RFC 6675 HighRxt: highest sequence retransmitted in this recovery. */
  highRxt = 0;

  // ---- ACK policy ----
  /** Send an ACK at the next output (immediate-ACK conditions met). */
  ackNow = false;
  /** In-order bytes received since our last ACK (ACK every 2nd full segment). */
  ackBytes = 0;
  /** Linux quickack: ACK every segment at the start of a connection (helps the peer's slow start). */
  quickAcks = 16;
  nagle: boolean;
  keepaliveOn: boolean;
  keepaliveIdle: number;

  // ---- application side ----
  paused = false;
  endEmitted = false;
  closeEmitted = false;
  needDrain = false;
  /** Bits of `Ev` waiting to be emitted. */
  pending = 0;
  error: TcpError | null = null;
  /** Queued on the stack's flush list. */
  dirty = false;
  /** Held by the TCP offload (offload.ts): every field above is stale until reclaimed. */
  offload: OffloadHandle | null = null;
  /** The host socket this connection is bridged to (tcp-bridge.ts), for the offload. */
  host: OffloadHost | null = null;
  /**
   * Optional: in-order data goes here first, as it arrives, when nothing is queued before it
   * (input.ts); returns how many bytes it took, the rest is buffered and delivered as 'data'.
   * The bridge sets it to write to the host socket while Node has nothing queued for it.
   */
  directSink: ((data: Uint8Array) => number) | null = null;
  /** Engine touches to let pass before the offload considers this connection again. */
  offloadHold = 0;
  /** Consecutive offload periods that carried little (offload.ts backs off on them). */
  offloadStrikes = 0;

  constructor(readonly ctx: StackContext, t: TcpTuple, active: boolean, iss: number) {
    super();
    this.localIp = t.localIp;
    this.localPort = t.localPort;
    this.remoteIp = t.remoteIp;
    this.remotePort = t.remotePort;
    this.active = active;
    const cfg = ctx.cfg;
    this.iss = iss >>> 0;
    this.sndUna = this.iss;
    this.sndNxt = this.iss;
    this.sndMax = this.iss;
    this.recover = this.iss;
    this.tsOffset = this.iss;
    this.rttSeq = this.iss;
    this.wscaleOffer = cfg.windowScaling ? wscaleFor(cfg.rcvBuf) : -1;
    this.rcvRing = new ByteRing(65535);
    this.asm = new Assembler(cfg.maxOooRanges);
    this.timer = ctx.clock.timer(() => {
      if (this.offload !== null) ctx.reclaim(this);
      onMainTimer(this);
      ctx.touched(this);
    });
    this.delack = ctx.clock.timer(() => {
      if (this.offload !== null) ctx.reclaim(this);
      onDelackTimer(this);
    });
    this.rtt = new RttEstimator(cfg.minRto);
    this.rcvMss = Math.max(536, ctx.ip.mtuTo(this.remoteIp) - 40);
    this.mss = 536;
    this.cc = makeCc(cfg.congestion, this.mss);
    this.nagle = cfg.nagle;
    this.keepaliveOn = cfg.keepalive !== null;
    this.keepaliveIdle = cfg.keepalive?.idleMs ?? 7_200_000;
    this.lastRecvTime = ctx.clock.now();
  }

  // ======================= API =======================

  /**
   * Queue data (copied). Returns false when the send buffer is above its high-water mark;
   * wait for 'drain'. Data written before the handshake completes is sent once it does.
   */
  write(data: Uint8Array): boolean {
    if (this.offload !== null) this.ctx.reclaim(this);
    if (this.finQueued || this.state === TcpState.CLOSED || this.state === TcpState.TIME_WAIT ||
        this.state === TcpState.CLOSING || this.state === TcpState.LAST_ACK) {
      this.fail('EPIPE', false);
      return false;
    }
    if (data.length > 0) {
      this.sndBuf.append(data);
      // Corked: a trailing partial segment waits for the end of the I/O turn, when more
      // writes may have filled it (a host socket delivers 64 KiB reads, which would otherwise
      // leave a runt segment after every full one).
      output(this, true);
    }
    const ok = this.sndBuf.length < this.ctx.cfg.sndBuf;
    if (!ok) this.needDrain = true;
    this.ctx.touched(this);
    return ok;
  }

  /** Half-close: FIN after the queued data (RFC 9293 §3.10.4 CLOSE). */
  end(): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    if (this.finQueued) return;
    switch (this.state) {
      case TcpState.ESTABLISHED:
        this.finQueued = true;
        this.state = TcpState.FIN_WAIT_1;
        break;
      case TcpState.CLOSE_WAIT:
        this.finQueued = true;
        this.state = TcpState.LAST_ACK;
        break;
      case TcpState.SYN_SENT:
      case TcpState.SYN_RECEIVED:
        // Sent once the handshake completes (establish() moves to FIN_WAIT_1).
        this.finQueued = true;
        return;
      default:
        return;
    }
    output(this);
  }

  /** Abort: RST to the peer (if it knows us), then closed. Idempotent. */
  destroy(): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    if (this.state === TcpState.CLOSED) return;
    if (this.state === TcpState.TIME_WAIT) {
      // Nothing to tell the peer; keep the TIME_WAIT protection, but the app is done.
      this.emitPending(false);
      return;
    }
    if (this.state !== TcpState.SYN_SENT) sendRst(this, acceptableSeq(this), true);
    this.closeNow(null);
    this.emitPending(false);
  }

  /** Stop delivering 'data'. Unread data stays in the receive buffer and the window closes as it fills. */
  pause(): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    this.paused = true;
  }

  /** Deliver buffered data and reopen the window (a window update is sent if it had closed). */
  resume(): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    if (!this.paused) return;
    this.paused = false;
    this.emitPending(true);
    if (this.state !== TcpState.CLOSED) maybeWindowUpdate(this);
    this.ctx.touched(this);
  }

  get isPaused(): boolean {
    return this.paused;
  }

  setNoDelay(noDelay = true): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    this.nagle = !noDelay;
  }

  /** Enable/disable keepalive; `idleMs` overrides the configured idle time. */
  setKeepAlive(enable: boolean, idleMs?: number): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    this.keepaliveOn = enable;
    if (idleMs !== undefined && idleMs > 0) this.keepaliveIdle = idleMs;
    output(this);
  }

  /** Bytes queued for sending (unsent + unacknowledged). */
  get bufferedAmount(): number {
    if (this.offload !== null) this.ctx.reclaim(this);
    return this.sndBuf.length;
  }

  /** Congestion window and RTT, for stats. */
  info(): { state: TcpState; cwnd: number; ssthresh: number; srtt: number; rto: number; sndWnd: number; rcvWnd: number; mss: number } {
    if (this.offload !== null) this.ctx.reclaim(this);
    return {
      state: this.state,
      cwnd: this.cc.cwnd,
      ssthresh: this.cc.ssthresh,
      srtt: this.rtt.srtt,
      rto: this.rtt.rto,
      sndWnd: this.sndWnd,
      rcvWnd: Math.max(0, this.rcvCap - this.rcvRing.length),
      mss: this.mss,
    };
  }

  // ======================= internal =======================

  /** Set the receive buffer once the window scale is known (handshake). */
  setupReceive(wsOk: boolean): void {
    const cfg = this.ctx.cfg;
    this.wsAgreed = wsOk;
    this.rcvWscale = wsOk ? this.wscaleOffer : 0;
    this.rcvCap = wsOk ? cfg.rcvBuf : Math.min(cfg.rcvBuf, 65535);
    // Slack of one scale unit: advertised windows are rounded up to it (see advertiseWindow).
    this.rcvRing = new ByteRing(this.rcvCap + (1 << this.rcvWscale));
    this.cc = makeCc(cfg.congestion, this.mss);
  }

  /** Handshake complete (RFC 9293: to ESTABLISHED, or straight to FIN_WAIT_1 if end() came early). */
  establish(): void {
    this.state = this.finQueued ? TcpState.FIN_WAIT_1 : TcpState.ESTABLISHED;
    this.rtxCount = 0;
    this.pending |= Ev.CONNECT;
    this.ctx.counters.inc(this.active ? 'tcp.conn.active' : 'tcp.conn.passive');
  }

  enterTimeWait(): void {
    this.state = TcpState.TIME_WAIT;
    this.delack.cancel();
    this.timerKind = TimerKind.TIME_WAIT;
    this.timer.arm(this.ctx.cfg.timeWaitMs);
    if (!this.closeEmitted) this.pending |= Ev.CLOSE;
  }

  /** To CLOSED: stop timers, leave the stack's table, report `err` if any. */
  closeNow(err: TcpError | null): void {
    if (this.offload !== null) this.ctx.reclaim(this);
    if (this.state === TcpState.CLOSED) return;
    const wasTimeWait = this.state === TcpState.TIME_WAIT;
    this.state = TcpState.CLOSED;
    this.timer.cancel();
    this.delack.cancel();
    this.timerKind = TimerKind.NONE;
    this.ctx.remove(this);
    if (err) {
      this.error = err;
      this.pending |= Ev.ERROR;
    }
    if (!wasTimeWait && !this.closeEmitted) this.pending |= Ev.CLOSE;
  }

  /** Abort with an error code (timeouts, resets). */
  abort(code: TcpErrorCode): void {
    this.ctx.counters.inc(`tcp.abort.${code.toLowerCase()}`);
    this.closeNow(new TcpError(code));
  }

  private fail(code: TcpErrorCode, close: boolean): void {
    this.error = new TcpError(code);
    this.pending |= Ev.ERROR;
    if (close) this.closeNow(this.error);
    this.emitPending(false);
  }

  /** Queue for the stack's flush (delivery, ACKs). */
  markDirty(): void {
    if (!this.dirty) this.ctx.markDirty(this);
  }

  /**
   * Emit pending events in a fixed order: connect, data, end, error, close, drain.
   * `deliver`: hand buffered in-order data to the application (flush/resume/timers).
   */
  emitPending(deliver: boolean): void {
    for (let guard = 0; guard < 4; guard++) {
      if (this.pending & Ev.CONNECT) {
        this.pending &= ~Ev.CONNECT;
        this.emit('connect');
      }
      const closing = (this.pending & (Ev.ERROR | Ev.CLOSE)) !== 0;
      if ((deliver || closing) && !this.paused && this.rcvRing.length > 0) {
        const data = this.rcvRing.read(this.rcvRing.length);
        this.emit('data', data);
      }
      if (this.finReceived && !this.endEmitted && this.rcvRing.length === 0) {
        this.endEmitted = true;
        this.emit('end');
      }
      if (this.pending & Ev.ERROR) {
        this.pending &= ~Ev.ERROR;
        if (this.error && this.listenerCount('error') > 0) this.emit('error', this.error);
      }
      if (this.pending & Ev.CLOSE) {
        this.pending &= ~Ev.CLOSE;
        if (!this.closeEmitted) {
          this.closeEmitted = true;
          this.emit('close', this.error !== null);
        }
      }
      if (this.needDrain && this.sndBuf.length <= this.ctx.cfg.sndBuf / 2 && this.state !== TcpState.CLOSED) {
        this.needDrain = false;
        this.emit('drain');
      }
      if (this.pending === 0) break;
    }
  }
}

/** Smallest shift that lets `buf` bytes be advertised (RFC 7323 §2.3; capped at 14). */
export function wscaleFor(buf: number): number {
  let s = 0;
  while (s < 14 && 65535 * 2 ** s < buf) s++;
  return s;
}

function makeCc(kind: 'cubic' | 'newreno', mss: number): CongestionControl {
  return kind === 'cubic' ? new Cubic(mss) : new NewReno(mss);
}
