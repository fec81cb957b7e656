/**
 * The host side of the guest agent: one AgentClient per byte stream to one agent (a unix
 * socket connected to QEMU's virtio-serial chardev, a vsock stream, a socketpair in tests).
 *
 * Start of a session. The client announces itself with HOST_HELLO and a random nonce, and
 * the session starts at the agent's HELLO carrying that nonce; every byte before it is
 * skipped (searched for the HELLO header, not decoded). Over a virtio-serial port that is
 * what makes a new host safe: the port outlives host connections, so the agent may still
 * be sending the rest of the previous host's frames, and it cannot always notice a quick
 * reconnect by itself (the driver's hang-up state is level-triggered). HOST_HELLO is
 * repeated every second until answered, in case the first was lost in a frame the previous
 * host left half-written.
 *
 * Everything the agent says then arrives in order on that one stream, so a single dispatch
 * function routes frames by type and stream id: execs and requests (ping, power) share one
 * id space. A later HELLO that does not carry our nonce means the agent started over (it
 * dropped its end and killed what it ran), so every pending operation fails with AGENT_GONE
 * and 'hello' is emitted again; the stream itself closing fails everything and ends the
 * client.
 *
 * Flow control (docs/agent-protocol.md): stdout/stderr credit is given back as the consumer
 * of each Readable takes the bytes, so a command writing faster than its output is consumed
 * blocks inside the guest; stdin is sent only within the credit the agent granted.
 */
import { randomInt } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { Readable, Writable, type Duplex } from 'node:stream';
import {
  AgentErrorCode,
  Channel,
  type Exit,
  FrameDecoder,
  type Frame,
  type Hello,
  type Listener,
  MAX_PAYLOAD,
  MsgType,
  PayloadError,
  decodeError,
  decodeExit,
  decodeHello,
  decodeListeners,
  decodeStarted,
  decodeUsbAttached,
  decodeWindow,
  encodeExecPayload,
  encodeFrame,
  encodeHostHelloPayload,
  encodeResizePayload,
  encodeSignalPayload,
  encodeUsbAttachPayload,
  encodeUsbDetachPayload,
  encodeWindowPayload,
  signalName,
  signalNumber,
} from './protocol.js';

export type { Hello, Listener, UsbAttachRequest, UsbAttached } from './protocol.js';
import type { UsbAttachRequest, UsbAttached } from './protocol.js';

/**
 * Stable codes of AgentError:
 * - AGENT_GONE: the stream closed, or the agent started over, while the operation was pending.
 * - AGENT_CLOSED: close() was called.
 * - AGENT_PROTOCOL: the agent sent bytes that are not the protocol (the client closes).
 * - AGENT_TIMEOUT: ping() got no PONG in time.
 * - EXEC_FAILED: the command could not be started (`errno`: the guest's Linux errno).
 * - AGENT_REJECTED: the agent refused the request (`agentCode` says which rule: too many
 *   processes, power control disabled or failed, a malformed request).
 * - USB_FAILED: a USB attach or detach failed in the guest (`agentCode`: USB_FAILED with the
 *   guest's `errno` for connect, timeout, vhci-hcd missing or a sysfs write; USB_IMPORT_REFUSED
 *   when the server refused the import; USB_NO_PORT when the hub of that speed is full).
 */
export type AgentErrorCodeName = 'AGENT_GONE' | 'AGENT_CLOSED' | 'AGENT_PROTOCOL' | 'AGENT_TIMEOUT' | 'EXEC_FAILED' | 'AGENT_REJECTED' | 'USB_FAILED';

export class AgentError extends Error {
  readonly code: AgentErrorCodeName;
  /** Linux errno from the guest (EXEC_FAILED, AGENT_REJECTED for power), else undefined. */
  readonly errno?: number;
  /** The agent's ERROR code (protocol.AgentErrorCode) when the agent sent one. */
  readonly agentCode?: number;

  constructor(code: AgentErrorCodeName, message: string, extra: { errno?: number; agentCode?: number } = {}) {
    super(message);
    this.name = 'AgentError';
    this.code = code;
    if (extra.errno !== undefined) this.errno = extra.errno;
    if (extra.agentCode !== undefined) this.agentCode = extra.agentCode;
  }
}

export interface ExecOptions {
  /** Added to (and overriding) the agent's environment; PATH and HOME have defaults. */
  env?: Record<string, string>;
  /** Working directory; default the agent's (/). */
  cwd?: string;
  /** Run on a new PTY (stdout carries both streams; stderr ends empty). */
  tty?: boolean;
  rows?: number;
  cols?: number;
}

export interface ExitStatus {
  /** Exit status, null when a signal killed the process. */
  code: number | null;
  /** Name of the Linux signal that killed it ("SIGKILL"), else null. */
  signal: string | null;
}

export interface AgentClientOptions {
  /** Output credit per stream (stdout and stderr each), bytes. Default 256 KiB. */
  window?: number;
}

const DEFAULT_WINDOW = 256 * 1024;
/** STDIN frames are cut to this size (the agent's buffer is 64 KiB). */
const STDIN_CHUNK = 32 * 1024;

type Pending = { resolve: (v: never) => void; reject: (e: AgentError) => void; kind: 'ping' | 'power' | 'usb-attach' | 'usb-detach'; timer?: NodeJS.Timeout; sent?: number };

function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/** Output side of one exec: a Readable that returns credit as its consumer reads. */
class OutputStream extends Readable {
  private unacked = 0;
  constructor(
    private readonly ack: (n: number) => void,
    private readonly threshold: number,
  ) {
    super();
  }
  deliver(data: Uint8Array): void {
    this.unacked += data.length;
    // The payload is a view into the socket's chunk (or a decoder copy); keep it as is.
    if (this.push(data) && this.unacked >= this.threshold) this.flushAck();
  }
  private flushAck(): void {
    if (this.unacked > 0) {
      const n = this.unacked;
      this.unacked = 0;
      this.ack(n);
    }
  }
  override _read(): void {
    this.flushAck();
  }
  finish(): void {
    this.unacked = 0;
    this.push(null);
  }
}

export class ExecHandle {
  readonly id: number;
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Resolves with the guest PID once the process runs; rejects with EXEC_FAILED. */
  readonly started: Promise<{ pid: number }>;
  /** Resolves when the process exited and all its output was delivered. */
  readonly exit: Promise<ExitStatus>;
  pid: number | undefined;

  /** @internal */ stdinCredit = 0;
  /** @internal */ done = false;
  private creditWaiters: (() => void)[] = [];
  private resolveStarted!: (v: { pid: number }) => void;
  private rejectStarted!: (e: AgentError) => void;
  private resolveExit!: (v: ExitStatus) => void;
  private rejectExit!: (e: AgentError) => void;
  private readonly out: OutputStream;
  private readonly err: OutputStream;

  /** @internal */
  constructor(
    private readonly client: AgentClient,
    id: number,
    window: number,
  ) {
    this.id = id;
    this.started = quiet(new Promise((res, rej) => ((this.resolveStarted = res), (this.rejectStarted = rej))));
    this.exit = quiet(new Promise((res, rej) => ((this.resolveExit = res), (this.rejectExit = rej))));
    const threshold = Math.max(1, window >> 2);
    this.out = new OutputStream((n) => client.sendFrame(MsgType.WINDOW, id, encodeWindowPayload(Channel.STDOUT, n)), threshold);
    this.err = new OutputStream((n) => client.sendFrame(MsgType.WINDOW, id, encodeWindowPayload(Channel.STDERR, n)), threshold);
    this.stdout = this.out;
    this.stderr = this.err;
    this.stdin = new Writable({
      write: (chunk: Buffer, _enc, cb) => void this.writeStdin(chunk).then(() => cb(), cb),
      final: (cb) => {
        if (!this.done) client.sendFrame(MsgType.STDIN_EOF, id);
        cb();
      },
    });
    // Writing to a process that is gone is not an error worth crashing for.
    this.stdin.on('error', () => {});
  }

  private async writeStdin(chunk: Buffer): Promise<void> {
    let off = 0;
    while (off < chunk.length) {
      if (this.done) return; // exited or gone: the bytes have nowhere to go
      if (this.stdinCredit === 0) {
        await new Promise<void>((r) => this.creditWaiters.push(r));
        continue;
      }
      const n = Math.min(chunk.length - off, this.stdinCredit, STDIN_CHUNK);
      this.stdinCredit -= n;
      const ok = this.client.sendFrame(MsgType.STDIN, this.id, chunk.subarray(off, off + n));
      off += n;
      if (!ok) await this.client.drained();
    }
  }

  /** @internal */ addCredit(n: number): void {
    this.stdinCredit += n;
    for (const w of this.creditWaiters.splice(0)) w();
  }

  /** @internal */ onStarted(pid: number, stdinWindow: number): void {
    this.pid = pid;
    this.addCredit(stdinWindow);
    this.resolveStarted({ pid });
  }

  /** @internal */ onOutput(ch: 'out' | 'err', data: Uint8Array): void {
    (ch === 'out' ? this.out : this.err).deliver(data);
  }

  /** @internal */ onExit(e: Exit): void {
    this.finish();
    this.resolveExit({ code: e.signal ? null : e.code, signal: e.signal ? signalName(e.signal) : null });
  }

  /** @internal */ fail(e: AgentError): void {
    this.finish();
    this.rejectStarted(e);
    this.rejectExit(e);
  }

  private finish(): void {
    this.done = true;
    for (const w of this.creditWaiters.splice(0)) w();
    this.out.finish();
    this.err.finish();
  }

  /** Set the PTY size (the guest's foreground process gets SIGWINCH). No-op without a tty. */
  resize(rows: number, cols: number): void {
    if (!this.done) this.client.sendFrame(MsgType.RESIZE, this.id, encodeResizePayload(rows, cols));
  }

  /** Send a signal (name like 'SIGTERM' or a Linux number) to the process group. */
  signal(sig: string | number = 'SIGTERM'): void {
    const n = signalNumber(sig);
    if (!this.done) this.client.sendFrame(MsgType.SIGNAL, this.id, encodeSignalPayload(n));
  }
}

/**
 * Events: 'hello' (Hello) on every HELLO, the first and after each restart of the agent;
 * 'listeners' (Listener[]) with the full current set whenever it changes; 'agent-error'
 * (AgentError) for an ERROR that concerns no pending operation; 'close' (AgentError) once,
 * when the stream is gone.
 */
export class AgentClient extends EventEmitter {
  /** Resolves on the first HELLO; rejects with AGENT_GONE when the stream ends first. */
  readonly ready: Promise<Hello>;
  hello: Hello | null = null;
  /** The last set the agent reported (empty until then). */
  listenerSet: readonly Listener[] = [];
  closed: AgentError | null = null;

  private readonly decoder = new FrameDecoder(MAX_PAYLOAD);
  private readonly execs = new Map<number, ExecHandle>();
  private readonly requests = new Map<number, Pending>();
  private nextId = 1;
  private readonly window: number;
  private resolveReady!: (h: Hello) => void;
  private rejectReady!: (e: AgentError) => void;
  private readonly nonce = randomInt(1, 0xffffffff);
  /** Before the session starts: bytes searched for the HELLO that answers our HOST_HELLO. */
  private preamble: Buffer | null = Buffer.alloc(0);
  private helloTimer: NodeJS.Timeout | null = null;
  private readonly onData = (chunk: Buffer) => this.receive(chunk);
  private readonly onEnd = () => this.shutdown(new AgentError('AGENT_GONE', 'the agent connection closed'));
  private readonly onError = (e: Error) => this.shutdown(new AgentError('AGENT_GONE', `the agent connection failed: ${e.message}`));

  constructor(
    private readonly io: Duplex,
    options: AgentClientOptions = {},
  ) {
    super();
    this.window = Math.max(1, Math.min(options.window ?? DEFAULT_WINDOW, 0x7fffffff));
    this.ready = quiet(new Promise((res, rej) => ((this.resolveReady = res), (this.rejectReady = rej))));
    io.on('data', this.onData);
    io.on('end', this.onEnd);
    io.on('close', this.onEnd);
    io.on('error', this.onError);
    this.sendHostHello();
  }

  private sendHostHello(): void {
    this.sendFrame(MsgType.HOST_HELLO, this.nonce, encodeHostHelloPayload());
    this.helloTimer = setTimeout(() => this.sendHostHello(), 1000);
    this.helloTimer.unref();
  }

  /**
   * Skip to the HELLO answering our HOST_HELLO: `len(4) | 0x01 | nonce(4)`. Keeps only the
   * last 8 bytes between chunks, so a host that gets garbage never buffers it.
   */
  private findSessionStart(chunk: Buffer): Buffer | null {
    const b = this.preamble!.length ? Buffer.concat([this.preamble!, chunk]) : chunk;
    const sig = Buffer.alloc(5);
    sig[0] = MsgType.HELLO;
    sig.writeUInt32BE(this.nonce, 1);
    for (let at = b.indexOf(sig, 4); at >= 0; at = b.indexOf(sig, at + 1)) {
      const len = b.readUInt32BE(at - 4);
      if (len >= 7 && len <= 5 + MAX_PAYLOAD) {
        this.preamble = null;
        return b.subarray(at - 4);
      }
    }
    this.preamble = Buffer.from(b.subarray(Math.max(0, b.length - 8)));
    return null;
  }

  /** @internal Write one frame; false when the transport wants us to wait for 'drain'. */
  sendFrame(type: number, stream: number, payload?: Uint8Array): boolean {
    if (this.closed) return true;
    return this.io.write(encodeFrame(type, stream, payload));
  }

  /** @internal */
  drained(): Promise<void> {
    if (this.closed || !this.io.writableNeedDrain) return Promise.resolve();
    return new Promise((r) => {
      const done = () => {
        this.io.off('drain', done);
        this.io.off('close', done);
        r();
      };
      this.io.on('drain', done);
      this.io.on('close', done);
    });
  }

  private allocId(): number {
    // Skip 0 (connection-level) and ids still in use after a wrap.
    do {
      this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    } while (this.execs.has(this.nextId) || this.requests.has(this.nextId));
    return this.nextId;
  }

  /** Round trip to the agent, in milliseconds. */
  ping(timeoutMs = 10_000): Promise<number> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.allocId();
    return new Promise<number>((resolve, reject) => {
      const p: Pending = { resolve: resolve as (v: never) => void, reject, kind: 'ping', sent: performance.now() };
      p.timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new AgentError('AGENT_TIMEOUT', `no PONG within ${timeoutMs} ms`));
      }, timeoutMs);
      this.requests.set(id, p);
      this.sendFrame(MsgType.PING, id);
    });
  }

  /** Start a command in the guest. Errors come through `started` and `exit`. */
  exec(argv: string[], options: ExecOptions = {}): ExecHandle {
    const id = this.allocId();
    const h = new ExecHandle(this, id, this.window);
    if (this.closed) {
      h.fail(this.closed);
      return h;
    }
    let payload: Buffer;
    try {
      payload = encodeExecPayload({ argv, env: options.env, cwd: options.cwd, tty: options.tty, rows: options.rows, cols: options.cols, window: this.window });
    } catch (e) {
      h.fail(new AgentError('EXEC_FAILED', `bad exec request: ${(e as Error).message}`));
      return h;
    }
    this.execs.set(id, h);
    this.sendFrame(MsgType.EXEC, id, payload);
    return h;
  }

  /** Ask the guest to power off. Resolves when the connection closes; rejects if the agent refuses. */
  poweroff(): Promise<void> {
    return this.power(MsgType.POWEROFF);
  }

  reboot(): Promise<void> {
    return this.power(MsgType.REBOOT);
  }

  private power(type: number): Promise<void> {
    if (this.closed) return Promise.resolve();
    const id = this.allocId();
    return new Promise<void>((resolve, reject) => {
      this.requests.set(id, { resolve: resolve as (v: never) => void, reject, kind: 'power' });
      this.sendFrame(type, id);
    });
  }

  /**
   * Import a USB/IP device in the guest and attach it to vhci-hcd: the agent connects to
   * host:port from inside the machine, does OP_REQ_IMPORT for `busid`, and hands the socket to
   * the kernel on a free port of the hub matching the device's speed. Rejects with USB_FAILED
   * (agentCode, errno say why), or AGENT_TIMEOUT after `timeoutMs` (the agent gives up on
   * the handshake after 10 s by itself).
   */
  usbAttach(req: UsbAttachRequest, timeoutMs = 30_000): Promise<UsbAttached> {
    let payload: Buffer;
    try {
      payload = encodeUsbAttachPayload(req);
    } catch (e) {
      return Promise.reject(new AgentError('USB_FAILED', `bad USB attach request: ${(e as Error).message}`));
    }
    return this.request<UsbAttached>('usb-attach', MsgType.USB_ATTACH, payload, timeoutMs);
  }

  /** Detach the device on vhci_hcd.0 port `vhciPort` (the `port` usbAttach returned). */
  usbDetach(vhciPort: number, timeoutMs = 10_000): Promise<void> {
    let payload: Buffer;
    try {
      payload = encodeUsbDetachPayload(vhciPort);
    } catch (e) {
      return Promise.reject(new AgentError('USB_FAILED', `bad USB detach request: ${(e as Error).message}`));
    }
    return this.request<void>('usb-detach', MsgType.USB_DETACH, payload, timeoutMs);
  }

  private request<T>(kind: Pending['kind'], type: number, payload: Buffer, timeoutMs: number): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    const id = this.allocId();
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { resolve: resolve as (v: never) => void, reject, kind };
      p.timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new AgentError('AGENT_TIMEOUT', `no answer to ${kind} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.requests.set(id, p);
      this.sendFrame(type, id, payload);
    });
  }

  /** Fail everything with AGENT_CLOSED and destroy the stream. */
  close(): void {
    this.shutdown(new AgentError('AGENT_CLOSED', 'the agent client was closed'));
  }

  private shutdown(e: AgentError): void {
    if (this.closed) return;
    this.closed = e;
    if (this.helloTimer) clearTimeout(this.helloTimer);
    this.io.off('data', this.onData);
    this.failAll(e, true);
    this.rejectReady(e);
    this.io.destroy();
    this.emit('close', e);
  }

  private failAll(e: AgentError, closing: boolean): void {
    for (const h of this.execs.values()) h.fail(e);
    this.execs.clear();
    for (const [id, p] of this.requests) {
      clearTimeout(p.timer);
      // The connection closing is what a successful poweroff looks like.
      if (p.kind === 'power' && closing) p.resolve(undefined as never);
      else p.reject(e);
      this.requests.delete(id);
    }
  }

  private receive(data: Buffer): void {
    let chunk: Buffer | null = data;
    if (this.preamble) chunk = this.findSessionStart(data);
    if (!chunk) return;
    const ok = this.decoder.push(chunk, (f) => {
      if (this.closed) return;
      try {
        this.dispatch(f);
      } catch (e) {
        if (!(e instanceof PayloadError)) throw e;
        this.shutdown(new AgentError('AGENT_PROTOCOL', `bad message 0x${f.type.toString(16)} from the agent: ${e.message}`));
      }
    });
    if (!ok && !this.closed) this.shutdown(new AgentError('AGENT_PROTOCOL', `the agent broke the protocol: ${this.decoder.error}`));
  }

  private dispatch(f: Frame): void {
    switch (f.type) {
      case MsgType.HELLO: {
        const hello = decodeHello(f.payload);
        if (!this.hello) {
          if (this.helloTimer) clearTimeout(this.helloTimer);
          this.helloTimer = null;
        } else if (f.stream === this.nonce) {
          return; // the answer to a repeated HOST_HELLO: same session
        } else {
          this.failAll(new AgentError('AGENT_GONE', 'the agent restarted its session'), false);
        }
        this.hello = hello;
        this.resolveReady(hello);
        this.emit('hello', hello);
        return;
      }
      case MsgType.PONG: {
        const p = this.requests.get(f.stream);
        if (p?.kind !== 'ping') return;
        this.requests.delete(f.stream);
        clearTimeout(p.timer);
        (p.resolve as (v: number) => void)(performance.now() - (p.sent ?? 0));
        return;
      }
      case MsgType.STARTED: {
        const s = decodeStarted(f.payload);
        this.execs.get(f.stream)?.onStarted(s.pid, s.stdinWindow);
        return;
      }
      case MsgType.STDOUT:
      case MsgType.STDERR: {
        this.execs.get(f.stream)?.onOutput(f.type === MsgType.STDOUT ? 'out' : 'err', f.payload);
        return;
      }
      case MsgType.WINDOW: {
        const w = decodeWindow(f.payload);
        if (w.channel === Channel.STDIN) this.execs.get(f.stream)?.addCredit(w.increment);
        return;
      }
      case MsgType.EXIT: {
        const e = decodeExit(f.payload);
        const h = this.execs.get(f.stream);
        this.execs.delete(f.stream);
        h?.onExit(e);
        return;
      }
      case MsgType.USB_ATTACHED:
      case MsgType.USB_DETACHED: {
        const p = this.requests.get(f.stream);
        const kind = f.type === MsgType.USB_ATTACHED ? 'usb-attach' : 'usb-detach';
        if (p?.kind !== kind) return;
        const value = f.type === MsgType.USB_ATTACHED ? decodeUsbAttached(f.payload) : undefined;
        if (f.type === MsgType.USB_DETACHED && f.payload.length !== 0) throw new PayloadError(`${f.payload.length} trailing bytes`);
        this.requests.delete(f.stream);
        clearTimeout(p.timer);
        (p.resolve as (v: unknown) => void)(value);
        return;
      }
      case MsgType.LISTENERS: {
        this.listenerSet = decodeListeners(f.payload);
        this.emit('listeners', this.listenerSet);
        return;
      }
      case MsgType.ERROR: {
        const m = decodeError(f.payload);
        const code: AgentErrorCodeName =
          m.code === AgentErrorCode.EXEC_FAILED
            ? 'EXEC_FAILED'
            : m.code === AgentErrorCode.USB_FAILED || m.code === AgentErrorCode.USB_IMPORT_REFUSED || m.code === AgentErrorCode.USB_NO_PORT
              ? 'USB_FAILED'
              : 'AGENT_REJECTED';
        const err = new AgentError(code, m.message, { errno: m.errno || undefined, agentCode: m.code });
        const h = this.execs.get(f.stream);
        if (h) {
          // Every ERROR on a stream the agent has not started (or refused) ends it.
          if (h.pid === undefined) {
            this.execs.delete(f.stream);
            h.fail(err);
            return;
          }
        }
        const p = this.requests.get(f.stream);
        if (p) {
          this.requests.delete(f.stream);
          clearTimeout(p.timer);
          p.reject(err);
          return;
        }
        this.emit('agent-error', err);
        return;
      }
      default:
        // A type from a later protocol version: nothing we can do with it.
        return;
    }
  }
}
