/**
 * Ethernet II frames, with 802.1Q tags passed through untouched.
 *
 * The stack itself speaks untagged frames; the switch forwards tagged ones by MAC like any
 * other frame (it is VLAN-unaware, as a dumb bridge is), and the gateway counts and drops
 * tagged frames addressed to it since it has no VLAN interfaces.
 */
import type { Mac } from '../addr.js';

export const ETH_HLEN = 14;
export const VLAN_TAG_LEN = 4;

/** EtherType registry; unknown values are kept as numbers, never rejected here. */
export const EtherType = {
  IPv4: 0x0800,
  ARP: 0x0806,
  VLAN: 0x8100,
  IPv6: 0x86dd,
  QinQ: 0x88a8,
} as const;

/** A view over a frame. Construct through `EthernetFrame.check` for untrusted bytes. */
export class EthernetFrame {
  constructor(readonly buf: Uint8Array) {}

  /** The frame if it holds at least a header (and a whole tag when tagged), else null. */
  static check(buf: Uint8Array): EthernetFrame | null {
    if (buf.length < ETH_HLEN) return null;
    const f = new EthernetFrame(buf);
    if (f.tagged && buf.length < ETH_HLEN + VLAN_TAG_LEN) return null;
    return f;
  }

  get dst(): Uint8Array {
    return this.buf.subarray(0, 6);
  }

  get src(): Uint8Array {
    return this.buf.subarray(6, 12);
  }

  /** The EtherType field at offset 12 (0x8100 for a tagged frame). */
  get outerType(): number {
    return (this.buf[12]! << 8) | this.buf[13]!;
  }

  get tagged(): boolean {
    const t = this.outerType;
    return t === EtherType.VLAN || t === EtherType.QinQ;
  }

  /** The tag control information (PCP, DEI, VID) of a tagged frame. */
  get vlanTci(): number {
    return (this.buf[14]! << 8) | this.buf[15]!;
  }

  /** The EtherType of the payload (after one tag, if any). */
  get etherType(): number {
    return this.tagged ? (this.buf[16]! << 8) | this.buf[17]! : this.outerType;
  }

  get headerLen(): number {
    return this.tagged ? ETH_HLEN + VLAN_TAG_LEN : ETH_HLEN;
  }

  get payload(): Uint8Array {
    return this.buf.subarray(this.headerLen);
  }
}

export interface EthernetRepr {
  dst: Mac;
  src: Mac;
  etherType: number;
  /** Present for an 802.1Q-tagged frame. */
  vlanTci?: number;
  /** The tag's TPID when it is not 0x8100 (802.1ad QinQ uses 0x88a8). */
  vlanTpid?: number;
}

export function parseEthernet(f: EthernetFrame): EthernetRepr {
  const r: EthernetRepr = { dst: f.dst.slice(), src: f.src.slice(), etherType: f.etherType };
  if (f.tagged) {
    r.vlanTci = f.vlanTci;
    if (f.outerType !== EtherType.VLAN) r.vlanTpid = f.outerType;
  }
  return r;
}

export function ethernetHeaderLen(r: EthernetRepr): number {
  return r.vlanTci === undefined ? ETH_HLEN : ETH_HLEN + VLAN_TAG_LEN;
}

/** Write the header at `off`; returns the header length. */
export function emitEthernet(r: EthernetRepr, buf: Uint8Array, off = 0): number {
  buf.set(r.dst, off);
  buf.set(r.src, off + 6);
  let o = off + 12;
  if (r.vlanTci !== undefined) {
    const tpid = r.vlanTpid ?? EtherType.VLAN;
    buf[o] = tpid >> 8;
    buf[o + 1] = tpid & 0xff;
    buf[o + 2] = r.vlanTci >> 8;
    buf[o + 3] = r.vlanTci & 0xff;
    o += 4;
  }
  buf[o] = r.etherType >> 8;
  buf[o + 1] = r.etherType & 0xff;
  return o + 2 - off;
}

/** The fast path: an untagged header straight from MACs. */
export function writeEthernetHeader(buf: Uint8Array, off: number, dst: Uint8Array, src: Uint8Array, etherType: number): void {
  buf.set(dst.subarray(0, 6), off);
  buf.set(src.subarray(0, 6), off + 6);
  buf[off + 12] = etherType >> 8;
  buf[off + 13] = etherType & 0xff;
}
