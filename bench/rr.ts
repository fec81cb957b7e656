/**
 * The host side of the 1-byte TCP request/response benchmark: an echo server on the stack's
 * bind address (in this process, which is otherwise idle while clients run), and the client
 * from rr-client.ts run inside the namespace.
 */
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpuNs, run } from './proc.js';
import type { RrStats } from './rr-stats.js';

export interface RrRun {
  ns: string;
  target: string;
  bind: string;
  count: number;
  warmup: number;
  /** The stack's process, to measure its CPU time per round trip. */
  pid?: number;
}

/** An echo server with Nagle off on `bind` (an ephemeral port), for the clients of rrClient. */
export async function startEcho(bind: string): Promise<{ port: number; close(): Promise<void> }> {
  // net.Server keeps no list of its sockets: keep one so close() never waits on a stuck peer.
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.setNoDelay(true);
    s.on('data', (d) => s.write(d));
    s.on('error', () => s.destroy());
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, bind, () => resolve());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** One client run (rr-client.ts in the namespace) against an echo server at target:port. */
export async function rrClient(o: { ns: string; target: string; port: number; count: number; warmup: number; pid?: number }): Promise<RrStats> {
  const client = join(dirname(fileURLToPath(import.meta.url)), 'rr-client.js');
  const timeoutMs = 20_000 + o.count + o.warmup; // 1 ms per round trip on top: long runs for profiling
  const args = ['netns', 'exec', o.ns, process.execPath, client, o.target, String(o.port), String(o.count), String(o.warmup), String(timeoutMs - 2000)];
  const cpu0 = o.pid !== undefined ? cpuNs(o.pid) : null;
  const r = await run('ip', args, { timeoutMs });
  const cpu1 = o.pid !== undefined ? cpuNs(o.pid) : null;
  if (r.timedOut) throw new Error(`TCP_RR client timed out after ${timeoutMs / 1000} s`);
  if (r.code !== 0) throw new Error(`TCP_RR: ${r.stderr.trim().split('\n')[0] || `exit ${r.code ?? r.signal}`}`);
  const stats = JSON.parse(r.stdout.trim()) as RrStats;
  if (cpu0 !== null && cpu1 !== null) stats.stackCpuUs = (cpu1 - cpu0) / 1000 / (o.count + o.warmup);
  return stats;
}

export async function runRr(o: RrRun): Promise<RrStats> {
  const echo = await startEcho(o.bind);
  try {
    return await rrClient({ ns: o.ns, target: o.target, port: echo.port, count: o.count, warmup: o.warmup, pid: o.pid });
  } finally {
    await echo.close();
  }
}
