/**
 * TCP port forwarding, host → guest: a host listener on HOSTIP:HOSTPORT; each accepted
 * connection opens a connection from the gateway side into the guest and the two are bridged.
 *
 * Source address the guest sees: a client from another host appears with its real IPv4
 * address and port (so the guest's logs and access rules see who is connecting); a client on
 * the host's loopback (or any IPv6 client) appears from the host alias, with its own port when
 * that tuple is free. If the guest refuses (RST) or never answers, the host connection is
 * closed at once, so the host client sees the failure instead of a silent hang.
 */
import net from 'node:net';
import { isIPv4 } from 'node:net';
import { type Ip4, ip4, ip4str } from '../addr.js';
import type { Counters } from '../counters.js';
import type { TcpConnection } from '../tcp/connection.js';
import type { TcpStack } from '../tcp/stack.js';
import { bridge } from './tcp-bridge.js';

export interface TcpForwardOptions {
  counters: Counters;
  tcp: TcpStack;
  hostIp: string;
  hostPort: number;
  guestIp: Ip4;
  guestPort: number;
  aliasIp: Ip4;
  inSubnet: (ip: Ip4) => boolean;
  maxConnections?: number;
}

export class TcpForward {
  private server: net.Server | null = null;
  port = 0;
  active = 0;

  constructor(private readonly o: TcpForwardOptions) {}

  async start(): Promise<number> {
    const server = net.createServer({ pauseOnConnect: true, noDelay: true, allowHalfOpen: true }, (s) => this.accept(s));
    this.server = server;
    server.maxConnections = this.o.maxConnections ?? 4096;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: this.o.hostIp, port: this.o.hostPort, ipv6Only: this.o.hostIp.includes(':') && this.o.hostIp !== '::' }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err: NodeJS.ErrnoException) => this.o.counters.inc(`tcp_forward.host_error.${err.code ?? 'UNKNOWN'}`));
    this.port = (server.address() as net.AddressInfo).port;
    return this.port;
  }

  private accept(sock: net.Socket): void {
    const c = this.o.counters;
    c.inc('tcp_forward.accepted');
    let srcIp = this.o.aliasIp;
    const addr = sock.remoteAddress ?? '';
    const v4 = addr.startsWith('::ffff:') ? addr.slice(7) : addr;
    if (isIPv4(v4) && !v4.startsWith('127.')) {
      const a = ip4(v4);
      if (!this.o.inSubnet(a)) srcIp = a;
    }
    // The client's own port when that tuple is free, else a random ephemeral one.
    let conn: TcpConnection | null = null;
    let port = sock.remotePort ?? 0;
    for (let tries = 0; tries < 16 && conn === null; tries++) {
      try {
        if (port === 0) port = 32768 + Math.floor(Math.random() * 28232);
        conn = this.o.tcp.connect({ localIp: srcIp, localPort: port, remoteIp: this.o.guestIp, remotePort: this.o.guestPort });
      } catch (err) {
        if ((err as { code?: string }).code !== 'EADDRINUSE') break;
        port = 0;
      }
    }
    if (conn === null) {
      c.inc('tcp_forward.drop.connect_failed');
      sock.destroy();
      return;
    }
    // Until the guest answers, nothing is read from the host socket.
    const refused = (err: { code: string }) => {
      c.inc(`tcp_forward.guest_error.${err.code}`);
      if (typeof sock.resetAndDestroy === 'function') sock.resetAndDestroy();
      else sock.destroy();
    };
    conn.once('error', refused);
    sock.once('error', () => conn.destroy());
    conn.once('connect', () => {
      conn.off('error', refused);
      this.active++;
      bridge(conn, sock, c, () => this.active--);
      sock.resume();
    });
  }

  describe(): string {
    return `${this.o.hostIp}:${this.port} -> ${ip4str(this.o.guestIp)}:${this.o.guestPort}/tcp`;
  }

  close(): void {
    this.server?.close();
    this.server = null;
  }
}
