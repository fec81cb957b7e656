/**
 * Incremental decoding of USB/IP messages from a byte stream (TCP, vsock, a unix socket).
 *
 * ByteQueue keeps the chunks as they arrive; `peek(n)` hands out a view into the first chunk
 * when it holds n bytes and copies only when a message straddles chunks (as ws's receiver).
 * The decoders never consume a partial message, so at end of stream "nothing buffered" means a
 * clean hang-up and anything else means a message cut off halfway.
 *
 * Every length comes from the peer and is bounded before anything is allocated or awaited:
 * an absurd transfer_buffer_length or number_of_packets is a protocol error, never a wait for
 * gigabytes.
 */
import {
  ISO_DESC_LEN,
  OP_COMMON_LEN,
  OP_REQ_DEVLIST,
  OP_REQ_IMPORT,
  BUSID_LEN,
  URB_HEADER_LEN,
  USBIP_CMD_SUBMIT,
  USBIP_CMD_UNLINK,
  USBIP_DIR_IN,
  USBIP_DIR_OUT,
  USBIP_MAX_ISO_PACKETS,
  USBIP_VERSION,
  UrbHeader,
  isNonIsoCount,
  parseBusid,
  parseCmdSubmit,
  parseIsoDescriptors,
  parseOpCommon,
  type CmdSubmitRepr,
  type IsoPacketDescriptor,
} from './protocol.js';

export class ByteQueue {
  private chunks: Uint8Array[] = [];
  private head = 0; // offset into chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The first n bytes (n <= length) without consuming them; a view when contiguous. */
  peek(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    // Straddles chunks: merge just enough chunks into one, once, so later peeks are views.
    let need = n;
    let count = 0;
    let size = 0;
    for (let i = 0; need > 0; i++) {
      const avail = this.chunks[i]!.length - (i === 0 ? this.head : 0);
      size += avail;
      need -= avail;
      count++;
    }
    const merged = new Uint8Array(size);
    let off = 0;
    for (let i = 0; i < count; i++) {
      const c = i === 0 ? this.chunks[0]!.subarray(this.head) : this.chunks[i]!;
      merged.set(c, off);
      off += c.length;
    }
    this.chunks.splice(0, count, merged);
    this.head = 0;
    return merged.subarray(0, n);
  }

  /** Consume n bytes (n <= length). */
  skip(n: number): void {
    this.total -= n;
    while (n > 0) {
      const avail = this.chunks[0]!.length - this.head;
      if (avail > n) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Consume and return n bytes (a view when contiguous). */
  take(n: number): Uint8Array {
    const b = this.peek(n);
    this.skip(n);
    return b;
  }
}

/** Why a connection was closed for bad input; logged with the connection. */
export type ProtocolErrorReason =
  | 'bad_version'
  | 'unknown_op'
  | 'unknown_command'
  | 'bad_direction'
  | 'bad_ep'
  | 'buffer_too_large'
  | 'too_many_iso_packets'
  | 'iso_mismatch';

export type Decoded<T> = { kind: 'need' } | { kind: 'error'; reason: ProtocolErrorReason; detail: string } | ({ kind: 'msg' } & T);

const NEED = { kind: 'need' } as const;
const err = (reason: ProtocolErrorReason, detail: string) => ({ kind: 'error', reason, detail }) as const;

export type OpRequest = { op: 'devlist' } | { op: 'import'; busid: string };

/** Decode one operation request (OP_REQ_DEVLIST or OP_REQ_IMPORT). */
export function decodeOpRequest(q: ByteQueue): Decoded<OpRequest> {
  if (q.length < OP_COMMON_LEN) return NEED;
  const h = parseOpCommon(q.peek(OP_COMMON_LEN));
  // usbip_net_recv_op_common (tools/usb/usbip/src/usbip_network.c) rejects other versions.
  if (h.version !== USBIP_VERSION) return err('bad_version', `version 0x${h.version.toString(16)}`);
  if (h.code === OP_REQ_DEVLIST) {
    q.skip(OP_COMMON_LEN);
    return { kind: 'msg', op: 'devlist' };
  }
  if (h.code === OP_REQ_IMPORT) {
    if (q.length < OP_COMMON_LEN + BUSID_LEN) return NEED;
    const b = q.take(OP_COMMON_LEN + BUSID_LEN);
    return { kind: 'msg', op: 'import', busid: parseBusid(b, OP_COMMON_LEN) };
  }
  return err('unknown_op', `code 0x${h.code.toString(16)}`);
}

export interface UrbLimits {
  /** Largest transfer_buffer_length accepted (bytes). */
  maxTransferLength: number;
  /** Largest number_of_packets accepted for isochronous transfers. */
  maxIsoPackets: number;
}

export const DEFAULT_URB_LIMITS: UrbLimits = {
  // The kernel's usb-storage asks for at most max_sectors × 512 (240 KiB by default, up to a few
  // MiB when tuned); 16 MiB leaves room for any sane client while bounding a hostile one.
  maxTransferLength: 16 * 1024 * 1024,
  maxIsoPackets: USBIP_MAX_ISO_PACKETS,
};

export type UrbMessage =
  | {
      command: 'submit';
      submit: CmdSubmitRepr;
      /** OUT data (exactly transfer_buffer_length bytes); empty for IN. A view into the stream. */
      data: Uint8Array;
      /** Isochronous packet descriptors; empty for other transfers. */
      iso: IsoPacketDescriptor[];
    }
  | { command: 'unlink'; seqnum: number; devid: number; unlinkSeqnum: number };

/**
 * Decode one client→server URB message (CMD_SUBMIT with its OUT data and iso descriptors, or
 * CMD_UNLINK). Layout per usbip_protocol.rst and stub_rx.c: header, then OUT data of
 * transfer_buffer_length bytes, then number_of_packets × 16 bytes of iso descriptors.
 */
export function decodeUrbMessage(q: ByteQueue, limits: UrbLimits = DEFAULT_URB_LIMITS): Decoded<UrbMessage> {
  if (q.length < URB_HEADER_LEN) return NEED;
  const h = new UrbHeader(q.peek(URB_HEADER_LEN));
  const command = h.command;
  if (command === USBIP_CMD_UNLINK) {
    const m = { kind: 'msg', command: 'unlink', seqnum: h.seqnum, devid: h.devid, unlinkSeqnum: h.unlinkSeqnum } as const;
    q.skip(URB_HEADER_LEN);
    return m;
  }
  if (command !== USBIP_CMD_SUBMIT) return err('unknown_command', `command ${command}`);
  const dir = h.direction;
  if (dir !== USBIP_DIR_IN && dir !== USBIP_DIR_OUT) return err('bad_direction', `direction ${dir}`);
  if (h.ep > 15) return err('bad_ep', `ep ${h.ep}`);
  const tbl = h.transferBufferLength;
  if (tbl > limits.maxTransferLength) return err('buffer_too_large', `transfer_buffer_length ${tbl}`);
  const np = h.numberOfPackets;
  const iso = isNonIsoCount(np) ? 0 : np;
  if (iso > limits.maxIsoPackets) return err('too_many_iso_packets', `number_of_packets ${np}`);
  const dataLen = dir === USBIP_DIR_OUT ? tbl : 0;
  const total = URB_HEADER_LEN + dataLen + iso * ISO_DESC_LEN;
  if (q.length < total) return NEED;
  const all = q.take(total);
  const hdr = new UrbHeader(all.subarray(0, URB_HEADER_LEN));
  const submit = parseCmdSubmit(hdr);
  // Copy the setup bytes: the header view may be reused by the queue's merge buffer lifetime.
  submit.setup = submit.setup.slice();
  const data = all.subarray(URB_HEADER_LEN, URB_HEADER_LEN + dataLen);
  const descs = iso ? parseIsoDescriptors(all.subarray(URB_HEADER_LEN + dataLen), iso) : [];
  return { kind: 'msg', command: 'submit', submit, data, iso: descs };
}
