/**
 * The gateway: the stack's own interface on the virtual switch.
 *
 * It is a `Link` seen from the switch — frames the switch delivers to it are its input, and
 * frames it emits go to the switch through the receiver the switch attached. It owns one MAC
 * and a few IPv4 addresses (the gateway .1 and the host alias .254 by default), answers ARP
 * for them, keeps the neighbour cache, validates and reassembles IPv4, answers ICMP echo,
 * and hands UDP and TCP to the transport handlers. It is also the default router of the
 * subnet: packets for any off-subnet address arrive here and go to the same handlers, where
 * the NAT services pick them up.
 *
 * Output (`send4`) is zero-copy for the transports: they write their bytes into `scratch` at
 * `headroom` and call `send4`, which writes the IPv4 and Ethernet headers in front and hands
 * the frame to the switch (borrowed). Datagrams larger than the MTU are fragmented here.
 */
import { type Ip4, type Mac, type Subnet, BROADCAST_MAC, IP4_BROADCAST, inSubnet, isMulticast4, macEq, subnetBroadcast } from '../addr.js';
import type { Counters } from '../counters.js';
import type { FrameMeta, Link, LinkOffloads, LinkReceiver, LinkStats } from '../link/link.js';
import { CSUM_PARTIAL, CSUM_VALID, GSO_NONE, GSO_TCPV4, newFrameMeta, newLinkStats } from '../link/link.js';
import { softwareOffload } from '../link/offload.js';
import type { Clock } from '../time.js';
import { ARP_LEN, ArpOp, ArpPacket, emitArp, parseArp } from '../wire/arp.js';
import { ETH_HLEN, EtherType, EthernetFrame, writeEthernetHeader } from '../wire/ethernet.js';
import { ICMP_HLEN, IcmpPacket, IcmpType, emitIcmp, icmpQuote } from '../wire/icmpv4.js';
import { IPV4_HLEN, IpProto, Ipv4Packet, emitIpv4 } from '../wire/ipv4.js';
import { Reassembler } from './fragments.js';
import { NeighborCache } from './neighbors.js';

/** A transport protocol handler (UDP, TCP). */
export interface TransportHandler {
  /**
   * One packet (borrowed, like `ip` itself: the gateway reuses the view for the next packet).
   * `ip` is the validated, reassembled IPv4 packet; `frame` the Ethernet frame it arrived in
   * (the sender's MAC at offset 6); `csumOk` says the device already vouched for the
   * transport checksum (offload), so it need not be verified.
   */
  input(ip: Ipv4Packet, frame: Uint8Array, csumOk: boolean): void;
  /** End of a received batch. */
  flush?(): void;
}

export interface GatewayOptions {
  clock: Clock;
  counters: Counters;
  mac: Mac;
  subnet: Subnet;
  /** Addresses the gateway owns (answers ARP and ICMP echo for). The first is the source of errors it generates. */
  addresses: Ip4[];
  mtu: number;
  ttl?: number;
}

export const HEADROOM = ETH_HLEN + IPV4_HLEN;
const SCRATCH_SIZE = HEADROOM + 65536;

export class Gateway implements Link {
  readonly name = 'gateway';
  readonly stats: LinkStats = newLinkStats();
  readonly mtu: number;
  readonly mac: Mac;
  readonly subnet: Subnet;
  /** Transports write here at `headroom`, then call `send4`. Borrowed until send4 returns. */
  readonly scratch = new Uint8Array(SCRATCH_SIZE);
  readonly headroom = HEADROOM;
  readonly neighbors: NeighborCache;
  private readonly reasm: Reassembler;
  private readonly out = new Uint8Array(SCRATCH_SIZE);
  private rx: LinkReceiver | null = null;
  private readonly handlers = new Map<number, TransportHandler>();
  /** The handlers again, as an array for the per-batch flush (no Map iterator per batch). */
  private flushers: TransportHandler[] = [];
  private readonly owned: Set<Ip4>;
  private readonly broadcast: Ip4;
  private readonly ttl: number;
  private ident = 1;
  private inBatch = false;
  private batchEndQueued = false;
  private closed = false;

  constructor(private readonly o: GatewayOptions) {
    this.mtu = o.mtu;
    this.mac = o.mac;
    this.subnet = o.subnet;
    this.owned = new Set(o.addresses);
    this.broadcast = subnetBroadcast(o.subnet);
    this.ttl = o.ttl ?? 64;
    this.neighbors = new NeighborCache({
      clock: o.clock,
      counters: o.counters,
      solicit: (ip) => this.sendArp(ArpOp.Request, BROADCAST_MAC, new Uint8Array(6), ip),
      transmit: (f) => this.emit(f),
    });
    this.reasm = new Reassembler({ clock: o.clock, counters: o.counters });
  }

  get address(): Ip4 {
    return this.o.addresses[0]!;
  }

  owns(ip: Ip4): boolean {
    return this.owned.has(ip);
  }

  addAddress(ip: Ip4): void {
    this.owned.add(ip);
  }

  register(proto: number, h: TransportHandler): void {
    this.handlers.set(proto, h);
    this.flushers = [...this.handlers.values()];
  }

  // ---- Link (the switch's view) ----

  attach(rx: LinkReceiver): void {
    this.rx = rx;
  }

  /** We are an endpoint: partial checksums and super-segments are fine (nothing to complete or cut). */
  readonly offloads: LinkOffloads = { csum: true, tso4: true };

  /** A frame from the switch: our input. */
  send(frame: Uint8Array, meta?: FrameMeta): void {
    if (this.closed) return;
    this.stats.rxFrames++;
    this.stats.rxBytes += frame.length;
    this.inBatch = true;
    // A partial checksum was never computed and a "valid" one was checked by the kernel:
    // either way there is nothing to verify. Only frames from a local TAP carry these.
    this.rxCsumOk = meta !== undefined && (meta.flags & (CSUM_PARTIAL | CSUM_VALID)) !== 0;
    try {
      this.input(frame);
    } catch (err) {
      // A bug must not take the network down; the frame is lost and counted.
      this.o.counters.inc('gateway.drop.internal_error');
      this.lastError = err;
    }
  }

  lastError: unknown = null;
  private rxCsumOk = false;

  /** End of the switch's batch: let transports flush coalesced output. */
  flush(): void {
    this.inBatch = false;
    const hs = this.flushers;
    for (let i = 0; i < hs.length; i++) hs[i]!.flush?.();
  }

  close(): void {
    this.closed = true;
    this.neighbors.clear();
    this.reasm.clear();
  }

  // ---- input ----

  private input(frame: Uint8Array): void {
    const c = this.o.counters;
    // Read in place rather than through an EthernetFrame view: no object per frame.
    if (frame.length < ETH_HLEN) {
      c.inc('eth.drop.truncated');
      return;
    }
    const toUs = macEq(this.mac, frame, 0);
    if (!toUs && !macEq(BROADCAST_MAC, frame, 0)) {
      // Flooded unicast for someone else, or multicast we have not joined.
      c.inc('eth.not_for_us');
      return;
    }
    const etherType = (frame[12]! << 8) | frame[13]!;
    if (etherType === EtherType.VLAN || etherType === EtherType.QinQ) {
      c.inc('eth.drop.vlan_tagged');
      return;
    }
    switch (etherType) {
      case EtherType.ARP:
        this.arpInput(new EthernetFrame(frame));
        return;
      case EtherType.IPv4:
        this.ipv4Input(frame);
        return;
      case EtherType.IPv6:
        c.inc('eth.drop.ipv6_unsupported');
        return;
      default:
        c.inc('eth.drop.unknown_ethertype');
    }
  }

  private arpInput(eth: EthernetFrame): void {
    const c = this.o.counters;
    const p = ArpPacket.check(eth.payload);
    if (p === null) {
      c.inc('arp.drop.truncated');
      return;
    }
    const r = parseArp(p);
    if (r === null) {
      c.inc('arp.drop.unsupported');
      return;
    }
    // RFC 826 "merge": refresh a sender we already know, whatever the target.
    const senderOk = r.spa !== 0 && inSubnet(this.subnet, r.spa) && !this.owned.has(r.spa) && (r.sha[0]! & 1) === 0;
    if (senderOk && this.neighbors.lookup(r.spa) !== null) this.neighbors.learn(r.spa, r.sha);
    if (!this.owned.has(r.tpa)) {
      c.inc('arp.not_for_us');
      return;
    }
    if (senderOk) this.neighbors.learn(r.spa, r.sha);
    if (r.op === ArpOp.Reply) {
      c.inc('arp.rx_reply');
      return;
    }
    if (r.op === ArpOp.Request) {
      c.inc('arp.tx_reply');
      // An ARP probe (spa 0.0.0.0, RFC 5227) is answered to the prober's MAC as well.
      this.sendArp(ArpOp.Reply, r.sha, r.sha, r.spa, r.tpa);
    }
  }

  private sendArp(op: number, dstMac: Uint8Array, tha: Uint8Array, tpa: Ip4, spa: Ip4 = this.address): void {
    const b = this.out;
    writeEthernetHeader(b, 0, dstMac, this.mac, EtherType.ARP);
    emitArp({ op, sha: this.mac, spa, tha, tpa }, b, ETH_HLEN);
    // Pad to the 60-byte Ethernet minimum, as a NIC would.
    b.fill(0, ETH_HLEN + ARP_LEN, 60);
    this.emit(b.subarray(0, 60));
  }

  private ipv4Input(frame: Uint8Array): void {
    const c = this.o.counters;
    const bytes = frame.subarray(ETH_HLEN);
    const bad = Ipv4Packet.validate(bytes);
    if (bad !== null) {
      c.inc(`ipv4.drop.${bad}`);
      return;
    }
    // One view object for every packet, unless a handler re-entered us (a link that answers
    // synchronously) while the outer packet is still being handled.
    const reuse = !this.rxIpBusy;
    const checked = reuse ? this.rxIp : new Ipv4Packet(bytes);
    checked.buf = bytes;
    this.rxIpBusy = true;
    try {
      this.ipv4Dispatch(frame, checked);
    } finally {
      if (reuse) this.rxIpBusy = false;
    }
  }

  private readonly rxIp = new Ipv4Packet(new Uint8Array(0));
  private rxIpBusy = false;

  private ipv4Dispatch(frame: Uint8Array, checked: Ipv4Packet): void {
    const c = this.o.counters;
    let ip = checked;
    const src = ip.src;
    const dst = ip.dst;
    if (isMulticast4(src) || src === IP4_BROADCAST || (src !== 0 && src === this.broadcast)) {
      c.inc('ipv4.drop.bad_src');
      return;
    }
    if (isMulticast4(dst)) {
      c.inc('ipv4.drop.multicast');
      return;
    }
    const isBroadcast = dst === IP4_BROADCAST || dst === this.broadcast;
    if (isBroadcast && ip.protocol !== IpProto.UDP) {
      c.inc('ipv4.drop.broadcast');
      return;
    }
    if (!isBroadcast && inSubnet(this.subnet, dst) && !this.owned.has(dst)) {
      // Another host on the subnet sent to our MAC: guests talk to each other directly.
      c.inc('ipv4.drop.no_route');
      return;
    }
    // Glean the sender's MAC (it just proved where it lives), unless it is a DHCP client
    // without an address yet.
    if (src !== 0 && inSubnet(this.subnet, src) && !this.owned.has(src)) this.neighbors.learn(src, frame, 6);
    if (ip.isFragment) {
      const whole = this.reasm.add(ip);
      if (whole === null) return;
      ip = new Ipv4Packet(whole);
    }
    c.inc('ipv4.rx');
    const proto = ip.protocol;
    if (proto === IpProto.ICMP) {
      this.icmpInput(ip);
      return;
    }
    const h = this.handlers.get(proto);
    if (h === undefined) {
      c.inc('ipv4.drop.unknown_protocol');
      if (this.owned.has(dst)) this.sendUnreachable(ip, 2 /* protocol unreachable */);
      return;
    }
    // Reassembled datagrams lose the per-frame offload state: verify those.
    h.input(ip, frame, this.rxCsumOk && ip === checked);
  }

  private icmpInput(ip: Ipv4Packet): void {
    const c = this.o.counters;
    const p = IcmpPacket.check(ip.payload);
    if (typeof p === 'string') {
      c.inc(`icmp.drop.${p}`);
      return;
    }
    if (p.type === IcmpType.EchoRequest && p.code === 0) {
      if (!this.owned.has(ip.dst)) {
        c.inc('icmp.drop.echo_not_local');
        return;
      }
      c.inc('icmp.echo_reply');
      const data = p.payload;
      const b = this.scratch;
      const len = emitIcmp({ type: IcmpType.EchoReply, ident: p.ident, seq: p.seq, data }, b, HEADROOM);
      this.send4(ip.dst, ip.src, IpProto.ICMP, len);
      return;
    }
    if (p.isError) {
      c.inc('icmp.rx_error');
      this.onIcmpError?.(ip, p);
      return;
    }
    c.inc('icmp.drop.unhandled_type');
  }

  /** ICMP errors from guests (e.g. port unreachable for a forwarded reply), for the NAT. */
  onIcmpError: ((ip: Ipv4Packet, icmp: IcmpPacket) => void) | null = null;

  // ---- output ----

  /**
   * Send scratch[headroom, headroom+len) as an IPv4 packet src→dst. Resolves the neighbour,
   * fragments above the MTU (unless `df`), and emits. Returns false when dropped.
   */
  send4(src: Ip4, dst: Ip4, proto: number, len: number, gsoSize = 0, opts?: { dstMac?: Uint8Array; df?: boolean; tos?: number }): boolean {
    if (this.closed) return false;
    // TCP leaves its checksum to the device (csumOffload) and may hand us super-segments.
    const partial = proto === IpProto.TCP && this.csumOffload;
    const gso = gsoSize > 0 && IPV4_HLEN + len > this.mtu;
    const b = this.scratch;
    const c = this.o.counters;
    let dstMac: Uint8Array | null = opts?.dstMac ?? null;
    if (dstMac === null) {
      if (dst === IP4_BROADCAST || dst === this.broadcast) dstMac = BROADCAST_MAC;
      else if (!inSubnet(this.subnet, dst)) {
        c.inc('ipv4.drop.tx_no_route');
        return false;
      } else dstMac = this.neighbors.lookup(dst);
    }
    const total = IPV4_HLEN + len;
    const df = opts?.df ?? false;
    if (total > this.mtu && !gso) {
      if (df) {
        c.inc('ipv4.drop.tx_too_big');
        return false;
      }
      return this.fragment(src, dst, proto, len, dstMac, opts?.tos ?? 0);
    }
    emitIpv4(
      { src, dst, protocol: proto, payloadLen: len, ttl: this.ttl, ident: this.nextIdent(), dontFragment: df, tos: opts?.tos },
      b,
      ETH_HLEN,
    );
    const frame = b.subarray(0, ETH_HLEN + total);
    writeEthernetHeader(b, 0, dstMac ?? BROADCAST_MAC, this.mac, EtherType.IPv4);
    let meta: FrameMeta | undefined;
    if (partial || gso) {
      meta = this.txMeta;
      meta.flags = partial ? CSUM_PARTIAL : 0;
      meta.csumStart = HEADROOM;
      meta.csumOffset = 16;
      meta.gsoType = gso ? GSO_TCPV4 : GSO_NONE;
      meta.gsoSize = gso ? gsoSize : 0;
      meta.hdrLen = HEADROOM + ((b[HEADROOM + 12]! >> 4) << 2);
    }
    if (dstMac === null) {
      // The neighbour queue keeps plain frames: resolve offloads before parking them.
      if (meta) softwareOffload(frame, meta, this.o.counters, (f) => this.neighbors.enqueue(dst, f));
      else this.neighbors.enqueue(dst, frame);
      return true;
    }
    this.emit(frame, meta);
    return true;
  }

  /** Transports write only pseudo-header sums for TCP; the device or the switch completes them. */
  readonly csumOffload = true;
  /** TCP super-segments up to a whole IPv4 packet (the TAP or the switch cuts them). */
  readonly tsoMax = 65535 - IPV4_HLEN - 60;
  private readonly txMeta: FrameMeta = newFrameMeta();

  largestPayload(): number {
    return this.mtu - IPV4_HLEN;
  }

  mtuTo(_dst: Ip4): number {
    return this.mtu;
  }

  private fragment(src: Ip4, dst: Ip4, proto: number, len: number, dstMac: Uint8Array | null, tos: number): boolean {
    const chunk = (this.mtu - IPV4_HLEN) & ~7;
    const ident = this.nextIdent();
    const o = this.out;
    this.o.counters.inc('ipv4.tx_fragmented');
    // Copy the datagram out of `scratch` first: emitting a fragment can re-enter the stack
    // (a link that answers synchronously) and reuse `scratch`. Fragmenting is rare; one copy is fine.
    const data = this.scratch.slice(HEADROOM, HEADROOM + len);
    for (let off = 0; off < len; off += chunk) {
      const n = Math.min(chunk, len - off);
      o.set(data.subarray(off, off + n), HEADROOM);
      emitIpv4(
        { src, dst, protocol: proto, payloadLen: n, ttl: this.ttl, ident, moreFragments: off + n < len, fragOffset: off, tos },
        o,
        ETH_HLEN,
      );
      writeEthernetHeader(o, 0, dstMac ?? BROADCAST_MAC, this.mac, EtherType.IPv4);
      const frame = o.subarray(0, HEADROOM + n);
      if (dstMac === null) this.neighbors.enqueue(dst, frame);
      else this.emit(frame);
    }
    return true;
  }

  /** ICMP destination unreachable about `orig` (an IPv4 packet we received), from our address. */
  sendUnreachable(orig: Ipv4Packet, code: number): void {
    this.sendIcmpError(orig.buf.subarray(0, orig.totalLen), orig.headerLen, orig.src, IcmpType.DestUnreachable, code);
  }

  /**
   * An ICMP error quoting `quoted` (IP header + at least 8 bytes), sent to `to`. The source is
   * the quoted packet's destination when off-subnet (so the guest sees the error come from the
   * host it tried to reach, as a real router path would deliver it), else our own address.
   */
  sendIcmpError(quoted: Uint8Array, headerLen: number, to: Ip4, type: number, code: number): void {
    const c = this.o.counters;
    // RFC 1122 §3.2.2: never answer an ICMP error, a broadcast, or a non-initial fragment with an error.
    if (quoted.length < IPV4_HLEN) return;
    const qProto = quoted[9];
    const qDst = ((quoted[16]! << 24) | (quoted[17]! << 16) | (quoted[18]! << 8) | quoted[19]!) >>> 0;
    if (qProto === IpProto.ICMP && quoted.length > headerLen && quoted[headerLen]! !== 0 && quoted[headerLen]! !== 8) return;
    if (((quoted[6]! & 0x1f) | quoted[7]!) !== 0) return;
    if (qDst === IP4_BROADCAST || qDst === this.broadcast || isMulticast4(qDst)) return;
    c.inc('icmp.tx_error');
    const from = !inSubnet(this.subnet, qDst) || this.owned.has(qDst) ? qDst : this.address;
    const q = icmpQuote(quoted, headerLen);
    const qc = q.slice();
    const len = emitIcmp(
      type === IcmpType.DestUnreachable ? { type: IcmpType.DestUnreachable, code, quote: qc } : { type: IcmpType.TimeExceeded, code, quote: qc },
      this.scratch,
      HEADROOM,
    );
    this.send4(from, to, IpProto.ICMP, len);
  }

  private nextIdent(): number {
    this.ident = (this.ident + 1) & 0xffff;
    return this.ident;
  }

  private readonly endBurst = (): void => {
    this.batchEndQueued = false;
    this.rx?.batchEnd?.();
  };

  /** Hand a frame to the switch (borrowed). */
  private emit(frame: Uint8Array, meta?: FrameMeta): void {
    if (this.rx === null || this.closed) return;
    this.stats.txFrames++;
    this.stats.txBytes += frame.length;
    this.rx.frame(frame, meta);
    // Output not triggered by input (timers, host sockets): end the burst once per tick.
    // A reaction on a settled promise rather than queueMicrotask(): the same microtask, without
    // the AsyncResource and bound function Node's queueMicrotask allocates per call (this runs
    // once per host-socket read, i.e. once per round trip of request/response traffic).
    if (!this.inBatch && !this.batchEndQueued) {
      this.batchEndQueued = true;
      void RESOLVED.then(this.endBurst);
    }
  }
}

const RESOLVED = Promise.resolve();

export { ICMP_HLEN };
