/**
 * One clock and one timer mechanism for the whole stack.
 *
 * Nothing in netstack/ reads the wall clock or calls setTimeout directly: every timer
 * (TCP retransmission, delayed ACK, DHCP lease expiry, fragment reassembly, NAT flow idle
 * timeouts) is a `Timer` taken from the injected `Clock`. Tests use `ManualClock`, which
 * only moves when told, so every timer path can be driven deterministically.
 *
 * Timers are intrusive entries of one binary min-heap. Re-arming a timer to a *later*
 * deadline does not touch the heap (the entry is re-filed when it surfaces), which is what
 * TCP does on every ACK; re-arming earlier is a decrease-key. Nothing is allocated per arm.
 */

export interface Clock {
  /** Milliseconds on a monotonic scale (fractional allowed). */
  now(): number;
  /** A timer that calls `fn` when it expires. It starts disarmed. */
  timer(fn: () => void): Timer;
}

export class Timer {
  /** Absolute deadline in ms, or -1 when disarmed. */
  deadline = -1;
  /** Key under which the entry sits in the heap (<= deadline), or -1 when not in the heap. */
  heapKey = -1;
  heapIndex = -1;

  constructor(
    private readonly wheel: TimerHeap,
    readonly fn: () => void,
  ) {}

  get armed(): boolean {
    return this.deadline >= 0;
  }

  /** Arm (or re-arm) to fire `delayMs` from now. */
  arm(delayMs: number): void {
    this.armAt(this.wheel.clock.now() + Math.max(0, delayMs));
  }

  /** Arm (or re-arm) to fire at absolute time `at`. */
  armAt(at: number): void {
    this.deadline = at;
    this.wheel.file(this);
  }

  /** Arm only if not already armed (keeps the earlier deadline). */
  armIfIdle(delayMs: number): void {
    if (this.deadline < 0) this.arm(delayMs);
  }

  cancel(): void {
    // Lazy: the heap entry is discarded when it surfaces.
    this.deadline = -1;
  }
}

/** The heap behind a clock. Clock implementations own one and drive `runDue`. */
export class TimerHeap {
  private heap: Timer[] = [];
  /** Called when the earliest heap key may have moved earlier. */
  onEarliestChanged: (() => void) | null = null;

  constructor(readonly clock: { now(): number }) {}

  get size(): number {
    return this.heap.length;
  }

  /** The earliest key in the heap, or -1 when empty. May be a stale (lazy) entry. */
  earliest(): number {
    return this.heap.length > 0 ? this.heap[0]!.heapKey : -1;
  }

  /** The earliest real deadline: settles cancelled and moved entries at the top first. */
  nextDeadline(): number {
    const h = this.heap;
    while (h.length > 0) {
      const t = h[0]!;
      if (t.deadline < 0) {
        this.pop();
        continue;
      }
      if (t.deadline > t.heapKey) {
        this.pop();
        t.heapKey = t.deadline;
        t.heapIndex = h.length;
        h.push(t);
        this.up(t.heapIndex);
        continue;
      }
      return t.deadline;
    }
    return -1;
  }

  file(t: Timer): void {
    if (t.heapIndex >= 0) {
      if (t.deadline < t.heapKey) {
        t.heapKey = t.deadline;
        this.up(t.heapIndex);
        if (t.heapIndex === 0) this.onEarliestChanged?.();
      }
      return;
    }
    t.heapKey = t.deadline;
    t.heapIndex = this.heap.length;
    this.heap.push(t);
    this.up(t.heapIndex);
    if (t.heapIndex === 0) this.onEarliestChanged?.();
  }

  /** Fire every timer whose deadline is <= now. Returns the number fired. */
  runDue(now: number): number {
    let fired = 0;
    const h = this.heap;
    while (h.length > 0 && h[0]!.heapKey <= now) {
      const t = this.pop();
      if (t.deadline < 0) continue; // cancelled
      if (t.deadline > now) {
        // Re-armed later while filed: re-file at the real deadline.
        t.heapKey = t.deadline;
        t.heapIndex = h.length;
        h.push(t);
        this.up(t.heapIndex);
        continue;
      }
      t.deadline = -1;
      fired++;
      t.fn();
    }
    return fired;
  }

  private pop(): Timer {
    const h = this.heap;
    const top = h[0]!;
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      last.heapIndex = 0;
      this.down(0);
    }
    top.heapIndex = -1;
    top.heapKey = -1;
    return top;
  }

  private up(i: number): void {
    const h = this.heap;
    const t = h[i]!;
    while (i > 0) {
      const p = (i - 1) >> 1;
      const pt = h[p]!;
      if (pt.heapKey <= t.heapKey) break;
      h[i] = pt;
      pt.heapIndex = i;
      i = p;
    }
    h[i] = t;
    t.heapIndex = i;
  }

  private down(i: number): void {
    const h = this.heap;
    const n = h.length;
    const t = h[i]!;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= n) break;
      const r = l + 1;
      const c = r < n && h[r]!.heapKey < h[l]!.heapKey ? r : l;
      const ct = h[c]!;
      if (ct.heapKey >= t.heapKey) break;
      h[i] = ct;
      ct.heapIndex = i;
      i = c;
    }
    h[i] = t;
    t.heapIndex = i;
  }
}

/** A clock that moves only when told: for tests. */
export class ManualClock implements Clock {
  private t: number;
  readonly heap: TimerHeap;

  constructor(start = 0) {
    this.t = start;
    this.heap = new TimerHeap(this);
  }

  now(): number {
    return this.t;
  }

  timer(fn: () => void): Timer {
    return new Timer(this.heap, fn);
  }

  /** Move time forward by `ms`, firing due timers in deadline order (time steps to each). */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      const e = this.heap.earliest();
      if (e < 0 || e > end) break;
      if (e > this.t) this.t = e;
      this.heap.runDue(this.t);
    }
    this.t = end;
  }

  /** Fire timers due at the current time without moving it. */
  runDue(): number {
    return this.heap.runDue(this.t);
  }

  /** Deadline of the next armed timer, or -1. */
  nextDeadline(): number {
    return this.heap.nextDeadline();
  }
}

/** Settled once: `.then()` on it queues a reaction, Node's cheapest way to run code at the next microtask checkpoint. */
const SETTLED = Promise.resolve();

/**
 * The real clock: `performance.now()` plus one Node timer for the earliest deadline.
 * The Node timer is unref'd so a stack with only idle timers does not keep the process up.
 *
 * `now()` reads the system clock once per callback: the value is kept until the next
 * microtask checkpoint, which Node runs after every callback it makes into JavaScript (each
 * readable descriptor, each timer, each immediate). One frame's path reads the time ~5 times
 * (segment arrival, timestamps, RTT sample, timer arms, the switch's MAC learning), a 1-byte
 * round trip ~9 times, ~50 ns each; caching costs one promise reaction (~30 ns) per callback.
 * Within one callback the stack thus sees time stand still, as it would with one `now`
 * passed down (smoltcp's way): a timer armed late in a long batch fires at most that batch's
 * duration early (microseconds to a few ms, against RTO and delayed-ACK delays of 40 ms+).
 */
export class SystemClock implements Clock {
  readonly heap: TimerHeap;
  private handle: NodeJS.Timeout | null = null;
  private handleAt = Infinity;
  /** performance.now() of this callback, or -1 when not read since the last checkpoint. */
  private cached = -1;
  private readonly forget = (): void => {
    this.cached = -1;
  };

  constructor() {
    this.heap = new TimerHeap(this);
    this.heap.onEarliestChanged = () => this.reschedule();
  }

  now(): number {
    let t = this.cached;
    if (t < 0) {
      t = this.cached = performance.now();
      void SETTLED.then(this.forget);
    }
    return t;
  }

  timer(fn: () => void): Timer {
    return new Timer(this.heap, fn);
  }

  private reschedule(): void {
    const e = this.heap.earliest();
    if (e < 0) return;
    if (this.handle && e >= this.handleAt) return;
    if (this.handle) clearTimeout(this.handle);
    this.handleAt = e;
    // Node clamps delays above 2^31-1 ms to 1 ms: cap them (we simply wake early and re-arm).
    const delay = Math.min(2 ** 31 - 1, Math.max(0, e - this.now()));
    this.handle = setTimeout(() => this.fire(), delay);
    this.handle.unref();
  }

  private fire(): void {
    this.handle = null;
    this.handleAt = Infinity;
    // Always a fresh reading here, so due timers never look early (Node checkpoints between
    // timer callbacks anyway; this does not rely on it).
    this.cached = -1;
    this.heap.runDue(this.now());
    this.reschedule();
  }

  /** Cancel the Node timer (the heap is left as it is). */
  stop(): void {
    if (this.handle) clearTimeout(this.handle);
    this.handle = null;
    this.handleAt = Infinity;
  }
}
