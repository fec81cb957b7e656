/**
 * DNS over TCP on the gateway (RFC 7766): 2-byte length-prefixed messages, pipelined queries
 * answered as they complete (possibly out of order, which RFC 7766 §6.2.1.1 allows), idle
 * connections closed by the client or after the engine's own timeouts. Clients fall back to
 * TCP when a UDP answer was truncated, so large forwarded answers need this.
 */
import type { Counters } from '../counters.js';
import type { TcpConnection } from '../tcp/connection.js';
import type { DnsService } from './dns.js';
import { ip4str } from '../addr.js';

const MAX_PENDING_BYTES = 65535 + 2;
const MAX_INFLIGHT = 32;

export function serveDnsTcp(conn: TcpConnection, dns: DnsService, counters: Counters): void {
  let buf: Uint8Array = new Uint8Array(0);
  let inflight = 0;
  let ended = false;
  const client = { ip: ip4str(conn.remoteIp), port: conn.remotePort, transport: 'tcp' as const };

  const maybeFinish = () => {
    if (ended && inflight === 0) conn.end();
  };

  conn.on('data', (chunk) => {
    const joined = new Uint8Array(buf.length + chunk.length);
    joined.set(buf, 0);
    joined.set(chunk, buf.length);
    buf = joined;
    while (buf.length >= 2) {
      const len = (buf[0]! << 8) | buf[1]!;
      if (buf.length < 2 + len) break;
      const msg = buf.slice(2, 2 + len);
      buf = buf.subarray(2 + len);
      if (inflight >= MAX_INFLIGHT) {
        counters.inc('dns.drop.tcp_inflight');
        conn.destroy();
        return;
      }
      inflight++;
      void dns.query(msg, client).then((resp) => {
        inflight--;
        if (resp !== null && resp.length <= 65535) {
          const out = new Uint8Array(2 + resp.length);
          out[0] = resp.length >> 8;
          out[1] = resp.length & 0xff;
          out.set(resp, 2);
          conn.write(out);
        }
        maybeFinish();
      });
    }
    if (buf.length > MAX_PENDING_BYTES) {
      counters.inc('dns.drop.tcp_oversize');
      conn.destroy();
    }
  });
  conn.on('end', () => {
    ended = true;
    maybeFinish();
  });
  conn.on('error', () => counters.inc('dns.tcp_reset'));
}
