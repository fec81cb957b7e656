/**
 * The USB manager's state as it is now, and the file it lives in ($TENDER_HOME/usb.json). Every
 * part of the manager (usb-*.ts) reads and changes this one object and saves through it; what
 * the file holds and how older versions are carried forward is usb-state.ts.
 */
import type { Logger } from '../log.js';
import { readJson, writeFileAtomic } from './atomic.js';
import { type Attachment, type UsbState, emptyUsbState, migrateUsbState } from './usb-state.js';

export class UsbStore {
  /** Replaced by load(): read it through the store, never keep it. */
  state: UsbState = emptyUsbState();

  constructor(
    private readonly file: string,
    private readonly log: Logger,
  ) {}

  load(): void {
    const raw = readJson<unknown>(this.file);
    this.state = migrateUsbState(raw);
    if (raw !== null && (raw as { version?: number }).version !== this.state.version) {
      this.save();
      this.log.info({ from: (raw as { version?: number }).version, to: this.state.version }, 'usb.json migrated');
    }
  }

  save(): void {
    writeFileAtomic(this.file, JSON.stringify(this.state, null, 2) + '\n');
  }

  /** The attachment of device `id` (a virtual id or a host busid), if it is attached. */
  attachmentOf(id: string): Attachment | undefined {
    return this.state.attachments.find((a) => a.device === id);
  }
}
