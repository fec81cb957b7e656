/**
 * The virtual mass-storage device (usb/devices/storage.ts, scsi.ts) driven URB by URB as the
 * Linux usb-storage driver does: CBW on bulk OUT 0x02, data, CSW on bulk IN 0x81.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Urb, UrbResult } from '../../usb/device.js';
import { Errno } from '../../usb/protocol.js';
import { MemoryBackend } from '../../usb/devices/scsi.js';
import { CBW_SIGNATURE, CSW_FAILED, CSW_PASSED, CSW_PHASE_ERROR, EP_IN, EP_OUT, StorageDevice, parseCbw } from '../../usb/devices/storage.js';

const sig = () => new AbortController().signal;

function cbw(tag: number, length: number, dirIn: boolean, cdb: number[]): Uint8Array {
  const b = new Uint8Array(31);
  const v = new DataView(b.buffer);
  v.setUint32(0, CBW_SIGNATURE, true);
  v.setUint32(4, tag, true);
  v.setUint32(8, length, true);
  b[12] = dirIn ? 0x80 : 0;
  b[13] = 0;
  b[14] = cdb.length;
  b.set(cdb, 15);
  return b;
}

const bulkOut = (data: Uint8Array): Urb => ({ endpoint: EP_OUT, type: 'bulk', data, length: data.length, transferFlags: 0 });
const bulkIn = (length: number): Urb => ({ endpoint: EP_IN, type: 'bulk', data: new Uint8Array(0), length, transferFlags: 0x200 });

function csw(r: UrbResult): { tag: number; residue: number; status: number } {
  const b = r.data!;
  expect(b.length).toBe(13);
  const v = new DataView(b.buffer, b.byteOffset, 13);
  expect(v.getUint32(0, true)).toBe(0x53425355);
  return { tag: v.getUint32(4, true), residue: v.getUint32(8, true), status: b[12]! };
}

function disk(blocks = 64, readOnly = false) {
  const image = new Uint8Array(blocks * 512);
  for (let i = 0; i < image.length; i++) image[i] = (i * 7 + (i >> 9)) & 0xff;
  const dev = new StorageDevice(new MemoryBackend(image, readOnly), { busid: '99-1', busnum: 99, devnum: 1 });
  dev.attached();
  return { dev, image };
}

/** One BOT command: CBW, optional data, CSW. */
async function command(dev: StorageDevice, tag: number, cdb: number[], opts: { in?: number; out?: Uint8Array } = {}) {
  const len = opts.in ?? opts.out?.length ?? 0;
  const r1 = await dev.submit(bulkOut(cbw(tag, len, opts.in !== undefined, cdb)), sig());
  expect(r1.status).toBe(0);
  let data: Uint8Array | undefined;
  let dataStatus = 0;
  if (opts.in) {
    const r = await dev.submit(bulkIn(opts.in), sig());
    dataStatus = r.status;
    data = r.data;
    if (r.status === Errno.EPIPE) dev.clearHalt(EP_IN);
  }
  if (opts.out) {
    const r = await dev.submit(bulkOut(opts.out), sig());
    dataStatus = r.status;
  }
  const c = csw(await dev.submit(bulkIn(13), sig()));
  expect(c.tag).toBe(tag);
  return { data, dataStatus, ...c };
}

const be32 = (b: Uint8Array, o: number) => new DataView(b.buffer, b.byteOffset).getUint32(o);

describe('bulk-only transport + SCSI', () => {
  it('INQUIRY returns 36 bytes of a removable direct-access device', async () => {
    const { dev } = disk();
    const r = await command(dev, 1, [0x12, 0, 0, 0, 36, 0], { in: 36 });
    expect(r.status).toBe(CSW_PASSED);
    expect(r.residue).toBe(0);
    expect(r.data!.length).toBe(36);
    expect(r.data![0]).toBe(0);
    expect(r.data![1]).toBe(0x80);
    expect(Buffer.from(r.data!.subarray(8, 16)).toString()).toBe('tender  ');
  });

  it('TEST UNIT READY, READ CAPACITY(10) and (16)', async () => {
    const { dev } = disk(64);
    expect((await command(dev, 2, [0, 0, 0, 0, 0, 0])).status).toBe(CSW_PASSED);
    const c10 = await command(dev, 3, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], { in: 8 });
    expect(be32(c10.data!, 0)).toBe(63);
    expect(be32(c10.data!, 4)).toBe(512);
    const c16 = await command(dev, 4, [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], { in: 32 });
    expect(be32(c16.data!, 4)).toBe(63);
    expect(be32(c16.data!, 8)).toBe(512);
  });

  it('READ(10) returns the image; WRITE(10)/(16) land in it; READ(16) reads them back', async () => {
    const { dev, image } = disk(64);
    const r = await command(dev, 5, [0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0], { in: 1024 });
    expect(r.status).toBe(CSW_PASSED);
    expect(r.data).toEqual(image.subarray(3 * 512, 5 * 512));
    const payload = new Uint8Array(1024).fill(0xab);
    const w = await command(dev, 6, [0x2a, 0, 0, 0, 0, 10, 0, 0, 2, 0], { out: payload });
    expect(w.status).toBe(CSW_PASSED);
    expect(image.subarray(10 * 512, 12 * 512)).toEqual(payload);
    const payload2 = new Uint8Array(512).fill(0x5a);
    const w16 = await command(dev, 7, [0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0], { out: payload2 });
    expect(w16.status).toBe(CSW_PASSED);
    const r16 = await command(dev, 8, [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0], { in: 512 });
    expect(r16.data).toEqual(payload2);
    expect((await command(dev, 9, [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])).status).toBe(CSW_PASSED);
  });

  it('read-only: WRITE fails with DATA PROTECT / WRITE PROTECTED, MODE SENSE sets WP', async () => {
    const { dev, image } = disk(64, true);
    const before = image.slice();
    const w = await command(dev, 10, [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], { out: new Uint8Array(512).fill(1) });
    expect(w.status).toBe(CSW_FAILED);
    expect(image).toEqual(before);
    const s = await command(dev, 11, [0x03, 0, 0, 0, 18, 0], { in: 18 });
    expect(s.data![0]).toBe(0x70);
    expect(s.data![2]! & 0xf).toBe(0x07); // DATA PROTECT
    expect([s.data![12], s.data![13]]).toEqual([0x27, 0x00]);
    const m6 = await command(dev, 12, [0x1a, 0, 0x3f, 0, 192, 0], { in: 192 });
    expect(m6.data![2]! & 0x80).toBe(0x80);
    expect(m6.residue).toBe(192 - m6.data!.length);
    const m10 = await command(dev, 13, [0x5a, 0, 0x08, 0, 0, 0, 0, 0, 192, 0], { in: 192 });
    expect(m10.data![3]! & 0x80).toBe(0x80);
    const rw = disk(8, false).dev;
    const m = await command(rw, 14, [0x1a, 0, 0x3f, 0, 192, 0], { in: 192 });
    expect(m.data![2]! & 0x80).toBe(0);
  });

  it('unknown opcode → CHECK CONDITION, sense ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE; then cleared', async () => {
    const { dev } = disk();
    expect((await command(dev, 20, [0xc7, 0, 0, 0, 0, 0])).status).toBe(CSW_FAILED);
    const s = await command(dev, 21, [0x03, 0, 0, 0, 18, 0], { in: 18 });
    expect([s.data![2], s.data![12], s.data![13]]).toEqual([0x05, 0x20, 0x00]);
    const again = await command(dev, 22, [0x03, 0, 0, 0, 18, 0], { in: 18 });
    expect([again.data![2], again.data![12]]).toEqual([0, 0]);
  });

  it('READ beyond the end → LOGICAL BLOCK ADDRESS OUT OF RANGE (data phase stalled, residue = Hi)', async () => {
    const { dev } = disk(8);
    const r = await command(dev, 30, [0x28, 0, 0, 0, 0, 7, 0, 0, 2, 0], { in: 1024 });
    expect(r.dataStatus).toBe(Errno.EPIPE);
    expect(r.status).toBe(CSW_FAILED);
    expect(r.residue).toBe(1024);
    const s = await command(dev, 31, [0x03, 0, 0, 0, 18, 0], { in: 18 });
    expect([s.data![2], s.data![12]]).toEqual([0x05, 0x21]);
  });

  it('host expects less than the device has (Hi < Di) → phase error', async () => {
    const { dev } = disk(8);
    const r = await command(dev, 32, [0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], { in: 512 });
    expect(r.status).toBe(CSW_PHASE_ERROR);
  });

  it('invalid CBW stalls both endpoints until Bulk-Only Mass Storage Reset; Get Max LUN', async () => {
    const { dev } = disk();
    const bad = cbw(1, 0, false, [0]);
    bad[0] = 0; // wrong signature
    expect((await dev.submit(bulkOut(bad), sig())).status).toBe(Errno.EPIPE);
    expect(dev.isHalted(EP_IN) && dev.isHalted(EP_OUT)).toBe(true);
    dev.clearHalt(EP_IN);
    expect(dev.isHalted(EP_IN)).toBe(true); // §6.6.1: still stalled before the reset
    const ctl = (setup: number[]): Urb => ({ endpoint: 0, type: 'control', setup: Uint8Array.from(setup), data: new Uint8Array(0), length: setup[6]!, transferFlags: 0 });
    expect((await dev.submit(ctl([0x21, 0xff, 0, 0, 0, 0, 0, 0]), sig())).status).toBe(0);
    dev.clearHalt(EP_IN);
    dev.clearHalt(EP_OUT);
    expect(dev.isHalted(EP_IN) || dev.isHalted(EP_OUT)).toBe(false);
    expect((await command(dev, 40, [0, 0, 0, 0, 0, 0])).status).toBe(CSW_PASSED);
    const lun = await dev.submit(ctl([0xa1, 0xfe, 0, 0, 0, 0, 1, 0]), sig());
    expect(Array.from(lun.data!)).toEqual([0]);
  });

  it('a bulk IN URB submitted before the CBW waits, and can be cancelled', async () => {
    const { dev } = disk();
    const early = dev.submit(bulkIn(36), sig());
    await dev.submit(bulkOut(cbw(50, 36, true, [0x12, 0, 0, 0, 36, 0])), sig());
    expect((await early).data!.length).toBe(36);
    expect(csw(await dev.submit(bulkIn(13), sig())).tag).toBe(50);
    const ac = new AbortController();
    const waiting = dev.submit(bulkIn(13), ac.signal);
    ac.abort();
    expect((await waiting).status).toBe(Errno.ECONNRESET);
    expect((await command(dev, 51, [0, 0, 0, 0, 0, 0])).status).toBe(CSW_PASSED);
  });

  it('parseCbw never throws on arbitrary bytes', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 64 }), (b) => void parseCbw(b)));
  });

  it('arbitrary OUT/IN URB sequences never throw or wedge the device', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.oneof(fc.uint8Array({ minLength: 31, maxLength: 31 }), fc.nat({ max: 600 })), { maxLength: 12 }), async (ops) => {
        const { dev } = disk(4);
        for (const op of ops) {
          if (typeof op === 'number') {
            const ac = new AbortController();
            const p = dev.submit(bulkIn(op), ac.signal);
            setImmediate(() => ac.abort());
            await p;
          } else {
            const b = op.slice();
            if (b[0]! & 1) new DataView(b.buffer).setUint32(0, CBW_SIGNATURE, true);
            await dev.submit(bulkOut(b), sig());
          }
        }
        // Reset recovery always brings it back.
        dev.detached();
        dev.attached();
        expect((await command(dev, 99, [0, 0, 0, 0, 0, 0])).status).toBe(CSW_PASSED);
      }),
      { numRuns: 50 },
    );
  });
});
