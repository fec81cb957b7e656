/**
 * A connected client before import: one operation per connection, as the kernel's usbipd
 * (tools/usb/usbip/src/usbipd.c recv_pdu). OP_REQ_DEVLIST is answered and the connection
 * closed; OP_REQ_IMPORT is answered and, on success, the same stream (with any bytes already
 * buffered) is handed to the attached phase.
 */
import type { Duplex } from 'node:stream';
import { AttachedClient, type AttachedLog, type AttachedOptions, type CloseReason } from './attached.js';
import { deviceRecord, type UsbDevice } from './device.js';
import { ST_DEV_BUSY, ST_NODEV, ST_OK, emitRepDevlist, emitRepImport } from './protocol.js';
import { ByteQueue, decodeOpRequest } from './reader.js';

export interface DeviceRegistry {
  /** Devices offered to this client (explicitly shared ones only). */
  list(): UsbDevice[];
  /** Claim a device for one client; false when another client holds it. */
  claim(busid: string): UsbDevice | 'busy' | undefined;
  release(dev: UsbDevice): void;
}

export type ConnectionOutcome =
  | { op: 'devlist' }
  | { op: 'import'; busid: string; status: number; attached?: AttachedClient; closed?: CloseReason }
  | { op: 'none'; closed: CloseReason };

export function handleConnection(sock: Duplex, reg: DeviceRegistry, log: AttachedLog, opts: AttachedOptions = {}): Promise<ConnectionOutcome> {
  return new Promise((resolve) => {
    const q = new ByteQueue();
    let settled = false;
    const detach = () => {
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('close', onEnd);
      sock.off('error', onError);
    };
    const fail = (closed: CloseReason) => {
      if (settled) return;
      settled = true;
      detach();
      if (closed.kind === 'hangup') log.debug({}, 'client hung up before a request');
      else log.warn(closed, 'closing USB/IP connection');
      sock.destroy();
      resolve({ op: 'none', closed });
    };
    const onEnd = () => fail(q.length === 0 ? { kind: 'hangup' } : { kind: 'truncated' });
    const onError = (e: Error) => fail({ kind: 'error', message: e.message });
    const onData = (c: Buffer) => {
      if (settled) return;
      q.push(c);
      const m = decodeOpRequest(q);
      if (m.kind === 'need') return;
      if (m.kind === 'error') return fail({ kind: 'protocol', reason: m.reason, detail: m.detail });
      settled = true;
      detach();
      if (m.op === 'devlist') {
        const entries = reg.list().map((d) => {
          const { interfaces, ...device } = deviceRecord(d);
          return { device, interfaces };
        });
        sock.end(emitRepDevlist(entries));
        resolve({ op: 'devlist' });
        return;
      }
      const dev = reg.claim(m.busid);
      if (dev === undefined || dev === 'busy') {
        const status = dev === 'busy' ? ST_DEV_BUSY : ST_NODEV;
        log.debug({ busid: m.busid, status }, 'import refused');
        sock.end(emitRepImport(status));
        resolve({ op: 'import', busid: m.busid, status });
        return;
      }
      const { interfaces: _i, ...record } = deviceRecord(dev);
      sock.write(emitRepImport(ST_OK, record));
      const a = new AttachedClient(sock, dev, q, log, opts);
      void a.finished.then(() => reg.release(dev));
      a.start();
      resolve({ op: 'import', busid: m.busid, status: ST_OK, attached: a });
    };
    sock.on('data', onData);
    sock.on('end', onEnd);
    sock.on('close', onEnd);
    sock.on('error', onError);
  });
}
