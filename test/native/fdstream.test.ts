/**
 * FdStream (the Duplex over a raw descriptor used for AF_VSOCK) exercised over a unix
 * socketpair, where the kernel behaves as it does for any stream socket; and the AF_VSOCK
 * entry points, checked without sending anything off this machine.
 */
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { afterEach, describe, expect, it } from 'vitest';
import {
  FdStream,
  VMADDR_CID_ANY,
  VMADDR_PORT_ANY,
  binding,
  isNativeError,
  packageRoot,
  socketpair,
  vsockConnect,
  vsockListen,
  vsockSocket,
  type NativeError,
} from '../../native/index.js';
import { closeSync, existsSync } from 'node:fs';
import { join } from 'node:path';

const streams: FdStream[] = [];
afterEach(() => {
  for (const s of streams.splice(0)) s.destroy();
});

function pair(opts?: { readSize?: number; highWaterMark?: number }): [FdStream, FdStream] {
  const [x, y] = socketpair('stream');
  const a = new FdStream(x, opts);
  const b = new FdStream(y, opts);
  streams.push(a, b);
  return [a, b];
}

function collect(s: FdStream): { chunks: Buffer[]; text(): string; ended: Promise<unknown[]> } {
  const chunks: Buffer[] = [];
  const ended = once(s, 'end');
  s.on('data', (c: Buffer) => chunks.push(c));
  return { chunks, text: () => Buffer.concat(chunks).toString(), ended };
}

describe('FdStream over a socketpair', () => {
  it('finds the addon from the package root', () => {
    expect(existsSync(join(packageRoot(), 'package.json'))).toBe(true);
    expect(typeof binding().createTap).toBe('function');
  });

  it('moves bytes both ways', async () => {
    const [a, b] = pair();
    const got = collect(b);
    const back = collect(a);
    a.write('hello ');
    a.write(Buffer.from('world'));
    await expect.poll(() => got.text()).toBe('hello world');
    b.write('and back');
    await expect.poll(() => back.text()).toBe('and back');
  });

  it('half-closes: end() is a FIN the peer sees as end, and the other direction keeps working', async () => {
    const [a, b] = pair();
    const atB = collect(b);
    const atA = collect(a);
    a.end('last words');
    await atB.ended;
    expect(atB.text()).toBe('last words');
    expect(a.writableFinished).toBe(true);
    // b can still talk to a after a's FIN.
    b.write('still here');
    await expect.poll(() => atA.text()).toBe('still here');
    b.end();
    await atA.ended;
    // Both sides done: the streams close themselves and release their fds.
    await expect.poll(() => a.closed && b.closed).toBe(true);
  });

  it('carries 16 MiB with backpressure on both sides, byte-identical', async () => {
    const [a, b] = pair({ highWaterMark: 64 * 1024 });
    const data = randomBytes(16 << 20);
    const expected = createHash('sha256').update(data).digest('hex');
    const h = createHash('sha256');
    let received = 0;
    let paused = 0;
    b.on('data', (c: Buffer) => {
      h.update(c);
      received += c.length;
      // A slow reader now and then: the socket fills up, the writer must wait for POLLOUT.
      if (received % (1 << 20) < c.length) {
        paused++;
        b.pause();
        setTimeout(() => b.resume(), 5);
      }
    });
    const ended = once(b, 'end');
    let sawBackpressure = false;
    for (let off = 0; off < data.length; off += 256 * 1024) {
      if (!a.write(data.subarray(off, off + 256 * 1024))) {
        sawBackpressure = true;
        await once(a, 'drain');
      }
    }
    a.end();
    await ended;
    expect(received).toBe(data.length);
    expect(h.digest('hex')).toBe(expected);
    expect(sawBackpressure).toBe(true);
    expect(paused).toBeGreaterThan(0);
  });

  it('reports the peer vanishing: EOF as end, writes after that as EPIPE', async () => {
    const [a, b] = pair();
    const ended = once(a, 'end');
    a.resume();
    b.destroy();
    await ended;
    const err = (await new Promise((resolve) => {
      a.once('error', resolve);
      a.write('into the void');
    })) as NativeError;
    expect(err.code).toBe('EPIPE');
    expect(err.syscall).toBe('write');
    expect(err.errno).toBeLessThan(0);
  });

  it('socketpair dgram gives two descriptors', () => {
    const [x, y] = socketpair('dgram');
    expect(x).toBeGreaterThan(2);
    expect(y).toBeGreaterThan(2);
    closeSync(x);
    closeSync(y);
  });
});

describe('AF_VSOCK', () => {
  // Whether this kernel has vsock decides which stable answer we get; never connect to a
  // real CID from a test (CID 2 is the hypervisor of the machine running the tests).
  let family: 'none' | 'vsock';
  try {
    closeSync(vsockSocket());
    family = 'vsock';
  } catch (e) {
    if (!isNativeError(e)) throw e;
    family = 'none';
  }

  it.runIf(family === 'none')('socket() fails with EAFNOSUPPORT where the kernel has no vsock', async () => {
    let err: unknown;
    try {
      vsockSocket();
    } catch (e) {
      err = e;
    }
    expect(isNativeError(err) && err.code).toBe('EAFNOSUPPORT');
    expect((err as NativeError).syscall).toBe('socket');
    await expect(vsockConnect(2, 1024)).rejects.toMatchObject({ code: 'EAFNOSUPPORT' });
    expect(() => vsockListen(1024)).toThrow(expect.objectContaining({ code: 'EAFNOSUPPORT' }));
  });

  it.runIf(family === 'vsock')('listens on any CID with a kernel-chosen port, and refuses a foreign CID', () => {
    const server = vsockListen(VMADDR_PORT_ANY);
    try {
      const addr = server.address();
      expect(addr.cid).toBe(VMADDR_CID_ANY);
      expect(addr.port).toBeGreaterThan(0);
      expect(addr.port).toBeLessThan(VMADDR_PORT_ANY);
    } finally {
      server.close();
      server.close();
    }
    // A CID that is not ours: EADDRNOTAVAIL, a local answer.
    expect(() => vsockListen(5000, { cid: 0x7fff0001 })).toThrow(expect.objectContaining({ code: 'EADDRNOTAVAIL', syscall: 'bind' }));
  });

  it('validates addresses before any syscall', async () => {
    await expect(vsockConnect(-1, 5)).rejects.toMatchObject({ code: 'EINVAL' });
    expect(() => vsockListen(2 ** 32)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  });
});
