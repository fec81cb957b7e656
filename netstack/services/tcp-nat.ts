/**
 * TCP NAT, guest → outside: a guest SYN to any address becomes a host socket.
 *
 * The host is dialled *first*; the guest's SYN is answered only once the outcome is known
 * (gvisor-tap-vsock does the same, and it is what makes `connect()` in the guest behave like
 * a real network: refused ports fail fast, open ports open):
 *
 * | dial outcome                      | what the guest sees                          |
 * |-----------------------------------|----------------------------------------------|
 * | connected                         | SYN-ACK, then data both ways                 |
 * | ECONNREFUSED                      | RST (connect() fails with ECONNREFUSED)      |
 * | ENETUNREACH / EHOSTUNREACH        | ICMP net/host unreachable                    |
 * | EACCES / EPERM (host policy)      | ICMP administratively prohibited             |
 * | pending                           | nothing: its SYN retransmissions are absorbed |
 * | dial timeout                      | nothing; the guest's own connect timeout runs |
 *
 * Pending dials per guest are bounded (SYNs beyond the bound are dropped and counted, and the
 * guest retries). Traffic to the host alias goes to the host's 127.0.0.1 unless host loopback
 * is disabled.
 */
import net from 'node:net';
import { type Ip4, ip4str } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Gateway } from '../iface/gateway.js';
import type { PendingSyn, TcpStack } from '../tcp/stack.js';
import { IcmpType, UnreachCode } from '../wire/icmpv4.js';
import { IPV4_HLEN, IpProto, emitIpv4 } from '../wire/ipv4.js';
import { HostReader, bridge } from './tcp-bridge.js';

export interface TcpNatOptions {
  counters: Counters;
  tcp: TcpStack;
  gateway: Gateway;
  hostAlias: Ip4 | null;
  hostLoopback: boolean;
  maxPendingPerGuest?: number;
  dialTimeoutMs?: number;
  /** How to reach the host (injectable for tests); default node:net connect. */
  dial?: (host: string, port: number) => net.Socket;
  /** Services on the gateway's own addresses (e.g. DNS over TCP): port → handler. */
  local?: Map<number, (conn: import('../tcp/connection.js').TcpConnection) => void>;
}

export class TcpNat {
  private readonly pending = new Map<Ip4, number>();
  active = 0;

  constructor(private readonly o: TcpNatOptions) {
    o.tcp.onSyn = (syn) => this.onSyn(syn);
  }

  private onSyn(syn: PendingSyn): void {
    const c = this.o.counters;
    const t = syn.tuple;
    // SYN to the gateway's own addresses: local services, or RST.
    const dst = t.localIp;
    let host: string;
    if (this.o.gateway.owns(dst) && dst !== this.o.hostAlias) {
      const h = this.o.local?.get(t.localPort);
      if (h === undefined) {
        c.inc('tcp_nat.refused_local');
        syn.reset();
        return;
      }
      try {
        h(syn.accept());
      } catch {
        c.inc('tcp_nat.accept_failed');
      }
      return;
    }
    if (this.o.hostAlias !== null && dst === this.o.hostAlias) {
      if (!this.o.hostLoopback) {
        c.inc('tcp_nat.drop.host_loopback_disabled');
        syn.drop();
        this.unreachable(syn, UnreachCode.AdminProhibited);
        return;
      }
      host = '127.0.0.1';
    } else {
      host = ip4str(dst);
    }
    const guest = t.remoteIp;
    const n = this.pending.get(guest) ?? 0;
    if (n >= (this.o.maxPendingPerGuest ?? 256)) {
      c.inc('tcp_nat.drop.pending_limit');
      syn.drop();
      return;
    }
    this.pending.set(guest, n + 1);
    c.inc('tcp_nat.dial');
    const reader = new HostReader();
    const sock = this.o.dial ? this.o.dial(host, t.localPort) : net.connect({ host, port: t.localPort, noDelay: true, allowHalfOpen: true, onread: reader.option() });
    let settled = false;
    const settle = () => {
      if (settled) return false;
      settled = true;
      const m = (this.pending.get(guest) ?? 1) - 1;
      if (m <= 0) this.pending.delete(guest);
      else this.pending.set(guest, m);
      return true;
    };
    const timer = setTimeout(() => {
      if (!settle()) return;
      c.inc('tcp_nat.dial_timeout');
      sock.destroy();
      syn.drop();
    }, this.o.dialTimeoutMs ?? 30_000);
    timer.unref();
    sock.once('connect', () => {
      clearTimeout(timer);
      if (!settle()) return;
      let conn;
      try {
        conn = syn.accept();
      } catch {
        // Decided meanwhile (the stack was closed, or the tuple was reused).
        c.inc('tcp_nat.accept_failed');
        sock.destroy();
        return;
      }
      c.inc('tcp_nat.connected');
      this.active++;
      bridge(conn, sock, c, () => this.active--, this.o.dial ? undefined : reader);
    });
    sock.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (!settle()) return;
      this.dialFailed(syn, err);
    });
  }

  /** The one place where a failed host dial becomes guest-visible behaviour. */
  private dialFailed(syn: PendingSyn, err: NodeJS.ErrnoException): void {
    const c = this.o.counters;
    const code = err.code ?? 'UNKNOWN';
    c.inc(`tcp_nat.dial_error.${code}`);
    switch (code) {
      case 'ECONNREFUSED':
        syn.reset();
        return;
      case 'ENETUNREACH':
        syn.drop();
        this.unreachable(syn, UnreachCode.Net);
        return;
      case 'EHOSTUNREACH':
      case 'EHOSTDOWN':
        syn.drop();
        this.unreachable(syn, UnreachCode.Host);
        return;
      case 'EACCES':
      case 'EPERM':
        syn.drop();
        this.unreachable(syn, UnreachCode.AdminProhibited);
        return;
      default:
        // ETIMEDOUT, EADDRNOTAVAIL, ...: a reset is the most honest answer a host can give.
        syn.reset();
    }
  }

  /**
   * ICMP destination unreachable for a SYN we no longer hold: rebuild the quoted header
   * (IPv4 + the first 8 bytes of TCP: ports and sequence number), which is all the guest's
   * stack needs to match the error to its socket (RFC 1122 §3.2.2).
   */
  private unreachable(syn: PendingSyn, code: number): void {
    const t = syn.tuple;
    const q = new Uint8Array(IPV4_HLEN + 8);
    emitIpv4({ src: t.remoteIp, dst: t.localIp, protocol: IpProto.TCP, payloadLen: 20, ttl: 64 }, q, 0);
    q[20] = t.remotePort >> 8;
    q[21] = t.remotePort & 0xff;
    q[22] = t.localPort >> 8;
    q[23] = t.localPort & 0xff;
    const isn = syn.irs >>> 0;
    q[24] = isn >>> 24;
    q[25] = (isn >>> 16) & 0xff;
    q[26] = (isn >>> 8) & 0xff;
    q[27] = isn & 0xff;
    this.o.gateway.sendIcmpError(q, IPV4_HLEN, t.remoteIp, IcmpType.DestUnreachable, code);
  }
}
