/**
 * DatagramLink over real AF_UNIX SOCK_DGRAM sockets: two links talking to each other (listen
 * and connect modes), and a Python peer that behaves like vfkit (binds its own socket, sends
 * the "VFKT" hello, then frames, and expects answers on its own socket).
 */
import { execFile } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { isNativeError, openUnixDgram } from '../../native/index.js';
import { DatagramLink } from '../../netstack/link/datagram.js';
import type { Link, LinkReceiver } from '../../netstack/link/link.js';
import { waitFor } from '../helpers/netns.js';

const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'tender-dgram-'));
const p = (name: string): string => join(dir, name);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const open: Link[] = [];
afterEach(() => {
  for (const l of open.splice(0)) l.close();
});
const track = <T extends Link>(l: T): T => {
  open.push(l);
  return l;
};

class Collector implements LinkReceiver {
  frames: Uint8Array[] = [];
  batches = 0;
  downReason: string | null = null;
  frame(f: Uint8Array): void {
    this.frames.push(f.slice());
  }
  batchEnd(): void {
    this.batches++;
  }
  down(r: string): void {
    this.downReason = r;
  }
}

/** A 60-byte frame whose payload starts with a marker, so both directions are told apart. */
function frame(marker: number, len = 60): Uint8Array {
  const f = new Uint8Array(len);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, marker & 255, 0x88, 0xb5]); // local experimental EtherType
  f[14] = marker >> 8;
  f[15] = marker & 255;
  return f;
}
const markerOf = (f: Uint8Array): number => (f[14]! << 8) | f[15]!;

describe('DatagramLink', () => {
  it('listen and connect modes exchange frames both ways; the listener learns its peer', async () => {
    const learned: string[] = [];
    const a = track(DatagramLink.listen(p('a.sock'), { onPeer: (path) => learned.push(path) }));
    const b = track(DatagramLink.connect(p('b.sock'), p('a.sock')));
    const ra = new Collector();
    const rb = new Collector();
    a.attach(ra);
    b.attach(rb);
    expect(a.peer).toBeNull();
    expect(b.peer).toBe(p('a.sock'));

    // Before a peer is known the listener has nobody to answer: dropped and counted.
    a.send(frame(1));
    expect(a.counters.get('dgram.drop.no_peer')).toBe(1);

    for (let i = 0; i < 10; i++) b.send(frame(100 + i));
    await waitFor(() => ra.frames.length === 10);
    expect(ra.frames.map(markerOf)).toEqual([...Array(10).keys()].map((i) => 100 + i));
    expect(a.peer).toBe(p('b.sock'));
    expect(learned).toEqual([p('b.sock')]);
    expect(a.counters.get('dgram.peer_learned')).toBe(1);

    for (let i = 0; i < 10; i++) a.send(frame(200 + i, 1514));
    await waitFor(() => rb.frames.length === 10);
    expect(rb.frames.map(markerOf)).toEqual([...Array(10).keys()].map((i) => 200 + i));
    expect(rb.frames[0]!.length).toBe(1514);
    expect(a.stats).toMatchObject({ rxFrames: 10, txFrames: 10, txDrops: 1 });
    expect(b.stats).toMatchObject({ rxFrames: 10, txFrames: 10, txDrops: 0 });
  });

  it('answers a vfkit-like peer: swallows the VFKT hello, counts short datagrams, replies to its socket', async () => {
    const a = track(DatagramLink.listen(p('vfkit-net.sock')));
    const ra = new Collector();
    a.attach(ra);
    // Like vfkit: bind our own socket next to the path, connect, send "VFKT", then frames.
    const script = p('vfkit.py');
    writeFileSync(
      script,
      [
        'import socket, sys',
        's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
        `s.bind(${JSON.stringify(p('vfkit-net.sock-vfkit.sock'))})`,
        `s.connect(${JSON.stringify(p('vfkit-net.sock'))})`,
        's.send(b"VFKT")',
        's.send(b"short!")',
        's.send(bytes.fromhex("ffffffffffff020000000001") + b"\\x88\\xb5" + b"\\x00\\x07" + bytes(44))',
        's.settimeout(10)',
        'print(s.recv(65536).hex())',
      ].join('\n'),
    );
    const py = run('/usr/bin/python3', [script], { timeout: 15_000 });
    await waitFor(() => ra.frames.length === 1);
    expect(markerOf(ra.frames[0]!)).toBe(7);
    expect(ra.frames[0]!.length).toBe(60);
    expect(a.counters.get('dgram.vfkt_hello')).toBe(1);
    expect(a.counters.get('dgram.drop.short')).toBe(1);
    expect(a.stats.rxDrops).toBe(1);
    expect(a.peer).toBe(p('vfkit-net.sock-vfkit.sock'));
    a.send(frame(0x0999));
    const { stdout } = await py;
    expect(stdout.trim()).toBe(Buffer.from(frame(0x0999)).toString('hex'));
  });

  it('connect mode before the peer exists learns it from the first datagram (QEMU started later)', async () => {
    const b = track(DatagramLink.connect(p('t.sock'), p('qemu.sock')));
    const rb = new Collector();
    b.attach(rb);
    expect(b.peer).toBeNull();
    // "QEMU" appears: binds its local path and sends to ours.
    const q = track(DatagramLink.connect(p('qemu.sock'), p('t.sock')));
    const rq = new Collector();
    q.attach(rq);
    q.send(frame(0x0301));
    await waitFor(() => rb.frames.length === 1);
    expect(b.peer).toBe(p('qemu.sock'));
    b.send(frame(0x0302));
    await waitFor(() => rq.frames.length === 1);
    expect(markerOf(rq.frames[0]!)).toBe(0x0302);
  });

  it('waits for writable when the peer is full instead of spinning, then delivers everything in order', async () => {
    // A small send buffer and a receiver that is not reading yet (not attached): the first
    // flush fills the socket and gets EAGAIN; the rest waits in the queue for POLLOUT.
    const a = track(DatagramLink.listen(p('slow.sock')));
    const b = track(DatagramLink.connect(p('fast.sock'), p('slow.sock'), { sndbuf: 32 * 1024, txQueueFrames: 1024 }));
    b.attach(new Collector());
    const N = 400;
    for (let i = 0; i < N; i++) b.send(frame(i, 1514));
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(b.queued).toBeGreaterThan(0); // blocked, waiting for POLLOUT
    expect(b.stats.txFrames).toBeLessThan(N);
    const ra = new Collector();
    a.attach(ra);
    await waitFor(() => ra.frames.length === N);
    expect(ra.frames.map(markerOf)).toEqual([...Array(N).keys()]);
    expect(b.stats.txDrops).toBe(0);
    expect(b.queued).toBe(0);
    // Batching on receive: the backlog arrived in batches of up to 64.
    expect(ra.batches).toBeLessThan(N);
  });

  it('may be closed from inside its receive callback, mid-batch', async () => {
    const a = track(DatagramLink.listen(p('cb.sock')));
    const b = track(DatagramLink.connect(p('cb2.sock'), p('cb.sock')));
    b.attach(new Collector());
    for (let i = 0; i < 5; i++) b.send(frame(i));
    await waitFor(() => b.stats.txFrames === 5);
    // All five wait in the socket; the first wake-up reads them as one batch.
    let got = 0;
    let downs = 0;
    a.attach({
      frame: () => {
        got++;
        a.close();
      },
      down: () => downs++,
    });
    await waitFor(() => got > 0);
    await new Promise((r) => setTimeout(r, 20));
    expect(got).toBe(1);
    expect(downs).toBe(0); // close() is ours, not the device going away
    expect(existsSync(p('cb.sock'))).toBe(false);
  });

  it('drops datagrams larger than the MTU allows and counts them', async () => {
    const a = track(DatagramLink.listen(p('mtu.sock'), { mtu: 1500 }));
    const ra = new Collector();
    a.attach(ra);
    const b = track(DatagramLink.connect(p('big.sock'), p('mtu.sock'), { mtu: 9000 }));
    b.attach(new Collector());
    b.send(frame(1, 1519)); // one byte over 1500 + 18
    b.send(frame(2, 9018)); // far over: truncated by the slot
    b.send(frame(3, 1518));
    await waitFor(() => ra.frames.length === 1);
    expect(markerOf(ra.frames[0]!)).toBe(3);
    await waitFor(() => a.counters.get('dgram.drop.oversize') === 2);
  });

  it('goes down when the peer goes away (ECONNREFUSED), and removes its socket file on close', async () => {
    const a = track(DatagramLink.listen(p('x.sock')));
    const b = track(DatagramLink.connect(p('y.sock'), p('x.sock')));
    const rb = new Collector();
    b.attach(rb);
    a.attach(new Collector());
    a.close();
    expect(existsSync(p('x.sock'))).toBe(false);
    b.send(frame(1));
    await waitFor(() => rb.downReason !== null);
    expect(rb.downReason).toMatch(/ECONNREFUSED/);
    expect(b.counters.get('dgram.drop.tx_econnrefused')).toBe(1);
    b.send(frame(2));
    expect(b.counters.get('dgram.drop.closed')).toBe(1);
  });

  it('replaces a stale socket file but refuses a live socket or a regular file', () => {
    // Stale: a socket file nobody is bound to any more.
    const stale = track(DatagramLink.listen(p('stale.sock')));
    stale.close();
    const fd = openUnixDgram({ bind: p('stale2.sock') });
    // (closing the fd leaves the file behind, exactly like a crashed process)
    closeSync(fd);
    expect(existsSync(p('stale2.sock'))).toBe(true);
    track(DatagramLink.listen(p('stale2.sock')));

    const live = track(DatagramLink.listen(p('live.sock')));
    let err: unknown;
    try {
      DatagramLink.listen(p('live.sock'));
    } catch (e) {
      err = e;
    }
    expect(isNativeError(err) && err.code).toBe('EADDRINUSE');
    expect(live.peer).toBeNull();

    writeFileSync(p('file.sock'), 'not a socket');
    err = undefined;
    try {
      DatagramLink.listen(p('file.sock'));
    } catch (e) {
      err = e;
    }
    expect(isNativeError(err) && err.code).toBe('EADDRINUSE');
    expect(existsSync(p('file.sock'))).toBe(true);

    err = undefined;
    try {
      DatagramLink.listen(join(dir, 'x'.repeat(120)));
    } catch (e) {
      err = e;
    }
    expect(isNativeError(err) && err.code).toBe('ENAMETOOLONG');
  });
});
