/**
 * A/B of the 1-byte round trip between two builds of tender (and optionally slirp4netns), for
 * changes smaller than the spread of separate bench runs:
 *
 *   node dist/bench/rr-ab.js [--base DIR] [--slirp] [--pin CPU] [--rounds N] [--count N] [--warmup N]
 *
 * `--base DIR` is another built tree (e.g. `git archive HEAD | tar -x -C DIR`, `node_modules`
 * symlinked, `build/Release` copied, `tsc -p tsconfig.build.json`); the working tree is always
 * measured. Each stack runs for the whole A/B in a namespace of its own (long-lived, so JIT
 * warm-up is paid once, in `--warmup` round trips), one echo server serves all, and each round
 * runs `--count` round trips per stack, alternating the order. Per round and stack it prints the
 * median round trip and the stack's CPU per round trip (all threads' schedstat), then the
 * lower quartile and median over the rounds (the machine is shared: whole rounds get slower
 * when others run, so compare lower quartiles).
 *
 * `--pin CPU` runs the stacks, the echo server and the clients on one core: a round trip then
 * costs the sum of the three processes' CPU time, without the cross-core wake-ups whose
 * presence or absence otherwise dominates the spread (see docs/NOTES.md, issue 3).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { cpuNs } from './proc.js';

interface Stack {
  name: string;
  ns: string;
  host: string;
  proc: ChildProcess;
  rt: number[];
  cpu: number[];
}

const PORT = 5391;
const here = dirname(fileURLToPath(import.meta.url));
const clientJs = join(here, 'rr-client.js');

/** A fresh namespace (one left by an interrupted run is replaced). */
function addNs(ns: string): void {
  try {
    execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
  } catch {
    /* none left over */
  }
  execFileSync('ip', ['netns', 'add', ns]);
}

function quantile(a: number[], q: number): number {
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
}

async function main(): Promise<void> {
  const { values: v } = parseArgs({
    options: {
      base: { type: 'string' },
      slirp: { type: 'boolean', default: false },
      pin: { type: 'string' },
      rounds: { type: 'string', default: '12' },
      count: { type: 'string', default: '5000' },
      warmup: { type: 'string', default: '20000' },
    },
  });
  const rounds = Number(v.rounds);
  const count = Number(v.count);
  const warmup = Number(v.warmup);
  const pin = v.pin !== undefined ? ['taskset', '-c', v.pin] : [];
  const cmd = (argv: string[]): [string, string[]] => {
    const all = [...pin, ...argv];
    return [all[0]!, all.slice(1)];
  };

  const echo = spawn(...cmd([process.execPath, '-e', `require('net').createServer((c) => { c.setNoDelay(true); c.pipe(c); }).listen(${PORT}, '127.0.0.1')`]), { stdio: 'inherit' });
  const stacks: Stack[] = [];
  const trees = [...(v.base ? [{ name: 'base', root: v.base }] : []), { name: 'work', root: join(here, '..', '..') }];
  try {
    for (const t of trees) {
      const ns = `tender-t-rrab-${t.name}`;
      addNs(ns);
      const proc = spawn(...cmd([process.execPath, join(t.root, 'dist', 'src', 'cli.js'), 'netns', ns, '--configure', '--log-level', 'warn']), { stdio: ['ignore', 'pipe', 'inherit'] });
      stacks.push({ name: t.name, ns, host: '192.168.127.254', proc, rt: [], cpu: [] });
      await new Promise<void>((resolve, reject) => {
        let out = '';
        proc.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('ready')) resolve();
        });
        proc.once('exit', () => reject(new Error(`${t.name}: tender exited before ready`)));
      });
    }
    if (v.slirp) {
      const ns = 'tender-t-rrab-slirp';
      addNs(ns);
      const proc = spawn(...cmd(['slirp4netns', '--configure', '--mtu=1500', '--netns-type=path', `/run/netns/${ns}`, 'tap0']), { stdio: 'ignore' });
      stacks.push({ name: 'slirp4netns', ns, host: '10.0.2.2', proc, rt: [], cpu: [] });
      await new Promise((r) => setTimeout(r, 1000));
    }
    // Synchronous clients: this process is idle while they run (the echo server is separate).
    const client = (s: Stack, n: number): number => {
      const out = execFileSync('ip', ['netns', 'exec', s.ns, ...pin, process.execPath, clientJs, s.host, String(PORT), String(n), '0', '120000']);
      return (JSON.parse(out.toString()) as { medianUs: number }).medianUs;
    };
    for (const s of stacks) client(s, warmup);
    for (let r = 0; r < rounds; r++) {
      for (const s of r % 2 ? [...stacks].reverse() : stacks) {
        const c0 = cpuNs(s.proc.pid!) ?? NaN;
        const med = client(s, count);
        const c1 = cpuNs(s.proc.pid!) ?? NaN;
        s.rt.push(med);
        s.cpu.push((c1 - c0) / 1000 / count);
      }
    }
    for (const s of stacks) {
      const f = (a: number[]): string => a.map((x) => x.toFixed(1)).join(' ');
      process.stdout.write(
        `${s.name}: RT median µs per round ${f(s.rt)}\n${' '.repeat(s.name.length)}  CPU µs/RT per round ${f(s.cpu)}\n` +
          `${' '.repeat(s.name.length)}  lower quartile / median: RT ${quantile(s.rt, 0.25).toFixed(1)} / ${quantile(s.rt, 0.5).toFixed(1)}, ` +
          `CPU ${quantile(s.cpu, 0.25).toFixed(2)} / ${quantile(s.cpu, 0.5).toFixed(2)}\n`,
      );
    }
  } finally {
    for (const s of stacks) s.proc.kill('SIGINT');
    echo.kill();
    await new Promise((r) => setTimeout(r, 500));
    for (const s of stacks) {
      try {
        execFileSync('ip', ['netns', 'del', s.ns]);
      } catch {
        /* already gone */
      }
    }
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
