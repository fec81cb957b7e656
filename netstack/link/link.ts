/**
 * A link moves Ethernet frames between the stack and one device: a TAP interface, a VMM's
 * socket (QEMU stream/dgram, vfkit unixgram), or an in-memory pipe in tests.
 *
 * Buffer rule (both directions): a frame is *borrowed* for the duration of the call. A
 * receiver that keeps a frame past its callback copies it; a link whose write completes
 * later copies it. This lets links read batches into pooled buffers and lets the stack emit
 * into a reused scratch buffer, with no allocation per frame on either side.
 */
/**
 * Offload state travelling with a frame: the virtio-net header's meaning (virtio 1.2 §5.1.6),
 * which is what a TAP with IFF_VNET_HDR reads and writes. Like the frame, it is borrowed.
 *
 * - `flags & CSUM_PARTIAL`: the L4 checksum at csumStart + csumOffset holds only the folded
 *   pseudo-header sum; whoever delivers the frame to a device without checksum offload
 *   completes it (the switch does, see offload.ts).
 * - `flags & CSUM_VALID`: the sender already verified the checksum (receive side).
 * - `gsoType === GSO_TCPV4`: a TCP super-segment whose payload is to be cut into `gsoSize`
 *   pieces, each with a copy of the headers (`hdrLen` bytes up to the payload).
 */
export interface FrameMeta {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
}

export const CSUM_PARTIAL = 1;
export const CSUM_VALID = 2;
export const GSO_NONE = 0;
export const GSO_TCPV4 = 1;

/** What a device accepts besides plain frames of at most mtu + 18 bytes. */
export interface LinkOffloads {
  /** Frames with CSUM_PARTIAL. */
  csum: boolean;
  /** GSO_TCPV4 super-segments (up to 64 KiB of IP packet). */
  tso4: boolean;
}

export function newFrameMeta(): FrameMeta {
  return { flags: 0, gsoType: GSO_NONE, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };
}

export interface Link {
  /** For logs, pcap and stats. */
  readonly name: string;
  /** Largest IP packet the device accepts (the interface MTU); frames are up to mtu + 14 (+4 with a VLAN tag). */
  readonly mtu: number;
  /** Install the receiver for frames arriving from the device. Called once, before any frame. */
  attach(rx: LinkReceiver): void;
  /**
   * Send one frame to the device. Never throws for a full device: it drops and counts instead.
   * `meta` (offload state) is given only when the frame needs it and the link declared the
   * matching `offloads`; the switch resolves offloads in software for links that did not.
   */
  send(frame: Uint8Array, meta?: FrameMeta): void;
  /** Offloads the device accepts on `send` (none when absent). */
  readonly offloads?: LinkOffloads;
  /**
   * Optional: the caller finished a burst of `send`s (e.g. the switch forwarded every frame of
   * one received batch). A link that queues frames may write them now instead of waiting for
   * its own end-of-tick flush. Links must still flush on their own when this is never called.
   */
  flush?(): void;
  /**
   * Optional: `on` = the caller promises to call flush() after every burst of send()s (the
   * switch does, at the end of each ingress batch), so the link need not schedule its own
   * end-of-turn flush; `false` withdraws the promise (the port was detached).
   */
  setCallerFlushes?(on: boolean): void;
  /** Stop moving frames and release the device. Idempotent. */
  close(): void;
  readonly stats: LinkStats;
}

export interface LinkReceiver {
  /** One frame from the device (borrowed), with its offload state when it has any. */
  frame(frame: Uint8Array, meta?: FrameMeta): void;
  /**
   * Called after a batch of frames read in one wake-up, so consumers can flush coalesced
   * work (ACKs, window updates, writes) once per batch instead of once per frame.
   */
  batchEnd?(): void;
  /** The device went away (peer closed the socket, interface deleted). */
  down?(reason: string): void;
}

export interface LinkStats {
  rxFrames: number;
  rxBytes: number;
  txFrames: number;
  txBytes: number;
  /** Frames dropped by the link itself (queue full, oversize, device error). */
  txDrops: number;
  rxDrops: number;
}

export function newLinkStats(): LinkStats {
  return { rxFrames: 0, rxBytes: 0, txFrames: 0, txBytes: 0, txDrops: 0, rxDrops: 0 };
}

/** Ethernet header plus an optional 802.1Q tag. */
export const MAX_L2_OVERHEAD = 18;
