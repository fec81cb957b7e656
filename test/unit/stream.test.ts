/**
 * StreamDecoder (the framing) and StreamLink over real sockets, against a peer that speaks
 * QEMU's exact framing (4-byte big-endian length, then the frame). The real-QEMU test is
 * test/e2e/qemu-transport.test.ts.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { afterAll, afterEach, describe, expect, test } from 'vitest';
import { Counters } from '../../netstack/counters.js';
import { StreamDecoder, StreamLink } from '../../netstack/link/stream.js';

function encode(frames: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(frames.reduce((a, f) => a + 4 + f.length, 0));
  let o = 0;
  for (const f of frames) {
    new DataView(out.buffer).setUint32(o, f.length);
    out.set(f, o + 4);
    o += 4 + f.length;
  }
  return out;
}

function collect(maxFrame: number) {
  const got: { frame: Uint8Array; copy: Uint8Array }[] = [];
  const errors: { reason: string; len: number }[] = [];
  let batches = 0;
  const d = new StreamDecoder(maxFrame, {
    frame: (f) => got.push({ frame: f, copy: f.slice() }),
    batchEnd: () => batches++,
    error: (reason, len) => errors.push({ reason, len }),
  });
  return { d, got, errors, batches: () => batches };
}

// An ARP request as the guest's virtio-net sends it through QEMU (captured on a veth:
// who-has 10.77.0.1 tell 10.77.0.2), and the same with QEMU's length prefix.
const ARP = Uint8Array.from(Buffer.from('ffffffffffff267eb9a3038808060001080006040001267eb9a303880a4d00020000000000000a4d0001', 'hex'));
const ARP_ON_WIRE = Uint8Array.from(Buffer.from('0000002a' + Buffer.from(ARP).toString('hex'), 'hex'));

describe('StreamDecoder', () => {
  test('frames inside one chunk are views into it, not copies', () => {
    const c = collect(1518);
    const chunk = encode([ARP, ARP.subarray(0, 20)]);
    c.d.push(chunk);
    expect(c.got.map((g) => g.copy)).toEqual([ARP, ARP.subarray(0, 20)]);
    for (const g of c.got) expect(g.frame.buffer).toBe(chunk.buffer);
    expect(c.got[0]!.frame.byteOffset).toBe(4);
    expect(c.batches()).toBe(1);
  });

  test('QEMU framing byte for byte: 4-byte big-endian length, no header', () => {
    const c = collect(1518);
    c.d.push(ARP_ON_WIRE);
    expect(c.got[0]!.copy).toEqual(ARP);
  });

  test('a frame straddling chunks is reassembled; the length prefix may be split too', () => {
    const c = collect(1518);
    const wire = encode([ARP, ARP]);
    c.d.push(wire.subarray(0, 2)); // half a length
    c.d.push(wire.subarray(2, 10)); // rest of the length, start of the frame
    c.d.push(wire.subarray(10, 50)); // end of frame 1, start of length 2
    c.d.push(wire.subarray(50));
    expect(c.got.map((g) => g.copy)).toEqual([ARP, ARP]);
    expect(c.batches()).toBe(4);
    expect(c.errors).toEqual([]);
  });

  test('length 0 and lengths above mtu + 18 desynchronise the stream; exactly mtu + 18 is fine', () => {
    const ok = collect(1518);
    ok.d.push(encode([new Uint8Array(1518)]));
    expect(ok.got.length).toBe(1);

    const zero = collect(1518);
    zero.d.push(Uint8Array.of(0, 0, 0, 0, ...encode([ARP])));
    expect(zero.errors).toEqual([{ reason: 'zero_length', len: 0 }]);
    expect(zero.got).toEqual([]);

    const big = collect(1518);
    big.d.push(encode([ARP, new Uint8Array(1519), ARP]));
    expect(big.got.length).toBe(1);
    expect(big.errors).toEqual([{ reason: 'oversize', len: 1519 }]);
    // Nothing after a protocol error is trusted.
    big.d.push(encode([ARP]));
    expect(big.got.length).toBe(1);
    expect(big.d.desynchronised).toBe(true);

    const huge = collect(65553);
    huge.d.push(Uint8Array.of(0xff, 0xff, 0xff, 0xff));
    expect(huge.errors).toEqual([{ reason: 'oversize', len: 0xffffffff }]);
  });

  test('property: any split of a valid stream yields the same frames, in order', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { maxLength: 20 }),
        fc.array(fc.nat(), { maxLength: 30 }),
        (frames, cutsRaw) => {
          const wire = encode(frames);
          const cuts = [...new Set(cutsRaw.map((c) => c % (wire.length + 1)))].sort((a, b) => a - b);
          const c = collect(300);
          let prev = 0;
          for (const cut of [...cuts, wire.length]) {
            c.d.push(wire.subarray(prev, cut));
            prev = cut;
          }
          expect(c.errors).toEqual([]);
          expect(c.got.map((g) => g.copy)).toEqual(frames);
        },
      ),
    );
  });

  test('property: arbitrary bytes never throw, never yield a frame outside the bounds, fail at most once', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 10 }), fc.integer({ min: 1, max: 2000 }), (chunks, max) => {
        const c = collect(max);
        for (const ch of chunks) c.d.push(ch);
        expect(c.errors.length).toBeLessThanOrEqual(1);
        for (const g of c.got) {
          expect(g.frame.length).toBeGreaterThan(0);
          expect(g.frame.length).toBeLessThanOrEqual(max);
        }
      }),
    );
  });
});

describe('StreamLink', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-stream-t-'));
  const cleanup: (() => void)[] = [];
  afterEach(() => {
    for (const f of cleanup.splice(0)) f();
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** Listen on a fresh unix path and connect a raw peer to it. */
  async function pair(opts: Parameters<typeof StreamLink.listen>[1] = {}) {
    const p = path.join(dir, `s${Math.random().toString(36).slice(2)}.sock`);
    const l = await StreamLink.listen({ path: p }, opts);
    const peer = net.connect({ path: p });
    const link = await l.accepted;
    cleanup.push(() => {
      link.close();
      peer.destroy();
      l.server.close();
    });
    return { link, peer, server: l.server, path: p };
  }

  function peerReader(peer: net.Socket) {
    const frames: Uint8Array[] = [];
    let chunks = 0;
    const d = new StreamDecoder(65553, { frame: (f) => frames.push(f.slice()), batchEnd: () => {}, error: () => {} });
    peer.on('data', (c: Buffer) => {
      chunks++;
      d.push(new Uint8Array(c.buffer, c.byteOffset, c.length)); // so .slice() copies
    });
    return { frames, chunks: () => chunks };
  }

  async function until(cond: () => boolean, what: string): Promise<void> {
    for (let i = 0; i < 400 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
    if (!cond()) throw new Error(`timed out waiting for ${what}`);
  }

  test('frames flow both ways; sends within one tick go out in one write', async () => {
    const { link, peer } = await pair({ name: 'q0' });
    const rx: Uint8Array[] = [];
    let batches = 0;
    link.attach({ frame: (f) => rx.push(f.slice()), batchEnd: () => batches++ });
    const reader = peerReader(peer);

    peer.write(encode([ARP, ARP.subarray(0, 14)]));
    await until(() => rx.length === 2, 'two frames');
    expect(rx).toEqual([ARP, ARP.subarray(0, 14)]);
    expect(batches).toBeGreaterThanOrEqual(1);
    expect(link.stats).toMatchObject({ rxFrames: 2, rxBytes: 42 + 14 });

    const writes: number[] = [];
    const orig = link.socket.write.bind(link.socket);
    link.socket.write = ((b: Uint8Array, ...rest: never[]) => {
      writes.push(b.length);
      return orig(b, ...rest);
    }) as typeof link.socket.write;
    const scratch = new Uint8Array(ARP);
    for (let i = 0; i < 10; i++) {
      scratch[41] = i;
      link.send(scratch); // borrowed: we change it right after
    }
    await until(() => reader.frames.length === 10, 'ten frames at the peer');
    expect(writes).toEqual([10 * 46]);
    expect(reader.frames.map((f) => f[41])).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(link.stats).toMatchObject({ txFrames: 10, txBytes: 420, txDrops: 0 });
  });

  test('frames that QEMU would reject are dropped on send, not sent', async () => {
    const counters = new Counters();
    const { link } = await pair({ counters, mtu: 1500 });
    link.attach({ frame: () => {} });
    link.send(new Uint8Array(0));
    link.send(new Uint8Array(1519));
    link.send(new Uint8Array(1518));
    expect(link.stats).toMatchObject({ txFrames: 1, txDrops: 2 });
    expect(counters.snapshot()).toEqual({ 'stream.drop.tx_bad_length': 2 });
  });

  test('frames that arrive before attach() wait for it', async () => {
    const { link, peer } = await pair();
    peer.write(encode([ARP]));
    await new Promise((r) => setTimeout(r, 20));
    const rx: Uint8Array[] = [];
    link.attach({ frame: (f) => rx.push(f.slice()) });
    await until(() => rx.length === 1, 'the early frame');
    expect(rx).toEqual([ARP]);
  });

  test('flush() writes the pending batch at once', async () => {
    const { link, peer } = await pair();
    link.attach({ frame: () => {} });
    const reader = peerReader(peer);
    link.send(ARP);
    link.flush();
    link.send(ARP);
    await until(() => reader.frames.length === 2, 'two frames');
  });

  test('a second connection while one is attached is closed and logged', async () => {
    const warnings: string[] = [];
    const counters = new Counters();
    const { path: p } = await pair({ name: 'q1', counters, log: { warn: (m) => warnings.push(m) } });
    const second = net.connect({ path: p });
    const closed = new Promise<void>((r) => second.on('close', () => r()));
    second.on('error', () => {});
    await closed;
    expect(warnings).toEqual(['q1: refusing a second connection while one is attached']);
    expect(counters.snapshot()).toEqual({ 'stream.drop.second_connection': 1 });
  });

  test('a bad length closes the connection, counts the drop and reports the link down', async () => {
    const counters = new Counters();
    const { link, peer } = await pair({ counters, mtu: 1500 });
    let down = '';
    const rx: Uint8Array[] = [];
    link.attach({ frame: (f) => rx.push(f.slice()), down: (r) => (down = r) });
    const peerClosed = new Promise<void>((r) => peer.on('close', () => r()));
    peer.write(encode([ARP, new Uint8Array(1519)]));
    await peerClosed;
    expect(rx).toEqual([ARP]);
    expect(down).toBe('protocol error: frame length 1519');
    expect(counters.snapshot()).toEqual({ 'stream.drop.oversize': 1 });
    expect(link.stats.rxDrops).toBe(1);
    link.send(ARP);
    expect(link.stats.txDrops).toBe(1);
  });

  test('the peer closing reports the link down', async () => {
    const { link, peer } = await pair();
    let down = '';
    link.attach({ frame: () => {}, down: (r) => (down = r) });
    peer.end();
    await until(() => down !== '', 'down');
    expect(down).toBe('peer closed');
  });

  test('backpressure: frames accumulate up to the bound, beyond it they are dropped and counted, then drain', async () => {
    const counters = new Counters();
    const { link, peer } = await pair({ counters, maxPending: 256 * 1024 });
    link.attach({ frame: () => {} });
    peer.pause(); // a VMM that stopped reading
    const frame = new Uint8Array(1514);
    // Fill the kernel's socket buffers and Node's queue until write() pushes back, then
    // past the bound. Each round is one tick, so each is one write.
    for (let round = 0; round < 400 && link.stats.txDrops === 0; round++) {
      for (let i = 0; i < 64; i++) link.send(frame);
      await new Promise((r) => setImmediate(r));
    }
    expect(link.stats.txDrops).toBeGreaterThan(0);
    expect(counters.get('stream.drop.tx_backlog')).toBe(link.stats.txDrops);
    const sent = link.stats.txFrames;
    // Reading again drains everything that was accepted, in full frames.
    const reader = peerReader(peer);
    peer.resume();
    await until(() => reader.frames.length === sent, `${sent} frames after drain`);
    expect(reader.frames.every((f) => f.length === 1514)).toBe(true);
    // And sending works again.
    link.send(ARP);
    await until(() => reader.frames.length === sent + 1, 'one more');
  });

  test('close() sends what is pending, then closes', async () => {
    const { link, peer } = await pair();
    link.attach({ frame: () => {} });
    const reader = peerReader(peer);
    const ended = new Promise<void>((r) => peer.on('end', () => r()));
    link.send(ARP);
    link.close();
    link.close();
    await ended;
    expect(reader.frames).toEqual([ARP]);
  });

  test('connect(): we are the client (QEMU server=on), over TCP', async () => {
    const srv = net.createServer();
    const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const port = (srv.address() as net.AddressInfo).port;
    const link = await StreamLink.connect({ host: '127.0.0.1', port }, { name: 'tcp' });
    const peer = await accepted;
    cleanup.push(() => {
      link.close();
      peer.destroy();
      srv.close();
    });
    const rx: Uint8Array[] = [];
    link.attach({ frame: (f) => rx.push(f.slice()) });
    const reader = peerReader(peer);
    peer.write(ARP_ON_WIRE);
    link.send(ARP);
    await until(() => rx.length === 1 && reader.frames.length === 1, 'a frame each way');
    expect(rx[0]).toEqual(ARP);
    expect(reader.frames[0]).toEqual(ARP);
  });

  test('connect() to nothing rejects', async () => {
    await expect(StreamLink.connect({ path: path.join(dir, 'nobody.sock') })).rejects.toThrow(/ENOENT/);
  });

  test('listen() on TCP port 0 reports the port', async () => {
    const l = await StreamLink.listen({ host: '127.0.0.1', port: 0 });
    cleanup.push(() => l.server.close());
    expect('port' in l.address && l.address.port).toBeGreaterThan(0);
    l.server.close();
    await expect(l.accepted).rejects.toThrow(/closed before a connection/);
  });

  test('a stale socket file left by a dead process is replaced; a live listener is not stolen', async () => {
    const p = path.join(dir, 'stale.sock');
    // A process that bound the path and died without unlinking it.
    execFileSync('python3', ['-c', `import socket; s=socket.socket(socket.AF_UNIX); s.bind(${JSON.stringify(p)})`]);
    expect(fs.existsSync(p)).toBe(true);
    const l = await StreamLink.listen({ path: p });
    cleanup.push(() => l.server.close());
    await expect(StreamLink.listen({ path: p })).rejects.toThrow(/EADDRINUSE/);
  });
});
