/**
 * The engine's side of the TCP offload (native/src/tcp_offload.h; docs/tcp-offload.md).
 *
 * A 1-byte round trip through the engine costs two entries into JavaScript (a TAP frame, a
 * host socket read), each with Node's fixed cost plus our layers: several times the user
 * time of a C stack. So a connection that is quiet and simple — the steady state of
 * request/response traffic — is handed to the native fast path of the link its guest sits
 * behind ("adopted"); small in-order segments then go guest ↔ host socket without entering
 * JavaScript. The engine stays the owner: anything unusual makes the native side give the
 * connection back ("exit"), and the engine takes it back itself ("reclaim") before it touches
 * it for any reason (a segment, a host socket event, a timer, the API). Both directions apply
 * the native state to the TcpConnection (`apply`), so what the engine sees afterwards is what
 * it would have seen had it processed those segments itself: sequence numbers, windows,
 * TS.Recent, the owed ACK, an RTT sample, unacknowledged and not-yet-sent bytes.
 *
 * Adoption is considered once per burst, after the engine handled a connection (a microtask:
 * by then the switch has written the engine's frames, so a native segment cannot overtake
 * them). What is adoptable: ESTABLISHED, nothing unsent, at most one small segment
 * unacknowledged, no
 * FIN either way, no out-of-order data, no loss recovery, an idle host socket (nothing queued,
 * reading, no backpressure), and a guest behind a link with the offload (not a capture).
 */
import type { Counters } from '../counters.js';
import type { Clock } from '../time.js';
import type { TcpConnection } from './connection.js';
import { tsNow, updateTimer, output } from './output.js';
import { seqAdd, seqDiff, seqGt } from './seq.js';
import { TcpState } from './state.js';
import { onMainTimer, TimerKind } from './timers.js';

/** What the native side of one link offers (FdFrameLink over FrameIO). */
export interface OffloadPort {
  adopt(id: number, fd: number, params: Uint32Array, guestMac: Uint8Array, sent: Uint8Array): number;
  release(id: number, out: Uint32Array, data: Uint8Array): boolean;
}

/** The host socket side of a bridged connection (tcp-bridge.ts). */
export interface OffloadHost {
  /** The socket's descriptor, or -1. */
  fd(): number;
  /** Connected, reading, nothing queued for writing, not ended: the offload may take it. */
  idle(): boolean;
  /** Stop / restart reading in Node (the offload reads while it holds the connection). */
  pause(): void;
  resume(): void;
}

/** Layout of adopt's params (native/src/tcp_offload.h, OffloadParam; a test checks the count). */
export const OFFLOAD_PARAM = {
  GUEST_IP: 0, REMOTE_IP: 1, GUEST_PORT: 2, REMOTE_PORT: 3,
  RCV_NXT: 4, SND_UNA: 5, SND_NXT: 6, SND_WND: 7, SND_WL1: 8, SND_WL2: 9,
  SND_WSCALE: 10, RCV_WSCALE: 11, RCV_WND_FIELD: 12,
  TS_OK: 13, TS_RECENT: 14, TS_NOW: 15, LAST_ACK_SENT: 16,
  MSS: 17, CWND: 18, RTO_MS: 19, DELACK_MS: 20, ACK_OWED: 21, TTL: 22, SMALL_MAX: 23, MAX_AGE_MS: 24,
  COUNT: 25,
} as const;

/** Layout of release's state (OffloadState). */
export const OFFLOAD_STATE = {
  RCV_NXT: 0, SND_UNA: 1, SND_NXT: 2, SND_WND: 3, SND_WL1: 4, SND_WL2: 5,
  TS_RECENT: 6, LAST_ACK_SENT: 7, ACK_OWED: 8,
  BYTES_IN: 9, BYTES_OUT: 10, SEGS_IN: 11, SEGS_OUT: 12,
  RTT_MS: 13, RX_AGE_MS: 14, REASON: 15, SENT_LEN: 16, UNSENT_LEN: 17,
  COUNT: 18,
} as const;

/** Exit reasons (OffloadExit), for counters. */
export const EXIT_REASONS = ['released', 'segment', 'host_eof', 'host_error', 'host_full', 'window', 'bulk', 'rto', 'device_full', 'max_age'] as const;
const X_RELEASED = 0;
const X_HOST_EOF = 2;
const X_HOST_ERROR = 3;
const X_RTO = 7;
const X_MAX_AGE = 9;

export interface OffloadOptions {
  clock: Clock;
  counters: Counters;
  /** Where the guest `ip` lives: its MAC and the offload of its link, or null (no offload). */
  route(guestIp: number): { port: OffloadPort; mac: Uint8Array } | null;
  /** Segments with more payload than this stay in the engine (bulk: it batches and uses TSO). */
  smallMax?: number;
  /** An adopted connection comes back at least this often (the engine refreshes what it tracks). */
  maxAgeMs?: number;
  /** TTL of the segments the native side builds (the gateway's). */
  ttl?: number;
}

export interface OffloadHandle {
  readonly id: number;
  readonly port: OffloadPort;
}

export class TcpOffloader {
  private nextId = 1;
  private readonly byId = new Map<number, TcpConnection>();
  private readonly candidates = new Set<TcpConnection>();
  private scheduled = false;
  private readonly params = new Uint32Array(P.COUNT);
  private readonly state = new Uint32Array(S.COUNT);
  private readonly data = new Uint8Array(2 * 65536);
  private readonly smallMax: number;
  private readonly maxAgeMs: number;
  private readonly ttl: number;

  constructor(private readonly o: OffloadOptions) {
    this.smallMax = o.smallMax ?? 512;
    this.maxAgeMs = o.maxAgeMs ?? 60_000;
    this.ttl = o.ttl ?? 64;
  }

  /** Connections held by the native side right now. */
  get size(): number {
    return this.byId.size;
  }

  /** The engine handled `c`: consider adopting it once this burst is over. */
  touched(c: TcpConnection): void {
    if (c.offload !== null || c.host === null) return;
    if (c.offloadHold > 0) {
      c.offloadHold--;
      return;
    }
    this.candidates.add(c);
    if (!this.scheduled) {
      this.scheduled = true;
      void RESOLVED.then(this.run);
    }
  }

  private readonly run = (): void => {
    this.scheduled = false;
    const list = [...this.candidates];
    this.candidates.clear();
    for (const c of list) {
      try {
        this.tryAdopt(c);
      } catch (err) {
        // A bug must not take the network down (this runs in a microtask: an exception would
        // be an unhandled rejection); the connection simply stays with the engine.
        this.o.counters.inc('tcp.offload.internal_error');
        this.lastError = err;
      }
    }
  };

  lastError: unknown = null;

  /** Why `c` cannot be adopted now, or null. */
  private refusal(c: TcpConnection): string | null {
    if (c.state !== TcpState.ESTABLISHED) return 'state';
    if (c.finQueued || c.hasRcvFin || c.paused || c.pending !== 0) return 'app';
    if (c.rcvRing.length !== 0 || !c.asm.isEmpty) return 'receive_queue';
    // At most one small segment in flight: more (a bulk reply the engine sent) is the
    // engine's to see acknowledged or recovered, with SACK and fast retransmit.
    const inflight = seqDiff(c.sndMax, c.sndUna);
    if (c.sndNxt !== c.sndMax || c.sndBuf.length !== inflight || inflight > this.smallMax) return 'send_queue';
    if (c.inRecovery || c.dupAcks !== 0 || c.rtxCount !== 0 || !c.sb.isEmpty) return 'recovery';
    if (c.quickAcks > 0 || c.ackNow) return 'ack_policy';
    if (c.sndWnd < c.mss) return 'window';
    if (c.timerKind !== TimerKind.NONE && c.timerKind !== TimerKind.RTX && c.timerKind !== TimerKind.KEEPALIVE) return 'timer';
    if (!c.host!.idle()) return 'host';
    return null;
  }

  private tryAdopt(c: TcpConnection): void {
    if (c.offload !== null || c.host === null || c.state === TcpState.CLOSED) return;
    if (this.refusal(c) !== null) return;
    const r = this.o.route(c.remoteIp);
    if (r === null) return;
    const fd = c.host.fd();
    if (fd < 0) return;
    const p = this.params;
    p[P.GUEST_IP] = c.remoteIp;
    p[P.REMOTE_IP] = c.localIp;
    p[P.GUEST_PORT] = c.remotePort;
    p[P.REMOTE_PORT] = c.localPort;
    p[P.RCV_NXT] = c.rcvNxt;
    p[P.SND_UNA] = c.sndUna;
    p[P.SND_NXT] = c.sndNxt;
    p[P.SND_WND] = c.sndWnd;
    p[P.SND_WL1] = c.sndWl1;
    p[P.SND_WL2] = c.sndWl2;
    p[P.SND_WSCALE] = c.sndWscale;
    p[P.RCV_WSCALE] = c.rcvWscale;
    // The receive queue is empty (the host socket takes what arrives): advertise the whole
    // buffer. It never moves the right edge left of what the engine advertised.
    const field = Math.min(0xffff, Math.floor(c.rcvCap / 2 ** c.rcvWscale));
    if (seqGt(c.rcvAdvRight, seqAdd(c.rcvNxt, field * 2 ** c.rcvWscale))) return;
    p[P.RCV_WND_FIELD] = field;
    p[P.TS_OK] = c.tsOk ? 1 : 0;
    p[P.TS_RECENT] = c.tsRecent;
    p[P.TS_NOW] = tsNow(c);
    p[P.LAST_ACK_SENT] = c.lastAckSent;
    p[P.MSS] = c.mss;
    p[P.CWND] = Math.min(0xffffffff, Math.max(c.mss, Math.floor(c.cc.cwnd)));
    p[P.RTO_MS] = Math.ceil(c.rtt.rto);
    p[P.DELACK_MS] = c.ctx.cfg.delayedAckMs;
    p[P.ACK_OWED] = c.delack.armed || c.ackBytes > 0 ? 1 : 0;
    p[P.TTL] = this.ttl;
    p[P.SMALL_MAX] = this.smallMax;
    p[P.MAX_AGE_MS] = this.maxAgeMs;
    const inflight = c.sndBuf.length;
    const sent = this.data.subarray(0, inflight);
    if (inflight > 0) c.sndBuf.copyOut(0, inflight, sent, 0);
    const id = this.nextId;
    this.nextId = this.nextId >= 0xfffffff0 ? 1 : this.nextId + 1;
    const err = r.port.adopt(id, fd, p, r.mac, sent);
    if (err !== 0) {
      this.o.counters.inc(`tcp.offload.adopt_failed.${err}`);
      return;
    }
    // The native side owns the bytes in flight, the timers and the host socket's reads now.
    c.sndBuf.consume(inflight);
    c.timer.cancel();
    c.timerKind = TimerKind.NONE;
    c.delack.cancel();
    c.ackBytes = 0;
    c.offload = { id, port: r.port };
    this.byId.set(id, c);
    c.host.pause();
    this.o.counters.inc('tcp.offload.adopted');
  }

  /** The engine is about to touch `c`: take it back from the native side first. */
  reclaim(c: TcpConnection): void {
    const h = c.offload;
    if (h === null) return;
    c.offload = null;
    this.byId.delete(h.id);
    if (!h.port.release(h.id, this.state, this.data)) {
      // The link went away with the connection on it (its descriptor closed): nothing to
      // apply; the engine resumes from what it had, and retransmits what the guest lacks.
      this.o.counters.inc('tcp.offload.lost');
      c.host?.resume();
      updateTimer(c);
      return;
    }
    this.apply(c);
  }

  /** The native side gave connection `id` up by itself (an unusual segment, a timeout ...). */
  exited(id: number): void {
    const c = this.byId.get(id);
    if (c === undefined) return;
    try {
      this.reclaim(c);
    } catch (err) {
      // Called from the native side's I/O callbacks: an exception would be fatal there.
      this.o.counters.inc('tcp.offload.internal_error');
      this.lastError = err;
      return;
    }
    // Nothing else may arrive to make the engine act (a timeout, data read from the host):
    // let it run now. Adoption is considered again after this I/O turn, once the engine has
    // also handled the segment that caused the exit (if one did: it follows this call).
    output(c);
    c.emitPending(false);
    setImmediate(() => this.touched(c));
  }

  /** Take every connection back (stats, shutdown). */
  reclaimAll(): void {
    for (const c of [...this.byId.values()]) this.reclaim(c);
  }

  private apply(c: TcpConnection): void {
    const s = this.state;
    const counters = this.o.counters;
    const reason = s[S.REASON]!;
    counters.inc(`tcp.offload.exit.${EXIT_REASONS[reason] ?? 'unknown'}`);
    // When to adopt it again. After the host's EOF or an error never: Node must read them
    // (re-adopting before its next read would pause it again, and the native side would read
    // the EOF again, forever). After an offload that carried little (a connection that is not
    // request/response with small messages), back off exponentially, in engine touches, so a
    // bulk or mixed connection is not handed back and forth on every exchange.
    if (reason === X_HOST_EOF || reason === X_HOST_ERROR) {
      c.offloadHold = Infinity;
    } else if (reason !== X_RELEASED && reason !== X_MAX_AGE && reason !== X_RTO) {
      if (s[S.SEGS_IN]! + s[S.SEGS_OUT]! < 16) {
        c.offloadStrikes = Math.min(c.offloadStrikes + 1, 10);
        c.offloadHold = 2 ** c.offloadStrikes;
      } else {
        c.offloadStrikes = 0;
      }
    }
    counters.inc('tcp.offload.rx_segments', s[S.SEGS_IN]!);
    counters.inc('tcp.offload.tx_segments', s[S.SEGS_OUT]!);
    c.rcvNxt = s[S.RCV_NXT]!;
    c.bytesIn += s[S.BYTES_IN]!;
    c.bytesOut += s[S.BYTES_OUT]!;
    c.sndUna = s[S.SND_UNA]!;
    c.sndNxt = s[S.SND_NXT]!;
    c.sndMax = c.sndNxt;
    c.sndWnd = s[S.SND_WND]!;
    if (c.sndWnd > c.maxSndWnd) c.maxSndWnd = c.sndWnd;
    c.sndWl1 = s[S.SND_WL1]!;
    c.sndWl2 = s[S.SND_WL2]!;
    c.tsRecent = s[S.TS_RECENT]!;
    c.lastAckSent = s[S.LAST_ACK_SENT]!;
    c.lastRecvTime = this.o.clock.now() - s[S.RX_AGE_MS]!;
    c.sb.advance(c.sndUna);
    if (c.rttTime >= 0 && !seqGt(c.rttSeq, c.sndUna)) c.rttTime = -1; // acknowledged natively: no sample
    if (s[S.RTT_MS] !== 0xffffffff) c.rtt.sample(s[S.RTT_MS]!);
    const right = seqAdd(c.rcvNxt, Math.min(0xffff, Math.floor(c.rcvCap / 2 ** c.rcvWscale)) * 2 ** c.rcvWscale);
    if (seqGt(right, c.rcvAdvRight)) c.rcvAdvRight = right;
    // Unacknowledged bytes, then bytes read from the host but not sent.
    const sentLen = s[S.SENT_LEN]!;
    const unsentLen = s[S.UNSENT_LEN]!;
    if (sentLen + unsentLen > 0) c.sndBuf.append(this.data.subarray(0, sentLen + unsentLen));
    if (s[S.ACK_OWED]) c.delack.armIfIdle(c.ctx.cfg.delayedAckMs);
    c.host?.resume();
    if (reason === X_RTO) {
      // The native retransmission timer expired: retransmit now, with the engine's backoff
      // (rtxCount > 0 also keeps the connection here until an ACK ends the recovery; a timer
      // armed for later would be cancelled by a re-adoption first, and nothing would ever be
      // retransmitted).
      c.timerKind = TimerKind.RTX;
      onMainTimer(c);
    } else {
      updateTimer(c);
    }
  }
}

const P = OFFLOAD_PARAM;
const S = OFFLOAD_STATE;
const RESOLVED = Promise.resolve();
