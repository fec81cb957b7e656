/**
 * A virtual USB serial port: a high-speed CDC ACM function (USB CDC 1.2 and its PSTN
 * subclass 1.2, "Abstract Control Model") whose byte stream is bridged to a host stream
 * (a unix socket client, see listenSerialSocket). Every USB host drives it with its generic
 * driver: Linux cdc_acm (/dev/ttyACM0), macOS AppleUSBCDCACM, Windows usbser.sys.
 *
 * Two interfaces, tied by a union functional descriptor (CDC §5.2.3.8):
 *  - interface 0, communication class (02/02/01: ACM, AT commands V.250 — what Linux matches
 *    on): header, call-management, ACM and union functional descriptors, and an interrupt IN
 *    endpoint for SERIAL_STATE notifications (PSTN §6.5.4);
 *  - interface 1, data class (0a/00/00): bulk IN (device → guest) and bulk OUT (guest → device).
 *
 * Class requests (PSTN §6.3): SET_LINE_CODING / GET_LINE_CODING keep the 7-byte line coding
 * (nothing to apply on a virtual wire, but it reads back what was set); SET_CONTROL_LINE_STATE
 * records DTR/RTS; SEND_BREAK is accepted. Anything else stalls.
 *
 * Flow, both ways bounded:
 *  - guest → host: a bulk OUT URB completes once its bytes are handed to the host stream. When
 *    the stream's buffer is full (writableNeedDrain) the next URB waits for 'drain', so the
 *    guest's tty is paced by the host reader (a real device NAKs). With no host client, up to
 *    `outBufferBytes` are kept for the next client, the rest dropped and counted (a UART with
 *    nothing on the line loses bytes too; blocking would hang the guest's close() for 30 s of
 *    closing_wait).
 *  - host → guest: bytes wait in a small buffer until a bulk IN URB takes them (an IN URB with
 *    nothing to send waits, like a NAKing device, and is cancelled by UNLINK through its
 *    AbortSignal). The stream is paused while `inBufferBytes` or more are buffered, so a fast
 *    host writer is held back by TCP-like backpressure on its socket.
 *  - SERIAL_STATE: DCD and DSR are raised while a host client is connected and dropped when it
 *    goes (a modem's carrier); Linux's default ACM termios has CLOCAL, so the drop does not
 *    hang up the guest's tty.
 */
import { existsSync, lstatSync, unlinkSync } from 'node:fs';
import * as net from 'node:net';
import type { Duplex } from 'node:stream';
import { Errno, UsbSpeed } from '../protocol.js';
import type { Urb, UrbResult, UsbDescriptors, UsbDevice } from '../device.js';

export const EP_NOTIFY = 0x83;
export const EP_IN = 0x81;
export const EP_OUT = 0x02;
const BULK_MAX_PACKET = 512;
const NOTIFY_MAX_PACKET = 16;

// PSTN 1.2 §6.3 table 13: class-specific request codes.
export const SET_LINE_CODING = 0x20;
export const GET_LINE_CODING = 0x21;
export const SET_CONTROL_LINE_STATE = 0x22;
export const SEND_BREAK = 0x23;
// PSTN §6.5.4: the notification carrying the UART state bitmap.
export const SERIAL_STATE = 0x20;
const STATE_DCD = 0x01; // bRxCarrier
const STATE_DSR = 0x02; // bTxCarrier

export const LINE_CODING_LEN = 7;

/** PSTN §6.3.11 table 17. */
export interface LineCoding {
  /** dwDTERate, bits per second. */
  rate: number;
  /** bCharFormat: 0 one stop bit, 1 one and a half, 2 two. */
  stopBits: number;
  /** bParityType: 0 none, 1 odd, 2 even, 3 mark, 4 space. */
  parity: number;
  /** bDataBits: 5, 6, 7, 8 or 16. */
  dataBits: number;
}

export function parseLineCoding(b: Uint8Array): LineCoding | null {
  if (b.length < LINE_CODING_LEN) return null;
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return { rate: v.getUint32(0, true), stopBits: b[4]!, parity: b[5]!, dataBits: b[6]! };
}

export function emitLineCoding(c: LineCoding): Uint8Array {
  const b = new Uint8Array(LINE_CODING_LEN);
  new DataView(b.buffer).setUint32(0, c.rate >>> 0, true);
  b[4] = c.stopBits;
  b[5] = c.parity;
  b[6] = c.dataBits;
  return b;
}

/** Descriptors of the CDC ACM function described at the top of this file. */
export function serialDescriptors(o: { idVendor: number; idProduct: number; product: string; serial: string }): UsbDescriptors {
  const device = Uint8Array.of(
    18, 1, 0x00, 0x02, // bLength, DEVICE, bcdUSB 2.00
    0x02, 0, 0, 64, // bDeviceClass CDC (CDC §5.1.1), bMaxPacketSize0 64
    o.idVendor & 0xff, o.idVendor >> 8, o.idProduct & 0xff, o.idProduct >> 8,
    0x00, 0x01, // bcdDevice 1.00
    1, 2, 3, // iManufacturer, iProduct, iSerialNumber
    1, // bNumConfigurations
  );
  const body = [
    9, 4, 0, 0, 1, 0x02, 0x02, 0x01, 0, // interface 0: CDC communication, ACM, AT commands
    5, 0x24, 0x00, 0x20, 0x01, // header functional descriptor, bcdCDC 1.20
    5, 0x24, 0x01, 0x00, 1, // call management: no call management, data interface 1
    4, 0x24, 0x02, 0x02, // ACM: line coding + control line state + SERIAL_STATE (bit 1)
    5, 0x24, 0x06, 0, 1, // union: control interface 0, subordinate interface 1
    7, 5, EP_NOTIFY, 3, NOTIFY_MAX_PACKET, 0, 9, // interrupt IN, 16 bytes, 2^(9-1) µframes = 32 ms
    9, 4, 1, 0, 2, 0x0a, 0x00, 0x00, 0, // interface 1: CDC data
    7, 5, EP_IN, 2, BULK_MAX_PACKET & 0xff, BULK_MAX_PACKET >> 8, 0, // bulk IN 512
    7, 5, EP_OUT, 2, BULK_MAX_PACKET & 0xff, BULK_MAX_PACKET >> 8, 0, // bulk OUT 512
  ];
  const total = 9 + body.length;
  const config = Uint8Array.of(9, 2, total & 0xff, total >> 8, 2, 1, 0, 0x80, 50, ...body);
  return { device, configurations: [config], strings: new Map([[1, 'tender'], [2, o.product], [3, o.serial]]) };
}

export interface SerialOptions {
  busid: string;
  busnum: number;
  devnum: number;
  idVendor?: number;
  idProduct?: number;
  product?: string;
  serial?: string;
  /** Host → guest bytes kept while no IN URB takes them; the host stream is paused above this. */
  inBufferBytes?: number;
  /** Guest → host bytes kept while no host client is connected; more are dropped. */
  outBufferBytes?: number;
}

export interface SerialCounters {
  /** Guest → host bytes dropped because no host client was connected and the buffer was full. */
  outDropped: number;
  toHost: number;
  toGuest: number;
}

interface Waiter {
  urb: Urb;
  resolve: (r: UrbResult) => void;
  signal: AbortSignal;
  onAbort: () => void;
}

export class SerialDevice implements UsbDevice {
  readonly busid: string;
  readonly busnum: number;
  readonly devnum: number;
  readonly speed = UsbSpeed.High;
  readonly path: string;
  readonly descriptors: UsbDescriptors;
  readonly counters: SerialCounters = { outDropped: 0, toHost: 0, toGuest: 0 };
  /** What the guest set last (PSTN default 9600 8N1 until then). */
  lineCoding: LineCoding = { rate: 9600, stopBits: 0, parity: 0, dataBits: 8 };
  dtr = false;
  rts = false;

  private readonly inLimit: number;
  private readonly outLimit: number;
  private readonly halted = new Set<number>();
  private stream: Duplex | null = null;
  private detachStream: (() => void) | null = null;
  /** Host → guest bytes not yet taken by an IN URB. */
  private rx: Buffer[] = [];
  private rxBytes = 0;
  private readonly inWaiters: Waiter[] = [];
  /** Guest → host bytes kept while no client is connected. */
  private pendingOut: Buffer[] = [];
  private pendingOutBytes = 0;
  private outChain: Promise<unknown> = Promise.resolve();
  private readonly notifyWaiters: Waiter[] = [];
  /** The UART state bitmap not yet reported (null: nothing new). */
  private notifyPending: number | null = null;

  constructor(o: SerialOptions) {
    this.busid = o.busid;
    this.busnum = o.busnum;
    this.devnum = o.devnum;
    this.path = `/sys/devices/virtual/tender/usb${o.busnum}/${o.busid}`;
    this.inLimit = o.inBufferBytes ?? 16 * 1024;
    this.outLimit = o.outBufferBytes ?? 64 * 1024;
    // Default ids: the Linux serial gadget in CDC ACM mode (g_serial use_acm=1), which hosts
    // bind to their stock ACM driver without quirks.
    this.descriptors = serialDescriptors({
      idVendor: o.idVendor ?? 0x0525,
      idProduct: o.idProduct ?? 0xa4a7,
      product: o.product ?? 'tender virtual serial',
      serial: o.serial ?? `TENDER${String(o.devnum).padStart(6, '0')}`,
    });
  }

  /** Is a host client connected? */
  get connected(): boolean {
    return this.stream !== null;
  }

  /**
   * Bridge to a host stream (one at a time: false if one is connected). Bytes the guest wrote
   * while nobody was connected go out first. The device lets go of the stream when it ends.
   */
  connect(stream: Duplex): boolean {
    if (this.stream) return false;
    this.stream = stream;
    const onData = (chunk: Buffer) => {
      this.rx.push(chunk);
      this.rxBytes += chunk.length;
      this.serveIn();
      if (this.rxBytes >= this.inLimit) stream.pause();
    };
    const onGone = () => this.disconnect(stream);
    stream.on('data', onData);
    stream.on('end', onGone);
    stream.on('close', onGone);
    stream.on('error', onGone);
    this.detachStream = () => {
      stream.off('data', onData);
      stream.off('end', onGone);
      stream.off('close', onGone);
      stream.off('error', onGone);
    };
    for (const b of this.pendingOut) this.writeToHost(b);
    this.pendingOut = [];
    this.pendingOutBytes = 0;
    this.setState(STATE_DCD | STATE_DSR);
    return true;
  }

  /** Let go of the host client (its stream is ended). Bytes it sent and nobody read stay buffered. */
  disconnect(stream: Duplex | null = this.stream): void {
    if (!stream || stream !== this.stream) return;
    this.detachStream?.();
    this.detachStream = null;
    this.stream = null;
    stream.end();
    this.setState(0);
    this.serveIn();
  }

  setConfiguration(): void {}
  setInterface(): void {}

  clearHalt(endpoint: number): void {
    this.halted.delete(endpoint);
  }

  isHalted(endpoint: number): boolean {
    return this.halted.has(endpoint);
  }

  attached(): void {
    this.halted.clear();
    this.dtr = this.rts = false;
    // The new guest learns the carrier state from its first notification URB.
    this.notifyPending = this.stream ? STATE_DCD | STATE_DSR : null;
  }

  detached(): void {
    this.halted.clear();
    this.dtr = this.rts = false;
    for (const w of [...this.inWaiters.splice(0), ...this.notifyWaiters.splice(0)]) {
      w.signal.removeEventListener('abort', w.onAbort);
      w.resolve({ status: Errno.ESHUTDOWN });
    }
    this.resumeIfRoom();
  }

  submit(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    if (urb.type === 'control') return Promise.resolve(this.classRequest(urb));
    if (urb.endpoint === EP_IN) return this.wait(this.inWaiters, urb, signal, () => this.serveIn());
    if (urb.endpoint === EP_NOTIFY) return this.wait(this.notifyWaiters, urb, signal, () => this.serveNotify());
    if (urb.endpoint === EP_OUT) {
      const p = this.outChain.then(() => this.handleOut(urb, signal));
      this.outChain = p.catch(() => undefined);
      return p;
    }
    return Promise.resolve({ status: Errno.EPIPE, actualLength: 0 });
  }

  private wait(list: Waiter[], urb: Urb, signal: AbortSignal, serve: () => void): Promise<UrbResult> {
    if (signal.aborted) return Promise.resolve({ status: Errno.ECONNRESET });
    return new Promise((resolve) => {
      const w: Waiter = {
        urb,
        resolve,
        signal,
        onAbort: () => {
          const i = list.indexOf(w);
          if (i >= 0) list.splice(i, 1);
          resolve({ status: Errno.ECONNRESET });
        },
      };
      signal.addEventListener('abort', w.onAbort, { once: true });
      list.push(w);
      serve();
    });
  }

  private classRequest(urb: Urb): UrbResult {
    const s = urb.setup!;
    const type = s[0]!;
    const req = s[1]!;
    const wValue = s[2]! | (s[3]! << 8);
    const wLength = s[6]! | (s[7]! << 8);
    const stall: UrbResult = { status: Errno.EPIPE, data: new Uint8Array(0), actualLength: 0 };
    // Class requests to the communication interface (recipient interface, wIndex 0).
    if ((s[4]! | (s[5]! << 8)) !== 0) return stall;
    if (type === 0x21 && req === SET_LINE_CODING) {
      const c = parseLineCoding(urb.data);
      if (!c || wLength < LINE_CODING_LEN) return stall;
      this.lineCoding = c;
      return { status: 0, actualLength: urb.data.length };
    }
    if (type === 0xa1 && req === GET_LINE_CODING) {
      return { status: 0, data: emitLineCoding(this.lineCoding).subarray(0, wLength) };
    }
    if (type === 0x21 && req === SET_CONTROL_LINE_STATE) {
      this.dtr = (wValue & 1) !== 0;
      this.rts = (wValue & 2) !== 0;
      return { status: 0, actualLength: 0 };
    }
    if (type === 0x21 && req === SEND_BREAK) return { status: 0, actualLength: 0 };
    return stall;
  }

  private async handleOut(urb: Urb, signal: AbortSignal): Promise<UrbResult> {
    if (signal.aborted) return { status: Errno.ECONNRESET };
    if (this.halted.has(EP_OUT)) return { status: Errno.EPIPE, actualLength: 0 };
    const s = this.stream;
    if (s && s.writableNeedDrain) {
      // The host reader is behind: hold this URB (NAK) until its socket drains, or UNLINK.
      const gone = await new Promise<boolean>((resolve) => {
        const done = (v: boolean) => {
          s.off('drain', onDrain);
          s.off('close', onClose);
          signal.removeEventListener('abort', onAbort);
          resolve(v);
        };
        const onDrain = () => done(false);
        const onClose = () => done(false);
        const onAbort = () => done(true);
        s.on('drain', onDrain);
        s.on('close', onClose);
        signal.addEventListener('abort', onAbort, { once: true });
      });
      if (gone) return { status: Errno.ECONNRESET };
    }
    const bytes = Buffer.from(urb.data.buffer, urb.data.byteOffset, urb.data.byteLength);
    if (this.stream) this.writeToHost(bytes);
    else {
      const keep = Math.max(0, Math.min(bytes.length, this.outLimit - this.pendingOutBytes));
      if (keep > 0) {
        this.pendingOut.push(bytes.subarray(0, keep));
        this.pendingOutBytes += keep;
      }
      this.counters.outDropped += bytes.length - keep;
    }
    return { status: 0, actualLength: urb.data.length };
  }

  private writeToHost(b: Buffer): void {
    this.counters.toHost += b.length;
    this.stream!.write(b);
  }

  /** Hand buffered host bytes to waiting IN URBs, oldest first, each as much as it asks. */
  private serveIn(): void {
    while (this.inWaiters.length && this.rxBytes > 0) {
      const w = this.inWaiters[0]!;
      if (this.halted.has(EP_IN)) return;
      const want = Math.min(w.urb.length, this.rxBytes);
      let out: Uint8Array;
      const first = this.rx[0]!;
      if (first.length >= want) {
        out = first.subarray(0, want);
        if (first.length === want) this.rx.shift();
        else this.rx[0] = first.subarray(want);
      } else {
        const b = Buffer.allocUnsafe(want);
        let off = 0;
        while (off < want) {
          const c = this.rx[0]!;
          const n = Math.min(c.length, want - off);
          b.set(c.subarray(0, n), off);
          off += n;
          if (n === c.length) this.rx.shift();
          else this.rx[0] = c.subarray(n);
        }
        out = b;
      }
      this.rxBytes -= want;
      this.counters.toGuest += want;
      this.inWaiters.shift();
      w.signal.removeEventListener('abort', w.onAbort);
      w.resolve({ status: 0, data: out });
    }
    this.resumeIfRoom();
  }

  private resumeIfRoom(): void {
    if (this.stream && this.rxBytes < this.inLimit && this.stream.isPaused()) this.stream.resume();
  }

  private setState(bits: number): void {
    this.notifyPending = bits;
    this.serveNotify();
  }

  private serveNotify(): void {
    if (this.notifyPending === null || !this.notifyWaiters.length) return;
    const w = this.notifyWaiters.shift()!;
    w.signal.removeEventListener('abort', w.onAbort);
    // PSTN §6.5.4: bmRequestType A1, SERIAL_STATE, wValue 0, wIndex = interface 0, wLength 2.
    const n = Uint8Array.of(0xa1, SERIAL_STATE, 0, 0, 0, 0, 2, 0, this.notifyPending, 0);
    this.notifyPending = null;
    w.resolve({ status: 0, data: n.subarray(0, Math.min(n.length, w.urb.length)) });
  }
}

export interface SerialListener {
  path: string;
  close(): Promise<void>;
}

/**
 * Listen on a unix stream socket at `path` and bridge its client to `dev`, one client at a
 * time (a second one is closed at once): `socat - UNIX-CONNECT:PATH`. A stale socket file left
 * by a previous run (nobody listening) is replaced; any other file there is an error (EEXIST).
 */
export async function listenSerialSocket(dev: SerialDevice, path: string): Promise<SerialListener> {
  if (existsSync(path)) {
    if (!lstatSync(path).isSocket()) throw Object.assign(new Error(`${path} exists and is not a socket`), { code: 'EEXIST' });
    const live = await new Promise<boolean>((resolve) => {
      const c = net.connect(path, () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (live) throw Object.assign(new Error(`${path}: something is listening there`), { code: 'EADDRINUSE' });
    unlinkSync(path);
  }
  const clients = new Set<net.Socket>();
  const server = net.createServer((c) => {
    c.on('error', () => {});
    if (!dev.connect(c)) {
      c.destroy();
      return;
    }
    clients.add(c);
    c.once('close', () => clients.delete(c));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return {
    path,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of clients) {
          dev.disconnect(c);
          c.destroy();
        }
        server.close(() => resolve());
      }),
  };
}
