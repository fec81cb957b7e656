/**
 * The daemon's connection to a machine's guest agent: the VMM serves the agent channel on a
 * unix socket (QEMU's virtio-serial chardev with server=on), and we connect to it, retrying
 * while the VMM creates it and again whenever the connection drops — so a restarted daemon
 * simply reconnects. Each connection gets an AgentClient; the agent itself says hello again
 * after a guest-side reconnect.
 */
import net from 'node:net';
import { AgentClient, type Listener } from '../agent/client.js';
import { TenderError } from '../errors.js';
import { type GuestVsockEndpoint, listenGuestVsock } from '../vmm/vsock-channel.js';
import type { AgentSession } from './machines.js';

export type DaemonAgentSession = AgentSession;

/** The parts both channel kinds share: the current client and the session's methods. */
function session(onClose: () => void): {
  s: DaemonAgentSession;
  adopt(c: AgentClient, onGone: () => void): void;
  closed(): boolean;
} {
  let client: AgentClient | null = null;
  let closed = false;
  let listenersFn: ((ls: Listener[]) => void) | null = null;
  let helloFn: (() => void) | null = null;
  let resolveReady!: (v: unknown) => void;
  const ready = new Promise<unknown>((r) => (resolveReady = r));
  const current = () => {
    if (!client || !client.hello) throw new TenderError('AGENT_UNAVAILABLE', 'the guest agent is not connected');
    return client;
  };
  return {
    closed: () => closed,
    adopt(c, onGone) {
      client?.close();
      client = c;
      c.on('hello', () => {
        resolveReady(c.hello);
        if (client === c) helloFn?.();
      });
      c.on('listeners', (ls: readonly Listener[]) => listenersFn?.([...ls]));
      c.on('close', () => {
        if (client === c) {
          client = null;
          onGone();
        }
      });
    },
    s: {
      ready,
      onListeners(fn) {
        listenersFn = fn;
      },
      onHello(fn) {
        helloFn = fn;
      },
      async poweroff() {
        await client?.poweroff();
      },
      exec: (argv, opts) => current().exec(argv, opts),
      usbAttach: async (o) => current().usbAttach(o),
      usbDetach: async (port) => {
        await current().usbDetach(port);
      },
      close() {
        closed = true;
        client?.close();
        onClose();
      },
    },
  };
}

/**
 * vsock: the agent connects to the host. With tender's vhost-user backend (or a hybrid-vsock
 * VMM) its connections arrive on a unix socket at `<path>_<port>`; with the host's
 * vhost-vsock on an AF_VSOCK listener, picked out by the machine's CID (listenGuestVsock). A
 * reconnecting agent simply arrives again.
 */
export function listenAgentSession(ep: GuestVsockEndpoint, port: number, onGone: () => void): DaemonAgentSession {
  const listener = listenGuestVsock(
    ep,
    port,
    (sock) => {
      if (x.closed()) return void sock.destroy();
      x.adopt(new AgentClient(sock), onGone);
    },
    () => onGone(),
  );
  const x = session(() => listener.close());
  return x.s;
}

export function connectAgentSession(path: string, onGone: () => void): DaemonAgentSession {
  const x = session(() => {});
  let delay = 100;
  const connect = () => {
    if (x.closed()) return;
    const sock = net.connect(path);
    sock.once('error', () => {
      // Not there yet (VMM starting) or gone: retry with backoff until closed.
      setTimeout(connect, delay).unref();
      delay = Math.min(delay * 2, 2000);
    });
    sock.once('connect', () => {
      delay = 100;
      x.adopt(new AgentClient(sock), () => {
        onGone();
        if (!x.closed()) setTimeout(connect, 200).unref();
      });
    });
  };
  connect();
  return x.s;
}
