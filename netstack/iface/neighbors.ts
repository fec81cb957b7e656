/**
 * The IPv4 neighbour cache of the gateway: IP → MAC, filled by ARP and by gleaning the
 * source of IP packets received from the subnet (as smoltcp does), so replies to a guest that
 * just talked to us never wait for an ARP round trip.
 *
 * Packets for an unresolved neighbour wait in a small per-address queue while ARP requests go
 * out (3 tries, 1 s apart, like Linux's mcast_solicit); then they are dropped and counted.
 */
import { type Ip4, type Mac, macEq } from '../addr.js';
import type { Counters } from '../counters.js';
import type { Clock, Timer } from '../time.js';

interface Entry {
  mac: Mac;
  expires: number;
}

interface Pending {
  frames: Uint8Array[];
  tries: number;
  timer: Timer;
}

export interface NeighborOptions {
  clock: Clock;
  counters: Counters;
  /** Send an ARP request for `ip`. */
  solicit: (ip: Ip4) => void;
  /** Transmit a queued frame once resolved (the MAC is patched in already). */
  transmit: (frame: Uint8Array) => void;
  lifetimeMs?: number;
  maxEntries?: number;
  maxQueuedPerNeighbor?: number;
  maxPendingNeighbors?: number;
  retries?: number;
  retryMs?: number;
}

export class NeighborCache {
  private readonly entries = new Map<Ip4, Entry>();
  private readonly pending = new Map<Ip4, Pending>();
  private readonly lifetimeMs: number;
  private readonly maxEntries: number;

  constructor(private readonly o: NeighborOptions) {
    this.lifetimeMs = o.lifetimeMs ?? 300_000;
    this.maxEntries = o.maxEntries ?? 4096;
  }

  lookup(ip: Ip4): Mac | null {
    const e = this.entries.get(ip);
    if (e === undefined) return null;
    if (e.expires < this.o.clock.now()) {
      this.entries.delete(ip);
      return null;
    }
    return e.mac;
  }

  /** Learn (or refresh) a mapping; flushes packets waiting for it. `mac` is borrowed. */
  /** `mac` is read at `off` (the gateway passes the received frame: no view per packet). */
  learn(ip: Ip4, mac: Uint8Array, off = 0): void {
    const now = this.o.clock.now();
    const e = this.entries.get(ip);
    if (e !== undefined) {
      if (!macEq(e.mac, mac, off)) e.mac = mac.slice(off, off + 6);
      e.expires = now + this.lifetimeMs;
    } else {
      if (this.entries.size >= this.maxEntries) this.evict(now);
      this.entries.set(ip, { mac: mac.slice(off, off + 6), expires: now + this.lifetimeMs });
    }
    if (this.pending.size === 0) return;
    const p = this.pending.get(ip);
    if (p !== undefined) {
      this.pending.delete(ip);
      p.timer.cancel();
      for (const f of p.frames) {
        f.set(mac.subarray(off, off + 6), 0);
        this.o.transmit(f);
      }
    }
  }

  forget(ip: Ip4): void {
    this.entries.delete(ip);
  }

  /** Hold a frame (copied) until `ip` resolves; its destination MAC is written then. */
  enqueue(ip: Ip4, frame: Uint8Array): void {
    let p = this.pending.get(ip);
    if (p === undefined) {
      if (this.pending.size >= (this.o.maxPendingNeighbors ?? 256)) {
        this.o.counters.inc('arp.drop.pending_full');
        return;
      }
      // Copy the frame before soliciting: the ARP request may be built in the very buffer the
      // caller lent us (the gateway fragments into the buffer it also builds ARP in).
      const np: Pending = { frames: [frame.slice()], tries: 0, timer: this.o.clock.timer(() => this.retry(ip, np)) };
      this.pending.set(ip, np);
      this.solicit(ip, np);
      return;
    }
    if (p.frames.length >= (this.o.maxQueuedPerNeighbor ?? 64)) {
      this.o.counters.inc('arp.drop.queue_full');
      return;
    }
    p.frames.push(frame.slice());
  }

  private solicit(ip: Ip4, p: Pending): void {
    p.tries++;
    this.o.counters.inc('arp.tx_request');
    this.o.solicit(ip);
    p.timer.arm(this.o.retryMs ?? 1000);
  }

  private retry(ip: Ip4, p: Pending): void {
    if (this.pending.get(ip) !== p) return;
    if (p.tries >= (this.o.retries ?? 3)) {
      this.pending.delete(ip);
      this.o.counters.inc('arp.drop.unresolved', p.frames.length);
      return;
    }
    this.solicit(ip, p);
  }

  private evict(now: number): void {
    for (const [k, e] of this.entries) if (e.expires < now) this.entries.delete(k);
    // Still full: drop the oldest insertion (Map keeps insertion order).
    if (this.entries.size >= this.maxEntries) {
      const first = this.entries.keys().next();
      if (!first.done) this.entries.delete(first.value);
    }
  }

  list(): { ip: Ip4; mac: Mac; expires: number }[] {
    return [...this.entries].map(([ip, e]) => ({ ip, mac: e.mac, expires: e.expires }));
  }

  clear(): void {
    for (const p of this.pending.values()) p.timer.cancel();
    this.pending.clear();
    this.entries.clear();
  }
}
