/**
 * vsock against TCP through the userspace network (issue 6), in one run, from the same guest
 * to the same host peer (not a test):
 *
 *   npm run build:ts && make -C native/agent && node dist/bench/vsock.js [--repeat N] [--mib N] [--rr N] [--write]
 *
 * A daemon with a temporary $TENDER_HOME boots one machine from the default image (the test
 * image cache, /var/tmp/tender-test-image, or $TENDER_BENCH_IMAGE_HOME) with its agent on
 * vsock through tender's vhost-user backend (or the host's vhost-vsock when there is one).
 * `tender-vsperf` (native/agent/vsperf.c) is copied into the guest through exec's stdin and
 * run there against one host peer, this process, listening twice with the same handlers:
 *  - vsock: the guest's `connect(CID 2, port P)` arrives at `<machine dir>/vsock_P` (the
 *    Firecracker-style host side of the backend);
 *  - TCP: the guest connects to 192.168.127.254:P, the host alias, which tender's NAT turns
 *    into a connection to 127.0.0.1:P.
 * Workloads, timed here on the host (the guest's clock under TCG is no reference):
 *  - upload: the guest writes N MiB; from the first byte to EOF on the host;
 *  - download: the host writes N MiB, the guest answers one byte once it has them all; from
 *    the first write to that byte;
 *  - 1-byte round trip: the guest writes a byte, the host echoes it, K times; the median of
 *    the intervals between consecutive arrivals on the host.
 * Every cell is the median of --repeat runs, transports alternating. --write puts the table
 * between the `vsock:begin`/`vsock:end` markers of docs/benchmarks.md.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildDefaultImage } from '../src/image/default-image.js';
import { repoRoot } from './stacks.js';
import { CLI, stopDaemon, tender } from './cli.js';

const HOST_ALIAS = '192.168.127.254';
const PORTS = { up: 5201, down: 5202, rr: 5203 } as const;
type Workload = keyof typeof PORTS;

const { values: opt } = parseArgs({
  options: {
    repeat: { type: 'string', default: '3' },
    mib: { type: 'string', default: '64' },
    rr: { type: 'string', default: '2000' },
    write: { type: 'boolean', default: false },
  },
});
const REPEAT = Number(opt.repeat);
const MIB = Number(opt.mib);
const RR = Number(opt.rr);
const log = (s: string) => process.stderr.write(`${s}\n`);

const root = repoRoot();
const cli = CLI;
const vsperf = join(root, 'build/agent/tender-vsperf');

/** One measurement's outcome, reported by the host-side handler when its connection ends. */
type Waiter = (value: number) => void;
const waiting: Partial<Record<Workload, Waiter>> = {};

/** The host peer: one handler per workload, served on vsock's unix sockets and on TCP alike. */
function handle(w: Workload, sock: net.Socket): void {
  sock.setNoDelay(true);
  const done = (v: number) => {
    const f = waiting[w];
    delete waiting[w];
    f?.(v);
  };
  if (w === 'up') {
    let bytes = 0;
    let t0 = 0;
    sock.on('data', (d: Buffer) => {
      if (!bytes) t0 = performance.now();
      bytes += d.length;
    });
    sock.on('end', () => {
      done((bytes * 8) / ((performance.now() - t0) / 1000) / 1e9);
      sock.end();
    });
  } else if (w === 'down') {
    const chunk = Buffer.alloc(256 * 1024);
    let left = MIB * 1024 * 1024;
    const t0 = performance.now();
    const pump = () => {
      while (left > 0) {
        const n = Math.min(left, chunk.length);
        left -= n;
        if (!sock.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return void sock.once('drain', pump);
      }
    };
    sock.once('data', () => {
      done((MIB * 1024 * 1024 * 8) / ((performance.now() - t0) / 1000) / 1e9);
      sock.end();
    });
    pump();
  } else {
    const at: number[] = [];
    sock.on('data', (d: Buffer) => {
      const now = performance.now();
      for (let i = 0; i < d.length; i++) at.push(now);
      sock.write(d);
    });
    sock.on('end', () => {
      const gaps = at.slice(1).map((t, i) => t - at[i]!).sort((a, b) => a - b);
      done(gaps.length ? gaps[Math.floor(gaps.length / 2)]! * 1000 : NaN);
      sock.end();
    });
  }
  sock.on('error', () => {});
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  if (!existsSync(cli)) throw new Error('run npm run build:ts first');
  if (!existsSync(vsperf)) throw new Error('run make -C native/agent first (build/agent/tender-vsperf)');
  const home = mkdtempSync(join(os.tmpdir(), 'tender-bench-vsock-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  let daemon: ChildProcess | null = null;
  const servers: net.Server[] = [];
  try {
    const img = await buildDefaultImage({ home: process.env.TENDER_BENCH_IMAGE_HOME || '/var/tmp/tender-test-image' });
    await new Promise<void>((r, j) => spawn('cp', ['-a', img.dir, join(home, 'images-default')]).on('close', (c) => (c === 0 ? r() : j(new Error('cp')))));
    await new Promise<void>((r, j) => spawn('sh', ['-c', `mkdir -p ${home}/images && mv ${home}/images-default ${home}/images/default`]).on('close', (c) => (c === 0 ? r() : j(new Error('mv')))));
    daemon = spawn(process.execPath, [cli, 'daemon', '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
    for (let i = 0; i < 150 && !existsSync(join(home, 'tender.sock')); i++) await new Promise((r) => setTimeout(r, 100));
    log('booting the machine');
    const m = JSON.parse(await tender(env, ['machine', 'create', 'bench', '--memory', '512', '--start', '--json']));
    if (!/\(vsock via/.test(m.agent)) throw new Error(`the machine's agent is not on vsock: ${m.agent}`);
    const dir = join(home, 'machines', 'bench');
    await tender(env, ['machine', 'exec', 'bench', '--', 'sh', '-c', 'cat > /tmp/vsperf && chmod +x /tmp/vsperf'], { stdin: readFileSync(vsperf) });

    const tcpPort: Record<Workload, number> = { up: 0, down: 0, rr: 0 };
    for (const w of Object.keys(PORTS) as Workload[]) {
      const u = net.createServer((s) => handle(w, s));
      await new Promise<void>((r) => u.listen(join(dir, `vsock_${PORTS[w]}`), r));
      const t = net.createServer((s) => handle(w, s));
      await new Promise<void>((r) => t.listen(0, '127.0.0.1', r));
      tcpPort[w] = (t.address() as net.AddressInfo).port;
      servers.push(u, t);
    }
    const target = (tr: 'vsock' | 'tcp', w: Workload) => (tr === 'vsock' ? `vsock:${PORTS[w]}` : `${HOST_ALIAS}:${tcpPort[w]}`);
    const once = async (tr: 'vsock' | 'tcp', w: Workload): Promise<number> => {
      const result = new Promise<number>((r) => (waiting[w] = r));
      const arg = w === 'rr' ? ['rr', String(RR)] : [w, String(MIB * 1024 * 1024)];
      await tender(env, ['machine', 'exec', 'bench', '--', '/tmp/vsperf', target(tr, w), ...arg]);
      return result;
    };
    const cells: Record<string, number[]> = {};
    for (let i = 0; i < REPEAT; i++) {
      for (const w of ['up', 'down', 'rr'] as Workload[]) {
        for (const tr of i % 2 ? (['tcp', 'vsock'] as const) : (['vsock', 'tcp'] as const)) {
          const v = await once(tr, w);
          (cells[`${tr} ${w}`] ??= []).push(v);
          log(`${i + 1}/${REPEAT} ${tr} ${w}: ${w === 'rr' ? `${v.toFixed(0)} µs` : `${v.toFixed(2)} Gbit/s`}`);
        }
      }
    }
    const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
    const via = /host's vhost-vsock/.test(m.agent) ? "the host's vhost-vsock" : "tender's vhost-user backend";
    const g = (k: string) => median(cells[k]!);
    const table = [
      `Measured ${new Date().toISOString().slice(0, 10)} on ${os.cpus().length} × ${cpu}, Linux ${os.release()}, node ${process.version}; guest: the default image, 1 vCPU, 512 MiB, ${m.accel ?? '?'}; vsock through ${via}. Median of ${REPEAT} runs; ${MIB} MiB per transfer, ${RR} round trips.`,
      '',
      '| transport | upload (guest → host) | download (host → guest) | 1-byte round trip (median) |',
      '|---|---:|---:|---:|',
      `| vsock (${via === "the host's vhost-vsock" ? 'vhost-vsock' : 'vhost-user backend'}) | ${g('vsock up').toFixed(2)} Gbit/s | ${g('vsock down').toFixed(2)} Gbit/s | ${g('vsock rr').toFixed(0)} µs |`,
      `| TCP through the userspace network | ${g('tcp up').toFixed(2)} Gbit/s | ${g('tcp down').toFixed(2)} Gbit/s | ${g('tcp rr').toFixed(0)} µs |`,
    ].join('\n');
    console.log(table);
    writeFileSync(join(root, 'bench/results/vsock.json'), JSON.stringify({ date: new Date().toISOString(), cpu, via, accel: m.accel, mib: MIB, rr: RR, cells }, null, 2) + '\n');
    if (opt.write) {
      const doc = join(root, 'docs/benchmarks.md');
      const text = readFileSync(doc, 'utf8');
      const re = /(<!-- vsock:begin -->\n)[\s\S]*?(\n<!-- vsock:end -->)/;
      if (!re.test(text)) throw new Error('docs/benchmarks.md has no vsock:begin/vsock:end markers');
      writeFileSync(doc, text.replace(re, (_, a: string, b: string) => `${a}${table}${b}`));
      log('docs/benchmarks.md updated');
    }
  } finally {
    for (const s of servers) s.close();
    await tender(env, ['machine', 'rm', '--force', 'bench']).catch(() => {});
    await stopDaemon(daemon);
    rmSync(home, { recursive: true, force: true });
  }
}

await main();
