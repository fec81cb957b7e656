/**
 * A userspace TCP connection as a Node `stream.Duplex`, for services that speak streams (the
 * USB/IP server on the gateway). Backpressure both ways: a full engine send buffer holds the
 * writer until 'drain'; a full readable side pauses the engine, which closes the window.
 */
import { Duplex } from 'node:stream';
import type { TcpConnection } from '../tcp/connection.js';

export function tcpDuplex(conn: TcpConnection): Duplex {
  const d = new Duplex({
    write(chunk: Buffer, _enc, cb) {
      if (conn.write(chunk)) cb();
      else conn.once('drain', () => cb());
    },
    final(cb) {
      conn.end();
      cb();
    },
    read() {
      conn.resume();
    },
    destroy(err, cb) {
      conn.destroy();
      cb(err);
    },
  });
  conn.on('data', (b: Uint8Array) => {
    if (!d.push(b)) conn.pause();
  });
  conn.on('end', () => d.push(null));
  conn.on('error', (e) => d.destroy(e));
  conn.on('close', () => {
    if (!d.destroyed) d.destroy();
  });
  return d;
}
