/**
 * USB/IP through a machine (issue 5's benchmark, not a test): the guest kernel's own client
 * (vhci-hcd + usb-storage) reading and writing a virtual disk served by the daemon, over each
 * machine transport there is, with the loopback rows of bench/usb.ts in the same run.
 *
 *   npm run build:ts && node dist/bench/usb-machine.js [--image-mib 128] [--small 2000]
 *       [--repeat 3] [--transports tcp,vsock] [--seconds 3] [--no-loopback]
 *
 * A daemon in a throwaway $TENDER_HOME (the default image copied from the test cache,
 * /var/tmp/tender-test-image, or $TENDER_BENCH_IMAGE_HOME) gets one virtual storage device on
 * a temporary image (written just before: host page cache, so this measures transport and
 * server, not a disk). Then, one machine at a time (1 vCPU, 512 MiB):
 *  - tcp: a machine with its agent on virtio-serial; the agent imports from the gateway
 *    (192.168.127.1:3240) through tender's userspace TCP stack;
 *  - vsock: a machine with its agent on vsock (the host's vhost-vsock, else tender's
 *    vhost-user backend); the agent imports from CID 2 port 3240 (src/daemon/usb-vsock.ts).
 * The transport a row ran on is not assumed from the machine's settings: after `usb attach`
 * the guest's /proc/net/tcp is checked for a connection to port 3240 (TCP) and the machine
 * directory for `vsock_3240` (vsock), and `usb ls --json` is read for a `transport` field.
 *
 * Workloads in the guest through `machine exec`, with O_DIRECT so that nothing is cached in the
 * guest and every read or write goes to the device as SCSI commands through usb-storage (one at
 * a time per device; at most 120 KiB each at high speed, so a 1 MiB dd block is 9 commands):
 *  - bulk read:  dd if=/dev/sdX of=/dev/null bs=1M iflag=direct (the whole image);
 *  - bulk write: dd if=/dev/zero of=/dev/sdX bs=1M oflag=direct (the whole image);
 *  - small reads: N synchronous O_DIRECT reads of 512 B (and 4 KiB), one after the other: URB
 *    round trips. Not busybox dd: it reads into a malloc'd buffer, and usb-storage wants 512-byte
 *    aligned buffers for O_DIRECT (its queue's dma alignment), so `dd bs=512 iflag=direct` gets
 *    EINVAL and busybox quietly drops O_DIRECT (page cache and readahead: a handful of large
 *    reads). A 20-line C program (DIOREAD_C below, built here with musl-gcc or gcc -static,
 *    copied into the guest through exec's stdin) does aligned preads instead.
 * Commands are counted by the guest's block layer (/sys/block/sdX/stat, I/Os completed); each
 * Bulk-Only command is 3 URBs (CBW, data, CSW: vhci-hcd takes scatter-gather, so the data
 * phase is one URB however long). Time is measured on the host, between two marker lines the
 * guest prints around the workload (the guest's clock under TCG is no reference), and so is CPU time
 * (bench/proc.ts cpuNs) of the daemon, the vhost-user vsock backend when there is one, and
 * QEMU (whose share shows whether the guest's emulated CPU was the limit). The daemon's idle
 * CPU rate, measured first with the machine up, is subtracted from its numbers.
 *
 * Prints markdown tables and writes bench/results/usb-machine.json.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildDefaultImage } from '../src/image/default-image.js';
import { findVhostVsock } from '../src/vmm/vhost-vsock.js';
import { cpuNs } from './proc.js';
import { repoRoot } from './stacks.js';
import { fmt, loopbackBench, markdownTable, type LoopbackResult } from './usb.js';
import { CLI, stopDaemon, tender } from './cli.js';

const { values: opt } = parseArgs({
  options: {
    'image-mib': { type: 'string', default: '128' },
    small: { type: 'string', default: '2000' },
    repeat: { type: 'string', default: '3' },
    transports: { type: 'string', default: 'tcp,vsock' },
    seconds: { type: 'string', default: '3' },
    'no-loopback': { type: 'boolean', default: false },
  },
});
const IMAGE_MIB = Number(opt['image-mib']);
const SMALL = Number(opt.small);
const REPEAT = Number(opt.repeat);
const TRANSPORTS = opt.transports!.split(',').filter((t): t is Transport => t === 'tcp' || t === 'vsock');
const log = (s: string) => process.stderr.write(`[usb-machine] ${s}\n`);

type Transport = 'tcp' | 'vsock';
const root = repoRoot();
const cli = CLI;

interface Workload {
  name: string;
  /** The guest command; `dev` is the guest's disk (/dev/sdX). */
  cmd: (dev: string) => string;
  bytes: number;
}

const WORKLOADS: Workload[] = [
  { name: 'bulk read, dd bs=1M iflag=direct', cmd: (d) => `dd if=${d} of=/dev/null bs=1M count=${IMAGE_MIB} iflag=direct`, bytes: IMAGE_MIB << 20 },
  { name: 'bulk write, dd bs=1M oflag=direct', cmd: (d) => `dd if=/dev/zero of=${d} bs=1M count=${IMAGE_MIB} oflag=direct`, bytes: IMAGE_MIB << 20 },
  { name: 'sync reads of 512 B, O_DIRECT', cmd: (d) => `/tmp/dioread ${d} 512 ${SMALL}`, bytes: SMALL * 512 },
  { name: 'sync reads of 4 KiB, O_DIRECT', cmd: (d) => `/tmp/dioread ${d} 4096 ${SMALL}`, bytes: SMALL * 4096 },
];

/** The guest side of the small-read rows: COUNT aligned O_DIRECT preads of BS bytes, in turn. */
const DIOREAD_C = `#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: dioread DEV BS COUNT\\n"); return 2; }
  size_t bs = strtoul(argv[2], 0, 10);
  long n = strtol(argv[3], 0, 10);
  int fd = open(argv[1], O_RDONLY | O_DIRECT);
  if (fd < 0) { perror(argv[1]); return 1; }
  void *buf;
  if (posix_memalign(&buf, 4096, bs)) return 1;
  for (long i = 0; i < n; i++)
    if (pread(fd, buf, bs, (off_t)i * (off_t)bs) != (ssize_t)bs) { perror("pread"); return 1; }
  return 0;
}
`;

/** Build DIOREAD_C as a static x86_64 binary (as native/agent does: musl-gcc, else gcc). */
async function buildDioread(dir: string): Promise<Buffer> {
  const src = join(dir, 'dioread.c');
  const bin = join(dir, 'dioread');
  writeFileSync(src, DIOREAD_C);
  const cc = ['musl-gcc', 'gcc'].find((c) => process.env.PATH?.split(':').some((p) => existsSync(join(p, c))));
  if (!cc) throw new Error('no C compiler (musl-gcc or gcc) for the guest helper');
  await new Promise<void>((r, j) =>
    spawn(cc, ['-O2', '-static', '-s', '-o', bin, src], { stdio: 'inherit' }).on('close', (c) => (c === 0 ? r() : j(new Error(`${cc} failed`)))),
  );
  return readFileSync(bin);
}

interface Sample {
  seconds: number;
  commands: number;
  bytes: number;
  /** CPU seconds over the run, idle subtracted for the daemon. */
  daemonCpu: number;
  backendCpu: number | null;
  qemuCpu: number | null;
}

interface MachineRow {
  workload: string;
  commandsPerS: number;
  urbsPerS: number;
  mbPerS: number;
  /** µs of daemon (+ vsock backend) CPU per URB, and ms per MiB moved. */
  hostCpuUsPerUrb: number;
  hostCpuMsPerMiB: number;
  /** The vhost-user vsock backend's part of the host CPU (null without one). */
  backendShare: number | null;
  /** QEMU's CPU time over wall time (1.0 = one host core busy emulating the guest). */
  qemuLoad: number | null;
  samples: Sample[];
}

interface TransportResult {
  asked: Transport;
  /** What the guest's connection really used. */
  measured: Transport | 'unknown' | null;
  /** Why there are no rows. */
  skipped: string | null;
  agent: string | null;
  accel: string | null;
  guestKernel: string | null;
  maxSectorsKb: number | null;
  daemonIdleCpuPerS: number | null;
  loadBefore: number[];
  loadAfter: number[];
  rows: MachineRow[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** The pid whose command line contains `needle` (a path in our own throwaway home), if any. */
function pidWithArg(needle: string): number | null {
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      if (readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').includes(needle)) return Number(d);
    } catch {
      /* gone meanwhile */
    }
  }
  return null;
}

/**
 * Run `script` in the guest; it prints MARK-S before and MARK-E after the timed part. The
 * times and CPU counters are taken here when each marker arrives.
 */
async function timedExec(
  env: NodeJS.ProcessEnv,
  machine: string,
  script: string,
  pids: { daemon: number; backend: number | null; qemu: number | null },
): Promise<{ out: string; seconds: number; cpu: { daemon: number; backend: number | null; qemu: number | null } }> {
  const p = spawn(process.execPath, [cli, 'machine', 'exec', machine, '--', 'sh', '-c', script], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const snap = () => ({ t: performance.now(), d: cpuNs(pids.daemon) ?? 0, b: pids.backend ? cpuNs(pids.backend) : null, q: pids.qemu ? cpuNs(pids.qemu) : null });
  let s: ReturnType<typeof snap> | null = null;
  let e: ReturnType<typeof snap> | null = null;
  p.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    if (!s && out.includes('MARK-S\n')) s = snap();
    if (!e && out.includes('MARK-E\n')) e = snap();
  });
  p.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const t = setTimeout(() => p.kill('SIGKILL'), 600_000);
  const code = await new Promise<number | null>((r) => p.on('close', r));
  clearTimeout(t);
  if (code !== 0 || !s || !e) throw new Error(`guest script failed (exit ${code}): ${err.trim()}\n${out}`);
  const a = s as ReturnType<typeof snap>;
  const b = e as ReturnType<typeof snap>;
  return {
    out,
    seconds: (b.t - a.t) / 1000,
    cpu: { daemon: (b.d - a.d) / 1e9, backend: a.b !== null && b.b !== null ? (b.b - a.b) / 1e9 : null, qemu: a.q !== null && b.q !== null ? (b.q - a.q) / 1e9 : null },
  };
}

/** /sys/block/X/stat: [read I/Os, read sectors, write I/Os, write sectors]. */
function blockStat(line: string): number[] {
  const f = line.trim().split(/\s+/).map(Number);
  return [f[0]!, f[2]!, f[4]!, f[6]!];
}

async function measureTransport(env: NodeJS.ProcessEnv, home: string, daemonPid: number, want: Transport, dioread: Buffer): Promise<TransportResult> {
  const res: TransportResult = {
    asked: want,
    measured: null,
    skipped: null,
    agent: null,
    accel: null,
    guestKernel: null,
    maxSectorsKb: null,
    daemonIdleCpuPerS: null,
    loadBefore: os.loadavg(),
    loadAfter: [],
    rows: [],
  };
  if (want === 'vsock' && !existsSync('/dev/vhost-vsock') && !findVhostVsock()) {
    res.skipped = 'no /dev/vhost-vsock and tender-vhost-vsock is not built (make -C native/vhost-vsock)';
    return res;
  }
  const name = `u-${want}`;
  log(`${want}: booting machine ${name}`);
  let m: { agent: string; accel?: string; pid?: number };
  try {
    m = JSON.parse(await tender(env, ['machine', 'create', name, '--memory', '512', '--agent', want === 'tcp' ? 'serial' : 'vsock', '--no-auto-forward', '--start', '--json']));
  } catch (err) {
    res.skipped = `the machine did not start: ${(err as Error).message.split('\n')[0]}`;
    return res;
  }
  try {
    res.agent = m.agent;
    res.accel = m.accel ?? null;
    if (want === 'vsock' && !/vsock/.test(m.agent)) {
      res.skipped = `the agent is not on vsock (${m.agent})`;
      return res;
    }
    const dir = join(home, 'machines', name);
    const qemu = m.pid ?? (Number(readFileSync(join(dir, 'qemu.pid'), 'utf8')) || null);
    const backend = want === 'vsock' ? pidWithArg(join(dir, 'vhost-user-vsock.sock')) : null;
    const pids = { daemon: daemonPid, backend, qemu };
    log(`${want}: pids: daemon ${daemonPid}, QEMU ${qemu}, vsock backend ${backend ?? 'none'}`);
    await tender(env, ['machine', 'exec', name, '--', 'sh', '-c', 'cat > /tmp/dioread && chmod +x /tmp/dioread'], { timeoutMs: 60_000, stdin: dioread });

    await tender(env, ['usb', 'attach', name, 'benchdisk']);
    const sectors = String(IMAGE_MIB * 2048);
    let dev = '';
    for (let i = 0; i < 300 && !dev; i++) {
      const o = await tender(env, ['machine', 'exec', name, '--', 'sh', '-c', `for b in /sys/block/sd*; do [ "$(cat $b/size 2>/dev/null)" = ${sectors} ] && basename $b; done; true`]);
      dev = o.trim().split('\n')[0] ?? '';
      if (!dev) await sleep(200);
    }
    if (!dev) throw new Error(`the guest shows no ${IMAGE_MIB} MiB disk after usb attach`);

    // Which transport the import really used.
    const tcp = (await tender(env, ['machine', 'exec', name, '--', 'cat', '/proc/net/tcp'])).split('\n').filter((l) => / [0-9A-F]{8}:0CA8 01 /.test(l)).length;
    const ls = JSON.parse(await tender(env, ['usb', 'ls', '--json'])) as { name: string | null; transport?: string }[];
    const said = ls.find((d) => d.name === 'benchdisk')?.transport;
    res.measured = said === 'tcp' || said === 'vsock' ? said : tcp > 0 ? 'tcp' : existsSync(join(dir, 'vsock_3240')) ? 'vsock' : 'unknown';
    log(`${want}: disk /dev/${dev}, USB/IP over ${res.measured}${said ? ` (usb ls says ${said})` : ''}, agent ${m.agent}`);
    const info = await tender(env, ['machine', 'exec', name, '--', 'sh', '-c', `uname -r; cat /sys/block/${dev}/queue/max_sectors_kb`]);
    const [kernel, maxKb] = info.trim().split('\n');
    res.guestKernel = kernel ?? null;
    res.maxSectorsKb = Number(maxKb) || null;

    // The daemon's CPU while the machine idles (timers, the agent): subtracted below.
    const c0 = cpuNs(daemonPid)!;
    const t0 = performance.now();
    await sleep(5000);
    res.daemonIdleCpuPerS = (cpuNs(daemonPid)! - c0) / 1e9 / ((performance.now() - t0) / 1000);

    const samples = new Map<string, Sample[]>();
    for (let rep = 0; rep < REPEAT; rep++) {
      for (const w of WORKLOADS) {
        const script = [
          `S=/sys/block/${dev}/stat`,
          'cat $S',
          'echo MARK-S',
          `${w.cmd(`/dev/${dev}`)} 2>/tmp/cmd.err || { cat /tmp/cmd.err >&2; exit 1; }`,
          'echo MARK-E',
          'cat $S',
        ].join('\n');
        const r = await timedExec(env, name, script, pids);
        const lines = r.out.split('\n');
        const before = blockStat(lines[0]!);
        const after = blockStat(lines[lines.indexOf('MARK-E') + 1]!);
        const commands = after[0]! - before[0]! + (after[2]! - before[2]!);
        const bytes = (after[1]! - before[1]! + (after[3]! - before[3]!)) * 512;
        // O_DIRECT quietly dropped (see above) would show here as fewer, larger commands.
        if (bytes !== w.bytes) log(`${want}: ${w.name}: WARNING: the block layer moved ${bytes} bytes in ${commands} commands, the workload asked for ${w.bytes}`);
        const s: Sample = {
          seconds: r.seconds,
          commands,
          bytes,
          daemonCpu: Math.max(0, r.cpu.daemon - res.daemonIdleCpuPerS * r.seconds),
          backendCpu: r.cpu.backend,
          qemuCpu: r.cpu.qemu,
        };
        (samples.get(w.name) ?? samples.set(w.name, []).get(w.name)!).push(s);
        log(`${want} ${rep + 1}/${REPEAT} ${w.name}: ${((bytes / r.seconds) / 1e6).toFixed(2)} MB/s, ${(commands / r.seconds).toFixed(0)} commands/s, ${commands} commands in ${r.seconds.toFixed(2)} s`);
      }
    }
    for (const w of WORKLOADS) {
      const ss = samples.get(w.name)!;
      // Each figure is the median over the runs on its own (CPU per unit varies far less than
      // throughput on a shared machine).
      const host = (x: Sample) => x.daemonCpu + (x.backendCpu ?? 0);
      const med = (f: (x: Sample) => number | null) => {
        const v = ss.map(f).filter((x): x is number => x !== null && Number.isFinite(x));
        return v.length ? median(v) : null;
      };
      res.rows.push({
        workload: w.name,
        commandsPerS: med((x) => x.commands / x.seconds)!,
        urbsPerS: med((x) => (x.commands * 3) / x.seconds)!,
        mbPerS: med((x) => x.bytes / x.seconds / 1e6)!,
        hostCpuUsPerUrb: med((x) => (host(x) * 1e6) / (x.commands * 3))!,
        hostCpuMsPerMiB: med((x) => (host(x) * 1e3) / (x.bytes / 1048576))!,
        backendShare: med((x) => (x.backendCpu !== null && host(x) > 0 ? x.backendCpu / host(x) : null)),
        qemuLoad: med((x) => (x.qemuCpu !== null ? x.qemuCpu / x.seconds : null)),
        samples: ss,
      });
    }
    await tender(env, ['usb', 'detach', name, 'benchdisk']).catch((err) => log(`detach: ${(err as Error).message}`));
  } catch (err) {
    res.skipped = `failed: ${(err as Error).message.split('\n')[0]}`;
    log(`${want}: ${(err as Error).stack ?? err}`);
  } finally {
    res.loadAfter = os.loadavg();
    await tender(env, ['machine', 'rm', '--force', name]).catch(() => {});
  }
  return res;
}

function render(lo: LoopbackResult | null, ts: TransportResult[], meta: { date: string; cpu: string }): string {
  const out: string[] = [];
  const load = (l: number[]) => l.map((x) => x.toFixed(2)).join(' ');
  out.push(`Run ${meta.date} on ${os.cpus().length} × ${meta.cpu}, Linux ${os.release()}, node ${process.version}.`);
  for (const t of ts) {
    if (t.skipped) {
      out.push(`- ${t.asked}: not measured: ${t.skipped}`);
      continue;
    }
    out.push(
      `- ${t.asked}: USB/IP over ${t.measured}; agent ${t.agent}; ${t.accel ?? '?'}; guest kernel ${t.guestKernel}, 1 vCPU, 512 MiB; usb-storage max_sectors_kb ${t.maxSectorsKb}; ` +
        `daemon idle ${((t.daemonIdleCpuPerS ?? 0) * 100).toFixed(1)}% of a core (subtracted); load average ${load(t.loadBefore)} before, ${load(t.loadAfter)} after.`,
    );
  }
  out.push('');
  const rows: string[][] = [];
  for (const t of ts) {
    if (t.skipped) {
      rows.push([`${t.asked === 'tcp' ? 'machine, TCP' : 'machine, vsock'}`, '(not measured)', '', '', '', '', '', '', '']);
      continue;
    }
    for (const r of t.rows) {
      rows.push([
        t.measured === 'vsock' ? 'machine, vsock' : t.measured === 'tcp' ? 'machine, TCP' : `machine, ${t.measured}`,
        r.workload,
        fmt(r.commandsPerS),
        fmt(r.urbsPerS),
        fmt(r.mbPerS),
        fmt(r.hostCpuUsPerUrb, 2),
        fmt(r.hostCpuMsPerMiB, 2),
        r.backendShare !== null ? `${Math.round(r.backendShare * 100)}%` : '',
        r.qemuLoad !== null ? r.qemuLoad.toFixed(2) : '',
      ]);
    }
  }
  if (lo) {
    for (const r of lo.rows) {
      if (!/one phase at a time/.test(r.workload) && !/control GET_DESCRIPTOR, 1 in/.test(r.workload)) continue;
      const cpu = r.serverCpuUsPerUrb;
      const perMiB = cpu !== null && r.mbPerS ? (cpu * r.urbsPerS) / 1e3 / ((r.mbPerS * 1e6) / 1048576) : null;
      rows.push(['loopback', r.workload, fmt(r.commandsPerS), fmt(r.urbsPerS), fmt(r.mbPerS), fmt(cpu, 2), fmt(perMiB, 2), '', '']);
    }
  }
  out.push(markdownTable(['transport', 'workload', 'commands/s', 'URBs/s', 'MB/s', 'host CPU µs/URB', 'host CPU ms/MiB', 'of which vsock backend', 'QEMU CPU'], rows, 2));
  if (lo) {
    out.push('', lo.title, '');
    out.push(
      markdownTable(
        ['workload', 'URBs/s', 'commands/s', 'MB/s', 'server CPU µs/URB'],
        lo.rows.map((x) => [x.workload, fmt(x.urbsPerS), fmt(x.commandsPerS), fmt(x.mbPerS), fmt(x.serverCpuUsPerUrb, 2)]),
      ),
    );
  }
  return out.join('\n');
}

async function main(): Promise<void> {
  if (!existsSync(cli)) throw new Error('run npm run build:ts first');
  const date = new Date().toISOString();
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  const loadStart = os.loadavg();
  let lo: LoopbackResult | null = null;
  if (!opt['no-loopback']) {
    log('loopback (bench/usb.ts)');
    lo = await loopbackBench({ seconds: Number(opt.seconds), imageMiB: 64, log });
  }
  const home = mkdtempSync(join(os.tmpdir(), 'tender-bench-usbm-'));
  const env = { ...process.env, TENDER_HOME: home, TENDER_LOG: 'warn' };
  let daemon: ChildProcess | null = null;
  const ts: TransportResult[] = [];
  const stop = () => {
    // Ctrl-C: the machines are the daemon's children only in name (QEMU is detached): remove them.
    void (async () => {
      for (const t of TRANSPORTS) await tender(env, ['machine', 'rm', '--force', `u-${t}`]).catch(() => {});
      daemon?.kill('SIGTERM');
      rmSync(home, { recursive: true, force: true });
      process.exit(130);
    })();
  };
  process.once('SIGINT', stop);
  try {
    const img = await buildDefaultImage({ home: process.env.TENDER_BENCH_IMAGE_HOME || '/var/tmp/tender-test-image' });
    mkdirSync(join(home, 'images'));
    await new Promise<void>((r, j) => spawn('cp', ['-a', img.dir, join(home, 'images', 'default')]).on('close', (c) => (c === 0 ? r() : j(new Error('cp')))));
    const disk = join(home, 'usb-bench.img');
    const data = Buffer.alloc(IMAGE_MIB << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(disk, data);
    daemon = spawn(process.execPath, [cli, 'daemon', '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
    for (let i = 0; i < 150 && !existsSync(join(home, 'tender.sock')); i++) await sleep(100);
    await tender(env, ['usb', 'virtual', 'add', 'storage', '--image', disk, '--name', 'benchdisk']);
    const dioread = await buildDioread(home);
    for (const t of TRANSPORTS) ts.push(await measureTransport(env, home, daemon.pid!, t, dioread));
  } finally {
    process.off('SIGINT', stop);
    await stopDaemon(daemon);
    rmSync(home, { recursive: true, force: true });
  }
  const text = render(lo, ts, { date, cpu });
  console.log(text);
  writeFileSync(
    join(root, 'bench/results/usb-machine.json'),
    JSON.stringify({ date, cpu, cores: os.cpus().length, kernel: os.release(), node: process.version, loadStart, imageMiB: IMAGE_MIB, small: SMALL, repeat: REPEAT, loopback: lo, machine: ts }, null, 2) + '\n',
  );
}

await main();
