/**
 * Sharing devices with USB/IP clients outside the machines: `usb bind` / `usb unbind` (persistent,
 * kept while a device is unplugged) and the clients themselves, which reach the server only
 * through `serveShared`: the `tender usb serve` relay, or the daemon's own listener when
 * config.json says `usb.serve`. Such a client sees the shared devices only; a shared device
 * attached to a machine is busy for it.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import type { UsbDevice } from '../../usb/device.js';
import type { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import { kick } from './usb-attach.js';
import type { Dev, UsbDevices } from './usb-devices.js';
import type { HostDevices } from './usb-host.js';
import { isVidPid, listenError, normalizeVidPid, parseListen } from './usb-state.js';
import type { UsbStore } from './usb-store.js';

export interface UsbServeStatus {
  /** The configured address (config.json `usb.serve`), or null when the daemon does not serve. */
  listen: string | null;
  address: string | null;
  port: number | null;
  /** Why the configured listener is not running. */
  error: string | null;
}

export class UsbSharing {
  private listener: net.Server | null = null;
  private status: UsbServeStatus = { listen: null, address: null, port: null, error: null };

  constructor(
    private readonly o: {
      server: UsbIpServer;
      store: UsbStore;
      devices: UsbDevices;
      host: Pick<HostDevices, 'sync' | 'syncLogged'>;
      log: Logger;
    },
  ) {}

  isShared(d: Dev): boolean {
    return this.o.store.state.bindings.some((b) => b.device === d.id && b.vidpid === d.vidpid);
  }

  isSharedBusid(busid: string): boolean {
    const d = this.o.devices.byBusid(busid);
    return d !== undefined && this.isShared(d);
  }

  private unbound(id: string): void {
    this.o.store.state.bindings = this.o.store.state.bindings.filter((b) => b.device !== id);
  }

  /** `usb bind`: share a device with `usb serve` clients, persistently. Returns its id. */
  async bind(device: string): Promise<string> {
    const d = this.o.devices.resolve(device);
    if (!this.isShared(d)) {
      // A binding of another device that was at this busid before is replaced.
      this.unbound(d.id);
      this.o.store.state.bindings.push({ device: d.id, vidpid: d.vidpid });
      if (d.kind === 'host') {
        try {
          await this.o.host.sync(d.busid);
        } catch (err) {
          this.unbound(d.id);
          throw err;
        }
      }
      this.o.store.save();
    }
    return d.id;
  }

  /** `usb unbind`: stop sharing; a serve client using it is disconnected. Works for unplugged devices too. Returns its id. */
  async unbind(device: string): Promise<string> {
    let id: string | undefined;
    try {
      id = this.o.devices.resolve(device).id;
    } catch (err) {
      // Bindings outlive unplugging: find one by its busid or VID:PID.
      const vp = isVidPid(device) ? normalizeVidPid(device) : null;
      const hits = this.o.store.state.bindings.filter((b) => b.device === device || b.vidpid === vp);
      if (hits.length !== 1) throw err;
      id = hits[0]!.device;
    }
    const before = this.o.store.state.bindings.length;
    this.unbound(id);
    if (this.o.store.state.bindings.length === before) throw new TenderError('USB_DEVICE_NOT_FOUND', `${device} is not shared`);
    this.o.store.save();
    const d = this.o.devices.byId(id);
    if (d) {
      // A machine's import stays; a serve client's ends.
      if (!this.o.store.attachmentOf(d.id) && this.o.server.inUse(d.busid)) kick(this.o.server, d.busid);
      if (d.kind === 'host') await this.o.host.syncLogged(d.busid);
    }
    return id;
  }

  /** One USB/IP client of the shared devices (the `usb serve` relay or the daemon's own listener). */
  serveShared(sock: Duplex): void {
    void this.o.server.accept(sock, (dev: UsbDevice) => this.isSharedBusid(dev.busid));
  }

  /** The daemon's own `usb serve` (config.json `usb.serve`): an explicit choice, shared devices only. */
  async listen(listen: string): Promise<void> {
    this.status = { listen, address: null, port: null, error: null };
    try {
      const { host, port } = parseListen(listen, 'usb.serve in config.json');
      const srv = net.createServer((s) => {
        s.setNoDelay(true);
        s.on('error', () => {});
        this.serveShared(s);
      });
      await new Promise<void>((res, rej) => {
        srv.once('error', (e: NodeJS.ErrnoException) => rej(listenError(e, `usb.serve ${listen}`)));
        srv.listen(port, host, () => res());
      });
      srv.on('error', (e) => this.o.log.warn({ err: e.message }, 'USB/IP listener error'));
      this.listener = srv;
      const a = srv.address() as net.AddressInfo;
      this.status = { listen, address: a.address, port: a.port, error: null };
      this.o.log.info({ address: a.address, port: a.port }, 'serving shared USB devices (config.json usb.serve)');
    } catch (err) {
      // A bad setting must not keep the daemon (and so every machine) from starting.
      this.status = { listen, address: null, port: null, error: (err as Error).message };
      this.o.log.error({ listen, err: (err as Error).message }, 'usb.serve: not serving shared USB devices');
    }
  }

  serving(): UsbServeStatus {
    return { ...this.status };
  }

  /** Stop the daemon's own listener (the connections it accepted end with the server). */
  async close(): Promise<void> {
    const l = this.listener;
    this.listener = null;
    if (l) await new Promise<void>((r) => l.close(() => r()));
  }
}
