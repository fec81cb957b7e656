/**
 * Which vsock a QEMU machine gets, and the one function through which the daemon takes the
 * guest's vsock connections to a host port, whatever carries them.
 *
 * Two paths (docs/vsock.md):
 * - `host`: the host kernel's vhost-vsock (`/dev/vhost-vsock`, QEMU's vhost-vsock-device). The
 *   guest's `connect(CID 2, port P)` reaches a real AF_VSOCK listener on the host; one listener
 *   per port serves every machine, told apart by the peer's CID, so CIDs must be unique on the
 *   host (`hostCid`).
 * - `vhost-user`: tender's own backend (native/vhost-vsock). The host side is Firecracker's
 *   hybrid vsock: the guest's connections to port P arrive at the unix listener `<base>_P`.
 *
 * - `vmm`: the VMM's own hybrid vsock (vfkit): the same `<base>_P` listeners.
 *
 * None: the machine's agent falls back to virtio-serial (machines.ts says so in inspect).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { vsockListen } from '../../native/index.js';
import { findVhostVsock } from './vhost-vsock.js';

/**
 * 'vmm': the VMM has vsock of its own with per-port unix sockets on the host (vfkit's
 * `virtio-vsock,port=P,socketURL=<base>_P,listen`; Firecracker's and cloud-hypervisor's hybrid
 * vsock): the daemon's side looks exactly like the vhost-user path.
 */
export type VsockVia = 'host' | 'vhost-user' | 'vmm';

/** Whether the host kernel's vhost-vsock can be used (QEMU's vhost-vsock-device opens it). */
export function hostVhostVsockUsable(): boolean {
  try {
    fs.accessSync('/dev/vhost-vsock', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

export type VsockChoice = { via: VsockVia } | { via: null; why: string };

/**
 * The host's vhost-vsock when usable, else tender's vhost-user backend when it was built, else
 * none (with the reason, for the machine's log and inspect). Inputs are injectable for tests.
 */
export function chooseVsock(o: { host?: boolean; backend?: string | null } = {}): VsockChoice {
  if (o.host ?? hostVhostVsockUsable()) return { via: 'host' };
  const backend = o.backend !== undefined ? o.backend : findVhostVsock();
  if (backend) return { via: 'vhost-user' };
  return { via: null, why: 'no /dev/vhost-vsock and tender-vhost-vsock is not built (make -C native/vhost-vsock)' };
}

/**
 * A guest CID for the host-kernel path, stable per machine directory. The kernel's CIDs are
 * host-wide (QEMU fails with EADDRINUSE on a clash), so a fixed 3 would let one machine run;
 * hashing the directory makes clashes between machines (and other tender homes) unlikely.
 * 3..2^31-1: 0-2 are reserved, and staying below 2^31 keeps clear of VMADDR_CID_ANY.
 */
export function hostCid(dir: string): number {
  const h = createHash('sha256').update(dir).digest().readUInt32BE(0);
  return 3 + (h % (0x7fffffff - 3));
}

/** Where a machine's guest-initiated vsock connections arrive. */
export interface GuestVsockEndpoint {
  via: VsockVia;
  /** The guest's CID (the host path tells machines apart by it). */
  cid: number;
  /** Hybrid vsock base: connections to port P arrive at `<path>_P` (vhost-user and vmm paths). */
  path: string;
}

export interface GuestVsockListener {
  close(): void;
}

/**
 * Take the guest's connections to host port `port`: `onConnection` gets each as a Duplex.
 * Used by the agent session (port 1024) and USB/IP (port 3240) alike. `onError`: the listener
 * failed (the socket path could not be bound, AF_VSOCK refused the port).
 */
export function listenGuestVsock(
  ep: GuestVsockEndpoint,
  port: number,
  onConnection: (sock: Duplex) => void,
  onError: (err: Error) => void = () => {},
): GuestVsockListener {
  return ep.via === 'host' ? listenHost(ep.cid, port, onConnection, onError) : listenUnix(`${ep.path}_${port}`, onConnection, onError);
}

function listenUnix(file: string, onConnection: (sock: Duplex) => void, onError: (err: Error) => void): GuestVsockListener {
  try {
    fs.unlinkSync(file);
  } catch {
    // not there
  }
  const server = net.createServer((sock) => onConnection(sock));
  server.on('error', onError);
  server.listen(file);
  return {
    close: () => {
      server.close();
      // A listener that is gone must not leave a path that looks served.
      try {
        fs.unlinkSync(file);
      } catch {
        // already gone
      }
    },
  };
}

/**
 * One AF_VSOCK listener per host port, shared by every machine of this daemon; each
 * connection goes to the machine whose CID it comes from. A CID nobody registered is closed.
 */
interface HostPort {
  server: { close(): void };
  byCid: Map<number, (sock: Duplex) => void>;
}
const hostPorts = new Map<number, HostPort>();

function listenHost(cid: number, port: number, onConnection: (sock: Duplex) => void, onError: (err: Error) => void): GuestVsockListener {
  let hp = hostPorts.get(port);
  if (!hp) {
    let server;
    try {
      server = vsockListen(port);
    } catch (e) {
      queueMicrotask(() => onError(e as Error));
      return { close: () => {} };
    }
    const created: HostPort = { server, byCid: new Map() };
    server.on('connection', (s) => {
      const to = created.byCid.get(s.remoteCid);
      if (to) to(s);
      else s.destroy();
    });
    // accept() errors concern one peer; the listener stays up.
    server.on('error', () => {});
    hostPorts.set(port, created);
    hp = created;
  }
  const entry = hp;
  entry.byCid.set(cid, onConnection);
  return {
    close: () => {
      if (entry.byCid.get(cid) !== onConnection) return;
      entry.byCid.delete(cid);
      if (entry.byCid.size === 0 && hostPorts.get(port) === entry) {
        hostPorts.delete(port);
        entry.server.close();
      }
    },
  };
}
