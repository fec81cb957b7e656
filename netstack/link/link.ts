/**
 * A link moves Ethernet frames between the stack and one device: a TAP interface, a VMM's
 * socket (QEMU stream/dgram, vfkit unixgram), or an in-memory pipe in tests.
 *
 * Buffer rule (both directions): a frame is *borrowed* for the duration of the call. A
 * receiver that keeps a frame past its callback copies it; a link whose write completes
 * later copies it. This lets links read batches into pooled buffers and lets the stack emit
 * into a reused scratch buffer, with no allocation per frame on either side.
 */
export interface Link {
  /** For logs, pcap and stats. */
  readonly name: string;
  /** Largest IP packet the device accepts (the interface MTU); frames are up to mtu + 14 (+4 with a VLAN tag). */
  readonly mtu: number;
  /** Install the receiver for frames arriving from the device. Called once, before any frame. */
  attach(rx: LinkReceiver): void;
  /** Send one frame to the device. Never throws for a full device: it drops and counts instead. */
  send(frame: Uint8Array): void;
  /**
   * Optional: the caller finished a burst of `send`s (e.g. the switch forwarded every frame of
   * one received batch). A link that queues frames may write them now instead of waiting for
   * its own end-of-tick flush. Links must still flush on their own when this is never called.
   */
  flush?(): void;
  /** Stop moving frames and release the device. Idempotent. */
  close(): void;
  readonly stats: LinkStats;
}

export interface LinkReceiver {
  /** One frame from the device (borrowed). */
  frame(frame: Uint8Array): void;
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
