/**
 * Host USB devices (from an injected HostDeviceSource: libusb on a real daemon, none when libusb
 * is unavailable): which are plugged in, and opening each exactly while it is wanted.
 *
 * A host device is open (its kernel driver detached, offered by the USB/IP server) exactly while
 * a running machine holds it or it is shared, and closed (driver reattached) otherwise; what
 * "wanted" means is the manager's to say (`wanted`). Opens and closes of one busid run one after
 * the other: an attach, a detach and a hotplug event may all ask at once, and libusb must never
 * see two opens of one device. A device re-enumerated at the same busid (a reset, a firmware
 * flash) has a new devnum: the old handle is dead and is closed before the new one opens.
 */
import type { HostDeviceInfo, HostDeviceSource, HostUsbDevice } from '../../usb/host/source.js';
import type { UsbIpServer } from '../../usb/server.js';
import { ERRORS, type ErrorCode, TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import { vidpidOf } from './usb-state.js';

export interface HostDevicesOptions {
  /** null when libusb is unavailable: there are no host devices then. */
  source: HostDeviceSource | null;
  server: Pick<UsbIpServer, 'add' | 'remove'>;
  log: Logger;
  /** Whether plugged-in device `busid` should be open now. */
  wanted: (busid: string) => boolean;
  /** The device at a busid is gone (unplugged, or replaced by a re-enumerated one); it is still in `present`. */
  unplugged: (info: HostDeviceInfo) => void;
  /** A device was plugged in (and opened, if it is wanted already). */
  plugged: (busid: string) => Promise<void>;
}

export class HostDevices {
  private readonly pluggedIn = new Map<string, HostDeviceInfo>();
  /** Open now (driver detached), by busid. */
  private readonly open = new Map<string, HostUsbDevice>();
  /** The tail of each busid's opens and closes. */
  private readonly queue = new Map<string, Promise<void>>();
  private readonly onAdd = (d: HostDeviceInfo) => this.added(d);
  private readonly onRemove = (d: HostDeviceInfo) => this.removed(d);

  constructor(private readonly o: HostDevicesOptions) {}

  /** Host devices plugged in now, by busid. */
  get present(): ReadonlyMap<string, HostDeviceInfo> {
    return this.pluggedIn;
  }

  /** Learn what is plugged in and follow hotplug; false when there is no source. */
  watch(): boolean {
    const source = this.o.source;
    if (!source) {
      // The daemon logged why (openHostUsb); one line is enough.
      this.o.log.debug({}, 'no host USB device source: only virtual devices');
      return false;
    }
    for (const d of source.list()) this.pluggedIn.set(d.busid, d);
    source.on('add', this.onAdd);
    source.on('remove', this.onRemove);
    return true;
  }

  unwatch(): void {
    this.o.source?.off('add', this.onAdd);
    this.o.source?.off('remove', this.onRemove);
  }

  /** Open or close host device `busid` so that it is open exactly while wanted. */
  sync(busid: string): Promise<void> {
    const prev = this.queue.get(busid) ?? Promise.resolve();
    const run = prev.then(() => this.syncNow(busid));
    const tail = run.catch(() => {});
    this.queue.set(busid, tail);
    void tail.then(() => {
      if (this.queue.get(busid) === tail) this.queue.delete(busid);
    });
    return run;
  }

  /** sync() for callers that cannot report a failure: it is logged, never thrown. */
  syncLogged(busid: string): Promise<void> {
    return this.sync(busid).catch((err) => this.o.log.warn({ busid, err: (err as Error).message }, 'host USB device not opened'));
  }

  private wantOpen(busid: string): boolean {
    return this.pluggedIn.has(busid) && this.o.wanted(busid);
  }

  private async syncNow(busid: string): Promise<void> {
    const info = this.pluggedIn.get(busid);
    const cur = this.open.get(busid);
    // A device that re-enumerated is another device: the old handle is dead.
    if (cur && (!info || cur.info.devnum !== info.devnum)) await this.closeOne(busid, cur);
    const want = this.wantOpen(busid);
    const open = this.open.get(busid);
    if (want && !open && this.o.source && info) {
      let dev: HostUsbDevice;
      try {
        dev = await this.o.source.open(busid);
      } catch (err) {
        throw openError(err, busid);
      }
      // Unplugged, re-enumerated or no longer wanted while it was opening.
      if (this.pluggedIn.get(busid)?.devnum !== dev.info.devnum || !this.wantOpen(busid)) {
        await dev.close().catch(() => {});
        return;
      }
      this.open.set(busid, dev);
      this.o.server.add(dev);
      this.o.log.info({ busid, vidpid: vidpidOf(info.vendorId, info.productId) }, 'host USB device opened (kernel driver detached)');
    } else if (!want && open) {
      await this.closeOne(busid, open);
    }
  }

  private async closeOne(busid: string, dev: HostUsbDevice): Promise<void> {
    this.open.delete(busid);
    // Ends any client's connection to it (the guest's vhci sees the device go).
    this.o.server.remove(busid);
    await dev.close().catch((err: Error) => this.o.log.warn({ busid, err: err.message }, 'closing a host USB device failed'));
    this.o.log.info({ busid }, 'host USB device closed (kernel driver reattached)');
  }

  private added(info: HostDeviceInfo): void {
    const old = this.pluggedIn.get(info.busid);
    if (old && old.devnum === info.devnum) return;
    // A new devnum at a known busid without a 'remove' first: the old device is gone.
    if (old) this.o.unplugged(old);
    this.pluggedIn.set(info.busid, info);
    this.o.log.info({ busid: info.busid, devnum: info.devnum, vidpid: vidpidOf(info.vendorId, info.productId), product: info.product }, 'USB device plugged in');
    void (async () => {
      // Closes the old handle after a re-enumeration; opens a shared device for serve clients.
      await this.syncLogged(info.busid);
      await this.o.plugged(info.busid);
    })();
  }

  private removed(info: HostDeviceInfo): void {
    const cur = this.pluggedIn.get(info.busid);
    if (!cur || cur.devnum !== info.devnum) return;
    this.o.unplugged(cur);
    this.pluggedIn.delete(info.busid);
    this.o.log.info({ busid: info.busid, devnum: info.devnum }, 'USB device unplugged');
    void this.syncLogged(info.busid);
  }

  /** Hand every open device back to its kernel driver. Stop the USB/IP server first. */
  async close(): Promise<void> {
    await Promise.all([...this.queue.values()]);
    for (const [busid, dev] of [...this.open]) {
      this.open.delete(busid);
      await dev.close().catch(() => {});
    }
    this.o.source?.close();
  }
}

/** Opening a host device failed: permissions get their own code (the fix is the user's). */
function openError(err: unknown, busid: string): TenderError {
  if (err instanceof TenderError) return err;
  const e = err as { name?: unknown; code?: unknown; errno?: unknown; message?: string };
  const msg = e?.message ?? String(err);
  // The host source's own errors (usb/host/source.ts HostUsbError) carry codes of our table.
  if (e?.name === 'HostUsbError' && typeof e.code === 'string' && e.code in ERRORS) return new TenderError(e.code as ErrorCode, msg, { cause: err });
  // libusb: LIBUSB_ERROR_ACCESS is -3; Node-style errors say EACCES/EPERM.
  if (e?.code === 'EACCES' || e?.code === 'EPERM' || e?.errno === -3 || /LIBUSB_ERROR_ACCESS/.test(msg)) {
    return new TenderError('PERMISSION_DENIED', `${busid}: cannot open the USB device (${msg}): run the daemon as root or give the user access to /dev/bus/usb`, { cause: err });
  }
  return new TenderError('USB_OPEN_FAILED', `${busid}: cannot open the USB device: ${msg}`, { cause: err });
}
