/**
 * The IPv4 layer as the TCP engine sees it. The lead's IPv4 layer implements this; tests use
 * a fake that captures segments.
 */
export interface Ip4Output {
  /** Scratch buffer of at least 65535 + headroom bytes; transport bytes go at `headroom`. Reused: borrowed only until send4 returns. */
  readonly scratch: Uint8Array;
  readonly headroom: number;
  /** Send scratch[headroom .. headroom+len) as the payload of an IPv4 packet src→dst with protocol `proto` (6). The transport has already written its checksum. Returns false if dropped. */
  send4(src: number, dst: number, proto: number, len: number): boolean;
  /** Largest IPv4 packet towards dst (interface MTU) so MSS = mtu - 40. */
  mtuTo(dst: number): number;
}
