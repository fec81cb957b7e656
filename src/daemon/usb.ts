/**
 * USB devices of the daemon: host devices (from an injected HostDeviceSource: libusb on a real
 * daemon, none when libusb is unavailable), the virtual devices users create (mass storage
 * backed by an image file, CDC ACM serial ports bridged to a unix socket the daemon listens
 * on), which machine each is attached to, which are shared with `usb serve` clients, the
 * auto-attach rules, and the USB/IP server that carries them all.
 *
 * The server is served on the gateway address inside the machines' network (TCP 3240),
 * never on a host interface, and each machine may list and import only the devices attached
 * to it. Attaching asks the machine's agent to import the device and hand the socket to the
 * guest kernel's vhci-hcd. Shared devices are offered to other USB/IP clients only through
 * `serveShared` (the `tender usb serve` relay, or the daemon's own listener when config.json
 * says `usb.serve`). Every connection enters through `server.accept(duplex, allowed)`.
 *
 * A host device is open (its kernel driver detached) exactly while a running machine holds it
 * or it is shared, and closed (driver reattached) otherwise. Unplugging ends its attachment
 * (event usb.unplugged); bindings and rules stay and apply again when a matching device
 * appears, including the same device re-enumerated with a new devnum after a reset or a
 * firmware flash.
 *
 * State persists atomically in $TENDER_HOME/usb.json (usb-state.ts) and is restored when the
 * machine's agent (re)connects: after a start, a reboot or a daemon restart.
 */
import { existsSync } from 'node:fs';
import net from 'node:net';
import { dirname, join, resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { ip4str } from '../../netstack/addr.js';
import type { Network } from '../../netstack/network.js';
import { tcpDuplex } from '../../netstack/services/tcp-stream.js';
import type { UsbDevice } from '../../usb/device.js';
import { FileBackend } from '../../usb/devices/scsi.js';
import { SerialDevice, listenSerialSocket, type SerialListener } from '../../usb/devices/serial.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import type { HostDeviceInfo, HostDeviceSource, HostUsbDevice } from '../../usb/host/source.js';
import { UsbIpServer } from '../../usb/server.js';
import { ERRORS, type ErrorCode, TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import { readJson, writeFileAtomic } from './atomic.js';
import type { EventBus } from './events.js';
import { UsbVsock } from './usb-vsock.js';
import type { MachineManager } from './machines.js';
import type { Paths } from './paths.js';
import {
  VIRTUAL_VIDPID,
  isVidPid,
  listenError,
  migrateUsbState,
  normalizeVidPid,
  parseListen,
  parseMatch,
  vidpidOf,
  emptyUsbState,
  type Attachment,
  type UsbPolicy,
  type UsbState,
  type VirtualConfig,
} from './usb-state.js';

export type { UsbPolicy } from './usb-state.js';

export const USBIP_PORT = 3240;
const VIRTUAL_BUSNUM = 99;

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
  /** The first auto-attach rule matching this device, or null. */
  policy: string | null;
}

export interface UsbPolicyInfo extends UsbPolicy {
  /** Busids of the plugged-in devices the rule matches now. */
  devices: string[];
}

export interface UsbServeStatus {
  /** The configured address (config.json `usb.serve`), or null when the daemon does not serve. */
  listen: string | null;
  address: string | null;
  port: number | null;
  /** Why the configured listener is not running. */
  error: string | null;
}

/** What the manager needs of the machines (MachineManager; a stand-in in unit tests). */
export type UsbMachines = Pick<MachineManager, 'inspect' | 'list' | 'agentOf'> & Partial<Pick<MachineManager, 'vsockEndpoint'>>;

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

/** One device the manager knows, virtual or host. */
type Dev = { id: string; busid: string; vidpid: string } & ({ kind: 'virtual'; v: VirtualConfig } | { kind: 'host'; info: HostDeviceInfo });

export class UsbManager {
  readonly server: UsbIpServer;
  private state: UsbState = emptyUsbState();
  private readonly backends = new Map<string, FileBackend>();
  private readonly listeners = new Map<string, SerialListener>();
  /** device id → the guest's vhci port */
  private readonly ports = new Map<string, number>();
  /** Devices an import is running for (a restore and a hotplug may race for the same one). */
  private readonly importing = new Set<string>();
  /** Host devices plugged in now, by busid. */
  private readonly present = new Map<string, HostDeviceInfo>();
  /** Host devices open now (driver detached), by busid. */
  private readonly hostOpen = new Map<string, HostUsbDevice>();
  /** Opens and closes of one busid run one after the other. */
  private readonly hostQueue = new Map<string, Promise<void>>();
  /** Machines whose VMM stopped since their agent last said hello. */
  private readonly down = new Set<string>();
  private readonly file: string;
  private unserve: (() => void) | null = null;
  private shareListener: net.Server | null = null;
  private serveStatus: UsbServeStatus = { listen: null, address: null, port: null, error: null };
  private readonly source: HostDeviceSource | null;
  private readonly onAdd = (d: HostDeviceInfo) => this.hostAdded(d);
  private readonly onRemove = (d: HostDeviceInfo) => this.hostRemoved(d);
  /** USB/IP over vsock for machines whose agent is on vsock (usb-vsock.ts). */
  private readonly vsock: UsbVsock;

  constructor(private readonly o: UsbManagerOptions) {
    this.file = join(o.paths.home, 'usb.json');
    this.source = o.hostSource ?? null;
    this.server = new UsbIpServer({ log: { debug: (x, m) => o.log.debug(x, m), warn: (x, m) => o.log.warn(x, m) } });
    // The same rule as TCP: a machine imports only what is attached to it.
    this.vsock = new UsbVsock({
      endpoint: (m) => o.machines.vsockEndpoint?.(m) ?? null,
      accept: (machine, sock) => void this.server.accept(sock, (dev) => this.attachmentOf(this.idOfBusid(dev.busid) ?? '')?.machine === machine),
      log: o.log,
    });
  }

  async load(): Promise<void> {
    const raw = readJson<unknown>(this.file);
    this.state = migrateUsbState(raw);
    if (raw !== null && (raw as { version?: number }).version !== this.state.version) {
      this.save();
      this.o.log.info({ from: (raw as { version?: number }).version, to: this.state.version }, 'usb.json migrated');
    }
    for (const v of this.state.virtual) {
      try {
        await this.open(v);
      } catch (err) {
        this.o.log.warn({ device: v.id, err: (err as Error).message }, 'virtual USB device not available');
      }
    }
    this.loadHost();
    // Machines import from the gateway; a connection may import only what is attached to the
    // machine whose address it comes from.
    this.unserve = this.o.network.serveTcp(USBIP_PORT, (conn) => {
      const machine = this.machineAt(ip4str(conn.remoteIp));
      void this.server.accept(tcpDuplex(conn), (dev) => machine !== null && this.attachmentOf(this.idOfBusid(dev.busid) ?? '')?.machine === machine);
    });
    if (this.o.serve) await this.listenShared(this.o.serve);
  }

  /** Host devices plugged in now; attachments whose device went away while the daemon was not running end. */
  private loadHost(): void {
    if (!this.source) {
      // The daemon logged why (openHostUsb); one line is enough.
      this.o.log.debug({}, 'no host USB device source: only virtual devices');
      return;
    }
    for (const d of this.source.list()) this.present.set(d.busid, d);
    this.source.on('add', this.onAdd);
    this.source.on('remove', this.onRemove);
    const kept = this.state.attachments.filter((a) => {
      if (this.isVirtualId(a.device)) return true;
      const d = this.present.get(a.device);
      if (d && vidpidOf(d.vendorId, d.productId) === a.vidpid) return true;
      this.o.log.info({ device: a.device, vidpid: a.vidpid, machine: a.machine }, 'USB device unplugged while the daemon was not running: attachment ended');
      return false;
    });
    if (kept.length !== this.state.attachments.length) {
      this.state.attachments = kept;
      this.save();
    }
    // Shared devices are open for serve clients from the start.
    for (const busid of this.present.keys()) if (this.isSharedBusid(busid)) void this.syncHost(busid).catch((err) => this.warnHost(busid, err));
  }

  private machineAt(ip: string): string | null {
    for (const m of this.o.machines.list()) if (m.ip === ip) return m.name;
    return null;
  }

  private isVirtualId(id: string): boolean {
    return this.state.virtual.some((v) => v.id === id);
  }

  private idOfBusid(busid: string): string | undefined {
    if (this.present.has(busid)) return busid;
    return this.state.virtual.find((v) => virtualBusid(v) === busid)?.id;
  }

  private attachmentOf(id: string): Attachment | undefined {
    return this.state.attachments.find((a) => a.device === id);
  }

  private async open(v: VirtualConfig): Promise<void> {
    if (v.kind === 'serial') {
      const dev = new SerialDevice({ busid: virtualBusid(v), busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name });
      this.listeners.set(v.id, await listenSerialSocket(dev, v.socket));
      this.server.add(dev);
      return;
    }
    const be = await FileBackend.open(v.image, v.readOnly);
    this.backends.set(v.id, be);
    this.server.add(new StorageDevice(be, { busid: virtualBusid(v), busnum: VIRTUAL_BUSNUM, devnum: v.devnum, product: v.name }));
  }

  private save(): void {
    writeFileAtomic(this.file, JSON.stringify(this.state, null, 2) + '\n');
  }

  // ---------------- devices ----------------

  /** Every device there is now: host devices by busid, then the virtual ones (bus 99). */
  private devices(): Dev[] {
    const host: Dev[] = [...this.present.values()]
      .sort((a, b) => a.busid.localeCompare(b.busid, 'en', { numeric: true }))
      .map((info) => ({ kind: 'host', id: info.busid, busid: info.busid, vidpid: vidpidOf(info.vendorId, info.productId), info }));
    const virt: Dev[] = this.state.virtual.map((v) => ({ kind: 'virtual', id: v.id, busid: virtualBusid(v), vidpid: VIRTUAL_VIDPID[v.kind], v }));
    return [...host, ...virt];
  }

  private deviceById(id: string): Dev | undefined {
    return this.devices().find((d) => d.id === id);
  }

  /** DEVICE as users give it: a virtual id or name, a busid, or a VID:PID naming exactly one device. */
  private resolve(device: string): Dev {
    const all = this.devices();
    const exact = all.find((d) => d.id === device || d.busid === device || (d.kind === 'virtual' && d.v.name !== undefined && d.v.name === device));
    if (exact) return exact;
    if (isVidPid(device)) {
      const vp = normalizeVidPid(device);
      const hits = all.filter((d) => d.vidpid === vp);
      if (hits.length === 1) return hits[0]!;
      if (hits.length > 1) throw new TenderError('BAD_ARGUMENT', `${hits.length} devices are ${vp} (${hits.map((d) => d.busid).join(', ')}): give a busid`);
    }
    throw new TenderError('USB_DEVICE_NOT_FOUND', `no USB device "${device}" is plugged in (tender usb ls)`);
  }

  private info(d: Dev): UsbDeviceInfo {
    const a = this.attachmentOf(d.id);
    const shared = this.isShared(d);
    const base = {
      id: d.id,
      busid: d.busid,
      vidpid: d.vidpid,
      state: a ? ('attached' as const) : shared ? ('shared' as const) : ('available' as const),
      shared,
      machine: a?.machine ?? null,
      port: this.ports.get(d.id) ?? null,
      policy: this.policyFor(d)?.id ?? null,
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
    return this.devices().map((d) => this.info(d));
  }

  private infoOf(id: string): UsbDeviceInfo {
    const d = this.deviceById(id);
    if (!d) throw new TenderError('USB_DEVICE_NOT_FOUND', `USB device "${id}" is gone`);
    return this.info(d);
  }

  // ---------------- virtual devices ----------------

  private findVirtual(device: string): VirtualConfig {
    const v = this.state.virtual.find((x) => x.id === device || virtualBusid(x) === device || (x.name !== undefined && x.name === device));
    if (!v) throw new TenderError('USB_DEVICE_NOT_FOUND', `no virtual USB device "${device}" (tender usb ls)`);
    return v;
  }

  private checkName(name: string | undefined): void {
    if (name !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/.test(name)) throw new TenderError('BAD_ARGUMENT', `bad name "${name}": letters, digits, . _ -, up to 32`);
    if (name !== undefined && this.state.virtual.some((v) => v.name === name)) throw new TenderError('BAD_ARGUMENT', `a USB device named "${name}" exists`);
    // A name that reads as a VID:PID or a busid would make DEVICE arguments ambiguous.
    if (name !== undefined && (isVidPid(name) || /^\d+-\d/.test(name))) throw new TenderError('BAD_ARGUMENT', `bad name "${name}": it reads as a VID:PID or a busid`);
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
    return this.infoOf(v.id);
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
    return this.infoOf(v.id);
  }

  async removeDevice(device: string): Promise<void> {
    const v = this.findVirtual(device);
    const a = this.attachmentOf(v.id);
    if (a) await this.detach(a.machine, v.id).catch(() => {});
    this.server.remove(virtualBusid(v));
    await this.backends.get(v.id)?.close?.();
    this.backends.delete(v.id);
    await this.listeners.get(v.id)?.close();
    this.listeners.delete(v.id);
    this.state.virtual = this.state.virtual.filter((x) => x !== v);
    this.state.bindings = this.state.bindings.filter((b) => b.device !== v.id);
    this.save();
  }

  // ---------------- host devices: open exactly while needed ----------------

  private machineUp(machine: string): boolean {
    if (this.down.has(machine)) return false;
    try {
      const s = this.o.machines.inspect(machine).state;
      return s === 'running' || s === 'starting';
    } catch {
      return false;
    }
  }

  private wantOpen(busid: string): boolean {
    if (!this.present.has(busid)) return false;
    if (this.isSharedBusid(busid)) return true;
    const a = this.attachmentOf(busid);
    return a !== undefined && this.machineUp(a.machine);
  }

  /** Open or close host device `busid` so that it is open exactly while wanted. */
  private syncHost(busid: string): Promise<void> {
    const prev = this.hostQueue.get(busid) ?? Promise.resolve();
    const run = prev.then(() => this.syncHostNow(busid));
    const tail = run.catch(() => {});
    this.hostQueue.set(busid, tail);
    void tail.then(() => {
      if (this.hostQueue.get(busid) === tail) this.hostQueue.delete(busid);
    });
    return run;
  }

  private async syncHostNow(busid: string): Promise<void> {
    const info = this.present.get(busid);
    const cur = this.hostOpen.get(busid);
    // A device that re-enumerated is another device: the old handle is dead.
    if (cur && (!info || cur.info.devnum !== info.devnum)) await this.closeHost(busid, cur);
    const want = this.wantOpen(busid);
    const open = this.hostOpen.get(busid);
    if (want && !open && this.source && info) {
      let dev: HostUsbDevice;
      try {
        dev = await this.source.open(busid);
      } catch (err) {
        throw openError(err, busid);
      }
      // Unplugged, re-enumerated or no longer wanted while it was opening.
      if (this.present.get(busid)?.devnum !== dev.info.devnum || !this.wantOpen(busid)) {
        await dev.close().catch(() => {});
        return;
      }
      this.hostOpen.set(busid, dev);
      this.server.add(dev);
      this.o.log.info({ busid, vidpid: vidpidOf(info.vendorId, info.productId) }, 'host USB device opened (kernel driver detached)');
    } else if (!want && open) {
      await this.closeHost(busid, open);
    }
  }

  private async closeHost(busid: string, dev: HostUsbDevice): Promise<void> {
    this.hostOpen.delete(busid);
    // Ends any client's connection to it (the guest's vhci sees the device go).
    this.server.remove(busid);
    await dev.close().catch((err: Error) => this.o.log.warn({ busid, err: err.message }, 'closing a host USB device failed'));
    this.o.log.info({ busid }, 'host USB device closed (kernel driver reattached)');
  }

  private warnHost(busid: string, err: unknown): void {
    this.o.log.warn({ busid, err: (err as Error).message }, 'host USB device not opened');
  }

  private hostAdded(info: HostDeviceInfo): void {
    const old = this.present.get(info.busid);
    if (old && old.devnum === info.devnum) return;
    // A new devnum at a known busid without a 'remove' first: the old device is gone.
    if (old) this.unplugged(old);
    this.present.set(info.busid, info);
    this.o.log.info({ busid: info.busid, devnum: info.devnum, vidpid: vidpidOf(info.vendorId, info.productId), product: info.product }, 'USB device plugged in');
    void (async () => {
      // Closes the old handle after a re-enumeration; opens a shared device for serve clients.
      await this.syncHost(info.busid).catch((err) => this.warnHost(info.busid, err));
      await this.applyPolicies({ busid: info.busid });
    })();
  }

  private hostRemoved(info: HostDeviceInfo): void {
    const cur = this.present.get(info.busid);
    if (!cur || cur.devnum !== info.devnum) return;
    this.unplugged(cur);
    this.present.delete(info.busid);
    this.o.log.info({ busid: info.busid, devnum: info.devnum }, 'USB device unplugged');
    void this.syncHost(info.busid).catch((err) => this.warnHost(info.busid, err));
  }

  /** The device at this busid is gone: its attachment ends; bindings and rules stay. */
  private unplugged(info: HostDeviceInfo): void {
    const a = this.attachmentOf(info.busid);
    this.ports.delete(info.busid);
    if (!a) return;
    this.state.attachments = this.state.attachments.filter((x) => x !== a);
    this.save();
    this.o.events.publish({ type: 'usb.unplugged', machine: a.machine, device: info.busid });
  }

  // ---------------- attach and detach ----------------

  async attach(machine: string, device: string, opts: { auto?: boolean } = {}): Promise<UsbDeviceInfo> {
    this.o.machines.inspect(machine);
    const d = this.resolve(device);
    const holder = this.attachmentOf(d.id);
    if (holder && holder.machine !== machine) throw new TenderError('USB_DEVICE_BUSY', `${device} is attached to "${holder.machine}": detach it first`);
    // The rule names what the user named: a VID:PID follows the product, anything else the port.
    const rule = opts.auto ? this.planPolicy(machine, isVidPid(device) ? { kind: 'vidpid', match: d.vidpid } : { kind: 'busid', match: d.busid }) : null;
    await this.give(machine, d, { rule });
    return this.infoOf(d.id);
  }

  /**
   * Attach `d` to `machine`: record it (with `rule`, an auto-attach rule to keep), open a host
   * device, and import it when the machine is in a state where that can work now.
   */
  private async give(machine: string, d: Dev, o: { rule: UsbPolicy | null }): Promise<void> {
    const added = !this.attachmentOf(d.id);
    if (added) this.state.attachments.push({ device: d.id, machine, vidpid: d.vidpid });
    if (d.kind === 'host') {
      try {
        await this.syncHost(d.busid);
      } catch (err) {
        if (added) this.state.attachments = this.state.attachments.filter((a) => a.device !== d.id);
        throw err;
      }
    }
    if (o.rule && !this.state.policies.includes(o.rule)) this.state.policies.push(o.rule);
    this.save();
    const state = this.stateOf(machine);
    if (state !== 'running' && state !== 'starting') return; // imported when its agent connects
    if (this.server.inUse(d.busid) && this.ports.has(d.id)) return;
    // A starting machine whose agent has not said hello yet: its hello restores the attachment.
    await this.importInto(machine, d, state === 'starting' ? 0 : undefined).catch((err: TenderError) => {
      if (state !== 'starting' || err.code !== 'AGENT_UNAVAILABLE') throw err;
    });
  }

  private stateOf(machine: string): string {
    try {
      return this.o.machines.inspect(machine).state;
    } catch {
      return 'gone';
    }
  }

  private async importInto(machine: string, d: { id: string; busid: string }, agentWaitMs?: number): Promise<void> {
    if (this.importing.has(d.id)) return;
    this.importing.add(d.id);
    try {
      const agent = await this.o.machines.agentOf(machine, agentWaitMs);
      if (!agent.usbAttach) throw new TenderError('AGENT_UNAVAILABLE', 'this guest agent cannot attach USB devices');
      const gw = ip4str(this.o.network.config.gatewayIp);
      const r = await this.vsock.attach(machine, { host: gw, port: USBIP_PORT }, (t) => agent.usbAttach!({ ...t, busid: d.busid })).catch((err: Error) => {
        throw new TenderError('USB_ATTACH_FAILED', `attaching ${d.id} to "${machine}": ${err.message}`);
      });
      this.ports.set(d.id, r.port);
      this.o.events.publish({ type: 'usb.attached', machine, device: d.id });
    } finally {
      this.importing.delete(d.id);
    }
  }

  async detach(machine: string, device: string): Promise<void> {
    let id: string;
    try {
      id = this.resolve(device).id;
    } catch (err) {
      // An attachment can outlive its device only when host devices are unavailable.
      if (!this.state.attachments.some((a) => a.device === device)) throw err;
      id = device;
    }
    const a = this.attachmentOf(id);
    if (!a || a.machine !== machine) throw new TenderError('USB_DEVICE_NOT_FOUND', `${device} is not attached to "${machine}"`);
    this.state.attachments = this.state.attachments.filter((x) => x !== a);
    this.save();
    const port = this.ports.get(id);
    this.ports.delete(id);
    if (port !== undefined) {
      try {
        const agent = await this.o.machines.agentOf(machine, 2000);
        await agent.usbDetach?.(port);
      } catch {
        // The machine is gone or its agent is: closing the server side below detaches too.
      }
    }
    // Ending the USB/IP connection detaches the device in the guest whatever the agent did.
    const d = this.deviceById(id);
    if (d) {
      this.kick(d.busid);
      if (d.kind === 'host') await this.syncHost(d.busid).catch((err) => this.warnHost(d.busid, err));
    }
    this.o.events.publish({ type: 'usb.detached', machine, device: id });
  }

  /** End whatever connection has imported `busid`, keeping the device offered. */
  private kick(busid: string): void {
    const dev = this.server.list().find((x) => x.busid === busid);
    if (!dev) return;
    this.server.remove(busid);
    this.server.add(dev);
  }

  /** The machine's agent (re)connected: restore its attachments, then apply its rules. */
  async restore(machine: string): Promise<void> {
    this.down.delete(machine);
    for (const a of [...this.state.attachments]) {
      if (a.machine !== machine) continue;
      const d = this.deviceById(a.device);
      if (!d) continue;
      try {
        if (d.kind === 'host') await this.syncHost(d.busid);
        if (this.server.inUse(d.busid)) continue;
        await this.importInto(machine, d);
      } catch (err) {
        this.o.log.warn({ machine, device: a.device, err: (err as Error).message }, 'USB attachment not restored');
      }
    }
    await this.applyPolicies({ machine });
  }

  /** The machine stopped: its imports ended with it, and its host devices go back to the host. */
  machineStopped(machine: string): void {
    this.down.add(machine);
    this.vsock.close(machine);
    for (const a of this.state.attachments) {
      if (a.machine !== machine) continue;
      this.ports.delete(a.device);
      if (this.present.has(a.device)) void this.syncHost(a.device).catch((err) => this.warnHost(a.device, err));
    }
  }

  // ---------------- auto-attach rules ----------------

  private matches(p: UsbPolicy, d: Dev): boolean {
    return p.kind === 'vidpid' ? p.match === d.vidpid : p.match === d.busid;
  }

  private policyFor(d: Dev): UsbPolicy | undefined {
    return this.state.policies.find((p) => this.matches(p, d));
  }

  listPolicies(): UsbPolicyInfo[] {
    const devs = this.devices();
    return this.state.policies.map((p) => ({ ...p, devices: devs.filter((d) => this.matches(p, d)).map((d) => d.busid) }));
  }

  /** The rule to keep for (machine, match): an existing identical one, or a new one not yet saved. */
  private planPolicy(machine: string, m: { kind: 'vidpid' | 'busid'; match: string }): UsbPolicy {
    const same = this.state.policies.find((p) => p.kind === m.kind && p.match === m.match);
    if (same && same.machine === machine) return same;
    if (same) throw new TenderError('USB_POLICY_EXISTS', `rule ${same.id} already gives ${m.match} to "${same.machine}" (tender usb policy rm ${same.id})`);
    let n = 1;
    while (this.state.policies.some((p) => p.id === `p${n}`)) n++;
    return { id: `p${n}`, machine, kind: m.kind, match: m.match, createdAt: new Date().toISOString() };
  }

  /** `usb policy add`: record the rule, and attach the matching devices that are free now. */
  async addPolicy(machine: string, matchText: string): Promise<UsbPolicyInfo> {
    this.o.machines.inspect(machine);
    const p = this.planPolicy(machine, parseMatch(matchText));
    if (!this.state.policies.includes(p)) {
      this.state.policies.push(p);
      this.save();
    }
    await this.applyPolicies({ policy: p });
    return this.listPolicies().find((x) => x.id === p.id)!;
  }

  removePolicy(id: string): void {
    const p = this.state.policies.find((x) => x.id === id);
    if (!p) throw new TenderError('USB_POLICY_NOT_FOUND', `no auto-attach rule "${id}" (tender usb policy ls)`);
    // Devices it attached stay attached: removing a rule stops future attaches only.
    this.state.policies = this.state.policies.filter((x) => x !== p);
    this.save();
  }

  /**
   * Attach free devices that a rule gives to a running (or starting) machine. Rules are tried
   * in the order they were made; a device goes to the first rule's machine that is up.
   */
  private async applyPolicies(f: { machine?: string; busid?: string; policy?: UsbPolicy }): Promise<void> {
    for (const d of this.devices()) {
      if (f.busid !== undefined && d.busid !== f.busid) continue;
      if (this.attachmentOf(d.id)) continue;
      const p = this.state.policies.find((x) => this.matches(x, d) && (f.policy === undefined || x === f.policy) && (f.machine === undefined || x.machine === f.machine) && this.machineUp(x.machine));
      if (!p) continue;
      try {
        await this.give(p.machine, d, { rule: null });
        this.o.log.info({ machine: p.machine, device: d.id, policy: p.id }, 'USB device attached by rule');
      } catch (err) {
        this.o.log.warn({ machine: p.machine, device: d.id, policy: p.id, err: (err as Error).message }, 'auto-attach failed');
      }
    }
  }

  // ---------------- sharing with `usb serve` clients ----------------

  private isShared(d: Dev): boolean {
    return this.state.bindings.some((b) => b.device === d.id && b.vidpid === d.vidpid);
  }

  private isSharedBusid(busid: string): boolean {
    const d = this.devices().find((x) => x.busid === busid);
    return d !== undefined && this.isShared(d);
  }

  /** `usb bind`: share a device with `usb serve` clients, persistently. */
  async bind(device: string): Promise<UsbDeviceInfo> {
    const d = this.resolve(device);
    if (!this.isShared(d)) {
      this.state.bindings = this.state.bindings.filter((b) => b.device !== d.id);
      this.state.bindings.push({ device: d.id, vidpid: d.vidpid });
      if (d.kind === 'host') {
        try {
          await this.syncHost(d.busid);
        } catch (err) {
          this.state.bindings = this.state.bindings.filter((b) => b.device !== d.id);
          throw err;
        }
      }
      this.save();
    }
    return this.infoOf(d.id);
  }

  /** `usb unbind`: stop sharing; a serve client using it is disconnected. Works for unplugged devices too. */
  async unbind(device: string): Promise<string> {
    let id: string | undefined;
    try {
      id = this.resolve(device).id;
    } catch (err) {
      // Bindings outlive unplugging: find one by its busid or VID:PID.
      const vp = isVidPid(device) ? normalizeVidPid(device) : null;
      const hits = this.state.bindings.filter((b) => b.device === device || b.vidpid === vp);
      if (hits.length !== 1) throw err;
      id = hits[0]!.device;
    }
    const before = this.state.bindings.length;
    this.state.bindings = this.state.bindings.filter((b) => b.device !== id);
    if (this.state.bindings.length === before) throw new TenderError('USB_DEVICE_NOT_FOUND', `${device} is not shared`);
    this.save();
    const d = this.deviceById(id);
    if (d) {
      // A machine's import stays; a serve client's ends.
      if (!this.attachmentOf(d.id) && this.server.inUse(d.busid)) this.kick(d.busid);
      if (d.kind === 'host') await this.syncHost(d.busid).catch((err) => this.warnHost(d.busid, err));
    }
    return id;
  }

  /** One USB/IP client of the shared devices (the `usb serve` relay or the daemon's own listener). */
  serveShared(sock: Duplex): void {
    void this.server.accept(sock, (dev: UsbDevice) => this.isSharedBusid(dev.busid));
  }

  /** The daemon's own `usb serve` (config.json `usb.serve`): an explicit choice, shared devices only. */
  private async listenShared(listen: string): Promise<void> {
    this.serveStatus = { listen, address: null, port: null, error: null };
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
      this.shareListener = srv;
      const a = srv.address() as net.AddressInfo;
      this.serveStatus = { listen, address: a.address, port: a.port, error: null };
      this.o.log.info({ address: a.address, port: a.port }, 'serving shared USB devices (config.json usb.serve)');
    } catch (err) {
      // A bad setting must not keep the daemon (and so every machine) from starting.
      this.serveStatus = { listen, address: null, port: null, error: (err as Error).message };
      this.o.log.error({ listen, err: (err as Error).message }, 'usb.serve: not serving shared USB devices');
    }
  }

  serving(): UsbServeStatus {
    return { ...this.serveStatus };
  }

  async close(): Promise<void> {
    this.unserve?.();
    this.vsock.closeAll();
    this.source?.off('add', this.onAdd);
    this.source?.off('remove', this.onRemove);
    const l = this.shareListener;
    this.shareListener = null;
    if (l) await new Promise<void>((r) => l.close(() => r()));
    await this.server.close();
    await Promise.all([...this.hostQueue.values()]);
    // Hand host devices back to their kernel drivers.
    for (const [busid, dev] of [...this.hostOpen]) {
      this.hostOpen.delete(busid);
      await dev.close().catch(() => {});
    }
    this.source?.close();
    for (const be of this.backends.values()) await be.close?.();
    for (const l of this.listeners.values()) await l.close();
  }
}

function virtualBusid(v: VirtualConfig): string {
  return `${VIRTUAL_BUSNUM}-${v.devnum}`;
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
