/**
 * The typed face of tender's native addon (`build/Release/tender_native.node`, built by
 * node-gyp from native/src). C++ does only what JavaScript cannot: TAP ioctls, setns,
 * AF_UNIX SOCK_DGRAM and AF_VSOCK sockets, waiting on a descriptor (uv_poll), batched
 * recvmmsg/sendmmsg. Validation, framing, retries and error policy live here and in the links.
 *
 * Errors. Everything thrown by this module (and by the addon) is a `NativeError`, shaped like
 * Node's system errors: `code` (errno name), `errno` (negative errno, Node's convention:
 * ENOENT is -2), `syscall`, and `path` when one was involved. Codes callers should expect:
 *
 * | code          | where, and what it means                                                          |
 * |---------------|-----------------------------------------------------------------------------------|
 * | EINVAL        | bad argument caught here before any syscall (interface name longer than 15 bytes  |
 * |               | or with '/', ':' or whitespace; MTU outside 68..65535; multicast/zero/malformed   |
 * |               | MAC; bad netns reference, cid or port); from the kernel: setns on a file that is  |
 * |               | not a network namespace                                                           |
 * | ENOENT        | network namespace (open of /var/run/netns/NAME, /proc/PID/ns/net, a path),        |
 * |               | /dev/net/tun, or a unix socket path to connect to does not exist                  |
 * | ESRCH         | never: a missing PID shows as ENOENT on /proc/PID/ns/net                          |
 * | EPERM, EACCES | no CAP_NET_ADMIN / CAP_SYS_ADMIN (TUNSETIFF, setns, SIOCSIF*), or path permissions|
 * | EBUSY         | TUNSETIFF (syscall 'ioctl(TUNSETIFF)'): a TAP of that name is already open        |
 * | EINVAL        | TUNSETIFF: the name belongs to another kind of device (lo, a veth, ...)           |
 * | EADDRINUSE    | bind: a live socket or a file that is not a socket holds the path                 |
 * | ENAMETOOLONG  | unix socket path longer than 107 bytes                                            |
 * | EAFNOSUPPORT  | socket(AF_VSOCK) on a kernel without vsock (and every vsock call off Linux)       |
 * | EADDRNOTAVAIL | vsock bind to a CID that is not this machine's                                    |
 * | ENODEV, ETIMEDOUT, ECONNRESET, ECONNREFUSED | vsock connect: no transport, no answer, refused     |
 * | ECONNREFUSED, ECONNRESET, ENOTCONN, EPIPE  | datagram/stream peer went away (send or receive)     |
 * | EIO, EBADFD   | TAP write while the interface is down / read after the device was deleted         |
 * | EOF           | FrameIO: read() returned 0 (errno -4095, libuv's UV_EOF)                          |
 * | EBADF         | a call on a FrameIO/FdStream after close()                                        |
 *
 * EAGAIN and ENOBUFS are never thrown: batched writes return how many frames went out, and
 * the caller waits with `onWritable` (never spins: see FrameIO).
 */
import { EventEmitter } from 'node:events';
import { closeSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { dirname, join } from 'node:path';
import { Duplex, type DuplexOptions } from 'node:stream';
import { fileURLToPath } from 'node:url';

// ---------------------------------------------------------------------------------------------
// Errors

export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
  path?: string;
}

export function isNativeError(e: unknown): e is NativeError {
  return e instanceof Error && typeof (e as NativeError).code === 'string' && typeof (e as NativeError).errno === 'number';
}

/** A coded error raised on the TypeScript side of the boundary, same shape as the addon's. */
export function systemError(code: string, syscall: string, message: string, path?: string): NativeError {
  const e = new Error(`${code}: ${message}, ${syscall}${path !== undefined ? ` '${path}'` : ''}`) as NativeError;
  e.code = code;
  const n = (osConstants.errno as Record<string, number | undefined>)[code];
  e.errno = n === undefined ? -1 : -n;
  e.syscall = syscall;
  if (path !== undefined) e.path = path;
  return e;
}

// ---------------------------------------------------------------------------------------------
// The raw binding (what the C++ exports). Injectable for tests of callers via setBinding().

export interface RawFrameIOOptions {
  fd: number;
  socket: boolean;
  slots: number;
  slotSize: number;
  learnPeer: boolean;
  onFrames(buf: Uint8Array, count: number, lengths: Uint32Array): void;
  onError(err: NativeError): void;
  onPeer?(path: string): void;
}

export interface RawFrameIO {
  readonly buffer: Uint8Array;
  readonly lengths: Uint32Array;
  readonly closed: boolean;
  readonly peer: string | null;
  writeBatch(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array, count: number): number;
  setSendQueue(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array): void;
  writeQueued(count: number): number;
  onWritable(cb: () => void): void;
  pause(): void;
  resume(): void;
  close(): void;
  offloadEnable(gatewayMac: Uint8Array, vnetHdrLen: number, onExit: (id: number) => void): void;
  offloadAdopt(id: number, fd: number, params: Uint32Array, guestMac: Uint8Array, sent: Uint8Array): number;
  offloadRelease(id: number, out: Uint32Array, data: Uint8Array): boolean;
  offloadHold(on: boolean): void;
  offloadStats(out: Float64Array): void;
}

export interface RawFdStream {
  readonly closed: boolean;
  readStart(): void;
  readStop(): void;
  write(buf: Uint8Array, offset: number): number;
  onWritable(cb: () => void): void;
  shutdown(): void;
  close(): void;
}

export interface RawFdWatcher {
  start(events: number): void;
  stop(): void;
  close(): void;
}

export interface NativeBinding {
  createTap(o: { name: string; nsPath: string | null; mtu: number; mac: Uint8Array | null; up: boolean; vnetHdr: boolean; offload: number }): TapDevice;
  unixDgramSocket(sndbuf: number, rcvbuf: number): number;
  unixBind(fd: number, path: string): boolean;
  /** true: connected; false: a stream connect in progress. */
  unixConnect(fd: number, path: string): boolean;
  socketpair(stream: boolean): [number, number];
  socketError(fd: number, syscall: string): void;
  shutdown(fd: number, how: number): void;
  listen(fd: number, backlog: number): void;
  /** Bytes sent, or -1 when the socket buffer is full. */
  sendSome(fd: number, buf: Uint8Array): number;
  vsockSocket(): number;
  vsockConnect(fd: number, cid: number, port: number): boolean;
  vsockBind(fd: number, cid: number, port: number): void;
  vsockAccept(fd: number): { fd: number; cid: number; port: number } | null;
  vsockAddress(fd: number, peer: boolean): { cid: number; port: number };
  FrameIO: new (o: RawFrameIOOptions) => RawFrameIO;
  FRAME_TRUNCATED: number;
  FRAME_OFFLOADED: number;
  /** Exit reasons of the TCP offload, in the order of offloadStats' counters. */
  OFFLOAD_EXITS: string[];
  OFFLOAD_PARAMS: number;
  OFFLOAD_STATE: number;
  FdStream: new (o: { fd: number; readSize: number; onRead(chunk: Buffer | null, err: NativeError | null): void }) => RawFdStream;
  FdWatcher: new (fd: number, cb: (events: number) => void) => RawFdWatcher;
}

let loaded: NativeBinding | null = null;

/** The package root: the nearest directory above this file holding package.json (works from
 * native/index.ts under vitest and from dist/native/index.js). */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('tender: package.json not found above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/** Loads the addon on first use, so importing this module never requires a build. */
export function binding(): NativeBinding {
  if (loaded) return loaded;
  const file = join(packageRoot(), 'build', 'Release', 'tender_native.node');
  if (!existsSync(file)) {
    const e = systemError('ENOENT', 'dlopen', 'native addon not built (run `npm ci` or `npx node-gyp rebuild`)', file);
    throw e;
  }
  loaded = createRequire(import.meta.url)(file) as NativeBinding;
  return loaded;
}

/** Replace the binding (tests of callers that want to fake the kernel). */
export function setBinding(b: NativeBinding | null): void {
  loaded = b;
}

// ---------------------------------------------------------------------------------------------
// TAP

export type NetnsRef = { name: string } | { path: string } | { pid: number };

export interface TapOptions {
  /** Interface name (at most 15 bytes; `%d` lets the kernel pick a number). Default: kernel's `tap%d`. */
  name?: string;
  /** 68..65535; default: the kernel's (1500). */
  mtu?: number;
  /** Unicast MAC as 6 bytes or `aa:bb:cc:dd:ee:ff`; default: kernel random. */
  mac?: Uint8Array | string;
  /** Create the device inside this network namespace (default: the caller's). */
  netns?: NetnsRef;
  /** Bring the interface up (default true). */
  up?: boolean;
  /**
   * IFF_VNET_HDR: every frame read or written is preceded by a 10-byte struct virtio_net_hdr
   * (little-endian on the hosts we run on) carrying checksum and segmentation offload state.
   */
  vnetHdr?: boolean;
  /** With vnetHdr: TUN_F_* bits passed to TUNSETOFFLOAD (what the kernel may hand us). */
  offload?: number;
}

/** TUNSETOFFLOAD bits (linux/if_tun.h). */
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;

export interface TapDevice {
  /** Non-blocking, close-on-exec; the device disappears when it is closed. */
  fd: number;
  /** The name the kernel gave (resolves `%d`). */
  name: string;
  /** Interface index inside its namespace. */
  ifindex: number;
}

/** IFNAMSIZ is 16 including the NUL; the kernel's dev_valid_name() also rejects '/', ':' and whitespace. */
export function validateIfname(name: string): void {
  const n = Buffer.byteLength(name);
  if (n === 0 || n > 15 || name === '.' || name === '..' || /[/:\s]/.test(name)) {
    throw systemError('EINVAL', 'createTap', `invalid interface name ${JSON.stringify(name)} (1..15 bytes, no '/', ':' or spaces)`);
  }
}

export function parseMac(mac: Uint8Array | string, syscall = 'createTap'): Uint8Array {
  let b: Uint8Array;
  if (typeof mac === 'string') {
    const m = /^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$/i.exec(mac);
    if (!m) throw systemError('EINVAL', syscall, `invalid MAC address ${JSON.stringify(mac)}`);
    b = new Uint8Array(m.slice(1).map((h) => parseInt(h, 16)));
  } else {
    if (mac.length !== 6) throw systemError('EINVAL', syscall, 'MAC address must be 6 bytes');
    b = Uint8Array.from(mac);
  }
  // The kernel (eth_prepare_mac_addr_change) refuses multicast and all-zero addresses.
  if (b[0]! & 1 || b.every((x) => x === 0)) throw systemError('EINVAL', syscall, 'MAC address must be unicast and non-zero');
  return b;
}

/** The file to setns() into for a namespace reference. */
export function netnsPath(ns: NetnsRef): string {
  if ('name' in ns) {
    if (!ns.name || ns.name === '.' || ns.name === '..' || ns.name.includes('/') || ns.name.includes('\0')) {
      throw systemError('EINVAL', 'setns', `invalid network namespace name ${JSON.stringify(ns.name)}`);
    }
    return `/var/run/netns/${ns.name}`;
  }
  if ('pid' in ns) {
    if (!Number.isSafeInteger(ns.pid) || ns.pid <= 0) throw systemError('EINVAL', 'setns', `invalid pid ${ns.pid}`);
    return `/proc/${ns.pid}/ns/net`;
  }
  if (typeof ns.path !== 'string' || !ns.path || ns.path.includes('\0')) throw systemError('EINVAL', 'setns', 'invalid namespace path');
  return ns.path;
}

/** Create a TAP device (IFF_TAP | IFF_NO_PI, non-blocking), optionally in another namespace. */
export function createTap(opts: TapOptions = {}): TapDevice {
  const name = opts.name ?? 'tap%d';
  validateIfname(name);
  const mtu = opts.mtu ?? 0;
  if (opts.mtu !== undefined && (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535)) {
    throw systemError('EINVAL', 'createTap', `MTU must be an integer in 68..65535, got ${mtu}`);
  }
  const mac = opts.mac === undefined ? null : parseMac(opts.mac);
  const nsPath = opts.netns ? netnsPath(opts.netns) : null;
  return binding().createTap({ name, nsPath, mtu, mac, up: opts.up ?? true, vnetHdr: opts.vnetHdr ?? false, offload: opts.offload ?? 0 });
}

// ---------------------------------------------------------------------------------------------
// Batched frame I/O

export interface FrameIOOptions {
  /** A non-blocking descriptor; FrameIO owns it from now on and closes it. */
  fd: number;
  /** true: a datagram socket (recvmmsg/sendmmsg); false: a TAP (read/write per frame). */
  socket: boolean;
  /** Frames read per wake-up at most (default 64). */
  slots?: number;
  /** Bytes per receive slot (frames longer are truncated: see TRUNCATED). */
  slotSize: number;
  /** Unconnected datagram socket: connect to the first sender and report it (vfkit). */
  learnPeer?: boolean;
  /** One call per wake-up. `buf` and `lengths` are the same pooled objects every time and are
   * only valid during the call; frame i is buf[i * slotSize, i * slotSize + lengths[i]). */
  onFrames(buf: Uint8Array, count: number, lengths: Uint32Array): void;
  /** Reading stopped: EOF (code 'EOF') or a read error. The fd stays open until close(). */
  onError(err: NativeError): void;
  /** learnPeer: the peer's path ('@name' for an abstract address); we are now connected to it. */
  onPeer?(path: string): void;
}

export class FrameIO {
  /** lengths[i] value for a datagram larger than its slot (MSG_TRUNC). */
  static get TRUNCATED(): number {
    return binding().FRAME_TRUNCATED;
  }

  readonly slotSize: number;
  readonly slots: number;
  private readonly raw: RawFrameIO;

  constructor(o: FrameIOOptions) {
    this.slots = o.slots ?? 64;
    this.slotSize = o.slotSize;
    this.raw = new (binding().FrameIO)({
      fd: o.fd,
      socket: o.socket,
      slots: this.slots,
      slotSize: o.slotSize,
      learnPeer: o.learnPeer ?? false,
      onFrames: o.onFrames,
      onError: o.onError,
      onPeer: o.onPeer,
    });
  }

  /** Writes frames [offsets[i], +lengths[i]) for i < count in order; returns how many went out.
   * Fewer than count: the device is full (EAGAIN/ENOBUFS): call onWritable. Throws a
   * NativeError only when the first frame fails for another reason (drop it and go on). */
  writeBatch(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array, count: number): number {
    return this.raw.writeBatch(buf, offsets, lengths, count);
  }

  /** Register the arrays writeQueued() sends from (for a caller with one fixed send queue). */
  setSendQueue(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array): void {
    this.raw.setSendQueue(buf, offsets, lengths);
  }

  /** writeBatch over the arrays given to setSendQueue, without passing them on every call. */
  writeQueued(count: number): number {
    return this.raw.writeQueued(count);
  }

  /** Calls cb once when the descriptor is writable (POLLOUT armed once, never a busy loop). */
  onWritable(cb: () => void): void {
    this.raw.onWritable(cb);
  }

  pause(): void {
    this.raw.pause();
  }

  resume(): void {
    this.raw.resume();
  }

  get peer(): string | null {
    return this.raw.peer;
  }

  get closed(): boolean {
    return this.raw.closed;
  }

  /** Stops polling and closes the fd. Idempotent; safe inside callbacks. */
  close(): void {
    this.raw.close();
  }

  /** lengths[i] value for a datagram the TCP offload handled (socket mode): skip it. */
  static get OFFLOADED(): number {
    return binding().FRAME_OFFLOADED;
  }

  /**
   * The TCP offload (native/src/tcp_offload.h, driven by netstack/tcp/offload.ts): frames to
   * `gatewayMac` of adopted connections are handled natively. `vnetHdrLen`: 10 on a TAP with
   * IFF_VNET_HDR, else 0. `onExit(id)`: a connection left the offload by itself; release it.
   */
  offloadEnable(gatewayMac: Uint8Array, vnetHdrLen: number, onExit: (id: number) => void): void {
    this.raw.offloadEnable(gatewayMac, vnetHdrLen, onExit);
  }

  /** 0, or an errno (EEXIST, EINVAL, EMFILE ...). */
  offloadAdopt(id: number, fd: number, params: Uint32Array, guestMac: Uint8Array, sent: Uint8Array): number {
    return this.raw.offloadAdopt(id, fd, params, guestMac, sent);
  }

  offloadRelease(id: number, out: Uint32Array, data: Uint8Array): boolean {
    return this.raw.offloadRelease(id, out, data);
  }

  offloadHold(on: boolean): void {
    this.raw.offloadHold(on);
  }

  offloadStats(out: Float64Array): void {
    this.raw.offloadStats(out);
  }
}

/** The TCP offload's exit reasons, in offloadStats' order (after its 7 totals). */
export function offloadExitNames(): string[] {
  return binding().OFFLOAD_EXITS;
}

// ---------------------------------------------------------------------------------------------
// AF_UNIX SOCK_DGRAM

/** sun_path is 108 bytes including the terminating NUL. */
const SUN_PATH_MAX = 107;

function checkUnixPath(path: string, syscall: string): void {
  if (!path || path.includes('\0')) throw systemError('EINVAL', syscall, 'invalid unix socket path', path);
  if (Buffer.byteLength(path) > SUN_PATH_MAX) throw systemError('ENAMETOOLONG', syscall, `unix socket path longer than ${SUN_PATH_MAX} bytes`, path);
}

export interface UnixDgramOptions {
  /** Bind to this path (a stale socket there is removed first). */
  bind?: string;
  /** Connect to this path. */
  connect?: string;
  /** Default 4 MiB each: on Linux the sender's SO_SNDBUF bounds datagrams queued at the peer. */
  sndbuf?: number;
  rcvbuf?: number;
}

export const UNIX_DGRAM_BUFFER = 4 << 20;

/**
 * Remove a socket file left by a dead process so bind() can succeed. Only a *socket* nobody
 * answers on is removed: a regular file is never deleted, and a live socket (connect succeeds)
 * is reported as EADDRINUSE instead of being stolen.
 */
export function removeStaleSocket(path: string): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw systemError('EADDRINUSE', 'bind', 'path exists and is not a socket', path);
  const b = binding();
  const probe = b.unixDgramSocket(0, 0);
  let live = false;
  try {
    b.unixConnect(probe, path);
    live = true;
  } catch (e) {
    // EPROTOTYPE: a live stream socket; ECONNREFUSED: nobody bound there any more.
    if (isNativeError(e) && e.code === 'EPROTOTYPE') live = true;
  } finally {
    closeSync(probe);
  }
  if (live) throw systemError('EADDRINUSE', 'bind', 'a live socket is bound to this path', path);
  unlinkSync(path);
}

/** A non-blocking AF_UNIX SOCK_DGRAM socket, optionally bound and connected. Returns the fd. */
export function openUnixDgram(o: UnixDgramOptions = {}): number {
  if (o.bind !== undefined) checkUnixPath(o.bind, 'bind');
  if (o.connect !== undefined) checkUnixPath(o.connect, 'connect');
  const b = binding();
  const fd = b.unixDgramSocket(o.sndbuf ?? UNIX_DGRAM_BUFFER, o.rcvbuf ?? UNIX_DGRAM_BUFFER);
  try {
    if (o.bind !== undefined) {
      removeStaleSocket(o.bind);
      b.unixBind(fd, o.bind);
    }
    if (o.connect !== undefined) b.unixConnect(fd, o.connect);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return fd;
}

/** Connect an existing datagram socket (e.g. after the peer appeared). Throws ENOENT/ECONNREFUSED. */
export function connectUnixDgram(fd: number, path: string): void {
  checkUnixPath(path, 'connect');
  binding().unixConnect(fd, path);
}

/** A connected pair of non-blocking AF_UNIX sockets: [fd, fd]. */
/**
 * One non-blocking send(2) on a stream socket: the bytes the kernel took, or -1 when its
 * buffer is full. Throws a NativeError for any other failure (EPIPE, ECONNRESET, ...).
 */
export function sendSome(fd: number, buf: Uint8Array): number {
  return binding().sendSome(fd, buf);
}

export function socketpair(type: 'stream' | 'dgram' = 'stream'): [number, number] {
  return binding().socketpair(type === 'stream');
}

// ---------------------------------------------------------------------------------------------
// Byte streams over a descriptor

const READABLE = 1;
const WRITABLE = 2;

/** Resolves with the events when the fd is readable/writable (one-shot). */
function waitFd(fd: number, events: number, signal?: AbortSignal): Promise<number> {
  return new Promise((resolve, reject) => {
    const w = new (binding().FdWatcher)(fd, (ev) => {
      w.close();
      signal?.removeEventListener('abort', onAbort);
      resolve(ev);
    });
    const onAbort = (): void => {
      w.close();
      reject(signal!.reason instanceof Error ? signal!.reason : systemError('ECANCELED', 'connect', 'aborted'));
    };
    if (signal?.aborted) return onAbort();
    signal?.addEventListener('abort', onAbort, { once: true });
    w.start(events);
  });
}

export interface FdStreamOptions extends DuplexOptions {
  /** Bytes per read (default 64 KiB). */
  readSize?: number;
}

/**
 * A stream.Duplex over a non-blocking descriptor (AF_VSOCK, socketpair, pipe) that
 * net.Socket cannot wrap. Owns the fd. Half-close works both ways: end() sends our FIN
 * (shutdown(SHUT_WR)) once queued writes are out; the peer's FIN ends the readable side
 * while writing goes on (allowHalfOpen defaults to true). Backpressure: push() === false
 * stops reading until _read; a partial write waits for POLLOUT before the next chunk.
 */
export class FdStream extends Duplex {
  readonly fd: number;
  private readonly raw: RawFdStream;

  constructor(fd: number, opts: FdStreamOptions = {}) {
    const { readSize, ...duplex } = opts;
    super(duplex);
    this.fd = fd;
    this.raw = new (binding().FdStream)({
      fd,
      readSize: readSize ?? 65536,
      onRead: (chunk, err) => {
        if (err) this.destroy(err);
        else if (chunk === null) this.push(null);
        else if (!this.push(chunk)) this.raw.readStop();
      },
    });
  }

  override _read(): void {
    this.raw.readStart();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.writeFrom(chunk, 0, cb);
  }

  private writeFrom(buf: Buffer, off: number, cb: (err?: Error | null) => void): void {
    try {
      while (off < buf.length) {
        const n = this.raw.write(buf, off);
        if (n === 0) {
          // Full socket buffer: wait for POLLOUT once, then continue where we stopped.
          this.raw.onWritable(() => this.writeFrom(buf, off, cb));
          return;
        }
        off += n;
      }
    } catch (e) {
      cb(e as Error);
      return;
    }
    cb();
  }

  override _final(cb: (err?: Error | null) => void): void {
    try {
      this.raw.shutdown();
      cb();
    } catch (e) {
      // The peer already closed both ways: nothing left to half-close.
      if (isNativeError(e) && e.code === 'ENOTCONN') cb();
      else cb(e as Error);
    }
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.raw.close();
    cb(err);
  }
}

// ---------------------------------------------------------------------------------------------
// AF_VSOCK

/** Any CID (bind/listen on every transport). */
export const VMADDR_CID_ANY = 0xffffffff;
/** The hypervisor / host side. */
export const VMADDR_CID_HOST = 2;
/** Let the kernel pick a port. */
export const VMADDR_PORT_ANY = 0xffffffff;

export interface VsockAddress {
  cid: number;
  port: number;
}

function checkVsock(cid: number, port: number, syscall: string): void {
  const u32 = (n: number): boolean => Number.isInteger(n) && n >= 0 && n <= 0xffffffff;
  if (!u32(cid) || !u32(port)) throw systemError('EINVAL', syscall, `invalid vsock address ${cid}:${port}`);
}

export class VsockSocket extends FdStream {
  constructor(
    fd: number,
    readonly remote: VsockAddress,
    opts?: FdStreamOptions,
  ) {
    super(fd, opts);
  }

  get remoteCid(): number {
    return this.remote.cid;
  }

  get remotePort(): number {
    return this.remote.port;
  }
}

/** Create an AF_VSOCK stream socket fd (throws EAFNOSUPPORT where the kernel has no vsock). */
export function vsockSocket(): number {
  return binding().vsockSocket();
}

/** Connect to cid:port (non-blocking connect, then wait for POLLOUT and read SO_ERROR). */
export async function vsockConnect(cid: number, port: number, opts: { signal?: AbortSignal } & FdStreamOptions = {}): Promise<VsockSocket> {
  checkVsock(cid, port, 'connect');
  const { signal, ...streamOpts } = opts;
  const b = binding();
  const fd = b.vsockSocket();
  try {
    if (!b.vsockConnect(fd, cid, port)) {
      await waitFd(fd, WRITABLE, signal);
      b.socketError(fd, 'connect');
    }
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return new VsockSocket(fd, { cid, port }, streamOpts);
}

export interface VsockServerEvents {
  connection: [VsockSocket];
  error: [NativeError];
  close: [];
}

/** A listening AF_VSOCK socket: emits 'connection' with a VsockSocket per accepted peer. */
export class VsockServer extends EventEmitter<VsockServerEvents> {
  private watcher: RawFdWatcher | null;
  private fd: number;

  constructor(
    fd: number,
    private readonly streamOpts: FdStreamOptions = {},
  ) {
    super();
    this.fd = fd;
    this.watcher = new (binding().FdWatcher)(fd, () => this.acceptAll());
    this.watcher.start(READABLE);
  }

  address(): VsockAddress {
    return binding().vsockAddress(this.fd, false);
  }

  private acceptAll(): void {
    const b = binding();
    while (this.watcher) {
      let c;
      try {
        c = b.vsockAccept(this.fd);
      } catch (e) {
        // ECONNABORTED and friends concern one peer; the listener stays up.
        this.emit('error', e as NativeError);
        return;
      }
      if (!c) return;
      this.emit('connection', new VsockSocket(c.fd, { cid: c.cid, port: c.port }, this.streamOpts));
    }
  }

  close(): void {
    if (!this.watcher) return;
    this.watcher.close();
    this.watcher = null;
    closeSync(this.fd);
    this.fd = -1;
    this.emit('close');
  }
}

/** Listen on cid:port (default cid VMADDR_CID_ANY; port VMADDR_PORT_ANY picks one, see address()). */
export function vsockListen(port: number, opts: { cid?: number; backlog?: number } & FdStreamOptions = {}): VsockServer {
  const { cid = VMADDR_CID_ANY, backlog = 128, ...streamOpts } = opts;
  checkVsock(cid, port, 'bind');
  const b = binding();
  const fd = b.vsockSocket();
  try {
    b.vsockBind(fd, cid, port);
    b.listen(fd, backlog);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return new VsockServer(fd, streamOpts);
}
