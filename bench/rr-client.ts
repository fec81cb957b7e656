/**
 * The guest side of the 1-byte TCP request/response benchmark (netperf's TCP_RR, in Node):
 * run inside the namespace with `ip netns exec NS node dist/bench/rr-client.js HOST PORT N WARMUP`.
 * Connects once, then N times in a row writes one byte and waits for the one-byte echo, and
 * prints the round-trip statistics as one JSON line. Nagle is off on both ends (the server in
 * rr.ts too), so each byte is one segment; Node's event loop adds the same fixed cost for every
 * stack, so the numbers compare stacks, not absolute kernel latency.
 */
import net from 'node:net';
import { summarize } from './rr-stats.js';

function main(): void {
  const [host, portS, countS, warmupS, timeoutS] = process.argv.slice(2);
  const port = Number(portS);
  const count = Number(countS ?? 2000);
  const warmup = Number(warmupS ?? 100);
  const timeoutMs = Number(timeoutS ?? 15_000);
  if (!host || !port || !(count > 0) || !(warmup >= 0)) {
    process.stderr.write('usage: rr-client HOST PORT [COUNT] [WARMUP] [TIMEOUT_MS]\n');
    process.exit(2);
  }
  const fail = (msg: string) => {
    process.stderr.write(`${msg}\n`);
    process.exit(1);
  };
  const deadline = setTimeout(() => fail(`timed out after ${timeoutMs} ms`), timeoutMs);
  const samples = new Float64Array(count);
  // Kept to report how much slower the first round trips are (a JIT-compiled stack warms up).
  const warm = new Float64Array(warmup);
  const byte = Buffer.from([0x61]);
  let i = -warmup;
  let t0 = 0n;
  const sock = net.connect({ host, port, noDelay: true });
  sock.setTimeout(5000, () => fail('no reply within 5 s'));
  sock.once('error', (err) => fail(`${(err as NodeJS.ErrnoException).code ?? ''} ${err.message}`.trim()));
  sock.once('end', () => fail('connection closed by the server'));
  const send = () => {
    t0 = process.hrtime.bigint();
    sock.write(byte);
  };
  sock.once('connect', send);
  sock.on('data', (d: Buffer) => {
    const t1 = process.hrtime.bigint();
    if (d.length !== 1) return fail(`expected a 1-byte echo, got ${d.length} bytes`);
    if (i >= 0) samples[i] = Number(t1 - t0) / 1000;
    else warm[i + warmup] = Number(t1 - t0) / 1000;
    i++;
    if (i < count) return send();
    clearTimeout(deadline);
    sock.setTimeout(0);
    sock.removeAllListeners('end');
    sock.destroy();
    process.stdout.write(JSON.stringify({ ...summarize(samples), warmupMedianUs: summarize(warm).medianUs }) + '\n');
  });
}

main();
