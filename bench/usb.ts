/**
 * USB/IP benchmark (not a test): URB round trips per second and bulk MB/s through tender's
 * USB/IP server (usb/server.ts) with the virtual mass-storage device, over loopback TCP.
 *
 * The client is a minimal USB/IP client written here on usb/protocol.ts's encoders, doing what
 * the kernel's vhci-hcd does on the wire: OP_REQ_IMPORT, SET_CONFIGURATION, then CMD_SUBMITs.
 * Workloads:
 *  - control: GET_DESCRIPTOR(device) on endpoint 0, answered by the server itself (no backend):
 *    the cost of one URB through the codec, the attached phase and the socket; 1 and 32 in flight.
 *  - READ(10) through Bulk-Only Transport, pipelined: per command a 31-byte CBW on bulk OUT,
 *    the data IN (split into URBs of at most 16 KiB), and the CSW IN, all submitted at once
 *    (3+ URBs in flight per command). BOT allows one command at a time per device, so the
 *    parallel rows use several devices, one connection each.
 *  - READ(10) / WRITE(10), one phase at a time: CBW, then the data as one URB, then the CSW,
 *    each submitted when the previous one completed. That is what the kernel's usb-storage does
 *    on vhci-hcd (it waits for each phase; vhci takes scatter-gather, so the data is one URB),
 *    and what bench/usb-machine.ts measures through a guest: these rows are its loopback peers.
 *
 *   npm run build:ts && node dist/bench/usb.js [--seconds S] [--image-mib N]
 *
 * The image is a temporary file (page cache: this measures tender, not the disk). The server
 * runs in a child process (`--server`), so server and client each have a core of their own;
 * the server's CPU time per URB is read from /proc around every row (bench/proc.ts cpuNs).
 */
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
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
import { cpuNs } from './proc.js';

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

function readCbw(tag: number, lba: number, blocks: number, write = false): Uint8Array {
  const b = new Uint8Array(31);
  const v = new DataView(b.buffer);
  v.setUint32(0, CBW_SIGNATURE, true);
  v.setUint32(4, tag, true);
  v.setUint32(8, blocks * 512, true);
  b[12] = write ? 0x00 : 0x80;
  b[14] = 10;
  b[15] = write ? 0x2a : 0x28; // WRITE(10) : READ(10)
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

/**
 * READ(10) or WRITE(10) commands of `bytes` each, one phase at a time as usb-storage does:
 * CBW, wait, the data as one URB, wait, CSW, wait. Returns [commands, urbs].
 */
async function phasedLoop(c: Client, write: boolean, bytes: number, blocks: number, until: number): Promise<[number, number]> {
  let cmds = 0;
  let tag = 1;
  const per = bytes / 512;
  const out = new Uint8Array(bytes).fill(0xa5);
  let lba = 0;
  while (performance.now() < until) {
    if (lba + per > blocks) lba = 0;
    const cbw = await c.submit(EP_OUT & 0x0f, false, 0, NO_SETUP, readCbw(tag, lba, per, write));
    if (cbw.status !== 0) throw new Error(`CBW: ${cbw.status}`);
    const data = write ? await c.submit(EP_OUT & 0x0f, false, 0, NO_SETUP, out) : await c.submit(EP_IN & 0x0f, true, bytes);
    if (data.status !== 0 || (!write && data.data.length !== bytes)) throw new Error(`data phase: status ${data.status}, ${data.data.length} bytes`);
    const csw = (await c.submit(EP_IN & 0x0f, true, 13)).data;
    if (csw.length !== 13 || csw[12] !== 0) throw new Error(`${write ? 'WRITE' : 'READ'}(10) failed: CSW ${Buffer.from(csw).toString('hex')}`);
    cmds++;
    tag++;
    lba += per;
  }
  return [cmds, cmds * 3];
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
    // Read-write for the WRITE(10) row (it writes a pattern over the temporary image).
    const be = await FileBackend.open(img, false);
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

const size = (bytes: number) => (bytes >= 1 << 20 ? `${bytes >> 20} MiB` : bytes >= 1024 ? `${bytes >> 10} KiB` : `${bytes} B`);

export interface UsbBenchRow {
  workload: string;
  urbsPerS: number;
  commandsPerS: number | null;
  mbPerS: number | null;
  /** CPU time of the server process (all its threads) per URB, µs. */
  serverCpuUsPerUrb: number | null;
}

export interface LoopbackResult {
  title: string;
  rows: UsbBenchRow[];
}

/** The loopback bench: a server child process, clients here; one row per workload. */
export async function loopbackBench(o: { seconds: number; imageMiB: number; log?: (s: string) => void }): Promise<LoopbackResult> {
  const { seconds, imageMiB } = o;
  const child = fork(fileURLToPath(import.meta.url), ['--server', '--image-mib', String(imageMiB)], { stdio: 'inherit' });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      child.once('message', (m: { port: number }) => resolve(m.port));
      child.once('exit', (code) => reject(new Error(`server exited (${code})`)));
    });
    const clients = await Promise.all(Array.from({ length: DEVICES }, (_, i) => Client.import(port, `99-${i + 1}`, (99 << 16) | (i + 1))));
    const blocks = (imageMiB * 1024 * 1024) / 512;
    const rows: UsbBenchRow[] = [];
    const ms = seconds * 1000;
    /** Warm up for 300 ms, then time `f` for `seconds`, with the server's CPU time around it. */
    const timed = async (f: (until: number) => Promise<[number, number]>) => {
      await f(performance.now() + 300);
      const c0 = cpuNs(child.pid!);
      const t0 = performance.now();
      const [cmds, urbs] = await f(t0 + ms);
      const dt = (performance.now() - t0) / 1000;
      const c1 = cpuNs(child.pid!);
      return { cmds, urbs, dt, cpuUs: c0 !== null && c1 !== null && urbs ? (c1 - c0) / 1000 / urbs : null };
    };

    for (const inflight of [1, 32]) {
      const r = await timed(async (until) => {
        const n = await controlLoop(clients[0]!, inflight, until);
        return [n, n];
      });
      rows.push({ workload: `control GET_DESCRIPTOR, ${inflight} in flight`, urbsPerS: r.urbs / r.dt, commandsPerS: null, mbPerS: null, serverCpuUsPerUrb: r.cpuUs });
      o.log?.(`loopback: ${rows.at(-1)!.workload}`);
    }
    for (const [bytes, devs] of [[4096, 1], [4096, DEVICES], [65536, 1], [65536, DEVICES], [1 << 20, 1]] as const) {
      const use = clients.slice(0, devs);
      const r = await timed(async (until) => {
        const rs = await Promise.all(use.map((c) => readLoop(c, bytes, blocks, until)));
        return [rs.reduce((s, x) => s + x[0], 0), rs.reduce((s, x) => s + x[1], 0)];
      });
      rows.push({
        workload: `READ(10) ${size(bytes)} pipelined, ${devs} device${devs > 1 ? 's' : ''}`,
        urbsPerS: r.urbs / r.dt,
        commandsPerS: r.cmds / r.dt,
        mbPerS: (r.cmds * bytes) / r.dt / 1e6,
        serverCpuUsPerUrb: r.cpuUs,
      });
      o.log?.(`loopback: ${rows.at(-1)!.workload}`);
    }
    // The peers of the machine rows: usb-storage's sizes (512 B reads; 120 KiB = its 240-sector
    // maximum per command at high speed), one phase at a time.
    for (const [write, bytes] of [[false, 512], [false, 4096], [false, 120 * 1024], [true, 120 * 1024]] as const) {
      const r = await timed((until) => phasedLoop(clients[0]!, write, bytes, blocks, until));
      rows.push({
        workload: `${write ? 'WRITE' : 'READ'}(10) ${size(bytes)}, one phase at a time`,
        urbsPerS: r.urbs / r.dt,
        commandsPerS: r.cmds / r.dt,
        mbPerS: (r.cmds * bytes) / r.dt / 1e6,
        serverCpuUsPerUrb: r.cpuUs,
      });
      o.log?.(`loopback: ${rows.at(-1)!.workload}`);
    }
    for (const c of clients) c.close();
    return {
      title: `USB/IP over loopback TCP, server and client in separate processes, virtual storage (${imageMiB} MiB image in page cache), ${seconds} s per row, node ${process.version}`,
      rows,
    };
  } finally {
    child.disconnect();
  }
}

/** A markdown table: the first `left` columns left-aligned (labels), the others right-aligned (numbers). */
export function markdownTable(head: string[], rows: string[][], left = 1): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => '| ' + r.map((c, i) => (i < left ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join(' | ') + ' |';
  return [line(head), '|' + w.map((n, i) => (i < left ? '-'.repeat(n + 2) : '-'.repeat(n + 1) + ':')).join('|') + '|', ...rows.map(line)].join('\n');
}

/** Rounded for reading: 3 significant digits, thin groups of thousands. */
export function fmt(n: number | null, digits = 3): string {
  if (n === null || !Number.isFinite(n)) return '';
  const r = Number(n.toPrecision(digits));
  return r >= 1000 ? Math.round(r).toLocaleString('en-US').replace(/,/g, ' ') : String(r);
}

async function main(): Promise<void> {
  const r = await loopbackBench({ seconds: arg('--seconds', 3), imageMiB: arg('--image-mib', 64) });
  console.log(r.title);
  console.log(
    markdownTable(
      ['workload', 'URBs/s', 'commands/s', 'MB/s', 'server CPU µs/URB'],
      r.rows.map((x) => [x.workload, fmt(x.urbsPerS), fmt(x.commandsPerS), fmt(x.mbPerS), fmt(x.serverCpuUsPerUrb, 2)]),
    ),
  );
}

// Run only as a program (`node dist/bench/usb.js`, or forked as the server); bench/usb-machine.ts imports it.
const isMain = process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href;
if (isMain && process.argv.includes('--server')) await serve(arg('--image-mib', 64));
else if (isMain) await main();
