/**
 * The virtual devices users create: mass storage backed by an image file, and CDC ACM serial
 * ports bridged to a unix socket the daemon listens on. Each sits on bus 99 of the USB/IP server
 * from its creation (or the daemon's start) until it is removed; whether it is attached or
 * shared is the other parts' business.
 */
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { FileBackend } from '../../usb/devices/scsi.js';
import { SerialDevice, listenSerialSocket, type SerialListener } from '../../usb/devices/serial.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import type { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import type { UsbStore } from './usb-store.js';
import { isVidPid, type VirtualConfig } from './usb-state.js';

/** Far above the bus numbers hosts have, so a virtual busid is not taken for a host one. */
const VIRTUAL_BUSNUM = 99;

export function virtualBusid(v: VirtualConfig): string {
  return `${VIRTUAL_BUSNUM}-${v.devnum}`;
}

export class VirtualDevices {
  private readonly backends = new Map<string, FileBackend>();
  private readonly listeners = new Map<string, SerialListener>();

  constructor(
    private readonly o: {
      server: Pick<UsbIpServer, 'add' | 'remove'>;
      store: UsbStore;
      log: Logger;
    },
  ) {}

  /** The daemon starts: offer the saved devices; one whose image or socket is unusable now stays saved. */
  async openAll(): Promise<void> {
    for (const v of this.o.store.state.virtual) {
      try {
        await this.open(v);
      } catch (err) {
        this.o.log.warn({ device: v.id, err: (err as Error).message }, 'virtual USB device not available');
      }
    }
  }

  private async open(v: VirtualConfig): Promise<void> {
    if (v.kind === 'serial') {
      const dev = new SerialDevice({ busid: virtualBusid(v), busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name });
      this.listeners.set(v.id, await listenSerialSocket(dev, v.socket));
      this.o.server.add(dev);
      return;
    }
    const be = await FileBackend.open(v.image, v.readOnly);
    this.backends.set(v.id, be);
    this.o.server.add(new StorageDevice(be, { busid: virtualBusid(v), busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name }));
  }

  /** DEVICE naming a virtual device: its id, busid or name. */
  find(device: string): VirtualConfig {
    const v = this.o.store.state.virtual.find((x) => x.id === device || virtualBusid(x) === device || (x.name !== undefined && x.name === device));
    if (!v) throw new TenderError('USB_DEVICE_NOT_FOUND', `no virtual USB device "${device}" (tender usb ls)`);
    return v;
  }

  private checkName(name: string | undefined): void {
    if (name !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/.test(name)) throw new TenderError('BAD_ARGUMENT', `bad name "${name}": letters, digits, . _ -, up to 32`);
    if (name !== undefined && this.o.store.state.virtual.some((v) => v.name === name)) throw new TenderError('BAD_ARGUMENT', `a USB device named "${name}" exists`);
    // A name that reads as a VID:PID or a busid would make DEVICE arguments ambiguous.
    if (name !== undefined && (isVidPid(name) || /^\d+-\d/.test(name))) throw new TenderError('BAD_ARGUMENT', `bad name "${name}": it reads as a VID:PID or a busid`);
  }

  private nextDevnum(): number {
    let devnum = 1;
    while (this.o.store.state.virtual.some((v) => v.devnum === devnum)) devnum++;
    return devnum;
  }

  /** Offer `v` and keep it; `why` turns a failed open into the user's error. */
  private async create(v: VirtualConfig, why: (err: unknown) => TenderError): Promise<VirtualConfig> {
    try {
      await this.open(v);
    } catch (err) {
      throw why(err);
    }
    this.o.store.state.virtual.push(v);
    this.o.store.save();
    return v;
  }

  async addSerial(o: { socket: string; name?: string }): Promise<VirtualConfig> {
    const socket = resolve(o.socket);
    this.checkName(o.name);
    if (!existsSync(dirname(socket))) throw new TenderError('FILE_NOT_FOUND', `${dirname(o.socket)} does not exist`);
    if (this.o.store.state.virtual.some((v) => v.kind === 'serial' && v.socket === socket)) throw new TenderError('BAD_ARGUMENT', `a USB serial device already listens on ${o.socket}`);
    const devnum = this.nextDevnum();
    return this.create({ id: `v${devnum}`, kind: 'serial', socket, name: o.name, devnum }, (err) => {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EADDRINUSE') return new TenderError('ADDRESS_IN_USE', `${o.socket}: something is listening there`);
      if (code === 'EACCES' || code === 'EPERM') return new TenderError('PERMISSION_DENIED', `${o.socket}: permission denied`);
      return new TenderError('BAD_ARGUMENT', `cannot listen on ${o.socket}: ${(err as Error).message}`);
    });
  }

  async addStorage(o: { image: string; readOnly: boolean; name?: string }): Promise<VirtualConfig> {
    const image = resolve(o.image);
    if (!existsSync(image)) throw new TenderError('FILE_NOT_FOUND', `${o.image} does not exist`);
    this.checkName(o.name);
    const devnum = this.nextDevnum();
    return this.create(
      { id: `v${devnum}`, kind: 'storage', image, readOnly: o.readOnly, name: o.name, devnum },
      (err) => new TenderError('BAD_ARGUMENT', `cannot use ${o.image} as a disk: ${(err as Error).message}`),
    );
  }

  /** Stop offering `v` and forget it. Detach it first: a machine's import ends here otherwise. */
  async remove(v: VirtualConfig): Promise<void> {
    this.o.server.remove(virtualBusid(v));
    await this.backends.get(v.id)?.close?.();
    this.backends.delete(v.id);
    await this.listeners.get(v.id)?.close();
    this.listeners.delete(v.id);
    const s = this.o.store.state;
    s.virtual = s.virtual.filter((x) => x !== v);
    // Its binding goes with it: the id may name another device later.
    s.bindings = s.bindings.filter((b) => b.device !== v.id);
    this.o.store.save();
  }

  async close(): Promise<void> {
    for (const be of this.backends.values()) await be.close?.();
    for (const l of this.listeners.values()) await l.close();
  }
}
