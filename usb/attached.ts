/**
 * The attached phase: after OP_REP_IMPORT the connection carries URBs until either side closes.
 *
 * ONE WRITER, AND THE COMPLETION/UNLINK RACE
 * ------------------------------------------
 * Several URBs are in flight at once (the kernel's vhci-hcd pipelines them). Each CMD_SUBMIT
 * becomes an entry in `inflight` (by seqnum) and in its endpoint's queue (submission order).
 * Only `flush()` writes replies, and it writes an endpoint's entries strictly in order: a
 * completed URB waits behind earlier ones on the same endpoint, so replies are ordered per
 * endpoint whatever order the backend completes them in.
 *
 * A CMD_UNLINK for seqnum S meets S in one of three states, decided here and only here:
 *  1. S is not in `inflight` (its RET_SUBMIT was already written, or it never existed):
 *     the URB already completed from the client's point of view → RET_UNLINK status 0
 *     (stub_rx.c stub_recv_cmd_unlink does the same when it cannot find the URB).
 *  2. S is pending in the backend: the unlink wins. The entry is removed from `inflight` and
 *     its endpoint queue, its AbortSignal fires, and RET_UNLINK -ECONNRESET is written at once.
 *     Whatever the backend later returns for S is dropped: no RET_SUBMIT for S, ever
 *     (vhci_rx.c treats a RET_SUBMIT for an unknown seqnum as a fatal error).
 *  3. S completed in the backend but its RET_SUBMIT is held behind an earlier URB on the same
 *     endpoint: it has completed, so the client gets RET_SUBMIT first and RET_UNLINK status 0
 *     right after it (vhci_rx.c vhci_recv_ret_unlink then finds the URB already given back).
 * Because JavaScript runs one callback at a time, "completed" and "unlinked" are flags flipped
 * in callbacks and read by flush(); no interleaving exists between the check and the write.
 *
 * Replies the kernel would reject are never built: actual_length is clamped to the request
 * (an overlong backend answer becomes -EOVERFLOW) and a seqnum is written at most once.
 */
import type { Duplex } from 'node:stream';
import { handleStandardRequest, type ControlState } from './control.js';
import { parseConfiguration, type TransferType, type Urb, type UrbResult, type UsbDevice } from './device.js';
import {
  Errno,
  ISO_DESC_LEN,
  URB_HEADER_LEN,
  USBIP_DIR_IN,
  emitIsoDescriptors,
  emitRetSubmit,
  emitRetUnlink,
  isNonIsoCount,
  type CmdSubmitRepr,
  type IsoPacketDescriptor,
} from './protocol.js';
import { ByteQueue, DEFAULT_URB_LIMITS, decodeUrbMessage, type UrbLimits } from './reader.js';

export interface AttachedLog {
  debug(o: object, msg: string): void;
  warn(o: object, msg: string): void;
}

interface Entry {
  seqnum: number;
  epKey: number; // ep | 0x80 for IN
  submit: CmdSubmitRepr;
  abort: AbortController;
  done: boolean;
  result?: UrbResult;
  /** Seqnum of a CMD_UNLINK that arrived after completion (state 3 above). */
  unlinkAfter?: number;
}

export interface AttachedOptions {
  limits?: UrbLimits;
  /** Pause reading while this many URBs are in flight (backpressure, bounded memory). */
  maxInflight?: number;
}

export type CloseReason = { kind: 'hangup' } | { kind: 'truncated' } | { kind: 'protocol'; reason: string; detail: string } | { kind: 'error'; message: string };

export class AttachedClient {
  private readonly inflight = new Map<number, Entry>();
  private readonly queues = new Map<number, Entry[]>();
  private readonly control: ControlState = { configuration: 0 };
  private readonly epTypes = new Map<number, TransferType>();
  private closed = false;
  private paused = false;
  readonly finished: Promise<CloseReason>;
  private finish!: (r: CloseReason) => void;
  private readonly limits: UrbLimits;
  private readonly maxInflight: number;

  constructor(
    private readonly sock: Duplex,
    readonly dev: UsbDevice,
    private readonly q: ByteQueue,
    private readonly log: AttachedLog,
    opts: AttachedOptions = {},
  ) {
    this.limits = opts.limits ?? DEFAULT_URB_LIMITS;
    this.maxInflight = opts.maxInflight ?? 256;
    this.finished = new Promise((r) => (this.finish = r));
    for (const cfg of dev.descriptors.configurations) {
      for (const ep of parseConfiguration(cfg).endpoints) this.epTypes.set(ep.address & 0x8f, ep.type);
    }
    dev.attached?.();
  }

  get devid(): number {
    return ((this.dev.busnum << 16) | this.dev.devnum) >>> 0;
  }

  /** Start consuming: bytes already buffered in `q` first, then the socket. */
  start(): void {
    this.sock.on('data', (c: Buffer) => {
      this.q.push(c);
      this.pump();
    });
    this.sock.on('end', () => this.close(this.q.length === 0 ? { kind: 'hangup' } : { kind: 'truncated' }));
    this.sock.on('close', () => this.close(this.q.length === 0 ? { kind: 'hangup' } : { kind: 'truncated' }));
    this.sock.on('error', (e: Error) => this.close({ kind: 'error', message: e.message }));
    this.sock.on('drain', () => this.maybeResume());
    this.pump();
  }

  private pump(): void {
    while (!this.closed && !this.paused) {
      const m = decodeUrbMessage(this.q, this.limits);
      if (m.kind === 'need') return;
      if (m.kind === 'error') {
        this.close({ kind: 'protocol', reason: m.reason, detail: m.detail });
        return;
      }
      if (m.command === 'unlink') {
        if (m.devid !== this.devid) return this.close({ kind: 'protocol', reason: 'bad_devid', detail: `devid ${m.devid}` });
        this.unlink(m.seqnum, m.unlinkSeqnum);
      } else {
        const s = m.submit;
        // stub_rx.c valid_request: a request for another device closes the connection.
        if (s.devid !== this.devid) return this.close({ kind: 'protocol', reason: 'bad_devid', detail: `devid ${s.devid}` });
        if (this.inflight.has(s.seqnum)) return this.close({ kind: 'protocol', reason: 'duplicate_seqnum', detail: `seqnum ${s.seqnum}` });
        this.submit(s, m.data, m.iso);
      }
      if (this.inflight.size >= this.maxInflight || this.sock.writableNeedDrain) this.pause();
    }
  }

  private pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.sock.pause();
  }

  private maybeResume(): void {
    if (!this.paused || this.closed) return;
    if (this.inflight.size >= this.maxInflight || this.sock.writableNeedDrain) return;
    this.paused = false;
    this.sock.resume();
    this.pump();
  }

  private transferType(ep: number, dirIn: boolean): TransferType | undefined {
    if (ep === 0) return 'control';
    return this.epTypes.get(ep | (dirIn ? 0x80 : 0));
  }

  private submit(s: CmdSubmitRepr, data: Uint8Array, iso: IsoPacketDescriptor[]): void {
    const dirIn = s.direction === USBIP_DIR_IN;
    const epKey = s.ep | (dirIn ? 0x80 : 0);
    const e: Entry = { seqnum: s.seqnum, epKey, submit: s, abort: new AbortController(), done: false };
    this.inflight.set(s.seqnum, e);
    let q = this.queues.get(epKey);
    if (!q) this.queues.set(epKey, (q = []));
    q.push(e);

    const type = this.transferType(s.ep, dirIn);
    // OUT data is a view into the receive stream; copy it since the backend may keep it past
    // the next chunk (the queue's merge buffers are not reused, but the socket's chunks are).
    const urb: Urb = {
      endpoint: epKey,
      type: type ?? 'bulk',
      data: dirIn ? new Uint8Array(0) : data.slice(),
      length: s.transferBufferLength,
      transferFlags: s.transferFlags,
      startFrame: s.startFrame,
      interval: s.interval,
    };
    if (type === 'control') urb.setup = s.setup;
    if (iso.length) urb.iso = iso;

    let p: Promise<UrbResult>;
    if (type === undefined) {
      // No such endpoint in the active configuration: what a real host controller reports.
      p = Promise.resolve({ status: Errno.EPIPE, actualLength: 0 });
    } else if (type === 'control') {
      p = handleStandardRequest(this.dev, s.setup, this.control).then((r) => r ?? this.dev.submit(urb, e.abort.signal));
    } else {
      p = this.dev.submit(urb, e.abort.signal);
    }
    p.then(
      (r) => this.complete(e, r),
      (err: unknown) => {
        this.log.debug({ seqnum: e.seqnum, err: String(err) }, 'urb failed in backend');
        this.complete(e, { status: Errno.EPROTO, actualLength: 0 });
      },
    );
  }

  private complete(e: Entry, r: UrbResult): void {
    if (this.inflight.get(e.seqnum) !== e) return; // unlinked (state 2) or connection closed
    e.done = true;
    e.result = r;
    this.flush();
  }

  private unlink(seqnum: number, target: number): void {
    const e = this.inflight.get(target);
    if (!e) {
      this.writeRetUnlink(seqnum, 0); // state 1
      return;
    }
    if (e.done) {
      e.unlinkAfter = seqnum; // state 3
      return;
    }
    // State 2: the unlink wins.
    this.inflight.delete(target);
    const q = this.queues.get(e.epKey)!;
    q.splice(q.indexOf(e), 1);
    e.abort.abort();
    this.writeRetUnlink(seqnum, Errno.ECONNRESET);
    this.flush(); // the removed entry may have been holding back later completions
  }

  /** The only place RET_SUBMIT is written. */
  private flush(): void {
    if (this.closed) return;
    for (const q of this.queues.values()) {
      while (q.length && q[0]!.done) {
        const e = q.shift()!;
        this.inflight.delete(e.seqnum);
        this.writeRetSubmit(e);
        if (e.unlinkAfter !== undefined) this.writeRetUnlink(e.unlinkAfter, 0);
      }
    }
    this.maybeResume();
  }

  private writeRetSubmit(e: Entry): void {
    const s = e.submit;
    const r = e.result!;
    const dirIn = s.direction === USBIP_DIR_IN;
    let status = r.status | 0;
    let data = dirIn ? (r.data ?? new Uint8Array(0)) : new Uint8Array(0);
    // OUT without a count: a successful transfer moved everything it was given.
    let actual = dirIn ? (r.actualLength ?? data.length) : (r.actualLength ?? (status === 0 ? s.transferBufferLength : 0));
    if (dirIn && actual > data.length) actual = data.length;
    if (actual > s.transferBufferLength) {
      // A backend answering more than asked would make vhci_rx.c drop the connection.
      this.log.warn({ seqnum: s.seqnum, actual, requested: s.transferBufferLength }, 'backend overflowed the URB; reporting -EOVERFLOW');
      actual = s.transferBufferLength;
      if (status === 0) status = Errno.EOVERFLOW;
    }
    if (actual < 0) actual = 0;
    if (dirIn) data = data.subarray(0, actual);
    const isIso = !isNonIsoCount(s.numberOfPackets);
    const iso = isIso ? (r.iso ?? []) : [];
    const hdr = new Uint8Array(URB_HEADER_LEN + iso.length * ISO_DESC_LEN);
    emitRetSubmit(
      {
        seqnum: s.seqnum,
        status,
        actualLength: actual,
        startFrame: r.startFrame ?? 0,
        // Echo the request's value for non-iso (0 from Linux, 0xffffffff per the protocol text),
        // as the kernel stub does; the count of descriptors sent otherwise.
        numberOfPackets: isIso ? iso.length : s.numberOfPackets,
        errorCount: r.errorCount ?? 0,
      },
      hdr,
    );
    if (!dirIn || data.length === 0) {
      if (iso.length) emitIsoDescriptors(iso, hdr, URB_HEADER_LEN);
      this.sock.write(hdr);
      return;
    }
    // Header, the data untouched, then iso descriptors: one cork so they leave as one segment.
    this.sock.cork();
    this.sock.write(hdr.subarray(0, URB_HEADER_LEN));
    this.sock.write(data);
    if (iso.length) {
      const tail = new Uint8Array(iso.length * ISO_DESC_LEN);
      emitIsoDescriptors(iso, tail, 0);
      this.sock.write(tail);
    }
    this.sock.uncork();
  }

  private writeRetUnlink(seqnum: number, status: number): void {
    if (this.closed) return;
    const b = new Uint8Array(URB_HEADER_LEN);
    emitRetUnlink(seqnum, status, b);
    this.sock.write(b);
  }

  /** Close the connection; every in-flight URB is cancelled in the backend. */
  close(reason: CloseReason): void {
    if (this.closed) return;
    this.closed = true;
    for (const e of this.inflight.values()) e.abort.abort();
    this.inflight.clear();
    this.queues.clear();
    if (reason.kind === 'protocol' || reason.kind === 'truncated') {
      this.log.warn({ busid: this.dev.busid, ...reason }, 'closing USB/IP connection');
      this.sock.destroy();
    } else {
      this.log.debug({ busid: this.dev.busid, ...reason }, 'USB/IP connection closed');
      this.sock.end();
      this.sock.destroy();
    }
    this.dev.detached?.();
    this.finish(reason);
  }
}
