/**
 * Test harness for the TCP engine: a fake IPv4 output that captures segments, two stacks
 * wired back to back on one ManualClock through a deterministic (seeded) faulty link, and
 * helpers to inject hand-built segments.
 */
import { ManualClock } from '../../../netstack/time.js';
import { Counters } from '../../../netstack/counters.js';
import { TcpStack, type TcpStackOptions } from '../../../netstack/tcp/stack.js';
import type { Ip4Output } from '../../../netstack/tcp/ip.js';
import { emitTcp, newTcpRepr, parseTcp, tcpFlagsStr, type TcpRepr } from '../../../netstack/wire/tcp.js';
import type { TcpConnection } from '../../../netstack/tcp/connection.js';

export const A_IP = 0x0a000001; // 10.0.0.1
export const B_IP = 0x0a000002; // 10.0.0.2

export interface Captured {
  src: number;
  dst: number;
  seg: Uint8Array;
}

export class FakeIp implements Ip4Output {
  readonly headroom = 34;
  readonly scratch = new Uint8Array(65535 + this.headroom);
  sent: Captured[] = [];
  constructor(public mtu = 1500) {}
  send4(src: number, dst: number, proto: number, len: number): boolean {
    if (proto !== 6) throw new Error('not TCP');
    this.sent.push({ src, dst, seg: this.scratch.slice(this.headroom, this.headroom + len) });
    return true;
  }
  mtuTo(): number {
    return this.mtu;
  }
  /** Take and parse everything sent so far. */
  take(): Array<TcpRepr & { data: Uint8Array; f: string }> {
    const out = this.sent.map((p) => {
      const r = parseTcp(p.seg)!;
      return Object.assign(r, { data: p.seg.subarray(r.headerLen), f: tcpFlagsStr(r.flags) });
    });
    this.sent = [];
    return out;
  }
}

/** mulberry32: a tiny seeded PRNG so lossy-link tests are reproducible. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface LinkFaults {
  drop?: number;
  dup?: number;
  reorder?: number;
  seed?: number;
  /** Decide per segment (after the random faults): return false to drop it. */
  filter?: (r: TcpRepr, fromA: boolean) => boolean;
}

let isnCounter = 1000;

export function makeStack(clock: ManualClock, ip: FakeIp, opts: Partial<TcpStackOptions> = {}): { stack: TcpStack; counters: Counters } {
  const counters = new Counters();
  const base = (isnCounter += 1_000_000);
  let n = 0;
  const stack = new TcpStack({ clock, counters, ip, isn: () => (base + n++ * 7919) >>> 0, ...opts });
  return { stack, counters };
}

export class Pair {
  readonly clock = new ManualClock(1000);
  readonly ipA: FakeIp;
  readonly ipB: FakeIp;
  readonly a: TcpStack;
  readonly b: TcpStack;
  readonly ca: Counters;
  readonly cb: Counters;
  faults: LinkFaults = {};
  private rand = rng(1);
  /** Every segment that crossed the link (after faults), for assertions. */
  log: Array<{ fromA: boolean; r: TcpRepr; len: number }> = [];
  delivered = 0;

  constructor(optsA: Partial<TcpStackOptions> = {}, optsB: Partial<TcpStackOptions> = {}, mtu = 1500) {
    this.ipA = new FakeIp(mtu);
    this.ipB = new FakeIp(mtu);
    ({ stack: this.a, counters: this.ca } = makeStack(this.clock, this.ipA, optsA));
    ({ stack: this.b, counters: this.cb } = makeStack(this.clock, this.ipB, optsB));
  }

  setFaults(f: LinkFaults): void {
    this.faults = f;
    this.rand = rng(f.seed ?? 1);
  }

  /** A connects to B:port; B accepts through onSyn. Returns both ends after the handshake. */
  open(port = 80, accept = true): { ca: TcpConnection; cb: TcpConnection | null } {
    let cb: TcpConnection | null = null;
    this.b.onSyn = (syn) => {
      if (accept) cb = syn.accept();
      else syn.reset();
    };
    const ca = this.a.connect({ localIp: A_IP, localPort: 40000 + (this.ports++ % 20000), remoteIp: B_IP, remotePort: port });
    this.pump();
    return { ca, cb };
  }
  private ports = 0;

  /** Move one direction's queued segments across, applying faults. */
  private cross(from: FakeIp, to: TcpStack, fromA: boolean): number {
    const pkts = from.sent;
    from.sent = [];
    const f = this.faults;
    const out: Captured[] = [];
    let held: Captured | null = null;
    for (const p of pkts) {
      if (f.drop && this.rand() < f.drop) continue;
      if (f.filter) {
        const r = parseTcp(p.seg)!;
        if (!f.filter(r, fromA)) continue;
      }
      if (f.reorder && !held && this.rand() < f.reorder) {
        held = p;
        continue;
      }
      out.push(p);
      if (f.dup && this.rand() < f.dup) out.push(p);
      if (held) {
        out.push(held);
        held = null;
      }
    }
    if (held) out.push(held);
    for (const p of out) {
      const r = parseTcp(p.seg)!;
      this.log.push({ fromA, r, len: p.seg.length - r.headerLen });
      to.input(p.src, p.dst, p.seg);
    }
    to.flush();
    this.delivered += out.length;
    return pkts.length;
  }

  /** Exchange segments until both directions are quiet (no time passes). */
  pump(maxRounds = 100_000): void {
    for (let i = 0; i < maxRounds; i++) {
      const n = this.cross(this.ipA, this.b, true) + this.cross(this.ipB, this.a, false);
      if (n === 0) return;
    }
    throw new Error('pump: no quiescence');
  }

  /** Let `ms` pass, firing timers in order and exchanging segments after each. */
  run(ms: number, until?: () => boolean): void {
    const end = this.clock.now() + ms;
    this.pump();
    for (;;) {
      if (until?.()) return;
      const next = this.clock.nextDeadline();
      if (next < 0 || next > end) break;
      this.clock.advance(Math.max(0, next - this.clock.now()));
      this.pump();
    }
    this.clock.advance(Math.max(0, end - this.clock.now()));
    this.pump();
  }
}

/** Build a segment from `r` (+ payload) and hand it to `stack` as if from src→dst. */
export function inject(stack: TcpStack, src: number, dst: number, r: Partial<TcpRepr>, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const full: TcpRepr = { ...newTcpRepr(), ...r, sackBlocks: r.sackBlocks ?? [], payloadLen: payload.length };
  const buf = new Uint8Array(60 + payload.length);
  const n = emitTcp(full, payload, buf, 0, src, dst);
  const seg = buf.subarray(0, n);
  stack.input(src, dst, seg);
  stack.flush();
  return seg;
}

export function pattern(n: number, seed = 7): Uint8Array {
  const out = new Uint8Array(n);
  const r = rng(seed);
  for (let i = 0; i < n; i += 4) {
    const v = (r() * 4294967296) >>> 0;
    out[i] = v & 0xff;
    if (i + 1 < n) out[i + 1] = (v >>> 8) & 0xff;
    if (i + 2 < n) out[i + 2] = (v >>> 16) & 0xff;
    if (i + 3 < n) out[i + 3] = v >>> 24;
  }
  return out;
}

export function concat(chunks: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const c of chunks) n += c.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

/** Write `data` through `conn` respecting backpressure ('drain'), then end() if asked. */
export function writeAll(conn: TcpConnection, data: Uint8Array, chunk = 64 * 1024, endAfter = true): void {
  let off = 0;
  const pumpWrites = (): void => {
    while (off < data.length) {
      const n = Math.min(chunk, data.length - off);
      const ok = conn.write(data.subarray(off, off + n));
      off += n;
      if (!ok) return;
    }
    if (endAfter) conn.end();
    conn.off('drain', pumpWrites);
  };
  conn.on('drain', pumpWrites);
  pumpWrites();
}

/** Collect 'data' into an array; `end` flag when 'end' arrives. */
export function collect(conn: TcpConnection): { chunks: Uint8Array[]; ended: boolean; bytes: () => Uint8Array; length: () => number } {
  const st = {
    chunks: [] as Uint8Array[],
    ended: false,
    bytes: () => concat(st.chunks),
    length: () => st.chunks.reduce((s, c) => s + c.length, 0),
  };
  conn.on('data', (d) => st.chunks.push(d));
  conn.on('end', () => (st.ended = true));
  return st;
}

/**
 * A hand-driven peer for precise packet tests: it talks to one stack through inject()
 * and reads what the stack sent. `seq` is the peer's next sequence number.
 */
export class RawPeer {
  readonly clock = new ManualClock(1000);
  readonly ip: FakeIp;
  readonly stack: TcpStack;
  readonly counters: Counters;
  conn!: TcpConnection;
  seq = 5000;
  /** The stack's ISS + 1 after the handshake (what we acknowledge). */
  ack = 0;
  port = 33000;
  ts = 100;
  useTs: boolean;

  constructor(opts: Partial<TcpStackOptions> = {}, private readonly synOpts: Partial<TcpRepr> = { mss: 1460, wscale: 7, sackPermitted: true, tsPresent: true }, mtu = 1500) {
    this.ip = new FakeIp(mtu);
    ({ stack: this.stack, counters: this.counters } = makeStack(this.clock, this.ip, opts));
    this.useTs = synOpts.tsPresent === true;
  }

  /** Passive open on the stack's side (the peer sends the SYN). Returns the SYN-ACK. */
  handshake(window = 65535): TcpRepr {
    this.stack.onSyn = (s) => {
      this.conn = s.accept();
    };
    this.send({ flags: 2, window, ...this.synOpts, tsval: this.ts, tsecr: 0 }, undefined, false);
    const [synack] = this.ip.take();
    this.seq = (this.seq + 1) >>> 0;
    this.ack = (synack!.seq + 1) >>> 0;
    this.send({ flags: 0x10, window });
    return synack!;
  }

  /** Inject a segment from the peer. Defaults: ACK of everything, current seq, timestamps. */
  send(r: Partial<TcpRepr>, payload?: Uint8Array, advance = true): void {
    const full: Partial<TcpRepr> = {
      srcPort: this.port, dstPort: 80, seq: this.seq, ack: this.ack, flags: 0x10, window: 65535,
      tsPresent: this.useTs, tsval: this.ts, tsecr: 0,
      ...r,
    };
    inject(this.stack, B_IP, A_IP, full, payload);
    if (advance && r.seq === undefined) this.seq = (this.seq + (payload?.length ?? 0)) >>> 0;
  }

  take(): ReturnType<FakeIp['take']> {
    return this.ip.take();
  }
}
