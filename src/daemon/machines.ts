/**
 * Machines: create, start, stop, remove, and keep track of them across daemon restarts.
 *
 * A machine is a directory under $TENDER_HOME/machines/NAME with machine.json (what the user
 * asked for) and state.json (pid, address, last exit). Starting one attaches its NIC to the
 * network (nat: a port on the daemon's virtual switch; bridged: a private switch joining it
 * to a host TAP enslaved to the bridge), starts the VMM, connects to the guest agent, and
 * waits for the agent's hello and a DHCP lease. The VMM's exit, expected or not, is noticed
 * and recorded with its reason.
 *
 * Everything the VMM talks to survives a daemon restart: the NIC is a unix datagram socket
 * (no connection to lose; QEMU sends to the path), and the agent and control sockets are
 * served by the VMM, so a new daemon reconnects and re-adopts running machines.
 */
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { ip4, mac as parseMac } from '../../netstack/addr.js';
import { DatagramLink } from '../../netstack/link/datagram.js';
import type { Link } from '../../netstack/link/link.js';
import { Switch, type SwitchPort } from '../../netstack/link/switch.js';
import type { Network } from '../../netstack/network.js';
import { type ForwardSpec, ForwardSpecError, parseForwardSpec, formatForward } from '../../netstack/services/forward-spec.js';
import { ForwardError, type Forward } from '../../netstack/services/forwards.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import type { AgentChannel, ExitInfo, MachineSpec, VmmDriver, VmmInstance } from '../vmm/driver.js';
import { readVhostVsockStatsFile } from '../vmm/vhost-vsock.js';
import { type GuestVsockEndpoint, type VsockChoice, type VsockVia, chooseVsock, hostCid } from '../vmm/vsock-channel.js';
import type { ExecHandle, ExecOptions } from '../agent/client.js';
import { readJson, writeFileAtomic } from './atomic.js';
import type { EventBus } from './events.js';
import { type MachineConfig, type MachineRuntime, type NetMode, applySetting, formatNet, newMac, validateName } from './machine-config.js';
import { type Paths, machineDir } from './paths.js';
import { USBIP_VSOCK_PORT } from './usb-vsock.js';

/** What the daemon needs from a guest agent connection (src/agent implements it). */
export interface AgentSession {
  /** Resolves on the agent's hello; rejects if the channel closes first. */
  readonly ready: Promise<unknown>;
  onListeners(fn: (ls: { proto: 'tcp' | 'udp'; address: string; port: number }[]) => void): void;
  /** Every hello: the first and each one after the agent (or its channel) reconnected. */
  onHello?(fn: () => void): void;
  poweroff(): Promise<void>;
  exec(argv: string[], opts: ExecOptions): ExecHandle;
  /** Import a USB/IP device into the guest's vhci-hcd; resolves with the vhci port. */
  usbAttach?(o: { host: string; port: number; busid: string }): Promise<{ port: number }>;
  usbDetach?(vhciPort: number): Promise<void>;
  close(): void;
}

export interface BootImage {
  kernel: string;
  initrd?: string;
  disk?: string;
  /** Kernel command-line words the image wants. */
  cmdline?: readonly string[];
}

export interface ImageProvider {
  /** Kernel and initrd (or disk) for a machine's image, building the default image on first use. */
  resolve(cfg: MachineConfig, onProgress?: (msg: string) => void): Promise<BootImage>;
}

export interface CreateInput {
  name: string;
  cpus?: number;
  memoryMiB?: number;
  image?: string;
  kernel?: string;
  initrd?: string;
  disk?: string;
  net?: NetMode;
  forwards?: string[];
  accel?: 'auto' | 'kvm' | 'tcg';
  autoForward?: boolean;
  /**
   * The agent's channel: vsock (the default: the host's vhost-vsock, else tender's vhost-user
   * backend, else virtio-serial with a warning) or serial (virtio-serial). Unset: the default
   * of the daemon that starts it.
   */
  agent?: 'serial' | 'vsock';
}

export interface MachineInfo {
  name: string;
  state: string;
  ip: string | null;
  cpus: number;
  memoryMiB: number;
  net: string;
  mac: string;
  image: string;
  accel: string | null;
  pid: number | null;
  forwards: Forward[];
  autoForwards: Forward[];
  agent: string;
  /**
   * tender's vhost-user vsock backend's drop counters that are not zero (its current or last
   * run; docs/vsock.md), or null when the machine has not used that backend.
   */
  vsockDrops?: Record<string, number> | null;
  lastExit: { reason: string; at: string } | null;
  dir: string;
  createdAt: string;
}

interface Live {
  instance: VmmInstance | null;
  link: Link | null;
  port: SwitchPort | null;
  /** Bridged mode: the private switch and the host TAP port. */
  bridge: { sw: Switch; tap: SwitchPort } | null;
  agent: AgentSession | null;
  agentReady: boolean;
  forwards: Forward[];
  autoForwards: Map<string, Forward>;
  stopping: boolean;
  /** Resolves when an address is known. */
  addressWaiters: ((ip: string) => void)[];
}

export interface MachineManagerOptions {
  paths: Paths;
  network: Network;
  driver: VmmDriver;
  images: ImageProvider;
  events: EventBus;
  log: Logger;
  /** Connect to the agent channel the VMM serves at `path`; null when no agent is expected. */
  connectAgent?: (path: string, onGone: () => void) => AgentSession;
  /** Wait for the agent's vsock connections to host port `port` (vsock-channel.ts: listenGuestVsock). */
  listenAgent?: (ep: GuestVsockEndpoint, port: number, onGone: () => void) => AgentSession;
  /** Which vsock this host offers (default: chooseVsock(), checked at each start). */
  vsock?: () => VsockChoice;
  /** Creates the host TAP for bridged mode (injectable; needs root). */
  openBridgeTap?: (name: string, bridge: string) => Promise<Link>;
  /** How long `start` waits for the agent and the address. */
  bootTimeoutMs?: number;
}

/** Hooks for other daemon parts (USB attachments follow the machine's agent). */
export interface MachineHooks {
  agentReady?: (name: string) => void;
  stopped?: (name: string) => void;
}

/** The guest port the agent connects to over vsock. */
export const AGENT_VSOCK_PORT = 1024;

/**
 * The agent channel a machine runs with, as recorded in state.json (`agentChannel`), so a
 * re-adopted machine keeps the channel it booted with whatever the config or host say now.
 * "vsock" is what daemons before vsock-by-default recorded (the driver chose the path).
 */
type ChannelRecord = 'virtio-serial' | 'vsock-host' | 'vsock-vhost-user' | 'vsock-vmm';

function channelText(c: ChannelRecord): string {
  if (c === 'vsock-host') return "vsock via the host's vhost-vsock";
  if (c === 'vsock-vhost-user') return "vsock via tender's vhost-user backend";
  if (c === 'vsock-vmm') return "vsock (the VMM's own)";
  return 'virtio-serial';
}

export class MachineManager {
  private readonly configs = new Map<string, MachineConfig>();
  private readonly runtime = new Map<string, MachineRuntime>();
  private readonly live = new Map<string, Live>();
  private readonly locks = new Map<string, Promise<unknown>>();
  readonly hooks: MachineHooks = {};

  constructor(private readonly o: MachineManagerOptions) {
    o.network.on('lease', (l) => {
      if (l.event !== 'bound') return;
      for (const [name, cfg] of this.configs) if (cfg.mac === l.mac && cfg.net.mode === 'nat') this.addressLearned(name, l.ip);
    });
  }

  // ---------------- persistence ----------------

  private dir(name: string): string {
    return machineDir(this.o.paths, name);
  }

  private saveConfig(cfg: MachineConfig): void {
    writeFileAtomic(join(this.dir(cfg.name), 'machine.json'), JSON.stringify(cfg, null, 2) + '\n');
  }

  private saveRuntime(name: string): void {
    const rt = this.runtime.get(name);
    if (rt && existsSync(this.dir(name))) writeFileAtomic(join(this.dir(name), 'state.json'), JSON.stringify(rt, null, 2) + '\n');
  }

  private setState(name: string, state: MachineRuntime['state'], reason?: string): void {
    const rt = this.runtime.get(name) ?? { state };
    rt.state = state;
    this.runtime.set(name, rt);
    this.saveRuntime(name);
    this.o.events.publish({ type: 'machine.state', machine: name, state, reason });
    this.o.log.info({ machine: name, state, reason }, 'machine state');
  }

  /** Read every machine from disk and re-adopt the ones whose VMM still runs. */
  async load(): Promise<void> {
    mkdirSync(this.o.paths.machines, { recursive: true });
    for (const name of readdirSync(this.o.paths.machines)) {
      const cfg = readJson<MachineConfig>(join(this.dir(name), 'machine.json'));
      if (cfg === null || cfg.name !== name) continue;
      this.configs.set(name, cfg);
      const rt = readJson<MachineRuntime>(join(this.dir(name), 'state.json')) ?? { state: 'stopped' };
      this.runtime.set(name, rt);
      if ((rt.state === 'running' || rt.state === 'starting' || rt.state === 'stopping') && rt.pid) {
        await this.adopt(cfg, rt).catch((err) => {
          this.o.log.warn({ machine: name, err: String(err) }, 'could not re-adopt machine');
          rt.lastExit = { reason: `could not re-adopt: ${(err as Error).message}`, at: new Date().toISOString() };
          rt.state = 'crashed';
          delete rt.pid;
          this.saveRuntime(name);
        });
      } else if (rt.state !== 'stopped' && rt.state !== 'crashed') {
        rt.state = 'stopped';
        this.saveRuntime(name);
      }
    }
  }

  private async adopt(cfg: MachineConfig, rt: MachineRuntime): Promise<void> {
    const spec = await this.spec(cfg, { kernel: '', initrd: undefined }, this.recordedChannel(rt));
    const instance = await this.o.driver.adopt(spec, rt.pid!);
    if (instance === null) {
      rt.lastExit = { reason: 'exited while tender was not running', at: new Date().toISOString() };
      rt.state = 'crashed';
      delete rt.pid;
      this.saveRuntime(cfg.name);
      return;
    }
    const live = this.newLive();
    this.live.set(cfg.name, live);
    live.instance = instance;
    await this.attachNet(cfg, live);
    this.watchExit(cfg.name, instance);
    this.connectAgent(cfg.name, spec, live);
    if (rt.ip) this.addressLearned(cfg.name, rt.ip);
    this.o.log.info({ machine: cfg.name, pid: rt.pid }, 're-adopted running machine');
  }

  // ---------------- queries ----------------

  names(): string[] {
    return [...this.configs.keys()].sort();
  }

  private get(name: string): MachineConfig {
    const cfg = this.configs.get(name);
    if (!cfg) throw new TenderError('MACHINE_NOT_FOUND', `no machine named "${name}"`);
    return cfg;
  }

  inspect(name: string): MachineInfo {
    const cfg = this.get(name);
    const rt = this.runtime.get(name) ?? { state: 'stopped' };
    const live = this.live.get(name);
    return {
      name,
      state: rt.state,
      ip: rt.ip ?? null,
      cpus: cfg.cpus,
      memoryMiB: cfg.memoryMiB,
      net: formatNet(cfg.net),
      mac: cfg.mac,
      image: cfg.disk ? `disk:${cfg.disk}` : cfg.kernel ? `kernel:${cfg.kernel}` : (cfg.image ?? 'default'),
      accel: rt.accel ?? null,
      pid: rt.pid ?? null,
      forwards: live?.forwards ?? [],
      autoForwards: [...(live?.autoForwards.values() ?? [])],
      agent: `${live?.agentReady ? 'connected' : live?.agent ? 'connecting' : 'not connected'} (${this.agentChannelText(name)})`,
      vsockDrops: vsockDrops(join(this.dir(name), 'vsock')),
      lastExit: rt.lastExit ?? null,
      dir: this.dir(name),
      createdAt: cfg.createdAt,
    };
  }

  list(): MachineInfo[] {
    return this.names().map((n) => this.inspect(n));
  }

  config(name: string): MachineConfig {
    return { ...this.get(name) };
  }

  // ---------------- lifecycle ----------------

  /** Serialize operations per machine (start while stopping, two starts, ...). */
  private serial<T>(name: string, f: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const next = prev.then(f, f);
    this.locks.set(name, next.catch(() => {}));
    return next;
  }

  create(input: CreateInput): MachineInfo {
    const name = validateName(input.name);
    if (this.configs.has(name) || existsSync(this.dir(name))) throw new TenderError('MACHINE_EXISTS', `a machine named "${name}" already exists`);
    for (const f of [input.kernel, input.initrd, input.disk]) {
      if (f !== undefined && !existsSync(f)) throw new TenderError('FILE_NOT_FOUND', `${f} does not exist`);
    }
    if (input.initrd && !input.kernel) throw new TenderError('BAD_ARGUMENT', '--initrd needs --kernel');
    if (input.image && input.image !== 'default' && !existsSync(input.image)) throw new TenderError('FILE_NOT_FOUND', `image directory ${input.image} does not exist`);
    const forwards = (input.forwards ?? []).flatMap((f) => specsOf(f).map(formatForward));
    const cfg: MachineConfig = {
      version: 1,
      name,
      createdAt: new Date().toISOString(),
      cpus: input.cpus ?? 1,
      memoryMiB: input.memoryMiB ?? 512,
      image: input.kernel || input.disk ? undefined : (input.image ?? 'default'),
      kernel: input.kernel,
      initrd: input.initrd,
      disk: input.disk,
      net: input.net ?? { mode: 'nat' },
      mac: newMac(),
      forwards,
      autoForward: input.autoForward ?? true,
      accel: input.accel ?? 'auto',
      agent: input.agent,
    };
    mkdirSync(this.dir(name), { recursive: true, mode: 0o700 });
    this.saveConfig(cfg);
    this.configs.set(name, cfg);
    this.runtime.set(name, { state: 'stopped' });
    this.saveRuntime(name);
    this.o.events.publish({ type: 'machine.created', machine: name });
    return this.inspect(name);
  }

  set(name: string, settings: string[]): MachineInfo {
    let cfg = this.get(name);
    for (const kv of settings) cfg = applySetting(cfg, kv);
    this.saveConfig(cfg);
    this.configs.set(name, cfg);
    return this.inspect(name);
  }

  private newLive(): Live {
    return {
      instance: null,
      link: null,
      port: null,
      bridge: null,
      agent: null,
      agentReady: false,
      forwards: [],
      autoForwards: new Map(),
      stopping: false,
      addressWaiters: [],
    };
  }

  /**
   * The channel a start uses: serial when asked for; otherwise (the default, and configs
   * written before there was a choice) vsock when the host offers it, else serial with the
   * reason as a warning: a machine must not fail to start for want of vsock.
   */
  private chooseChannel(cfg: MachineConfig): { channel: ChannelRecord; warning?: string } {
    if (cfg.agent === 'serial') return { channel: 'virtio-serial' };
    const v = this.vsockChoice();
    if (v.via === null) return { channel: 'virtio-serial', warning: `vsock unavailable (${v.why}): the agent uses virtio-serial` };
    return { channel: `vsock-${v.via}` };
  }

  /** Which vsock the next start gets: injected (tests), else the driver's answer. */
  private vsockChoice(): VsockChoice {
    return (this.o.vsock ?? (() => this.o.driver.vsock?.() ?? chooseVsock()))();
  }

  /** The recorded channel of a machine started by this or an earlier daemon. */
  private recordedChannel(rt: MachineRuntime): ChannelRecord {
    const c = rt.agentChannel;
    if (c === 'vsock-host' || c === 'vsock-vhost-user' || c === 'vsock-vmm' || c === 'virtio-serial') return c;
    if (c === 'vsock') {
      const via = this.vsockChoice().via;
      return via === 'host' ? 'vsock-host' : via === 'vmm' ? 'vsock-vmm' : 'vsock-vhost-user';
    }
    return 'virtio-serial';
  }

  private agentSpec(dir: string, channel: ChannelRecord): AgentChannel {
    if (!this.o.connectAgent) return { kind: 'none' };
    if (channel === 'virtio-serial') return { kind: 'virtio-serial', path: join(dir, 'agent.sock') };
    const via = channel.slice('vsock-'.length) as VsockVia;
    // vhost-user and vmm: one device per machine, so the CID only has to be unique inside it.
    // The host kernel's CIDs are host-wide: one per machine directory.
    return {
      kind: 'vsock',
      via,
      cid: via === 'host' ? hostCid(dir) : 3,
      port: AGENT_VSOCK_PORT,
      path: join(dir, 'vsock'),
      hostPorts: [AGENT_VSOCK_PORT, USBIP_VSOCK_PORT],
    };
  }

  /** What inspect shows: the channel running now, else the one the next start would use. */
  private agentChannelText(name: string): string {
    const rt = this.runtime.get(name);
    if (rt?.pid && this.live.has(name)) return channelText(this.recordedChannel(rt)) + (rt.agentWarning ? `; ${rt.agentWarning}` : '');
    const c = this.chooseChannel(this.get(name));
    return channelText(c.channel) + (c.warning ? `; ${c.warning}` : '');
  }

  /**
   * Where a running machine's guest-initiated vsock connections arrive (USB/IP over vsock
   * listens there too), or null when its agent channel is not vsock.
   */
  vsockEndpoint(name: string): GuestVsockEndpoint | null {
    const rt = this.runtime.get(name);
    if (!rt?.pid || !this.live.has(name)) return null;
    const a = this.agentSpec(this.dir(name), this.recordedChannel(rt));
    return a.kind === 'vsock' ? { via: a.via!, cid: a.cid, path: a.path } : null;
  }

  private async spec(cfg: MachineConfig, img: BootImage, channel: ChannelRecord): Promise<MachineSpec> {
    const dir = this.dir(cfg.name);
    return {
      name: cfg.name,
      dir,
      cpus: cfg.cpus,
      memoryMiB: cfg.memoryMiB,
      kernel: img.kernel,
      initrd: img.initrd,
      disk: img.disk,
      cmdline: [...(img.cmdline ?? []), `tender.hostname=${cfg.name}`],
      accel: cfg.accel,
      net: { kind: 'dgram', mac: cfg.mac, localPath: join(dir, 'vmm-net.sock'), remotePath: join(dir, 'net.sock') },
      agent: this.agentSpec(dir, channel),
      serialLog: join(dir, 'serial.log'),
      controlSocket: join(dir, 'control.sock'),
    };
  }

  start(name: string, opts: { wait?: boolean; onProgress?: (msg: string) => void } = {}): Promise<MachineInfo> {
    return this.serial(name, async () => {
      const cfg = this.get(name);
      const rt = this.runtime.get(name)!;
      if (rt.state === 'running' || rt.state === 'starting') return this.inspect(name);
      let img: BootImage;
      try {
        img = await this.o.images.resolve(cfg, opts.onProgress);
      } catch (err) {
        throw err instanceof TenderError ? err : new TenderError('IMAGE_UNAVAILABLE', (err as Error).message, { cause: err });
      }
      const chosen = this.chooseChannel(cfg);
      if (chosen.warning) this.o.log.warn({ machine: name }, chosen.warning);
      const spec = await this.spec(cfg, img, chosen.channel);
      const live = this.newLive();
      this.live.set(name, live);
      delete rt.ip;
      this.setState(name, 'starting');
      try {
        await this.attachNet(cfg, live);
        opts.onProgress?.('starting the VMM');
        const accel = cfg.accel === 'auto' ? await this.o.driver.resolveAccel(spec) : { accel: cfg.accel };
        if ('warning' in accel && accel.warning) this.o.log.warn({ machine: name }, accel.warning);
        rt.accel = accel.accel;
        const instance = await this.o.driver.start({ ...spec, accel: accel.accel });
        live.instance = instance;
        rt.pid = instance.pid;
        rt.startedAt = new Date().toISOString();
        rt.agentChannel = chosen.channel;
        if (chosen.warning) rt.agentWarning = chosen.warning;
        else delete rt.agentWarning;
        this.saveRuntime(name);
        this.watchExit(name, instance);
        this.connectAgent(name, spec, live);
      } catch (err) {
        this.detachNet(live);
        this.live.delete(name);
        rt.lastExit = { reason: `failed to start: ${(err as Error).message}`, at: new Date().toISOString() };
        this.setState(name, 'crashed', rt.lastExit.reason);
        throw err instanceof TenderError ? err : new TenderError('VMM_FAILED', (err as Error).message, { cause: err });
      }
      if (opts.wait === false) return this.inspect(name);
      opts.onProgress?.('waiting for the guest agent and an address');
      await this.waitBooted(name, live);
      return this.inspect(name);
    });
  }

  /** Running = the agent said hello (or there is no agent) and, for nat, DHCP gave an address. */
  private async waitBooted(name: string, live: Live): Promise<void> {
    const timeout = this.o.bootTimeoutMs ?? 180_000;
    const cfg = this.get(name);
    const exited = live.instance!.exited.then((e) => {
      throw new TenderError('VMM_FAILED', `the machine stopped while booting: ${e.reason}`);
    });
    const address =
      cfg.net.mode === 'nat' && !this.runtime.get(name)?.ip ? new Promise<string>((r) => live.addressWaiters.push(r)) : Promise.resolve('');
    const agent = live.agent ? live.agent.ready : Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, rej) => {
      timer = setTimeout(() => rej(new TenderError('VMM_FAILED', `the machine did not finish booting within ${Math.round(timeout / 1000)} s (see tender machine logs ${name})`)), timeout);
    });
    try {
      await Promise.race([Promise.all([address, agent]), exited, timedOut]);
    } finally {
      clearTimeout(timer);
      exited.catch(() => {});
    }
    if (this.runtime.get(name)?.state === 'starting') this.setState(name, 'running');
  }

  private watchExit(name: string, instance: VmmInstance): void {
    void instance.exited.then((info: ExitInfo) => {
      const live = this.live.get(name);
      if (!live || live.instance !== instance) return;
      const rt = this.runtime.get(name)!;
      const expected = live.stopping;
      this.teardown(name, live);
      this.hooks.stopped?.(name);
      rt.lastExit = { reason: info.reason, at: new Date().toISOString() };
      delete rt.pid;
      this.setState(name, expected ? 'stopped' : 'crashed', info.reason);
    });
  }

  private teardown(name: string, live: Live): void {
    live.agent?.close();
    live.agent = null;
    live.agentReady = false;
    for (const f of [...live.forwards, ...live.autoForwards.values()]) {
      try {
        this.o.network.forwards.remove(f.protocol, f.hostIp, f.hostPort);
      } catch {
        // already gone
      }
    }
    live.forwards = [];
    live.autoForwards.clear();
    this.detachNet(live);
    this.live.delete(name);
  }

  stop(name: string, opts: { force?: boolean; timeoutMs?: number } = {}): Promise<MachineInfo> {
    return this.serial(name, async () => {
      this.get(name);
      const live = this.live.get(name);
      if (!live || !live.instance) return this.inspect(name);
      live.stopping = true;
      this.setState(name, 'stopping');
      const instance = live.instance;
      if (opts.force) {
        await instance.kill();
      } else {
        // The agent powers off cleanly (sync, then the kernel's power-off); the VMM's own
        // shutdown path covers a guest without an agent; both end in a kill after the timeout.
        if (live.agentReady && live.agent) await live.agent.poweroff().catch(() => {});
        await instance.shutdown(opts.timeoutMs ?? 30_000);
      }
      await instance.exited;
      return this.inspect(name);
    });
  }

  async restart(name: string, opts: { wait?: boolean } = {}): Promise<MachineInfo> {
    await this.stop(name);
    return this.start(name, opts);
  }

  remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    return this.serial(name, async () => {
      this.get(name);
      const live = this.live.get(name);
      if (live?.instance) {
        if (!opts.force) throw new TenderError('MACHINE_STATE', `machine "${name}" is running: stop it first, or use --force`);
        live.stopping = true;
        await live.instance.kill();
        await live.instance.exited;
      }
      this.configs.delete(name);
      this.runtime.delete(name);
      rmSync(this.dir(name), { recursive: true, force: true });
      this.o.events.publish({ type: 'machine.removed', machine: name });
    });
  }

  // ---------------- network ----------------

  private async attachNet(cfg: MachineConfig, live: Live): Promise<void> {
    const dir = this.dir(cfg.name);
    const link = DatagramLink.connect(join(dir, 'net.sock'), join(dir, 'vmm-net.sock'), { name: `machine:${cfg.name}`, counters: this.o.network.counters });
    live.link = link;
    if (cfg.net.mode === 'nat') {
      live.port = this.o.network.addLink(link);
    } else {
      await this.bridgeTo(cfg.name, live, cfg.net.bridge);
    }
  }

  private async bridgeTo(name: string, live: Live, bridge: string): Promise<void> {
    if (!this.o.openBridgeTap) throw new TenderError('BAD_ARGUMENT', 'bridged networking is not available in this daemon');
    const tap = await this.o.openBridgeTap(name, bridge);
    const sw = new Switch({ clock: this.o.network.clock, counters: this.o.network.counters });
    const tapPort = sw.addPort(tap);
    live.port = sw.addPort(live.link!);
    live.bridge = { sw, tap: tapPort };
  }

  private detachNet(live: Live): void {
    live.port?.remove();
    live.port = null;
    live.bridge?.sw.close();
    live.bridge = null;
    live.link = null;
  }

  /** `tender net bridge NAME --to BRIDGE | --off`: re-wire the running NIC live; persist for next start. */
  async setNet(name: string, net: NetMode): Promise<MachineInfo> {
    return this.serial(name, async () => {
      const cfg = this.get(name);
      const live = this.live.get(name);
      if (live?.link && live.port) {
        // Move the same link between switches: the guest keeps its NIC, only where its frames go changes.
        live.port.detach();
        live.bridge?.sw.close();
        live.bridge = null;
        if (net.mode === 'nat') live.port = this.o.network.addLink(live.link);
        else await this.bridgeTo(name, live, net.bridge);
        delete this.runtime.get(name)!.ip;
      }
      const next = { ...cfg, net };
      this.saveConfig(next);
      this.configs.set(name, next);
      return this.inspect(name);
    });
  }

  private addressLearned(name: string, ip: string): void {
    const rt = this.runtime.get(name);
    const live = this.live.get(name);
    if (!rt || !live) return;
    const changed = rt.ip !== ip;
    rt.ip = ip;
    this.saveRuntime(name);
    this.o.network.addHost(name, ip4(ip));
    if (changed) this.o.events.publish({ type: 'machine.address', machine: name, ip });
    for (const w of live.addressWaiters.splice(0)) w(ip);
    void this.applyForwards(name, live, ip);
  }

  private async applyForwards(name: string, live: Live, ip: string): Promise<void> {
    const cfg = this.get(name);
    for (const f of live.forwards.splice(0)) {
      try {
        this.o.network.forwards.remove(f.protocol, f.hostIp, f.hostPort);
      } catch {
        // gone
      }
    }
    for (const text of cfg.forwards) {
      for (const spec of parseForwardSpec(text)) {
        try {
          live.forwards.push(await this.o.network.forwards.add(spec, ip4(ip)));
          this.o.events.publish({ type: 'forward.added', machine: name, spec: text, auto: false });
        } catch (err) {
          this.o.log.warn({ machine: name, forward: text, err: (err as Error).message }, 'forward not applied');
        }
      }
    }
  }

  /** Active forwards of running machines; for a stopped machine, the configured ones. */
  listForwards(name?: string): (Forward & { machine: string; auto: boolean; active: boolean })[] {
    const out: (Forward & { machine: string; auto: boolean; active: boolean })[] = [];
    for (const n of name ? [this.get(name).name] : this.names()) {
      const live = this.live.get(n);
      if (live && live.forwards.length > 0) {
        for (const f of live.forwards) out.push({ ...f, machine: n, auto: false, active: true });
      } else {
        for (const text of this.get(n).forwards) {
          for (const s of parseForwardSpec(text)) {
            out.push({ ...s, guestIp: this.runtime.get(n)?.ip ?? '', spec: formatForward(s), machine: n, auto: false, active: false });
          }
        }
      }
      for (const f of live?.autoForwards.values() ?? []) out.push({ ...f, machine: n, auto: true, active: true });
    }
    return out;
  }

  async addForward(name: string, specText: string): Promise<Forward[]> {
    const cfg = this.get(name);
    const specs = specsOf(specText);
    const live = this.live.get(name);
    const ip = this.runtime.get(name)?.ip;
    const added: Forward[] = [];
    if (live && ip) {
      try {
        for (const s of specs) added.push(await this.o.network.forwards.add(s, ip4(ip)));
      } catch (err) {
        for (const a of added) this.o.network.forwards.remove(a.protocol, a.hostIp, a.hostPort);
        if (err instanceof ForwardError) throw new TenderError(err.code, err.message);
        throw err;
      }
      live.forwards.push(...added);
    }
    // Persist what the user asked for, with a free port pinned once it was chosen.
    const texts = added.length ? added.map((a) => a.spec) : specs.map((s) => formatForward(s));
    const next = { ...cfg, forwards: [...cfg.forwards, ...texts] };
    this.saveConfig(next);
    this.configs.set(name, next);
    for (const t of texts) this.o.events.publish({ type: 'forward.added', machine: name, spec: t, auto: false });
    return added.length ? added : specs.map((s) => ({ protocol: s.protocol, hostIp: s.hostIp, hostPort: s.hostPort, guestIp: ip ?? '', guestPort: s.guestPort, spec: formatForward(s) }));
  }

  removeForward(name: string, specText: string): void {
    const cfg = this.get(name);
    const specs = specsOf(specText);
    const live = this.live.get(name);
    let found = false;
    for (const s of specs) {
      const matches = (t: string) => {
        const [p] = parseForwardSpec(t);
        return p!.protocol === s.protocol && p!.hostIp === s.hostIp && p!.hostPort === s.hostPort && p!.guestPort === s.guestPort;
      };
      const before = cfg.forwards.length;
      cfg.forwards = cfg.forwards.filter((t) => !matches(t));
      if (cfg.forwards.length !== before) found = true;
      if (live) {
        for (const f of live.forwards.filter((f) => f.protocol === s.protocol && f.hostIp === s.hostIp && f.hostPort === s.hostPort)) {
          this.o.network.forwards.remove(f.protocol, f.hostIp, f.hostPort);
          live.forwards.splice(live.forwards.indexOf(f), 1);
          found = true;
        }
      }
    }
    if (!found) throw new TenderError('FORWARD_NOT_FOUND', `machine "${name}" has no forward ${specText}`);
    this.saveConfig(cfg);
    this.o.events.publish({ type: 'forward.removed', machine: name, spec: specText, auto: false });
  }

  // ---------------- agent ----------------

  private connectAgent(name: string, spec: MachineSpec, live: Live): void {
    const gone = () => {
      live.agentReady = false;
    };
    let session: AgentSession;
    if (spec.agent.kind === 'virtio-serial' && this.o.connectAgent) session = this.o.connectAgent(spec.agent.path, gone);
    else if (spec.agent.kind === 'vsock' && this.o.listenAgent) {
      session = this.o.listenAgent({ via: spec.agent.via ?? 'vhost-user', cid: spec.agent.cid, path: spec.agent.path }, spec.agent.port, gone);
    }
    else return;
    live.agent = session;
    const hello = () => {
      if (this.live.get(name) !== live) return;
      live.agentReady = true;
      this.o.log.info({ machine: name }, 'guest agent connected');
      this.hooks.agentReady?.(name);
    };
    // Every hello counts, not just the first: after a reconnect the agent is ready again.
    if (session.onHello) session.onHello(hello);
    else session.ready.then(hello, () => {});
    session.onListeners((ls) => void this.syncAutoForwards(name, live, ls));
  }

  /** The agent of a running machine, waiting a little while it (re)connects. */
  async agentOf(name: string, waitMs = 15_000): Promise<AgentSession> {
    this.get(name);
    const live = this.live.get(name);
    if (!live?.agent) throw new TenderError('AGENT_UNAVAILABLE', `machine "${name}" is not running (or its image has no agent)`);
    // Connecting or reconnecting: wait for its next hello (the session's `ready` only covers
    // the first one).
    const deadline = Date.now() + waitMs;
    while (!live.agentReady) {
      if (Date.now() > deadline || this.live.get(name) !== live) {
        throw new TenderError('AGENT_UNAVAILABLE', `the guest agent of "${name}" did not connect within ${waitMs / 1000} s`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return live.agent;
  }

  /** Lima-style automatic forwards: a guest listener gets 127.0.0.1:PORT on the host when that port is free. */
  private async syncAutoForwards(name: string, live: Live, ls: { proto: 'tcp' | 'udp'; address: string; port: number }[]): Promise<void> {
    const cfg = this.get(name);
    const ip = this.runtime.get(name)?.ip;
    if (!cfg.autoForward || !ip || cfg.net.mode !== 'nat') return;
    const want = new Map<string, { proto: 'tcp' | 'udp'; port: number }>();
    for (const l of ls) {
      // Loopback-only guest listeners are reachable too: tender's connections arrive on eth0,
      // so only listeners on the guest's own loopback address can't be served; skip those.
      if (l.address.startsWith('127.') || l.address === '::1') continue;
      if (l.proto !== 'tcp') continue;
      want.set(`${l.proto}:${l.port}`, l);
    }
    for (const [k, f] of live.autoForwards) {
      if (!want.has(k)) {
        live.autoForwards.delete(k);
        try {
          this.o.network.forwards.remove(f.protocol, f.hostIp, f.hostPort);
        } catch {
          // gone
        }
        this.o.events.publish({ type: 'forward.removed', machine: name, spec: f.spec, auto: true });
      }
    }
    for (const [k, l] of want) {
      if (live.autoForwards.has(k)) continue;
      // Explicit forwards win.
      if (live.forwards.some((f) => f.guestPort === l.port && f.protocol === l.proto)) continue;
      try {
        const f = await this.o.network.forwards.add({ protocol: l.proto, hostIp: '127.0.0.1', hostPort: l.port, guestPort: l.port }, ip4(ip));
        live.autoForwards.set(k, f);
        this.o.events.publish({ type: 'forward.added', machine: name, spec: f.spec, auto: true });
      } catch {
        // Port busy on the host: no automatic forward (as Lima does).
      }
    }
  }

  async close(): Promise<void> {
    // The daemon going away leaves machines running (they are re-adopted); only drop our side.
    for (const live of this.live.values()) {
      live.agent?.close();
      this.detachNet(live);
    }
    this.live.clear();
  }
}

function vsockDrops(uds: string): Record<string, number> | null {
  const st = readVhostVsockStatsFile(uds);
  return st && Object.fromEntries(Object.entries(st).filter(([, v]) => v > 0));
}

/** Parse a forward spec, as the coded error the API and CLI report. */
function specsOf(text: string): ForwardSpec[] {
  try {
    return parseForwardSpec(text);
  } catch (err) {
    if (err instanceof ForwardSpecError) throw new TenderError('BAD_FORWARD_SPEC', err.message);
    throw err;
  }
}

export { parseMac };
