/**
 * A small QMP client (docs/interop/qmp-spec.rst): the server greets with {"QMP": {...}}, the
 * client must send `qmp_capabilities` before anything else, then commands are answered by
 * {"return": ...} or {"error": {"class", "desc"}} carrying the command's "id", and
 * asynchronous {"event", "data", "timestamp"} messages may arrive at any time in between.
 * Every message is one JSON object followed by CRLF.
 *
 * QEMU serves one QMP client at a time on a socket; a second connection waits until the first
 * closes. So tender keeps one connection per machine and funnels every command through it.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  constructor(
    readonly errorClass: string,
    desc: string,
  ) {
    super(desc);
    this.name = 'QmpError';
  }
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** Longest message accepted before the line ends (query-* answers are a few KiB). */
const MAX_LINE = 16 << 20;

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [Error | null] }> {
  readonly greeting: Record<string, unknown>;
  /** Resolves when the connection is gone (QEMU exited, or close()). */
  readonly closed: Promise<Error | null>;
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private buf = '';
  private isClosed = false;
  private closeError: Error | null = null;

  private constructor(
    private readonly sock: net.Socket,
    greeting: Record<string, unknown>,
    rest: string,
  ) {
    super();
    this.greeting = greeting;
    this.closed = new Promise((resolve) => this.once('close', resolve));
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => this.onData(s));
    sock.on('error', (e) => (this.closeError = e));
    sock.on('close', () => this.onClose());
    if (rest) this.onData(rest);
  }

  /** Connect, read the greeting, negotiate capabilities. Rejects within `timeoutMs`. */
  static async connect(path: string, timeoutMs = 5000): Promise<QmpClient> {
    const sock = net.createConnection(path);
    let timer: NodeJS.Timeout | undefined;
    try {
      const { greeting, rest } = await new Promise<{ greeting: Record<string, unknown>; rest: string }>((resolve, reject) => {
        let acc = '';
        timer = setTimeout(() => reject(new Error(`QMP ${path}: no greeting within ${timeoutMs} ms`)), timeoutMs);
        const onData = (b: Buffer) => {
          acc += b.toString('utf8');
          const nl = acc.indexOf('\n');
          if (nl < 0) {
            if (acc.length > MAX_LINE) reject(new Error(`QMP ${path}: greeting too long`));
            return;
          }
          sock.off('data', onData);
          sock.off('error', reject);
          sock.off('close', onClose);
          try {
            const msg = JSON.parse(acc.slice(0, nl)) as { QMP?: Record<string, unknown> };
            if (!msg.QMP) throw new Error('not a QMP greeting');
            resolve({ greeting: msg.QMP, rest: acc.slice(nl + 1) });
          } catch (e) {
            reject(new Error(`QMP ${path}: bad greeting: ${(e as Error).message}`));
          }
        };
        const onClose = () => reject(new Error(`QMP ${path}: closed before the greeting`));
        sock.on('data', onData);
        sock.once('error', reject);
        sock.once('close', onClose);
      });
      // The constructor runs in the continuation (a microtask), before the next 'data' event.
      const c = new QmpClient(sock, greeting, rest);
      await withTimeout(c.execute('qmp_capabilities'), timeoutMs, `QMP ${path}: qmp_capabilities`);
      return c;
    } catch (e) {
      sock.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Run a command; resolves with its "return" value, rejects with QmpError or on close. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.isClosed) return Promise.reject(new Error(`QMP connection closed (${command})`));
    const id = `t${this.nextId++}`;
    const msg = JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id });
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.sock.write(msg + '\r\n');
    });
  }

  /** The first event named `name` from now on (null if the connection closes first). */
  waitEvent(name: string): Promise<QmpEvent | null> {
    if (this.isClosed) return Promise.resolve(null);
    return new Promise((resolve) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event !== name) return;
        this.off('event', onEvent);
        this.off('close', onClose);
        resolve(e);
      };
      const onClose = () => {
        this.off('event', onEvent);
        resolve(null);
      };
      this.on('event', onEvent);
      this.once('close', onClose);
    });
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  close(): void {
    this.sock.destroy();
  }

  private onData(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(line);
    }
    if (this.buf.length > MAX_LINE) {
      this.closeError = new Error('QMP message too long');
      this.sock.destroy();
    }
  }

  private onMessage(line: string): void {
    let msg: { id?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string };
    try {
      msg = JSON.parse(line);
    } catch {
      return; // not ours to crash on: QEMU only sends JSON
    }
    if (typeof msg.event === 'string') {
      this.emit('event', msg as QmpEvent);
      return;
    }
    const p = typeof msg.id === 'string' ? this.pending.get(msg.id) : undefined;
    if (!p) return; // an answer to nobody (an id we did not send)
    this.pending.delete(msg.id as string);
    if (msg.error) p.reject(new QmpError(msg.error.class ?? 'GenericError', msg.error.desc ?? 'QMP error'));
    else p.resolve(msg.return);
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const err = new Error(`QMP connection closed${this.closeError ? `: ${this.closeError.message}` : ''}`);
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.emit('close', this.closeError);
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
