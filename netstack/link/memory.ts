/**
 * An in-memory link pair for tests: whatever one end sends, the other receives, either
 * synchronously or queued until `flush()` (to model batches and reordering).
 */
import { type Link, type LinkReceiver, type LinkStats, newLinkStats } from './link.js';

export class MemoryLink implements Link {
  readonly stats: LinkStats = newLinkStats();
  peer: MemoryLink | null = null;
  private rx: LinkReceiver | null = null;
  private queue: Uint8Array[] = [];
  /** When false, frames sent to this end wait in a queue until `flush()`. */
  immediate = true;
  /** Every frame this end sent, copied (for assertions). */
  readonly sent: Uint8Array[] = [];
  recordSent = false;
  closed = false;

  constructor(
    readonly name = 'mem',
    readonly mtu = 1500,
  ) {}

  static pair(mtu = 1500, names: [string, string] = ['mem0', 'mem1']): [MemoryLink, MemoryLink] {
    const a = new MemoryLink(names[0], mtu);
    const b = new MemoryLink(names[1], mtu);
    a.peer = b;
    b.peer = a;
    return [a, b];
  }

  attach(rx: LinkReceiver): void {
    this.rx = rx;
  }

  send(frame: Uint8Array): void {
    if (this.closed || !this.peer || this.peer.closed) {
      this.stats.txDrops++;
      return;
    }
    this.stats.txFrames++;
    this.stats.txBytes += frame.length;
    if (this.recordSent) this.sent.push(frame.slice());
    this.peer.deliver(frame);
  }

  private deliver(frame: Uint8Array): void {
    if (this.immediate) {
      this.stats.rxFrames++;
      this.stats.rxBytes += frame.length;
      this.rx?.frame(frame);
      this.rx?.batchEnd?.();
    } else {
      this.queue.push(frame.slice());
    }
  }

  /** Deliver queued frames as one batch. */
  flush(): void {
    const q = this.queue;
    this.queue = [];
    for (const f of q) {
      this.stats.rxFrames++;
      this.stats.rxBytes += f.length;
      this.rx?.frame(f);
    }
    if (q.length) this.rx?.batchEnd?.();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.peer?.rx?.down?.('peer closed');
  }
}

/** A link whose sent frames are collected in an array and whose input is injected: like gVisor's channel endpoint. */
export class ChannelLink implements Link {
  readonly stats: LinkStats = newLinkStats();
  readonly out: Uint8Array[] = [];
  private rx: LinkReceiver | null = null;

  constructor(
    readonly name = 'chan',
    readonly mtu = 1500,
  ) {}

  attach(rx: LinkReceiver): void {
    this.rx = rx;
  }

  send(frame: Uint8Array): void {
    this.stats.txFrames++;
    this.stats.txBytes += frame.length;
    this.out.push(frame.slice());
  }

  /** Inject frames as if read from the device in one batch. */
  inject(...frames: Uint8Array[]): void {
    for (const f of frames) {
      this.stats.rxFrames++;
      this.stats.rxBytes += f.length;
      this.rx?.frame(f);
    }
    this.rx?.batchEnd?.();
  }

  /** Take and clear the collected frames. */
  take(): Uint8Array[] {
    return this.out.splice(0);
  }

  close(): void {
    this.rx?.down?.('closed');
  }
}
