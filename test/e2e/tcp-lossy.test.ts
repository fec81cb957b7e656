/**
 * TCP through the userspace network with packet loss: the Linux kernel in a namespace is the
 * guest, bridged to tender's TAP in a second "wire" namespace whose nftables rules drop ~2% of
 * the TCP packets each way (this host has no netem; why a bridge: test/helpers/nft-loss.ts). Bulk transfers, request/response, pipelined small messages, a port forward the other
 * way and a half-close must all arrive byte-identical; tender's counters must then show that
 * it really recovered from loss, so the file cannot pass on a lucky run without drops.
 *
 * Both ends run the same small CommonJS program (written to a temp dir): the guest runs it
 * with `ip netns exec`, the host loads it with require, so data generators and checks agree.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveNetns, type ServedNetns } from '../../src/commands/netns.js';
import { createLogger } from '../../src/log.js';
import { addNetns, delNetns, hasCommand, isRoot, nsExec, nsName, waitFor } from '../helpers/netns.js';
import { ip4str } from '../../netstack/addr.js';
import { bridgeGuest, setTcpLoss, tcpLossDrops } from '../helpers/nft-loss.js';

const canRun = isRoot && (await hasCommand('nft'));
const MiB = 1024 * 1024;
const HOST = '192.168.127.254';
const GUEST_PORT = 9000;
/** Drop probability per packet and direction, in 1/1000. */
const LOSS_PER_MILLE = 20;

/**
 * The peer program. Every mode prints one result line; on SIGTERM (nsExec's timeout) it says
 * how far it got, so a stall names the message it stalled on.
 */
const PEER = String.raw`'use strict';
const net = require('net');
const { createHash } = require('crypto');

let progress = 'starting';

/** Deterministic bytes (xorshift32). */
function pattern(n, seed = 0x12345678) {
  const b = Buffer.alloc((n + 3) & ~3);
  let x = seed | 0 || 1;
  for (let i = 0; i < b.length; i += 4) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b.subarray(0, n);
}

/** count messages of 1..maxSize bytes, sizes and contents from a fixed pseudo-random sequence. */
function messages(count, maxSize, seed = 0x2545f491) {
  const out = [];
  let x = seed;
  for (let i = 0; i < count; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    out.push(pattern(1 + ((x >>> 0) % maxSize), x ^ i));
  }
  return out;
}

/** count messages of size bytes: a 4-byte index, then pattern bytes. */
function fixedMessages(count, size) {
  const out = [];
  for (let i = 0; i < count; i++) {
    const m = pattern(size, 0x9e3779b9 ^ i);
    m.writeUInt32BE(i, 0);
    out.push(m);
  }
  return out;
}

const sha = (bufs) => { const h = createHash('sha256'); for (const b of bufs) h.update(b); return h.digest('hex'); };

/** Send each message, wait for its whole echo and compare it before sending the next. */
function requestResponse(s, msgs) {
  return new Promise((resolve, reject) => {
    let i = 0, got = [], have = 0;
    const h = createHash('sha256');
    const next = () => {
      progress = 'message ' + i + ' of ' + msgs.length;
      if (i === msgs.length) { s.removeListener('data', onData); resolve(h.digest('hex')); } else s.write(msgs[i]);
    };
    const onData = (d) => {
      got.push(d); have += d.length;
      const want = msgs[i].length;
      if (have > want) return reject(new Error('message ' + i + ': ' + have + ' bytes came back for ' + want));
      if (have < want) return;
      const echo = Buffer.concat(got, have);
      if (!echo.equals(msgs[i])) {
        let at = 0; while (echo[at] === msgs[i][at]) at++;
        return reject(new Error('message ' + i + ' (' + want + ' bytes) came back different from byte ' + at));
      }
      h.update(echo); got = []; have = 0; i++; next();
    };
    s.on('data', onData);
    s.on('error', reject);
    s.on('close', () => { if (i < msgs.length) reject(new Error('closed at message ' + i)); });
    next();
  });
}

/** Read a socket to its end: "<bytes> <sha256>". */
function drain(s) {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    let n = 0;
    s.on('data', (d) => { n += d.length; h.update(d); progress = n + ' bytes read'; });
    s.on('end', () => resolve(n + ' ' + h.digest('hex')));
    s.on('error', reject);
  });
}

function connect(host, port) {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port: Number(port), allowHalfOpen: true }, () => resolve(s));
    s.once('error', reject);
  });
}

async function main([mode, host, port, a, b]) {
  if (mode === 'download') {
    const s = await connect(host, port);
    return drain(s);
  }
  if (mode === 'upload') {
    // Write, half-close, and print the server's "<bytes> <sha256>" of what it received.
    const s = await connect(host, port);
    const reply = new Promise((resolve, reject) => {
      let o = '';
      s.on('data', (d) => (o += d));
      s.on('end', () => resolve(o));
      s.on('error', reject);
    });
    progress = 'uploading';
    s.end(pattern(Number(a)));
    return reply;
  }
  if (mode === 'rr') {
    const s = await connect(host, port);
    const hash = await requestResponse(s, messages(Number(a), Number(b)));
    s.end();
    return 'ok ' + a + ' ' + hash;
  }
  if (mode === 'pipeline') {
    // Every message written at once; then the whole echo is checked message by message.
    const msgs = fixedMessages(Number(a), Number(b));
    const all = Buffer.concat(msgs);
    const s = await connect(host, port);
    const chunks = [];
    let have = 0;
    const done = new Promise((resolve, reject) => {
      s.on('data', (d) => { chunks.push(d); have += d.length; progress = have + ' of ' + all.length + ' bytes echoed'; if (have >= all.length) resolve(); });
      s.on('error', reject);
      s.on('close', () => reject(new Error('closed after ' + have + ' bytes')));
    });
    for (const m of msgs) s.write(m);
    await done;
    const echo = Buffer.concat(chunks, have);
    if (have !== all.length) throw new Error(have + ' bytes echoed for ' + all.length);
    for (let i = 0; i < msgs.length; i++) {
      const m = echo.subarray(i * msgs[i].length, (i + 1) * msgs[i].length);
      if (!m.equals(msgs[i])) throw new Error('message ' + i + ' came back as index ' + m.readUInt32BE(0));
    }
    s.end();
    return 'ok ' + have + ' ' + sha([echo]);
  }
  if (mode === 'halfclose') {
    // Send, shut down writing, read the reply to its FIN, and report the close.
    const s = await connect(host, port);
    const reply = drain(s);
    const closed = new Promise((resolve) => s.on('close', (hadError) => resolve(hadError)));
    s.end(pattern(Number(a), 0x0badf00d));
    const r = await reply;
    return r + ' hadError=' + (await closed);
  }
  if (mode === 'echo-once') {
    // Echo one connection, then exit.
    const srv = net.createServer((s) => { srv.close(); s.pipe(s); s.on('error', () => {}); });
    await new Promise((r) => srv.listen(Number(port), r));
    process.stdout.write('listening\n');
    await new Promise((r) => srv.on('close', r));
    return 'served';
  }
  throw new Error('unknown mode ' + mode);
}

module.exports = { pattern, messages, fixedMessages, requestResponse, sha };
if (require.main === module) {
  process.on('SIGTERM', () => { process.stderr.write('killed at: ' + progress + '\n'); process.exit(3); });
  main(process.argv.slice(2)).then(
    (out) => process.stdout.write(out + '\n', () => process.exit(0)),
    (err) => { process.stderr.write('peer failed at ' + progress + ': ' + (err && err.stack || err) + '\n'); process.exit(2); },
  );
}
`;

interface Peer {
  pattern(n: number, seed?: number): Buffer;
  messages(count: number, maxSize: number, seed?: number): Buffer[];
  fixedMessages(count: number, size: number): Buffer[];
  requestResponse(s: net.Socket, msgs: Buffer[]): Promise<string>;
  sha(bufs: Buffer[]): string;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A one-shot server on 127.0.0.1; resolves with its port. */
async function listen(onConn: (s: net.Socket) => void): Promise<{ port: number; server: net.Server }> {
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on('error', () => {});
    onConn(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, server };
}

/** Read a host socket to its end. */
function readAll(s: net.Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('end', () => resolve(Buffer.concat(chunks)));
    s.on('error', reject);
  });
}

describe.skipIf(!canRun)('TCP under packet loss, end to end', () => {
  const wire = nsName('lossy-wire');
  const ns = nsName('lossy');
  const dir = mkdtempSync(join(tmpdir(), 'tender-lossy-'));
  const peerPath = join(dir, 'peer.cjs');
  writeFileSync(peerPath, PEER);
  const peer = createRequire(import.meta.url)(peerPath) as Peer;
  let served: ServedNetns;

  const guest = (args: string[], timeout: number) => nsExec(ns, [process.execPath, peerPath, ...args], { timeout });

  beforeAll(async () => {
    await addNetns(wire);
    await addNetns(ns);
    // tender's TAP goes into the wire namespace; the guest is bridged to it (see nft-loss.ts).
    served = await serveNetns(
      wire,
      { ifname: 'eth0', mtu: '1500', dnsUpstream: [], hostLoopback: true, configure: false, forward: [`0:${GUEST_PORT}`] },
      createLogger('warn'),
    );
    const cfg = served.network.config;
    await bridgeGuest(wire, 'eth0', ns, { address: served.address, prefix: cfg.subnet.prefix, gateway: ip4str(cfg.gatewayIp), mtu: cfg.mtu });
    await setTcpLoss(wire, 'eth0', LOSS_PER_MILLE);
  });

  afterAll(async () => {
    await served?.stop();
    await delNetns(ns);
    await delNetns(wire);
    rmSync(dir, { recursive: true, force: true });
  });

  it('downloads and uploads 20 MiB byte-identical through NAT', async () => {
    const size = 20 * MiB;
    const data = peer.pattern(size);
    const hash = sha256(data);

    const down = await listen((s) => s.end(data));
    try {
      expect((await guest(['download', HOST, String(down.port)], 60_000)).trim()).toBe(`${size} ${hash}`);
    } finally {
      down.server.close();
    }

    // The server answers with what it received only after the guest's FIN.
    const up = await listen((s) => {
      const h = createHash('sha256');
      let n = 0;
      s.on('data', (c: Buffer) => {
        n += c.length;
        h.update(c);
      });
      s.on('end', () => s.end(`${n} ${h.digest('hex')}`));
    });
    try {
      expect((await guest(['upload', HOST, String(up.port), String(size)], 60_000)).trim()).toBe(`${size} ${hash}`);
    } finally {
      up.server.close();
    }
  }, 150_000);

  it('carries 2000 request/response round trips of 1..4000 bytes, every echo intact', async () => {
    const msgs = peer.messages(2000, 4000);
    let echoed = 0;
    const { port, server } = await listen((s) => {
      s.on('data', (c: Buffer) => (echoed += c.length));
      s.pipe(s);
    });
    try {
      const out = (await guest(['rr', HOST, String(port), '2000', '4000'], 90_000)).trim();
      expect(out).toBe(`ok 2000 ${peer.sha(msgs)}`);
      expect(echoed).toBe(msgs.reduce((n, m) => n + m.length, 0));
    } finally {
      server.close();
    }
  }, 120_000);

  it('echoes 5000 pipelined 100-byte messages in order', async () => {
    const msgs = peer.fixedMessages(5000, 100);
    const { port, server } = await listen((s) => s.pipe(s));
    try {
      expect((await guest(['pipeline', HOST, String(port), '5000', '100'], 60_000)).trim()).toBe(`ok 500000 ${peer.sha(msgs)}`);
    } finally {
      server.close();
    }
  }, 90_000);

  it('carries 2000 request/response round trips through a port forward into the namespace', async () => {
    const fwd = served.forwards.find((f) => f.protocol === 'tcp')!;
    const server = spawn('ip', ['netns', 'exec', ns, process.execPath, peerPath, 'echo-once', '', String(GUEST_PORT)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let serverOut = '';
    server.stdout.on('data', (d) => (serverOut += d));
    server.stderr.on('data', (d) => (serverOut += d));
    const exited = new Promise<number | null>((r) => server.on('exit', (code) => r(code)));
    let s: net.Socket | undefined;
    try {
      await waitFor(() => serverOut.includes('listening'), 10_000);
      const msgs = peer.messages(2000, 4000, 0x1f2e3d4c);
      s = net.connect({ port: fwd.hostPort, host: '127.0.0.1', allowHalfOpen: true });
      const conn = s;
      await new Promise<void>((resolve, reject) => {
        conn.once('connect', resolve);
        conn.once('error', reject);
      });
      const hash = await Promise.race([
        peer.requestResponse(conn, msgs),
        new Promise<string>((_, reject) => setTimeout(() => reject(new Error('not done in 90 s')), 90_000).unref()),
      ]);
      expect(hash).toBe(peer.sha(msgs));
      conn.end();
      conn.resume();
      // The guest's echo server sees our FIN, ends its side and exits.
      expect(await exited).toBe(0);
      expect(serverOut).toContain('served');
    } finally {
      s?.destroy();
      if (server.exitCode === null) server.kill();
    }
  }, 120_000);

  it('carries a half-close: 1 MiB up, FIN, then 1 MiB back and a clean close', async () => {
    const size = MiB;
    const request = peer.pattern(size, 0x0badf00d);
    const reply = peer.pattern(size, 0x600dcafe);
    let received = '';
    const { port, server } = await listen((s) => {
      // Answer only after the guest's FIN.
      readAll(s).then(
        (b) => {
          received = `${b.length} ${sha256(b)}`;
          s.end(reply);
        },
        () => {},
      );
    });
    try {
      const out = (await guest(['halfclose', HOST, String(port), String(size)], 60_000)).trim();
      expect(received).toBe(`${size} ${sha256(request)}`);
      expect(out).toBe(`${size} ${sha256(reply)} hadError=false`);
    } finally {
      server.close();
    }
  }, 90_000);

  it('really lost packets and recovered (the counters say so)', async () => {
    const drops = await tcpLossDrops(wire);
    const c = served.network.counters;
    // nftables dropped both ways...
    expect(drops.up).toBeGreaterThan(0);
    expect(drops.down).toBeGreaterThan(0);
    // ...tender retransmitted what the guest never saw, and saw holes in what the guest sent.
    expect(c.get('tcp.retransmit.segments')).toBeGreaterThan(0);
    expect(c.get('tcp.rx.out_of_order')).toBeGreaterThan(0);
  });
});
