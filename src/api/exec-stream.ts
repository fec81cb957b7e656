/**
 * `tender machine exec` / `shell` over the API socket: an HTTP/1.1 Upgrade (as Docker's
 * attach does), after which both sides exchange frames on the raw connection:
 *
 *   u8 type | u32 length (big-endian) | payload
 *
 * client → daemon: STDIN (0) data, STDIN_EOF (1), RESIZE (2: u16 rows, u16 cols), SIGNAL (3: name)
 * daemon → client: STDOUT (10), STDERR (11), EXIT (12: JSON {code, signal}), ERROR (13: JSON {code, message})
 *
 * The request is `POST /v1/machines/NAME/exec` with `Upgrade: tender-exec` and the command in
 * the `X-Tender-Exec` header (base64 JSON {argv, tty, rows, cols, env, cwd}). Failures known
 * before the upgrade (unknown machine, no agent) are ordinary JSON error responses.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { TenderError } from '../errors.js';
import type { DaemonAgentSession } from '../daemon/agent-session.js';

export const F = { STDIN: 0, STDIN_EOF: 1, RESIZE: 2, SIGNAL: 3, STDOUT: 10, STDERR: 11, EXIT: 12, ERROR: 13 } as const;
const MAX_FRAME = 1 << 20;

export function frame(type: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.allocUnsafe(5 + payload.length);
  b[0] = type;
  b.writeUInt32BE(payload.length, 1);
  b.set(payload, 5);
  return b;
}

/** Incremental frame reader; returns false on a protocol error. */
export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);
  constructor(private readonly on: (type: number, payload: Buffer) => void) {}
  push(chunk: Buffer): boolean {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    while (this.buf.length >= 5) {
      const len = this.buf.readUInt32BE(1);
      if (len > MAX_FRAME) return false;
      if (this.buf.length < 5 + len) break;
      const type = this.buf[0]!;
      const payload = this.buf.subarray(5, 5 + len);
      this.buf = this.buf.subarray(5 + len);
      this.on(type, payload);
    }
    return true;
  }
}

export interface ExecRequest {
  argv: string[];
  tty?: boolean;
  rows?: number;
  cols?: number;
  env?: Record<string, string>;
  cwd?: string;
}

export function parseExecHeader(h: string | string[] | undefined): ExecRequest {
  try {
    const o = JSON.parse(Buffer.from(String(h ?? ''), 'base64').toString('utf8')) as ExecRequest;
    if (!Array.isArray(o.argv) || o.argv.length === 0 || o.argv.some((a) => typeof a !== 'string')) throw new Error('argv');
    if (o.env !== undefined && (typeof o.env !== 'object' || Object.values(o.env).some((v) => typeof v !== 'string'))) throw new Error('env');
    return o;
  } catch {
    throw new TenderError('BAD_REQUEST', 'X-Tender-Exec must be base64 JSON with a non-empty argv of strings');
  }
}

/** Run the command through the agent and bridge it to the upgraded connection. */
export function serveExec(sock: Duplex, agent: DaemonAgentSession, req: ExecRequest): void {
  const send = (type: number, payload?: Uint8Array) => (sock.destroyed || !sock.writable ? true : sock.write(frame(type, payload)));
  const fail = (err: { code?: string; message: string }) => {
    send(F.ERROR, Buffer.from(JSON.stringify({ code: err.code === 'EXEC_FAILED' ? 'EXEC_FAILED' : 'AGENT_GONE', message: err.message })));
    sock.end();
  };
  // The 101 is already out: from here on every failure is an ERROR frame, never an HTTP reply
  // (the client parses frames now, and would only see the connection end).
  let h: ReturnType<DaemonAgentSession['exec']>;
  try {
    h = agent.exec(req.argv, { tty: req.tty, rows: req.rows, cols: req.cols, env: req.env, cwd: req.cwd });
  } catch (err) {
    fail(err as Error & { code?: string });
    return;
  }
  const pipeOut = (r: NodeJS.ReadableStream, type: number) => {
    r.on('data', (d: Buffer) => {
      if (!send(type, d)) {
        r.pause();
        sock.once('drain', () => r.resume());
      }
    });
  };
  pipeOut(h.stdout, F.STDOUT);
  pipeOut(h.stderr, F.STDERR);
  const reader = new FrameReader((type, p) => {
    switch (type) {
      case F.STDIN:
        h.stdin.write(Buffer.from(p));
        break;
      case F.STDIN_EOF:
        h.stdin.end();
        break;
      case F.RESIZE:
        if (p.length >= 4) h.resize(p.readUInt16BE(0), p.readUInt16BE(2));
        break;
      case F.SIGNAL:
        h.signal(p.toString('utf8') || 'SIGTERM');
        break;
      default:
        break;
    }
  });
  sock.on('data', (d: Buffer) => {
    if (!reader.push(d)) sock.destroy();
  });
  // The client going away kills the command (as ssh does when the connection drops).
  sock.on('close', () => h.signal('SIGHUP'));
  sock.on('error', () => {});
  // EXIT goes last: after every byte of stdout and stderr was forwarded. The exit promise can
  // settle before the readables emitted their last 'data' (they do so on a later tick), and
  // ending the connection first lost that output.
  const ended = (r: NodeJS.ReadableStream) =>
    new Promise<void>((res) => {
      if ((r as { readableEnded?: boolean }).readableEnded) return res();
      r.once('end', () => res());
      r.once('close', () => res());
    });
  Promise.all([h.exit, ended(h.stdout), ended(h.stderr)]).then(
    ([st]) => {
      send(F.EXIT, Buffer.from(JSON.stringify(st)));
      sock.end();
    },
    fail,
  );
}

export function upgradeResponse(): string {
  return 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: tender-exec\r\nConnection: Upgrade\r\n\r\n';
}

export function errorResponse(status: number, code: string, message: string): string {
  const body = JSON.stringify({ code, message });
  return `HTTP/1.1 ${status} Error\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
}

export type { IncomingMessage };
