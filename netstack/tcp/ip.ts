/**
 * The IPv4 layer as the TCP engine sees it. The lead's IPv4 layer implements this; tests use
 * a fake that captures segments.
 */
export interface Ip4Output {
  /** Scratch buffer of at least 65535 + headroom bytes; transport bytes go at `headroom`. Reused: borrowed only until send4 returns. */
  readonly scratch: Uint8Array;
  readonly headroom: number;
  /** Send scratch[headroom .. headroom+len) as the payload of an IPv4 packet src→dst with protocol `proto` (6). The transport has already written its checksum. Returns false if dropped. */
  send4(src: number, dst: number, proto: number, len: number, gsoSize?: number): boolean;
  /**
   * Checksum offload: transports write only the pseudo-header sum (see emitTcp) and the IP
   * layer marks the packet partial; whatever delivers it to a device without offload
   * completes the sum. Absent = false.
   */
  readonly csumOffload?: boolean;
  /**
   * Segmentation offload: the largest TCP payload of one super-segment; `send4`'s `gsoSize`
   * then says into which MSS the super-segment is to be cut. Absent or 0 = no TSO.
   */
  readonly tsoMax?: number;
  /** Largest IPv4 packet towards dst (interface MTU) so MSS = mtu - 40. */
  mtuTo(dst: number): number;
}
