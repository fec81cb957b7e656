import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { seqLe } from '../../../netstack/tcp/seq.js';
import { TcpState } from '../../../netstack/tcp/state.js';
import { A_IP, B_IP, collect, Pair, pattern, RawPeer, writeAll } from './harness.js';

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

describe('TCP engine end to end under random link faults (fast-check)', () => {
  it('any seeded mix of loss, reordering, duplication and receiver pauses delivers the bytes exactly', () => {
    fc.assert(
      fc.property(
        fc.record({
          seed: fc.integer({ min: 1, max: 1 << 30 }),
          drop: fc.double({ min: 0, max: 0.15, noNaN: true }),
          reorder: fc.double({ min: 0, max: 0.2, noNaN: true }),
          dup: fc.double({ min: 0, max: 0.1, noNaN: true }),
          size: fc.integer({ min: 0, max: 300_000 }),
          pauseMs: fc.integer({ min: 0, max: 300 }),
          sack: fc.boolean(),
          ts: fc.boolean(),
          rcvBuf: fc.constantFrom(16 * 1024, 256 * 1024, 4 << 20),
        }),
        (x) => {
          const opts = { sack: x.sack, timestamps: x.ts, rcvBuf: x.rcvBuf };
          const p = new Pair(opts, opts);
          const { ca, cb } = p.open();
          p.setFaults({ drop: x.drop, reorder: x.reorder, dup: x.dup, seed: x.seed });
          const data = pattern(x.size, x.seed);
          const rx = collect(cb!);
          if (x.pauseMs > 0) {
            // The application stalls after every chunk it reads, for pauseMs.
            const t = p.clock.timer(() => cb!.resume());
            cb!.on('data', () => {
              cb!.pause();
              t.arm(x.pauseMs);
            });
          }
          cb!.on('error', () => {});
          ca.on('error', () => {});
          writeAll(ca, data);
          p.run(3_600_000, () => rx.ended);
          expect(rx.ended).toBe(true);
          expect(Buffer.compare(rx.bytes(), data)).toBe(0);
        },
      ),
      {
        numRuns: Number(process.env.TCP_FUZZ_RUNS ?? 40),
        // Regression: an RTO retransmission into a window one byte short of the data sent
        // past snd.max, so the receiver's ACK looked like an ACK of unsent data (fixed by
        // transmit() maintaining snd.max).
        examples: [[{ seed: 651559068, drop: 0.14666561712510887, reorder: 5e-324, dup: 5e-324, size: 23625, pauseMs: 1, sack: false, ts: true, rcvBuf: 16384 }]],
      },
    );
  });
});

describe('TCP engine: both directions and both closes under random faults (fast-check)', () => {
  it('both byte streams arrive exactly and both ends reach CLOSED', () => {
    fc.assert(
      fc.property(
        fc.record({
          seed: fc.integer({ min: 1, max: 1 << 30 }),
          drop: fc.double({ min: 0, max: 0.1, noNaN: true }),
          reorder: fc.double({ min: 0, max: 0.2, noNaN: true }),
          dup: fc.double({ min: 0, max: 0.1, noNaN: true }),
          up: fc.integer({ min: 0, max: 100_000 }),
          down: fc.integer({ min: 0, max: 100_000 }),
          sack: fc.boolean(),
          ts: fc.boolean(),
          bEndsFirst: fc.boolean(),
        }),
        (x) => {
          const opts = { sack: x.sack, timestamps: x.ts, finWait2Ms: 3_600_000 };
          const p = new Pair(opts, opts);
          const { ca, cb } = p.open();
          p.setFaults({ drop: x.drop, reorder: x.reorder, dup: x.dup, seed: x.seed });
          const up = pattern(x.up, x.seed);
          const down = pattern(x.down, x.seed + 1);
          const ra = collect(ca);
          const rb = collect(cb!);
          const errors: string[] = [];
          ca.on('error', (e) => errors.push(`a:${e.code}`));
          cb!.on('error', (e) => errors.push(`b:${e.code}`));
          if (x.bEndsFirst) {
            writeAll(cb!, down);
            writeAll(ca, up);
          } else {
            writeAll(ca, up);
            writeAll(cb!, down);
          }
          p.run(3_600_000, () => ra.ended && rb.ended && p.a.stats().connections + p.b.stats().connections === 0);
          expect(errors).toEqual([]);
          expect(Buffer.compare(rb.bytes(), up)).toBe(0);
          expect(Buffer.compare(ra.bytes(), down)).toBe(0);
          // TIME_WAIT has expired by now on whichever side(s) entered it.
          expect(p.a.stats().connections + p.b.stats().connections).toBe(0);
        },
      ),
      {
        numRuns: Number(process.env.TCP_FUZZ_RUNS ?? 40),
        // Regression: pure ACKs stamped with a go-back-N sndNxt fell before the peer's
        // rcv.nxt and were dropped on both sides until both timed out (see acceptableSeq).
        examples: [[{ seed: 19, drop: 0.07531254366040231, reorder: 5e-324, dup: 5e-324, up: 21901, down: 84681, sack: false, ts: false, bEndsFirst: false }]],
      },
    );
  });
});
