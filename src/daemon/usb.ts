/**
 * USB devices of the daemon: the manager the API routes and the daemon call. It wires the parts,
 * each of which holds one concern and reads on its own:
 *
 * - usb-store.ts: the state and $TENDER_HOME/usb.json (what the file holds: usb-state.ts);
 * - usb-devices.ts: every device known now, host and virtual, and how DEVICE arguments name one;
 * - usb-virtual.ts: virtual devices (mass storage over an image file, serial over a unix socket);
 * - usb-host.ts: host devices, plugged in and unplugged, open exactly while wanted;
 * - usb-attach.ts: attachments to machines and importing into them (TCP or vsock);
 * - usb-policy.ts: auto-attach rules;
 * - usb-share.ts: bind/unbind and the `usb serve` clients.
 *
 * Every USB/IP connection, from a machine or a serve client, enters the one UsbIpServer through
 * `server.accept(duplex, allowed)`; what `allowed` lets a client see is the part's rule. A host
 * device is wanted open while a running machine holds it or it is shared: that rule joins
 * attachments and sharing, so it lives here (`wantOpen`).
 */
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Network } from '../../netstack/network.js';
import type { HostDeviceSource } from '../../usb/host/source.js';
import { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EventBus } from './events.js';
import type { Paths } from './paths.js';
import { Attachments, type UsbMachines } from './usb-attach.js';
import { type Dev, UsbDevices } from './usb-devices.js';
import { HostDevices } from './usb-host.js';
import { type UsbPolicyInfo, UsbPolicies } from './usb-policy.js';
import { type UsbServeStatus, UsbSharing } from './usb-share.js';
import { isVidPid } from './usb-state.js';
import { UsbStore } from './usb-store.js';
import { VirtualDevices } from './usb-virtual.js';

export { USBIP_PORT, type UsbMachines } from './usb-attach.js';
export type { UsbPolicyInfo } from './usb-policy.js';
export type { UsbServeStatus } from './usb-share.js';
export type { UsbPolicy } from './usb-state.js';

export interface UsbDeviceInfo {
  /** Virtual devices: "v1", ...; host devices: their busid. */
  id: string;
  busid: string;
  kind: 'storage' | 'serial' | 'host';
  /** The name a virtual device was given (null for host devices and unnamed ones). */
  name: string | null;
  vidpid: string;
  /** Host devices: manufacturer and product strings as the device reports them. */
  product: string | null;
  /** Host devices: the serial number string, if the device has one. */
  serialNumber: string | null;
  /** storage: the image file (null for other kinds). */
  image: string | null;
  readOnly: boolean;
  /** serial: the unix socket the daemon listens on for the host side (null for other kinds). */
  socket: string | null;
  /** attached wins over shared: a shared device attached to a machine is busy for serve clients. */
  state: 'available' | 'shared' | 'attached';
  shared: boolean;
  machine: string | null;
  /** The guest's vhci port while attached and imported. */
  port: number | null;
  /** What carries the device to the machine while imported: 'vsock' or 'tcp' (through the network). */
  transport: 'tcp' | 'vsock' | null;
  /** The first auto-attach rule matching this device, or null. */
  policy: string | null;
}

export interface UsbManagerOptions {
  paths: Paths;
  network: Network;
  machines: UsbMachines;
  events: EventBus;
  log: Logger;
  /** Host USB devices; null/absent when libusb is unavailable (host devices are then absent). */
  hostSource?: HostDeviceSource | null;
  /** ADDR:PORT on which the daemon itself serves shared devices (config.json `usb.serve`). */
  serve?: string | null;
}

export class UsbManager {
  readonly server: UsbIpServer;
  private readonly store: UsbStore;
  private readonly devices: UsbDevices;
  private readonly virtual: VirtualDevices;
  private readonly host: HostDevices;
  private readonly attachments: Attachments;
  private readonly policies: UsbPolicies;
  private readonly sharing: UsbSharing;

  constructor(private readonly o: UsbManagerOptions) {
    const { log } = o;
    const server = new UsbIpServer({ log: { debug: (x, m) => log.debug(x, m), warn: (x, m) => log.warn(x, m) } });
    const store = new UsbStore(join(o.paths.home, 'usb.json'), log);
    const host = new HostDevices({
      source: o.hostSource ?? null,
      server,
      log,
      wanted: (busid) => this.wantOpen(busid),
      unplugged: (info) => this.attachments.unplugged(info),
      plugged: (busid) => this.policies.apply({ busid }),
    });
    const devices = new UsbDevices(store, host.present);
    const attachments = new Attachments({ server, store, devices, host, machines: o.machines, network: o.network, events: o.events, log });
    this.server = server;
    this.store = store;
    this.host = host;
    this.devices = devices;
    this.attachments = attachments;
    this.virtual = new VirtualDevices({ server, store, log });
    this.sharing = new UsbSharing({ server, store, devices, host, log });
    this.policies = new UsbPolicies({ store, devices, log, machineUp: (m) => attachments.machineUp(m), give: (m, d) => attachments.give(m, d) });
  }

  async load(): Promise<void> {
    this.store.load();
    await this.virtual.openAll();
    if (this.host.watch()) {
      this.attachments.dropUnplugged();
      // Shared devices are open for serve clients from the start.
      for (const busid of this.host.present.keys()) if (this.sharing.isSharedBusid(busid)) void this.host.syncLogged(busid);
    }
    this.attachments.serve();
    if (this.o.serve) await this.sharing.listen(this.o.serve);
  }

  /** A plugged-in host device is open while a machine that is up holds it, or while it is shared. */
  private wantOpen(busid: string): boolean {
    if (this.sharing.isSharedBusid(busid)) return true;
    const a = this.store.attachmentOf(busid);
    return a !== undefined && this.attachments.machineUp(a.machine);
  }

  // ---------------- devices ----------------

  private info(d: Dev): UsbDeviceInfo {
    const a = this.store.attachmentOf(d.id);
    const shared = this.sharing.isShared(d);
    const base = {
      id: d.id,
      busid: d.busid,
      vidpid: d.vidpid,
      state: a ? ('attached' as const) : shared ? ('shared' as const) : ('available' as const),
      shared,
      machine: a?.machine ?? null,
      port: this.attachments.portOf(d.id),
      transport: this.attachments.transportOf(d.id),
      policy: this.policies.policyFor(d)?.id ?? null,
    };
    if (d.kind === 'host') {
      const product = [d.info.manufacturer, d.info.product].filter((s) => s).join(' ');
      return { ...base, kind: 'host', name: null, product: product || null, serialNumber: d.info.serial, image: null, readOnly: false, socket: null };
    }
    const v = d.v;
    return {
      ...base,
      kind: v.kind,
      name: v.name ?? null,
      product: null,
      serialNumber: null,
      image: v.kind === 'storage' ? v.image : null,
      readOnly: v.kind === 'storage' ? v.readOnly : false,
      socket: v.kind === 'serial' ? v.socket : null,
    };
  }

  list(): UsbDeviceInfo[] {
    return this.devices.all().map((d) => this.info(d));
  }

  private infoOf(id: string): UsbDeviceInfo {
    const d = this.devices.byId(id);
    if (!d) throw new TenderError('USB_DEVICE_NOT_FOUND', `USB device "${id}" is gone`);
    return this.info(d);
  }

  // ---------------- virtual devices ----------------

  async addSerial(o: { socket: string; name?: string }): Promise<UsbDeviceInfo> {
    return this.infoOf((await this.virtual.addSerial(o)).id);
  }

  async addStorage(o: { image: string; readOnly: boolean; name?: string }): Promise<UsbDeviceInfo> {
    return this.infoOf((await this.virtual.addStorage(o)).id);
  }

  async removeDevice(device: string): Promise<void> {
    const v = this.virtual.find(device);
    const a = this.store.attachmentOf(v.id);
    if (a) await this.attachments.detach(a.machine, v.id).catch(() => {});
    await this.virtual.remove(v);
  }

  // ---------------- attach and detach ----------------

  async attach(machine: string, device: string, opts: { auto?: boolean } = {}): Promise<UsbDeviceInfo> {
    this.o.machines.inspect(machine);
    const d = this.devices.resolve(device);
    const holder = this.store.attachmentOf(d.id);
    if (holder && holder.machine !== machine) throw new TenderError('USB_DEVICE_BUSY', `${device} is attached to "${holder.machine}": detach it first`);
    // The rule names what the user named: a VID:PID follows the product, anything else the port.
    const rule = opts.auto ? this.policies.plan(machine, isVidPid(device) ? { kind: 'vidpid', match: d.vidpid } : { kind: 'busid', match: d.busid }) : null;
    await this.attachments.give(machine, d, rule);
    return this.infoOf(d.id);
  }

  async detach(machine: string, device: string): Promise<void> {
    return this.attachments.detach(machine, device);
  }

  /** The machine's agent (re)connected: restore its attachments, then apply its rules. */
  async restore(machine: string): Promise<void> {
    await this.attachments.restore(machine);
    await this.policies.apply({ machine });
  }

  /** The machine stopped: its imports ended with it, and its host devices go back to the host. */
  machineStopped(machine: string): void {
    this.attachments.machineStopped(machine);
  }

  // ---------------- auto-attach rules ----------------

  listPolicies(): UsbPolicyInfo[] {
    return this.policies.list();
  }

  /** `usb policy add`: record the rule, and attach the matching devices that are free now. */
  async addPolicy(machine: string, matchText: string): Promise<UsbPolicyInfo> {
    this.o.machines.inspect(machine);
    return this.policies.add(machine, matchText);
  }

  removePolicy(id: string): void {
    this.policies.remove(id);
  }

  // ---------------- sharing with `usb serve` clients ----------------

  /** `usb bind`: share a device with `usb serve` clients, persistently. */
  async bind(device: string): Promise<UsbDeviceInfo> {
    return this.infoOf(await this.sharing.bind(device));
  }

  /** `usb unbind`: stop sharing; a serve client using it is disconnected. Returns the device's id. */
  async unbind(device: string): Promise<string> {
    return this.sharing.unbind(device);
  }

  /** One USB/IP client of the shared devices (the `usb serve` relay or the daemon's own listener). */
  serveShared(sock: Duplex): void {
    this.sharing.serveShared(sock);
  }

  serving(): UsbServeStatus {
    return this.sharing.serving();
  }

  async close(): Promise<void> {
    this.attachments.stop();
    this.host.unwatch();
    await this.sharing.close();
    await this.server.close();
    await this.host.close();
    await this.virtual.close();
  }
}
