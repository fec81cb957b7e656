/**
 * A virtual L2 switch: a learning bridge between any number of links (machines, namespaces,
 * the gateway, later a host TAP).
 *
 * Like a Linux bridge with default settings: source MACs are learned per port and age out
 * after `ageingMs` (300 s); frames to group addresses (broadcast, multicast) and to unknown
 * unicast MACs are flooded to every other port; a frame is never sent back out of the port
 * it came in on. The switch is VLAN-unaware: 802.1Q-tagged frames are forwarded by MAC,
 * unchanged. Frames are borrowed (see link.ts), so forwarding copies nothing.
 */
import { isGroupMac, macKey, macStr } from '../addr.js';
import type { Clock } from '../time.js';
import type { Counters } from '../counters.js';
import type { FrameMeta, Link, LinkReceiver } from './link.js';
import { needsSoftware, softwareOffload } from './offload.js';
import { ETH_HLEN } from '../wire/ethernet.js';

export interface SwitchPort {
  readonly id: number;
  readonly link: Link;
  /** Detach the port: the link is closed and its learned MACs are forgotten. */
  remove(): void;
  /** Detach the port but leave the link open, to attach it elsewhere (another switch). */
  detach(): void;
}

interface Entry {
  port: PortImpl;
  seen: number;
  /** False once removed from the table (aged out, port detached): cached references check it. */
  live: boolean;
}

/** A MAC address as two 24-bit halves: compared without building the 48-bit key (a heap number). */
function macHi(b: Uint8Array, off: number): number {
  return (b[off]! << 16) | (b[off + 1]! << 8) | b[off + 2]!;
}
function macLo(b: Uint8Array, off: number): number {
  return (b[off + 3]! << 16) | (b[off + 4]! << 8) | b[off + 5]!;
}

class PortImpl implements SwitchPort, LinkReceiver {
  /** Set while the port has been sent frames during the current ingress batch. */
  dirty = false;
  removed = false;
  /**
   * The last source and destination MACs of frames from this port, with their table entries.
   * A link usually carries one machine talking to one peer, so most frames match both and
   * skip the two Map lookups with 48-bit (non-Smi) keys; a mismatch or a dead entry falls
   * back to the table.
   */
  srcHi = -1;
  srcLo = -1;
  srcEntry: Entry | null = null;
  dstHi = -1;
  dstLo = -1;
  dstEntry: Entry | null = null;

  constructor(
    readonly id: number,
    readonly link: Link,
    private readonly sw: Switch,
  ) {}

  frame(frame: Uint8Array, meta?: FrameMeta): void {
    this.sw.ingress(this, frame, meta);
  }

  batchEnd(): void {
    this.sw.flushDirty();
  }

  down(reason: string): void {
    this.sw.portDown(this, reason);
  }

  remove(): void {
    this.sw.removePort(this);
  }

  detach(): void {
    this.sw.detachPort(this);
  }
}

export interface SwitchOptions {
  clock: Clock;
  counters: Counters;
  /** MAC table entry lifetime. */
  ageingMs?: number;
  /** Upper bound on learned MACs (a guest can send frames from any source MAC). */
  maxMacs?: number;
  /** Told when a link goes down by itself (peer closed). */
  onPortDown?: (port: SwitchPort, reason: string) => void;
}

export class Switch {
  private readonly ports: PortImpl[] = [];
  private readonly table = new Map<number, Entry>();
  private readonly dirty: PortImpl[] = [];
  private nextId = 1;
  private readonly ageingMs: number;
  private readonly maxMacs: number;

  constructor(private readonly opts: SwitchOptions) {
    this.ageingMs = opts.ageingMs ?? 300_000;
    this.maxMacs = opts.maxMacs ?? 4096;
  }

  addPort(link: Link): SwitchPort {
    const p = new PortImpl(this.nextId++, link, this);
    this.ports.push(p);
    link.attach(p);
    // deliver() marks every port it sends to, and each batch ends in flushDirty().
    link.setCallerFlushes?.(true);
    return p;
  }

  get portCount(): number {
    return this.ports.length;
  }

  /** The learned MAC table, for the API and tests. */
  macTable(): { mac: string; port: number; ageMs: number }[] {
    const now = this.opts.clock.now();
    const out: { mac: string; port: number; ageMs: number }[] = [];
    for (const [k, e] of this.table) {
      const b = new Uint8Array(6);
      let v = k;
      for (let i = 5; i >= 0; i--) {
        b[i] = v % 256;
        v = Math.floor(v / 256);
      }
      out.push({ mac: macStr(b), port: e.port.id, ageMs: now - e.seen });
    }
    return out;
  }

  /**
   * The link behind which `mac` was last seen (null: unknown or aged out). `refresh` renews
   * the entry, as a frame from that MAC would: the TCP offload (tcp/offload.ts) moves the
   * guest's frames without the switch seeing them.
   */
  linkFor(mac: Uint8Array, refresh = false): Link | null {
    const e = this.table.get(macKey(mac, 0));
    if (e === undefined || e.port.removed) return null;
    const now = this.opts.clock.now();
    if (now - e.seen > this.ageingMs) return null;
    if (refresh) e.seen = now;
    return e.port.link;
  }

  /** @internal */
  ingress(from: PortImpl, frame: Uint8Array, meta?: FrameMeta): void {
    const c = this.opts.counters;
    if (from.removed) return;
    if (frame.length < ETH_HLEN) {
      c.inc('switch.drop.runt');
      return;
    }
    if (isGroupMac(frame, 6)) {
      // A multicast source address is invalid (IEEE 802.3 §3.2.3); never learn it.
      c.inc('switch.drop.bad_src_mac');
      return;
    }
    const now = this.opts.clock.now();
    const sHi = macHi(frame, 6);
    const sLo = macLo(frame, 6);
    const se = from.srcEntry;
    if (se !== null && se.live && se.port === from && from.srcHi === sHi && from.srcLo === sLo) {
      se.seen = now;
    } else {
      from.srcEntry = this.learn(macKey(frame, 6), from, now);
      from.srcHi = sHi;
      from.srcLo = sLo;
    }

    if (isGroupMac(frame, 0)) {
      c.inc('switch.flood');
      this.flood(from, frame, meta);
      return;
    }
    const dHi = macHi(frame, 0);
    const dLo = macLo(frame, 0);
    let e: Entry | undefined;
    const de = from.dstEntry;
    if (de !== null && de.live && from.dstHi === dHi && from.dstLo === dLo) {
      e = de;
    } else {
      e = this.table.get(macKey(frame, 0));
      from.dstEntry = e ?? null;
      from.dstHi = dHi;
      from.dstLo = dLo;
    }
    if (e === undefined || now - e.seen > this.ageingMs) {
      c.inc('switch.flood_unknown');
      this.flood(from, frame, meta);
      return;
    }
    if (e.port === from) {
      // The destination lives behind the ingress port: nothing to do (a bridge filters it).
      c.inc('switch.filtered');
      return;
    }
    c.inc('switch.forward');
    this.deliver(e.port, frame, meta);
  }

  private learn(key: number, port: PortImpl, now: number): Entry | null {
    const e = this.table.get(key);
    if (e !== undefined) {
      e.port = port;
      e.seen = now;
      return e;
    }
    if (this.table.size >= this.maxMacs) {
      this.evictAged(now);
      if (this.table.size >= this.maxMacs) {
        this.opts.counters.inc('switch.learn_table_full');
        return null;
      }
    }
    const n: Entry = { port, seen: now, live: true };
    this.table.set(key, n);
    return n;
  }

  private evictAged(now: number): void {
    for (const [k, e] of this.table) {
      if (now - e.seen > this.ageingMs) {
        e.live = false;
        this.table.delete(k);
      }
    }
  }

  private flood(from: PortImpl, frame: Uint8Array, meta?: FrameMeta): void {
    for (const p of this.ports) if (p !== from) this.deliver(p, frame, meta);
  }

  private deliver(p: PortImpl, frame: Uint8Array, meta?: FrameMeta): void {
    if (meta === undefined || (meta.flags === 0 && meta.gsoType === 0)) p.link.send(frame);
    else if (needsSoftware(meta, p.link.offloads)) softwareOffload(frame, meta, this.opts.counters, (f) => p.link.send(f));
    else p.link.send(frame, meta);
    if (!p.dirty && p.link.flush) {
      p.dirty = true;
      this.dirty.push(p);
    }
  }

  /** @internal End of an ingress batch: let each port that got frames write them out now. */
  flushDirty(): void {
    // A flush may deliver more frames (the gateway answering), so loop until quiet.
    while (this.dirty.length > 0) {
      const p = this.dirty.shift()!;
      p.dirty = false;
      if (!p.removed) p.link.flush!();
    }
  }

  /** @internal */
  portDown(p: PortImpl, reason: string): void {
    if (p.removed) return;
    this.opts.counters.inc('switch.port_down');
    this.detach(p);
    this.opts.onPortDown?.(p, reason);
  }

  /** @internal */
  detachPort(p: PortImpl): void {
    if (p.removed) return;
    this.detach(p);
  }

  /** @internal */
  removePort(p: PortImpl): void {
    if (p.removed) return;
    this.detach(p);
    p.link.close();
  }

  private detach(p: PortImpl): void {
    p.removed = true;
    p.link.setCallerFlushes?.(false);
    const i = this.ports.indexOf(p);
    if (i >= 0) this.ports.splice(i, 1);
    for (const [k, e] of this.table) {
      if (e.port === p) {
        e.live = false;
        this.table.delete(k);
      }
    }
  }

  close(): void {
    for (const p of [...this.ports]) this.removePort(p);
  }
}
