import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { seqLe } from '../../../netstack/tcp/seq.js';
import { TcpState } from '../../../netstack/tcp/state.js';
import { A_IP, B_IP, collect, RawPeer } from './harness.js';

describe('TCP engine under hostile input (fast-check)', () => {
  it('arbitrary bytes into input() never throw', () => {
    const p = new RawPeer();
    p.handshake();
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 120 }), fc.boolean(), (bytes, aimAtConn) => {
        if (aimAtConn && bytes.length >= 4) {
          // Point it at the live connection's ports so it gets past demultiplexing.
          bytes[0] = p.port >> 8;
          bytes[1] = p.port & 0xff;
          bytes[2] = 0;
          bytes[3] = 80;
        }
        p.stack.input(B_IP, A_IP, bytes);
        p.stack.flush();
      }),
      { numRuns: 3000 },
    );
  });

  it('random well-formed segments (valid checksums) keep the connection invariants', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            flags: fc.integer({ min: 0, max: 0x3f }),
            seqOff: fc.integer({ min: -70_000, max: 70_000 }),
            ackOff: fc.integer({ min: -70_000, max: 70_000 }),
            window: fc.integer({ min: 0, max: 65535 }),
            len: fc.integer({ min: 0, max: 1500 }),
            ts: fc.integer({ min: 0, max: 1000 }),
            sack: fc.array(fc.integer({ min: -5000, max: 20000 }), { maxLength: 6 }),
            advance: fc.integer({ min: 0, max: 3000 }),
            write: fc.integer({ min: 0, max: 20_000 }),
          }),
          { maxLength: 60 },
        ),
        (steps) => {
          const p = new RawPeer({ rcvBuf: 64 * 1024 });
          p.handshake();
          const c = p.conn;
          const rx = collect(c);
          c.on('error', () => {});
          for (const s of steps) {
            if (s.write && c.state === TcpState.ESTABLISHED) c.write(new Uint8Array(s.write));
            const sb = s.sack.length >= 2 ? s.sack.slice(0, s.sack.length & ~1).map((x) => (c.sndUna + x) >>> 0) : [];
            p.send({
              flags: s.flags,
              seq: (c.rcvNxt + s.seqOff) >>> 0,
              ack: (c.sndUna + s.ackOff) >>> 0,
              window: s.window,
              tsval: s.ts,
              sackBlocks: sb,
            }, new Uint8Array(s.len), false);
            p.clock.advance(s.advance);
            p.take();
            if (c.state !== TcpState.CLOSED) {
              expect(seqLe(c.sndUna, c.sndNxt)).toBe(true);
              expect(seqLe(c.sndNxt, c.sndMax)).toBe(true);
              expect(c.rcvRing.length).toBeLessThanOrEqual(c.rcvRing.max);
              expect(c.rcvRing.capacity).toBeLessThanOrEqual(2 * c.rcvRing.max);
              expect(c.asm.rangeCount).toBeLessThanOrEqual(32);
            }
          }
          expect(rx.length()).toBe(c.bytesIn);
        },
      ),
      { numRuns: 300 },
    );
  });
});
