/**
 * `tender usb serve`: run the USB/IP server in the foreground on a host address, exposing only
 * the devices given on the command line, until SIGINT/SIGTERM. Any USB/IP client (Linux
 * `usbip attach`, usbip-win, Docker Desktop) can then import them.
 */
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { FileBackend } from '../../usb/devices/scsi.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import { UsbIpServer } from '../../usb/server.js';
import { TenderError } from '../errors.js';
import { Client } from '../client.js';
import type { UsbDeviceInfo } from '../daemon/usb.js';
import { table } from './table.js';
import { createLogger, type Logger } from '../log.js';

const collect = (v: string, prev: string[]) => [...prev, v];

/** Virtual devices live on bus 99 of their own, busid "99-N". */
export const VIRTUAL_BUSNUM = 99;

export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:]+)):(\d{1,5})$/.exec(s) ?? /^()()(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new TenderError('BAD_ARGUMENT', `--listen must be ADDR:PORT (got ${JSON.stringify(s)})`);
  return { host: m[1] || m[2] || '127.0.0.1', port };
}

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
      if (e.code === 'EADDRINUSE') throw new TenderError('ADDRESS_IN_USE', `--listen ${opts.listen}: address in use`);
      if (e.code === 'EADDRNOTAVAIL') throw new TenderError('ADDRESS_NOT_AVAILABLE', `--listen ${opts.listen}: not an address of this host`);
      if (e.code === 'EACCES') throw new TenderError('PERMISSION_DENIED', `--listen ${opts.listen}: permission denied`);
      throw e;
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

export function registerUsbCommands(program: Command): void {
  const usb = program.command('usb').description('USB passthrough over USB/IP');
  usb
    .command('serve')
    .description('run a USB/IP server in the foreground exposing the given virtual devices, until interrupted')
    .option('--listen <addr:port>', 'address to listen on (only explicitly shared devices are offered)', '127.0.0.1:3240')
    .option('--storage <file[:ro]>', 'expose a virtual USB disk backed by an image file; :ro for read-only (repeatable)', collect, [])
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .action(async (opts: ServeOptions) => {
      const log = createLogger(opts.logLevel);
      const served = await serveUsb(opts, log);
      for (const d of served.devices) process.stdout.write(`device ${d.busid} storage ${d.file}${d.readOnly ? ' (read-only)' : ''} ${d.blocks * 512} bytes\n`);
      process.stdout.write(`listening ${served.address}:${served.port}\n`);
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          log.info({ signal: sig }, 'stopping');
          resolve();
        };
        process.once('SIGINT', () => stop('SIGINT'));
        process.once('SIGTERM', () => stop('SIGTERM'));
      });
      await served.stop();
    });

  // The daemon's devices: virtual devices and attachments to machines.
  const c = () => new Client();
  const print = (s: string): void => void process.stdout.write(s);
  usb
    .command('ls')
    .description('list USB devices: id, busid, VID:PID, device, state')
    .option('--json', 'JSON')
    .action(async (o) => {
      const ds = await c().request<UsbDeviceInfo[]>('GET', '/v1/usb/devices');
      if (o.json) return print(JSON.stringify(ds, null, 2) + '\n');
      print(
        table(
          ['ID', 'BUSID', 'VID:PID', 'DEVICE', 'STATE'],
          ds.map((d) => [d.id, d.busid, d.vidpid, `${d.kind}${d.name ? ` ${d.name}` : ''} ${d.image ?? d.socket ?? ''}${d.readOnly ? ' (ro)' : ''}`, d.machine ? `attached to ${d.machine}` : d.state]),
        ),
      );
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
    .argument('<device>', 'id, busid or name (tender usb ls)')
    .option('--json', 'JSON')
    .description('attach a device to a machine (kept across restarts)')
    .action(async (machine: string, device: string, o) => {
      const d = await c().request<UsbDeviceInfo>('POST', '/v1/usb/attach', { machine, device });
      print(o.json ? JSON.stringify(d, null, 2) + '\n' : `${d.id} attached to ${machine}${d.port !== null ? ` (port ${d.port})` : ''}\n`);
    });
  usb
    .command('detach')
    .argument('<machine>')
    .argument('<device>')
    .action(async (machine: string, device: string) => {
      await c().request('POST', '/v1/usb/detach', { machine, device });
      print(`${device}\n`);
    });
}
