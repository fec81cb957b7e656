/**
 * Child processes and cleanup for the bench. Every process and namespace the bench creates is
 * registered here, so a failure, a timeout or Ctrl-C still removes them: `cleanup.runAll()`
 * undoes everything in reverse order of creation, and `run()` kills a child that outlives its
 * timeout instead of letting one stuck measurement hang the whole bench.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

type Undo = () => Promise<void> | void;

/** A LIFO list of undo actions; each runs once, errors are swallowed (cleanup must go on). */
export class Cleanup {
  private undo: { name: string; fn: Undo }[] = [];

  /** Register an undo action; returns a function that runs it now and forgets it. */
  add(name: string, fn: Undo): () => Promise<void> {
    const entry = { name, fn };
    this.undo.push(entry);
    return async () => {
      const i = this.undo.indexOf(entry);
      if (i < 0) return;
      this.undo.splice(i, 1);
      await safe(entry.fn);
    };
  }

  async runAll(): Promise<void> {
    while (this.undo.length) await safe(this.undo.pop()!.fn);
  }
}

async function safe(fn: Undo): Promise<void> {
  try {
    await fn();
  } catch {
    /* cleanup goes on */
  }
}

export const cleanup = new Cleanup();

/** Children alive right now, so a signal handler can kill them all (by pid, ours only). */
const live = new Set<ChildProcess>();

export function killAllChildren(): void {
  for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}

/** Run a command to completion; kills it after `timeoutMs` and reports `timedOut`. Never rejects on exit status. */
export function run(cmd: string, args: string[], opts: { timeoutMs: number; env?: NodeJS.ProcessEnv }): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    live.add(child);
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs);
    const done = (code: number | null, signal: NodeJS.Signals | null) => {
      clearTimeout(timer);
      live.delete(child);
      resolve({ code, signal, stdout, stderr, timedOut });
    };
    child.once('error', (err) => {
      stderr += String(err.message);
      done(null, null);
    });
    child.once('close', done);
  });
}

/** Run a command that must succeed; rejects with its stderr (or the timeout) in the message. */
export async function must(cmd: string, args: string[], timeoutMs = 10_000): Promise<string> {
  const r = await run(cmd, args, { timeoutMs });
  if (r.timedOut) throw new Error(`${cmd} ${args.join(' ')}: timed out after ${timeoutMs} ms`);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${(r.stderr || r.stdout).trim() || `exit ${r.code ?? r.signal}`}`);
  return r.stdout;
}

/** A long-running child (a stack, an iperf3 server) whose output is kept for error messages. */
export interface Daemon {
  child: ChildProcess;
  output(): string;
  exited(): boolean;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves once it is gone. */
  stop(graceMs?: number): Promise<void>;
}

export function startDaemon(cmd: string, args: string[], name: string): Daemon {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let out = '';
  const keep = (d: Buffer) => {
    out += d.toString('utf8');
    if (out.length > 16_384) out = out.slice(-8192);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  child.once('error', (err) => (out += String(err.message)));
  let gone = false;
  const goneP = new Promise<void>((r) =>
    child.once('close', () => {
      gone = true;
      live.delete(child);
      r();
    }),
  );
  const d: Daemon = {
    child,
    output: () => out,
    exited: () => gone,
    async stop(graceMs = 3000) {
      if (gone) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await goneP;
      clearTimeout(t);
    },
  };
  const forget = cleanup.add(`stop ${name}`, () => d.stop());
  void goneP.then(() => void forget());
  return d;
}

/** Poll `f` every `everyMs` until it returns a value other than null/undefined/false, or throw after `ms`. */
export async function waitFor<T>(what: string, ms: number, f: () => Promise<T | null | undefined | false>, everyMs = 50): Promise<T> {
  const end = Date.now() + ms;
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await f();
      if (v !== null && v !== undefined && v !== false) return v;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}${lastErr ? `: ${(lastErr as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/**
 * CPU time used so far by every thread of `pid`, in nanoseconds (the first field of each
 * /proc/PID/task/TID/schedstat), or null when the process is gone. Finer than the clock ticks
 * of /proc/PID/stat, and it counts Node's helper threads (GC, libuv pool) too.
 */
export function cpuNs(pid: number): number | null {
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return null;
  }
  let sum = 0;
  for (const t of tids) {
    try {
      sum += Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      /* the thread ended meanwhile */
    }
  }
  return sum;
}
