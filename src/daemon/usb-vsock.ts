/**
 * USB/IP over vsock (issue 5's preferred transport). A machine whose agent runs on vsock
 * imports devices over AF_VSOCK instead of TCP through the userspace network: the agent
 * connects to CID 2 (the host) port 3240, does the import handshake there, and hands that
 * socket to vhci-hcd (docs/agent-protocol.md, USB_ATTACH with host "vsock:2").
 *
 * On the host, the guest's connections to port 3240 arrive where the agent's own port 1024
 * does (listenGuestVsock: `<machine dir>/vsock_3240` with tender's vhost-user backend, an
 * AF_VSOCK listener picked out by CID with the host's vhost-vsock), so the machine is known
 * from where the connection arrived, as the TCP path knows it from the source address. Each
 * connection goes to the USB/IP server with that machine's allow rule.
 *
 * One listener per machine, opened when a device is first imported into it and closed when
 * the machine stops (the next start may use another channel).
 */
import type { Duplex } from 'node:stream';
import type { Logger } from '../log.js';
import { type GuestVsockEndpoint, type GuestVsockListener, listenGuestVsock } from '../vmm/vsock-channel.js';

/** The guest's USB/IP port on the host side of vsock: the same number as TCP's. */
export const USBIP_VSOCK_PORT = 3240;
/** USB_ATTACH's host for "the host over vsock" (VMADDR_CID_HOST). */
export const VSOCK_HOST = 'vsock:2';

export interface UsbTransport {
  host: string;
  port: number;
}

export class UsbVsock {
  private readonly open = new Map<string, { ep: GuestVsockEndpoint; listener: GuestVsockListener }>();

  constructor(
    private readonly o: {
      /** Where a running machine's vsock connections arrive; null: its agent is not on vsock. */
      endpoint: (machine: string) => GuestVsockEndpoint | null;
      /** A USB/IP connection from `machine`. */
      accept: (machine: string, sock: Duplex) => void;
      log: Logger;
    },
  ) {}

  /** The vsock transport for importing into `machine` (its listener open), or null: use TCP. */
  transportFor(machine: string): UsbTransport | null {
    const ep = this.o.endpoint(machine);
    const cur = this.open.get(machine);
    if (cur && ep && cur.ep.via === ep.via && cur.ep.cid === ep.cid && cur.ep.path === ep.path) return { host: VSOCK_HOST, port: USBIP_VSOCK_PORT };
    this.close(machine);
    if (!ep) return null;
    const listener = listenGuestVsock(
      ep,
      USBIP_VSOCK_PORT,
      (sock) => this.o.accept(machine, sock),
      (err) => {
        this.o.log.warn({ machine, err: err.message }, 'USB/IP vsock listener failed');
        if (this.open.get(machine)?.listener === listener) this.open.delete(machine);
      },
    );
    this.open.set(machine, { ep, listener });
    return { host: VSOCK_HOST, port: USBIP_VSOCK_PORT };
  }

  /**
   * Import over vsock when the machine has it, else over `tcp`. An agent from before the
   * vsock transport refuses "vsock:2" as a bad payload: that one attempt is retried over TCP.
   */
  async attach<R>(machine: string, tcp: UsbTransport, attach: (t: UsbTransport) => Promise<R>): Promise<R> {
    const t = this.transportFor(machine);
    if (!t) return attach(tcp);
    try {
      return await attach(t);
    } catch (err) {
      const e = err as { code?: string; agentCode?: number };
      if (e.code === 'AGENT_REJECTED' && e.agentCode === 2) {
        this.o.log.warn({ machine }, 'the guest agent cannot import over vsock (an older agent): using TCP');
        return attach(tcp);
      }
      throw err;
    }
  }

  /** The machine stopped: its listener goes (the next start may use another channel). */
  close(machine: string): void {
    this.open.get(machine)?.listener.close();
    this.open.delete(machine);
  }

  closeAll(): void {
    for (const m of [...this.open.keys()]) this.close(m);
  }
}
