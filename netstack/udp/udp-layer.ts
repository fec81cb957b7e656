/**
 * UDP on the gateway: a table of bound endpoints (DHCP on :67, DNS on :53, port forwards'
 * reply paths) and a catch-all forwarder for everything else (the UDP NAT), the same split as
 * gVisor's transport demuxer with its forwarder.
 *
 * Datagrams are delivered borrowed; handlers copy what they keep.
 */
import { type Ip4, IP4_BROADCAST } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Gateway, TransportHandler } from '../iface/gateway.js';
import { IpProto, type Ipv4Packet } from '../wire/ipv4.js';
import { UDP_HLEN, UdpPacket, emitUdpHeader } from '../wire/udp.js';

export interface UdpDatagram {
  srcIp: Ip4;
  srcPort: number;
  dstIp: Ip4;
  dstPort: number;
  /** Borrowed for the duration of the handler. */
  payload: Uint8Array;
  srcMac: Uint8Array;
  /** The whole IPv4 packet (for ICMP errors that quote it). */
  ip: Ipv4Packet;
}

export type UdpHandler = (d: UdpDatagram) => void;

export interface UdpSendOptions {
  /** Send to this MAC without ARP (DHCP replies to clients that have no address yet). */
  dstMac?: Uint8Array;
}

export class UdpLayer implements TransportHandler {
  private readonly bound = new Map<number, UdpHandler>();
  /** Datagrams no bound endpoint takes. */
  forwarder: UdpHandler | null = null;
  /**
   * Gateway addresses whose unbound ports belong to the forwarder rather than to us (the host
   * alias: its traffic is NATed to the host's loopback).
   */
  readonly forwardedAddresses = new Set<Ip4>();

  constructor(
    private readonly gw: Gateway,
    private readonly counters: Counters,
  ) {
    gw.register(IpProto.UDP, this);
  }

  private static key(ip: Ip4, port: number): number {
    // ip * 65536 + port stays below 2^48: exact in a double.
    return ip * 65536 + port;
  }

  /**
   * Bind a handler to (ip, port); ip 0 means every address the gateway owns, plus broadcasts
   * (DHCP). Returns an unbind function.
   */
  bind(ip: Ip4, port: number, h: UdpHandler): () => void {
    const k = UdpLayer.key(ip, port);
    if (this.bound.has(k)) throw new Error(`udp ${ip}:${port} already bound`);
    this.bound.set(k, h);
    return () => {
      if (this.bound.get(k) === h) this.bound.delete(k);
    };
  }

  input(ip: Ipv4Packet, frame: Uint8Array, csumOk = false): void {
    const c = this.counters;
    const src = ip.src;
    const dst = ip.dst;
    const u = UdpPacket.check(ip.payload, src, dst, !csumOk);
    if (typeof u === 'string') {
      c.inc(`udp.drop.${u}`);
      return;
    }
    const d: UdpDatagram = { srcIp: src, srcPort: u.srcPort, dstIp: dst, dstPort: u.dstPort, payload: u.payload, srcMac: frame.subarray(6, 12), ip };
    c.inc('udp.rx');
    let h = this.bound.get(UdpLayer.key(dst, u.dstPort));
    const local =
      (this.gw.owns(dst) && !this.forwardedAddresses.has(dst)) || dst === IP4_BROADCAST || dst === subnetBroadcastOf(this.gw);
    if (h === undefined && local) h = this.bound.get(UdpLayer.key(0, u.dstPort));
    if (h !== undefined) {
      h(d);
      return;
    }
    if (local) {
      if (dst === IP4_BROADCAST || dst === subnetBroadcastOf(this.gw)) {
        c.inc('udp.drop.broadcast_unbound');
        return;
      }
      c.inc('udp.drop.port_unreachable');
      this.gw.sendUnreachable(ip, 3);
      return;
    }
    if (this.forwarder === null) {
      c.inc('udp.drop.no_forwarder');
      return;
    }
    this.forwarder(d);
  }

  /** Send a datagram; `payload` is copied into the gateway's scratch buffer. */
  send(srcIp: Ip4, srcPort: number, dstIp: Ip4, dstPort: number, payload: Uint8Array, opts?: UdpSendOptions): boolean {
    const max = 65535 - 20 - UDP_HLEN;
    if (payload.length > max) {
      this.counters.inc('udp.drop.tx_too_big');
      return false;
    }
    const b = this.gw.scratch;
    const off = this.gw.headroom;
    b.set(payload, off + UDP_HLEN);
    const len = emitUdpHeader({ srcPort, dstPort }, payload.length, b, off, srcIp, dstIp);
    this.counters.inc('udp.tx');
    return this.gw.send4(srcIp, dstIp, IpProto.UDP, len, 0, opts?.dstMac ? { dstMac: opts.dstMac } : undefined);
  }
}

function subnetBroadcastOf(gw: Gateway): Ip4 {
  return (gw.subnet.network | ~gw.subnet.mask) >>> 0;
}
