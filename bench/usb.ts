/**
 * USB/IP benchmark (not a test): URB round trips per second and bulk MB/s through tender's
 * USB/IP server (usb/server.ts) with the virtual mass-storage device, over loopback TCP.
 *
 * The client is a minimal USB/IP client written here on usb/protocol.ts's encoders, doing what
 * the kernel's vhci-hcd does on the wire: OP_REQ_IMPORT, SET_CONFIGURATION, then CMD_SUBMITs.
 * Workloads:
 *  - control: GET_DESCRIPTOR(device) on endpoint 0, answered by the server itself (no backend):
 *    the cost of one URB through the codec, the attached phase and the socket; 1 and 32 in flight.
 *  - READ(10) through Bulk-Only Transport: per command a 31-byte CBW on bulk OUT, the data IN
 *    (split into URBs of at most 16 KiB, as usb-storage's scatter-gather does), and the CSW IN,
 *    all submitted at once (3+ URBs in flight per command). BOT allows one command at a time per
 *    device, so the parallel rows use several devices, one connection each.
 *
 *   npm run build:ts && node dist/bench/usb.js [--seconds S] [--image-mib N]
 *
 * The image is a temporary file (page cache: this measures tender, not the disk). The server
 * runs in a child process (`--server`), so server and client each have a core of their own.
 */
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FileBackend } from '../usb/devices/scsi.js';
import { CBW_SIGNATURE, EP_IN, EP_OUT, StorageDevice } from '../usb/devices/storage.js';
import {
  NUMBER_OF_PACKETS_NON_ISO,
  OP_COMMON_LEN,
  DEVICE_RECORD_LEN,
  URB_HEADER_LEN,
  USBIP_DIR_IN,
  USBIP_DIR_OUT,
  USBIP_RET_SUBMIT,
  UrbHeader,
  emitCmdSubmit,
  emitReqImport,
} from '../usb/protocol.js';
import { ByteQueue } from '../usb/reader.js';
import { UsbIpServer } from '../usb/server.js';

const NO_SETUP = new Uint8Array(8);

interface Reply {
  status: number;
  data: Uint8Array;
}

/** One imported device: submit URBs, get replies by seqnum. */
class Client {
  private seq = 1;
  private readonly q = new ByteQueue();
  private readonly pending = new Map<number, { dirIn: boolean; resolve: (r: Reply) => void }>();
  private importWaiter: ((b: Uint8Array) => void) | null = null;

  private constructor(
    private readonly sock: net.Socket,
    readonly devid: number,
  ) {}

  static async import(port: number, busid: string, devid: number): Promise<Client> {
    const sock = net.connect(port, '127.0.0.1');
    sock.setNoDelay(true);
    await new Promise((r, j) => sock.once('connect', r).once('error', j));
    const c = new Client(sock, devid);
    sock.on('data', (b: Buffer) => c.onData(b));
    const rep = await new Promise<Uint8Array>((resolve) => {
      c.importWaiter = resolve;
      sock.write(emitReqImport(busid));
    });
    const status = new DataView(rep.buffer, rep.byteOffset).getUint32(4);
    if (status !== 0) throw new Error(`import ${busid}: status ${status}`);
    // SET_CONFIGURATION(1), as the hub driver does after enumeration.
    const r = await c.submit(0, false, 0, Uint8Array.of(0x00, 0x09, 1, 0, 0, 0, 0, 0));
    if (r.status !== 0) throw new Error(`SET_CONFIGURATION: ${r.status}`);
    return c;
  }

  private onData(b: Buffer): void {
    this.q.push(b);
    if (this.importWaiter) {
      const n = OP_COMMON_LEN + DEVICE_RECORD_LEN;
      if (this.q.length < n) return;
      const w = this.importWaiter;
      this.importWaiter = null;
      w(this.q.take(n).slice());
    }
    while (this.q.length >= URB_HEADER_LEN) {
      const h = new UrbHeader(this.q.peek(URB_HEADER_LEN));
      if (h.command !== USBIP_RET_SUBMIT) throw new Error(`unexpected command ${h.command}`);
      const p = this.pending.get(h.seqnum);
      if (!p) throw new Error(`reply for unknown seqnum ${h.seqnum}`);
      const dataLen = p.dirIn ? h.actualLength : 0;
      if (this.q.length < URB_HEADER_LEN + dataLen) return;
      const status = h.status;
      this.q.skip(URB_HEADER_LEN);
      const data = dataLen ? this.q.take(dataLen) : NO_SETUP.subarray(0, 0);
      this.pending.delete(h.seqnum);
      p.resolve({ status, data });
    }
  }

  /** Submit one URB; resolves with its RET_SUBMIT. `out` is OUT data, or the IN length as a number. */
  submit(ep: number, dirIn: boolean, length: number, setup: Uint8Array = NO_SETUP, out?: Uint8Array): Promise<Reply> {
    const seqnum = this.seq++;
    const b = new Uint8Array(URB_HEADER_LEN + (out?.length ?? 0));
    emitCmdSubmit(
      {
        seqnum,
        devid: this.devid,
        direction: dirIn ? USBIP_DIR_IN : USBIP_DIR_OUT,
        ep,
        transferFlags: dirIn ? 0x200 : 0,
        transferBufferLength: out ? out.length : length,
        startFrame: 0,
        numberOfPackets: ep === 0 ? 0 : NUMBER_OF_PACKETS_NON_ISO,
        interval: 0,
        setup,
      },
      b,
    );
    if (out) b.set(out, URB_HEADER_LEN);
    return new Promise((resolve) => {
      this.pending.set(seqnum, { dirIn, resolve });
      this.sock.write(b);
    });
  }

  close(): void {
    this.sock.destroy();
  }
}

function readCbw(tag: number, lba: number, blocks: number): Uint8Array {
  const b = new Uint8Array(31);
  const v = new DataView(b.buffer);
  v.setUint32(0, CBW_SIGNATURE, true);
  v.setUint32(4, tag, true);
  v.setUint32(8, blocks * 512, true);
  b[12] = 0x80;
  b[14] = 10;
  b[15] = 0x28; // READ(10)
  v.setUint32(17, lba); // big-endian LBA
  v.setUint16(22, blocks); // big-endian transfer length
  return b;
}

const GET_DEVICE_DESCRIPTOR = Uint8Array.of(0x80, 0x06, 0x00, 0x01, 0, 0, 18, 0);

async function controlLoop(c: Client, inflight: number, until: number): Promise<number> {
  let n = 0;
  const worker = async () => {
    while (performance.now() < until) {
      const r = await c.submit(0, true, 18, GET_DEVICE_DESCRIPTOR);
      if (r.status !== 0 || r.data.length !== 18) throw new Error(`GET_DESCRIPTOR: ${r.status}`);
      n++;
    }
  };
  await Promise.all(Array.from({ length: inflight }, worker));
  return n;
}

const URB_MAX = 16 * 1024;

/** READ(10) commands of `bytes` each, back to back, on one device. Returns [commands, urbs]. */
async function readLoop(c: Client, bytes: number, blocks: number, until: number): Promise<[number, number]> {
  let cmds = 0;
  let urbs = 0;
  let tag = 1;
  const per = bytes / 512;
  let lba = 0;
  while (performance.now() < until) {
    if (lba + per > blocks) lba = 0;
    const ps: Promise<Reply>[] = [c.submit(EP_OUT & 0x0f, false, 0, NO_SETUP, readCbw(tag, lba, per))];
    for (let off = 0; off < bytes; off += URB_MAX) ps.push(c.submit(EP_IN & 0x0f, true, Math.min(URB_MAX, bytes - off)));
    ps.push(c.submit(EP_IN & 0x0f, true, 13));
    const rs = await Promise.all(ps);
    const csw = rs[rs.length - 1]!.data;
    if (csw.length !== 13 || csw[12] !== 0) throw new Error(`READ(10) failed: CSW ${Buffer.from(csw).toString('hex')}`);
    const got = rs.slice(1, -1).reduce((s, r) => s + r.data.length, 0);
    if (got !== bytes) throw new Error(`READ(10) returned ${got} of ${bytes} bytes`);
    cmds++;
    urbs += rs.length;
    tag++;
    lba += per;
  }
  return [cmds, urbs];
}

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
}

const DEVICES = 4;

/** The server process: DEVICES virtual disks on one image, port sent to the parent. */
async function serve(imageMiB: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'tender-bench-usb-'));
  const server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => console.error(m, o) } });
  const backends: FileBackend[] = [];
  const img = join(dir, 'disk.img');
  const data = Buffer.alloc(imageMiB * 1024 * 1024);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  writeFileSync(img, data);
  for (let i = 1; i <= DEVICES; i++) {
    const be = await FileBackend.open(img, true);
    backends.push(be);
    server.add(new StorageDevice(be, { busid: `99-${i}`, busnum: 99, devnum: i }));
  }
  const { port } = await server.listen(0, '127.0.0.1');
  process.send!({ port });
  process.once('disconnect', () => {
    void (async () => {
      await server.close();
      for (const be of backends) await be.close();
      rmSync(dir, { recursive: true, force: true });
      process.exit(0);
    })();
  });
}

async function main(): Promise<void> {
  const seconds = arg('--seconds', 3);
  const imageMiB = arg('--image-mib', 64);
  const child = fork(fileURLToPath(import.meta.url), ['--server', '--image-mib', String(imageMiB)], { stdio: 'inherit' });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      child.once('message', (m: { port: number }) => resolve(m.port));
      child.once('exit', (code) => reject(new Error(`server exited (${code})`)));
    });
    const clients = await Promise.all(Array.from({ length: DEVICES }, (_, i) => Client.import(port, `99-${i + 1}`, (99 << 16) | (i + 1))));
    const blocks = (imageMiB * 1024 * 1024) / 512;
    const rows: string[][] = [];
    const ms = seconds * 1000;

    for (const inflight of [1, 32]) {
      await controlLoop(clients[0]!, inflight, performance.now() + 300); // warm-up
      const t0 = performance.now();
      const n = await controlLoop(clients[0]!, inflight, t0 + ms);
      const dt = (performance.now() - t0) / 1000;
      rows.push([`control GET_DESCRIPTOR, ${inflight} in flight`, `${Math.round(n / dt)}`, '', '']);
    }
    for (const [bytes, devs] of [[4096, 1], [4096, DEVICES], [65536, 1], [65536, DEVICES], [1 << 20, 1]] as const) {
      const use = clients.slice(0, devs);
      await Promise.all(use.map((c) => readLoop(c, bytes, blocks, performance.now() + 300)));
      const t0 = performance.now();
      const rs = await Promise.all(use.map((c) => readLoop(c, bytes, blocks, t0 + ms)));
      const dt = (performance.now() - t0) / 1000;
      const cmds = rs.reduce((s, r) => s + r[0], 0);
      const urbs = rs.reduce((s, r) => s + r[1], 0);
      rows.push([
        `READ(10) ${bytes >= 1 << 20 ? `${bytes >> 20} MiB` : `${bytes >> 10} KiB`}, ${devs} device${devs > 1 ? 's' : ''}`,
        `${Math.round(urbs / dt)}`,
        `${Math.round(cmds / dt)}`,
        ((cmds * bytes) / dt / 1e6).toFixed(1),
      ]);
    }
    for (const c of clients) c.close();

    const head = ['workload', 'URBs/s', 'commands/s', 'MB/s'];
    const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    const line = (r: string[]) => '| ' + r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join(' | ') + ' |';
    console.log(`USB/IP over loopback TCP, server and client in separate processes, virtual storage (${imageMiB} MiB image in page cache), ${seconds} s per row, node ${process.version}`);
    console.log(line(head));
    console.log('|' + w.map((n, i) => (i === 0 ? '-'.repeat(n + 2) : '-'.repeat(n + 1) + ':')).join('|') + '|');
    for (const r of rows) console.log(line(r));
  } finally {
    child.disconnect();
  }
}

if (process.argv.includes('--server')) await serve(arg('--image-mib', 64));
else await main();
