/**
 * A virtual USB mass-storage device: Bulk-Only Transport (USB Mass Storage Class Bulk-Only
 * Transport 1.0, "BOT") over a SCSI disk (scsi.ts). High speed, bulk max packet 512.
 *
 * BOT in one paragraph: the host writes a 31-byte CBW on bulk OUT, data moves in the
 * direction the CBW says, and the device answers a 13-byte CSW on bulk IN echoing the tag, with
 * the residue (expected − processed) and a status (0 passed, 1 failed → REQUEST SENSE, 2 phase
 * error → reset recovery). Where host and device disagree about the data phase (§6.7 "the
 * thirteen cases") the device STALLs the data endpoint; the host clears the halt and reads the
 * CSW. An invalid CBW stalls both endpoints until Reset Recovery (§6.6.1): a Bulk-Only Mass
 * Storage Reset class request, then CLEAR_FEATURE(ENDPOINT_HALT) on both.
 *
 * URBs for bulk IN that arrive before the device has anything to send wait (a real device
 * NAKs); they are answered in order once the state machine has data or a CSW.
 */
import { Errno, UsbSpeed } from '../protocol.js';
import type { Urb, UrbResult, UsbDescriptors, UsbDevice } from '../device.js';
import { BLOCK_SIZE, MAX_TRANSFER_BYTES, ScsiDisk, type BlockBackend } from './scsi.js';

export const CBW_LEN = 31;
export const CSW_LEN = 13;
export const CBW_SIGNATURE = 0x43425355; // "USBC" little-endian
export const CSW_SIGNATURE = 0x53425355; // "USBS"
export const CSW_PASSED = 0;
export const CSW_FAILED = 1;
export const CSW_PHASE_ERROR = 2;

export const EP_IN = 0x81;
export const EP_OUT = 0x02;
const MAX_PACKET = 512;

const BOT_RESET = 0xff;
const GET_MAX_LUN = 0xfe;

export interface StorageOptions {
  busid: string;
  busnum: number;
  devnum: number;
  idVendor?: number;
  idProduct?: number;
  serial?: string;
  product?: string;
}

/** Build the descriptors of a high-speed BOT/SCSI device (interface class 08/06/50). */
export function storageDescriptors(o: { idVendor: number; idProduct: number; product: string; serial: string }): UsbDescriptors {
  const device = Uint8Array.of(
    18, 1, 0x00, 0x02, // bLength, DEVICE, bcdUSB 2.00
    0, 0, 0, 64, // class at interface level, bMaxPacketSize0 64
    o.idVendor & 0xff, o.idVendor >> 8, o.idProduct & 0xff, o.idProduct >> 8,
    0x00, 0x01, // bcdDevice 1.00
    1, 2, 3, // iManufacturer, iProduct, iSerialNumber (BOT §4.1.1 requires a serial)
    1, // bNumConfigurations
  );
  const config = Uint8Array.of(
    9, 2, 32, 0, 1, 1, 0, 0x80, 50, // wTotalLength 32, 1 interface, value 1, bus-powered, 100 mA
    9, 4, 0, 0, 2, 0x08, 0x06, 0x50, 0, // interface 0: mass storage, SCSI transparent, bulk-only
    7, 5, EP_IN, 2, MAX_PACKET & 0xff, MAX_PACKET >> 8, 0, // bulk IN 0x81, 512
    7, 5, EP_OUT, 2, MAX_PACKET & 0xff, MAX_PACKET >> 8, 0, // bulk OUT 0x02, 512
  );
  return { device, configurations: [config], strings: new Map([[1, 'tender'], [2, o.product], [3, o.serial]]) };
}

type Phase =
  | { kind: 'cbw' }
  | { kind: 'in'; tag: number; data: Uint8Array; off: number; hostLen: number; status: number }
  | { kind: 'out'; tag: number; cdb: Uint8Array; hostLen: number; devLen: number; buf: Uint8Array; received: number }
  | { kind: 'busy' } // a command is executing
  | { kind: 'csw'; csw: Uint8Array };

interface InWaiter {
  urb: Urb;
  resolve: (r: UrbResult) => void;
  signal: AbortSignal;
  onAbort: () => void;
}

export function parseCbw(b: Uint8Array): { tag: number; length: number; dirIn: boolean; lun: number; cdb: Uint8Array } | null {
  // §6.2.1 "valid CBW": received right after a CSW/reset, exactly 31 bytes, right signature.
  if (b.length !== CBW_LEN) return null;
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (v.getUint32(0, true) !== CBW_SIGNATURE) return null;
  const cbLen = b[14]! & 0x1f;
  // §6.2.2 "meaningful CBW": reserved bits zero, LUN supported, 1..16 command bytes.
  if (cbLen < 1 || cbLen > 16 || (b[12]! & 0x7f) !== 0 || (b[13]! & 0x0f) !== 0) return null;
  return { tag: v.getUint32(4, true), length: v.getUint32(8, true), dirIn: (b[12]! & 0x80) !== 0, lun: b[13]! & 0x0f, cdb: b.slice(15, 15 + cbLen) };
}

export function emitCsw(tag: number, residue: number, status: number): Uint8Array {
  const b = new Uint8Array(CSW_LEN);
  const v = new DataView(b.buffer);
  v.setUint32(0, CSW_SIGNATURE, true);
  v.setUint32(4, tag, true);
  v.setUint32(8, residue >>> 0, true);
  b[12] = status;
  return b;
}

export class StorageDevice implements UsbDevice {
  readonly busid: string;
  readonly busnum: number;
  readonly devnum: number;
  readonly speed = UsbSpeed.High;
  readonly path: string;
  readonly descriptors: UsbDescriptors;
  readonly scsi: ScsiDisk;
  private phase: Phase = { kind: 'cbw' };
  private readonly halted = new Set<number>();
  /** Set by an invalid CBW: halts stick until a Bulk-Only Mass Storage Reset (§6.6.1). */
  private needsReset = false;
  private waiters: InWaiter[] = [];
  private outChain: Promise<unknown> = Promise.resolve();

  constructor(
    readonly backend: BlockBackend,
    o: StorageOptions,
  ) {
    this.busid = o.busid;
    this.busnum = o.busnum;
    this.devnum = o.devnum;
    this.path = `/sys/devices/virtual/tender/usb${o.busnum}/${o.busid}`;
    const serial = o.serial ?? `TENDER${String(o.devnum).padStart(6, '0')}`;
    const product = o.product ?? 'tender virtual disk';
    // Default ids: the Linux file-backed storage gadget (g_mass_storage), which hosts drive
    // with their generic class drivers and no quirks.
    this.descriptors = storageDescriptors({ idVendor: o.idVendor ?? 0x0525, idProduct: o.idProduct ?? 0xa4a5, product, serial });
    this.scsi = new ScsiDisk(backend, { vendor: 'tender', product: 'virtual disk', revision: '0001', serial });
  }

  setConfiguration(): void {}
  setInterface(): void {}

  clearHalt(endpoint: number): void {
    if (this.needsReset && (endpoint === EP_IN || endpoint === EP_OUT)) return;
    this.halted.delete(endpoint);
    this.serveIn();
  }

  isHalted(endpoint: number): boolean {
    return this.halted.has(endpoint);
  }

  attached(): void {
    this.reset();
    this.halted.clear();
  }

  detached(): void {
    this.reset();
    this.halted.clear();
    for (const w of this.waiters.splice(0)) {
      w.signal.removeEventListener('abort', w.onAbort);
      w.resolve({ status: Errno.ESHUTDOWN });
    }
  }

  private reset(): void {
    this.phase = { kind: 'cbw' };
    this.needsReset = false;
  }

  submit(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    if (urb.type === 'control') return Promise.resolve(this.classRequest(urb));
    if (urb.endpoint === EP_IN) {
      return new Promise((resolve) => {
        const w: InWaiter = {
          urb,
          resolve,
          signal,
          onAbort: () => {
            const i = this.waiters.indexOf(w);
            if (i >= 0) this.waiters.splice(i, 1);
            resolve({ status: Errno.ECONNRESET });
          },
        };
        signal.addEventListener('abort', w.onAbort, { once: true });
        this.waiters.push(w);
        this.serveIn();
      });
    }
    if (urb.endpoint === EP_OUT) {
      const p = this.outChain.then(() => (signal.aborted ? { status: Errno.ECONNRESET } : this.handleOut(urb)));
      this.outChain = p.catch(() => undefined);
      return p;
    }
    return Promise.resolve({ status: Errno.EPIPE });
  }

  private classRequest(urb: Urb): UrbResult {
    const s = urb.setup!;
    const type = s[0]!;
    const req = s[1]!;
    const wLength = s[6]! | (s[7]! << 8);
    if (type === 0x21 && req === BOT_RESET && wLength === 0) {
      // §3.1: ready for the next CBW; halts and toggles are left to the host's CLEAR_FEATUREs.
      this.reset();
      return { status: 0, actualLength: 0 };
    }
    if (type === 0xa1 && req === GET_MAX_LUN && wLength >= 1) return { status: 0, data: Uint8Array.of(0) };
    return { status: Errno.EPIPE, data: new Uint8Array(0) };
  }

  private stall(ep: number): void {
    this.halted.add(ep);
  }

  private async handleOut(urb: Urb): Promise<UrbResult> {
    if (this.halted.has(EP_OUT)) return { status: Errno.EPIPE, actualLength: 0 };
    const ph = this.phase;
    if (ph.kind === 'out') {
      const n = Math.min(urb.data.length, ph.hostLen - ph.received);
      const keep = Math.max(0, Math.min(n, ph.devLen - ph.received));
      if (keep > 0) ph.buf.set(urb.data.subarray(0, keep), ph.received);
      ph.received += n;
      if (ph.received >= ph.hostLen) await this.finishOut(ph);
      return { status: 0, actualLength: n };
    }
    if (ph.kind !== 'cbw') {
      // Host sent OUT data where the device expected none (it is sending data/CSW): stall.
      this.stall(EP_OUT);
      return { status: Errno.EPIPE, actualLength: 0 };
    }
    const cbw = parseCbw(urb.data);
    if (!cbw) {
      this.needsReset = true;
      this.stall(EP_IN);
      this.stall(EP_OUT);
      this.serveIn();
      return { status: Errno.EPIPE, actualLength: 0 };
    }
    await this.command(cbw);
    return { status: 0, actualLength: urb.data.length };
  }

  private async command(cbw: NonNullable<ReturnType<typeof parseCbw>>): Promise<void> {
    const { tag, length: hostLen, dirIn, cdb } = cbw;
    const outLen = this.scsi.dataOutLength(cdb);
    if (outLen !== undefined) {
      if (hostLen === 0) {
        // Case 3 (Hn < Do): no data phase, phase error... unless the write moves no blocks.
        const r = outLen === 0 ? await this.scsi.execute(cdb, new Uint8Array(0)) : undefined;
        this.toCsw(tag, 0, r ? (r.good ? CSW_PASSED : CSW_FAILED) : CSW_PHASE_ERROR);
        return;
      }
      if (dirIn) {
        // Case 8 (Hi <> Do): stall bulk IN, phase error.
        this.stall(EP_IN);
        this.toCsw(tag, hostLen, CSW_PHASE_ERROR);
        return;
      }
      // Cases 11-13: take the host's data (keep at most what the command uses; bounded).
      const devLen = Math.min(outLen, MAX_TRANSFER_BYTES);
      this.phase = { kind: 'out', tag, cdb, hostLen, devLen, buf: new Uint8Array(Math.min(devLen, hostLen)), received: 0 };
      return;
    }
    this.phase = { kind: 'busy' };
    const r = await this.scsi.execute(cdb);
    const status = r.good ? CSW_PASSED : CSW_FAILED;
    const data = r.dataIn ?? new Uint8Array(0);
    if (hostLen === 0) {
      // Case 1 (Hn = Dn) or case 2 (Hn < Di): the latter is a phase error.
      this.toCsw(tag, 0, data.length ? CSW_PHASE_ERROR : status);
      return;
    }
    if (!dirIn) {
      // Case 9 (Ho > Dn) or 10 (Ho <> Di): stall bulk OUT.
      this.stall(EP_OUT);
      this.toCsw(tag, hostLen, data.length ? CSW_PHASE_ERROR : status);
      return;
    }
    if (data.length === 0) {
      // Case 4 (Hi > Dn): stall bulk IN, residue = Hi.
      this.stall(EP_IN);
      this.toCsw(tag, hostLen, status);
      return;
    }
    // Cases 5-7: send min(Di, Hi); Di > Hi is a phase error.
    const send = data.length > hostLen ? data.subarray(0, hostLen) : data;
    this.phase = { kind: 'in', tag, data: send, off: 0, hostLen, status: data.length > hostLen ? CSW_PHASE_ERROR : status };
    this.serveIn();
  }

  private async finishOut(ph: Extract<Phase, { kind: 'out' }>): Promise<void> {
    this.phase = { kind: 'busy' };
    if (ph.received < ph.devLen) {
      // Case 13 (Ho < Do): phase error, nothing written.
      this.toCsw(ph.tag, 0, CSW_PHASE_ERROR);
      return;
    }
    const r = await this.scsi.execute(ph.cdb, ph.buf);
    const residue = r.good ? ph.hostLen - ph.devLen : ph.hostLen;
    this.toCsw(ph.tag, residue, r.good ? CSW_PASSED : CSW_FAILED);
  }

  private toCsw(tag: number, residue: number, status: number): void {
    this.phase = { kind: 'csw', csw: emitCsw(tag, residue, status) };
    this.serveIn();
  }

  /** Answer waiting bulk-IN URBs from the current phase, in order. */
  private serveIn(): void {
    while (this.waiters.length) {
      const w = this.waiters[0]!;
      let r: UrbResult | undefined;
      const ph = this.phase;
      if (this.halted.has(EP_IN)) r = { status: Errno.EPIPE, data: new Uint8Array(0) };
      else if (ph.kind === 'in') {
        const n = Math.min(w.urb.length, ph.data.length - ph.off);
        r = { status: 0, data: ph.data.subarray(ph.off, ph.off + n) };
        ph.off += n;
        if (ph.off >= ph.data.length) {
          const sent = ph.data.length;
          // Hi > Di ends with a short packet; when Di is a multiple of the packet size there is
          // no short packet to end on, so stall (case 5, §6.7.2).
          if (sent < ph.hostLen && sent % MAX_PACKET === 0) this.halted.add(EP_IN);
          this.phase = { kind: 'csw', csw: emitCsw(ph.tag, ph.hostLen - sent, ph.status) };
        }
      } else if (ph.kind === 'csw') {
        if (w.urb.length < CSW_LEN) r = { status: Errno.EOVERFLOW, data: new Uint8Array(0) };
        else {
          r = { status: 0, data: ph.csw };
          this.phase = { kind: 'cbw' };
        }
      }
      if (!r) return; // nothing to send yet: the URB waits (NAK)
      this.waiters.shift();
      w.signal.removeEventListener('abort', w.onAbort);
      w.resolve(r);
    }
  }
}

export { BLOCK_SIZE };
