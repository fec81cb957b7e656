/**
 * The compiled `tender` CLI, for benchmarks that drive a daemon and machines as a user does.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from './stacks.js';

export const CLI = join(repoRoot(), 'dist/src/cli.js');

/** stdout of `tender ARGS...`; rejects with the exit code and stderr. Killed after `timeoutMs`. */
export function tender(env: NodeJS.ProcessEnv, args: string[], o: { timeoutMs?: number; stdin?: Buffer } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { env, stdio: [o.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout!.on('data', (d) => (out += d));
    p.stderr!.on('data', (d) => (err += d));
    if (o.stdin) p.stdin!.end(o.stdin);
    const t = setTimeout(() => p.kill('SIGKILL'), o.timeoutMs ?? 300_000);
    p.on('close', (code) => {
      clearTimeout(t);
      if (code === 0) resolve(out);
      else reject(new Error(`tender ${args.join(' ')}: exit ${code}: ${err.trim()}`));
    });
  });
}

/** Stop a `tender daemon` child with SIGTERM and wait until it has exited. */
export async function stopDaemon(daemon: ChildProcess | undefined | null): Promise<void> {
  if (!daemon) return;
  const closed = new Promise((r) => daemon.on('close', r));
  daemon.kill('SIGTERM');
  await closed;
}
