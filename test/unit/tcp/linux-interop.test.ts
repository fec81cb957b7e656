/**
 * The engine against the Linux kernel's TCP: a TUN device in a network namespace we create,
 * relayed to this process by a tiny python helper (TUNSETIFF needs an ioctl Node lacks).
 * A minimal IPv4 wrapper here stands in for the lead's IPv4 layer; the clock is the real one.
 *
 * Kernel → engine (passive open, the NAT's direction) and engine → kernel (active open, port
 * forwarding's direction), several MiB each, byte-identical, then clean closes.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ip4 } from '../../../netstack/addr.js';
import { Counters } from '../../../netstack/counters.js';
import { checksum } from '../../../netstack/wire/checksum.js';
import { SystemClock } from '../../../netstack/time.js';
import type { Ip4Output } from '../../../netstack/tcp/ip.js';
import { TcpStack } from '../../../netstack/tcp/stack.js';
import type { TcpConnection } from '../../../netstack/tcp/connection.js';
import { addNetns, delNetns, hasCommand, isRoot, nsExec, nsName, waitFor } from '../../helpers/netns.js';
import { pattern } from './harness.js';

const HELPER = `
import os, sys, fcntl, struct, select
fd = os.open('/dev/net/tun', os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', sys.argv[1].encode(), 0x0001 | 0x1000))  # TUNSETIFF, IFF_TUN|IFF_NO_PI
out = sys.stdout.buffer
out.write(b'READY\\n'); out.flush()
inp = sys.stdin.buffer.raw
buf = b''
while True:
    r, _, _ = select.select([fd, inp], [], [])
    if fd in r:
        p = os.read(fd, 65536)
        out.write(struct.pack('>I', len(p)) + p); out.flush()
    if inp in r:
        d = os.read(inp.fileno(), 1 << 20)
        if not d: break
        buf += d
        while len(buf) >= 4:
            n = struct.unpack('>I', buf[:4])[0]
            if len(buf) < 4 + n: break
            os.write(fd, buf[4:4 + n]); buf = buf[4 + n:]
`;

const KERNEL = ip4('10.77.0.1');
const ENGINE = ip4('10.77.0.2');

/** Deterministic loss: drop every n-th packet in each direction (0 = none). */
const loss = { rx: 0, tx: 0, rxCount: 0, txCount: 0 };

class TunIp implements Ip4Output {
  readonly headroom = 24;
  readonly scratch = new Uint8Array(65535 + this.headroom);
  constructor(private readonly child: ChildProcessWithoutNullStreams, private readonly mtu: number) {}
  send4(src: number, dst: number, proto: number, len: number): boolean {
    if (loss.tx && ++loss.txCount % loss.tx === 0) return true;
    const total = len + 20;
    const frame = new Uint8Array(4 + total);
    new DataView(frame.buffer).setUint32(0, total);
    const h = frame.subarray(4, 24);
    h[0] = 0x45;
    h[2] = total >> 8;
    h[3] = total & 0xff;
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    new DataView(h.buffer, h.byteOffset).setUint32(12, src);
    new DataView(h.buffer, h.byteOffset).setUint32(16, dst);
    const c = checksum(h, 0, 20);
    h[10] = c >> 8;
    h[11] = c & 0xff;
    frame.set(this.scratch.subarray(this.headroom, this.headroom + len), 24);
    this.child.stdin.write(frame);
    return true;
  }
  mtuTo(): number {
    return this.mtu;
  }
}

const enabled = isRoot && (await hasCommand('socat')) && (await hasCommand('python3'));

describe.skipIf(!enabled)('TCP engine against the Linux kernel (TUN in a netns)', () => {
  const ns = nsName('tcpeng');
  const tun = `tt${process.pid % 100000}`;
  let child: ChildProcessWithoutNullStreams;
  let stack: TcpStack;
  const counters = new Counters();
  const clock = new SystemClock();
  const dir = tmpdir();
  const files: string[] = [];

  beforeAll(async () => {
    await addNetns(ns);
    child = spawn('ip', ['netns', 'exec', ns, 'python3', '-u', '-c', HELPER, tun]) as ChildProcessWithoutNullStreams;
    let pending = Buffer.alloc(0);
    let ready = false;
    await new Promise<void>((resolve, reject) => {
      child.once('error', reject);
      child.stdout.on('data', (d: Buffer) => {
        pending = Buffer.concat([pending, d]);
        if (!ready) {
          const nl = pending.indexOf(10);
          if (nl < 0) return;
          ready = true;
          pending = pending.subarray(nl + 1);
          resolve();
        }
        let got = false;
        while (pending.length >= 4) {
          const n = pending.readUInt32BE(0);
          if (pending.length < 4 + n) break;
          const pkt = pending.subarray(4, 4 + n);
          pending = pending.subarray(4 + n);
          // Minimal IPv4: TCP, no options handling beyond IHL, no fragments.
          if (pkt.length < 20 || pkt[0]! >> 4 !== 4 || pkt[9] !== 6) continue;
          if (loss.rx && ++loss.rxCount % loss.rx === 0) continue;
          const ihl = (pkt[0]! & 15) * 4;
          const total = pkt.readUInt16BE(2);
          stack.input(pkt.readUInt32BE(12), pkt.readUInt32BE(16), new Uint8Array(pkt.buffer, pkt.byteOffset + ihl, total - ihl));
          got = true;
        }
        if (got) stack.flush();
      });
    });
    stack = new TcpStack({ clock, counters, ip: new TunIp(child, 1500) });
    await nsExec(ns, ['ip', 'addr', 'add', '10.77.0.1/24', 'dev', tun]);
    await nsExec(ns, ['ip', 'link', 'set', tun, 'up', 'mtu', '1500']);
  }, 30_000);

  afterAll(async () => {
    child?.stdin.end();
    child?.kill();
    clock.stop();
    await delNetns(ns);
    for (const f of files) rmSync(f, { force: true });
  });

  it('kernel → engine: 8 MiB upload through a passive open, byte-identical, then FIN both ways', async () => {
    const data = pattern(8 << 20, 3);
    const src = join(dir, `tender-tcp-up-${process.pid}.bin`);
    files.push(src);
    writeFileSync(src, data);
    const got: Uint8Array[] = [];
    let conn: TcpConnection | null = null;
    let ended = false;
    let closed = false;
    stack.onSyn = (syn) => {
      expect(syn.options.mss).toBe(1460);
      expect(syn.options.wscale).toBeGreaterThanOrEqual(0);
      expect(syn.options.sackPermitted).toBe(true);
      expect(syn.options.timestamps).toBe(true);
      conn = syn.accept();
      conn.on('data', (d) => got.push(d));
      conn.on('end', () => {
        ended = true;
        conn!.end();
      });
      conn.on('close', () => (closed = true));
    };
    await nsExec(ns, ['socat', '-u', `OPEN:${src}`, 'TCP:10.77.0.2:5000'], { timeout: 60_000 });
    await waitFor(() => ended && closed, 20_000);
    const all = Buffer.concat(got);
    expect(all.length).toBe(data.length);
    expect(createHash('sha256').update(all).digest('hex')).toBe(createHash('sha256').update(data).digest('hex'));
    expect(conn!.wsAgreed && conn!.sackOk && conn!.tsOk).toBe(true);
    expect(counters.get('tcp.drop.bad_checksum')).toBe(0);
  }, 90_000);

  it('engine → kernel: 8 MiB download through an active open, byte-identical', async () => {
    const data = pattern(8 << 20, 4);
    const dst = join(dir, `tender-tcp-down-${process.pid}.bin`);
    files.push(dst);
    const server = spawn('ip', ['netns', 'exec', ns, 'socat', '-u', 'TCP-LISTEN:6000,reuseaddr', `CREATE:${dst}`]);
    const serverDone = new Promise<number>((r) => server.on('exit', (code) => r(code ?? -1)));
    // Wait for the listener.
    await waitFor(async () => (await nsExec(ns, ['ss', '-ltn'])).includes(':6000'), 10_000);
    const conn = stack.connect({ localIp: ENGINE, localPort: 45000, remoteIp: KERNEL, remotePort: 6000 });
    let closed = false;
    let err: Error | null = null;
    conn.on('error', (e) => (err = e));
    conn.on('end', () => conn.end());
    conn.on('close', () => (closed = true));
    await new Promise<void>((r) => conn.once('connect', () => r()));
    let off = 0;
    const pump = (): void => {
      while (off < data.length) {
        const n = Math.min(256 * 1024, data.length - off);
        const ok = conn.write(data.subarray(off, off + n));
        off += n;
        if (!ok) return;
      }
      conn.end();
    };
    conn.on('drain', pump);
    pump();
    expect(await serverDone).toBe(0);
    await waitFor(() => closed, 20_000);
    expect(err).toBeNull();
    const out = readFileSync(dst);
    expect(out.length).toBe(data.length);
    expect(createHash('sha256').update(out).digest('hex')).toBe(createHash('sha256').update(data).digest('hex'));
  }, 90_000);

  it('both directions at once with every 37th/41st packet lost: SACK recovery against Linux', async () => {
    const up = pattern(3 << 20, 5);
    const down = pattern(3 << 20, 6);
    const src = join(dir, `tender-tcp-bi-${process.pid}.bin`);
    const dst = join(dir, `tender-tcp-bi-out-${process.pid}.bin`);
    files.push(src, dst);
    writeFileSync(src, up);
    const before = counters.get('tcp.retransmit.segments');
    loss.rx = 37;
    loss.tx = 41;
    const got: Uint8Array[] = [];
    let ended = false;
    stack.onSyn = (syn) => {
      const c = syn.accept();
      c.on('data', (d) => got.push(d));
      c.on('end', () => (ended = true));
      c.on('connect', () => {
        c.write(down);
        c.end();
      });
    };
    // socat sends the file and writes what it receives to dst; exits after both directions end.
    await nsExec(ns, ['socat', '-t', '30', `OPEN:${src}!!CREATE:${dst}`, 'TCP:10.77.0.2:5001'], { timeout: 60_000 });
    await waitFor(() => ended, 20_000);
    loss.rx = 0;
    loss.tx = 0;
    expect(Buffer.concat(got).length).toBe(up.length);
    expect(Buffer.compare(Buffer.concat(got), up)).toBe(0);
    expect(readFileSync(dst).length).toBe(down.length);
    expect(Buffer.compare(readFileSync(dst), down)).toBe(0);
    expect(counters.get('tcp.retransmit.segments')).toBeGreaterThan(before);
    expect(counters.get('tcp.fast_retransmit')).toBeGreaterThan(0);
  }, 90_000);

  it('engine → kernel port with no listener: ECONNREFUSED', async () => {
    const conn = stack.connect({ localIp: ENGINE, localPort: 45001, remoteIp: KERNEL, remotePort: 6001 });
    const code = await new Promise<string>((r) => conn.on('error', (e) => r(e.code)));
    expect(code).toBe('ECONNREFUSED');
  });
});
