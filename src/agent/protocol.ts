/**
 * tender's guest agent protocol, version 1 (docs/agent-protocol.md is the reference;
 * native/agent/protocol.h holds the same numbers for the C agent, and a unit test checks
 * the two agree).
 *
 * Frame: `u32 length | u8 type | u32 stream | payload`, big-endian. `length` counts type,
 * stream and payload, so it is 5..5+MAX_PAYLOAD; anything else is a protocol error (the
 * stream cannot be resynchronised). Strings are `u32 length | bytes` (UTF-8, no NUL).
 */

export const PROTOCOL_VERSION = 1;
export const HEADER_LENGTH = 9;
export const MAX_PAYLOAD = 1 << 20;

export const MsgType = {
  HELLO: 0x01,
  PING: 0x02,
  PONG: 0x03,
  HOST_HELLO: 0x04,
  EXEC: 0x10,
  STARTED: 0x11,
  STDIN: 0x12,
  STDIN_EOF: 0x13,
  STDOUT: 0x14,
  STDERR: 0x15,
  WINDOW: 0x16,
  RESIZE: 0x17,
  SIGNAL: 0x18,
  EXIT: 0x19,
  LISTENERS: 0x20,
  POWEROFF: 0x30,
  REBOOT: 0x31,
  USB_ATTACH: 0x40,
  USB_ATTACHED: 0x41,
  USB_DETACH: 0x42,
  USB_DETACHED: 0x43,
  ERROR: 0x7f,
} as const;
export type MsgType = (typeof MsgType)[keyof typeof MsgType];

/** WINDOW channels: the host grants stdout/stderr credit, the agent grants stdin credit. */
export const Channel = { STDIN: 0, STDOUT: 1, STDERR: 2 } as const;
export type Channel = (typeof Channel)[keyof typeof Channel];

export const EXEC_FLAG_TTY = 0x01;

/** Codes of the agent's ERROR message. */
export const AgentErrorCode = {
  UNKNOWN_TYPE: 1,
  BAD_PAYLOAD: 2,
  EXEC_FAILED: 3,
  STREAM_EXISTS: 4,
  TOO_MANY_STREAMS: 5,
  POWER_FAILED: 6,
  POWER_DISABLED: 7,
  USB_FAILED: 8,
  USB_IMPORT_REFUSED: 9,
  USB_NO_PORT: 10,
} as const;

export const IPPROTO_TCP = 6;
export const IPPROTO_UDP = 17;

export interface Frame {
  type: number;
  stream: number;
  /** A view into the bytes the decoder was given (or into one copy when a frame straddled chunks). */
  payload: Uint8Array;
}

export interface Hello {
  protocolVersion: number;
  agentVersion: string;
  kernelRelease: string;
  hostname: string;
  bootId: string;
}

export interface ExecRequest {
  argv: string[];
  env?: Record<string, string> | string[];
  cwd?: string;
  tty?: boolean;
  rows?: number;
  cols?: number;
  /** Initial stdout and stderr window (bytes each). */
  window: number;
}

export interface Started {
  pid: number;
  stdinWindow: number;
}

export interface Exit {
  /** Exit status, or -1 when a signal killed the process. */
  code: number;
  /** Linux signal number that killed it, 0 when it exited. */
  signal: number;
}

export interface AgentErrorMessage {
  code: number;
  errno: number;
  message: string;
}

export interface Listener {
  proto: 'tcp' | 'udp';
  family: 4 | 6;
  /** Local address, dotted quad or RFC 5952 IPv6 text ("0.0.0.0" and "::" are "any"). */
  address: string;
  port: number;
}

/** USB_ATTACH: import `busid` from the USB/IP server at host:port and attach it to vhci-hcd. */
export interface UsbAttachRequest {
  /**
   * IPv4 or IPv6 literal as the guest reaches it (the gateway address inside the machine's
   * network), or `vsock:CID` for AF_VSOCK (`vsock:2`: the host; agents since the vsock
   * transport, older ones answer BAD_PAYLOAD).
   */
  host: string;
  port: number;
  busid: string;
  /** enum usb_device_speed to attach with; 0 or absent: the speed in the server's device record. */
  speed?: number;
}

/** USB_ATTACHED: where the device went. */
export interface UsbAttached {
  /** vhci_hcd.0 port (as in its `status` file; the argument of USB_DETACH). */
  port: number;
  /** busnum << 16 | devnum, from the server's device record. */
  devid: number;
  /** The speed written to `attach` (enum usb_device_speed). */
  speed: number;
}

/** Thrown by the payload decoders on a malformed payload. */
export class PayloadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PayloadError';
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/** One frame: header and payload in a single buffer. */
export function encodeFrame(type: number, stream: number, payload?: Uint8Array): Buffer {
  const n = payload?.length ?? 0;
  if (n > MAX_PAYLOAD) throw new RangeError(`payload of ${n} bytes exceeds ${MAX_PAYLOAD}`);
  const b = Buffer.allocUnsafe(HEADER_LENGTH + n);
  b.writeUInt32BE(5 + n, 0);
  b[4] = type;
  b.writeUInt32BE(stream >>> 0, 5);
  if (payload && n) b.set(payload, HEADER_LENGTH);
  return b;
}

/** Sequential writer for payloads; sizes are computed first so one buffer is allocated. */
class Writer {
  readonly buf: Buffer;
  private off = 0;
  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(size);
  }
  u8(v: number): this {
    this.buf[this.off++] = v;
    return this;
  }
  u16(v: number): this {
    this.buf.writeUInt16BE(v, this.off);
    this.off += 2;
    return this;
  }
  u32(v: number): this {
    this.buf.writeUInt32BE(v >>> 0, this.off);
    this.off += 4;
    return this;
  }
  str(s: Buffer): this {
    this.u32(s.length);
    s.copy(this.buf, this.off);
    this.off += s.length;
    return this;
  }
}

function strBytes(s: string, what: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.includes(0)) throw new RangeError(`${what} contains a NUL byte`);
  return b;
}

export function encodeExecPayload(req: ExecRequest): Buffer {
  if (req.argv.length === 0) throw new RangeError('argv is empty');
  const argv = req.argv.map((a) => strBytes(a, 'an argument'));
  const envList = Array.isArray(req.env) ? req.env : Object.entries(req.env ?? {}).map(([k, v]) => `${k}=${v}`);
  const env = envList.map((e) => {
    const eq = e.indexOf('=');
    if (eq <= 0) throw new RangeError(`environment entry ${JSON.stringify(e)} is not NAME=value`);
    return strBytes(e, 'an environment entry');
  });
  const cwd = strBytes(req.cwd ?? '', 'cwd');
  const rows = req.rows ?? 0;
  const cols = req.cols ?? 0;
  for (const [n, v] of [['rows', rows], ['cols', cols]] as const) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new RangeError(`${n} must be an integer 0..65535`);
  }
  let size = 1 + 2 + 2 + 4 + 4 + cwd.length + 4 + 4;
  for (const s of argv) size += 4 + s.length;
  for (const s of env) size += 4 + s.length;
  if (size > MAX_PAYLOAD) throw new RangeError(`EXEC of ${size} bytes exceeds ${MAX_PAYLOAD}`);
  const w = new Writer(size)
    .u8(req.tty ? EXEC_FLAG_TTY : 0)
    .u16(rows)
    .u16(cols)
    .u32(req.window)
    .str(cwd)
    .u32(argv.length);
  for (const s of argv) w.str(s);
  w.u32(env.length);
  for (const s of env) w.str(s);
  return w.buf;
}

export function encodeWindowPayload(channel: Channel, increment: number): Buffer {
  return new Writer(5).u8(channel).u32(increment).buf;
}

export function encodeResizePayload(rows: number, cols: number): Buffer {
  return new Writer(4).u16(rows).u16(cols).buf;
}

export function encodeSignalPayload(signal: number): Buffer {
  return new Writer(4).u32(signal).buf;
}

/** `u16 port | u8 speed | str host | str busid`; the busid must fit the kernel's 32-byte field. */
export function encodeUsbAttachPayload(req: UsbAttachRequest): Buffer {
  if (!Number.isInteger(req.port) || req.port < 1 || req.port > 0xffff) throw new RangeError(`port ${req.port} out of range 1..65535`);
  const speed = req.speed ?? 0;
  if (!Number.isInteger(speed) || speed < 0 || speed > 0xff) throw new RangeError(`speed ${speed} out of range 0..255`);
  const host = strBytes(req.host, 'host');
  const busid = strBytes(req.busid, 'busid');
  if (host.length === 0 || host.length > 63) throw new RangeError('host must be 1..63 bytes');
  if (busid.length === 0 || busid.length > 31) throw new RangeError('busid must be 1..31 bytes');
  return new Writer(2 + 1 + 4 + host.length + 4 + busid.length).u16(req.port).u8(speed).str(host).str(busid).buf;
}

export function decodeUsbAttachPayload(p: Uint8Array): UsbAttachRequest {
  const r = new Reader(p);
  const port = r.u16();
  const speed = r.u8();
  const req = { host: r.str(), port, busid: r.str(), speed };
  r.end();
  return req;
}

export function encodeUsbAttachedPayload(a: UsbAttached): Buffer {
  return new Writer(12).u32(a.port).u32(a.devid).u32(a.speed).buf;
}

export function decodeUsbAttached(p: Uint8Array): UsbAttached {
  const r = new Reader(p);
  const a = { port: r.u32(), devid: r.u32(), speed: r.u32() };
  r.end();
  return a;
}

export function encodeUsbDetachPayload(port: number): Buffer {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw new RangeError(`vhci port ${port} out of range`);
  return new Writer(4).u32(port).buf;
}

export function decodeUsbDetachPayload(p: Uint8Array): number {
  const r = new Reader(p);
  const port = r.u32();
  r.end();
  return port;
}

// ---------------------------------------------------------------------------------------------
// Payload decoding (messages from the agent; each throws PayloadError on malformed input)

class Reader {
  private off = 0;
  constructor(private readonly b: Uint8Array) {}
  private need(n: number): void {
    if (this.b.length - this.off < n) throw new PayloadError(`payload too short (${this.b.length} bytes)`);
  }
  u8(): number {
    this.need(1);
    return this.b[this.off++]!;
  }
  u16(): number {
    this.need(2);
    const v = (this.b[this.off]! << 8) | this.b[this.off + 1]!;
    this.off += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const b = this.b;
    const o = this.off;
    this.off += 4;
    return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
  }
  i32(): number {
    return this.u32() | 0;
  }
  bytes(n: number): Uint8Array {
    this.need(n);
    const v = this.b.subarray(this.off, this.off + n);
    this.off += n;
    return v;
  }
  str(): string {
    return Buffer.from(this.bytes(this.u32())).toString('utf8');
  }
  end(): void {
    if (this.off !== this.b.length) throw new PayloadError(`${this.b.length - this.off} trailing bytes`);
  }
}

export function encodeHostHelloPayload(): Buffer {
  return new Writer(2).u16(PROTOCOL_VERSION).buf;
}

export function decodeHello(p: Uint8Array): Hello {
  const r = new Reader(p);
  const protocolVersion = r.u16();
  const hello = { protocolVersion, agentVersion: r.str(), kernelRelease: r.str(), hostname: r.str(), bootId: r.str() };
  // Later versions may append fields: ignore what follows.
  return hello;
}

export function decodeStarted(p: Uint8Array): Started {
  const r = new Reader(p);
  const s = { pid: r.u32(), stdinWindow: r.u32() };
  r.end();
  return s;
}

export function decodeExit(p: Uint8Array): Exit {
  const r = new Reader(p);
  const e = { code: r.i32(), signal: r.u32() };
  r.end();
  return e;
}

export function decodeWindow(p: Uint8Array): { channel: number; increment: number } {
  const r = new Reader(p);
  const w = { channel: r.u8(), increment: r.u32() };
  r.end();
  return w;
}

export function decodeError(p: Uint8Array): AgentErrorMessage {
  const r = new Reader(p);
  const e = { code: r.u32(), errno: r.i32(), message: r.str() };
  r.end();
  return e;
}

export function decodeListeners(p: Uint8Array): Listener[] {
  const r = new Reader(p);
  const n = r.u32();
  // Each entry is at least 8 bytes: refuse a count the payload cannot hold before looping.
  if (n > p.length / 8) throw new PayloadError(`listener count ${n} too large for ${p.length} bytes`);
  const out: Listener[] = [];
  for (let i = 0; i < n; i++) {
    const proto = r.u8();
    const family = r.u8();
    const port = r.u16();
    if (proto !== IPPROTO_TCP && proto !== IPPROTO_UDP) throw new PayloadError(`listener protocol ${proto}`);
    if (family !== 4 && family !== 6) throw new PayloadError(`listener family ${family}`);
    const addr = r.bytes(family === 4 ? 4 : 16);
    out.push({ proto: proto === IPPROTO_TCP ? 'tcp' : 'udp', family, address: formatAddress(addr), port });
  }
  r.end();
  return out;
}

/** Dotted quad, or IPv6 per RFC 5952 (lowercase, longest run of two or more zero groups as ::). */
export function formatAddress(a: Uint8Array): string {
  if (a.length === 4) return `${a[0]}.${a[1]}.${a[2]}.${a[3]}`;
  const g: number[] = [];
  for (let i = 0; i < 16; i += 2) g.push((a[i]! << 8) | a[i + 1]!);
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (g[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (xs: number[]) => xs.map((x) => x.toString(16)).join(':');
  if (best < 0) return hex(g);
  return `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

// ---------------------------------------------------------------------------------------------
// Incremental frame decoder

/**
 * Frames out of a byte stream cut anywhere. A frame lying inside one chunk is handed out as
 * a view of that chunk; chunks are joined (one copy) only when a frame straddles them, and
 * only once enough bytes for the whole frame have arrived. An impossible length is a
 * protocol error: the decoder stops for good (`error` says why) and never throws.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Bytes that must be buffered before another frame can come out. */
  private need = 4;
  error: string | null = null;

  constructor(private readonly maxPayload = MAX_PAYLOAD) {}

  /** Decode what `chunk` completes. Returns false once the stream is broken. */
  push(chunk: Uint8Array, onFrame: (f: Frame) => void): boolean {
    if (this.error !== null) return false;
    if (chunk.length === 0) return true;
    const c = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    this.chunks.push(c);
    this.buffered += c.length;
    if (this.buffered < this.need) return true;
    const b = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.buffered);
    let off = 0;
    for (;;) {
      const left = b.length - off;
      if (left < 4) {
        this.need = 4;
        break;
      }
      const len = b.readUInt32BE(off);
      if (len < 5 || len > 5 + this.maxPayload) {
        this.error = `frame length ${len} outside 5..${5 + this.maxPayload}`;
        this.chunks = [];
        this.buffered = 0;
        return false;
      }
      if (left < 4 + len) {
        this.need = 4 + len;
        break;
      }
      onFrame({ type: b[off + 4]!, stream: b.readUInt32BE(off + 5), payload: b.subarray(off + HEADER_LENGTH, off + 4 + len) });
      off += 4 + len;
      if (this.error !== null) return false; // reset() from inside onFrame
    }
    const rest = off === b.length ? null : b.subarray(off);
    this.chunks = rest ? [rest] : [];
    this.buffered = rest ? rest.length : 0;
    return true;
  }

  /** Bytes held waiting for the rest of a frame. */
  get pending(): number {
    return this.buffered;
  }
}

// ---------------------------------------------------------------------------------------------
// Signals: the guest is Linux whatever the host is (macOS numbers differ), so the table is
// Linux's (x86 and arm64 share it: asm-generic/signal.h).

export const LINUX_SIGNALS: Record<string, number> = {
  SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGILL: 4, SIGTRAP: 5, SIGABRT: 6, SIGBUS: 7, SIGFPE: 8,
  SIGKILL: 9, SIGUSR1: 10, SIGSEGV: 11, SIGUSR2: 12, SIGPIPE: 13, SIGALRM: 14, SIGTERM: 15,
  SIGSTKFLT: 16, SIGCHLD: 17, SIGCONT: 18, SIGSTOP: 19, SIGTSTP: 20, SIGTTIN: 21, SIGTTOU: 22,
  SIGURG: 23, SIGXCPU: 24, SIGXFSZ: 25, SIGVTALRM: 26, SIGPROF: 27, SIGWINCH: 28, SIGIO: 29,
  SIGPWR: 30, SIGSYS: 31,
};

const SIGNAL_NAMES = new Map(Object.entries(LINUX_SIGNALS).map(([k, v]) => [v, k]));

export function signalName(n: number): string {
  return SIGNAL_NAMES.get(n) ?? (n >= 34 && n <= 64 ? `SIGRT${n - 34}` : `SIG${n}`);
}

export function signalNumber(s: string | number): number {
  if (typeof s === 'number') {
    if (!Number.isInteger(s) || s < 1 || s > 64) throw new RangeError(`signal ${s} out of range 1..64`);
    return s;
  }
  const n = LINUX_SIGNALS[s.toUpperCase().startsWith('SIG') ? s.toUpperCase() : `SIG${s.toUpperCase()}`];
  if (n === undefined) throw new RangeError(`unknown signal ${s}`);
  return n;
}
