/**
 * A Link carrying one Ethernet frame per datagram over an AF_UNIX SOCK_DGRAM socket: QEMU's
 * `-netdev dgram` with unix addresses, and vfkit's `virtio-net,unixSocketPath=`.
 *
 * Modes:
 * - `listen(path)` (vfkit): bind `path` and wait; vfkit binds a socket of its own and sends
 *   from it, so the first datagram's source address is the peer: FrameIO connects to it and
 *   we answer there. Frames sent before that are dropped (`dgram.drop.no_peer`).
 * - `connect(localPath, remotePath)` (QEMU `-netdev dgram,local.type=unix,local.path=Q,
 *   remote.type=unix,remote.path=T`: we bind T and connect to Q). QEMU binds its path only
 *   when it starts; if Q does not exist yet (ENOENT) or is a dead socket (ECONNREFUSED), the
 *   link learns the peer from the first datagram like listen mode, QEMU sending from Q.
 *
 * vfkit sends a 4-byte "VFKT" datagram first (a frame is never 4 bytes): swallowed and counted
 * as `dgram.vfkt_hello`. Other datagrams shorter than an Ethernet header: `dgram.drop.short`.
 * A peer that went away (ECONNREFUSED/ECONNRESET) takes the link down.
 */
import { closeSync, lstatSync, unlinkSync } from 'node:fs';
import { FdFrameLink, type FdLinkOptions } from './fd-link.js';
import { connectUnixDgram, isNativeError, openUnixDgram } from '../../native/index.js';

export interface DatagramLinkOptions extends FdLinkOptions {
  /** Default 1500; vfkit allows up to 65535 (macOS 13+). */
  mtu?: number;
  name?: string;
  /** Socket buffers (default 4 MiB each). */
  sndbuf?: number;
  rcvbuf?: number;
  /** Told when the peer is learned from its first datagram. */
  onPeer?: (path: string) => void;
}

/** "VFKT": vfkit's hello datagram (vfkit pkg/virtio/virtio-net.go). */
const VFKT = [0x56, 0x46, 0x4b, 0x54];

export class DatagramLink extends FdFrameLink {
  private peerPath: string | null;
  private readonly peerListener: ((path: string) => void) | undefined;

  private constructor(
    fd: number,
    readonly localPath: string,
    peer: string | null,
    o: DatagramLinkOptions,
  ) {
    const mtu = o.mtu ?? 1500;
    super(o.name ?? `dgram:${localPath}`, mtu, 'dgram', fd, true, peer === null, o);
    this.peerPath = peer;
    this.peerListener = o.onPeer;
  }

  /** vfkit style: bind `path`, answer whoever sends first. */
  static listen(path: string, o: DatagramLinkOptions = {}): DatagramLink {
    const fd = openUnixDgram({ bind: path, sndbuf: o.sndbuf, rcvbuf: o.rcvbuf });
    return DatagramLink.wrap(fd, path, null, o);
  }

  /** QEMU style: bind `localPath`, send to `remotePath` (learned later if not there yet). */
  static connect(localPath: string, remotePath: string, o: DatagramLinkOptions = {}): DatagramLink {
    const fd = openUnixDgram({ bind: localPath, sndbuf: o.sndbuf, rcvbuf: o.rcvbuf });
    let peer: string | null = remotePath;
    try {
      connectUnixDgram(fd, remotePath);
    } catch (e) {
      if (isNativeError(e) && (e.code === 'ENOENT' || e.code === 'ECONNREFUSED')) {
        peer = null;
      } else {
        closeSync(fd);
        unlinkQuietly(localPath);
        throw e;
      }
    }
    return DatagramLink.wrap(fd, localPath, peer, o);
  }

  private static wrap(fd: number, path: string, peer: string | null, o: DatagramLinkOptions): DatagramLink {
    try {
      return new DatagramLink(fd, path, peer, o);
    } catch (e) {
      closeSync(fd);
      unlinkQuietly(path);
      throw e;
    }
  }

  /** The peer's socket path, once known ('@name' for an abstract address). */
  get peer(): string | null {
    return this.peerPath;
  }

  protected override canSend(): boolean {
    return this.peerPath !== null;
  }

  protected override onPeer(path: string): void {
    this.peerPath = path;
    this.counters.inc('dgram.peer_learned');
    this.peerListener?.(path);
  }

  protected override swallow(buf: Uint8Array, off: number, len: number): boolean {
    if (len !== 4 || buf[off] !== VFKT[0] || buf[off + 1] !== VFKT[1] || buf[off + 2] !== VFKT[2] || buf[off + 3] !== VFKT[3]) {
      return false;
    }
    this.counters.inc('dgram.vfkt_hello');
    return true;
  }

  protected override down(reason: string): void {
    super.down(reason);
    this.removeSocketFile();
  }

  override close(): void {
    super.close();
    this.removeSocketFile();
  }

  private unlinked = false;

  /** Like net.Server on a unix path: the socket file is ours, leave nothing behind. */
  private removeSocketFile(): void {
    if (this.unlinked) return;
    this.unlinked = true;
    unlinkQuietly(this.localPath);
  }
}

function unlinkQuietly(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // already gone
  }
}
