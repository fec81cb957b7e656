/**
 * Errors a connection reports through its 'error' event, with Node's codes so the NAT can
 * map them 1:1 onto host sockets.
 */
export type TcpErrorCode = 'ECONNRESET' | 'ETIMEDOUT' | 'ECONNREFUSED' | 'EPIPE' | 'EADDRINUSE' | 'EMFILE';

const MESSAGES: Record<TcpErrorCode, string> = {
  ECONNRESET: 'connection reset by peer',
  ETIMEDOUT: 'connection timed out',
  ECONNREFUSED: 'connection refused',
  EPIPE: 'write after end',
  EADDRINUSE: 'connection tuple already in use',
  EMFILE: 'too many connections',
};

export class TcpError extends Error {
  constructor(readonly code: TcpErrorCode, detail?: string) {
    super(detail ? `${MESSAGES[code]}: ${detail}` : MESSAGES[code]);
    this.name = 'TcpError';
  }
}
