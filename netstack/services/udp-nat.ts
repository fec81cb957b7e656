/**
 * UDP NAT: every guest datagram to an off-subnet address (or to the host alias) leaves
 * through a host UDP socket, and replies come back with the original addresses.
 *
 * One flow per guest 4-tuple, each a host socket *connected* to the destination — the kernel
 * then filters replies to that peer (address-and-port-dependent filtering, as
 * gvisor-tap-vsock does) and reports ICMP port unreachable as ECONNREFUSED, which we turn
 * back into ICMP port unreachable for the guest. Flows end after `idleMs` without traffic
 * (90 s, gvisor-tap-vsock's value). Flows per guest and in total are bounded: at the limit
 * the longest-idle flow is evicted if it has been idle a while, else the datagram is dropped
 * and counted.
 *
 * The host alias (192.168.127.254 by default) maps to the host's 127.0.0.1, unless host
 * loopback is disabled, in which case the guest gets ICMP "administratively prohibited".
 */
import dgram from 'node:dgram';
import { type Ip4, ip4str } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Gateway } from '../iface/gateway.js';
import type { Clock, Timer } from '../time.js';
import { IcmpType, UnreachCode } from '../wire/icmpv4.js';
import type { UdpDatagram, UdpLayer } from '../udp/udp-layer.js';

export interface UdpNatOptions {
  clock: Clock;
  counters: Counters;
  udp: UdpLayer;
  gateway: Gateway;
  /** The host alias address; null when there is none. */
  hostAlias: Ip4 | null;
  /** Whether traffic to the host alias reaches the host's loopback. */
  hostLoopback: boolean;
  idleMs?: number;
  maxFlowsPerGuest?: number;
  maxFlows?: number;
  /** Datagrams held per flow while its socket is being set up. */
  maxQueued?: number;
}

interface Flow {
  key: string;
  guestIp: Ip4;
  guestPort: number;
  /** The address the guest sent to (replies come from it). */
  dstIp: Ip4;
  dstPort: number;
  socket: dgram.Socket;
  ready: boolean;
  queue: Buffer[];
  timer: Timer;
  lastUsed: number;
  /** IP header + 8 bytes of the first datagram, quoted in ICMP errors. */
  quote: Uint8Array;
  quoteHeaderLen: number;
  closed: boolean;
  txBytes: number;
  rxBytes: number;
}

export class UdpNat {
  private readonly flows = new Map<string, Flow>();
  private readonly perGuest = new Map<Ip4, number>();
  private readonly idleMs: number;

  constructor(private readonly o: UdpNatOptions) {
    this.idleMs = o.idleMs ?? 90_000;
    o.udp.forwarder = (d) => this.outbound(d);
  }

  get flowCount(): number {
    return this.flows.size;
  }

  list(): { guest: string; remote: string; txBytes: number; rxBytes: number; idleMs: number }[] {
    const now = this.o.clock.now();
    return [...this.flows.values()].map((f) => ({
      guest: `${ip4str(f.guestIp)}:${f.guestPort}`,
      remote: `${ip4str(f.dstIp)}:${f.dstPort}`,
      txBytes: f.txBytes,
      rxBytes: f.rxBytes,
      idleMs: now - f.lastUsed,
    }));
  }

  private outbound(d: UdpDatagram): void {
    const c = this.o.counters;
    let hostAddr = ip4str(d.dstIp);
    if (this.o.hostAlias !== null && d.dstIp === this.o.hostAlias) {
      if (!this.o.hostLoopback) {
        c.inc('udp_nat.drop.host_loopback_disabled');
        this.o.gateway.sendUnreachable(d.ip, UnreachCode.AdminProhibited);
        return;
      }
      hostAddr = '127.0.0.1';
    } else if (this.o.gateway.owns(d.dstIp)) {
      c.inc('udp_nat.drop.local');
      return;
    }
    if (d.dstPort === 0) {
      c.inc('udp_nat.drop.port_zero');
      return;
    }
    const key = `${d.srcIp}:${d.srcPort}>${d.dstIp}:${d.dstPort}`;
    let f = this.flows.get(key);
    if (f === undefined) {
      const nf = this.open(d, key, hostAddr);
      if (nf === null) return;
      f = nf;
    }
    f.lastUsed = this.o.clock.now();
    f.timer.arm(this.idleMs);
    f.txBytes += d.payload.length;
    c.inc('udp_nat.tx');
    const data = Buffer.from(d.payload); // copy: the payload is borrowed
    if (!f.ready) {
      if (f.queue.length >= (this.o.maxQueued ?? 32)) {
        c.inc('udp_nat.drop.queue_full');
        return;
      }
      f.queue.push(data);
      return;
    }
    this.sendOut(f, data);
  }

  private open(d: UdpDatagram, key: string, hostAddr: string): Flow | null {
    const c = this.o.counters;
    const n = this.perGuest.get(d.srcIp) ?? 0;
    if (n >= (this.o.maxFlowsPerGuest ?? 1024) || this.flows.size >= (this.o.maxFlows ?? 8192)) {
      if (!this.evictIdle(d.srcIp)) {
        c.inc('udp_nat.drop.flow_limit');
        return null;
      }
    }
    const ip = d.ip;
    const socket = dgram.createSocket({ type: 'udp4' });
    const f: Flow = {
      key,
      guestIp: d.srcIp,
      guestPort: d.srcPort,
      dstIp: d.dstIp,
      dstPort: d.dstPort,
      socket,
      ready: false,
      queue: [],
      timer: this.o.clock.timer(() => this.expire(f)),
      lastUsed: this.o.clock.now(),
      quote: ip.buf.slice(0, Math.min(ip.totalLen, ip.headerLen + 8)),
      quoteHeaderLen: ip.headerLen,
      closed: false,
      txBytes: 0,
      rxBytes: 0,
    };
    this.flows.set(key, f);
    this.perGuest.set(d.srcIp, n + 1);
    c.inc('udp_nat.flows_opened');
    socket.on('message', (msg) => this.inbound(f, msg));
    socket.on('error', (err: NodeJS.ErrnoException) => this.hostError(f, err));
    socket.connect(d.dstPort, hostAddr, () => {
      if (f.closed) return;
      f.ready = true;
      const q = f.queue;
      f.queue = [];
      for (const b of q) this.sendOut(f, b);
    });
    return f;
  }

  private sendOut(f: Flow, data: Buffer): void {
    f.socket.send(data, (err) => {
      if (err) this.hostError(f, err as NodeJS.ErrnoException);
    });
  }

  private inbound(f: Flow, msg: Buffer): void {
    if (f.closed) return;
    f.lastUsed = this.o.clock.now();
    f.timer.arm(this.idleMs);
    f.rxBytes += msg.length;
    this.o.counters.inc('udp_nat.rx');
    this.o.udp.send(f.dstIp, f.dstPort, f.guestIp, f.guestPort, msg);
  }

  /** The one place where host socket errors become network behaviour for the guest. */
  private hostError(f: Flow, err: NodeJS.ErrnoException): void {
    if (f.closed) return;
    const c = this.o.counters;
    const code = err.code ?? 'UNKNOWN';
    c.inc(`udp_nat.host_error.${code}`);
    let unreach: number | null = null;
    switch (code) {
      case 'ECONNREFUSED':
        unreach = UnreachCode.Port;
        break;
      case 'ENETUNREACH':
        unreach = UnreachCode.Net;
        break;
      case 'EHOSTUNREACH':
      case 'EHOSTDOWN':
        unreach = UnreachCode.Host;
        break;
      case 'EACCES':
      case 'EPERM':
        unreach = UnreachCode.AdminProhibited;
        break;
      case 'EMSGSIZE':
        unreach = UnreachCode.FragNeeded;
        break;
      default:
        // Unknown failure of the socket itself: drop the flow; the next datagram opens a new one.
        this.closeFlow(f);
        return;
    }
    this.o.gateway.sendIcmpError(f.quote, f.quoteHeaderLen, f.guestIp, IcmpType.DestUnreachable, unreach);
  }

  private evictIdle(guest: Ip4): boolean {
    const now = this.o.clock.now();
    let victim: Flow | null = null;
    for (const f of this.flows.values()) {
      if (f.guestIp !== guest && this.flows.size < (this.o.maxFlows ?? 8192)) continue;
      if (victim === null || f.lastUsed < victim.lastUsed) victim = f;
    }
    // Only evict a flow that has been quiet for a while: an active flow is worth more than a new one.
    if (victim === null || now - victim.lastUsed < 5_000) return false;
    this.o.counters.inc('udp_nat.evicted');
    this.closeFlow(victim);
    return true;
  }

  private expire(f: Flow): void {
    this.o.counters.inc('udp_nat.flows_expired');
    this.closeFlow(f);
  }

  private closeFlow(f: Flow): void {
    if (f.closed) return;
    f.closed = true;
    f.timer.cancel();
    this.flows.delete(f.key);
    const n = (this.perGuest.get(f.guestIp) ?? 1) - 1;
    if (n <= 0) this.perGuest.delete(f.guestIp);
    else this.perGuest.set(f.guestIp, n);
    try {
      f.socket.close();
    } catch {
      // already closed
    }
  }

  close(): void {
    for (const f of [...this.flows.values()]) this.closeFlow(f);
  }
}
