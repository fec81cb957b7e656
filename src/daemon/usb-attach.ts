/**
 * Attachments: which machine each device is given to, and importing it into that machine.
 *
 * The USB/IP server is served to machines on the gateway address inside their network (TCP
 * 3240), never on a host interface, and over vsock to machines whose agent is on vsock
 * (usb-vsock.ts); each machine may list and import only the devices attached to it. Attaching
 * asks the machine's agent to import the device and hand the socket to the guest kernel's
 * vhci-hcd. Attachments persist and are restored when the machine's agent (re)connects: after
 * a start, a reboot or a daemon restart. Unplugging a host device ends its attachment (event
 * usb.unplugged).
 */
import { ip4str } from '../../netstack/addr.js';
import type { Network } from '../../netstack/network.js';
import { tcpDuplex } from '../../netstack/services/tcp-stream.js';
import type { HostDeviceInfo } from '../../usb/host/source.js';
import type { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EventBus } from './events.js';
import type { MachineManager } from './machines.js';
import type { Dev, UsbDevices } from './usb-devices.js';
import type { HostDevices } from './usb-host.js';
import { type UsbPolicy, vidpidOf } from './usb-state.js';
import type { UsbStore } from './usb-store.js';
import { UsbVsock } from './usb-vsock.js';

export const USBIP_PORT = 3240;

/** What the manager needs of the machines (MachineManager; a stand-in in unit tests). */
export type UsbTransportKind = 'tcp' | 'vsock';

export type UsbMachines = Pick<MachineManager, 'inspect' | 'list' | 'agentOf'> & Partial<Pick<MachineManager, 'vsockEndpoint'>>;

/** End whatever connection has imported `busid`, keeping the device offered. */
export function kick(server: UsbIpServer, busid: string): void {
  const dev = server.list().find((x) => x.busid === busid);
  if (!dev) return;
  server.remove(busid);
  server.add(dev);
}

export class Attachments {
  /** device id → the guest's vhci port */
  /** What each imported device is in the guest: its vhci port, and what carries its USB/IP. */
  private readonly imports = new Map<string, { port: number; transport: UsbTransportKind }>();
  /** Devices an import is running for (a restore and a hotplug may race for the same one). */
  private readonly importing = new Set<string>();
  /** Machines whose VMM stopped since their agent last said hello. */
  private readonly down = new Set<string>();
  private unserve: (() => void) | null = null;
  /** USB/IP over vsock for machines whose agent is on vsock. */
  private readonly vsock: UsbVsock;

  constructor(
    private readonly o: {
      server: UsbIpServer;
      store: UsbStore;
      devices: UsbDevices;
      host: Pick<HostDevices, 'present' | 'sync' | 'syncLogged'>;
      machines: UsbMachines;
      network: Network;
      events: EventBus;
      log: Logger;
    },
  ) {
    // The same rule as TCP: a machine imports only what is attached to it.
    this.vsock = new UsbVsock({
      endpoint: (m) => o.machines.vsockEndpoint?.(m) ?? null,
      accept: (machine, sock) => void o.server.accept(sock, (dev) => this.importableBy(machine, dev.busid)),
      log: o.log,
    });
  }

  /** Machines import from the gateway; a connection may import only what is attached to the machine whose address it comes from. */
  serve(): void {
    this.unserve = this.o.network.serveTcp(USBIP_PORT, (conn) => {
      const machine = this.machineAt(ip4str(conn.remoteIp));
      void this.o.server.accept(tcpDuplex(conn), (dev) => machine !== null && this.importableBy(machine, dev.busid));
    });
  }

  stop(): void {
    this.unserve?.();
    this.vsock.closeAll();
  }

  private importableBy(machine: string, busid: string): boolean {
    return this.o.store.attachmentOf(this.o.devices.idOfBusid(busid) ?? '')?.machine === machine;
  }

  private machineAt(ip: string): string | null {
    for (const m of this.o.machines.list()) if (m.ip === ip) return m.name;
    return null;
  }

  /** The guest's vhci port of device `id` while attached and imported. */
  portOf(id: string): number | null {
    return this.imports.get(id)?.port ?? null;
  }

  /** What carries device `id`'s USB/IP while imported: vsock, or TCP through the network. */
  transportOf(id: string): UsbTransportKind | null {
    return this.imports.get(id)?.transport ?? null;
  }

  machineUp(machine: string): boolean {
    if (this.down.has(machine)) return false;
    try {
      const s = this.o.machines.inspect(machine).state;
      return s === 'running' || s === 'starting';
    } catch {
      return false;
    }
  }

  private stateOf(machine: string): string {
    try {
      return this.o.machines.inspect(machine).state;
    } catch {
      return 'gone';
    }
  }

  /** The daemon starts: attachments whose host device went away while it was not running end. */
  dropUnplugged(): void {
    const s = this.o.store.state;
    const kept = s.attachments.filter((a) => {
      if (s.virtual.some((v) => v.id === a.device)) return true;
      const d = this.o.host.present.get(a.device);
      if (d && vidpidOf(d.vendorId, d.productId) === a.vidpid) return true;
      this.o.log.info({ device: a.device, vidpid: a.vidpid, machine: a.machine }, 'USB device unplugged while the daemon was not running: attachment ended');
      return false;
    });
    if (kept.length !== s.attachments.length) {
      s.attachments = kept;
      this.o.store.save();
    }
  }

  /**
   * Attach `d` to `machine`: record it (with `rule`, an auto-attach rule `attach --auto` makes,
   * saved in the same write and only once a host device opened), open a host device, and import
   * it when the machine is in a state where that can work now.
   */
  async give(machine: string, d: Dev, rule: UsbPolicy | null = null): Promise<void> {
    const s = this.o.store.state;
    const added = !this.o.store.attachmentOf(d.id);
    if (added) s.attachments.push({ device: d.id, machine, vidpid: d.vidpid });
    if (d.kind === 'host') {
      try {
        await this.o.host.sync(d.busid);
      } catch (err) {
        if (added) s.attachments = s.attachments.filter((a) => a.device !== d.id);
        throw err;
      }
    }
    if (rule && !s.policies.includes(rule)) s.policies.push(rule);
    this.o.store.save();
    const state = this.stateOf(machine);
    if (state !== 'running' && state !== 'starting') return; // imported when its agent connects
    if (this.o.server.inUse(d.busid) && this.imports.has(d.id)) return;
    // A starting machine whose agent has not said hello yet: its hello restores the attachment.
    await this.importInto(machine, d, state === 'starting' ? 0 : undefined).catch((err: TenderError) => {
      if (state !== 'starting' || err.code !== 'AGENT_UNAVAILABLE') throw err;
    });
  }

  private async importInto(machine: string, d: { id: string; busid: string }, agentWaitMs?: number): Promise<void> {
    if (this.importing.has(d.id)) return;
    this.importing.add(d.id);
    try {
      const agent = await this.o.machines.agentOf(machine, agentWaitMs);
      if (!agent.usbAttach) throw new TenderError('AGENT_UNAVAILABLE', 'this guest agent cannot attach USB devices');
      const gw = ip4str(this.o.network.config.gatewayIp);
      const tcp = { host: gw, port: USBIP_PORT };
      let transport: UsbTransportKind = 'tcp';
      const r = await this.vsock
        .attach(machine, tcp, (t) => {
          // The last try is what carries it (vsock, or TCP when an older agent refused vsock).
          transport = t === tcp ? 'tcp' : 'vsock';
          return agent.usbAttach!({ ...t, busid: d.busid });
        })
        .catch((err: Error) => {
          throw new TenderError('USB_ATTACH_FAILED', `attaching ${d.id} to "${machine}": ${err.message}`);
        });
      this.imports.set(d.id, { port: r.port, transport });
      this.o.events.publish({ type: 'usb.attached', machine, device: d.id });
    } finally {
      this.importing.delete(d.id);
    }
  }

  async detach(machine: string, device: string): Promise<void> {
    let id: string;
    try {
      id = this.o.devices.resolve(device).id;
    } catch (err) {
      // An attachment can outlive its device only when host devices are unavailable.
      if (!this.o.store.state.attachments.some((a) => a.device === device)) throw err;
      id = device;
    }
    const a = this.o.store.attachmentOf(id);
    if (!a || a.machine !== machine) throw new TenderError('USB_DEVICE_NOT_FOUND', `${device} is not attached to "${machine}"`);
    this.o.store.state.attachments = this.o.store.state.attachments.filter((x) => x !== a);
    this.o.store.save();
    const port = this.imports.get(id)?.port;
    this.imports.delete(id);
    if (port !== undefined) {
      try {
        const agent = await this.o.machines.agentOf(machine, 2000);
        await agent.usbDetach?.(port);
      } catch {
        // The machine is gone or its agent is: closing the server side below detaches too.
      }
    }
    // Ending the USB/IP connection detaches the device in the guest whatever the agent did.
    const d = this.o.devices.byId(id);
    if (d) {
      kick(this.o.server, d.busid);
      if (d.kind === 'host') await this.o.host.syncLogged(d.busid);
    }
    this.o.events.publish({ type: 'usb.detached', machine, device: id });
  }

  /** The machine's agent (re)connected: import what is attached to it. */
  async restore(machine: string): Promise<void> {
    this.down.delete(machine);
    for (const a of [...this.o.store.state.attachments]) {
      if (a.machine !== machine) continue;
      const d = this.o.devices.byId(a.device);
      if (!d) continue;
      try {
        if (d.kind === 'host') await this.o.host.sync(d.busid);
        if (this.o.server.inUse(d.busid)) continue;
        await this.importInto(machine, d);
      } catch (err) {
        this.o.log.warn({ machine, device: a.device, err: (err as Error).message }, 'USB attachment not restored');
      }
    }
  }

  /** The machine stopped: its imports ended with it, and its host devices go back to the host. */
  machineStopped(machine: string): void {
    this.down.add(machine);
    this.vsock.close(machine);
    for (const a of this.o.store.state.attachments) {
      if (a.machine !== machine) continue;
      this.imports.delete(a.device);
      if (this.o.host.present.has(a.device)) void this.o.host.syncLogged(a.device);
    }
  }

  /** The host device at this busid is gone: its attachment ends; bindings and rules stay. */
  unplugged(info: HostDeviceInfo): void {
    const a = this.o.store.attachmentOf(info.busid);
    this.imports.delete(info.busid);
    if (!a) return;
    this.o.store.state.attachments = this.o.store.state.attachments.filter((x) => x !== a);
    this.o.store.save();
    this.o.events.publish({ type: 'usb.unplugged', machine: a.machine, device: info.busid });
  }
}
