/**
 * One real device served over USB/IP through libusb (`usb` v2): each URB becomes one
 * libusb_transfer, submitted at once, so many are in flight per endpoint (usbfs queues them
 * in order, as the kernel's stub does with usb_submit_urb). An UNLINK aborts the URB's signal
 * and cancels exactly that transfer (libusb_cancel_transfer); the server ignores its result.
 *
 * What libusb through `usb` v2 cannot express is emulated or refused here, never hidden:
 *  - URB_ZERO_PACKET: v2 never sets LIBUSB_TRANSFER_ADD_ZERO_PACKET, so an OUT transfer that
 *    is a non-zero multiple of the endpoint's max packet size is followed by a zero-length
 *    transfer, queued right behind it on the same endpoint (what the flag makes usbfs do).
 *  - URB_SHORT_NOT_OK: a short IN completes with -EREMOTEIO, as host controllers report it.
 *  - Isochronous: v2 allocates transfers without iso packets. Every iso URB fails with -ENXIO
 *    ("host controller driver does not support queuing of this type of urb",
 *    error-codes.rst) and each packet carries that status; logged once per device.
 *
 * Unplug: a transfer ending in LIBUSB_TRANSFER_NO_DEVICE marks the device gone; URBs in flight
 * end with -ESHUTDOWN, later ones with -ENODEV, as the kernel does for a disconnected device.
 */
import type { Urb, UrbResult, UsbDescriptors } from '../device.js';
import { Errno, URB_SHORT_NOT_OK, URB_ZERO_PACKET, type UsbSpeed } from '../protocol.js';
import { parseAltSettings, readDescriptors, getDescriptorSetup, interfaceNumbers } from './descriptors.js';
import { LinuxErrno, TransferStatus, errnoFromLibusb, errnoFromTransferStatus } from './errno.js';
import { XferType, type LibusbBinding, type LibusbDevice, type LibusbErr, type LibusbTransfer } from './libusb-binding.js';
import { HostUsbError, type HostDeviceInfo, type HostLog, type HostUsbDevice } from './source.js';

/** How long close() waits for cancelled transfers to come back before giving up on them. */
const CLOSE_DRAIN_MS = 2000;

type Done = (err: LibusbErr, buf: Buffer, actual: number) => void;

/** What the source wants to hear about: the device went away; close() finished. */
export interface DeviceHooks {
  gone?: () => void;
  closed?: () => void;
}

const cbPromise = (f: (cb: (e?: LibusbErr) => void) => void): Promise<void> =>
  new Promise((resolve, reject) => f((e) => (e ? reject(e) : resolve())));

export class LibusbHostDevice implements HostUsbDevice {
  readonly busid: string;
  readonly busnum: number;
  readonly devnum: number;
  readonly speed: UsbSpeed;
  readonly path: string;
  private readonly inflight = new Set<LibusbTransfer>();
  private drained?: () => void;
  private readonly halted = new Set<number>();
  /** Interfaces we claimed, and those whose kernel driver we detached (to reattach on close). */
  private readonly claimed = new Set<number>();
  private readonly detachedDrivers = new Set<number>();
  private readonly alts = new Map<number, number>();
  private maxPacket = new Map<number, number>();
  private configuration = 0;
  private gone = false;
  private closing?: Promise<void>;
  private isoWarned = false;

  private constructor(
    readonly info: HostDeviceInfo,
    readonly descriptors: UsbDescriptors,
    private readonly dev: LibusbDevice,
    private readonly binding: LibusbBinding,
    private readonly log: HostLog,
    private readonly hooks: DeviceHooks,
  ) {
    this.busid = info.busid;
    this.busnum = info.busnum;
    this.devnum = info.devnum;
    this.speed = info.speed;
    this.path = info.path;
  }

  /**
   * Open `dev`, read its descriptors, detach the kernel drivers of the active configuration's
   * interfaces and claim them. Undoes what it did when a step fails.
   */
  static async open(dev: LibusbDevice, info: HostDeviceInfo, binding: LibusbBinding, log: HostLog, hooks: DeviceHooks = {}): Promise<LibusbHostDevice> {
    try {
      dev.__open();
    } catch (e) {
      throw openError(e, info.busid, 'open');
    }
    let d: LibusbHostDevice | undefined;
    try {
      const descriptors = await readDescriptors((wValue, wIndex, wLength) => controlIn(binding, dev, getDescriptorSetup(wValue, wIndex, wLength)));
      d = new LibusbHostDevice(withStrings(info, descriptors), descriptors, dev, binding, log, hooks);
      let active = 0;
      try {
        active = dev.__getConfigDescriptor().bConfigurationValue;
      } catch {
        // unconfigured: the client's SET_CONFIGURATION will choose
      }
      d.takeInterfaces(active);
      return d;
    } catch (e) {
      if (d) await d.giveBackInterfaces();
      try {
        dev.__close();
      } catch {
        // nothing in flight here; a failure leaves nothing to undo
      }
      throw e instanceof HostUsbError ? e : openError(e, info.busid, 'claim');
    }
  }

  /** Detach kernel drivers from, and claim, every interface of configuration `value`. */
  private takeInterfaces(value: number): void {
    this.configuration = value;
    this.alts.clear();
    const cfg = this.descriptors.configurations.find((c) => c[5] === value);
    if (cfg) {
      for (const iface of interfaceNumbers(cfg)) {
        let active = false;
        try {
          active = this.dev.__isKernelDriverActive(iface);
        } catch {
          // LIBUSB_ERROR_NOT_SUPPORTED off Linux: the OS has no driver to detach
        }
        if (active) {
          this.dev.__detachKernelDriver(iface);
          this.detachedDrivers.add(iface);
          this.log.debug({ busid: this.busid, iface }, 'detached the kernel driver');
        }
        this.dev.__claimInterface(iface);
        this.claimed.add(iface);
        this.alts.set(iface, 0);
      }
    }
    this.refreshMaxPacket();
  }

  /** Release what we claimed and reattach the drivers we detached (errors logged: best effort). */
  private async giveBackInterfaces(): Promise<void> {
    for (const iface of [...this.claimed]) {
      this.claimed.delete(iface);
      if (this.gone) continue;
      await cbPromise((cb) => this.dev.__releaseInterface(iface, cb)).catch((e) =>
        this.log.debug({ busid: this.busid, iface, err: String(e?.message ?? e) }, 'release interface failed'),
      );
    }
    for (const iface of [...this.detachedDrivers]) {
      this.detachedDrivers.delete(iface);
      if (this.gone) continue;
      try {
        this.dev.__attachKernelDriver(iface);
        this.log.debug({ busid: this.busid, iface }, 'reattached the kernel driver');
      } catch (e) {
        this.log.warn({ busid: this.busid, iface, err: String((e as Error)?.message ?? e) }, 'could not reattach the kernel driver');
      }
    }
  }

  private refreshMaxPacket(): void {
    const m = new Map<number, number>();
    const cfg = this.descriptors.configurations.find((c) => c[5] === this.configuration);
    if (cfg) {
      for (const a of parseAltSettings(cfg)) {
        if (this.alts.get(a.iface) !== a.alt) continue;
        for (const ep of a.endpoints) m.set(ep.address, ep.maxPacketSize);
      }
    }
    this.maxPacket = m;
  }

  // -------------------------------------------------------------------------------------------
  // UsbDevice

  submit(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    if (this.closing) return Promise.resolve({ status: Errno.ESHUTDOWN, actualLength: 0 });
    if (this.gone) return Promise.resolve({ status: Errno.ENODEV, actualLength: 0 });
    if (signal.aborted) return Promise.resolve({ status: Errno.ECONNRESET, actualLength: 0 });
    if (urb.type === 'isochronous') return Promise.resolve(this.isoUnsupported(urb));
    if (urb.type === 'control') return this.control(urb, signal);
    return this.bulkOrInterrupt(urb, signal);
  }

  private isoUnsupported(urb: Urb): UrbResult {
    if (!this.isoWarned) {
      this.isoWarned = true;
      this.log.warn({ busid: this.busid, endpoint: urb.endpoint }, 'isochronous transfers are not supported by the libusb backend: answering -ENXIO');
    }
    return {
      status: LinuxErrno.ENXIO,
      actualLength: 0,
      data: new Uint8Array(0),
      iso: (urb.iso ?? []).map((p) => ({ offset: p.offset, length: p.length, actualLength: 0, status: LinuxErrno.ENXIO })),
      errorCount: urb.iso?.length ?? 0,
    };
  }

  private async control(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    const setup = urb.setup;
    if (!setup || setup.length < 8) return { status: Errno.EINVAL, actualLength: 0 };
    const wLength = setup[6]! | (setup[7]! << 8);
    const dirIn = (setup[0]! & 0x80) !== 0;
    // libusb's control layout: the 8 setup bytes, then the data stage (wLength bytes).
    const buf = Buffer.alloc(8 + wLength);
    buf.set(setup.subarray(0, 8), 0);
    if (!dirIn) buf.set(urb.data.subarray(0, wLength), 8);
    const r = await this.run(0, XferType.control, buf, signal);
    if (r.status !== 0 && r.actual === 0) return { status: r.status, actualLength: 0, data: new Uint8Array(0) };
    return dirIn ? { status: r.status, data: view(buf, 8, r.actual) } : { status: r.status, actualLength: r.actual };
  }

  private async bulkOrInterrupt(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    const ep = urb.endpoint;
    const dirIn = (ep & 0x80) !== 0;
    const type = urb.type === 'interrupt' ? XferType.interrupt : XferType.bulk;
    if (dirIn) {
      // Only the first `actual` bytes are ever read back, so the buffer needs no zeroing.
      const buf = Buffer.allocUnsafe(urb.length);
      const r = await this.run(ep, type, buf, signal);
      let status = r.status;
      if (status === 0 && r.actual < urb.length && urb.transferFlags & URB_SHORT_NOT_OK) status = Errno.EREMOTEIO;
      return { status, data: view(buf, 0, r.actual) };
    }
    const data = Buffer.from(urb.data.buffer, urb.data.byteOffset, urb.data.byteLength);
    const mps = this.maxPacket.get(ep) ?? 0;
    const zlp = (urb.transferFlags & URB_ZERO_PACKET) !== 0 && data.length > 0 && mps > 0 && data.length % mps === 0;
    if (!zlp) {
      const r = await this.run(ep, type, data, signal);
      return { status: r.status, actualLength: r.actual };
    }
    // Both queued now, in order, so nothing else on this endpoint slips between them. If the
    // data fails (a stall), the zero-length packet must not go out later on its own.
    const zc = new AbortController();
    const follow = () => zc.abort();
    signal.addEventListener('abort', follow, { once: true });
    const first = this.run(ep, type, data, signal).then((r) => {
      if (r.status !== 0) zc.abort();
      return r;
    });
    const [r, z] = await Promise.all([first, this.run(ep, type, Buffer.alloc(0), zc.signal)]);
    signal.removeEventListener('abort', follow);
    return { status: r.status !== 0 ? r.status : z.status, actualLength: r.actual };
  }

  /** Submit one libusb transfer; resolves with the URB status and the bytes moved. */
  private run(ep: number, type: number, buf: Buffer, signal: AbortSignal): Promise<{ status: number; actual: number }> {
    return new Promise((resolve) => {
      let t: LibusbTransfer | undefined = undefined;
      const onAbort = () => {
        try {
          t?.cancel();
        } catch {
          // already completing: its callback still comes
        }
      };
      const done: Done = (err, _buf, actual) => {
        signal.removeEventListener('abort', onAbort);
        this.settle(t!);
        const s = err?.errno ?? TransferStatus.COMPLETED;
        if (s === TransferStatus.NO_DEVICE) this.markGone();
        const status = err ? (s > 0 ? errnoFromTransferStatus(s) : errnoFromLibusb(err)) : 0;
        if (status === Errno.EPIPE && ep !== 0) this.halted.add(ep);
        resolve({ status, actual: actual | 0 });
      };
      try {
        t = this.binding.transfer(this.dev, ep, type, done);
        this.inflight.add(t);
        t.submit(buf);
      } catch (e) {
        if (t) this.settle(t);
        const status = errnoFromLibusb(e);
        if (status === Errno.ENODEV) this.markGone();
        resolve({ status, actual: 0 });
        return;
      }
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private settle(t: LibusbTransfer): void {
    this.inflight.delete(t);
    if (this.inflight.size === 0) this.drained?.();
  }

  private markGone(): void {
    if (this.gone) return;
    this.gone = true;
    this.log.warn({ busid: this.busid }, 'the device is gone (unplugged or reset)');
    this.hooks.gone?.();
  }

  async setConfiguration(value: number): Promise<void> {
    // The active one already: nothing to do. libusb would re-send SET_CONFIGURATION (a
    // lightweight reset) and refuse it anyway while interfaces are claimed.
    if (value === this.configuration || this.gone) return;
    await this.giveBackClaimsOnly();
    // libusb: -1 is "unconfigured" (some devices really have a configuration 0).
    await cbPromise((cb) => this.dev.__setConfiguration(value === 0 ? -1 : value, cb));
    this.takeInterfaces(value);
  }

  /** Release the claims but keep the list of drivers to reattach at close. */
  private async giveBackClaimsOnly(): Promise<void> {
    for (const iface of [...this.claimed]) {
      this.claimed.delete(iface);
      await cbPromise((cb) => this.dev.__releaseInterface(iface, cb)).catch(() => undefined);
    }
  }

  async setInterface(iface: number, alt: number): Promise<void> {
    if (this.gone) return;
    await cbPromise((cb) => this.dev.__setInterface(iface, alt, cb));
    this.alts.set(iface, alt);
    this.refreshMaxPacket();
    // A new alternate setting starts with every one of its endpoints un-halted (USB 2.0 §9.1.1.5).
    for (const ep of [...this.halted]) if (!this.maxPacket.has(ep)) this.halted.delete(ep);
  }

  async clearHalt(endpoint: number): Promise<void> {
    if (this.gone) return;
    // libusb_clear_halt sends CLEAR_FEATURE(ENDPOINT_HALT) and resets the host's data toggle.
    await cbPromise((cb) => this.dev.__clearHalt(endpoint, cb));
    this.halted.delete(endpoint);
  }

  isHalted(endpoint: number): boolean {
    return this.halted.has(endpoint);
  }

  attached(): void {
    this.halted.clear();
  }

  close(): Promise<void> {
    this.closing ??= this.doClose().finally(() => this.hooks.closed?.());
    return this.closing;
  }

  private async doClose(): Promise<void> {
    for (const t of this.inflight) {
      try {
        t.cancel();
      } catch {
        // completing anyway
      }
    }
    if (this.inflight.size) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, CLOSE_DRAIN_MS);
        this.drained = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    await this.giveBackInterfaces();
    if (this.inflight.size) {
      // libusb_close with transfers pending is undefined behaviour; `usb` refuses it. Leak the handle.
      this.log.warn({ busid: this.busid, pending: this.inflight.size }, 'transfers did not come back after cancel; leaving the device open');
      return;
    }
    try {
      this.dev.__close();
    } catch (e) {
      this.log.debug({ busid: this.busid, err: String((e as Error)?.message ?? e) }, 'close failed');
    }
  }
}

/** One control IN transfer on an open device (used before the device object exists). */
function controlIn(binding: LibusbBinding, dev: LibusbDevice, setup: Uint8Array): Promise<Uint8Array> {
  const wLength = setup[6]! | (setup[7]! << 8);
  const buf = Buffer.alloc(8 + wLength);
  buf.set(setup, 0);
  return new Promise((resolve, reject) => {
    const t = binding.transfer(dev, 0, XferType.control, (err, _b, actual) => (err ? reject(err) : resolve(view(buf, 8, actual))));
    try {
      t.submit(buf);
    } catch (e) {
      reject(e);
    }
  });
}

/** A plain Uint8Array over part of a Buffer (what UrbResult and the descriptors carry), no copy. */
const view = (b: Buffer, start: number, length: number): Uint8Array => new Uint8Array(b.buffer, b.byteOffset + start, Math.max(0, Math.min(length, b.length - start)));

function withStrings(info: HostDeviceInfo, d: UsbDescriptors): HostDeviceInfo {
  const s = (i: number) => (i ? (d.strings.get(i) ?? null) : null);
  return {
    ...info,
    manufacturer: info.manufacturer ?? s(d.device[14]!),
    product: info.product ?? s(d.device[15]!),
    serial: info.serial ?? s(d.device[16]!),
  };
}

function openError(e: unknown, busid: string, what: string): HostUsbError {
  const n = (e as { errno?: number })?.errno;
  const msg = `${what} ${busid}: ${(e as Error)?.message ?? String(e)}`;
  switch (n) {
    case -3: // LIBUSB_ERROR_ACCESS
      return new HostUsbError('PERMISSION_DENIED', `${msg} (no permission on the device node: run as root or add a udev rule)`, { cause: e });
    case -4: // LIBUSB_ERROR_NO_DEVICE
      return new HostUsbError('USB_DEVICE_NOT_FOUND', `${msg} (unplugged)`, { cause: e });
    case -6: // LIBUSB_ERROR_BUSY
      return new HostUsbError('USB_DEVICE_BUSY', `${msg} (another program has claimed an interface)`, { cause: e });
    default:
      return new HostUsbError('USB_OPEN_FAILED', msg, { cause: e });
  }
}
