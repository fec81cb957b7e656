/**
 * The TCP layer: demultiplexing segments to connections, SYNs for unknown tuples (the NAT's
 * entry point, `onSyn`), RSTs for segments that match nothing (RFC 9293 §3.10.7.1),
 * TIME_WAIT reuse (RFC 6191), active opens, limits, and the per-batch flush.
 *
 * The IPv4 layer calls input() for every segment (borrowed bytes; checksum verified here)
 * and flush() once per received batch; flush() delivers data to applications and sends
 * the coalesced ACKs.
 */
import type { Clock } from '../time.js';
import type { Counters } from '../counters.js';
import { emitTcp, newTcpRepr, parseTcpInto, TCP_HLEN, TCP_PROTO, TcpFlag, tcpChecksumOk, type TcpRepr } from '../wire/tcp.js';
import { DEFAULT_CONFIG, type StackContext, type TcpConfig } from './config.js';
import { TcpConnection, type TcpTuple } from './connection.js';
import { TcpError } from './errors.js';
import { segmentArrives, negotiate } from './input.js';
import type { Ip4Output } from './ip.js';
import type { TcpOffloader } from './offload.js';
import { output, sendSyn, sendSynAck, updateTimer } from './output.js';
import { seqAdd, seqGt } from './seq.js';
import { TcpState } from './state.js';

const { FIN, SYN, RST, ACK } = TcpFlag;

export interface TcpStackOptions extends Partial<TcpConfig> {
  clock: Clock;
  counters: Counters;
  ip: Ip4Output;
  /** Initial sequence numbers (RFC 9293 §3.4.1 / RFC 6528); injectable for tests. Default: random. */
  isn?: () => number;
  /**
   * Run `fn` once the current I/O turn is over (autocorking, see output.ts). Default
   * setImmediate: after every descriptor that woke together was served. Not a timer: nothing
   * waits on the clock.
   */
  defer?: (fn: () => void) => void;
}

/** Options of a received SYN, for the onSyn handler (and logs). */
export interface SynOptions {
  mss: number;
  wscale: number;
  sackPermitted: boolean;
  timestamps: boolean;
  window: number;
}

export interface PendingSyn {
  readonly tuple: Readonly<TcpTuple>;
  readonly options: Readonly<SynOptions>;
  /** The peer's initial sequence number (e.g. to quote the SYN in an ICMP error). */
  readonly irs: number;
  /** Create the connection and send the SYN-ACK now. Throws if already decided. */
  accept(): TcpConnection;
  /** Refuse: RST,ACK to the SYN (ECONNREFUSED for the peer). */
  reset(): void;
  /** Forget silently; the peer retransmits its SYN, which calls onSyn again. */
  drop(): void;
}

export interface TcpStackStats {
  connections: number;
  pendingSyns: number;
  byState: Record<string, number>;
}

function localKey(ip: number, port: number): number {
  return ip * 65536 + port;
}

class Pending implements PendingSyn {
  decided = false;
  readonly syn: TcpRepr;

  constructor(readonly stack: TcpStack, readonly tuple: TcpTuple, syn: TcpRepr, readonly options: SynOptions) {
    this.syn = { ...syn, sackBlocks: [] };
  }

  get irs(): number {
    return this.syn.seq;
  }

  accept(): TcpConnection {
    if (this.decided) throw new Error('pending SYN already decided');
    this.decided = true;
    return this.stack.acceptPending(this);
  }

  reset(): void {
    if (this.decided) return;
    this.decided = true;
    this.stack.forgetPending(this);
    // RFC 9293 §3.10.7.1 for a SYN: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    this.stack.sendRstFor(this.tuple, 0, seqAdd(this.syn.seq, 1), RST | ACK);
    this.stack.counters.inc('tcp.syn.refused');
  }

  drop(): void {
    if (this.decided) return;
    this.decided = true;
    this.stack.forgetPending(this);
  }
}

export class TcpStack {
  /** Called for a SYN that matches no connection. Without a handler such SYNs get a RST. */
  onSyn: ((syn: PendingSyn) => void) | null = null;
  readonly cfg: TcpConfig;
  readonly clock: Clock;
  readonly counters: Counters;
  readonly ip: Ip4Output;
  private readonly isn: () => number;
  /** local (ip,port) → remote (ip,port) → connection. Numeric keys: no allocation per lookup. */
  private readonly table = new Map<number, Map<number, TcpConnection>>();
  /**
   * The connection the last segment belonged to (null once it leaves the table): consecutive
   * segments of one connection (request/response, bulk) skip the two lookups above, whose
   * 48-bit keys are heap numbers.
   */
  private last: TcpConnection | null = null;
  private readonly pending = new Map<number, Map<number, Pending>>();
  private count = 0;
  private pendingCount = 0;
  private dirty: TcpConnection[] = [];
  private readonly rx: TcpRepr = newTcpRepr();
  private readonly ctx: StackContext;
  private challengeWindowStart = -Infinity;
  private challengeCount = 0;

  constructor(opts: TcpStackOptions) {
    const { clock, counters, ip, isn, defer, ...rest } = opts;
    const deferFn = defer ?? ((fn: () => void) => void setImmediate(fn));
    this.cfg = { ...DEFAULT_CONFIG, ...stripUndefined(rest) };
    this.clock = clock;
    this.counters = counters;
    this.ip = ip;
    this.isn = isn ?? randomIsn;
    const stack = this;
    this.ctx = {
      clock, counters, ip, cfg: this.cfg, tx: newTcpRepr(),
      markDirty(c) {
        c.dirty = true;
        stack.dirty.push(c);
      },
      remove(c) {
        stack.removeConn(c);
      },
      allowChallengeAck() {
        return stack.allowChallengeAck();
      },
      uncorkLater(c) {
        if (c.corked) return;
        c.corked = true;
        stack.corked.push(c);
        if (stack.corked.length === 1) deferFn(() => stack.uncork());
      },
      reclaim(c) {
        stack.offloader?.reclaim(c);
      },
      touched(c) {
        stack.offloader?.touched(c);
      },
    };
  }

  /** The TCP offload of this stack's links, when they have one (network.ts sets it). */
  offloader: TcpOffloader | null = null;

  private corked: TcpConnection[] = [];

  /** End of the I/O turn: push out what autocorking held back. */
  private uncork(): void {
    const list = this.corked;
    this.corked = [];
    for (const c of list) {
      c.corked = false;
      if (c.state !== TcpState.CLOSED) {
        output(c);
        c.emitPending(false);
      }
    }
  }

  // ---------------- receive ----------------

  /** `checksumVerified`: the link vouched for the checksum (a TAP's offload state), skip it. */
  input(src: number, dst: number, segment: Uint8Array, checksumVerified = false): void {
    const counters = this.counters;
    const r = this.rx;
    if (segment.length < TCP_HLEN) {
      counters.inc('tcp.drop.truncated');
      return;
    }
    // Checksum first: a corrupted segment is counted as such, not as whatever field the
    // corruption happened to hit.
    if (!checksumVerified && !tcpChecksumOk(segment, src, dst)) {
      counters.inc('tcp.drop.bad_checksum');
      return;
    }
    const bad = parseTcpInto(segment, r);
    if (bad !== null) {
      counters.inc(`tcp.drop.${bad}`);
      return;
    }
    if (r.srcPort === 0 || r.dstPort === 0) {
      counters.inc('tcp.drop.bad_port');
      return;
    }
    const payload = segment.subarray(r.headerLen);
    let c: TcpConnection | undefined;
    const last = this.last;
    if (last !== null && last.remotePort === r.srcPort && last.localPort === r.dstPort && last.remoteIp === src && last.localIp === dst) {
      c = last;
    } else {
      c = this.table.get(localKey(dst, r.dstPort))?.get(localKey(src, r.srcPort));
      if (c !== undefined) this.last = c;
    }
    if (c && c.state === TcpState.TIME_WAIT && r.flags & SYN && !(r.flags & (ACK | RST))) {
      // RFC 6191 (and RFC 9293 §3.6.1): a new SYN may reuse a TIME_WAIT tuple if it is
      // provably newer — a higher timestamp, or without timestamps a higher sequence number.
      const newer = c.tsOk && r.tsPresent ? seqGt(r.tsval, c.tsRecent) : seqGt(r.seq, c.rcvNxt);
      if (newer) {
        counters.inc('tcp.timewait.reused');
        c.closeNow(null);
        c = undefined;
      }
    }
    if (c) {
      if (c.offload !== null) this.offloader?.reclaim(c);
      segmentArrives(c, r, payload);
      c.emitPending(false);
      return;
    }
    this.noConnection(src, dst, r, payload.length);
  }

  /** A segment for no connection: a new SYN for onSyn, otherwise RST (§3.10.7.1). */
  private noConnection(src: number, dst: number, r: TcpRepr, plen: number): void {
    const f = r.flags;
    const counters = this.counters;
    if (f & RST) {
      counters.inc('tcp.drop.no_socket');
      return;
    }
    const tuple: TcpTuple = { localIp: dst, localPort: r.dstPort, remoteIp: src, remotePort: r.srcPort };
    if (f & SYN && !(f & ACK)) {
      const lk = localKey(dst, r.dstPort);
      const rk = localKey(src, r.srcPort);
      const p = this.pending.get(lk)?.get(rk);
      if (p) {
        // A retransmitted SYN while the handler decides (async dial): keep waiting. Take its
        // options if it is a new attempt (different ISN) so accept() answers the latest one.
        counters.inc('tcp.syn.pending_retransmit');
        if (p.syn.seq !== r.seq) Object.assign(p.syn, { ...r, sackBlocks: [] });
        return;
      }
      if (!this.onSyn) {
        counters.inc('tcp.drop.no_socket');
        this.sendRstFor(tuple, 0, seqAdd(r.seq, 1 + plen + (f & FIN ? 1 : 0)), RST | ACK);
        return;
      }
      if (this.pendingCount >= this.cfg.maxPendingSyns) {
        counters.inc('tcp.drop.syn_backlog');
        return;
      }
      // Pending SYNs become connections when accepted: count them against the limit too.
      if (this.count + this.pendingCount >= this.cfg.maxConnections) {
        counters.inc('tcp.drop.conn_limit');
        return;
      }
      const opts: SynOptions = {
        mss: r.mss,
        wscale: r.wscale,
        sackPermitted: r.sackPermitted,
        timestamps: r.tsPresent,
        window: r.window,
      };
      const pend = new Pending(this, tuple, r, opts);
      let m = this.pending.get(lk);
      if (!m) this.pending.set(lk, (m = new Map()));
      m.set(rk, pend);
      this.pendingCount++;
      counters.inc('tcp.syn.received');
      this.onSyn(pend);
      return;
    }
    counters.inc('tcp.drop.no_socket');
    // §3.10.7.1: ACK set → <SEQ=SEG.ACK><CTL=RST>; else <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    if (f & ACK) this.sendRstFor(tuple, r.ack, 0, RST);
    else this.sendRstFor(tuple, 0, seqAdd(r.seq, plen + (f & SYN ? 1 : 0) + (f & FIN ? 1 : 0)), RST | ACK);
  }

  /** @internal */
  acceptPending(p: Pending): TcpConnection {
    this.forgetPending(p);
    const t = p.tuple;
    if (this.lookup(t)) throw new TcpError('EADDRINUSE');
    const c = new TcpConnection(this.ctx, t, false, this.isn());
    c.irs = p.syn.seq;
    c.rcvNxt = seqAdd(p.syn.seq, 1);
    negotiate(c, p.syn);
    c.sndWnd = p.syn.window;
    c.sndWl1 = p.syn.seq;
    c.state = TcpState.SYN_RECEIVED;
    this.insert(c);
    c.synTime = this.clock.now();
    sendSynAck(c);
    updateTimer(c);
    return c;
  }

  /** @internal */
  forgetPending(p: Pending): void {
    const t = p.tuple;
    const lk = localKey(t.localIp, t.localPort);
    const m = this.pending.get(lk);
    if (m?.delete(localKey(t.remoteIp, t.remotePort))) {
      this.pendingCount--;
      if (m.size === 0) this.pending.delete(lk);
    }
  }

  /** @internal A RST for a tuple without a connection. */
  sendRstFor(t: TcpTuple, seq: number, ack: number, flags: number): void {
    const r = this.ctx.tx;
    r.srcPort = t.localPort;
    r.dstPort = t.remotePort;
    r.seq = seq >>> 0;
    r.ack = ack >>> 0;
    r.flags = flags;
    r.window = 0;
    r.urgent = 0;
    r.mss = 0;
    r.wscale = -1;
    r.sackPermitted = false;
    r.sackBlocks.length = 0;
    r.tsPresent = false;
    r.payloadLen = 0;
    const n = emitTcp(r, null, this.ip.scratch, this.ip.headroom, t.localIp, t.remoteIp, this.ip.csumOffload === true);
    this.counters.inc('tcp.rst.sent');
    this.ip.send4(t.localIp, t.remoteIp, TCP_PROTO, n);
  }

  /** Deliver data and send the ACKs owed after a batch of input(). */
  flush(): void {
    // Handlers may dirty more connections while we go: loop until quiet (bounded).
    for (let round = 0; round < 8 && this.dirty.length > 0; round++) {
      const list = this.dirty;
      this.dirty = [];
      for (const c of list) {
        c.dirty = false;
        c.emitPending(true);
        output(c);
        c.emitPending(false);
        if (c.host !== null) this.offloader?.touched(c);
      }
    }
  }

  // ---------------- active open ----------------

  /** Active open: SYN now; 'connect' when established, 'error' ECONNREFUSED/ETIMEDOUT otherwise. */
  connect(t: TcpTuple): TcpConnection {
    if (this.lookup(t)) throw new TcpError('EADDRINUSE', `${t.localPort}->${t.remotePort}`);
    if (this.count >= this.cfg.maxConnections) throw new TcpError('EMFILE');
    const c = new TcpConnection(this.ctx, { ...t }, true, this.isn());
    c.state = TcpState.SYN_SENT;
    // The receive side is fixed once the peer's SYN shows whether it scales windows; until
    // then our SYN advertises min(65535, rcvBuf).
    c.rcvCap = Math.min(65535, this.cfg.rcvBuf);
    this.insert(c);
    c.synTime = this.clock.now();
    sendSyn(c);
    updateTimer(c);
    return c;
  }

  connections(): IterableIterator<TcpConnection> {
    const all: TcpConnection[] = [];
    for (const m of this.table.values()) for (const c of m.values()) all.push(c);
    return all[Symbol.iterator]();
  }

  stats(): TcpStackStats {
    const byState: Record<string, number> = {};
    for (const c of this.connections()) byState[c.state] = (byState[c.state] ?? 0) + 1;
    return { connections: this.count, pendingSyns: this.pendingCount, byState };
  }

  lookup(t: TcpTuple): TcpConnection | undefined {
    return this.table.get(localKey(t.localIp, t.localPort))?.get(localKey(t.remoteIp, t.remotePort));
  }

  private insert(c: TcpConnection): void {
    const lk = localKey(c.localIp, c.localPort);
    let m = this.table.get(lk);
    if (!m) this.table.set(lk, (m = new Map()));
    m.set(localKey(c.remoteIp, c.remotePort), c);
    this.count++;
  }

  private removeConn(c: TcpConnection): void {
    const lk = localKey(c.localIp, c.localPort);
    const m = this.table.get(lk);
    const rk = localKey(c.remoteIp, c.remotePort);
    if (this.last === c) this.last = null;
    if (m && m.get(rk) === c) {
      m.delete(rk);
      this.count--;
      if (m.size === 0) this.table.delete(lk);
    }
  }

  /** RFC 5961 §7: at most challengeAckLimit challenge ACKs per second, stack-wide. */
  private allowChallengeAck(): boolean {
    const now = this.clock.now();
    if (now - this.challengeWindowStart >= 1000) {
      this.challengeWindowStart = now;
      this.challengeCount = 0;
    }
    if (this.challengeCount >= this.cfg.challengeAckLimit) return false;
    this.challengeCount++;
    return true;
  }
}

function randomIsn(): number {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0]!;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  const out: Partial<T> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  return out;
}
