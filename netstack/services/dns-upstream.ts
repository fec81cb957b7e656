/**
 * Forwarding DNS queries to the host's upstream nameservers, unchanged.
 *
 * The query goes out byte for byte (EDNS, the DO bit, every record type) and the reply comes
 * back byte for byte, so the guest sees exactly what the upstream said: every RCODE, the TC
 * bit, DNSSEC records. Only the ID is touched over UDP: queries from all guests share one
 * socket per upstream, two guests may well pick the same ID at the same time, so each
 * forwarded query gets a fresh random ID (random also to make off-path spoofing harder,
 * RFC 5452 §9.2) and the guest's own ID is written back into the reply.
 *
 * A reply is accepted only when it matches (upstream, ID, question) (RFC 5452 §9.1): the
 * socket is connected to the upstream so the kernel filters the source address, the ID picks
 * the pending query, and the raw question bytes must be the ones we sent.
 *
 * Connected UDP sockets also report ICMP port unreachable as ECONNREFUSED, so an upstream
 * that is down (a stopped systemd-resolved) fails over at once instead of after a timeout.
 *
 * Over TCP (the guest's query came over TCP, typically a retry after a TC reply), each query
 * gets its own connection to the upstream with the 2-byte length framing of RFC 1035 §4.2.2;
 * the ID needs no remapping since nothing else shares the connection.
 *
 * Timeouts use the injected Clock. Each attempt waits `timeoutMs`, then the next upstream is
 * tried (round robin from the preferred one, the last that answered), `attempts` in all.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { randomInt } from 'node:crypto';
import type { Clock, Timer } from '../time.js';
import type { Counters } from '../counters.js';
import type { Upstream } from './resolv-conf.js';
import { HEADER_LEN, readFlags, readId, sameQuestion, writeId, FLAG_QR } from './dns-header.js';

export interface ForwarderOptions {
  upstreams: Upstream[];
  clock: Clock;
  counters: Counters;
  /** Per attempt. */
  timeoutMs: number;
  /** Total attempts across upstreams (>= 1). */
  attempts: number;
}

/** One forwarded query's current attempt over UDP. */
interface UdpPending {
  id: number;
  /** The bytes sent (remapped ID), kept to match the reply's question. */
  query: Uint8Array;
  origId: number;
  qEnd: number;
  settle: (reply: Uint8Array | null) => void;
  timer: Timer;
}

/** A connected UDP socket to one upstream and the queries waiting on it. */
class UdpUpstream {
  private sock: dgram.Socket | null = null;
  private connected = false;
  private queue: Uint8Array[] = [];
  readonly pending = new Map<number, UdpPending>();

  constructor(
    readonly upstream: Upstream,
    private readonly counters: Counters,
  ) {}

  /** A random ID not used by a query pending on this upstream. */
  freshId(): number {
    for (;;) {
      const id = randomInt(65536);
      if (!this.pending.has(id)) return id;
    }
  }

  send(msg: Uint8Array, onError: () => void): void {
    const sock = this.socket();
    if (!this.connected) {
      this.queue.push(msg);
      return;
    }
    sock.send(msg, (err) => {
      if (err) onError();
    });
  }

  private socket(): dgram.Socket {
    if (this.sock) return this.sock;
    const type = net.isIPv6(this.upstream.host) ? 'udp6' : 'udp4';
    const sock = dgram.createSocket({ type });
    this.sock = sock;
    this.connected = false;
    sock.on('message', (buf) => this.onMessage(buf));
    // Errors on a connected UDP socket are ICMP errors for what we sent (ECONNREFUSED,
    // EHOSTUNREACH) or a failed connect: every query waiting on this upstream has failed.
    sock.on('error', () => this.fail(sock));
    // With a callback, Node reports a failed connect (ENETUNREACH for an IPv6 upstream on a
    // host without IPv6) there rather than as an 'error' event.
    sock.connect(this.upstream.port, this.upstream.host, (err?: Error) => {
      if (this.sock !== sock) return;
      if (err) {
        this.fail(sock);
        return;
      }
      this.connected = true;
      const q = this.queue;
      this.queue = [];
      for (const m of q) {
        sock.send(m, (err) => {
          if (err) this.failId(readId(m));
        });
      }
    });
    return sock;
  }

  private onMessage(buf: Buffer): void {
    if (buf.length < HEADER_LEN || (readFlags(buf) & FLAG_QR) === 0) {
      this.counters.inc('dns.drop.upstream_malformed');
      return;
    }
    const p = this.pending.get(readId(buf));
    if (!p) {
      this.counters.inc('dns.drop.upstream_unmatched');
      return;
    }
    // A reply may omit the question only to say it could not read it (FORMERR, NOTIMP...);
    // otherwise the question must be the one we asked (RFC 5452 §9.1).
    const qd = (buf[4]! << 8) | buf[5]!;
    const rcode = buf[3]! & 0xf;
    if (!(qd === 0 && rcode !== 0) && !sameQuestion(p.query, p.qEnd, buf)) {
      this.counters.inc('dns.drop.upstream_unmatched');
      return;
    }
    this.pending.delete(p.id);
    p.timer.cancel();
    writeId(buf, p.origId);
    p.settle(buf);
  }

  private failId(id: number): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    p.timer.cancel();
    this.counters.inc('dns.upstream.error');
    p.settle(null);
  }

  private fail(sock: dgram.Socket): void {
    if (this.sock !== sock) return;
    this.sock = null;
    this.connected = false;
    this.queue = [];
    try {
      sock.close();
    } catch {
      // already closed
    }
    for (const id of [...this.pending.keys()]) this.failId(id);
  }

  close(): void {
    const sock = this.sock;
    this.sock = null;
    this.queue = [];
    if (sock) {
      try {
        sock.close();
      } catch {
        // already closed
      }
    }
  }
}

export class DnsForwarder {
  private readonly udp: UdpUpstream[];
  private readonly tcpSockets = new Set<net.Socket>();
  private readonly live = new Set<() => void>();
  /** Index of the upstream that answered last: new queries start there. */
  private preferred = 0;
  private closed = false;

  constructor(private readonly opts: ForwarderOptions) {
    this.udp = opts.upstreams.map((u) => new UdpUpstream(u, opts.counters));
  }

  get upstreamCount(): number {
    return this.udp.length;
  }

  /**
   * Forward `msg` (a copy the forwarder may keep; its first question ends at `qEnd`).
   * Resolves to the upstream's reply, or null when no upstream answered. Never rejects.
   */
  forward(msg: Uint8Array, qEnd: number, transport: 'udp' | 'tcp'): Promise<Uint8Array | null> {
    if (this.closed || this.udp.length === 0) return Promise.resolve(null);
    return new Promise((resolve) => {
      const start = this.preferred;
      const n = this.udp.length;
      let attempt = 0;
      let cancelCurrent: (() => void) | null = null;
      const finish = (reply: Uint8Array | null): void => {
        this.live.delete(abort);
        resolve(reply);
      };
      const abort = (): void => {
        cancelCurrent?.();
        finish(null);
      };
      this.live.add(abort);
      const next = (): void => {
        if (this.closed) return;
        if (attempt >= this.opts.attempts) {
          finish(null);
          return;
        }
        const idx = (start + attempt) % n;
        attempt++;
        const onDone = (reply: Uint8Array | null): void => {
          cancelCurrent = null;
          if (reply) {
            this.preferred = idx;
            finish(reply);
          } else next();
        };
        cancelCurrent =
          transport === 'tcp' ? this.tryTcp(idx, msg, qEnd, onDone) : this.tryUdp(idx, msg, qEnd, onDone);
      };
      next();
    });
  }

  /** One UDP attempt. Returns a function that abandons it. */
  private tryUdp(idx: number, msg: Uint8Array, qEnd: number, done: (r: Uint8Array | null) => void): () => void {
    const u = this.udp[idx]!;
    const id = u.freshId();
    const out = new Uint8Array(msg);
    writeId(out, id);
    let settled = false;
    const settle = (r: Uint8Array | null): void => {
      if (settled) return;
      settled = true;
      u.pending.delete(id);
      timer.cancel();
      done(r);
    };
    const timer = this.opts.clock.timer(() => {
      this.opts.counters.inc('dns.upstream.timeout');
      settle(null);
    });
    u.pending.set(id, { id, query: out, origId: readId(msg), qEnd, settle, timer });
    timer.arm(this.opts.timeoutMs);
    this.opts.counters.inc('dns.upstream.udp');
    u.send(out, () => {
      this.opts.counters.inc('dns.upstream.error');
      settle(null);
    });
    return () => {
      settled = true;
      u.pending.delete(id);
      timer.cancel();
    };
  }

  /** One TCP attempt: a connection of its own, 2-byte length framing (RFC 1035 §4.2.2). */
  private tryTcp(idx: number, msg: Uint8Array, qEnd: number, done: (r: Uint8Array | null) => void): () => void {
    const up = this.udp[idx]!.upstream;
    const counters = this.opts.counters;
    counters.inc('dns.upstream.tcp');
    const sock = net.connect({ host: up.host, port: up.port });
    this.tcpSockets.add(sock);
    let settled = false;
    const chunks: Buffer[] = [];
    let have = 0;
    const settle = (r: Uint8Array | null): void => {
      if (settled) return;
      settled = true;
      timer.cancel();
      this.tcpSockets.delete(sock);
      sock.destroy();
      done(r);
    };
    const timer = this.opts.clock.timer(() => {
      counters.inc('dns.upstream.timeout');
      settle(null);
    });
    timer.arm(this.opts.timeoutMs);
    const framed = Buffer.allocUnsafe(2 + msg.length);
    framed.writeUInt16BE(msg.length, 0);
    framed.set(msg, 2);
    sock.on('connect', () => sock.write(framed));
    sock.on('error', () => {
      if (!settled) counters.inc('dns.upstream.error');
      settle(null);
    });
    sock.on('close', () => {
      if (!settled) counters.inc('dns.upstream.error');
      settle(null);
    });
    sock.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      have += chunk.length;
      if (have < 2) return;
      const all = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, have);
      chunks.length = 0;
      chunks.push(all);
      const len = all.readUInt16BE(0);
      if (have < 2 + len) return;
      const reply = all.subarray(2, 2 + len);
      const qd = reply.length >= HEADER_LEN ? reply.readUInt16BE(4) : 0;
      const ok =
        reply.length >= HEADER_LEN &&
        (readFlags(reply) & FLAG_QR) !== 0 &&
        readId(reply) === readId(msg) &&
        ((qd === 0 && (reply[3]! & 0xf) !== 0) || sameQuestion(msg, qEnd, reply));
      if (!ok) {
        counters.inc('dns.drop.upstream_unmatched');
        settle(null);
        return;
      }
      settle(reply);
    });
    return () => {
      settled = true;
      timer.cancel();
      this.tcpSockets.delete(sock);
      sock.destroy();
    };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const abort of [...this.live]) abort();
    for (const u of this.udp) u.close();
    for (const s of this.tcpSockets) s.destroy();
    this.tcpSockets.clear();
  }
}
