import { describe, expect, it } from 'vitest';
import { TcpState } from '../../../netstack/tcp/state.js';
import { collect, Pair, pattern, writeAll } from './harness.js';

function transfer(p: Pair, size: number, budgetMs: number): { ok: boolean; got: Uint8Array; data: Uint8Array } {
  const { ca, cb } = p.open();
  const data = pattern(size);
  const rx = collect(cb!);
  writeAll(ca, data);
  p.run(budgetMs, () => rx.ended);
  return { ok: rx.ended, got: rx.bytes(), data };
}

describe('TCP data transfer', () => {
  it('4 MiB one way on a clean link, byte-identical, with window scaling', () => {
    const p = new Pair();
    const { ok, got, data } = transfer(p, 4 << 20, 10_000);
    expect(ok).toBe(true);
    expect(got.length).toBe(data.length);
    expect(Buffer.compare(got, data)).toBe(0);
    // Window scaling in use: some ACK advertised more than 65535 bytes.
    const maxWnd = Math.max(...p.log.filter((l) => !l.fromA && !(l.r.flags & 2)).map((l) => l.r.window * 128));
    expect(maxWnd).toBeGreaterThan(65535);
    expect(p.ca.get('tcp.retransmit.segments')).toBe(0);
    expect(p.ca.drops() + p.cb.drops()).toBe(0);
  });

  it('both directions at once, then a clean close on both sides', () => {
    const p = new Pair();
    const { ca, cb } = p.open();
    const d1 = pattern(1 << 20, 1);
    const d2 = pattern(700_000, 2);
    const ra = collect(ca);
    const rb = collect(cb!);
    const closed: string[] = [];
    ca.on('close', () => closed.push('a'));
    cb!.on('close', () => closed.push('b'));
    writeAll(ca, d1);
    writeAll(cb!, d2);
    p.run(5000, () => ra.ended && rb.ended);
    expect(Buffer.compare(rb.bytes(), d1)).toBe(0);
    expect(Buffer.compare(ra.bytes(), d2)).toBe(0);
    p.pump();
    expect(closed.sort()).toEqual(['a', 'b']);
    // Both ended at once: a simultaneous close (both FIN_WAIT_1 → CLOSING → TIME_WAIT) or,
    // if one FIN got there first, TIME_WAIT on one side and CLOSED on the other.
    expect([ca.state, cb!.state]).toContain(TcpState.TIME_WAIT);
    expect([TcpState.TIME_WAIT, TcpState.CLOSED]).toContain(ca.state);
    expect([TcpState.TIME_WAIT, TcpState.CLOSED]).toContain(cb!.state);
    p.run(60_001);
    expect(p.a.stats().connections + p.b.stats().connections).toBe(0);
  });

  for (const [name, faults] of [
    ['2% loss', { drop: 0.02, seed: 11 }],
    ['reordering', { reorder: 0.1, seed: 12 }],
    ['duplication', { dup: 0.05, seed: 13 }],
    ['loss + reordering + duplication', { drop: 0.03, reorder: 0.05, dup: 0.03, seed: 14 }],
  ] as const) {
    it(`3 MiB byte-identical through a link with ${name} (seeded)`, () => {
      const p = new Pair();
      p.open();
      p.setFaults(faults);
      const { ca, cb } = p.open();
      const data = pattern(3 << 20, 99);
      const rx = collect(cb!);
      writeAll(ca, data);
      p.run(600_000, () => rx.ended);
      expect(rx.ended).toBe(true);
      expect(rx.length()).toBe(data.length);
      expect(Buffer.compare(rx.bytes(), data)).toBe(0);
      if ('drop' in faults) expect(p.ca.get('tcp.retransmit.segments')).toBeGreaterThan(0);
    });
  }

  it('MTU 65520: segments of up to 65480 bytes', () => {
    const p = new Pair({}, {}, 65520);
    const { ok, got, data } = transfer(p, 2 << 20, 10_000);
    expect(ok).toBe(true);
    expect(Buffer.compare(got, data)).toBe(0);
    const biggest = Math.max(...p.log.filter((l) => l.fromA).map((l) => l.len));
    expect(biggest).toBe(65480 - 12);
  });

  it('without SACK and timestamps (NewReno) under loss', () => {
    const p = new Pair({ sack: false, timestamps: false, congestion: 'newreno' }, { sack: false, timestamps: false });
    p.setFaults({ drop: 0.02, seed: 5 });
    const { ok, got, data } = transfer(p, 1 << 20, 600_000);
    expect(ok).toBe(true);
    expect(Buffer.compare(got, data)).toBe(0);
    expect(p.ca.get('tcp.fast_retransmit')).toBeGreaterThan(0);
  });
});
