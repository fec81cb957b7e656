/**
 * A Link over a Linux TAP device, created (optionally inside another network namespace) by
 * the native addon and driven by FrameIO: batched reads into a pooled buffer, one batched
 * write per event-loop turn. See fd-link.ts for the batching and queueing rules.
 *
 * Kernel behaviour worth knowing:
 * - Writes while the interface is administratively down fail with EIO: each such frame is
 *   dropped (`tap.drop.tx_eio`), as the kernel would drop it, and the link stays open.
 * - Deleting the interface (`ip link del`) detaches the fd: the link goes down (EBADFD).
 * - The open TAP holds a reference on its network namespace: `ip netns del` only removes the
 *   name, the namespace lives on until the link is closed. Nothing reports it; the owner of
 *   the namespace's lifetime (the CLI) closes the link.
 *
 * Counters: `tap.drop.{oversize,short,queue_full,closed,tx_<errno>}`, `tap.rx_error.<errno>`.
 */
import { closeSync } from 'node:fs';
import { FdFrameLink, type FdLinkOptions } from './fd-link.js';
import { type NetnsRef, TUN_F_CSUM, TUN_F_TSO4, type TapDevice, createTap } from '../../native/index.js';

export interface TapLinkOptions extends FdLinkOptions {
  /** Interface name (1..15 bytes). */
  ifname: string;
  /** Namespace to create the interface in; default: ours. */
  netns?: NetnsRef;
  /** Interface MTU (68..65535); default 1500. */
  mtu?: number;
  /** The interface's own MAC (the guest side's address); default: kernel random. */
  mac?: Uint8Array | string;
  /** Bring the interface up (default true). */
  up?: boolean;
  /**
   * Checksum and TCP segmentation offload through the virtio-net header (default true): the
   * kernel hands over TCP super-segments of up to 64 KiB with partial checksums and takes
   * ours, so neither side computes checksums or handles MTU-sized pieces.
   */
  offload?: boolean;
}

export class TapLink extends FdFrameLink {
  private constructor(
    readonly device: TapDevice,
    mtu: number,
    o: FdLinkOptions,
    offload: boolean,
  ) {
    super(device.name, mtu, 'tap', device.fd, false, false, o, offload);
  }

  /** Create the TAP and start moving frames. Throws a NativeError (ENOENT: no such
   * namespace, EPERM: no privilege, EINVAL: bad name/MTU/MAC, EBUSY: name taken). */
  static open(o: TapLinkOptions): TapLink {
    const mtu = o.mtu ?? 1500;
    const offload = o.offload ?? true;
    const device = createTap({
      name: o.ifname,
      netns: o.netns,
      mtu,
      mac: o.mac,
      up: o.up ?? true,
      vnetHdr: offload,
      offload: offload ? TUN_F_CSUM | TUN_F_TSO4 : 0,
    });
    try {
      return new TapLink(device, mtu, o, offload);
    } catch (e) {
      closeSync(device.fd);
      throw e;
    }
  }

  get ifindex(): number {
    return this.device.ifindex;
  }
}
