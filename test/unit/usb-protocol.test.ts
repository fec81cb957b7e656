/**
 * USB/IP codec and incremental reader (usb/protocol.ts, usb/reader.ts).
 *
 * Captured bytes: Debian's `usbip` 2.0 (linux-tools, the kernel's tools/usb/usbip) against
 * tender's server in a network namespace, `tcpdump -i lo` there, payloads printed with
 * `tshark -T fields -e tcp.payload`:
 *   - `usbip list -r 127.0.0.1`     → OP_REQ_DEVLIST (client) and OP_REP_DEVLIST (server, which the
 *                                       tool parsed and printed as 0525:a4a5, 08/06/50)
 *   - `usbip attach -r 127.0.0.1 -b 99-1` → OP_REQ_IMPORT, sent as two TCP segments (header, then
 *                                       busid), and OP_REP_IMPORT.
 * The server's replies were captured before bConfigurationValue was set to 1, so they carry 0.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  DEVICE_RECORD_LEN,
  OP_REP_IMPORT,
  ST_NODEV,
  URB_HEADER_LEN,
  USBIP_CMD_SUBMIT,
  USBIP_CMD_UNLINK,
  USBIP_RET_SUBMIT,
  USBIP_RET_UNLINK,
  UrbHeader,
  emitCmdSubmit,
  emitCmdUnlink,
  emitIsoDescriptors,
  emitRepDevlist,
  emitRepImport,
  emitReqDevlist,
  emitReqImport,
  emitRetSubmit,
  emitRetUnlink,
  parseDeviceRecord,
  parseOpCommon,
  parseRepDevlistBody,
  type UsbDeviceRecordRepr,
} from '../../usb/protocol.js';
import { ByteQueue, decodeOpRequest, decodeUrbMessage } from '../../usb/reader.js';

const hex = (s: string) => Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
const z = (n: number) => '00'.repeat(n);
const str = (s: string, n: number) => Buffer.from(s, 'latin1').toString('hex') + z(n - s.length);

// usbip list -r: the client's request, 8 bytes.
const REQ_DEVLIST = hex('0111 8005 00000000'); // version 1.1.1, OP_REQ_DEVLIST, status 0

// The server's OP_REP_DEVLIST as captured (328 bytes), then the same annotated field by field.
const PATH = '/sys/devices/virtual/tender/usb99/99-1';
const REP_DEVLIST_CAPTURED = hex(
  '011100050000000000000001' +
    '2f7379732f646576696365732f7669727475616c2f74656e6465722f75736239392f39392d31' + z(256 - 38) +
    '39392d31' + z(28) +
    '0000006300000001000000030525a4a5010000000000010108065000',
);
const REP_DEVLIST_ANNOTATED = hex(
  '0111' + // version 0x0111
    '0005' + // OP_REP_DEVLIST
    '00000000' + // status ST_OK
    '00000001' + // number of exported devices
    str(PATH, 256) + // path[256]
    str('99-1', 32) + // busid[32]
    '00000063' + // busnum 99
    '00000001' + // devnum 1
    '00000003' + // speed USB_SPEED_HIGH
    '0525' + // idVendor (Netchip)
    'a4a5' + // idProduct (file-backed storage gadget)
    '0100' + // bcdDevice 1.00
    '00' + '00' + '00' + // bDeviceClass/SubClass/Protocol: per interface
    '00' + // bConfigurationValue (0 in this capture)
    '01' + // bNumConfigurations
    '01' + // bNumInterfaces
    '08' + '06' + '50' + '00', // interface 0: mass storage, SCSI, bulk-only, padding
);

// usbip attach: OP_REQ_IMPORT in two segments as the tool wrote them.
const REQ_IMPORT_SEG1 = hex('0111 8003 00000000'); // version, OP_REQ_IMPORT, status 0
const REQ_IMPORT_SEG2 = hex('39392d31' + z(28)); // busid[32] "99-1"

const RECORD: UsbDeviceRecordRepr = {
  path: PATH,
  busid: '99-1',
  busnum: 99,
  devnum: 1,
  speed: 3,
  idVendor: 0x0525,
  idProduct: 0xa4a5,
  bcdDevice: 0x0100,
  bDeviceClass: 0,
  bDeviceSubClass: 0,
  bDeviceProtocol: 0,
  bConfigurationValue: 0,
  bNumConfigurations: 1,
  bNumInterfaces: 1,
};

describe('operation messages (captured from usbip)', () => {
  it('annotation matches the capture byte for byte', () => {
    expect(REP_DEVLIST_ANNOTATED).toEqual(REP_DEVLIST_CAPTURED);
    expect(REP_DEVLIST_CAPTURED.length).toBe(8 + 4 + DEVICE_RECORD_LEN + 4);
  });

  it('OP_REQ_DEVLIST: parse and emit', () => {
    const q = new ByteQueue();
    q.push(REQ_DEVLIST);
    expect(decodeOpRequest(q)).toEqual({ kind: 'msg', op: 'devlist' });
    expect(q.length).toBe(0);
    expect(emitReqDevlist()).toEqual(REQ_DEVLIST);
  });

  it('OP_REP_DEVLIST: parse and emit', () => {
    expect(parseOpCommon(REP_DEVLIST_CAPTURED)).toEqual({ version: 0x0111, code: 5, status: 0 });
    const entries = parseRepDevlistBody(REP_DEVLIST_CAPTURED.subarray(8))!;
    expect(entries).toEqual([{ device: RECORD, interfaces: [{ bInterfaceClass: 8, bInterfaceSubClass: 6, bInterfaceProtocol: 0x50 }] }]);
    expect(emitRepDevlist(entries)).toEqual(REP_DEVLIST_CAPTURED);
    expect(parseRepDevlistBody(REP_DEVLIST_CAPTURED.subarray(8, 100))).toBeNull();
  });

  it('OP_REQ_IMPORT arriving in two segments', () => {
    const q = new ByteQueue();
    q.push(REQ_IMPORT_SEG1);
    expect(decodeOpRequest(q).kind).toBe('need');
    q.push(REQ_IMPORT_SEG2);
    expect(decodeOpRequest(q)).toEqual({ kind: 'msg', op: 'import', busid: '99-1' });
    expect(emitReqImport('99-1')).toEqual(Uint8Array.from([...REQ_IMPORT_SEG1, ...REQ_IMPORT_SEG2]));
  });

  it('OP_REP_IMPORT: header then the 312-byte record without interfaces', () => {
    const rep = emitRepImport(0, RECORD);
    // As captured: the devlist record minus count and interface bytes, code 0x0003.
    expect(rep).toEqual(hex('0111 0003 00000000' + Buffer.from(REP_DEVLIST_CAPTURED.subarray(12, 12 + 312)).toString('hex')));
    expect(parseDeviceRecord(rep, 8)).toEqual(RECORD);
    const refused = emitRepImport(ST_NODEV);
    expect(refused).toEqual(hex('0111 0003 00000004'));
    expect(parseOpCommon(refused).code).toBe(OP_REP_IMPORT);
  });

  it('a wrong version or unknown code is a protocol error', () => {
    const q = new ByteQueue();
    q.push(hex('0106 8005 00000000'));
    expect(decodeOpRequest(q)).toMatchObject({ kind: 'error', reason: 'bad_version' });
    const q2 = new ByteQueue();
    q2.push(hex('0111 8001 00000000'));
    expect(decodeOpRequest(q2)).toMatchObject({ kind: 'error', reason: 'unknown_op' });
  });
});

describe('URB headers (usbip_common.h layout)', () => {
  // CMD_SUBMIT as vhci_tx.c sends GET_DESCRIPTOR(device, 18) on ep0: layout from
  // usbip_protocol.rst, annotated.
  const CMD_SUBMIT_GET_DESC = hex(
    '00000001' + // command USBIP_CMD_SUBMIT
      '00000005' + // seqnum
      '00630001' + // devid busnum 99 << 16 | devnum 1
      '00000001' + // direction IN
      '00000000' + // ep 0
      '00000200' + // transfer_flags URB_DIR_IN
      '00000012' + // transfer_buffer_length 18
      '00000000' + // start_frame
      '00000000' + // number_of_packets (0 from Linux for non-iso)
      '00000000' + // interval
      '8006000100001200', // setup: IN standard device, GET_DESCRIPTOR, wValue 0x0100, wLength 18 (LE)
  );

  it('CMD_SUBMIT: view, parse, emit', () => {
    const h = UrbHeader.check(CMD_SUBMIT_GET_DESC)!;
    expect([h.command, h.seqnum, h.devid, h.direction, h.ep]).toEqual([USBIP_CMD_SUBMIT, 5, 0x630001, 1, 0]);
    expect(h.transferBufferLength).toBe(18);
    expect(Array.from(h.setup)).toEqual([0x80, 6, 0, 1, 0, 0, 0x12, 0]);
    const q = new ByteQueue();
    q.push(CMD_SUBMIT_GET_DESC);
    const m = decodeUrbMessage(q);
    if (m.kind !== 'msg' || m.command !== 'submit') throw new Error('expected submit');
    const b = new Uint8Array(48);
    emitCmdSubmit(m.submit, b);
    expect(b).toEqual(CMD_SUBMIT_GET_DESC);
    expect(UrbHeader.check(CMD_SUBMIT_GET_DESC.subarray(0, 47))).toBeNull();
  });

  it('RET_SUBMIT and RET_UNLINK zero devid/direction/ep like stub_tx.c', () => {
    const b = new Uint8Array(48);
    emitRetSubmit({ seqnum: 5, status: 0, actualLength: 18, startFrame: 0, numberOfPackets: 0, errorCount: 0 }, b);
    expect(b).toEqual(hex('00000003 00000005 00000000 00000000 00000000' + '00000000 00000012 00000000 00000000 00000000' + z(8)));
    const h = new UrbHeader(b);
    expect([h.command, h.status, h.actualLength]).toEqual([USBIP_RET_SUBMIT, 0, 18]);
    emitRetUnlink(7, -104, b);
    expect(b).toEqual(hex('00000004 00000007 00000000 00000000 00000000' + 'ffffff98' + z(24)));
    expect(new UrbHeader(b).status).toBe(-104);
    emitCmdUnlink(8, 0x630001, 5, b);
    const u = new UrbHeader(b);
    expect([u.command, u.seqnum, u.devid, u.unlinkSeqnum]).toEqual([USBIP_CMD_UNLINK, 8, 0x630001, 5]);
    expect(URB_HEADER_LEN).toBe(48);
    void USBIP_RET_UNLINK;
  });

  it('CMD_SUBMIT OUT with data and iso descriptors', () => {
    const data = Uint8Array.from([1, 2, 3, 4, 5, 6]);
    const b = new Uint8Array(48 + 6 + 32);
    emitCmdSubmit({ seqnum: 9, devid: 1, direction: 0, ep: 3, transferFlags: 2, transferBufferLength: 6, startFrame: 0, numberOfPackets: 2, interval: 1, setup: new Uint8Array(8) }, b);
    b.set(data, 48);
    emitIsoDescriptors([{ offset: 0, length: 3, actualLength: 0, status: 0 }, { offset: 3, length: 3, actualLength: 0, status: 0 }], b, 54);
    const q = new ByteQueue();
    q.push(b.subarray(0, 60));
    expect(decodeUrbMessage(q).kind).toBe('need');
    q.push(b.subarray(60));
    const m = decodeUrbMessage(q);
    if (m.kind !== 'msg' || m.command !== 'submit') throw new Error('expected submit');
    expect(Array.from(m.data)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(m.iso).toEqual([{ offset: 0, length: 3, actualLength: 0, status: 0 }, { offset: 3, length: 3, actualLength: 0, status: 0 }]);
  });

  it('bounds: absurd transfer_buffer_length or number_of_packets is an error, not a wait', () => {
    const mk = (tbl: number, np: number, dir = 0, cmd = 1, ep = 1) => {
      const b = new Uint8Array(48);
      emitCmdSubmit({ seqnum: 1, devid: 1, direction: dir, ep, transferFlags: 0, transferBufferLength: tbl, startFrame: 0, numberOfPackets: np, interval: 0, setup: new Uint8Array(8) }, b);
      new DataView(b.buffer).setUint32(0, cmd);
      const q = new ByteQueue();
      q.push(b);
      return decodeUrbMessage(q);
    };
    expect(mk(0xffffffff, 0)).toMatchObject({ kind: 'error', reason: 'buffer_too_large' });
    expect(mk(0xffffffff, 0, 1)).toMatchObject({ kind: 'error', reason: 'buffer_too_large' });
    expect(mk(16, 5000)).toMatchObject({ kind: 'error', reason: 'too_many_iso_packets' });
    expect(mk(16, 0xffffffff, 1)).toMatchObject({ kind: 'msg' }); // the protocol's "not iso"
    expect(mk(0, 0, 2)).toMatchObject({ kind: 'error', reason: 'bad_direction' });
    expect(mk(0, 0, 0, 7)).toMatchObject({ kind: 'error', reason: 'unknown_command' });
    expect(mk(0, 0, 0, 1, 16)).toMatchObject({ kind: 'error', reason: 'bad_ep' });
  });
});

describe('reader properties', () => {
  it('arbitrary bytes in arbitrary chunks never throw', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 10 }), fc.boolean(), (chunks, op) => {
        const q = new ByteQueue();
        for (const c of chunks) {
          q.push(c);
          for (let i = 0; i < 20; i++) {
            const m = op ? decodeOpRequest(q) : decodeUrbMessage(q);
            if (m.kind !== 'msg') break;
          }
        }
      }),
    );
  });

  const urbMessage = fc.record({
    seqnum: fc.integer({ min: 0, max: 0xffffffff }),
    dir: fc.integer({ min: 0, max: 1 }),
    ep: fc.integer({ min: 0, max: 15 }),
    len: fc.integer({ min: 0, max: 3000 }),
    np: fc.integer({ min: 0, max: 4 }),
    unlink: fc.boolean(),
  });
  const encode = (m: { seqnum: number; dir: number; ep: number; len: number; np: number; unlink: boolean }) => {
    if (m.unlink) {
      const b = new Uint8Array(48);
      emitCmdUnlink(m.seqnum, 1, m.seqnum ^ 1, b);
      return b;
    }
    const dataLen = m.dir === 0 ? m.len : 0;
    const b = new Uint8Array(48 + dataLen + m.np * 16);
    emitCmdSubmit({ seqnum: m.seqnum, devid: 1, direction: m.dir, ep: m.ep, transferFlags: 0, transferBufferLength: m.len, startFrame: 0, numberOfPackets: m.np, interval: 0, setup: new Uint8Array(8) }, b);
    for (let i = 48; i < b.length; i++) b[i] = i & 0xff;
    return b;
  };

  it('a stream split anywhere decodes to the same messages; a cut-off tail stays pending', () => {
    fc.assert(
      fc.property(fc.array(urbMessage, { minLength: 1, maxLength: 6 }), fc.array(fc.nat(), { maxLength: 8 }), fc.nat(), (msgs, cuts, cutTail) => {
        const wire = Buffer.concat(msgs.map(encode));
        const tail = (cutTail % 47) + 1; // remove 1..47 bytes: the last message is cut off
        const stream = wire.subarray(0, wire.length - tail);
        const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
        const q = new ByteQueue();
        const got: number[] = [];
        let prev = 0;
        for (const p of [...points, stream.length]) {
          q.push(stream.subarray(prev, p));
          prev = p;
          for (;;) {
            const m = decodeUrbMessage(q);
            if (m.kind === 'error') throw new Error(m.reason);
            if (m.kind === 'need') break;
            got.push(m.command === 'submit' ? m.submit.seqnum : m.seqnum);
          }
        }
        // All but the last message decoded, and bytes remain: end of stream here is "truncated".
        expect(got).toEqual(msgs.slice(0, -1).map((m) => m.seqnum));
        expect(q.length).toBeGreaterThan(0);
      }),
    );
  });
});
