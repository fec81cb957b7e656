/**
 * Packet capture in the classic libpcap format (https://wiki.wireshark.org/Development/LibpcapFileFormat,
 * draft-ietf-opsawg-pcap): a 24-byte file header, then per frame a 16-byte record header
 * (seconds, micro- or nanoseconds, captured length, original length) and the bytes.
 *
 * Writing never blocks the stack: records are appended to in-memory chunks and written in the
 * background with async fs.write, one chunk at a time. When more than `maxBuffered` bytes are
 * waiting (the disk cannot keep up), whole records are dropped and counted rather than
 * stalling the event loop or growing without bound. A record is either buffered whole or not
 * at all, so a file cut short (crash, full disk) loses only its last, partial record: every
 * earlier record stays readable, which is what tcpdump's own files promise.
 *
 * Timestamps are wall-clock (what every pcap reader expects), not the stack's monotonic
 * clock; the source is injectable for tests.
 */
import * as fs from 'node:fs';
import type { Counters } from '../counters.js';
import { type FrameMeta, type Link, type LinkOffloads, type LinkReceiver, type LinkStats } from './link.js';

export const PCAP_MAGIC_MICRO = 0xa1b2c3d4;
export const PCAP_MAGIC_NANO = 0xa1b23c4d;
export const PCAP_SNAPLEN = 262144;
export const LINKTYPE_ETHERNET = 1;
const FILE_HEADER = 24;
const RECORD_HEADER = 16;
const CHUNK = 256 * 1024;

export interface PcapWriterOptions {
  /** Nanosecond timestamps (magic 0xa1b23c4d) instead of microseconds. */
  nanosecond?: boolean;
  /** Bytes kept per frame; longer frames are truncated (orig_len keeps the real length). */
  snaplen?: number;
  /** Bound on bytes waiting for the disk; beyond it records are dropped. Default 4 MiB. */
  maxBuffered?: number;
  /** Wall-clock milliseconds (fractional allowed). Default: sub-millisecond wall clock. */
  now?: () => number;
  /** Drops are counted as `pcap.drop.<reason>`. */
  counters?: Counters;
}

export interface PcapStats {
  records: number;
  bytes: number;
  /** Records dropped because the buffer was full or the file failed. */
  drops: number;
}

/** Wall clock with the sub-millisecond resolution of the monotonic clock. */
function wallClockMs(): number {
  return performance.timeOrigin + performance.now();
}

export class PcapWriter {
  readonly stats: PcapStats = { records: 0, bytes: 0, drops: 0 };
  /** The first write error; once set, every record is dropped. */
  error: Error | null = null;

  private readonly nano: boolean;
  private readonly snaplen: number;
  private readonly maxBuffered: number;
  private readonly now: () => number;
  private readonly counters: Counters | undefined;

  /** Chunks waiting for the disk, oldest first; the last one is being filled. */
  private chunks: { buf: Buffer; len: number; records: number }[] = [];
  private buffered = 0;
  private spare: Buffer | null = null;
  /** A write is scheduled or in flight. */
  private writing = false;
  /** chunks[0] is being written: nothing may be appended to it. */
  private headInFlight = false;
  private closing = false;
  private closedPromise: Promise<void> | null = null;
  private idleWaiters: (() => void)[] = [];

  private constructor(
    private readonly fd: number,
    readonly path: string,
    opts: PcapWriterOptions,
  ) {
    this.nano = opts.nanosecond ?? false;
    this.snaplen = opts.snaplen ?? PCAP_SNAPLEN;
    this.maxBuffered = opts.maxBuffered ?? 4 * 1024 * 1024;
    this.now = opts.now ?? wallClockMs;
    this.counters = opts.counters;
    const h = Buffer.alloc(FILE_HEADER);
    // Written in host byte order as libpcap does; readers detect the order from the magic.
    h.writeUInt32LE(this.nano ? PCAP_MAGIC_NANO : PCAP_MAGIC_MICRO, 0);
    h.writeUInt16LE(2, 4); // version 2.4
    h.writeUInt16LE(4, 6);
    h.writeInt32LE(0, 8); // thiszone: always 0 (timestamps are UTC)
    h.writeUInt32LE(0, 12); // sigfigs: always 0
    h.writeUInt32LE(this.snaplen, 16);
    h.writeUInt32LE(LINKTYPE_ETHERNET, 20);
    this.chunks.push({ buf: h, len: FILE_HEADER, records: 0 });
    this.buffered = FILE_HEADER;
    this.kick();
  }

  /** Create (truncate) `path` and write the file header. */
  static async open(path: string, opts: PcapWriterOptions = {}): Promise<PcapWriter> {
    // The callback API: a FileHandle would close its fd again when garbage-collected.
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(path, 'w', 0o644, (err, fd) => (err ? reject(err) : resolve(fd))),
    );
    return new PcapWriter(fd, path, opts);
  }

  /** Synchronous open, for callers wiring things up at startup. */
  static openSync(path: string, opts: PcapWriterOptions = {}): PcapWriter {
    return new PcapWriter(fs.openSync(path, 'w', 0o644), path, opts);
  }

  /** Record one frame (borrowed: it is copied). `atMs` overrides the timestamp source. */
  write(frame: Uint8Array, atMs?: number): void {
    if (this.closing || this.error) {
      this.drop(this.error ? 'io_error' : 'closed');
      return;
    }
    const incl = Math.min(frame.length, this.snaplen);
    const need = RECORD_HEADER + incl;
    if (this.buffered + need > this.maxBuffered) {
      this.drop('backlog');
      return;
    }
    let cur = this.chunks.length > 0 ? this.chunks[this.chunks.length - 1]! : null;
    // The head chunk may be in flight; never append to it.
    if (cur === null || (this.headInFlight && this.chunks.length === 1) || cur.buf.length - cur.len < need) {
      let buf: Buffer;
      if (need <= CHUNK) {
        buf = this.spare ?? Buffer.allocUnsafe(CHUNK);
        this.spare = null;
      } else {
        buf = Buffer.allocUnsafe(need);
      }
      cur = { buf, len: 0, records: 0 };
      this.chunks.push(cur);
    }
    const t = atMs ?? this.now();
    const sec = Math.floor(t / 1000);
    const frac = this.nano ? Math.floor((t - sec * 1000) * 1e6) : Math.floor((t - sec * 1000) * 1e3);
    const b = cur.buf;
    let o = cur.len;
    b.writeUInt32LE(sec >>> 0, o);
    b.writeUInt32LE(Math.min(frac, this.nano ? 999_999_999 : 999_999), o + 4);
    b.writeUInt32LE(incl, o + 8);
    b.writeUInt32LE(frame.length, o + 12);
    o += RECORD_HEADER;
    b.set(incl === frame.length ? frame : frame.subarray(0, incl), o);
    cur.len = o + incl;
    cur.records++;
    this.buffered += need;
    this.stats.records++;
    this.stats.bytes += frame.length;
    this.kick();
  }

  private drop(reason: string): void {
    this.stats.drops++;
    this.counters?.inc(`pcap.drop.${reason}`);
  }

  /** Start a background write of the oldest chunk if none is in flight. */
  private kick(): void {
    if (this.writing || this.chunks.length === 0) return;
    this.writing = true;
    // Let the rest of this tick's frames land in the same chunk first.
    setImmediate(() => this.writeHead(0));
  }

  private writeHead(done: number): void {
    const head = this.chunks[0];
    if (!head || this.error) {
      this.writing = false;
      this.headInFlight = false;
      this.settle();
      return;
    }
    this.headInFlight = true;
    fs.write(this.fd, head.buf, done, head.len - done, null, (err, n) => {
      if (err) {
        this.error = err;
        // Everything still buffered is lost (the head record may be cut short on disk;
        // the records before it are intact).
        for (const c of this.chunks) {
          this.stats.records -= c.records;
          this.stats.drops += c.records;
          this.counters?.inc('pcap.drop.io_error', c.records);
        }
        this.chunks = [];
        this.buffered = 0;
        this.writing = false;
        this.headInFlight = false;
        this.settle();
        return;
      }
      if (done + n < head.len) {
        this.writeHead(done + n); // short write: continue where it stopped
        return;
      }
      this.chunks.shift();
      this.headInFlight = false;
      this.buffered -= head.len;
      if (head.buf.length === CHUNK) this.spare = head.buf;
      if (this.chunks.length > 0) this.writeHead(0);
      else {
        this.writing = false;
        this.settle();
      }
    });
  }

  private settle(): void {
    if (this.writing) return;
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  /** Resolves once everything written so far is on disk (or failed). */
  flush(): Promise<void> {
    if (!this.writing && this.chunks.length === 0) return Promise.resolve();
    this.kick();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Flush, then close the file. Frames written after this are dropped. Idempotent. */
  close(): Promise<void> {
    if (this.closedPromise) return this.closedPromise;
    this.closing = true;
    this.closedPromise = this.flush().then(
      () =>
        new Promise<void>((resolve) => {
          fs.close(this.fd, () => resolve());
        }),
    );
    return this.closedPromise;
  }
}

/**
 * A Link that records both directions of another: frames received from the device and
 * frames the stack sends to it (recorded even if the device then drops them, as tcpdump on
 * an interface sees outgoing packets before the queue). The writer is not owned: several
 * links may share one file, and closing the link leaves the writer open.
 */
export class CaptureLink implements Link {
  constructor(
    readonly inner: Link,
    readonly writer: PcapWriter,
  ) {}

  get name(): string {
    return this.inner.name;
  }

  get mtu(): number {
    return this.inner.mtu;
  }

  get stats(): LinkStats {
    return this.inner.stats;
  }

  attach(rx: LinkReceiver): void {
    const w = this.writer;
    this.inner.attach({
      frame: (f, meta) => {
        w.write(f);
        rx.frame(f, meta);
      },
      batchEnd: rx.batchEnd ? () => rx.batchEnd!() : undefined,
      down: rx.down ? (r) => rx.down!(r) : undefined,
    });
  }

  /** As the inner link's: a capture records super-segments and partial checksums as they
   * pass, as tcpdump does on an interface with offloads. */
  get offloads(): LinkOffloads | undefined {
    return this.inner.offloads;
  }

  send(frame: Uint8Array, meta?: FrameMeta): void {
    this.writer.write(frame);
    this.inner.send(frame, meta);
  }

  flush(): void {
    this.inner.flush?.();
  }

  setCallerFlushes(on: boolean): void {
    this.inner.setCallerFlushes?.(on);
  }

  close(): void {
    this.inner.close();
  }
}

/** Wrap `link` so both directions are recorded to `writer`. */
export function capture(link: Link, writer: PcapWriter): Link {
  return new CaptureLink(link, writer);
}
