/**
 * UDP port forwarding, host → guest: a host UDP socket bound on HOSTIP:HOSTPORT; each client
 * (address, port) becomes a flow, sent into the guest from an address the guest can answer:
 *
 * - an IPv4 client from another host appears with its real address and port (the guest sees
 *   who is talking, which DNS servers, game servers and logs care about);
 * - a client on the host's loopback (or any IPv6 client) appears from the host alias
 *   (192.168.127.254), with its own port when free, else another free port.
 *
 * The guest's replies to that address are caught by a UDP binding on the gateway (bindings
 * win over the NAT) and sent back to the client from the forward's socket. Flows end after
 * `idleMs` without traffic; their number per forward is bounded.
 */
import dgram from 'node:dgram';
import { isIPv4 } from 'node:net';
import { type Ip4, ip4, ip4str } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Clock, Timer } from '../time.js';
import type { UdpLayer } from '../udp/udp-layer.js';

export interface UdpForwardOptions {
  clock: Clock;
  counters: Counters;
  udp: UdpLayer;
  hostIp: string;
  hostPort: number;
  guestIp: Ip4;
  guestPort: number;
  /** Source address for loopback/IPv6 clients (the host alias, or the gateway without one). */
  aliasIp: Ip4;
  /** Whether `ip` is an address of the virtual subnet (such clients cannot be shown as themselves). */
  inSubnet: (ip: Ip4) => boolean;
  idleMs?: number;
  maxFlows?: number;
}

interface Flow {
  key: string;
  clientAddr: string;
  clientPort: number;
  srcIp: Ip4;
  srcPort: number;
  unbind: () => void;
  timer: Timer;
}

export class UdpForward {
  private socket: dgram.Socket | null = null;
  private readonly flows = new Map<string, Flow>();
  private readonly idleMs: number;
  private readonly maxFlows: number;
  /** The bound port (differs from the requested one when it was 0). */
  port = 0;

  constructor(private readonly o: UdpForwardOptions) {
    this.idleMs = o.idleMs ?? 90_000;
    this.maxFlows = o.maxFlows ?? 1024;
  }

  async start(): Promise<number> {
    const family = isIPv4(this.o.hostIp) ? 'udp4' : 'udp6';
    const s = dgram.createSocket({ type: family, ipv6Only: family === 'udp6' && this.o.hostIp !== '::' });
    this.socket = s;
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.bind(this.o.hostPort, this.o.hostIp, () => {
        s.off('error', reject);
        resolve();
      });
    });
    s.on('error', (err) => this.o.counters.inc(`udp_forward.host_error.${(err as NodeJS.ErrnoException).code ?? 'UNKNOWN'}`));
    s.on('message', (msg, rinfo) => this.fromClient(msg, rinfo));
    this.port = s.address().port;
    return this.port;
  }

  get flowCount(): number {
    return this.flows.size;
  }

  private fromClient(msg: Buffer, r: dgram.RemoteInfo): void {
    const key = `${r.address}|${r.port}`;
    let f = this.flows.get(key);
    if (f === undefined) {
      const nf = this.open(key, r);
      if (nf === null) return;
      f = nf;
    }
    f.timer.arm(this.idleMs);
    this.o.counters.inc('udp_forward.in');
    this.o.udp.send(f.srcIp, f.srcPort, this.o.guestIp, this.o.guestPort, msg);
  }

  private open(key: string, r: dgram.RemoteInfo): Flow | null {
    const c = this.o.counters;
    if (this.flows.size >= this.maxFlows) {
      c.inc('udp_forward.drop.flow_limit');
      return null;
    }
    let srcIp = this.o.aliasIp;
    const v4 = r.family === 'IPv4' ? r.address : r.address.startsWith('::ffff:') ? r.address.slice(7) : null;
    if (v4 !== null && isIPv4(v4) && !v4.startsWith('127.')) {
      const a = ip4(v4);
      if (!this.o.inSubnet(a)) srcIp = a;
    }
    // Prefer the client's own port; fall back to scanning the ephemeral range for a free binding.
    let srcPort = r.port;
    let unbind: (() => void) | null = null;
    const reply = (d: { payload: Uint8Array; srcIp: Ip4; srcPort: number }) => this.fromGuest(flow, d);
    for (let tries = 0; tries < 64 && unbind === null; tries++) {
      try {
        unbind = this.o.udp.bind(srcIp, srcPort, reply);
      } catch {
        srcPort = 32768 + Math.floor(Math.random() * 28232);
      }
    }
    if (unbind === null) {
      c.inc('udp_forward.drop.no_source_port');
      return null;
    }
    const flow: Flow = {
      key,
      clientAddr: r.address,
      clientPort: r.port,
      srcIp,
      srcPort,
      unbind,
      timer: this.o.clock.timer(() => this.closeFlow(flow)),
    };
    this.flows.set(key, flow);
    c.inc('udp_forward.flows_opened');
    return flow;
  }

  private fromGuest(f: Flow, d: { payload: Uint8Array; srcIp: Ip4; srcPort: number }): void {
    if (d.srcIp !== this.o.guestIp || d.srcPort !== this.o.guestPort) {
      // Something else on the subnet writing to the flow's address: not part of this flow.
      this.o.counters.inc('udp_forward.drop.foreign_source');
      return;
    }
    f.timer.arm(this.idleMs);
    this.o.counters.inc('udp_forward.out');
    this.socket?.send(Buffer.from(d.payload), f.clientPort, f.clientAddr);
  }

  private closeFlow(f: Flow): void {
    if (this.flows.get(f.key) !== f) return;
    this.flows.delete(f.key);
    f.timer.cancel();
    f.unbind();
  }

  describe(): string {
    return `${this.o.hostIp}:${this.port} -> ${ip4str(this.o.guestIp)}:${this.o.guestPort}/udp`;
  }

  close(): void {
    for (const f of [...this.flows.values()]) this.closeFlow(f);
    try {
      this.socket?.close();
    } catch {
      // already closed
    }
    this.socket = null;
  }
}
