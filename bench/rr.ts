/**
 * The host side of the 1-byte TCP request/response benchmark: an echo server on the stack's
 * bind address (in this process: it is idle while the iperf3 tests run), and the client from
 * rr-client.ts run inside the namespace.
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

export async function runRr(o: RrRun): Promise<RrStats> {
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
    server.listen(0, o.bind, () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  try {
    const client = join(dirname(fileURLToPath(import.meta.url)), 'rr-client.js');
    const timeoutMs = 20_000 + o.count; // 1 ms per round trip on top: long runs for profiling
    const args = ['netns', 'exec', o.ns, process.execPath, client, o.target, String(port), String(o.count), String(o.warmup), String(timeoutMs - 2000)];
    const cpu0 = o.pid !== undefined ? cpuNs(o.pid) : null;
    const r = await run('ip', args, { timeoutMs });
    const cpu1 = o.pid !== undefined ? cpuNs(o.pid) : null;
    if (r.timedOut) throw new Error(`TCP_RR client timed out after ${timeoutMs / 1000} s`);
    if (r.code !== 0) throw new Error(`TCP_RR: ${r.stderr.trim().split('\n')[0] || `exit ${r.code ?? r.signal}`}`);
    const stats = JSON.parse(r.stdout.trim()) as RrStats;
    if (cpu0 !== null && cpu1 !== null) stats.stackCpuUs = (cpu1 - cpu0) / 1000 / (o.count + o.warmup);
    return stats;
  } finally {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  }
}
