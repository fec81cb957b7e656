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
import { registerUsbRoutes } from '../api/usb-routes.js';
import { type ImageProvider, MachineManager, type MachineManagerOptions } from './machines.js';
import { type Paths, paths as pathsFor } from './paths.js';
import type { VmmDriver } from '../vmm/driver.js';

export interface DaemonDeps {
  driver: VmmDriver;
  images: ImageProvider;
  connectAgent?: MachineManagerOptions['connectAgent'];
  listenAgent?: MachineManagerOptions['listenAgent'];
  openBridgeTap?: MachineManagerOptions['openBridgeTap'];
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
  const usb = new UsbManager({ paths: p, network, machines, events, log: o.log.child({ component: 'usb' }) });
  await usb.load();
  machines.hooks.agentReady = (name) => void usb.restore(name);
  machines.hooks.stopped = (name) => usb.machineStopped(name);
  await machines.load();
  const api = await createApi({ log: o.log, title: 'tender daemon API' });
  registerNetworkRoutes(api, network, { v1Prefix: '/v1/network' });
  registerMachineRoutes(api, machines, events);
  registerUsbRoutes(api, usb);
  api.server.on('upgrade', (req: IncomingMessage, sock: Duplex) => {
    // Only exec upgrades exist; anything else is refused like an unknown route.
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
