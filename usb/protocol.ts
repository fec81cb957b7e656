/**
 * The USB/IP wire format, exactly as the Linux kernel documents it
 * (Documentation/usb/usbip_protocol.rst) and implements it (drivers/usb/usbip/usbip_common.h,
 * tools/usb/usbip/src/usbip_network.h). Every field is big-endian; USB setup packets travel as
 * raw USB bytes (little-endian inside) and are never swapped.
 *
 * Two phases share the byte stream:
 *  - operations (OP_*): an 8-byte common header {version, code, status}, then a body;
 *  - URB traffic after a successful import: 48-byte headers (`struct usbip_header`), each a
 *    20-byte basic part {command, seqnum, devid, direction, ep} and a 28-byte command part.
 *
 * Style as netstack/wire/: views read the bytes in place; reprs carry the meaningful fields and
 * have parse/emit. Length checks happen once in the checked constructors.
 */

export const USBIP_VERSION = 0x0111;

/** Operation codes (tools/usb/usbip/src/usbip_network.h). */
export const OP_REQ_DEVLIST = 0x8005;
export const OP_REP_DEVLIST = 0x0005;
export const OP_REQ_IMPORT = 0x8003;
export const OP_REP_IMPORT = 0x0003;

/** Operation status (usbip_network.h: ST_OK, ST_NA, ST_DEV_BUSY, ST_DEV_ERR, ST_NODEV, ST_ERROR). */
export const ST_OK = 0;
export const ST_NA = 1;
export const ST_DEV_BUSY = 2;
export const ST_DEV_ERR = 3;
export const ST_NODEV = 4;
export const ST_ERROR = 5;

/** URB commands (usbip_common.h: enum usbip_request_type... as #defines USBIP_CMD_SUBMIT...). */
export const USBIP_CMD_SUBMIT = 1;
export const USBIP_CMD_UNLINK = 2;
export const USBIP_RET_SUBMIT = 3;
export const USBIP_RET_UNLINK = 4;

export const USBIP_DIR_OUT = 0;
export const USBIP_DIR_IN = 1;

/** enum usb_device_speed (include/uapi/linux/usb/ch9.h). */
export const enum UsbSpeed {
  Unknown = 0,
  Low = 1,
  Full = 2,
  High = 3,
  Wireless = 4,
  Super = 5,
  SuperPlus = 6,
}

/** URB transfer_flags that matter on the wire (include/linux/usb.h). */
export const URB_SHORT_NOT_OK = 0x0001;
export const URB_ISO_ASAP = 0x0002;
export const URB_ZERO_PACKET = 0x0040;
export const URB_DIR_IN = 0x0200;

/** Negative errno values carried in status fields (Linux numbers, whatever the host OS). */
export const Errno = {
  EPIPE: -32, // endpoint stalled
  ENOENT: -2, // URB killed
  EINVAL: -22,
  ENODEV: -19,
  EOVERFLOW: -75, // babble: more data than the buffer
  ECONNRESET: -104, // URB unlinked (usb_unlink_urb)
  ESHUTDOWN: -108,
  EPROTO: -71,
  EREMOTEIO: -121, // short read with URB_SHORT_NOT_OK
  EXDEV: -18, // iso: partial completion
  ENOSYS: -38, // transfer type not supported by the backend
} as const;

export const OP_COMMON_LEN = 8;
export const BUSID_LEN = 32;
export const PATH_LEN = 256;
/** struct usbip_usb_device: path[256] busid[32] then 6×u32, 3×u16, 6×u8. */
export const DEVICE_RECORD_LEN = 312;
/** struct usbip_usb_interface: class, subclass, protocol, padding. */
export const INTERFACE_RECORD_LEN = 4;
export const URB_HEADER_LEN = 48;
/** struct usbip_iso_packet_descriptor: offset, length, actual_length, status. */
export const ISO_DESC_LEN = 16;
/** As usbip-win2 and the kernel's vhci bound it; the kernel's own urb limit is also 1024 frames. */
export const USBIP_MAX_ISO_PACKETS = 1024;
/** CMD_SUBMIT for a non-isochronous transfer carries 0xffffffff here (usbip_protocol.rst); Linux sends 0. */
export const NUMBER_OF_PACKETS_NON_ISO = 0xffffffff;

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

function readCString(b: Uint8Array, off: number, len: number): string {
  let end = off;
  while (end < off + len && b[end] !== 0) end++;
  return Buffer.from(b.buffer, b.byteOffset + off, end - off).toString('latin1');
}

function writeCString(b: Uint8Array, off: number, len: number, s: string): void {
  b.fill(0, off, off + len);
  const bytes = Buffer.from(s, 'latin1');
  // Always leave a terminating NUL, as the C tools expect (they copy with strncpy and index).
  b.set(bytes.subarray(0, len - 1), off);
}

// ---------------------------------------------------------------------------------------------
// Operation phase

export interface OpCommonRepr {
  version: number;
  code: number;
  status: number;
}

export function parseOpCommon(b: Uint8Array): OpCommonRepr {
  const v = dv(b);
  return { version: v.getUint16(0), code: v.getUint16(2), status: v.getUint32(4) };
}

export function emitOpCommon(r: OpCommonRepr, b: Uint8Array, off = 0): number {
  const v = dv(b);
  v.setUint16(off, r.version);
  v.setUint16(off + 2, r.code);
  v.setUint32(off + 4, r.status);
  return OP_COMMON_LEN;
}

export interface UsbInterfaceRepr {
  bInterfaceClass: number;
  bInterfaceSubClass: number;
  bInterfaceProtocol: number;
}

/** struct usbip_usb_device (usbip_common.h in tools/usb/usbip/libsrc). */
export interface UsbDeviceRecordRepr {
  path: string;
  busid: string;
  busnum: number;
  devnum: number;
  speed: number;
  idVendor: number;
  idProduct: number;
  bcdDevice: number;
  bDeviceClass: number;
  bDeviceSubClass: number;
  bDeviceProtocol: number;
  bConfigurationValue: number;
  bNumConfigurations: number;
  bNumInterfaces: number;
}

export function parseDeviceRecord(b: Uint8Array, off = 0): UsbDeviceRecordRepr {
  const v = dv(b);
  const o = off + PATH_LEN + BUSID_LEN; // 288
  return {
    path: readCString(b, off, PATH_LEN),
    busid: readCString(b, off + PATH_LEN, BUSID_LEN),
    busnum: v.getUint32(o),
    devnum: v.getUint32(o + 4),
    speed: v.getUint32(o + 8),
    idVendor: v.getUint16(o + 12),
    idProduct: v.getUint16(o + 14),
    bcdDevice: v.getUint16(o + 16),
    bDeviceClass: b[o + 18]!,
    bDeviceSubClass: b[o + 19]!,
    bDeviceProtocol: b[o + 20]!,
    bConfigurationValue: b[o + 21]!,
    bNumConfigurations: b[o + 22]!,
    bNumInterfaces: b[o + 23]!,
  };
}

export function emitDeviceRecord(r: UsbDeviceRecordRepr, b: Uint8Array, off = 0): number {
  const v = dv(b);
  writeCString(b, off, PATH_LEN, r.path);
  writeCString(b, off + PATH_LEN, BUSID_LEN, r.busid);
  const o = off + PATH_LEN + BUSID_LEN;
  v.setUint32(o, r.busnum);
  v.setUint32(o + 4, r.devnum);
  v.setUint32(o + 8, r.speed);
  v.setUint16(o + 12, r.idVendor);
  v.setUint16(o + 14, r.idProduct);
  v.setUint16(o + 16, r.bcdDevice);
  b[o + 18] = r.bDeviceClass;
  b[o + 19] = r.bDeviceSubClass;
  b[o + 20] = r.bDeviceProtocol;
  b[o + 21] = r.bConfigurationValue;
  b[o + 22] = r.bNumConfigurations;
  b[o + 23] = r.bNumInterfaces;
  return DEVICE_RECORD_LEN;
}

export interface DevlistEntry {
  device: UsbDeviceRecordRepr;
  interfaces: UsbInterfaceRepr[];
}

/** OP_REP_DEVLIST: common header, u32 ndev, then per device the record and its interfaces. */
export function emitRepDevlist(entries: DevlistEntry[]): Uint8Array {
  let len = OP_COMMON_LEN + 4;
  for (const e of entries) len += DEVICE_RECORD_LEN + INTERFACE_RECORD_LEN * e.interfaces.length;
  const b = new Uint8Array(len);
  emitOpCommon({ version: USBIP_VERSION, code: OP_REP_DEVLIST, status: ST_OK }, b);
  dv(b).setUint32(OP_COMMON_LEN, entries.length);
  let off = OP_COMMON_LEN + 4;
  for (const e of entries) {
    off += emitDeviceRecord(e.device, b, off);
    for (const i of e.interfaces) {
      b[off] = i.bInterfaceClass;
      b[off + 1] = i.bInterfaceSubClass;
      b[off + 2] = i.bInterfaceProtocol;
      b[off + 3] = 0;
      off += INTERFACE_RECORD_LEN;
    }
  }
  return b;
}

/** Parse an OP_REP_DEVLIST body (after the common header); null if truncated. */
export function parseRepDevlistBody(b: Uint8Array): DevlistEntry[] | null {
  if (b.length < 4) return null;
  const n = dv(b).getUint32(0);
  const out: DevlistEntry[] = [];
  let off = 4;
  for (let i = 0; i < n; i++) {
    if (off + DEVICE_RECORD_LEN > b.length) return null;
    const device = parseDeviceRecord(b, off);
    off += DEVICE_RECORD_LEN;
    const interfaces: UsbInterfaceRepr[] = [];
    for (let j = 0; j < device.bNumInterfaces; j++) {
      if (off + INTERFACE_RECORD_LEN > b.length) return null;
      interfaces.push({ bInterfaceClass: b[off]!, bInterfaceSubClass: b[off + 1]!, bInterfaceProtocol: b[off + 2]! });
      off += INTERFACE_RECORD_LEN;
    }
    out.push({ device, interfaces });
  }
  return out;
}

/** OP_REQ_IMPORT: common header then busid[32]. */
export function emitReqImport(busid: string): Uint8Array {
  const b = new Uint8Array(OP_COMMON_LEN + BUSID_LEN);
  emitOpCommon({ version: USBIP_VERSION, code: OP_REQ_IMPORT, status: 0 }, b);
  writeCString(b, OP_COMMON_LEN, BUSID_LEN, busid);
  return b;
}

export function parseBusid(b: Uint8Array, off = 0): string {
  return readCString(b, off, BUSID_LEN);
}

/** OP_REP_IMPORT: common header; the device record only when status is ST_OK (no interfaces). */
export function emitRepImport(status: number, device?: UsbDeviceRecordRepr): Uint8Array {
  const ok = status === ST_OK && device !== undefined;
  const b = new Uint8Array(OP_COMMON_LEN + (ok ? DEVICE_RECORD_LEN : 0));
  emitOpCommon({ version: USBIP_VERSION, code: OP_REP_IMPORT, status: ok ? ST_OK : status || ST_ERROR }, b);
  if (ok) emitDeviceRecord(device, b, OP_COMMON_LEN);
  return b;
}

export function emitReqDevlist(): Uint8Array {
  const b = new Uint8Array(OP_COMMON_LEN);
  emitOpCommon({ version: USBIP_VERSION, code: OP_REQ_DEVLIST, status: 0 }, b);
  return b;
}

// ---------------------------------------------------------------------------------------------
// URB phase: struct usbip_header (drivers/usb/usbip/usbip_common.h)

/**
 * Zero-copy view over a 48-byte URB header. Offsets:
 *  0 command, 4 seqnum, 8 devid, 12 direction, 16 ep          (usbip_header_basic)
 *  CMD_SUBMIT: 20 transfer_flags, 24 transfer_buffer_length, 28 start_frame,
 *              32 number_of_packets, 36 interval, 40 setup[8]
 *  RET_SUBMIT: 20 status, 24 actual_length, 28 start_frame, 32 number_of_packets, 36 error_count
 *  CMD_UNLINK: 20 seqnum (of the URB to unlink), 24..47 padding
 *  RET_UNLINK: 20 status, 24..47 padding
 */
export class UrbHeader {
  private readonly v: DataView;
  constructor(readonly buf: Uint8Array) {
    this.v = dv(buf);
  }

  /** Checked constructor: null unless at least 48 bytes. */
  static check(buf: Uint8Array): UrbHeader | null {
    return buf.length >= URB_HEADER_LEN ? new UrbHeader(buf.subarray(0, URB_HEADER_LEN)) : null;
  }

  get command(): number { return this.v.getUint32(0); }
  get seqnum(): number { return this.v.getUint32(4); }
  get devid(): number { return this.v.getUint32(8); }
  get direction(): number { return this.v.getUint32(12); }
  get ep(): number { return this.v.getUint32(16); }
  // CMD_SUBMIT
  get transferFlags(): number { return this.v.getUint32(20); }
  get transferBufferLength(): number { return this.v.getUint32(24); }
  get startFrame(): number { return this.v.getInt32(28); }
  get numberOfPackets(): number { return this.v.getUint32(32); }
  get interval(): number { return this.v.getInt32(36); }
  get setup(): Uint8Array { return this.buf.subarray(40, 48); }
  // RET_SUBMIT / RET_UNLINK
  get status(): number { return this.v.getInt32(20); }
  get actualLength(): number { return this.v.getUint32(24); }
  get errorCount(): number { return this.v.getInt32(36); }
  // CMD_UNLINK
  get unlinkSeqnum(): number { return this.v.getUint32(20); }
}

export interface IsoPacketDescriptor {
  offset: number;
  length: number;
  actualLength: number;
  status: number;
}

export function parseIsoDescriptors(b: Uint8Array, n: number): IsoPacketDescriptor[] {
  const v = dv(b);
  const out: IsoPacketDescriptor[] = [];
  for (let i = 0; i < n; i++) {
    const o = i * ISO_DESC_LEN;
    out.push({ offset: v.getUint32(o), length: v.getUint32(o + 4), actualLength: v.getUint32(o + 8), status: v.getInt32(o + 12) });
  }
  return out;
}

export function emitIsoDescriptors(d: readonly IsoPacketDescriptor[], b: Uint8Array, off: number): number {
  const v = dv(b);
  for (let i = 0; i < d.length; i++) {
    const o = off + i * ISO_DESC_LEN;
    v.setUint32(o, d[i]!.offset);
    v.setUint32(o + 4, d[i]!.length);
    v.setUint32(o + 8, d[i]!.actualLength);
    v.setInt32(o + 12, d[i]!.status);
  }
  return d.length * ISO_DESC_LEN;
}

export interface CmdSubmitRepr {
  seqnum: number;
  devid: number;
  direction: number;
  ep: number;
  transferFlags: number;
  transferBufferLength: number;
  startFrame: number;
  /** As on the wire: 0 or 0xffffffff for non-isochronous transfers. */
  numberOfPackets: number;
  interval: number;
  setup: Uint8Array;
}

export function parseCmdSubmit(h: UrbHeader): CmdSubmitRepr {
  return {
    seqnum: h.seqnum,
    devid: h.devid,
    direction: h.direction,
    ep: h.ep,
    transferFlags: h.transferFlags,
    transferBufferLength: h.transferBufferLength,
    startFrame: h.startFrame,
    numberOfPackets: h.numberOfPackets,
    interval: h.interval,
    setup: h.setup,
  };
}

function emitBasic(b: Uint8Array, command: number, seqnum: number, devid: number, direction: number, ep: number): DataView {
  const v = dv(b);
  v.setUint32(0, command);
  v.setUint32(4, seqnum);
  v.setUint32(8, devid);
  v.setUint32(12, direction);
  v.setUint32(16, ep);
  return v;
}

/** Emit a CMD_SUBMIT header (48 bytes) into `b` (client side; used by tests and the guest agent). */
export function emitCmdSubmit(r: CmdSubmitRepr, b: Uint8Array): number {
  const v = emitBasic(b, USBIP_CMD_SUBMIT, r.seqnum, r.devid, r.direction, r.ep);
  v.setUint32(20, r.transferFlags);
  v.setUint32(24, r.transferBufferLength);
  v.setInt32(28, r.startFrame);
  v.setUint32(32, r.numberOfPackets);
  v.setInt32(36, r.interval);
  b.set(r.setup.subarray(0, 8), 40);
  return URB_HEADER_LEN;
}

export interface RetSubmitRepr {
  seqnum: number;
  status: number;
  actualLength: number;
  startFrame: number;
  numberOfPackets: number;
  errorCount: number;
}

/**
 * Emit a RET_SUBMIT header. As the kernel's stub (stub_tx.c setup_base_pdu), devid, direction
 * and ep are zero in replies: the client matches replies by seqnum alone.
 */
export function emitRetSubmit(r: RetSubmitRepr, b: Uint8Array): number {
  const v = emitBasic(b, USBIP_RET_SUBMIT, r.seqnum, 0, 0, 0);
  v.setInt32(20, r.status);
  v.setUint32(24, r.actualLength);
  v.setInt32(28, r.startFrame);
  v.setUint32(32, r.numberOfPackets);
  v.setInt32(36, r.errorCount);
  b.fill(0, 40, 48);
  return URB_HEADER_LEN;
}

export function emitCmdUnlink(seqnum: number, devid: number, unlinkSeqnum: number, b: Uint8Array): number {
  const v = emitBasic(b, USBIP_CMD_UNLINK, seqnum, devid, 0, 0);
  v.setUint32(20, unlinkSeqnum);
  b.fill(0, 24, 48);
  return URB_HEADER_LEN;
}

export function emitRetUnlink(seqnum: number, status: number, b: Uint8Array): number {
  const v = emitBasic(b, USBIP_RET_UNLINK, seqnum, 0, 0, 0);
  v.setInt32(20, status);
  b.fill(0, 24, 48);
  return URB_HEADER_LEN;
}

/** True when number_of_packets means "not isochronous" (0, or the protocol's 0xffffffff). */
export function isNonIsoCount(n: number): boolean {
  return n === 0 || n === NUMBER_OF_PACKETS_NON_ISO;
}
