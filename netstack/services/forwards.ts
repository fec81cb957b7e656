/**
 * The table of port forwards of one network: add, remove, list. Each forward owns a host
 * listener (TcpForward or UdpForward). Host errors at bind time come back as `ForwardError`
 * with a stable code the API and CLI report as they are.
 */
import { type Ip4, inSubnet, ip4str } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Clock } from '../time.js';
import type { TcpStack } from '../tcp/stack.js';
import type { UdpLayer } from '../udp/udp-layer.js';
import { type ForwardSpec, formatForward } from './forward-spec.js';
import { TcpForward } from './tcp-forward.js';
import { UdpForward } from './udp-forward.js';
import type { Subnet } from '../addr.js';

export type ForwardErrorCode = 'FORWARD_EXISTS' | 'FORWARD_NOT_FOUND' | 'ADDRESS_IN_USE' | 'ADDRESS_NOT_AVAILABLE' | 'PERMISSION_DENIED' | 'BAD_FORWARD_SPEC';

export class ForwardError extends Error {
  constructor(
    readonly code: ForwardErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ForwardError';
  }
}

export interface Forward {
  protocol: 'tcp' | 'udp';
  hostIp: string;
  /** The bound port (the free port chosen when 0 was asked). */
  hostPort: number;
  guestIp: string;
  guestPort: number;
  /** Canonical spec text, e.g. `127.0.0.1:8080:80/tcp`. */
  spec: string;
}

export interface ForwardsOptions {
  clock: Clock;
  counters: Counters;
  udp: UdpLayer;
  tcp: TcpStack | null;
  subnet: Subnet;
  aliasIp: Ip4;
}

interface Entry {
  forward: Forward;
  impl: TcpForward | UdpForward;
}

function key(protocol: string, hostIp: string, hostPort: number): string {
  return `${protocol}|${hostIp}|${hostPort}`;
}

export class Forwards {
  private readonly entries = new Map<string, Entry>();

  constructor(private readonly o: ForwardsOptions) {}

  list(): Forward[] {
    return [...this.entries.values()].map((e) => ({ ...e.forward }));
  }

  find(protocol: string, hostIp: string, hostPort: number): Forward | null {
    const e = this.entries.get(key(protocol, hostIp, hostPort));
    return e ? { ...e.forward } : null;
  }

  async add(spec: ForwardSpec, guestIp: Ip4): Promise<Forward> {
    if (spec.hostPort !== 0 && this.entries.has(key(spec.protocol, spec.hostIp, spec.hostPort))) {
      throw new ForwardError('FORWARD_EXISTS', `a ${spec.protocol} forward on ${formatForward(spec).split('/')[0]!.replace(/:\d+$/, '')} already exists`);
    }
    const inSub = (ip: Ip4) => inSubnet(this.o.subnet, ip);
    let impl: TcpForward | UdpForward;
    if (spec.protocol === 'tcp') {
      if (this.o.tcp === null) throw new ForwardError('BAD_FORWARD_SPEC', 'TCP forwarding is not available on this network');
      impl = new TcpForward({ counters: this.o.counters, tcp: this.o.tcp, hostIp: spec.hostIp, hostPort: spec.hostPort, guestIp, guestPort: spec.guestPort, aliasIp: this.o.aliasIp, inSubnet: inSub });
    } else {
      impl = new UdpForward({ clock: this.o.clock, counters: this.o.counters, udp: this.o.udp, hostIp: spec.hostIp, hostPort: spec.hostPort, guestIp, guestPort: spec.guestPort, aliasIp: this.o.aliasIp, inSubnet: inSub });
    }
    let port: number;
    try {
      port = await impl.start();
    } catch (err) {
      impl.close();
      throw bindError(err as NodeJS.ErrnoException, spec);
    }
    const forward: Forward = {
      protocol: spec.protocol,
      hostIp: spec.hostIp,
      hostPort: port,
      guestIp: ip4str(guestIp),
      guestPort: spec.guestPort,
      spec: formatForward({ ...spec, hostPort: port }),
    };
    this.entries.set(key(spec.protocol, spec.hostIp, port), { forward, impl });
    this.o.counters.inc('forwards.added');
    return { ...forward };
  }

  remove(protocol: string, hostIp: string, hostPort: number): Forward {
    const k = key(protocol, hostIp, hostPort);
    const e = this.entries.get(k);
    if (e === undefined) throw new ForwardError('FORWARD_NOT_FOUND', `no ${protocol} forward on ${hostIp.includes(':') ? `[${hostIp}]` : hostIp}:${hostPort}`);
    this.entries.delete(k);
    e.impl.close();
    this.o.counters.inc('forwards.removed');
    return e.forward;
  }

  close(): void {
    for (const e of this.entries.values()) e.impl.close();
    this.entries.clear();
  }
}

function bindError(err: NodeJS.ErrnoException, spec: ForwardSpec): ForwardError {
  const where = `${spec.hostIp.includes(':') ? `[${spec.hostIp}]` : spec.hostIp}:${spec.hostPort}/${spec.protocol}`;
  switch (err.code) {
    case 'EADDRINUSE':
      return new ForwardError('ADDRESS_IN_USE', `${where} is already in use on the host`);
    case 'EADDRNOTAVAIL':
      return new ForwardError('ADDRESS_NOT_AVAILABLE', `${spec.hostIp} is not an address of this host`);
    case 'EACCES':
    case 'EPERM':
      return new ForwardError('PERMISSION_DENIED', `binding ${where} needs privileges (ports below 1024 need root or CAP_NET_BIND_SERVICE)`);
    default:
      return new ForwardError('ADDRESS_NOT_AVAILABLE', `cannot bind ${where}: ${err.message}`);
  }
}
