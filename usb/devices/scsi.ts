/**
 * A SCSI direct-access block device (SBC-3 / SPC-4 subset), the command set USB mass storage
 * carries. Enough for Linux sd, usb-storage and the Windows/macOS class drivers: INQUIRY,
 * TEST UNIT READY, REQUEST SENSE, READ CAPACITY(10/16), READ/WRITE(10/16), MODE SENSE(6/10),
 * PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT, SYNCHRONIZE CACHE(10/16).
 *
 * Errors are CHECK CONDITION with fixed-format sense data kept until the next REQUEST SENSE
 * (SPC-4 §4.5: the host asks for it after a failed command, usb-storage does automatically).
 */
import type { FileHandle } from 'node:fs/promises';
import { open } from 'node:fs/promises';

export const BLOCK_SIZE = 512;

/** Sense keys (SPC-4 §4.5.6). */
export const SenseKey = {
  NO_SENSE: 0x0,
  NOT_READY: 0x2,
  MEDIUM_ERROR: 0x3,
  ILLEGAL_REQUEST: 0x5,
  UNIT_ATTENTION: 0x6,
  DATA_PROTECT: 0x7,
} as const;

/** Additional sense code / qualifier pairs used here. */
export const Asc = {
  NONE: [0x00, 0x00],
  INVALID_COMMAND_OPERATION_CODE: [0x20, 0x00],
  LBA_OUT_OF_RANGE: [0x21, 0x00],
  INVALID_FIELD_IN_CDB: [0x24, 0x00],
  WRITE_PROTECTED: [0x27, 0x00],
  UNRECOVERED_READ_ERROR: [0x11, 0x00],
  WRITE_ERROR: [0x0c, 0x00],
} as const;

export interface BlockBackend {
  readonly blocks: number;
  readonly readOnly: boolean;
  read(lba: number, count: number): Promise<Uint8Array>;
  write(lba: number, data: Uint8Array): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

/** An image file, read with positional reads/writes (no shared file offset). */
export class FileBackend implements BlockBackend {
  private constructor(
    private readonly fh: FileHandle,
    readonly blocks: number,
    readonly readOnly: boolean,
  ) {}

  static async open(path: string, readOnly: boolean): Promise<FileBackend> {
    const fh = await open(path, readOnly ? 'r' : 'r+');
    const st = await fh.stat();
    // A trailing partial block is not addressable (as the kernel's loop device does).
    return new FileBackend(fh, Math.floor(st.size / BLOCK_SIZE), readOnly);
  }

  async read(lba: number, count: number): Promise<Uint8Array> {
    const b = Buffer.allocUnsafe(count * BLOCK_SIZE);
    let off = 0;
    while (off < b.length) {
      const { bytesRead } = await this.fh.read(b, off, b.length - off, lba * BLOCK_SIZE + off);
      if (bytesRead === 0) {
        b.fill(0, off); // file shrank under us: zeros, as a sparse hole
        break;
      }
      off += bytesRead;
    }
    return b;
  }

  async write(lba: number, data: Uint8Array): Promise<void> {
    let off = 0;
    while (off < data.length) {
      const { bytesWritten } = await this.fh.write(data, off, data.length - off, lba * BLOCK_SIZE + off);
      off += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    if (!this.readOnly) await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** An in-memory backend for tests. */
export class MemoryBackend implements BlockBackend {
  constructor(
    readonly image: Uint8Array,
    readonly readOnly = false,
  ) {}
  get blocks(): number {
    return Math.floor(this.image.length / BLOCK_SIZE);
  }
  async read(lba: number, count: number): Promise<Uint8Array> {
    return this.image.slice(lba * BLOCK_SIZE, (lba + count) * BLOCK_SIZE);
  }
  async write(lba: number, data: Uint8Array): Promise<void> {
    this.image.set(data, lba * BLOCK_SIZE);
  }
  async sync(): Promise<void> {}
  async close(): Promise<void> {}
}

export type DataDirection = 'none' | 'in' | 'out';

export interface ScsiResult {
  good: boolean;
  /** Data for the host (IN commands), already cut to the allocation length. */
  dataIn?: Uint8Array;
}

export interface ScsiIdentity {
  vendor: string; // 8 chars
  product: string; // 16 chars
  revision: string; // 4 chars
  serial: string;
}

/** The most a single READ/WRITE may move; larger requests are refused (bounded memory). */
export const MAX_TRANSFER_BYTES = 16 * 1024 * 1024;

const be16 = (b: Uint8Array, o: number) => (b[o]! << 8) | b[o + 1]!;
const be32 = (b: Uint8Array, o: number) => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
const be64 = (b: Uint8Array, o: number) => be32(b, o) * 2 ** 32 + be32(b, o + 4);

function ascii(s: string, len: number): Uint8Array {
  return Buffer.from(s.padEnd(len, ' ').slice(0, len), 'latin1');
}

export class ScsiDisk {
  private sense: { key: number; asc: readonly [number, number] } = { key: SenseKey.NO_SENSE, asc: Asc.NONE };
  preventRemoval = false;

  constructor(
    readonly backend: BlockBackend,
    readonly identity: ScsiIdentity = { vendor: 'tender', product: 'virtual disk', revision: '0001', serial: '000000000001' },
  ) {}

  /** The sense data REQUEST SENSE would return now. */
  get currentSense(): { key: number; asc: number; ascq: number } {
    return { key: this.sense.key, asc: this.sense.asc[0], ascq: this.sense.asc[1] };
  }

  /** For a WRITE: the bytes the command expects from the host, or undefined (not a data-out command). */
  dataOutLength(cdb: Uint8Array): number | undefined {
    const op = cdb[0];
    if (op === 0x2a && cdb.length >= 10) return be16(cdb, 7) * BLOCK_SIZE;
    if (op === 0x8a && cdb.length >= 16) return be32(cdb, 10) * BLOCK_SIZE;
    return undefined;
  }

  private fail(key: number, asc: readonly [number, number]): ScsiResult {
    this.sense = { key, asc };
    return { good: false };
  }

  private good(dataIn?: Uint8Array, alloc?: number): ScsiResult {
    this.sense = { key: SenseKey.NO_SENSE, asc: Asc.NONE };
    if (dataIn && alloc !== undefined && dataIn.length > alloc) dataIn = dataIn.subarray(0, alloc);
    return { good: true, dataIn };
  }

  private checkRange(lba: number, count: number): ScsiResult | undefined {
    if (lba + count > this.backend.blocks) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
    if (count * BLOCK_SIZE > MAX_TRANSFER_BYTES) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
    return undefined;
  }

  async execute(cdb: Uint8Array, dataOut?: Uint8Array): Promise<ScsiResult> {
    const op = cdb[0];
    switch (op) {
      case 0x00: // TEST UNIT READY
        return this.good();
      case 0x03: {
        // REQUEST SENSE: fixed format (SPC-4 §4.5.3), then the sense is consumed.
        const s = new Uint8Array(18);
        s[0] = 0x70;
        s[2] = this.sense.key;
        s[7] = 10;
        s[12] = this.sense.asc[0];
        s[13] = this.sense.asc[1];
        this.sense = { key: SenseKey.NO_SENSE, asc: Asc.NONE };
        return { good: true, dataIn: s.subarray(0, Math.min(18, cdb[4]!)) };
      }
      case 0x12:
        return this.inquiry(cdb);
      case 0x1a:
        return this.modeSense(cdb[2]! & 0x3f, cdb[4]!, false);
      case 0x5a:
        return this.modeSense(cdb[2]! & 0x3f, be16(cdb, 7), true);
      case 0x1e: // PREVENT ALLOW MEDIUM REMOVAL
        this.preventRemoval = (cdb[4]! & 3) !== 0;
        return this.good();
      case 0x1b: // START STOP UNIT: nothing to spin
        return this.good();
      case 0x25: {
        // READ CAPACITY(10): last LBA, saturating at 0xffffffff to point at READ CAPACITY(16).
        const b = new Uint8Array(8);
        const v = new DataView(b.buffer);
        v.setUint32(0, Math.min(this.backend.blocks - 1, 0xffffffff) >>> 0);
        v.setUint32(4, BLOCK_SIZE);
        return this.good(b);
      }
      case 0x9e: {
        if ((cdb[1]! & 0x1f) !== 0x10) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
        // READ CAPACITY(16) (SERVICE ACTION IN(16) / 0x10): 32 bytes.
        const b = new Uint8Array(32);
        const v = new DataView(b.buffer);
        v.setBigUint64(0, BigInt(Math.max(this.backend.blocks - 1, 0)));
        v.setUint32(8, BLOCK_SIZE);
        return this.good(b, be32(cdb, 10));
      }
      case 0x28:
      case 0x88: {
        const lba = op === 0x28 ? be32(cdb, 2) : be64(cdb, 2);
        const count = op === 0x28 ? be16(cdb, 7) : be32(cdb, 10);
        const bad = this.checkRange(lba, count);
        if (bad) return bad;
        if (count === 0) return this.good(new Uint8Array(0));
        try {
          return this.good(await this.backend.read(lba, count));
        } catch {
          return this.fail(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR);
        }
      }
      case 0x2a:
      case 0x8a: {
        const lba = op === 0x2a ? be32(cdb, 2) : be64(cdb, 2);
        const count = op === 0x2a ? be16(cdb, 7) : be32(cdb, 10);
        if (this.backend.readOnly) return this.fail(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED);
        const bad = this.checkRange(lba, count);
        if (bad) return bad;
        if (!dataOut || dataOut.length < count * BLOCK_SIZE) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
        try {
          if (count) await this.backend.write(lba, dataOut.subarray(0, count * BLOCK_SIZE));
          return this.good();
        } catch {
          return this.fail(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR);
        }
      }
      case 0x35:
      case 0x91:
        try {
          await this.backend.sync();
          return this.good();
        } catch {
          return this.fail(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR);
        }
      default:
        return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE);
    }
  }

  private inquiry(cdb: Uint8Array): ScsiResult {
    const evpd = cdb[1]! & 1;
    const page = cdb[2]!;
    const alloc = be16(cdb, 3);
    if (!evpd) {
      if (page !== 0) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
      const b = new Uint8Array(36);
      b[0] = 0x00; // direct-access block device, connected
      b[1] = 0x80; // removable medium (as USB sticks report)
      b[2] = 0x06; // SPC-4
      b[3] = 0x02; // response data format 2
      b[4] = 36 - 5;
      b.set(ascii(this.identity.vendor, 8), 8);
      b.set(ascii(this.identity.product, 16), 16);
      b.set(ascii(this.identity.revision, 4), 32);
      return this.good(b, alloc);
    }
    if (page === 0x00) return this.good(Uint8Array.of(0, 0x00, 0, 2, 0x00, 0x80), alloc);
    if (page === 0x80) {
      const s = ascii(this.identity.serial, this.identity.serial.length);
      const b = new Uint8Array(4 + s.length);
      b[1] = 0x80;
      b[3] = s.length;
      b.set(s, 4);
      return this.good(b, alloc);
    }
    return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
  }

  /** MODE SENSE(6)/(10): header with the write-protect bit (SBC-3 §6.3.1), caching page 0x08. */
  private modeSense(page: number, alloc: number, ten: boolean): ScsiResult {
    if (page !== 0x08 && page !== 0x3f) return this.fail(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
    const caching = new Uint8Array(20);
    caching[0] = 0x08;
    caching[1] = 0x12; // write cache disabled: writes go to the image before the CSW
    const hl = ten ? 8 : 4;
    const b = new Uint8Array(hl + caching.length);
    const wp = this.backend.readOnly ? 0x80 : 0;
    if (ten) {
      new DataView(b.buffer).setUint16(0, b.length - 2);
      b[3] = wp;
    } else {
      b[0] = b.length - 1;
      b[2] = wp;
    }
    b.set(caching, hl);
    return this.good(b, alloc);
  }
}
