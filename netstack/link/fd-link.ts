/**
 * The part TapLink and DatagramLink share: a Link over a descriptor that carries one frame per
 * read/datagram, driven by the native FrameIO (batched reads, batched writes).
 *
 * Receive: FrameIO makes one call per wake-up with up to `slots` frames in its pooled buffer;
 * each goes to `rx.frame()` as a subarray (borrowed, per the Link rule), then `rx.batchEnd()`.
 *
 * Send: `send()` copies the frame into a send arena (the caller's buffer is only borrowed)
 * and schedules one flush per event-loop turn, which writes every pending frame with one
 * `writeQueued` (FrameIO's batched write over the arena, registered once). The flush runs
 * from setImmediate rather than queueMicrotask: a microtask would run after *each* callback
 * (each readable socket, each timer), while an immediate runs once
 * after the whole poll phase, so frames produced by every descriptor that woke up together
 * (the TAP batch and, later, many NAT sockets) leave in one batch. It costs no latency: while
 * an immediate is pending libuv polls with a zero timeout, so the flush happens in the same
 * loop iteration. A link on a switch is not scheduled at all: the switch promises
 * (`setCallerFlushes`) to flush every port it sent to at the end of each batch, and an
 * immediate per burst (the Immediate object, its async resource, two calls into Node's C++
 * to ref and unref the loop's idle handle) was a measurable part of a 1-byte round trip.
 * When a flush comes first anyway, a pending immediate is cancelled.
 *
 * When the device is full (EAGAIN/ENOBUFS) the unsent frames stay queued and the link waits
 * for POLLOUT once (never retries in a loop: the ENOBUFS CPU spin seen with vfkit); past the
 * queue bound new frames are dropped and counted. Counters: `<layer>.drop.<reason>`.
 */
import { Counters } from '../counters.js';
import {
  CSUM_PARTIAL,
  CSUM_VALID,
  type FrameMeta,
  GSO_NONE,
  GSO_TCPV4,
  type Link,
  type LinkOffloads,
  type LinkReceiver,
  type LinkStats,
  MAX_L2_OVERHEAD,
  newFrameMeta,
  newLinkStats,
} from './link.js';
import { FrameIO, type NativeError, isNativeError, offloadExitNames } from '../../native/index.js';
import type { OffloadPort } from '../tcp/offload.js';

/** An Ethernet header: anything shorter is not a frame. */
export const MIN_FRAME = 14;

export interface FdLinkOptions {
  /** Frames read per wake-up at most (default 64). */
  slots?: number;
  /** Send queue bound in frames (default 512). */
  txQueueFrames?: number;
  /** Send queue bound in bytes (default min(txQueueFrames × max frame, 8 MiB)). */
  txQueueBytes?: number;
  counters?: Counters;
}

/** struct virtio_net_hdr (10 bytes, little-endian here): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset. */
export const VNET_HDR_LEN = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
const VIRTIO_NET_HDR_F_DATA_VALID = 2;
const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
const VIRTIO_NET_HDR_GSO_ECN = 0x80;

/** Errors after which the device is gone: stop and report down instead of dropping per frame. */
const FATAL = new Set(['ECONNREFUSED', 'ECONNRESET', 'ENOTCONN', 'EPIPE', 'EBADF', 'EBADFD', 'ENODEV', 'ENXIO', 'EOF']);

export abstract class FdFrameLink implements Link {
  private readonly st: LinkStats = newLinkStats();
  /** Frames the TCP offload moved are counted here too (folded in when read). */
  get stats(): LinkStats {
    if (this.offloadOn) this.foldOffloadStats();
    return this.st;
  }
  readonly counters: Counters;
  /** Largest frame accepted either way: mtu + Ethernet header + one 802.1Q tag. */
  readonly maxFrame: number;
  protected readonly io: FrameIO;
  /** Bytes of virtio-net header before each frame on the descriptor (0 or 10). */
  protected readonly vnet: number;
  readonly offloads: LinkOffloads | undefined;
  /** Reused for every received frame (borrowed, like the frame). */
  private readonly rxMeta: FrameMeta = newFrameMeta();
  protected closed = false;
  private rx: LinkReceiver | null = null;
  private readonly truncated: number;
  private readonly offloaded: number;
  private offloadOn = false;

  private readonly arena: Uint8Array;
  private readonly offs: Uint32Array;
  private readonly lens: Uint32Array;
  /** Pending frames are offs/lens[0..pending); their bytes lie in arena[dataStart, dataEnd). */
  private pending = 0;
  private dataStart = 0;
  private dataEnd = 0;
  /** The end-of-turn flush, while one is scheduled. */
  private immediate: NodeJS.Immediate | null = null;
  private waitingWritable = false;
  /** The switch flushes us after every burst (setCallerFlushes): no end-of-turn immediate. */
  private callerFlushes = false;
  private readonly flushNow = (): void => {
    this.immediate = null;
    this.flush();
  };
  private readonly onWritable = (): void => {
    this.waitingWritable = false;
    this.flush();
    if (this.offloadOn && !this.waitingWritable) this.io.offloadHold(false);
  };

  protected constructor(
    readonly name: string,
    readonly mtu: number,
    /** Counter prefix: `tap`, `dgram`. */
    protected readonly layer: string,
    fd: number,
    socket: boolean,
    learnPeer: boolean,
    o: FdLinkOptions,
    /** A TAP opened with IFF_VNET_HDR and checksum + TSO4 offloads. */
    vnetHdr = false,
  ) {
    this.counters = o.counters ?? new Counters();
    this.vnet = vnetHdr ? VNET_HDR_LEN : 0;
    this.offloads = vnetHdr ? { csum: true, tso4: true } : undefined;
    // With TSO the device exchanges IP packets up to 64 KiB whatever the MTU.
    this.maxFrame = vnetHdr ? 65535 + MAX_L2_OVERHEAD : mtu + MAX_L2_OVERHEAD;
    const frames = o.txQueueFrames ?? 512;
    const bytes = o.txQueueBytes ?? Math.min(frames * this.maxFrame, 8 << 20);
    this.arena = new Uint8Array(Math.max(bytes, this.maxFrame));
    this.offs = new Uint32Array(frames);
    this.lens = new Uint32Array(frames);
    // One byte more than the largest frame, so a longer frame shows as oversize, not as a
    // silently truncated one; rounded to 8 to keep slots aligned.
    const slotSize = (this.maxFrame + this.vnet + 1 + 7) & ~7;
    this.io = new FrameIO({
      fd,
      socket,
      slots: o.slots ?? 64,
      slotSize,
      learnPeer,
      onFrames: (buf, count, lengths) => this.onFrames(buf, count, lengths, slotSize),
      onError: (err) => this.onReadError(err),
      onPeer: (path) => this.onPeer(path),
    });
    // The send queue never changes: register it once (see flush()).
    this.io.setSendQueue(this.arena, this.offs, this.lens);
    this.truncated = FrameIO.TRUNCATED;
    this.offloaded = FrameIO.OFFLOADED;
    // Nothing is read before a receiver is attached (frames would have nowhere to go).
    this.io.pause();
  }

  attach(rx: LinkReceiver): void {
    this.rx = rx;
    if (!this.closed) this.io.resume();
  }

  /** Subclass hook for datagrams that are not frames (vfkit's hello). true: consumed. */
  protected swallow(_buf: Uint8Array, _off: number, _len: number): boolean {
    return false;
  }

  /** Subclass hook: learnPeer connected us to a sender. */
  protected onPeer(_path: string): void {}

  /** Subclass hook: false while there is nobody to send to (counted as no_peer). */
  protected canSend(): boolean {
    return true;
  }

  private dropRx(reason: string): void {
    this.st.rxDrops++;
    this.counters.inc(`${this.layer}.drop.${reason}`);
  }

  private dropTx(reason: string, n = 1): void {
    this.st.txDrops += n;
    this.counters.inc(`${this.layer}.drop.${reason}`, n);
  }

  private onFrames(buf: Uint8Array, count: number, lengths: Uint32Array, slotSize: number): void {
    const rx = this.rx;
    for (let i = 0; i < count && !this.closed; i++) {
      const len = lengths[i];
      const off = i * slotSize;
      if (len === this.offloaded) continue; // the TCP offload handled this datagram
      if (len === this.truncated || len > this.maxFrame + this.vnet) {
        this.dropRx('oversize');
        continue;
      }
      if (this.vnet) {
        if (len < this.vnet + MIN_FRAME) {
          this.dropRx('short');
          continue;
        }
        const meta = this.readVnetHdr(buf, off);
        if (meta === null) continue;
        this.st.rxFrames++;
        this.st.rxBytes += len - this.vnet;
        rx?.frame(buf.subarray(off + this.vnet, off + len), meta.flags === 0 && meta.gsoType === GSO_NONE ? undefined : meta);
        continue;
      }
      if (this.swallow(buf, off, len)) continue;
      if (len < MIN_FRAME) {
        this.dropRx('short');
        continue;
      }
      this.st.rxFrames++;
      this.st.rxBytes += len;
      rx?.frame(buf.subarray(off, off + len));
    }
    rx?.batchEnd?.();
  }

  private readVnetHdr(b: Uint8Array, off: number): FrameMeta | null {
    const m = this.rxMeta;
    const flags = b[off]!;
    const gso = b[off + 1]! & ~VIRTIO_NET_HDR_GSO_ECN;
    m.flags = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM ? CSUM_PARTIAL : 0) | (flags & VIRTIO_NET_HDR_F_DATA_VALID ? CSUM_VALID : 0);
    m.hdrLen = b[off + 2]! | (b[off + 3]! << 8);
    m.gsoSize = b[off + 4]! | (b[off + 5]! << 8);
    m.csumStart = b[off + 6]! | (b[off + 7]! << 8);
    m.csumOffset = b[off + 8]! | (b[off + 9]! << 8);
    if (gso === 0) m.gsoType = GSO_NONE;
    else if (gso === VIRTIO_NET_HDR_GSO_TCPV4) m.gsoType = GSO_TCPV4;
    else {
      // We only enabled TSO4 (TUNSETOFFLOAD): anything else is a kernel we do not understand.
      this.dropRx('gso_unsupported');
      return null;
    }
    return m;
  }

  private onReadError(err: NativeError): void {
    this.counters.inc(`${this.layer}.rx_error.${err.code.toLowerCase()}`);
    this.down(`${this.name}: ${err.message}`);
  }

  send(frame: Uint8Array, meta?: FrameMeta): void {
    const flen = frame.length;
    const len = flen + this.vnet;
    if (this.closed) return this.dropTx('closed');
    if (!this.canSend()) return this.dropTx('no_peer');
    if (flen > this.maxFrame || (flen > this.mtu + MAX_L2_OVERHEAD && meta?.gsoType !== GSO_TCPV4)) return this.dropTx('oversize');
    if (flen < MIN_FRAME) return this.dropTx('short');
    if (this.pending === this.offs.length) return this.dropTx('queue_full');
    if (this.dataEnd + len > this.arena.length) {
      this.compact();
      if (this.dataEnd + len > this.arena.length) return this.dropTx('queue_full');
    }
    if (this.vnet) this.writeVnetHdr(this.arena, this.dataEnd, meta);
    this.arena.set(frame, this.dataEnd + this.vnet);
    this.offs[this.pending] = this.dataEnd;
    this.lens[this.pending] = len;
    this.pending++;
    this.dataEnd += len;
    if (this.immediate === null && !this.waitingWritable && !this.callerFlushes) this.immediate = setImmediate(this.flushNow);
  }

  setCallerFlushes(on: boolean): void {
    this.callerFlushes = on;
    if (!on && this.pending > 0 && this.immediate === null && !this.waitingWritable) this.immediate = setImmediate(this.flushNow);
  }

  private writeVnetHdr(b: Uint8Array, off: number, meta: FrameMeta | undefined): void {
    if (meta === undefined) {
      b.fill(0, off, off + VNET_HDR_LEN);
      return;
    }
    b[off] = (meta.flags & CSUM_PARTIAL ? VIRTIO_NET_HDR_F_NEEDS_CSUM : 0) | (meta.flags & CSUM_VALID ? VIRTIO_NET_HDR_F_DATA_VALID : 0);
    b[off + 1] = meta.gsoType === GSO_TCPV4 ? VIRTIO_NET_HDR_GSO_TCPV4 : 0;
    b[off + 2] = meta.hdrLen & 0xff;
    b[off + 3] = meta.hdrLen >> 8;
    b[off + 4] = meta.gsoSize & 0xff;
    b[off + 5] = meta.gsoSize >> 8;
    b[off + 6] = meta.csumStart & 0xff;
    b[off + 7] = meta.csumStart >> 8;
    b[off + 8] = meta.csumOffset & 0xff;
    b[off + 9] = meta.csumOffset >> 8;
  }

  /** Move the pending bytes to the start of the arena (only when the tail is full). */
  private compact(): void {
    if (this.dataStart === 0) return;
    const shift = this.dataStart;
    this.arena.copyWithin(0, shift, this.dataEnd);
    for (let i = 0; i < this.pending; i++) this.offs[i] -= shift;
    this.dataStart = 0;
    this.dataEnd -= shift;
  }

  /** Forget the first k pending frames (sent or dropped). */
  private consume(k: number): void {
    if (k === 0) return;
    for (let i = 0; i < k; i++) {
      this.st.txFrames++;
      this.st.txBytes += this.lens[i] - this.vnet;
    }
    this.shift(k);
  }

  private shift(k: number): void {
    if (k >= this.pending) {
      this.pending = this.dataStart = this.dataEnd = 0;
      return;
    }
    this.dataStart = this.offs[k];
    this.offs.copyWithin(0, k, this.pending);
    this.lens.copyWithin(0, k, this.pending);
    this.pending -= k;
  }

  /** Write all pending frames; exposed for tests and for callers that want to push now. */
  flush(): void {
    if (this.immediate !== null) {
      // Everything pending goes now (or waits for POLLOUT): the end-of-turn flush has nothing left to do.
      clearImmediate(this.immediate);
      this.immediate = null;
    }
    while (!this.closed && !this.waitingWritable && this.pending > 0) {
      let k: number;
      try {
        k = this.io.writeQueued(this.pending);
      } catch (e) {
        const code = isNativeError(e) ? e.code : 'unknown';
        if (FATAL.has(code)) {
          // Everything queued was meant for the peer that is gone.
          this.dropTx(`tx_${code.toLowerCase()}`, this.pending);
          this.shift(this.pending);
          this.down(`${this.name}: ${(e as Error).message}`);
          return;
        }
        // One bad frame (EINVAL, EMSGSIZE) or a device that is down (EIO on a TAP whose
        // interface is not up): drop the first frame, as the kernel would, and go on.
        this.dropTx(`tx_${code.toLowerCase()}`);
        this.shift(1);
        continue;
      }
      const all = k === this.pending;
      this.consume(k);
      if (all) return;
      this.waitingWritable = true;
      // Offloaded segments must not overtake the frames queued here (tcp/offload.ts).
      if (this.offloadOn) this.io.offloadHold(true);
      this.io.onWritable(this.onWritable);
    }
  }

  // ---- TCP offload ----

  private readonly offStats = new Float64Array(7 + 16);
  private readonly offSeen = new Float64Array(7 + 16);

  /**
   * Turn on the TCP offload for this link (native/src/tcp_offload.h): segments of connections
   * the engine adopts (tcp/offload.ts) are handled natively when they come from the guest to
   * `gatewayMac`. `onExit(id)`: the native side gave connection `id` back.
   */
  enableOffload(gatewayMac: Uint8Array, onExit: (id: number) => void): OffloadPort | null {
    if (this.closed) return null;
    // Once per link: a link moved off the network and back (`tender net bridge`) keeps the
    // offload it had (the daemon has one network, so the same gateway and exit handler).
    if (this.offloadPort !== null) return this.offloadPort;
    this.io.offloadEnable(gatewayMac, this.vnet, onExit);
    this.offloadOn = true;
    const io = this.io;
    this.offloadPort = {
      adopt: (id, fd, params, mac, sent) => (this.closed ? -1 : io.offloadAdopt(id, fd, params, mac, sent)),
      release: (id, out, data) => !this.closed && io.offloadRelease(id, out, data),
    };
    return this.offloadPort;
  }

  private offloadPort: OffloadPort | null = null;

  /** The offload's totals and exits, for counters: `tcp.offload.*` (name → value). */
  offloadCounters(): Record<string, number> | null {
    if (!this.offloadOn || this.closed) return null;
    this.io.offloadStats(this.offStats);
    const o = this.offStats;
    const out: Record<string, number> = { flows: o[0]!, rx_segments: o[1]!, tx_segments: o[2]!, rx_bytes: o[3]!, tx_bytes: o[4]! };
    offloadExitNames().forEach((n, i) => (out[`exit.${n}`] = o[7 + i]!));
    return out;
  }

  private foldOffloadStats(): void {
    if (this.closed) return;
    const o = this.offStats;
    this.io.offloadStats(o);
    const seen = this.offSeen;
    // rx: segments and frame bytes from the guest; tx: the same towards it.
    this.st.rxFrames += o[1]! - seen[1]!;
    this.st.txFrames += o[2]! - seen[2]!;
    this.st.rxBytes += o[5]! - seen[5]!;
    this.st.txBytes += o[6]! - seen[6]!;
    seen.set(o);
  }

  /** Frames queued and not yet written (for tests and stats). */
  get queued(): number {
    return this.pending;
  }

  protected down(reason: string): void {
    if (this.closed) return;
    this.closeIo();
    this.rx?.down?.(reason);
  }

  private closeIo(): void {
    this.closed = true;
    if (this.pending) this.dropTx('closed', this.pending);
    this.pending = this.dataStart = this.dataEnd = 0;
    this.io.close();
  }

  close(): void {
    if (this.closed) return;
    this.closeIo();
  }
}
