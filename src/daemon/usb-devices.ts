/**
 * Every device the USB manager knows now, host and virtual alike, and how a user's DEVICE
 * argument names one. Host devices are the ones plugged in (usb-host.ts keeps that map), virtual
 * ones those in usb.json; a host device's id is its busid, a virtual one's "v1", "v2", ...
 */
import type { HostDeviceInfo } from '../../usb/host/source.js';
import { TenderError } from '../errors.js';
import type { UsbStore } from './usb-store.js';
import { VIRTUAL_VIDPID, isVidPid, normalizeVidPid, vidpidOf, type VirtualConfig } from './usb-state.js';
import { virtualBusid } from './usb-virtual.js';

/** One device the manager knows, virtual or host. */
export type Dev = { id: string; busid: string; vidpid: string } & ({ kind: 'virtual'; v: VirtualConfig } | { kind: 'host'; info: HostDeviceInfo });

export class UsbDevices {
  constructor(
    private readonly store: UsbStore,
    /** Host devices plugged in now, by busid. */
    private readonly present: ReadonlyMap<string, HostDeviceInfo>,
  ) {}

  /** Every device there is now: host devices by busid, then the virtual ones (bus 99). */
  all(): Dev[] {
    const host: Dev[] = [...this.present.values()]
      .sort((a, b) => a.busid.localeCompare(b.busid, 'en', { numeric: true }))
      .map((info) => ({ kind: 'host', id: info.busid, busid: info.busid, vidpid: vidpidOf(info.vendorId, info.productId), info }));
    const virt: Dev[] = this.store.state.virtual.map((v) => ({ kind: 'virtual', id: v.id, busid: virtualBusid(v), vidpid: VIRTUAL_VIDPID[v.kind], v }));
    return [...host, ...virt];
  }

  byId(id: string): Dev | undefined {
    return this.all().find((d) => d.id === id);
  }

  byBusid(busid: string): Dev | undefined {
    return this.all().find((d) => d.busid === busid);
  }

  /** The id of the device the USB/IP server offers as `busid` (what a client names when it imports). */
  idOfBusid(busid: string): string | undefined {
    if (this.present.has(busid)) return busid;
    return this.store.state.virtual.find((v) => virtualBusid(v) === busid)?.id;
  }

  /** DEVICE as users give it: a virtual id or name, a busid, or a VID:PID naming exactly one device. */
  resolve(device: string): Dev {
    const all = this.all();
    const exact = all.find((d) => d.id === device || d.busid === device || (d.kind === 'virtual' && d.v.name !== undefined && d.v.name === device));
    if (exact) return exact;
    if (isVidPid(device)) {
      const vp = normalizeVidPid(device);
      const hits = all.filter((d) => d.vidpid === vp);
      if (hits.length === 1) return hits[0]!;
      if (hits.length > 1) throw new TenderError('BAD_ARGUMENT', `${hits.length} devices are ${vp} (${hits.map((d) => d.busid).join(', ')}): give a busid`);
    }
    throw new TenderError('USB_DEVICE_NOT_FOUND', `no USB device "${device}" is plugged in (tender usb ls)`);
  }
}
