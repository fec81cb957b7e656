/**
 * iperf3 through a stack: a one-shot server (`-s -1`) on the host, the client inside the
 * namespace with `-J`, so the result is read from iperf3's own JSON rather than its text.
 *
 * The number reported is `end.sum_received.bits_per_second`: what the receiving side counted,
 * whichever direction (`-R` makes the server send). With `-O` iperf3 3.12 leaves the omitted
 * warm-up seconds out of both `sum_sent` and `sum_received` (checked against the intervals).
 */
import net from 'node:net';
import { run, startDaemon, waitFor } from './proc.js';

export interface IperfResult {
  /** Receiver-side throughput over the measured (non-omitted) seconds. */
  bitsPerSecond: number;
  /** Sender-side throughput (includes bytes still queued when the test ended). */
  senderBitsPerSecond: number;
  /** TCP retransmissions counted by the sending kernel (iperf3 reports them for -R too). */
  retransmits: number | null;
  seconds: number;
  /** Per-interval throughput, bits/s, as seen by the client; omitted intervals flagged. */
  intervals: { bitsPerSecond: number; omitted: boolean }[];
}

interface IperfJson {
  error?: string;
  intervals?: { sum?: { bits_per_second?: number; omitted?: boolean } }[];
  end?: {
    sum_sent?: { seconds?: number; bits_per_second?: number; retransmits?: number };
    sum_received?: { seconds?: number; bits_per_second?: number };
  };
}

/** Parse `iperf3 -J` output; throws with iperf3's own error message when the test failed. */
export function parseIperfJson(text: string): IperfResult {
  let j: IperfJson;
  try {
    j = JSON.parse(text) as IperfJson;
  } catch {
    const first = text.trim().split('\n')[0] ?? '';
    throw new Error(`iperf3 output is not JSON${first ? `: ${first.slice(0, 120)}` : ' (empty)'}`);
  }
  if (typeof j !== 'object' || j === null) throw new Error('iperf3 output is not a JSON object');
  if (j.error) throw new Error(`iperf3: ${j.error}`);
  const recv = j.end?.sum_received;
  const sent = j.end?.sum_sent;
  if (typeof recv?.bits_per_second !== 'number') throw new Error('iperf3 JSON has no end.sum_received.bits_per_second');
  return {
    bitsPerSecond: recv.bits_per_second,
    senderBitsPerSecond: sent?.bits_per_second ?? NaN,
    retransmits: typeof sent?.retransmits === 'number' ? sent.retransmits : null,
    seconds: recv.seconds ?? NaN,
    intervals: (j.intervals ?? []).map((i) => ({ bitsPerSecond: i.sum?.bits_per_second ?? NaN, omitted: !!i.sum?.omitted })),
  };
}

/** A TCP port that was free on `host` a moment ago. */
export function freeTcpPort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

export interface IperfRun {
  ns: string;
  /** Address the client dials from inside the namespace. */
  target: string;
  /** Address the server binds to on the host. */
  bind: string;
  seconds: number;
  omit: number;
  reverse: boolean;
}

/** One iperf3 test; rejects with a short reason on any failure (timeout, refused, bad output). */
export async function runIperf(o: IperfRun): Promise<IperfResult> {
  const port = await freeTcpPort(o.bind);
  const server = startDaemon('iperf3', ['-s', '-1', '--forceflush', '-B', o.bind, '-p', String(port)], `iperf3 server on ${o.bind}:${port}`);
  try {
    await waitFor(`iperf3 server on ${o.bind}:${port}`, 5000, async () => {
      if (server.exited()) throw new Error(server.output().trim());
      return /Server listening/.test(server.output());
    });
    const args = ['netns', 'exec', o.ns, 'iperf3', '-c', o.target, '-p', String(port), '-t', String(o.seconds), '-O', String(o.omit), '-J', '--connect-timeout', '3000'];
    if (o.reverse) args.push('-R');
    // iperf3 has no overall deadline of its own: a stalled stream would hang it forever.
    const timeoutMs = (o.seconds + o.omit) * 1000 + 15_000;
    const r = await run('ip', args, { timeoutMs });
    if (r.timedOut) throw new Error(`iperf3 timed out after ${timeoutMs / 1000} s`);
    try {
      return parseIperfJson(r.stdout);
    } catch (err) {
      const extra = r.stderr.trim() ? ` (${r.stderr.trim().split('\n')[0]})` : '';
      throw new Error(`${(err as Error).message}${extra}`);
    }
  } finally {
    await server.stop(1000);
  }
}
