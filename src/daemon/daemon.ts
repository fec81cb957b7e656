/**
 * `tender daemon`: the service in the foreground (systemd/launchd-friendly). It owns the
 * default network (the userspace stack every nat machine plugs into), the machines, and the
 * API on $TENDER_HOME/tender.sock. Stopping the daemon leaves machines running; the next
 * daemon re-adopts them.
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { networkConfig } from '../../netstack/config.js';
import { Network } from '../../netstack/network.js';
import { registerMachineRoutes } from '../api/machine-routes.js';
import { registerNetworkRoutes } from '../api/network-routes.js';
import { type Api, createApi, listenUnix } from '../api/server.js';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { errorResponse, parseExecHeader, serveExec, upgradeResponse } from '../api/exec-stream.js';
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import { EventBus } from './events.js';
import { UsbManager } from './usb.js';
import { handleUsbUpgrade, isUsbUpgrade, registerUsbRoutes } from '../api/usb-routes.js';
import type { HostDeviceSource } from '../../usb/host/source.js';
import { readJson } from './atomic.js';
import { type ImageProvider, MachineManager, type MachineManagerOptions } from './machines.js';
import { type Paths, paths as pathsFor } from './paths.js';
import type { VmmDriver } from '../vmm/driver.js';

export interface DaemonDeps {
  driver: VmmDriver;
  images: ImageProvider;
  connectAgent?: MachineManagerOptions['connectAgent'];
  listenAgent?: MachineManagerOptions['listenAgent'];
  openBridgeTap?: MachineManagerOptions['openBridgeTap'];
  /**
   * Host USB devices (libusb: `openHostUsb`). Absent or resolving to null: the daemon runs
   * with virtual USB devices only.
   */
  hostUsb?: (log: Logger) => Promise<HostDeviceSource | null> | HostDeviceSource | null;
}

/** Daemon-wide settings in $TENDER_HOME/config.json that the daemon reads at start. */
export interface DaemonConfig {
  usb?: {
    /** ADDR:PORT: the daemon serves shared USB devices there (off when absent). */
    serve?: string | null;
  };
}

/** config.json, or {} when there is none; a file that does not parse is reported, not fatal. */
export function readDaemonConfig(file: string, log: Logger): DaemonConfig {
  try {
    const c = readJson<DaemonConfig>(file);
    return c !== null && typeof c === 'object' ? c : {};
  } catch (err) {
    log.error({ file, err: (err as Error).message }, 'config.json unreadable: ignored');
    return {};
  }
}

/** The libusb host device source, or null (with one log line) when libusb cannot be loaded. */
export async function openHostUsb(log: Logger): Promise<HostDeviceSource | null> {
  try {
    const { openLibusbSource } = await import('../../usb/host/libusb-source.js');
    return await openLibusbSource({ log });
  } catch (err) {
    log.info({ err: (err as Error).message }, 'host USB devices unavailable (libusb not loaded): only virtual devices');
    return null;
  }
}

export interface Daemon {
  paths: Paths;
  network: Network;
  machines: MachineManager;
  usb: UsbManager;
  events: EventBus;
  api: Api;
  stop(): Promise<void>;
}

/** True when something answers on the socket (another daemon). */
export function socketAlive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export async function startDaemon(o: { home?: string; log: Logger; deps: DaemonDeps; bootTimeoutMs?: number }): Promise<Daemon> {
  const p = pathsFor(o.home);
  mkdirSync(p.home, { recursive: true, mode: 0o700 });
  if (await socketAlive(p.socket)) throw new TenderError('MACHINE_STATE', `a tender daemon is already running on ${p.socket}`);
  const events = new EventBus();
  const network = new Network({ config: networkConfig({}), log: o.log.child({ component: 'net' }) });
  const machines = new MachineManager({
    paths: p,
    network,
    driver: o.deps.driver,
    images: o.deps.images,
    events,
    log: o.log.child({ component: 'machines' }),
    connectAgent: o.deps.connectAgent,
    listenAgent: o.deps.listenAgent,
    openBridgeTap: o.deps.openBridgeTap,
    bootTimeoutMs: o.bootTimeoutMs,
  });
  const usbLog = o.log.child({ component: 'usb' });
  const config = readDaemonConfig(p.config, o.log);
  const hostSource = (await o.deps.hostUsb?.(usbLog)) ?? null;
  const usb = new UsbManager({ paths: p, network, machines, events, log: usbLog, hostSource, serve: config.usb?.serve ?? null });
  await usb.load();
  machines.hooks.agentReady = (name) => void usb.restore(name);
  machines.hooks.stopped = (name) => usb.machineStopped(name);
  await machines.load();
  const api = await createApi({ log: o.log, title: 'tender daemon API' });
  registerNetworkRoutes(api, network, { v1Prefix: '/v1/network' });
  registerMachineRoutes(api, machines, events);
  registerUsbRoutes(api, usb);
  api.server.on('upgrade', (req: IncomingMessage, sock: Duplex, head: Buffer) => {
    if (isUsbUpgrade(req)) return handleUsbUpgrade(usb, sock, head);
    // Otherwise only exec upgrades exist; anything else is refused like an unknown route.
    const m = /^\/v1\/machines\/([^/?]+)\/exec(\?.*)?$/.exec(req.url ?? '');
    if (req.method !== 'POST' || !m || String(req.headers.upgrade).toLowerCase() !== 'tender-exec') {
      sock.end(errorResponse(404, 'NOT_FOUND', `no upgrade route ${req.method} ${req.url}`));
      return;
    }
    void (async () => {
      try {
        const execReq = parseExecHeader(req.headers['x-tender-exec']);
        const agent = await machines.agentOf(decodeURIComponent(m[1]!));
        sock.write(upgradeResponse());
        serveExec(sock, agent, execReq);
      } catch (err) {
        const e = err instanceof TenderError ? err : new TenderError('INTERNAL', (err as Error).message);
        sock.end(errorResponse(e.status, e.code, e.message));
      }
    })();
  });
  await listenUnix(api, p.socket);
  writeFileSync(p.pidFile, `${process.pid}\n`);
  o.log.info({ socket: p.socket, machines: machines.names().length }, 'daemon ready');
  let stopped = false;
  return {
    paths: p,
    network,
    machines,
    usb,
    events,
    api,
    async stop() {
      if (stopped) return;
      stopped = true;
      await api.close();
      await machines.close();
      await usb.close();
      network.close();
      rmSync(p.pidFile, { force: true });
    },
  };
}
