/**
 * Joins a connection of the userspace TCP engine to a host socket: bytes both ways with
 * backpressure, half-close, resets. Both the NAT (guest → host) and port forwarding
 * (host → guest) use this one function, so the mapping of host behaviour to guest behaviour
 * lives in exactly one place:
 *
 * | host socket                    | guest connection                       |
 * |--------------------------------|----------------------------------------|
 * | data; write() full             | write(); the guest's window closes as our buffer fills |
 * | 'end' (peer FIN)               | end(): FIN after the queued data        |
 * | error / reset                  | destroy(): RST                          |
 * | (guest data) write() → false   | pause(): our receive window closes      |
 *
 * and the reverse for guest events: 'data' → socket.write (pausing the engine when the host
 * socket's buffer is full), 'end' (guest FIN) → socket.end(), 'error' (guest RST or timeout)
 * → socket.resetAndDestroy() so the host peer sees a reset rather than a clean close.
 *
 * Memory per bridged connection is bounded by the engine's send/receive buffers plus the host
 * socket's high-water mark: neither side ever queues without limit.
 */
import type net from 'node:net';
import { isNativeError, sendSome } from '../../native/index.js';
import type { Counters } from '../counters.js';
import type { TcpConnection } from '../tcp/connection.js';

export interface BridgeStats {
  toGuest: number;
  toHost: number;
}

/**
 * Host reads into one shared buffer instead of a fresh Buffer per read (net's `onread`): the
 * engine copies what it is given into its send ring at once, so nothing keeps a reference, and
 * a fast download no longer allocates 64 KiB per read for the GC to collect. The socket must
 * be created with `hostRead.option()`; `bridge` connects it to the guest connection.
 */
export class HostReader {
  private static readonly shared = Buffer.allocUnsafe(128 * 1024);
  /** Set by bridge(); returns false to pause the socket (Node's onread contract). */
  sink: ((chunk: Uint8Array) => boolean) | null = null;

  option(): { buffer: Buffer; callback: (n: number, buf: Buffer) => boolean } {
    return {
      buffer: HostReader.shared,
      callback: (n, buf) => (this.sink ? this.sink(buf.subarray(0, n)) : true),
    };
  }
}

export function bridge(conn: TcpConnection, sock: net.Socket, counters: Counters, onClose?: (s: BridgeStats) => void, reader?: HostReader): void {
  const stats: BridgeStats = { toGuest: 0, toHost: 0 };
  let sockClosed = false;
  let connClosed = false;
  const done = () => {
    if (sockClosed && connClosed) onClose?.(stats);
  };

  // host → guest
  const toGuest = (chunk: Uint8Array): boolean => {
    stats.toGuest += chunk.length;
    return conn.write(chunk);
  };
  if (reader) {
    // Returning false pauses the socket; 'drain' resumes it.
    reader.sink = toGuest;
  } else {
    sock.on('data', (chunk: Buffer) => {
      if (!toGuest(chunk)) sock.pause();
    });
  }
  // What the TCP offload needs to read and write this socket itself (tcp/offload.ts). Reading
  // is stopped and restarted on the handle itself (as net's own tryReadStart does), not with
  // pause()/resume(), which for a socket without `onread` only stop emitting while Node keeps
  // reading into the stream's buffer, behind the offload's back.
  const handle = () => (sock as unknown as { _handle?: { fd?: number; reading?: boolean; readStop(): number; readStart(): number } | null })._handle;
  conn.host = {
    fd: () => handle()?.fd ?? -1,
    idle: () =>
      !sock.destroyed && !sock.connecting && !sock.writableEnded && !sock.readableEnded && sock.writableLength === 0 &&
      handle()?.reading === true && (reader !== undefined || (sock.readableFlowing === true && sock.readableLength === 0)),
    pause: () => {
      const h = handle();
      if (h && h.reading) {
        h.reading = false;
        h.readStop();
      }
    },
    resume: () => {
      const h = handle();
      if (h && !h.reading && !sock.destroyed) {
        h.reading = true;
        h.readStart();
      }
    },
  };
  conn.on('drain', () => sock.resume());
  sock.on('end', () => conn.end());
  sock.on('error', (err: NodeJS.ErrnoException) => {
    counters.inc(`tcp_bridge.host_error.${err.code ?? 'UNKNOWN'}`);
  });
  sock.on('close', (hadError) => {
    sockClosed = true;
    conn.host = null;
    conn.directSink = null;
    // An error on the host side (reset, timeout) resets the guest; a clean close already
    // sent our FIN via 'end' and the engine finishes the close by itself.
    if (hadError) conn.destroy();
    else if (!sock.readableEnded) conn.destroy();
    done();
  });

  // guest → host: as segments arrive while Node has nothing queued (no copy through the
  // engine's receive ring), else through 'data' and socket.write() in order.
  conn.directSink = (data) => {
    const rest = writeDirect(sock, data);
    const took = rest === null ? data.length : data.length - rest.length;
    stats.toHost += took;
    return took;
  };
  conn.on('data', (data: Uint8Array) => {
    stats.toHost += data.length;
    const rest = writeDirect(sock, data);
    if (rest !== null && !sock.write(rest)) conn.pause();
  });
  sock.on('drain', () => conn.resume());
  conn.on('end', () => {
    if (!sock.destroyed) sock.end();
  });
  conn.on('error', (err) => {
    counters.inc(`tcp_bridge.guest_error.${err.code}`);
    if (!sock.destroyed) {
      if (typeof sock.resetAndDestroy === 'function' && sock.readyState !== 'opening') sock.resetAndDestroy();
      else sock.destroy();
    }
  });
  conn.on('close', () => {
    connClosed = true;
    // The guest side is gone entirely (e.g. after both FINs): make sure the host side ends too.
    if (!sock.destroyed && !sock.writableEnded) sock.end();
    done();
  });
}

/**
 * Write to the host socket's descriptor at once when Node has nothing queued for it, and
 * return what is left for `socket.write()` (null: all written). A lone small write through
 * net.Socket costs a Writable state update, a WriteWrap, a libuv request and a nextTick for
 * its callback, and fs.writeSync still ~1 µs of argument checks and request setup; the
 * addon's one send(2) does the job whenever the kernel takes it all, which it does whenever
 * the socket buffer has room (always in request/response traffic). Ordering holds: only an
 * empty queue is bypassed, and anything not taken (EAGAIN, a short write) goes through
 * `socket.write()` behind it. Errors (EPIPE, ECONNRESET) also go that way, so Node reports
 * them as usual. Without a usable addon (not built, a test's fake) this turns itself off.
 */
let directWrites = true;

function writeDirect(sock: net.Socket, data: Uint8Array): Uint8Array | null {
  if (!directWrites) return data;
  const fd = (sock as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (fd === undefined || fd < 0 || sock.writableLength > 0 || sock.destroyed || sock.writableEnded || sock.connecting) return data;
  let n: number;
  try {
    n = sendSome(fd, data);
  } catch (e) {
    if (!isNativeError(e) || e.syscall !== 'send') directWrites = false;
    return data;
  }
  if (n < 0) return data;
  return n >= data.length ? null : data.subarray(n);
}
