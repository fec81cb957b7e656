/**
 * The addon's two fast paths for the round-trip hot path: `sendSome` (one non-blocking send on
 * a stream socket, used by the NAT for host sockets) and FrameIO's `setSendQueue` +
 * `writeQueued` (batched writes from arrays registered once). Over unix socketpairs, where the
 * kernel behaves as it does for TCP and datagram sockets.
 */
import { closeSync, readSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { FrameIO, isNativeError, sendSome, socketpair } from '../../native/index.js';

const fds: number[] = [];
const ios: FrameIO[] = [];
afterEach(() => {
  for (const io of ios.splice(0)) io.close();
  for (const fd of fds.splice(0)) {
    try {
      closeSync(fd);
    } catch {
      /* closed by the test */
    }
  }
});

function pair(type: 'stream' | 'dgram'): [number, number] {
  const p = socketpair(type);
  fds.push(...p);
  return p;
}

describe('sendSome', () => {
  it('sends what the kernel takes, a subarray included, and the peer reads exactly that', () => {
    const [a, b] = pair('stream');
    const buf = Uint8Array.from([9, 1, 2, 3, 9]);
    expect(sendSome(a, buf.subarray(1, 4))).toBe(3);
    const got = Buffer.alloc(16);
    expect(readSync(b, got)).toBe(3);
    expect([...got.subarray(0, 3)]).toEqual([1, 2, 3]);
  });

  it('returns -1 once the socket buffer is full (nobody reads the other end)', () => {
    const [a] = pair('stream');
    const chunk = new Uint8Array(64 * 1024);
    let n = 0;
    for (let i = 0; i < 10_000 && n >= 0; i++) n = sendSome(a, chunk);
    expect(n).toBe(-1);
  });

  it('throws a coded error (not SIGPIPE) when the peer is gone', () => {
    const [a, b] = pair('stream');
    closeSync(b);
    let err: unknown = null;
    try {
      sendSome(a, Uint8Array.of(1));
    } catch (e) {
      err = e;
    }
    expect(isNativeError(err) && err.code === 'EPIPE' && err.syscall === 'send').toBe(true);
  });

  it('rejects bad arguments with a TypeError', () => {
    const [a] = pair('stream');
    expect(() => sendSome(a, 'x' as unknown as Uint8Array)).toThrow(TypeError);
    expect(() => sendSome(a, new Uint16Array(2) as unknown as Uint8Array)).toThrow(TypeError);
    expect(() => sendSome(-1, Uint8Array.of(1))).toThrow(TypeError);
  });
});

describe('FrameIO.writeQueued', () => {
  it('writes from the registered arrays in order, reading their current contents each time', async () => {
    const [a, b] = pair('dgram');
    const got: number[][] = [];
    const rx = new FrameIO({ fd: b, socket: true, slotSize: 256, onFrames: (buf, n, lens) => {
      for (let i = 0; i < n; i++) got.push([...buf.subarray(i * 256, i * 256 + lens[i]!)]);
    }, onError: () => {} });
    const tx = new FrameIO({ fd: a, socket: true, slotSize: 256, onFrames: () => {}, onError: () => {} });
    fds.splice(0); // the FrameIOs own the descriptors now
    ios.push(rx, tx);
    const arena = new Uint8Array(64);
    const offs = new Uint32Array(4);
    const lens = new Uint32Array(4);
    tx.setSendQueue(arena, offs, lens);
    arena.set([1, 2, 3, 4, 5, 6]);
    offs.set([0, 3]);
    lens.set([3, 3]);
    expect(tx.writeQueued(2)).toBe(2);
    arena.set([7, 8], 10);
    offs[0] = 10;
    lens[0] = 2;
    expect(tx.writeQueued(1)).toBe(1);
    for (let i = 0; i < 100 && got.length < 3; i++) await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual([[1, 2, 3], [4, 5, 6], [7, 8]]);
  });

  it('refuses a count beyond the arrays, frames beyond the buffer, and a call before setSendQueue', () => {
    const [a] = pair('dgram');
    const tx = new FrameIO({ fd: a, socket: true, slotSize: 256, onFrames: () => {}, onError: () => {} });
    fds.splice(fds.indexOf(a), 1);
    ios.push(tx);
    expect(() => tx.writeQueued(1)).toThrow(TypeError);
    const arena = new Uint8Array(8);
    const offs = new Uint32Array(2);
    const lens = new Uint32Array(2);
    tx.setSendQueue(arena, offs, lens);
    expect(() => tx.writeQueued(3)).toThrow(RangeError);
    offs[0] = 6;
    lens[0] = 4;
    expect(() => tx.writeQueued(1)).toThrow(RangeError);
  });
});
