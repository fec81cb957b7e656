/**
 * QEMU `-netdev stream` (QEMU 7.2+; `-netdev socket` before it): Ethernet frames over a byte
 * stream (unix or TCP), each preceded by its length as a 4-byte big-endian integer, with no
 * virtio-net header (QEMU net/stream.c, `net_stream_receive`/`net_fill_rstate`).
 *
 * Receive: `StreamDecoder` cuts frames out of the chunks the socket delivers. A frame that
 * lies inside one chunk is handed out as a view into that chunk; only a frame that straddles
 * chunks is copied, into one scratch buffer reused for every such frame (the frame is
 * borrowed, see link.ts), as ws's receiver does. A length of 0 or above mtu + 18 cannot come
 * from QEMU (its virtio-net never sends an empty frame, and the guest cannot exceed the MTU we
 * were told plus the Ethernet header and a VLAN tag), so it means the stream lost sync; there
 * is no resync marker in this framing, so the connection is closed.
 *
 * Send: frames are copied (borrowed) into one pending buffer, length prefix included, and the
 * batch goes out in one `socket.write` per event-loop turn (or at `flush()`). While the socket pushes back (`write()`
 * returned false) frames keep accumulating up to a bound, beyond which they are dropped and
 * counted until 'drain': a stalled VMM must not grow our memory without limit, and a dropped
 * frame is what a full NIC queue does anyway.
 *
 * QEMU 7.2 cannot reconnect (`reconnect=` came in 8.x), so when QEMU is the client the
 * listener must exist before QEMU starts: `StreamLink.listen()` then start QEMU. When QEMU is
 * `server=on`, `StreamLink.connect()`.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { Counters } from '../counters.js';
import { type Link, type LinkReceiver, type LinkStats, MAX_L2_OVERHEAD, newLinkStats } from './link.js';

/** Largest frame QEMU's stream backend can carry: a 65535-byte MTU plus the L2 header. */
export const STREAM_MAX_FRAME = 65535 + MAX_L2_OVERHEAD;
/** Default bound on bytes waiting to be written while the socket pushes back. */
export const STREAM_DEFAULT_MAX_PENDING = 4 * 1024 * 1024;

const INITIAL_OUT = 64 * 1024;
const FREE_BUFFERS = 4;

export type StreamAddress = { path: string } | { host: string; port: number };

/** The subset of a pino logger used here. */
export interface StreamLog {
  warn(msg: string): void;
}

export interface StreamLinkOptions {
  name?: string;
  /** Interface MTU; frames up to mtu + 18 are accepted. Default 1500. */
  mtu?: number;
  /** Bound on buffered output while the socket is not draining. Default 4 MiB. */
  maxPending?: number;
  /** Drops are counted here as `stream.drop.<reason>` in addition to the link's stats. */
  counters?: Counters;
  log?: StreamLog;
}

/** What the decoder reports back: frames, end of a chunk, a protocol error. */
export interface StreamDecoderSink {
  frame(frame: Uint8Array): void;
  batchEnd(): void;
  /** The stream is desynchronised; the decoder ignores all further input. */
  error(reason: string, length: number): void;
}

/**
 * Splits a byte stream into length-prefixed frames. Holds at most 3 bytes of a pending
 * length and one partial frame (in `scratch`) between chunks.
 */
export class StreamDecoder {
  private readonly scratch: Uint8Array;
  private readonly lenBytes = new Uint8Array(4);
  /** Bytes of the length prefix collected so far (0..3) while waiting for the rest. */
  private lenHave = 0;
  /** Length of the frame being assembled in `scratch`, or -1 when none. */
  private partialLen = -1;
  private partialHave = 0;
  private failed = false;

  constructor(
    readonly maxFrame: number,
    private readonly sink: StreamDecoderSink,
  ) {
    this.scratch = new Uint8Array(maxFrame);
  }

  get desynchronised(): boolean {
    return this.failed;
  }

  /** Feed one chunk; the chunk must stay untouched only for the duration of the call. */
  push(chunk: Uint8Array): void {
    if (this.failed) return;
    const n = chunk.length;
    let off = 0;
    while (off < n) {
      if (this.partialLen >= 0) {
        // Continue a frame that straddles chunks.
        const take = Math.min(n - off, this.partialLen - this.partialHave);
        this.scratch.set(chunk.subarray(off, off + take), this.partialHave);
        this.partialHave += take;
        off += take;
        if (this.partialHave === this.partialLen) {
          const len = this.partialLen;
          this.partialLen = -1;
          this.sink.frame(this.scratch.subarray(0, len));
        }
        continue;
      }
      let len: number;
      if (this.lenHave > 0 || n - off < 4) {
        // The length prefix itself is split across chunks.
        while (this.lenHave < 4 && off < n) this.lenBytes[this.lenHave++] = chunk[off++]!;
        if (this.lenHave < 4) break;
        this.lenHave = 0;
        const b = this.lenBytes;
        len = ((b[0]! << 24) | (b[1]! << 16) | (b[2]! << 8) | b[3]!) >>> 0;
      } else {
        len = ((chunk[off]! << 24) | (chunk[off + 1]! << 16) | (chunk[off + 2]! << 8) | chunk[off + 3]!) >>> 0;
        off += 4;
      }
      if (len === 0 || len > this.maxFrame) {
        this.failed = true;
        this.sink.error(len === 0 ? 'zero_length' : 'oversize', len);
        return;
      }
      if (n - off >= len) {
        // The common case: the whole frame is in this chunk; lend a view, no copy.
        this.sink.frame(chunk.subarray(off, off + len));
        off += len;
      } else {
        this.partialLen = len;
        this.partialHave = 0;
      }
    }
    this.sink.batchEnd();
  }
}

export class StreamLink implements Link {
  readonly name: string;
  readonly mtu: number;
  readonly stats: LinkStats = newLinkStats();
  /** Largest frame accepted either way: mtu + Ethernet header + one 802.1Q tag. */
  readonly maxFrame: number;
  /** Set when the link went down (peer closed, error, protocol error, close()). */
  downReason: string | null = null;

  private rx: LinkReceiver | null = null;
  private readonly decoder: StreamDecoder;
  private readonly maxPending: number;
  private readonly counters: Counters | undefined;
  private readonly log: StreamLog | undefined;

  /** Pending output: length-prefixed frames not yet handed to the socket. */
  private out: Buffer = Buffer.allocUnsafe(INITIAL_OUT);
  private outLen = 0;
  /** Output buffers the socket has finished with. */
  private readonly free: Buffer[] = [];
  private flushQueued = false;
  /** True between a `write()` that returned false and the next 'drain'. */
  private blocked = false;
  private closed = false;

  constructor(
    readonly socket: net.Socket,
    opts: StreamLinkOptions = {},
  ) {
    this.name = opts.name ?? 'stream';
    this.mtu = opts.mtu ?? 1500;
    this.maxPending = opts.maxPending ?? STREAM_DEFAULT_MAX_PENDING;
    this.counters = opts.counters;
    this.log = opts.log;
    this.maxFrame = Math.min(this.mtu + MAX_L2_OVERHEAD, STREAM_MAX_FRAME);
    this.decoder = new StreamDecoder(this.maxFrame, {
      frame: (f) => {
        this.stats.rxFrames++;
        this.stats.rxBytes += f.length;
        this.rx?.frame(f);
      },
      batchEnd: () => this.rx?.batchEnd?.(),
      error: (reason, len) => {
        this.stats.rxDrops++;
        this.counters?.inc(`stream.drop.${reason}`);
        this.log?.warn(`${this.name}: frame length ${len} (${reason}): stream desynchronised, closing`);
        this.goDown(`protocol error: frame length ${len}`);
        this.socket.destroy();
      },
    });
    // TCP only: batches are already coalesced per loop turn, Nagle would only add latency.
    if (socket.remotePort !== undefined) socket.setNoDelay(true);
    socket.on('drain', () => {
      this.blocked = false;
      if (this.outLen > 0) this.flush();
    });
    socket.on('error', (err) => this.goDown(`socket error: ${err.message}`));
    socket.on('close', () => this.goDown('peer closed'));
    socket.on('end', () => this.goDown('peer closed'));
  }

  /** Reading starts here: until a receiver is attached, frames wait in the socket. */
  attach(rx: LinkReceiver): void {
    const first = this.rx === null;
    this.rx = rx;
    if (!first) return;
    // Receivers get plain Uint8Array views: Buffer.slice() is a view too, and a receiver
    // that copies a borrowed frame with .slice() (the Uint8Array way) must get a copy.
    this.socket.on('data', (chunk: Buffer) =>
      this.decoder.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length)),
    );
  }

  send(frame: Uint8Array): void {
    if (this.closed || this.downReason !== null) {
      this.drop('down');
      return;
    }
    if (frame.length === 0 || frame.length > this.maxFrame) {
      // QEMU would take it as a protocol error and drop the connection (net_fill_rstate).
      this.drop('tx_bad_length');
      return;
    }
    const need = 4 + frame.length;
    if (this.outLen + need > this.out.length) {
      if (this.outLen + need > this.maxPending) {
        this.drop('tx_backlog');
        return;
      }
      let size = this.out.length * 2;
      while (size < this.outLen + need) size *= 2;
      const bigger = Buffer.allocUnsafe(Math.min(size, Math.max(this.maxPending, need)));
      this.out.copy(bigger, 0, 0, this.outLen);
      this.out = bigger;
    }
    this.out.writeUInt32BE(frame.length, this.outLen);
    this.out.set(frame, this.outLen + 4);
    this.outLen += need;
    this.stats.txFrames++;
    this.stats.txBytes += frame.length;
    if (!this.blocked && !this.flushQueued) {
      this.flushQueued = true;
      // setImmediate, as fd-link.ts does: it runs once after the whole poll phase, so frames
      // produced by every descriptor that woke up together leave in one write, at no
      // latency cost (libuv polls with a zero timeout while an immediate is pending).
      setImmediate(() => {
        this.flushQueued = false;
        this.flush();
      });
    }
  }

  /**
   * Hand the pending batch to the socket in one write now (the caller finished a burst);
   * otherwise it goes at the end of the tick. Held back while the socket pushes back.
   */
  flush(): void {
    if (this.outLen === 0 || this.blocked || this.socket.destroyed) return;
    const buf = this.out;
    const batch = buf.subarray(0, this.outLen);
    // The socket holds this buffer until the bytes reach the kernel; the next batch goes
    // into a recycled one, so a steady flow allocates nothing.
    this.out = this.free.pop() ?? Buffer.allocUnsafe(INITIAL_OUT);
    this.outLen = 0;
    const recycle = buf.length === INITIAL_OUT && this.free.length < FREE_BUFFERS;
    const ok = this.socket.write(batch, recycle ? (err) => err || this.free.push(buf) : undefined);
    if (!ok) this.blocked = true;
  }

  private drop(reason: string): void {
    this.stats.txDrops++;
    this.counters?.inc(`stream.drop.${reason}`);
  }

  private goDown(reason: string): void {
    if (this.downReason !== null) return;
    this.downReason = reason;
    if (!this.closed) this.rx?.down?.(reason);
  }

  /** Write what is pending, half-close, and release the socket once the data is out. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.downReason === null) this.downReason = 'closed';
    const s = this.socket;
    if (s.destroyed) return;
    if (this.outLen > 0) s.write(this.out.subarray(0, this.outLen));
    this.outLen = 0;
    // A peer that never reads would keep the socket half-open forever: give up after 2 s
    // of inactivity (a socket idle timeout, not a stack timer).
    s.setTimeout(2000, () => s.destroy());
    s.end(() => s.destroy());
  }

  /**
   * Listen for exactly one VMM connection (QEMU `server=off`). Start the VMM after this
   * resolves. A connection arriving while one is already accepted is closed and logged:
   * two writers interleaving on one virtual NIC cannot be what anyone meant.
   */
  static async listen(
    addr: StreamAddress,
    opts: StreamLinkOptions = {},
  ): Promise<{ server: net.Server; accepted: Promise<StreamLink>; address: StreamAddress }> {
    const server = net.createServer({ pauseOnConnect: false });
    let resolveAccepted!: (l: StreamLink) => void;
    let rejectAccepted!: (e: Error) => void;
    const accepted = new Promise<StreamLink>((res, rej) => {
      resolveAccepted = res;
      rejectAccepted = rej;
    });
    accepted.catch(() => {}); // the caller may never await it; closing the server rejects it
    let current: StreamLink | null = null;
    server.on('connection', (sock) => {
      if (current !== null) {
        opts.counters?.inc('stream.drop.second_connection');
        opts.log?.warn(`${opts.name ?? 'stream'}: refusing a second connection while one is attached`);
        sock.destroy();
        return;
      }
      current = new StreamLink(sock, opts);
      resolveAccepted(current);
    });
    server.on('close', () => rejectAccepted(new Error('stream listener closed before a connection')));

    await listenWithStaleCleanup(server, addr);
    // After listen, errors (EMFILE on accept) must not become an uncaught 'error' event.
    server.on('error', (e) => opts.log?.warn(`${opts.name ?? 'stream'}: listener error: ${e.message}`));
    const a = server.address();
    const address: StreamAddress =
      'path' in addr ? { path: addr.path } : { host: addr.host, port: (a as net.AddressInfo).port };
    return { server, accepted, address };
  }

  /** Connect to a VMM listening (QEMU `server=on`). */
  static connect(addr: StreamAddress, opts: StreamLinkOptions = {}): Promise<StreamLink> {
    return new Promise((resolve, reject) => {
      const sock = 'path' in addr ? net.connect({ path: addr.path }) : net.connect({ host: addr.host, port: addr.port });
      const onError = (e: Error) => reject(e);
      sock.once('error', onError);
      sock.once('connect', () => {
        sock.off('error', onError);
        resolve(new StreamLink(sock, opts));
      });
    });
  }
}

/**
 * A unix socket path left by a process that died still exists and makes listen() fail with
 * EADDRINUSE. Remove it only when nothing answers on it, so a live listener is never stolen.
 */
async function listenWithStaleCleanup(server: net.Server, addr: StreamAddress): Promise<void> {
  const tryListen = () =>
    new Promise<void>((resolve, reject) => {
      const onError = (e: Error) => reject(e);
      server.once('error', onError);
      const done = () => {
        server.off('error', onError);
        resolve();
      };
      if ('path' in addr) server.listen(addr.path, done);
      else server.listen(addr.port, addr.host, done);
    });
  try {
    await tryListen();
  } catch (e) {
    if (!('path' in addr) || (e as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw e;
    const live = await new Promise<boolean>((resolve) => {
      const s = net.connect({ path: addr.path });
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (live) throw e;
    fs.rmSync(addr.path, { force: true });
    await tryListen();
  }
}
