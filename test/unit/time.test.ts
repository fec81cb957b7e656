/** The clock and timer heap: ManualClock deterministically, SystemClock with short real delays. */
import fc from 'fast-check';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ManualClock, SystemClock, type Timer } from '../../netstack/time.js';

describe('ManualClock', () => {
  it('fires timers in deadline order, stepping time to each deadline', () => {
    const c = new ManualClock(1000);
    const log: string[] = [];
    for (const [name, d] of [['c', 300], ['a', 100], ['d', 300], ['b', 200]] as const) {
      c.timer(() => log.push(`${name}@${c.now()}`)).arm(d);
    }
    c.advance(250);
    expect(log).toEqual(['a@1100', 'b@1200']);
    expect(c.now()).toBe(1250);
    c.advance(1000);
    expect(log.slice(2).sort()).toEqual(['c@1300', 'd@1300']);
    expect(c.now()).toBe(2250);
  });

  it('fires a timer exactly at its deadline, not before', () => {
    const c = new ManualClock();
    let n = 0;
    c.timer(() => n++).arm(10);
    c.advance(9.5);
    expect(n).toBe(0);
    c.advance(0.5);
    expect(n).toBe(1);
  });

  it('re-arming later moves the deadline (fires once, at the new time)', () => {
    const c = new ManualClock();
    const at: number[] = [];
    const t = c.timer(() => at.push(c.now()));
    t.arm(100);
    t.arm(200);
    c.advance(150);
    expect(at).toEqual([]);
    expect(t.armed).toBe(true);
    c.advance(100);
    expect(at).toEqual([200]);
    expect(t.armed).toBe(false);
  });

  it('re-arming earlier fires at the earlier time, once', () => {
    const c = new ManualClock();
    const at: number[] = [];
    const t = c.timer(() => at.push(c.now()));
    t.arm(200);
    t.armAt(50);
    c.advance(1000);
    expect(at).toEqual([50]);
  });

  it('cancel prevents firing; a cancelled timer can be re-armed, earlier or later', () => {
    const c = new ManualClock();
    const at: number[] = [];
    const t = c.timer(() => at.push(c.now()));
    t.arm(100);
    t.cancel();
    expect(t.armed).toBe(false);
    c.advance(500);
    expect(at).toEqual([]);
    t.arm(100);
    t.cancel();
    t.arm(50);
    c.advance(60);
    expect(at).toEqual([550]);
    t.arm(10);
    t.cancel();
    t.arm(300);
    c.advance(1000);
    expect(at).toEqual([550, 860]);
  });

  it('armIfIdle keeps the earlier deadline', () => {
    const c = new ManualClock();
    const at: number[] = [];
    const t = c.timer(() => at.push(c.now()));
    t.armIfIdle(100);
    t.armIfIdle(10);
    t.armIfIdle(500);
    c.advance(1000);
    expect(at).toEqual([100]);
    t.armIfIdle(5);
    c.advance(10);
    expect(at).toEqual([100, 1005]);
  });

  it('runs timers armed from inside a callback, within the same advance', () => {
    const c = new ManualClock();
    const at: string[] = [];
    const periodic: Timer = c.timer(() => {
      at.push(`p${c.now()}`);
      if (c.now() < 500) periodic.arm(100);
    });
    const once = c.timer(() => at.push(`o${c.now()}`));
    const starter = c.timer(() => {
      at.push(`s${c.now()}`);
      once.arm(0); // due now: fires in this same advance
      periodic.arm(100);
    });
    starter.arm(50);
    c.advance(10_000);
    expect(at).toEqual(['s50', 'o50', 'p150', 'p250', 'p350', 'p450', 'p550']);
  });

  it('a negative delay means now; runDue fires what is due without moving time', () => {
    const c = new ManualClock(7);
    let n = 0;
    c.timer(() => n++).arm(-5);
    expect(c.runDue()).toBe(1);
    expect(n).toBe(1);
    expect(c.now()).toBe(7);
    expect(c.runDue()).toBe(0);
  });

  it('nextDeadline reports the earliest deadline', () => {
    const c = new ManualClock();
    expect(c.nextDeadline()).toBe(-1);
    c.timer(() => {}).arm(30);
    c.timer(() => {}).arm(20);
    expect(c.nextDeadline()).toBe(20);
  });

  // Regression (was a bug): nextDeadline() is documented as "the next armed timer, or -1" but returns
  // the stale heap key of a cancelled (or re-armed-later) timer until it surfaces. A caller
  // sleeping until nextDeadline() wakes for nothing. Fix: pop cancelled entries and re-file
  // moved ones at the top before answering (the same loop as runDue, without firing).
  it('nextDeadline ignores cancelled timers', () => {
    const c = new ManualClock();
    const t = c.timer(() => {});
    t.arm(20);
    t.cancel();
    expect(c.nextDeadline()).toBe(-1);
  });

  it('many timers with random arms, re-arms and cancels fire exactly as a simple model says', () => {
    type Op = { k: 'arm'; id: number; d: number } | { k: 'idle'; id: number; d: number } | { k: 'cancel'; id: number } | { k: 'adv'; ms: number };
    const N = 40;
    const op: fc.Arbitrary<Op> = fc.oneof(
      fc.record({ k: fc.constant('arm' as const), id: fc.nat(N - 1), d: fc.nat(1000) }),
      fc.record({ k: fc.constant('idle' as const), id: fc.nat(N - 1), d: fc.nat(1000) }),
      fc.record({ k: fc.constant('cancel' as const), id: fc.nat(N - 1) }),
      fc.record({ k: fc.constant('adv' as const), ms: fc.nat(400) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 300 }), (ops) => {
        const c = new ManualClock();
        const fired: [number, number][] = [];
        const timers = Array.from({ length: N }, (_, id) => c.timer(() => fired.push([c.now(), id])));
        const model = new Map<number, number>();
        const expected: [number, number][] = [];
        let now = 0;
        for (const o of [...ops, { k: 'adv', ms: 2000 } as Op]) {
          if (o.k === 'arm') {
            timers[o.id]!.arm(o.d);
            model.set(o.id, now + o.d);
          } else if (o.k === 'idle') {
            timers[o.id]!.armIfIdle(o.d);
            if (!model.has(o.id)) model.set(o.id, now + o.d);
          } else if (o.k === 'cancel') {
            timers[o.id]!.cancel();
            model.delete(o.id);
          } else {
            now += o.ms;
            const due = [...model].filter(([, d]) => d <= now).sort((a, b) => a[1] - b[1] || a[0] - b[0]);
            for (const [id, d] of due) {
              expected.push([d, id]);
              model.delete(id);
            }
            c.advance(o.ms);
            expect(c.now()).toBe(now);
          }
          for (let id = 0; id < N; id++) expect(timers[id]!.armed).toBe(model.has(id));
        }
        // Fire times never go backwards; same-time ties may come in any order.
        for (let i = 1; i < fired.length; i++) expect(fired[i]![0]).toBeGreaterThanOrEqual(fired[i - 1]![0]);
        const key = (a: [number, number][]) => a.map(([t, id]) => `${t}:${id}`).sort();
        expect(key(fired)).toEqual(key(expected));
      }),
      { numRuns: 300 },
    );
  });

  it('handles 20 000 timers', () => {
    const c = new ManualClock();
    const fired: number[] = [];
    const ts: Timer[] = [];
    for (let i = 0; i < 20_000; i++) {
      const t = c.timer(() => fired.push(c.now()));
      t.arm((i * 7919) % 10_007);
      ts.push(t);
    }
    for (let i = 0; i < 20_000; i += 3) ts[i]!.cancel();
    c.advance(20_000);
    expect(fired.length).toBe(20_000 - Math.ceil(20_000 / 3));
    for (let i = 1; i < fired.length; i++) expect(fired[i]!).toBeGreaterThanOrEqual(fired[i - 1]!);
  });
});

describe('SystemClock', () => {
  let clock: SystemClock | null = null;
  afterEach(() => {
    clock?.stop();
    clock = null;
    vi.restoreAllMocks();
  });

  async function until(cond: () => boolean, maxMs = 2000): Promise<void> {
    const end = performance.now() + maxMs;
    while (!cond()) {
      if (performance.now() > end) throw new Error('condition not reached');
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  it('fires real timers, in order, not before their deadline', async () => {
    clock = new SystemClock();
    const c = clock;
    const log: [string, number][] = [];
    const t0 = c.now();
    c.timer(() => log.push(['b', c.now() - t0])).arm(30);
    c.timer(() => log.push(['a', c.now() - t0])).arm(10);
    await until(() => log.length === 2);
    expect(log.map((l) => l[0])).toEqual(['a', 'b']);
    expect(log[0]![1]).toBeGreaterThanOrEqual(10);
    expect(log[1]![1]).toBeGreaterThanOrEqual(30);
  });

  it('an earlier timer armed after a later one still fires first; cancel works', async () => {
    clock = new SystemClock();
    const c = clock;
    const log: string[] = [];
    c.timer(() => log.push('late')).arm(60);
    const cancelled = c.timer(() => log.push('cancelled'));
    cancelled.arm(5);
    cancelled.cancel();
    c.timer(() => log.push('early')).arm(15);
    await until(() => log.length >= 2);
    expect(log).toEqual(['early', 'late']);
  });

  it('reads the clock once per callback: time stands still until the next microtask checkpoint', async () => {
    clock = new SystemClock();
    const a = clock.now();
    const spinUntil = performance.now() + 2;
    while (performance.now() < spinUntil) {
      /* let real time pass within one synchronous stretch */
    }
    expect(clock.now()).toBe(a);
    await null;
    expect(clock.now()).toBeGreaterThan(a);
  });

  it('re-arms from inside a callback', async () => {
    clock = new SystemClock();
    const c = clock;
    let n = 0;
    const t: Timer = c.timer(() => {
      if (++n < 3) t.arm(5);
    });
    t.arm(5);
    await until(() => n === 3);
    expect(t.armed).toBe(false);
  });

  // Regression (was a bug): Node clamps a setTimeout delay above 2^31-1 ms (24.8 days) to 1 ms, so a timer armed
  // that far out (an infinite DHCP lease, a long idle timeout) makes SystemClock wake every
  // millisecond: runDue finds nothing due, reschedule asks for the same delay again.
  // Fix: in SystemClock.reschedule, `const delay = Math.min(2 ** 31 - 1, Math.max(0, e - this.now()))`.
  //
  it('never asks Node for a delay it would clamp to 1 ms', () => {
    const spy = vi.spyOn(globalThis, 'setTimeout');
    clock = new SystemClock();
    clock.timer(() => {}).arm(30 * 24 * 3600 * 1000);
    const delays = spy.mock.calls.map((call) => call[1] ?? 0);
    clock.stop();
    expect(delays.length).toBeGreaterThan(0);
    for (const d of delays) expect(d).toBeLessThanOrEqual(2 ** 31 - 1);
  });
});
