/**
 * The USB/IP server: accepts connections (TCP here, or any Duplex handed to `accept`, so the
 * same server runs over vsock or a stream inside the machine's network) and serves the
 * devices explicitly added to it. One client per device at a time (usbipd answers
 * ST_DEV_BUSY for a device already exported).
 */
import { createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { AttachedClient, AttachedLog, AttachedOptions } from './attached.js';
import { handleConnection, type ConnectionOutcome, type DeviceRegistry } from './connection.js';
import type { UsbDevice } from './device.js';

export interface UsbIpServerOptions extends AttachedOptions {
  log?: AttachedLog;
}

const silent: AttachedLog = { debug() {}, warn() {} };

export class UsbIpServer implements DeviceRegistry {
  private readonly devices = new Map<string, UsbDevice>();
  private readonly claimed = new Set<string>();
  private readonly sockets = new Set<Duplex>();
  private readonly attached = new Set<AttachedClient>();
  private tcp?: Server;
  readonly log: AttachedLog;

  constructor(private readonly opts: UsbIpServerOptions = {}) {
    this.log = opts.log ?? silent;
  }

  add(dev: UsbDevice): void {
    if (this.devices.has(dev.busid)) throw new Error(`busid ${dev.busid} already exported`);
    this.devices.set(dev.busid, dev);
  }

  remove(busid: string): void {
    this.devices.delete(busid);
    for (const a of this.attached) if (a.dev.busid === busid) a.close({ kind: 'error', message: 'device removed' });
  }

  list(): UsbDevice[] {
    return [...this.devices.values()];
  }

  claim(busid: string): UsbDevice | 'busy' | undefined {
    const d = this.devices.get(busid);
    if (!d) return undefined;
    if (this.claimed.has(busid)) return 'busy';
    this.claimed.add(busid);
    return d;
  }

  /** Whether a client has imported `busid` right now. */
  inUse(busid: string): boolean {
    return this.claimed.has(busid);
  }

  release(dev: UsbDevice): void {
    this.claimed.delete(dev.busid);
  }

  /**
   * Serve one already-connected stream. `allowed` narrows what this client may list and import
   * (a machine sees only the devices attached to it).
   */
  async accept(sock: Duplex, allowed?: (dev: UsbDevice) => boolean): Promise<ConnectionOutcome> {
    this.sockets.add(sock);
    sock.once('close', () => this.sockets.delete(sock));
    const reg: DeviceRegistry = allowed
      ? {
          list: () => this.list().filter(allowed),
          claim: (busid) => {
            const d = this.devices.get(busid);
            return d && allowed(d) ? this.claim(busid) : undefined;
          },
          release: (dev) => this.release(dev),
        }
      : this;
    const out = await handleConnection(sock, reg, this.log, this.opts);
    if (out.op === 'import' && out.attached) {
      const a = out.attached;
      this.attached.add(a);
      void a.finished.then(() => this.attached.delete(a));
    }
    return out;
  }

  /** Listen on TCP; resolves with the bound address (port 0 = a free port). */
  listen(port: number, host = '127.0.0.1'): Promise<{ address: string; port: number }> {
    return new Promise((resolve, reject) => {
      const srv = createServer((s: Socket) => {
        s.setNoDelay(true);
        void this.accept(s);
      });
      srv.once('error', reject);
      srv.listen(port, host, () => {
        srv.off('error', reject);
        srv.on('error', (e) => this.log.warn({ err: e.message }, 'USB/IP listener error'));
        this.tcp = srv;
        const a = srv.address() as { address: string; port: number };
        resolve({ address: a.address, port: a.port });
      });
    });
  }

  async close(): Promise<void> {
    for (const a of this.attached) a.close({ kind: 'error', message: 'server closing' });
    for (const s of this.sockets) s.destroy();
    const srv = this.tcp;
    this.tcp = undefined;
    if (srv) await new Promise<void>((r) => srv.close(() => r()));
  }
}
