/**
 * The DNS service on the gateway.
 *
 * Transport-independent: the stack's UDP layer (and later its TCP layer, which owns the 2-byte
 * length framing) hands over the bytes of one query and sends back whatever `query` returns.
 *
 * What a query gets, in order:
 *  1. Unreadable (shorter than a header): dropped, `dns.drop.malformed`. A response (QR=1)
 *     sent to us: dropped, `dns.drop.response` (answering it could loop two servers).
 *  2. Not a standard query (opcode != QUERY): NOTIMP, as RFC 1035 §4.1.1 allows.
 *  3. Not exactly one readable question, or dns-packet cannot decode the message: FORMERR.
 *  4. A name we own: answered here, authoritative (AA). Names in the table (gateway, host,
 *     machines) and their aliases get their A/AAAA records; a type we have no data for gets
 *     NODATA (NOERROR, empty answer, our SOA in authority: RFC 2308 §2.2), not NXDOMAIN,
 *     which would tell the client's resolver the name does not exist for any type. Any other
 *     name under the zone gets NXDOMAIN (we are the zone's only server). PTR for addresses in
 *     the table is answered too.
 *  5. Anything else is forwarded unchanged to the upstreams (dns-upstream.ts) and the reply
 *     returned unchanged. The number of queries in flight is bounded; beyond it queries are
 *     dropped (`dns.drop.overload`), as dnsmasq does at dns-forward-max, so clients retry later.
 *  6. No upstream answered: A/AAAA are answered from the host's own resolver (getaddrinfo, so
 *     /etc/hosts works), everything else gets SERVFAIL.
 *
 * `query` never rejects and never throws: hostile bytes are a normal input.
 */
import dnsPacket from 'dns-packet';
import type { Answer, DecodedPacket, OptAnswer, Packet, Question } from 'dns-packet';
import { lookup } from 'node:dns/promises';
import { isIPv4, isIPv6 } from 'node:net';
import type { Clock } from '../time.js';
import type { Counters } from '../counters.js';
import { DnsRecords, isValidName, normalizeName } from './dns-records.js';
import { DnsForwarder } from './dns-upstream.js';
import type { Upstream } from './resolv-conf.js';
import {
  FLAG_AA,
  FLAG_QR,
  FLAG_RA,
  FLAG_RD,
  FLAG_TC,
  HEADER_LEN,
  Rcode,
  errorResponse,
  opcodeOf,
  questionEnd,
  readFlags,
  readQdcount,
} from './dns-header.js';

export { DnsRecords } from './dns-records.js';
export { parseUpstream, upstreamsFromResolvConf, readResolvConf, type Upstream } from './resolv-conf.js';

export type HostLookup = (name: string, family: 4 | 6) => Promise<string[]>;

export interface DnsClient {
  ip: string;
  port: number;
  transport: 'udp' | 'tcp';
}

export interface DnsServiceOptions {
  /** The zone we own, e.g. 'tender.internal'. */
  zone: string;
  /** From --dns-upstream or /etc/resolv.conf; tried in order, IPv6 allowed. */
  upstreams: Upstream[];
  clock: Clock;
  counters: Counters;
  /** Per upstream attempt. Default 2000 ms. */
  timeoutMs?: number;
  /** Attempts in all, each on the next upstream. Default max(2, number of upstreams). */
  attempts?: number;
  /** Queries forwarded (or in fallback) at once. Default 256. */
  maxOutstanding?: number;
  /** TTL of local answers. Default 0, as dnsmasq's --local-ttl: leases change under us. */
  localTtl?: number;
  /** The host's resolver for the fallback. Default: node:dns lookup (getaddrinfo). */
  hostLookup?: HostLookup;
  /** Address of gateway.<zone> (and gateway.containers/docker.internal), if known now. */
  gateway?: string;
  /** Address of host.<zone> (and host.containers/docker.internal), if known now. */
  host?: string;
}

/** Negative-caching TTL in our SOA (RFC 2308 §5): short, since machines come and go. */
const NEGATIVE_TTL = 5;
/** What we advertise in EDNS responses: the DNS Flag Day 2020 size, safe without fragments. */
const EDNS_UDP_SIZE = 1232;
/** RFC 6891 §6.1.3: BADVERS is extended RCODE 16, i.e. 1 in the OPT's upper 8 bits. */
const BADVERS_HIGH = 1;

async function defaultHostLookup(name: string, family: 4 | 6): Promise<string[]> {
  const res = await lookup(name, { family, all: true });
  return res.map((r) => r.address);
}

export class DnsService {
  readonly records = new DnsRecords();
  private readonly zone: string;
  private readonly clock: Clock;
  private readonly counters: Counters;
  private readonly forwarder: DnsForwarder;
  private readonly hostLookup: HostLookup;
  private readonly timeoutMs: number;
  private readonly maxOutstanding: number;
  private readonly localTtl: number;
  private outstanding = 0;
  private closed = false;
  private readonly closers = new Set<() => void>();

  constructor(opts: DnsServiceOptions) {
    this.zone = normalizeName(opts.zone);
    this.clock = opts.clock;
    this.counters = opts.counters;
    this.timeoutMs = opts.timeoutMs ?? 2000;
    this.maxOutstanding = opts.maxOutstanding ?? 256;
    this.localTtl = opts.localTtl ?? 0;
    this.hostLookup = opts.hostLookup ?? defaultHostLookup;
    this.forwarder = new DnsForwarder({
      upstreams: opts.upstreams,
      clock: opts.clock,
      counters: opts.counters,
      timeoutMs: this.timeoutMs,
      attempts: Math.max(1, opts.attempts ?? Math.max(2, opts.upstreams.length)),
    });
    // The names gvisor-tap-vsock, Podman and Docker Desktop guests already use.
    for (const suffix of ['containers.internal', 'docker.internal']) {
      this.records.alias(`gateway.${suffix}`, `gateway.${this.zone}`);
      this.records.alias(`host.${suffix}`, `host.${this.zone}`);
    }
    if (opts.gateway !== undefined && !this.records.add(`gateway.${this.zone}`, opts.gateway)) {
      throw new RangeError(`bad gateway address: ${opts.gateway}`);
    }
    if (opts.host !== undefined && !this.records.add(`host.${this.zone}`, opts.host)) {
      throw new RangeError(`bad host address: ${opts.host}`);
    }
  }

  /**
   * Publish `<hostname>.<zone>` for a DHCP lease. The hostname is the guest's (option 12), so
   * hostile: only its first label is used, lower-cased; invalid names are refused (false).
   */
  addMachine(hostname: string, address: string): boolean {
    const label = hostname.split('.')[0]!.toLowerCase();
    if (!isValidName(label)) return false;
    return this.records.add(`${label}.${this.zone}`, address);
  }

  /** Withdraw a machine's name (one address, or all of them). */
  removeMachine(hostname: string, address?: string): boolean {
    const label = hostname.split('.')[0]!.toLowerCase();
    return this.records.remove(`${label}.${this.zone}`, address);
  }

  /** Answer one query. Resolves to the response bytes, or null to drop (counted). Never rejects. */
  async query(msg: Uint8Array, client: DnsClient): Promise<Uint8Array | null> {
    try {
      return await this.handle(msg, client);
    } catch {
      // Not expected: every path above handles its own failures. Keep serving regardless.
      this.counters.inc('dns.drop.internal_error');
      return null;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.forwarder.close();
    for (const c of [...this.closers]) c();
  }

  private async handle(input: Uint8Array, client: DnsClient): Promise<Uint8Array | null> {
    this.counters.inc('dns.query');
    if (this.closed) {
      this.counters.inc('dns.drop.closed');
      return null;
    }
    if (input.length < HEADER_LEN) {
      this.counters.inc('dns.drop.malformed');
      return null;
    }
    // The caller's buffer is only lent for this call (link.ts borrowing rule); we keep bytes
    // across awaits, so take a copy. DNS is not a per-packet hot path.
    const msg = Buffer.from(input);
    const flags = readFlags(msg);
    if (flags & FLAG_QR) {
      this.counters.inc('dns.drop.response');
      return null;
    }
    const qEnd = questionEnd(msg);
    if (opcodeOf(flags) !== 0) {
      this.counters.inc('dns.notimp');
      return errorResponse(msg, Rcode.NotImp, readQdcount(msg) === 1 ? qEnd : -1);
    }
    if (readQdcount(msg) !== 1 || qEnd < 0) return this.formerr(msg);
    let decoded: DecodedPacket;
    try {
      decoded = dnsPacket.decode(msg);
    } catch {
      return this.formerr(msg);
    }
    // dns-packet clamps some reads (option data) instead of failing: a record that claims
    // more bytes than the message holds shows up as a decoded length past the end.
    if (dnsPacket.decode.bytes > msg.length) return this.formerr(msg);
    const q = decoded.questions?.[0];
    if (!q) return this.formerr(msg);

    const local = this.answerLocal(decoded, q, client.transport);
    if (local) {
      this.counters.inc('dns.local');
      return local;
    }

    if (this.outstanding >= this.maxOutstanding) {
      this.counters.inc('dns.drop.overload');
      return null;
    }
    this.outstanding++;
    this.counters.inc('dns.forwarded');
    try {
      const reply = await this.forwarder.forward(msg, qEnd, client.transport);
      if (reply) return reply;
      if (this.closed) return null;
      return await this.fallback(msg, decoded, q, qEnd);
    } finally {
      this.outstanding--;
    }
  }

  private formerr(msg: Uint8Array): Uint8Array {
    this.counters.inc('dns.formerr');
    return errorResponse(msg, Rcode.FormErr, -1);
  }

  private servfail(msg: Uint8Array, qEnd: number): Uint8Array {
    this.counters.inc('dns.servfail');
    return errorResponse(msg, Rcode.ServFail, qEnd);
  }

  // ---- local answers ----

  /** The response for a name we own, or null when the query is not ours to answer. */
  private answerLocal(query: DecodedPacket, q: Question, transport: 'udp' | 'tcp'): Uint8Array | null {
    const name = normalizeName(q.name);
    const zone = this.zone;
    const inZone = name === zone || name.endsWith('.' + zone);
    const entry = this.records.resolve(name);
    const ptrNames = q.type === 'PTR' && !entry ? this.records.namesForReverse(name) : [];
    if (!entry && !inZone && ptrNames.length === 0) return null;

    const klass = q.class ?? 'IN';
    if (klass !== 'IN' && klass !== 'ANY') {
      // Our data is class IN only; other classes (CH, HS) for our names are refused.
      return this.encodeLocal(query, q, Rcode.Refused, [], [], transport);
    }

    const ttl = this.localTtl;
    // A string: dns-packet's RecordType has no 'ANY' (255) though its decoder produces it.
    const qtype: string = q.type;
    const answers: Answer[] = [];
    if (entry) {
      if (qtype === 'A' || qtype === 'ANY') {
        for (const a of entry.a) answers.push({ type: 'A', name: q.name, ttl, class: 'IN', data: a });
      }
      if (qtype === 'AAAA' || qtype === 'ANY') {
        for (const a of entry.aaaa) answers.push({ type: 'AAAA', name: q.name, ttl, class: 'IN', data: a });
      }
      if (answers.length > 0) return this.encodeLocal(query, q, Rcode.NoError, answers, [], transport);
      return this.encodeLocal(query, q, Rcode.NoError, [], [this.soa(this.soaOwner(name))], transport);
    }
    if (ptrNames.length > 0) {
      for (const n of ptrNames) answers.push({ type: 'PTR', name: q.name, ttl, class: 'IN', data: n });
      return this.encodeLocal(query, q, Rcode.NoError, answers, [], transport);
    }
    if (name === zone) {
      if (qtype === 'SOA' || qtype === 'ANY') {
        return this.encodeLocal(query, q, Rcode.NoError, [{ ...this.soa(zone), name: q.name }], [], transport);
      }
      return this.encodeLocal(query, q, Rcode.NoError, [], [this.soa(zone)], transport);
    }
    return this.encodeLocal(query, q, Rcode.NxDomain, [], [this.soa(zone)], transport);
  }

  /** Our zone for names in it; for an alias outside it (host.docker.internal), its parent. */
  private soaOwner(name: string): string {
    if (name === this.zone || name.endsWith('.' + this.zone)) return this.zone;
    const dot = name.indexOf('.');
    return dot >= 0 ? name.slice(dot + 1) : name;
  }

  private soa(owner: string): Answer {
    return {
      type: 'SOA',
      name: owner,
      ttl: NEGATIVE_TTL,
      class: 'IN',
      data: {
        mname: `gateway.${this.zone}`,
        rname: `hostmaster.${this.zone}`,
        serial: 1,
        refresh: 3600,
        retry: 600,
        expire: 86400,
        minimum: NEGATIVE_TTL,
      },
    };
  }

  /**
   * Encode an authoritative response. EDNS (RFC 6891 §7): a query with OPT gets OPT back, the
   * DO bit echoed (RFC 3225 §3); an EDNS version above 0 gets BADVERS. Over UDP a response
   * larger than the client's limit (512 without EDNS, RFC 1035 §4.2.1) is sent truncated (TC)
   * so the client retries over TCP.
   */
  private encodeLocal(
    query: DecodedPacket,
    q: Question,
    rcode: number,
    answers: Answer[],
    authorities: Answer[],
    transport: 'udp' | 'tcp',
  ): Uint8Array {
    const opt = query.additionals?.find((a): a is OptAnswer => a.type === 'OPT');
    const additionals: Answer[] = [];
    let flags = FLAG_AA | FLAG_RA | ((query.flags ?? 0) & FLAG_RD) | (rcode & 0xf);
    if (opt) {
      const badvers = opt.ednsVersion !== 0;
      additionals.push({
        type: 'OPT',
        name: '.',
        udpPayloadSize: EDNS_UDP_SIZE,
        extendedRcode: badvers ? BADVERS_HIGH : 0,
        ednsVersion: 0,
        flags: opt.flags & dnsPacket.DNSSEC_OK,
        flag_do: false,
        options: [],
      });
      if (badvers) {
        flags &= ~0xf;
        answers = [];
        authorities = [];
      }
    }
    const packet: Packet = {
      type: 'response',
      id: query.id ?? 0,
      flags,
      questions: [q],
      answers,
      authorities,
      additionals,
    };
    let out = dnsPacket.encode(packet);
    const limit = opt ? Math.max(512, opt.udpPayloadSize) : 512;
    if (transport === 'udp' && out.length > limit) {
      out = dnsPacket.encode({ ...packet, flags: flags | FLAG_TC, answers: [], authorities: [] });
    }
    return out;
  }

  // ---- fallback ----

  /**
   * No upstream answered. For A/AAAA ask the host's resolver, bounded by a timer so a hung
   * getaddrinfo cannot hold a slot forever; for anything else, SERVFAIL.
   */
  private async fallback(msg: Buffer, query: DecodedPacket, q: Question, qEnd: number): Promise<Uint8Array> {
    const family = q.type === 'A' ? 4 : q.type === 'AAAA' ? 6 : 0;
    const name = normalizeName(q.name);
    if (family === 0 || (q.class ?? 'IN') !== 'IN' || !isValidName(name)) return this.servfail(msg, qEnd);
    const addrs = await this.lookupBounded(name, family);
    if (this.closed) return this.servfail(msg, qEnd);
    if (addrs.length > 0) {
      this.counters.inc('dns.fallback');
      const answers: Answer[] = addrs.map((a) => ({
        type: family === 4 ? 'A' : 'AAAA',
        name: q.name,
        ttl: 0,
        class: 'IN',
        data: a,
      }));
      return this.encodeFallback(query, q, answers);
    }
    // The name exists for the other family (e.g. AAAA of an /etc/hosts IPv4-only name):
    // NODATA, so the client's resolver uses the A answer instead of failing.
    const other = await this.lookupBounded(name, family === 4 ? 6 : 4);
    if (other.length > 0 && !this.closed) {
      this.counters.inc('dns.fallback');
      return this.encodeFallback(query, q, []);
    }
    return this.servfail(msg, qEnd);
  }

  private encodeFallback(query: DecodedPacket, q: Question, answers: Answer[]): Uint8Array {
    // Not authoritative: this is the host's data, relayed.
    return dnsPacket.encode({
      type: 'response',
      id: query.id ?? 0,
      flags: FLAG_RA | ((query.flags ?? 0) & FLAG_RD),
      questions: [q],
      answers,
    });
  }

  private lookupBounded(name: string, family: 4 | 6): Promise<string[]> {
    return new Promise((resolve) => {
      let done = false;
      const finish = (r: string[]): void => {
        if (done) return;
        done = true;
        timer.cancel();
        this.closers.delete(abort);
        resolve(r);
      };
      const abort = (): void => finish([]);
      const timer = this.clock.timer(() => {
        this.counters.inc('dns.fallback_timeout');
        finish([]);
      });
      timer.arm(this.timeoutMs);
      this.closers.add(abort);
      let p: Promise<string[]>;
      try {
        p = this.hostLookup(name, family);
      } catch {
        finish([]);
        return;
      }
      p.then(
        // Only well-formed addresses of the asked family reach the encoder.
        (r) => finish(Array.isArray(r) ? r.filter((a) => (family === 4 ? isIPv4(a) : isIPv6(a))) : []),
        () => finish([]),
      );
    });
  }
}
