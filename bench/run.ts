/**
 * `npm run bench`: tender side by side with slirp4netns, pasta and a kernel veth pair, in one
 * run on one machine. For every stack and MTU: a fresh network namespace as the guest, the
 * stack started against it, then iperf3 upload (guest -> host) and download (-R) to a server on
 * the host reached through the stack's host address; then the stack and the namespace are
 * removed. Then the 1-byte TCP round trip, with every stack running at once and measured in
 * alternating rounds (see rrPhase). A cell that fails records "n/a (why)" and the run goes on.
 *
 *   node dist/bench/run.js [--only tender,slirp4netns] [--mtu 1500] [--quick] [--repeat N]
 *                          [--seconds N] [--rr-only] [--rr-count N] [--rr-warmup N] [--write | --no-write]
 *   node dist/bench/run.js --render bench/results/latest.json   (re-render the docs, no measuring)
 *
 * A full run (all stacks, both MTUs, not --quick) rewrites the marked block of
 * docs/benchmarks.md and bench/results/latest.json; partial runs only write
 * bench/results/partial.json unless --write is given.
 */
import { mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { runIperf, type IperfResult } from './iperf.js';
import { cleanup, killAllChildren, must, run } from './proc.js';
import { renderBlock, renderChart, renderTable, renderTargets, replaceBlock, median, formatGbps, formatUs, rrMtu, type BenchResults, type Cell, type Kind } from './report.js';
import { rrClient, startEcho } from './rr.js';
import type { RrStats } from './rr-stats.js';
import { STACKS, STACK_NAMES, repoRoot, type StackName } from './stacks.js';

const ALL_MTUS = [1500, 65520];
/**
 * TCP_RR: round trips measured, and round trips before them that are not. The warm-up is
 * long because a JavaScript stack (tender) runs its first few thousand round trips through
 * V8's interpreter and baseline code, with its optimizing compiler busy on the other core:
 * about 3x the steady-state CPU per round trip for the first ~2000, settling after ~5000 on an
 * idle machine and later on a busy one (see docs/NOTES.md, "Issue 3"); each stack is fresh
 * when its round trips start (rrPhase). A long-running stack spends almost all its life in the steady
 * state, which is what netperf's 10-second TCP_RR measures too; the warm-up median is still
 * recorded with each result.
 */
const RR_COUNT = 10_000;
const RR_WARMUP = 10_000;
/** The measured round trips are split into this many rounds, alternating the stacks' order. */
const RR_ROUNDS = 5;

interface Options {
  stacks: StackName[];
  mtus: number[];
  seconds: number;
  omit: number;
  repeat: number;
  rrCount: number;
  /** Round trips before the measured ones (not counted). */
  rrWarmup: number;
  /** Only the TCP_RR cells (no iperf3): for working on latency. */
  rrOnly: boolean;
  quick: boolean;
  write: boolean | null;
  /** Re-render docs/benchmarks.md from a saved results file instead of measuring. */
  render: string | null;
}

function usage(msg: string): never {
  process.stderr.write(`${msg}\nusage: node dist/bench/run.js [--only ${STACK_NAMES.join(',')}] [--mtu 1500,65520] [--quick] [--repeat N] [--seconds N] [--rr-only] [--rr-count N] [--rr-warmup N] [--write|--no-write] [--render results.json]\n`);
  process.exit(2);
}

function parseOptions(argv: string[]): Options {
  let v;
  try {
    v = parseArgs({
      args: argv,
      options: {
        only: { type: 'string' },
        mtu: { type: 'string' },
        quick: { type: 'boolean', default: false },
        repeat: { type: 'string' },
        seconds: { type: 'string' },
        'rr-only': { type: 'boolean', default: false },
        'rr-count': { type: 'string' },
        'rr-warmup': { type: 'string' },
        write: { type: 'boolean' },
        render: { type: 'string' },
        'no-write': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }).values;
  } catch (err) {
    usage((err as Error).message);
  }
  if (v.help) usage('');
  const stacks = v.only ? v.only.split(',').map((s) => s.trim()).filter(Boolean) : [...STACK_NAMES];
  for (const s of stacks) if (!(STACK_NAMES as readonly string[]).includes(s)) usage(`unknown stack "${s}"`);
  const mtus = v.mtu ? v.mtu.split(',').map((s) => Number(s.trim())) : ALL_MTUS;
  for (const m of mtus) if (!Number.isInteger(m) || m < 576 || m > 65520) usage(`bad MTU "${m}": 576 to 65520`);
  const int = (s: string | undefined, d: number, name: string) => {
    if (s === undefined) return d;
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1 || n > 60) usage(`bad --${name} "${s}": 1 to 60`);
    return n;
  };
  const quick = !!v.quick;
  let rrCount = quick ? 500 : RR_COUNT;
  if (v['rr-count'] !== undefined) {
    rrCount = Number(v['rr-count']);
    if (!Number.isInteger(rrCount) || rrCount < 1 || rrCount > 1_000_000) usage(`bad --rr-count "${v['rr-count']}": 1 to 1000000`);
  }
  let rrWarmup = quick ? 100 : RR_WARMUP;
  if (v['rr-warmup'] !== undefined) {
    rrWarmup = Number(v['rr-warmup']);
    if (!Number.isInteger(rrWarmup) || rrWarmup < 0 || rrWarmup > 1_000_000) usage(`bad --rr-warmup "${v['rr-warmup']}": 0 to 1000000`);
  }
  return {
    // Keep the canonical order so tables from different runs line up.
    stacks: STACK_NAMES.filter((s) => stacks.includes(s)),
    mtus: [...new Set(mtus)].sort((a, b) => a - b),
    seconds: int(v.seconds, quick ? 1 : 5, 'seconds'),
    omit: 1,
    repeat: int(v.repeat, 1, 'repeat'),
    rrCount,
    rrWarmup,
    rrOnly: !!v['rr-only'],
    quick,
    write: v.write ? true : v['no-write'] ? false : null,
    render: v.render ?? null,
  };
}

const log = (s: string) => process.stderr.write(`${s}\n`);

function shortError(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n')[0].trim();
}

async function machine(): Promise<BenchResults['machine']> {
  let tcpCongestion: string | undefined;
  try {
    // New namespaces start with the initial namespace's default, so this is every stack's guest too.
    tcpCongestion = readFileSync('/proc/sys/net/ipv4/tcp_congestion_control', 'utf8').trim();
  } catch {
    /* not Linux, or /proc not mounted */
  }
  return { kernel: os.release(), cpu: os.cpus()[0]?.model.trim() ?? 'unknown', cores: os.cpus().length, node: process.version, tcpCongestion };
}

async function tools(o: Options): Promise<Record<string, string>> {
  const t: Record<string, string> = {};
  const ip = await run('iperf3', ['--version'], { timeoutMs: 5000 });
  t.iperf3 = ip.stdout.split('\n')[0]?.trim() || 'missing';
  for (const s of o.stacks) {
    if (s === 'veth') continue;
    try {
      t[s] = await STACKS[s].version();
    } catch (err) {
      t[s] = `unknown (${shortError(err)})`;
    }
  }
  return t;
}

/** One stack at one MTU: namespace, stack, measurements, teardown. Never throws. */
async function measure(o: Options, stack: StackName, mtu: number, record: (k: Kind, v: number | null, err: string | undefined, detail: unknown) => void, commands: (c: string[]) => void): Promise<void> {
  const ns = `tender-bench-${process.pid}-${stack}`;
  const tag = `[${stack} mtu ${mtu}]`;
  const failAll = (err: unknown) => {
    log(`${tag} setup failed: ${shortError(err)}`);
    for (const k of ['up', 'down'] as Kind[]) record(k, null, shortError(err), null);
  };
  try {
    await must('ip', ['netns', 'add', ns]);
  } catch (err) {
    return failAll(err);
  }
  const delNs = cleanup.add(`delete netns ${ns}`, async () => void (await run('ip', ['netns', 'del', ns], { timeoutMs: 10_000 })));
  try {
    await must('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    let running;
    try {
      running = await STACKS[stack].start(ns, mtu);
    } catch (err) {
      return failAll(err);
    }
    commands(running.commands.map((c) => c.replaceAll(ns, 'NS')));
    const stopStack = cleanup.add(`stop ${stack}`, () => running.stop());
    try {
      for (const [k, reverse] of [['up', false], ['down', true]] as const) {
        try {
          const r: IperfResult = await runIperf({ ns, target: running.target, bind: running.bind, seconds: o.seconds, omit: o.omit, reverse });
          const g = r.bitsPerSecond / 1e9;
          log(`${tag} ${k} ${formatGbps(g)} Gbit/s${r.retransmits !== null ? `, ${r.retransmits} retransmits` : ''}`);
          record(k, g, undefined, { retransmits: r.retransmits, senderGbps: r.senderBitsPerSecond / 1e9, intervalsGbps: r.intervals.map((i) => (i.omitted ? null : +(i.bitsPerSecond / 1e9).toFixed(3))) });
        } catch (err) {
          log(`${tag} ${k} failed: ${shortError(err)}`);
          record(k, null, shortError(err), null);
        }
      }
    } finally {
      await stopStack();
    }
  } catch (err) {
    failAll(err);
  } finally {
    await delNs();
  }
}

/**
 * TCP_RR for every stack at once. The machine is shared and its load drifts over seconds, so
 * stacks measured one after another would be compared at different moments (one stack's cell
 * could be 30% slower than another's for that alone). Here every stack runs side by side, each
 * in its own namespace; each is warmed up (`rrWarmup` round trips, their median recorded),
 * then measured in RR_ROUNDS rounds of rrCount / RR_ROUNDS round trips, the stacks' order
 * alternating from round to round. A stack's result is the median of its round medians, with
 * its CPU per measured round trip; only one client runs at a time.
 */
async function rrPhase(o: Options, mtu: number, record: (s: StackName, v: number | null, err: string | undefined, detail: unknown) => void, commands: (s: StackName, c: string[]) => void): Promise<void> {
  interface Live {
    stack: StackName;
    ns: string;
    target: string;
    port: number;
    pid?: number;
    rounds: RrStats[];
    warmupMedianUs?: number;
    error?: string;
  }
  const live: Live[] = [];
  const undo: (() => Promise<void>)[] = [];
  const fail = (l: Live, err: unknown) => {
    l.error = shortError(err);
    log(`[${l.stack} mtu ${mtu}] TCP_RR failed: ${l.error}`);
  };
  try {
    const echoes = new Map<string, { port: number; close(): Promise<void> }>();
    for (const stack of o.stacks) {
      const ns = `tender-bench-${process.pid}-rr-${stack}`;
      try {
        await must('ip', ['netns', 'add', ns]);
        undo.push(cleanup.add(`delete netns ${ns}`, async () => void (await run('ip', ['netns', 'del', ns], { timeoutMs: 10_000 }))));
        await must('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
        const running = await STACKS[stack].start(ns, mtu);
        undo.push(cleanup.add(`stop ${stack}`, () => running.stop()));
        commands(stack, running.commands.map((c) => c.replaceAll(ns, 'NS')));
        let echo = echoes.get(running.bind);
        if (!echo) {
          echo = await startEcho(running.bind);
          echoes.set(running.bind, echo);
          const e = echo;
          undo.push(() => e.close());
        }
        live.push({ stack, ns, target: running.target, port: echo.port, pid: running.pid, rounds: [] });
      } catch (err) {
        log(`[${stack} mtu ${mtu}] setup failed: ${shortError(err)}`);
        record(stack, null, shortError(err), null);
      }
    }
    for (const l of live) {
      try {
        const w = await rrClient({ ns: l.ns, target: l.target, port: l.port, count: Math.max(1, o.rrWarmup), warmup: 0 });
        l.warmupMedianUs = w.medianUs;
      } catch (err) {
        fail(l, err);
      }
    }
    const per = Math.max(1, Math.ceil(o.rrCount / RR_ROUNDS));
    for (let round = 0; round < RR_ROUNDS; round++) {
      const order = round % 2 ? [...live].reverse() : live;
      for (const l of order) {
        if (l.error) continue;
        try {
          l.rounds.push(await rrClient({ ns: l.ns, target: l.target, port: l.port, count: per, warmup: 0, pid: l.pid }));
        } catch (err) {
          fail(l, err);
        }
      }
    }
    for (const l of live) {
      const tag = `[${l.stack} mtu ${mtu}]`;
      if (l.error || l.rounds.length === 0) {
        record(l.stack, null, l.error ?? 'no rounds', null);
        continue;
      }
      const mids = l.rounds.map((r) => r.medianUs);
      const cpus = l.rounds.map((r) => r.stackCpuUs).filter((x): x is number => x !== undefined);
      const stats: RrStats = {
        count: l.rounds.reduce((a, r) => a + r.count, 0),
        meanUs: l.rounds.reduce((a, r) => a + r.meanUs * r.count, 0) / l.rounds.reduce((a, r) => a + r.count, 0),
        medianUs: median(mids)!,
        p99Us: median(l.rounds.map((r) => r.p99Us))!,
        minUs: Math.min(...l.rounds.map((r) => r.minUs)),
        ...(cpus.length ? { stackCpuUs: median(cpus)! } : {}),
        ...(l.warmupMedianUs !== undefined ? { warmupMedianUs: l.warmupMedianUs } : {}),
        roundMediansUs: mids.map((x) => +x.toFixed(1)),
      };
      const cpu = stats.stackCpuUs !== undefined ? `, stack CPU ${formatUs(stats.stackCpuUs)} µs/round trip` : '';
      log(`${tag} TCP_RR median ${formatUs(stats.medianUs)} µs (rounds ${mids.map((x) => formatUs(x)).join(' ')}; p99 ${formatUs(stats.p99Us)}${cpu}, warm-up median ${formatUs(l.warmupMedianUs ?? NaN)})`);
      record(l.stack, stats.medianUs, undefined, stats);
    }
  } finally {
    for (const u of undo.reverse()) await u();
  }
}

function writeDoc(results: BenchResults): void {
  const docPath = join(repoRoot(), 'docs', 'benchmarks.md');
  const doc = existsSync(docPath) ? readFileSync(docPath, 'utf8') : '# Benchmarks\n';
  writeFileSync(docPath, replaceBlock(doc, renderBlock(results)));
  log(`updated ${docPath}`);
}

/**
 * Namespaces left by a bench that was killed outright (SIGKILL, a crash of node itself): the
 * name carries the pid, so remove those whose process is gone. Deleting the namespace also
 * removes the veth pair, and pasta exits when its namespace goes.
 */
async function sweepStale(): Promise<void> {
  const r = await run('ip', ['netns', 'list'], { timeoutMs: 5000 });
  for (const line of r.stdout.split('\n')) {
    const m = /^(tender-bench-(\d+)-\S+)/.exec(line.trim());
    if (!m || Number(m[2]) === process.pid) continue;
    try {
      process.kill(Number(m[2]), 0);
      continue; // another bench is running right now
    } catch {
      /* that bench is gone */
    }
    log(`removing stale namespace ${m[1]}`);
    await run('ip', ['netns', 'del', m[1]], { timeoutMs: 10_000 });
  }
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  if (o.render) {
    // After editing the prose or the renderer: no measurement, same numbers.
    const results = JSON.parse(readFileSync(o.render, 'utf8')) as BenchResults;
    process.stdout.write(`${renderTable(results)}\n\n${renderChart(results)}\n\n${renderTargets(results)}\n\n`);
    writeDoc(results);
    return;
  }
  if (process.getuid?.() !== 0) usage('the bench creates network namespaces, veth pairs and TAP devices: run it as root');
  await sweepStale();
  const started = Date.now();
  let stopping = false;
  const onSignal = (sig: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    log(`\n${sig}: cleaning up`);
    killAllChildren();
    void cleanup.runAll().finally(() => process.exit(sig === 'SIGINT' ? 130 : sig === 'SIGHUP' ? 129 : 143));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  // Output piped into `head` that exits must not kill the bench before it cleans up.
  process.stdout.on('error', () => {});
  process.stderr.on('error', () => {});
  process.on('uncaughtException', (err) => {
    if (stopping) return;
    stopping = true;
    killAllChildren();
    void cleanup.runAll().finally(() => {
      log(`bench failed: ${err.stack ?? err}`);
      process.exit(1);
    });
  });

  const results: BenchResults = {
    version: 1,
    date: new Date().toISOString(),
    durationSeconds: 0,
    machine: await machine(),
    tools: await tools(o),
    options: { stacks: o.stacks, mtus: o.mtus, seconds: o.seconds, omit: o.omit, repeat: o.repeat, rrCount: o.rrCount, rrWarmup: o.rrWarmup, quick: o.quick },
    commands: {},
    cells: [],
  };
  const cells = new Map<string, Cell>();
  for (const s of o.stacks) for (const m of o.mtus) for (const k of ['up', 'down', 'rr'] as Kind[]) {
    const c: Cell = { stack: s, mtu: m, kind: k, value: null, runs: [], detail: [] };
    cells.set(`${s}/${m}/${k}`, c);
    results.cells.push(c);
  }

  try {
    // Repetitions outermost and stacks innermost, so slow drifts of the machine spread over all stacks.
    for (let rep = 0; rep < o.repeat; rep++) {
      for (const mtu of o.mtus) {
        for (const s of o.rrOnly ? [] : o.stacks) {
          await measure(
            o, s, mtu,
            (k, v, err, detail) => {
              const c = cells.get(`${s}/${mtu}/${k}`)!;
              c.runs.push(v);
              c.detail!.push(detail);
              if (v === null && !c.error) c.error = err;
            },
            (cmds) => {
              if (!results.commands[s]) results.commands[s] = cmds;
            },
          );
        }
        if (mtu !== rrMtu(results)) continue;
        await rrPhase(
          o, mtu,
          (s, v, err, detail) => {
            const c = cells.get(`${s}/${mtu}/rr`)!;
            c.runs.push(v);
            c.detail!.push(detail);
            if (v === null && !c.error) c.error = err;
          },
          (s, cmds) => {
            if (!results.commands[s]) results.commands[s] = cmds;
          },
        );
      }
    }
  } finally {
    await cleanup.runAll();
  }
  for (const c of results.cells) {
    c.value = median(c.runs.filter((x): x is number => x !== null));
    if (c.value !== null && c.runs.every((x) => x !== null)) delete c.error;
  }
  results.durationSeconds = (Date.now() - started) / 1000;

  process.stdout.write(`\n${renderTable(results)}\n\n${renderChart(results)}\n\n${renderTargets(results)}\n\n`);

  const root = repoRoot();
  const full = o.stacks.length === STACK_NAMES.length && ALL_MTUS.every((m) => o.mtus.includes(m)) && !o.quick && !o.rrOnly;
  const write = o.write ?? full;
  mkdirSync(join(root, 'bench', 'results'), { recursive: true });
  const jsonPath = join(root, 'bench', 'results', write ? 'latest.json' : 'partial.json');
  writeFileSync(jsonPath, JSON.stringify(results, null, 2) + '\n');
  log(`raw results: ${jsonPath}`);
  if (write) {
    writeDoc(results);
  } else {
    log('partial run: docs/benchmarks.md left unchanged (pass --write to update it anyway)');
  }
}

main().catch(async (err) => {
  killAllChildren();
  await cleanup.runAll();
  log(`bench failed: ${(err as Error).stack ?? err}`);
  process.exit(1);
});
