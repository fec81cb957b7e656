/**
 * Engine configuration and the stack-wide context every connection shares (clock, counters,
 * IP output, scratch repr, limits). Connections reach the stack only through `StackContext`,
 * so the per-concern files (input, output, timers) never import the stack itself.
 */
import type { Clock } from '../time.js';
import type { Counters } from '../counters.js';
import type { TcpRepr } from '../wire/tcp.js';
import type { Ip4Output } from './ip.js';
import type { TcpConnection } from './connection.js';

export interface KeepaliveConfig {
  /** Idle time before the first probe (Linux tcp_keepalive_time: 7200 s). */
  idleMs: number;
  /** Between unanswered probes (tcp_keepalive_intvl: 75 s). */
  intervalMs: number;
  /** Unanswered probes before the connection is aborted with ETIMEDOUT (tcp_keepalive_probes: 9). */
  probes: number;
}

export interface TcpConfig {
  /** Receive buffer per connection; the window scale is chosen so the whole buffer can be advertised. */
  rcvBuf: number;
  /** Send buffer high-water mark: write() returns false above it. */
  sndBuf: number;
  maxConnections: number;
  /** SYNs handed to onSyn and not yet accepted/reset/dropped. */
  maxPendingSyns: number;
  /** Out-of-order ranges (holes) tracked per connection; beyond it segments are dropped. */
  maxOooRanges: number;
  /** 2MSL (Linux TCP_TIMEWAIT_LEN: 60 s). */
  timeWaitMs: number;
  /** FIN_WAIT_2 idle timeout (Linux tcp_fin_timeout: 60 s); reset by every segment received. */
  finWait2Ms: number;
  /** SYN / SYN-ACK retransmissions before giving up (Linux tcp_syn_retries: 6). */
  synRetries: number;
  /** Data retransmissions before ETIMEDOUT (Linux tcp_retries2: 15). */
  maxRetries: number;
  /** Delayed ACK timeout (Linux TCP_DELACK_MIN: 40 ms). */
  delayedAckMs: number;
  /** Nagle's algorithm (RFC 9293 §3.7.4). Off by default: the NAT's host socket already coalesces. */
  nagle: boolean;
  /** Keepalive; null = off unless enabled per connection. */
  keepalive: KeepaliveConfig | null;
  /** Challenge ACKs per second, stack-wide (RFC 5961 §7; Linux tcp_challenge_ack_limit). */
  challengeAckLimit: number;
  congestion: 'cubic' | 'newreno';
  sack: boolean;
  timestamps: boolean;
  windowScaling: boolean;
  minRto: number;
}

export const DEFAULT_CONFIG: TcpConfig = {
  rcvBuf: 4 * 1024 * 1024,
  sndBuf: 1024 * 1024,
  maxConnections: 16384,
  maxPendingSyns: 256,
  maxOooRanges: 32,
  timeWaitMs: 60_000,
  finWait2Ms: 60_000,
  synRetries: 6,
  maxRetries: 15,
  delayedAckMs: 40,
  nagle: false,
  keepalive: null,
  challengeAckLimit: 1000,
  congestion: 'cubic',
  sack: true,
  timestamps: true,
  windowScaling: true,
  minRto: 200,
};

export interface StackContext {
  readonly clock: Clock;
  readonly counters: Counters;
  readonly ip: Ip4Output;
  readonly cfg: TcpConfig;
  /** Scratch repr for building outgoing segments (the engine is single-threaded). */
  readonly tx: TcpRepr;
  /** Queue the connection for delivery/ACK work at the next flush(). */
  markDirty(c: TcpConnection): void;
  /** The connection reached CLOSED: forget it. */
  remove(c: TcpConnection): void;
  /** RFC 5961 §7 rate limit: true if one more challenge ACK may be sent now. */
  allowChallengeAck(): boolean;
  /** Autocorking: send this connection's held-back partial segment at the end of the I/O turn. */
  uncorkLater(c: TcpConnection): void;
  /** The TCP offload (offload.ts): take `c` back before touching it (it is c.offload's). */
  reclaim(c: TcpConnection): void;
  /** The engine handled `c`: the offload may adopt it after this burst. */
  touched(c: TcpConnection): void;
}
