/**
 * USB devices of the daemon: the virtual devices users create (mass storage backed by an image
 * file, CDC ACM serial ports bridged to a unix socket the daemon listens on), which machine each is attached to, and the USB/IP server that carries them.
 *
 * The server is served on the gateway address inside the machines' network (TCP 3240),
 * never on a host interface, and each machine may list and import only the devices attached
 * to it. Attaching asks the machine's agent to import the device and hand the socket to the
 * guest kernel's vhci-hcd. Attachments persist ($TENDER_HOME/usb.json) and are restored when
 * the machine's agent (re)connects: after a start, a reboot or a daemon restart.
 */
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { ip4str } from '../../netstack/addr.js';
import type { Network } from '../../netstack/network.js';
import { tcpDuplex } from '../../netstack/services/tcp-stream.js';
import { FileBackend } from '../../usb/devices/scsi.js';
import { SerialDevice, listenSerialSocket, type SerialListener } from '../../usb/devices/serial.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import { readJson, writeFileAtomic } from './atomic.js';
import type { EventBus } from './events.js';
import type { MachineManager } from './machines.js';
import type { Paths } from './paths.js';

export const USBIP_PORT = 3240;
const VIRTUAL_BUSNUM = 99;

type VirtualConfig = {
  id: string;
  name?: string;
  devnum: number;
} & ({ kind: 'storage'; image: string; readOnly: boolean } | { kind: 'serial'; socket: string });

/** VID:PID of each kind (usb/devices: the Linux gadgets' ids, driven by stock class drivers). */
const VIDPID = { storage: '0525:a4a5', serial: '0525:a4a7' } as const;

interface UsbState {
  version: 1;
  virtual: VirtualConfig[];
  /** device id → machine name */
  attachments: Record<string, string>;
}

export interface UsbDeviceInfo {
  id: string;
  busid: string;
  kind: string;
  name: string | null;
  vidpid: string;
  /** storage: the image file (null for other kinds). */
  image: string | null;
  readOnly: boolean;
  /** serial: the unix socket the daemon listens on for the host side (null for other kinds). */
  socket: string | null;
  state: 'available' | 'attached';
  machine: string | null;
  /** The guest's vhci port while attached and imported. */
  port: number | null;
}

export class UsbManager {
  readonly server: UsbIpServer;
  private state: UsbState = { version: 1, virtual: [], attachments: {} };
  private readonly backends = new Map<string, FileBackend>();
  private readonly listeners = new Map<string, SerialListener>();
  private readonly ports = new Map<string, number>();
  private readonly file: string;
  private unserve: (() => void) | null = null;

  constructor(
    private readonly o: { paths: Paths; network: Network; machines: MachineManager; events: EventBus; log: Logger },
  ) {
    this.file = join(o.paths.home, 'usb.json');
    this.server = new UsbIpServer({ log: { debug: (x, m) => o.log.debug(x, m), warn: (x, m) => o.log.warn(x, m) } });
  }

  async load(): Promise<void> {
    this.state = readJson<UsbState>(this.file) ?? this.state;
    for (const v of this.state.virtual) {
      try {
        await this.open(v);
      } catch (err) {
        this.o.log.warn({ device: v.id, err: (err as Error).message }, 'virtual USB device not available');
      }
    }
    // Machines import from the gateway; a connection may import only what is attached to the
    // machine whose address it comes from.
    this.unserve = this.o.network.serveTcp(USBIP_PORT, (conn) => {
      const machine = this.machineAt(ip4str(conn.remoteIp));
      void this.server.accept(tcpDuplex(conn), (dev) => machine !== null && this.state.attachments[this.idOfBusid(dev.busid) ?? ''] === machine);
    });
  }

  private machineAt(ip: string): string | null {
    for (const m of this.o.machines.list()) if (m.ip === ip) return m.name;
    return null;
  }

  private idOfBusid(busid: string): string | undefined {
    return this.state.virtual.find((v) => `${VIRTUAL_BUSNUM}-${v.devnum}` === busid)?.id;
  }

  private async open(v: VirtualConfig): Promise<void> {
    if (v.kind === 'serial') {
      const dev = new SerialDevice({ busid: `${VIRTUAL_BUSNUM}-${v.devnum}`, busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name });
      this.listeners.set(v.id, await listenSerialSocket(dev, v.socket));
      this.server.add(dev);
      return;
    }
    const be = await FileBackend.open(v.image, v.readOnly);
    this.backends.set(v.id, be);
    this.server.add(new StorageDevice(be, { busid: `${VIRTUAL_BUSNUM}-${v.devnum}`, busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name }));
  }

  private save(): void {
    writeFileAtomic(this.file, JSON.stringify(this.state, null, 2) + '\n');
  }

  list(): UsbDeviceInfo[] {
    return this.state.virtual.map((v) => {
      const machine = this.state.attachments[v.id] ?? null;
      return {
        id: v.id,
        busid: `${VIRTUAL_BUSNUM}-${v.devnum}`,
        kind: v.kind,
        name: v.name ?? null,
        vidpid: VIDPID[v.kind],
        image: v.kind === 'storage' ? v.image : null,
        readOnly: v.kind === 'storage' ? v.readOnly : false,
        socket: v.kind === 'serial' ? v.socket : null,
        state: machine ? 'attached' : 'available',
        machine,
        port: this.ports.get(v.id) ?? null,
      };
    });
  }

  private find(device: string): VirtualConfig {
    const v = this.state.virtual.find((x) => x.id === device || `${VIRTUAL_BUSNUM}-${x.devnum}` === device || (x.name !== undefined && x.name === device));
    if (!v) throw new TenderError('USB_DEVICE_NOT_FOUND', `no USB device "${device}" (tender usb ls)`);
    return v;
  }

  private checkName(name: string | undefined): void {
    if (name !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/.test(name)) throw new TenderError('BAD_ARGUMENT', `bad name "${name}": letters, digits, . _ -, up to 32`);
    if (name !== undefined && this.state.virtual.some((v) => v.name === name)) throw new TenderError('BAD_ARGUMENT', `a USB device named "${name}" exists`);
  }

  private nextDevnum(): number {
    let devnum = 1;
    while (this.state.virtual.some((v) => v.devnum === devnum)) devnum++;
    return devnum;
  }

  async addSerial(o: { socket: string; name?: string }): Promise<UsbDeviceInfo> {
    const socket = resolve(o.socket);
    this.checkName(o.name);
    if (!existsSync(dirname(socket))) throw new TenderError('FILE_NOT_FOUND', `${dirname(o.socket)} does not exist`);
    if (this.state.virtual.some((v) => v.kind === 'serial' && v.socket === socket)) throw new TenderError('BAD_ARGUMENT', `a USB serial device already listens on ${o.socket}`);
    const devnum = this.nextDevnum();
    const v: VirtualConfig = { id: `v${devnum}`, kind: 'serial', socket, name: o.name, devnum };
    try {
      await this.open(v);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EADDRINUSE') throw new TenderError('ADDRESS_IN_USE', `${o.socket}: something is listening there`);
      if (code === 'EACCES' || code === 'EPERM') throw new TenderError('PERMISSION_DENIED', `${o.socket}: permission denied`);
      throw new TenderError('BAD_ARGUMENT', `cannot listen on ${o.socket}: ${(err as Error).message}`);
    }
    this.state.virtual.push(v);
    this.save();
    return this.list().find((d) => d.id === v.id)!;
  }

  async addStorage(o: { image: string; readOnly: boolean; name?: string }): Promise<UsbDeviceInfo> {
    const image = resolve(o.image);
    if (!existsSync(image)) throw new TenderError('FILE_NOT_FOUND', `${o.image} does not exist`);
    this.checkName(o.name);
    const devnum = this.nextDevnum();
    const v: VirtualConfig = { id: `v${devnum}`, kind: 'storage', image, readOnly: o.readOnly, name: o.name, devnum };
    try {
      await this.open(v);
    } catch (err) {
      throw new TenderError('BAD_ARGUMENT', `cannot use ${o.image} as a disk: ${(err as Error).message}`);
    }
    this.state.virtual.push(v);
    this.save();
    return this.list().find((d) => d.id === v.id)!;
  }

  async removeDevice(device: string): Promise<void> {
    const v = this.find(device);
    const m = this.state.attachments[v.id];
    if (m) await this.detach(m, v.id).catch(() => {});
    this.server.remove(`${VIRTUAL_BUSNUM}-${v.devnum}`);
    await this.backends.get(v.id)?.close?.();
    this.backends.delete(v.id);
    await this.listeners.get(v.id)?.close();
    this.listeners.delete(v.id);
    this.state.virtual = this.state.virtual.filter((x) => x !== v);
    this.save();
  }

  async attach(machine: string, device: string): Promise<UsbDeviceInfo> {
    this.o.machines.inspect(machine);
    const v = this.find(device);
    const holder = this.state.attachments[v.id];
    if (holder && holder !== machine) throw new TenderError('USB_DEVICE_BUSY', `${device} is attached to "${holder}": detach it first`);
    this.state.attachments[v.id] = machine;
    this.save();
    const info = this.o.machines.inspect(machine);
    if (info.state === 'running') await this.importInto(machine, v);
    return this.list().find((d) => d.id === v.id)!;
  }

  private async importInto(machine: string, v: VirtualConfig): Promise<void> {
    const agent = await this.o.machines.agentOf(machine);
    if (!agent.usbAttach) throw new TenderError('AGENT_UNAVAILABLE', 'this guest agent cannot attach USB devices');
    const gw = ip4str(this.o.network.config.gatewayIp);
    const r = await agent.usbAttach({ host: gw, port: USBIP_PORT, busid: `${VIRTUAL_BUSNUM}-${v.devnum}` }).catch((err: Error) => {
      throw new TenderError('USB_ATTACH_FAILED', `attaching ${v.id} to "${machine}": ${err.message}`);
    });
    this.ports.set(v.id, r.port);
    this.o.events.publish({ type: 'usb.attached', machine, device: v.id });
  }

  async detach(machine: string, device: string): Promise<void> {
    const v = this.find(device);
    if (this.state.attachments[v.id] !== machine) throw new TenderError('USB_DEVICE_NOT_FOUND', `${device} is not attached to "${machine}"`);
    delete this.state.attachments[v.id];
    this.save();
    const port = this.ports.get(v.id);
    this.ports.delete(v.id);
    if (port !== undefined) {
      try {
        const agent = await this.o.machines.agentOf(machine, 2000);
        await agent.usbDetach?.(port);
      } catch {
        // The machine is gone or its agent is: closing the server side below detaches too.
      }
    }
    // Ending the USB/IP connection detaches the device in the guest whatever the agent did.
    const busid = `${VIRTUAL_BUSNUM}-${v.devnum}`;
    const dev = this.server.list().find((d) => d.busid === busid);
    if (dev) {
      this.server.remove(busid);
      this.server.add(dev);
    }
    this.o.events.publish({ type: 'usb.detached', machine, device: v.id });
  }

  /** The machine's agent (re)connected: restore its attachments. */
  async restore(machine: string): Promise<void> {
    for (const [id, m] of Object.entries(this.state.attachments)) {
      if (m !== machine) continue;
      const v = this.state.virtual.find((x) => x.id === id);
      if (!v) continue;
      if (this.server.inUse(`${VIRTUAL_BUSNUM}-${v.devnum}`)) continue;
      await this.importInto(machine, v).catch((err) => this.o.log.warn({ machine, device: id, err: (err as Error).message }, 'USB attachment not restored'));
    }
  }

  /** The machine stopped: its imports ended with it. */
  machineStopped(machine: string): void {
    for (const [id, m] of Object.entries(this.state.attachments)) if (m === machine) this.ports.delete(id);
  }

  async close(): Promise<void> {
    this.unserve?.();
    await this.server.close();
    for (const be of this.backends.values()) await be.close?.();
    for (const l of this.listeners.values()) await l.close();
  }
}
