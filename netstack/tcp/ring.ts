/**
 * A growable byte ring: the send buffer (bytes from snd.una on: sent-unacknowledged, then
 * unsent) and the receive buffer (bytes from the application's read point on: in-order
 * unread data, then out-of-order data written at its offset and tracked by the Assembler).
 *
 * Storage grows by doubling up to `max`, lazily, so hundreds of mostly idle connections do
 * not each hold a multi-megabyte buffer. Positions are offsets from the head (the oldest
 * byte). Copies in and out handle the wrap; nothing else allocates.
 */
const MIN_CAPACITY = 4096;

export class ByteRing {
  private buf: Uint8Array = new Uint8Array(0);
  private head = 0;
  /** Bytes from the head that are "present" (readable / queued). */
  length = 0;

  constructor(readonly max: number) {}

  get capacity(): number {
    return this.buf.length;
  }

  /** Make room for bytes up to offset `extent` from the head. False if beyond `max`. */
  ensure(extent: number, limit = this.max): boolean {
    if (extent <= this.buf.length) return true;
    if (extent > limit) return false;
    let cap = Math.max(MIN_CAPACITY, this.buf.length);
    while (cap < extent) cap *= 2;
    const nb = new Uint8Array(cap);
    // Copy the whole old ring in head order: it may hold out-of-order bytes past `length`.
    const old = this.buf;
    if (old.length > 0) {
      nb.set(old.subarray(this.head), 0);
      nb.set(old.subarray(0, this.head), old.length - this.head);
    }
    this.buf = nb;
    this.head = 0;
    return true;
  }

  /** Copy `src` to offset `pos` from the head (the caller ensured room). */
  writeAt(pos: number, src: Uint8Array): void {
    const cap = this.buf.length;
    const p = (this.head + pos) & (cap - 1);
    const first = Math.min(src.length, cap - p);
    this.buf.set(first === src.length ? src : src.subarray(0, first), p);
    if (first < src.length) this.buf.set(src.subarray(first), 0);
  }

  /** Append after `length` (growing without the `max` bound: the send side enforces its own high-water mark). */
  append(src: Uint8Array): void {
    this.ensure(this.length + src.length, Infinity);
    this.writeAt(this.length, src);
    this.length += src.length;
  }

  /** Copy `n` bytes starting at offset `pos` from the head into `dst[dstOff..]`. */
  copyOut(pos: number, n: number, dst: Uint8Array, dstOff: number): void {
    const cap = this.buf.length;
    const p = (this.head + pos) & (cap - 1);
    if (n <= 32) {
      // A few bytes (interactive traffic): a loop costs less than the subarray views below.
      const b = this.buf;
      for (let i = 0; i < n; i++) dst[dstOff + i] = b[(p + i) & (cap - 1)]!;
      return;
    }
    const first = Math.min(n, cap - p);
    dst.set(this.buf.subarray(p, p + first), dstOff);
    if (first < n) dst.set(this.buf.subarray(0, n - first), dstOff + first);
  }

  /** Drop `n` bytes from the head. */
  consume(n: number): void {
    if (n <= 0) return;
    this.head = (this.head + n) & (this.buf.length - 1);
    this.length -= n;
  }

  /** Remove and return the first `n` bytes as a new array (owned by the caller). */
  read(n: number): Uint8Array {
    // Every byte is overwritten below: skip the zero-fill `new Uint8Array` would do (megabytes
    // per batch on a fast upload).
    const out = Buffer.allocUnsafe(n);
    if (n > 0) this.copyOut(0, n, out, 0);
    this.consume(n);
    return out;
  }
}
