/**
 * The CLI's side of the daemon API: JSON over HTTP on the unix socket, starting the daemon
 * in the background (log in the state directory) when it is not running.
 */
import { spawn } from 'node:child_process';
import { openSync } from 'node:fs';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { TenderError, type ErrorCode, ERRORS } from './errors.js';
import { socketAlive } from './daemon/daemon.js';
import { type Paths, paths as pathsFor } from './daemon/paths.js';

export class Client {
  readonly paths: Paths;

  constructor(home?: string) {
    this.paths = pathsFor(home);
  }

  /** Make sure a daemon answers, starting one in the background if needed. */
  async ensureDaemon(): Promise<void> {
    if (await socketAlive(this.paths.socket)) return;
    const { mkdirSync } = await import('node:fs');
    mkdirSync(this.paths.home, { recursive: true, mode: 0o700 });
    const log = openSync(this.paths.log, 'a');
    const cli = fileURLToPath(new URL('./cli.js', import.meta.url));
    const child = spawn(process.execPath, [cli, 'daemon'], {
      detached: true,
      stdio: ['ignore', log, log],
      env: { ...process.env, TENDER_HOME: this.paths.home },
    });
    child.unref();
    const end = Date.now() + 15_000;
    while (Date.now() < end) {
      if (await socketAlive(this.paths.socket)) return;
      if (child.exitCode !== null) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new TenderError('DAEMON_UNAVAILABLE', `the daemon did not start; see ${this.paths.log}`);
  }

  /** One request; resolves with the parsed JSON body, throws TenderError for 4xx/5xx. */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    await this.ensureDaemon();
    const res = await this.raw(method, path, body);
    const text = await readAll(res);
    const data = text ? JSON.parse(text) : undefined;
    if ((res.statusCode ?? 500) >= 400) throw errorFrom(data, res.statusCode ?? 500);
    return data as T;
  }

  /** A streaming NDJSON request (start/stop with progress). */
  async stream<T>(method: string, path: string, body: unknown, onProgress: (msg: string) => void): Promise<T> {
    await this.ensureDaemon();
    const res = await this.raw(method, path, body, { accept: 'application/x-ndjson' });
    if ((res.statusCode ?? 500) >= 400) throw errorFrom(JSON.parse((await readAll(res)) || '{}'), res.statusCode ?? 500);
    let buf = '';
    let result: T | undefined;
    let error: { code: string; message: string } | undefined;
    for await (const chunk of res) {
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (!line) continue;
        const o = JSON.parse(line);
        if (o.progress) onProgress(o.progress);
        if (o.result !== undefined) result = o.result;
        if (o.error) error = o.error;
      }
    }
    if (error) throw errorFrom(error, 500);
    return result as T;
  }

  raw(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      const data = body === undefined ? undefined : JSON.stringify(body);
      const req = http.request(
        {
          socketPath: this.paths.socket,
          method,
          path,
          headers: { ...(data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {}), ...headers },
        },
        resolve,
      );
      req.on('error', (err) => reject(new TenderError('DAEMON_UNAVAILABLE', `cannot reach the daemon: ${err.message}`)));
      if (data) req.write(data);
      req.end();
    });
  }
}

async function readAll(res: http.IncomingMessage): Promise<string> {
  let s = '';
  for await (const c of res) s += c;
  return s;
}

function errorFrom(data: { code?: string; message?: string } | undefined, status: number): TenderError {
  const code = (data?.code && data.code in ERRORS ? data.code : 'INTERNAL') as ErrorCode;
  return new TenderError(code, data?.message ?? `HTTP ${status}`);
}
