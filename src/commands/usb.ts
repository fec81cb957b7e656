/**
 * `tender usb ...`: the daemon's USB devices (host and virtual), attachments to machines,
 * sharing and auto-attach rules, over the API; and `tender usb serve`, a USB/IP server in the
 * foreground on a host address until SIGINT/SIGTERM, for any USB/IP client (Linux `usbip
 * attach`, usbip-win, Docker Desktop). `serve` offers either the devices shared with `tender
 * usb bind` (relayed to the daemon, which owns them) or, with `--storage`, image files of its
 * own without any daemon.
 */
import http from 'node:http';
import net from 'node:net';
import { resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { Command, Option } from 'commander';
import { FileBackend } from '../../usb/devices/scsi.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import { Client } from '../client.js';
import type { UsbDeviceInfo, UsbPolicyInfo } from '../daemon/usb.js';
import { listenError, parseListen } from '../daemon/usb-state.js';
import { ERRORS, type ErrorCode } from '../errors.js';
import { table } from './table.js';
import { createLogger, type Logger } from '../log.js';

const collect = (v: string, prev: string[]) => [...prev, v];

/** Virtual devices live on bus 99 of their own, busid "99-N". */
export const VIRTUAL_BUSNUM = 99;

export { parseListen };

export function parseStorageSpec(s: string): { file: string; readOnly: boolean } {
  if (s.endsWith(':ro')) return { file: s.slice(0, -3), readOnly: true };
  if (s.endsWith(':rw')) return { file: s.slice(0, -3), readOnly: false };
  return { file: s, readOnly: false };
}

export interface ServeOptions {
  listen: string;
  storage: string[];
  logLevel?: string;
}

export interface ServedUsb {
  address: string;
  port: number;
  devices: { busid: string; file: string; readOnly: boolean; blocks: number }[];
  stop(): Promise<void>;
}

export async function serveUsb(opts: ServeOptions, log: Logger): Promise<ServedUsb> {
  const { host, port } = parseListen(opts.listen);
  if (opts.storage.length === 0) throw new TenderError('BAD_ARGUMENT', 'nothing to serve: give at least one --storage FILE[:ro]');
  const server = new UsbIpServer({ log: { debug: (o, m) => log.debug(o, m), warn: (o, m) => log.warn(o, m) } });
  const backends: FileBackend[] = [];
  const devices: ServedUsb['devices'] = [];
  try {
    for (const [i, spec] of opts.storage.entries()) {
      const { file, readOnly } = parseStorageSpec(spec);
      let be: FileBackend;
      try {
        be = await FileBackend.open(file, readOnly);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') throw new TenderError('FILE_NOT_FOUND', `--storage ${file}: no such file`);
        if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') throw new TenderError('PERMISSION_DENIED', `--storage ${file}: cannot open ${readOnly ? 'for reading' : 'for writing (add :ro for read-only)'}`);
        throw new TenderError('BAD_ARGUMENT', `--storage ${file}: ${(e as Error).message}`);
      }
      backends.push(be);
      if (be.blocks === 0) throw new TenderError('BAD_ARGUMENT', `--storage ${file}: the image is smaller than one 512-byte block`);
      const busid = `${VIRTUAL_BUSNUM}-${i + 1}`;
      server.add(new StorageDevice(be, { busid, busnum: VIRTUAL_BUSNUM, devnum: i + 1 }));
      devices.push({ busid, file, readOnly, blocks: be.blocks });
    }
    const bound = await server.listen(port, host).catch((e: NodeJS.ErrnoException) => {
      throw listenError(e, `--listen ${opts.listen}`);
    });
    return {
      ...bound,
      devices,
      async stop() {
        await server.close();
        for (const b of backends) await b.close();
      },
    };
  } catch (e) {
    await server.close();
    for (const b of backends) await b.close().catch(() => undefined);
    throw e;
  }
}

/** One USB/IP connection to the daemon's shared devices: the `tender-usbip` upgrade on the API socket. */
export function connectSharedUsb(client: Client): Promise<Duplex> {
  return new Promise<Duplex>((resolve, reject) => {
    const req = http.request({ socketPath: client.paths.socket, method: 'GET', path: '/v1/usb/serve', headers: { Connection: 'Upgrade', Upgrade: 'tender-usbip' } });
    req.on('upgrade', (_res, sock, head) => {
      if (head.length > 0) sock.unshift(head);
      resolve(sock);
    });
    req.on('response', async (res) => {
      let body = '';
      for await (const d of res) body += d;
      try {
        const e = JSON.parse(body) as { code: string; message: string };
        reject(new TenderError((e.code in ERRORS ? e.code : 'INTERNAL') as ErrorCode, e.message));
      } catch {
        reject(new TenderError('INTERNAL', `unexpected reply ${res.statusCode}: ${body}`));
      }
    });
    req.on('error', (err) => reject(new TenderError('DAEMON_UNAVAILABLE', err.message)));
    req.end();
  });
}

export interface RelayedUsb {
  address: string;
  port: number;
  stop(): Promise<void>;
}

/**
 * `tender usb serve` without --storage: listen on a host address and carry each client's
 * connection to the daemon, which serves it the shared devices only (every device stays with
 * its one owner, the daemon, whether a machine or a serve client uses it).
 */
export async function relaySharedUsb(listen: string, log: Logger, client = new Client()): Promise<RelayedUsb> {
  const { host, port } = parseListen(listen);
  await client.ensureDaemon();
  const conns = new Set<net.Socket>();
  const srv = net.createServer((s) => {
    conns.add(s);
    s.once('close', () => conns.delete(s));
    s.setNoDelay(true);
    s.on('error', () => {});
    s.pause();
    connectSharedUsb(client).then(
      (up) => {
        up.on('error', () => {});
        up.once('close', () => s.destroy());
        s.once('close', () => up.destroy());
        if (s.destroyed) return up.destroy();
        s.pipe(up);
        up.pipe(s);
      },
      (err: Error) => {
        log.warn({ client: s.remoteAddress, err: err.message }, 'cannot reach the daemon for a USB/IP client');
        s.destroy();
      },
    );
  });
  await new Promise<void>((res, rej) => {
    srv.once('error', (e: NodeJS.ErrnoException) => rej(listenError(e, `--listen ${listen}`)));
    srv.listen(port, host, () => res());
  });
  const a = srv.address() as net.AddressInfo;
  return {
    address: a.address,
    port: a.port,
    async stop() {
      for (const c of conns) c.destroy();
      await new Promise<void>((r) => srv.close(() => r()));
    },
  };
}

function untilSignal(log: Logger): Promise<void> {
  return new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      log.info({ signal: sig }, 'stopping');
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
}

/** What DEVICE shows in `usb ls`. */
function describe(d: UsbDeviceInfo): string {
  if (d.kind === 'host') return d.product ?? 'USB device';
  return [d.id, d.kind, d.name, d.image ?? d.socket, d.readOnly ? '(ro)' : null].filter((x) => x).join(' ');
}

export function registerUsbCommands(program: Command): void {
  const usb = program.command('usb').description('USB passthrough over USB/IP');
  usb
    .command('serve')
    .description('serve USB/IP on a host address until interrupted: the devices shared with `tender usb bind`, or (--storage) image files of its own')
    .option('--listen <addr:port>', 'address to listen on (only explicitly shared devices are offered)', '127.0.0.1:3240')
    .option('--storage <file[:ro]>', 'serve a virtual USB disk backed by an image file instead of the daemon\'s shared devices; :ro for read-only (repeatable)', collect, [])
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .action(async (opts: ServeOptions) => {
      const log = createLogger(opts.logLevel);
      if (opts.storage.length === 0) {
        const client = new Client();
        const relay = await relaySharedUsb(opts.listen, log, client);
        const shared = (await client.request<UsbDeviceInfo[]>('GET', '/v1/usb/devices')).filter((d) => d.shared);
        for (const d of shared) process.stdout.write(`device ${d.busid} ${d.vidpid} ${describe(d)}\n`);
        if (shared.length === 0) process.stderr.write('tender: nothing is shared yet: `tender usb bind DEVICE` shares a device (clients see it at once)\n');
        process.stdout.write(`listening ${relay.address}:${relay.port}\n`);
        await untilSignal(log);
        await relay.stop();
        return;
      }
      const served = await serveUsb(opts, log);
      for (const d of served.devices) process.stdout.write(`device ${d.busid} storage ${d.file}${d.readOnly ? ' (read-only)' : ''} ${d.blocks * 512} bytes\n`);
      process.stdout.write(`listening ${served.address}:${served.port}\n`);
      await untilSignal(log);
      await served.stop();
    });

  // The daemon's devices: host and virtual devices, attachments, sharing, rules.
  const c = () => new Client();
  const print = (s: string): void => void process.stdout.write(s);
  usb
    .command('ls')
    .description('list USB devices: busid, VID:PID, device, state (available / shared / attached to NAME)')
    .option('--json', 'JSON')
    .action(async (o) => {
      const ds = await c().request<UsbDeviceInfo[]>('GET', '/v1/usb/devices');
      if (o.json) return print(JSON.stringify(ds, null, 2) + '\n');
      print(table(['BUSID', 'VID:PID', 'DEVICE', 'STATE'], ds.map((d) => [d.busid, d.vidpid, describe(d), d.machine ? `attached to ${d.machine}` : d.state])));
    });
  const virt = usb.command('virtual').description('virtual USB devices');
  virt
    .command('add')
    .argument('<kind>', 'storage or serial')
    .option('--image <file>', 'storage: the disk image (raw, 512-byte blocks)')
    .option('--read-only', 'storage: the guest cannot write')
    .option('--socket <path>', 'serial: the unix socket the daemon listens on for the host side (socat - UNIX-CONNECT:PATH)')
    .option('--name <name>', 'a name to refer to it by')
    .option('--json', 'print the created device as JSON')
    .action(async (kind: string, o) => {
      let body: object;
      if (kind === 'storage') {
        if (!o.image) throw new TenderError('BAD_ARGUMENT', 'storage needs --image FILE');
        if (o.socket) throw new TenderError('BAD_ARGUMENT', '--socket is for serial devices');
        body = { kind, image: resolve(o.image), readOnly: !!o.readOnly, name: o.name };
      } else if (kind === 'serial') {
        if (!o.socket) throw new TenderError('BAD_ARGUMENT', 'serial needs --socket PATH');
        if (o.image || o.readOnly) throw new TenderError('BAD_ARGUMENT', '--image and --read-only are for storage devices');
        body = { kind, socket: resolve(o.socket), name: o.name };
      } else throw new TenderError('BAD_ARGUMENT', `unknown virtual device kind "${kind}": storage or serial`);
      const d = await c().request<UsbDeviceInfo>('POST', '/v1/usb/virtual', body);
      print(o.json ? JSON.stringify(d, null, 2) + '\n' : `${d.id}\n`);
    });
  virt
    .command('rm')
    .argument('<id>')
    .action(async (id: string) => {
      await c().request('DELETE', `/v1/usb/virtual/${encodeURIComponent(id)}`);
      print(`${id}\n`);
    });
  usb
    .command('attach')
    .argument('<machine>')
    .argument('<device>', 'busid, VID:PID, or a virtual device id or name (tender usb ls)')
    .option('--auto', 'also record an auto-attach rule: the device (a VID:PID: any device with those ids) comes back to this machine whenever it reappears')
    .option('--json', 'print the device as JSON')
    .description('attach a device to a machine (kept across restarts)')
    .action(async (machine: string, device: string, o) => {
      const d = await c().request<UsbDeviceInfo>('POST', '/v1/usb/attach', { machine, device, auto: !!o.auto });
      if (o.json) return print(JSON.stringify(d, null, 2) + '\n');
      print(`${d.id} attached to ${machine}${d.port !== null ? ` (port ${d.port})` : ''}${o.auto && d.policy ? `, rule ${d.policy}` : ''}\n`);
    });
  usb
    .command('detach')
    .argument('<machine>')
    .argument('<device>')
    .description('detach a device from a machine (auto-attach rules stay: tender usb policy rm)')
    .action(async (machine: string, device: string) => {
      await c().request('POST', '/v1/usb/detach', { machine, device });
      print(`${device}\n`);
    });
  usb
    .command('bind')
    .argument('<device>', 'busid, VID:PID, or a virtual device id or name')
    .option('--json', 'print the device as JSON')
    .description('share a device with `tender usb serve` clients (kept across restarts and unplugging)')
    .action(async (device: string, o) => {
      const d = await c().request<UsbDeviceInfo>('POST', '/v1/usb/bind', { device });
      print(o.json ? JSON.stringify(d, null, 2) + '\n' : `${d.id}\n`);
    });
  usb
    .command('unbind')
    .argument('<device>')
    .description('stop sharing a device (a serve client using it is disconnected)')
    .action(async (device: string) => {
      await c().request('POST', '/v1/usb/unbind', { device });
      print(`${device}\n`);
    });

  const policy = usb.command('policy').description('auto-attach rules: a device matching VID:PID or a busid goes to a machine whenever both are there');
  policy
    .command('add')
    .argument('<machine>')
    .argument('<match>', 'VID:PID (e.g. 0483:df11) or busid (e.g. 1-2)')
    .option('--json', 'print the rule as JSON')
    .action(async (machine: string, match: string, o) => {
      const p = await c().request<UsbPolicyInfo>('POST', '/v1/usb/policies', { machine, match });
      print(o.json ? JSON.stringify(p, null, 2) + '\n' : `${p.id}\n`);
    });
  policy
    .command('ls')
    .option('--json', 'JSON')
    .action(async (o) => {
      const ps = await c().request<UsbPolicyInfo[]>('GET', '/v1/usb/policies');
      if (o.json) return print(JSON.stringify(ps, null, 2) + '\n');
      print(table(['ID', 'MATCH', 'MACHINE', 'PLUGGED IN'], ps.map((p) => [p.id, p.match, p.machine, p.devices.join(' ')])));
    });
  policy
    .command('rm')
    .argument('<id>')
    .action(async (id: string) => {
      await c().request('DELETE', `/v1/usb/policies/${encodeURIComponent(id)}`);
      print(`${id}\n`);
    });
}
