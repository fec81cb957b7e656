/**
 * `tender machine exec NAME -- CMD...` and `tender machine shell NAME`: the client side of the
 * exec upgrade (src/api/exec-stream.ts). stdout/stderr are streamed as they come; the exit
 * status of the command becomes ours (128 + signal number when a signal killed it, as shells do).
 */
import http from 'node:http';
import { constants } from 'node:os';
import type { Duplex } from 'node:stream';
import { Client } from '../client.js';
import { F, FrameReader, frame } from '../api/exec-stream.js';
import { ERRORS, TenderError, type ErrorCode } from '../errors.js';

export async function runExec(name: string, argv: string[], opts: { tty: boolean; env?: Record<string, string>; cwd?: string }): Promise<number> {
  const client = new Client();
  await client.ensureDaemon();
  const tty = opts.tty && process.stdin.isTTY === true;
  const header = Buffer.from(
    JSON.stringify({ argv, tty: opts.tty, rows: process.stdout.rows ?? 24, cols: process.stdout.columns ?? 80, env: opts.env, cwd: opts.cwd }),
  ).toString('base64');
  const sock = await new Promise<Duplex>((resolve, reject) => {
    const req = http.request({
      socketPath: client.paths.socket,
      method: 'POST',
      path: `/v1/machines/${encodeURIComponent(name)}/exec`,
      headers: { Connection: 'Upgrade', Upgrade: 'tender-exec', 'X-Tender-Exec': header },
    });
    // `head`: bytes after the 101 that came in the same read (a fast command's whole output
    // and EXIT can); dropping them lost the EXIT ("ended before the command did").
    req.on('upgrade', (_res, s, head: Buffer) => {
      if (head.length) s.unshift(head);
      resolve(s);
    });
    req.on('response', async (res) => {
      let body = '';
      for await (const d of res) body += d;
      try {
        const e = JSON.parse(body);
        reject(new TenderError((e.code in ERRORS ? e.code : 'INTERNAL') as ErrorCode, e.message));
      } catch {
        reject(new TenderError('INTERNAL', `unexpected reply ${res.statusCode}: ${body}`));
      }
    });
    req.on('error', (err) => reject(new TenderError('DAEMON_UNAVAILABLE', err.message)));
    req.end();
  });

  return new Promise<number>((resolve, reject) => {
    let status: number | null = null;
    const restore = () => {
      if (tty) process.stdin.setRawMode(false);
      process.stdin.pause();
    };
    const reader = new FrameReader((type, p) => {
      if (type === F.STDOUT) process.stdout.write(p);
      else if (type === F.STDERR) process.stderr.write(p);
      else if (type === F.EXIT) {
        const st = JSON.parse(p.toString()) as { code: number | null; signal: string | null };
        const sig = st.signal ? (constants.signals as Record<string, number>)[st.signal] ?? 1 : 0;
        status = st.code ?? 128 + sig;
      } else if (type === F.ERROR) {
        const e = JSON.parse(p.toString());
        restore();
        reject(new TenderError((e.code in ERRORS ? e.code : 'AGENT_GONE') as ErrorCode, e.message));
      }
    });
    // The daemon ends the connection once the command exited; stdin that arrives later (or
    // its EOF) has nowhere to go and is dropped rather than written to a closed socket.
    const send = (b: Buffer) => {
      if (!sock.destroyed && sock.writable) sock.write(b);
    };
    sock.on('error', () => {});
    sock.on('data', (d: Buffer) => reader.push(d));
    sock.on('close', () => {
      restore();
      if (status === null) reject(new TenderError('AGENT_UNAVAILABLE', 'the connection to the machine ended before the command did'));
      else resolve(status);
    });
    if (tty) {
      process.stdin.setRawMode(true);
      process.stdout.on('resize', () => {
        const b = Buffer.alloc(4);
        b.writeUInt16BE(process.stdout.rows ?? 24, 0);
        b.writeUInt16BE(process.stdout.columns ?? 80, 2);
        send(frame(F.RESIZE, b));
      });
    } else {
      // Signals to us go to the command, so Ctrl-C stops the remote process first.
      for (const s of ['SIGINT', 'SIGTERM'] as const) process.on(s, () => send(frame(F.SIGNAL, Buffer.from(s))));
    }
    process.stdin.on('data', (d: Buffer) => send(frame(F.STDIN, d)));
    process.stdin.on('end', () => send(frame(F.STDIN_EOF)));
    process.stdin.resume();
  });
}
