/**
 * The learning switch, driven through ChannelLink/MemoryLink ports and a manual clock.
 * Expected behaviour is a Linux bridge with default settings (see switch.ts).
 */
import { beforeEach, describe, expect, it } from 'vitest';
import { BROADCAST_MAC, mac } from '../../netstack/addr.js';
import { Counters } from '../../netstack/counters.js';
import { ChannelLink, MemoryLink } from '../../netstack/link/memory.js';
import { Switch } from '../../netstack/link/switch.js';
import { ManualClock } from '../../netstack/time.js';
import * as C from '../fixtures/captured.js';
import { ethFrame, hex, tagged, toHex } from '../helpers/frames.js';

const A = mac('02:00:00:00:00:0a');
const B = mac('02:00:00:00:00:0b');
const X = mac('02:00:00:00:00:0c');
const MCAST = mac('01:00:5e:00:00:fb');

function frame(dst: Uint8Array, src: Uint8Array, tag = 0): Uint8Array {
  const f = ethFrame(dst, src, 0x0800, new Uint8Array(46));
  f[f.length - 1] = tag;
  return f;
}

let clock: ManualClock;
let counters: Counters;
let sw: Switch;
let p1: ChannelLink;
let p2: ChannelLink;
let p3: ChannelLink;

beforeEach(() => {
  clock = new ManualClock();
  counters = new Counters();
  sw = new Switch({ clock, counters });
  p1 = new ChannelLink('p1');
  p2 = new ChannelLink('p2');
  p3 = new ChannelLink('p3');
  for (const l of [p1, p2, p3]) sw.addPort(l);
});

const counts = () => [p1.out.length, p2.out.length, p3.out.length];
const takeAll = () => [p1.take(), p2.take(), p3.take()];

describe('Switch', () => {
  it('floods broadcast to every port except the ingress one, unchanged', () => {
    const f = frame(BROADCAST_MAC, A, 7);
    p1.inject(f);
    expect(counts()).toEqual([0, 1, 1]);
    expect(toHex(p2.out[0]!)).toBe(toHex(f));
    expect(counters.get('switch.flood')).toBe(1);
  });

  it('floods multicast and unknown unicast; never hairpins', () => {
    p1.inject(frame(MCAST, A));
    expect(counts()).toEqual([0, 1, 1]);
    takeAll();
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 1, 1]);
    expect(counters.get('switch.flood_unknown')).toBe(1);
  });

  it('learns source MACs and forwards known unicast to one port only', () => {
    p2.inject(frame(BROADCAST_MAC, B));
    takeAll();
    p1.inject(frame(B, A, 1));
    expect(counts()).toEqual([0, 1, 0]);
    expect(p2.out[0]![59]).toBe(1);
    p2.inject(frame(A, B));
    expect(counts()).toEqual([1, 1, 0]);
    expect(counters.get('switch.forward')).toBe(2);
    const t = sw.macTable().sort((a, b) => a.port - b.port);
    expect(t.map((e) => [e.mac, e.port])).toEqual([['02:00:00:00:00:0a', 1], ['02:00:00:00:00:0b', 2]]);
  });

  it('filters a frame whose destination sits behind the ingress port', () => {
    p1.inject(frame(BROADCAST_MAC, A));
    p1.inject(frame(BROADCAST_MAC, X));
    takeAll();
    p1.inject(frame(X, A));
    expect(counts()).toEqual([0, 0, 0]);
    expect(counters.get('switch.filtered')).toBe(1);
  });

  it('follows a MAC that moves to another port', () => {
    p2.inject(frame(BROADCAST_MAC, B));
    p3.inject(frame(BROADCAST_MAC, B)); // B moved (e.g. a VM migrated to another link)
    takeAll();
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 0, 1]);
    expect(sw.macTable().find((e) => e.mac === '02:00:00:00:00:0b')!.port).toBe(3);
  });

  it('stays correct when a MAC it has cached for a port moves, comes back, or loses its port', () => {
    // Each port remembers the last source and destination it saw (switch.ts): repeat traffic
    // from p1 to B, then change the table under that cache.
    const port3 = sw.addPort(new ChannelLink('p4'));
    const l4 = port3.link as ChannelLink;
    p2.inject(frame(BROADCAST_MAC, B));
    takeAll();
    p1.inject(frame(B, A));
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 2, 0]);
    takeAll();
    l4.inject(frame(BROADCAST_MAC, B)); // B moves to the fourth port
    takeAll();
    l4.take();
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 0, 0]);
    expect(l4.out.length).toBe(1);
    l4.take();
    // A shows up behind p3, then talks from p1 again: learned back on p1.
    p3.inject(frame(BROADCAST_MAC, A));
    expect(sw.macTable().find((e) => e.mac === '02:00:00:00:00:0a')!.port).toBe(3);
    takeAll();
    l4.take();
    p1.inject(frame(B, A));
    expect(sw.macTable().find((e) => e.mac === '02:00:00:00:00:0a')!.port).toBe(1);
    l4.take();
    // The port B sits behind goes away: B is unknown again and frames to it are flooded.
    port3.remove();
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 1, 1]);
    expect(l4.out.length).toBe(0);
  });

  it('ages entries out after 300 s and floods again', () => {
    p2.inject(frame(BROADCAST_MAC, B));
    takeAll();
    clock.advance(300_000);
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 1, 0]); // exactly 300 s: still valid
    takeAll();
    clock.advance(1);
    expect(sw.macTable().find((e) => e.mac === '02:00:00:00:00:0b')!.ageMs).toBe(300_001);
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 1, 1]);
    expect(counters.get('switch.flood_unknown')).toBe(1);
    // Traffic from B refreshes the entry.
    takeAll();
    p2.inject(frame(A, B));
    clock.advance(200_000);
    p1.inject(frame(B, A));
    expect(counts()).toEqual([1, 1, 0]);
  });

  it('honours a custom ageing time', () => {
    sw = new Switch({ clock, counters, ageingMs: 1000 });
    const [q1, q2, q3] = [new ChannelLink(), new ChannelLink(), new ChannelLink()];
    for (const l of [q1, q2, q3]) sw.addPort(l);
    q2.inject(frame(BROADCAST_MAC, B));
    clock.advance(1001);
    q1.inject(frame(B, A));
    expect(q3.out.length).toBe(2);
  });

  it('forgets the MACs of a removed port and stops sending to it', () => {
    const port2 = sw.addPort(new ChannelLink('p4'));
    const l4 = port2.link as ChannelLink;
    l4.inject(frame(BROADCAST_MAC, B));
    takeAll();
    port2.remove();
    expect(sw.portCount).toBe(3);
    expect(sw.macTable().some((e) => e.mac === '02:00:00:00:00:0b')).toBe(false);
    p1.inject(frame(B, A));
    expect(counts()).toEqual([0, 1, 1]);
    expect(l4.out.length).toBe(0);
    // A removed port's link is dead: its input is ignored.
    l4.inject(frame(BROADCAST_MAC, X));
    expect(counts()).toEqual([0, 1, 1]);
    port2.remove(); // idempotent
  });

  it('detaches a port whose link goes down by itself and tells onPortDown', () => {
    const downs: string[] = [];
    sw = new Switch({ clock, counters, onPortDown: (p, why) => downs.push(`${p.id}:${why}`) });
    const [swSide, vm] = MemoryLink.pair();
    const [swSide2, vm2] = MemoryLink.pair();
    sw.addPort(swSide);
    sw.addPort(swSide2);
    const got: Uint8Array[] = [];
    vm2.attach({ frame: (f) => got.push(f.slice()) });
    vm.attach({ frame: () => {} });
    vm.send(frame(BROADCAST_MAC, A));
    expect(got.length).toBe(1);
    vm.close();
    expect(downs).toEqual(['1:peer closed']);
    expect(counters.get('switch.port_down')).toBe(1);
    expect(sw.portCount).toBe(1);
    vm2.send(frame(A, B));
    expect(got.length).toBe(1);
  });

  it('drops and counts runts and multicast source MACs without learning them', () => {
    p1.inject(new Uint8Array(13));
    expect(counters.get('switch.drop.runt')).toBe(1);
    p1.inject(frame(BROADCAST_MAC, MCAST));
    p1.inject(frame(BROADCAST_MAC, BROADCAST_MAC));
    expect(counters.get('switch.drop.bad_src_mac')).toBe(2);
    expect(counts()).toEqual([0, 0, 0]);
    expect(sw.macTable()).toEqual([]);
    // A bare 14-byte header is a valid (if useless) frame for a bridge.
    p1.inject(frame(BROADCAST_MAC, A).subarray(0, 14));
    expect(counts()).toEqual([0, 1, 1]);
  });

  it('forwards 802.1Q-tagged frames by MAC, byte for byte', () => {
    const t = tagged(hex(C.ECHO_REQUEST_TO_1), 10);
    p1.inject(t); // dst 5a:94:ef:e4:0c:dd is unknown: flooded
    expect(toHex(p2.out[0]!)).toBe(toHex(t));
    takeAll();
    p2.inject(tagged(hex(C.ECHO_REPLY_FROM_1), 10)); // from 5a:94..., learned on port 2
    takeAll();
    p1.inject(t);
    expect(counts()).toEqual([0, 1, 0]);
    expect(toHex(p2.out[0]!)).toBe(toHex(t));
  });

  it('bounds the MAC table and evicts aged entries to make room', () => {
    sw = new Switch({ clock, counters, maxMacs: 4 });
    const [q1, q2, q3] = [new ChannelLink(), new ChannelLink(), new ChannelLink()];
    for (const l of [q1, q2, q3]) sw.addPort(l);
    for (let i = 0; i < 10; i++) q1.inject(frame(BROADCAST_MAC, mac(`02:00:00:00:01:${i.toString(16).padStart(2, '0')}`)));
    expect(sw.macTable().length).toBe(4);
    expect(counters.get('switch.learn_table_full')).toBe(6);
    // Frames from unlearned sources are still forwarded (flooded), only not learned.
    expect(q2.out.length).toBe(10);
    // Frames to an unlearned MAC are flooded; a learned one still forwards.
    q3.inject(frame(mac('02:00:00:00:01:00'), X));
    expect(q2.out.length).toBe(10);
    clock.advance(300_001);
    q2.inject(frame(BROADCAST_MAC, B));
    expect(sw.macTable().map((e) => e.mac)).toEqual(['02:00:00:00:00:0b']);
  });

  it('calls flush once per ingress batch on links that have it, and only on ports that got frames', () => {
    sw = new Switch({ clock, counters });
    const flushes: string[] = [];
    class Flushing extends ChannelLink {
      flush(): void {
        flushes.push(this.name);
      }
    }
    const [q1, q2, q3] = [new Flushing('q1'), new Flushing('q2'), new Flushing('q3')];
    for (const l of [q1, q2, q3]) sw.addPort(l);
    q2.inject(frame(BROADCAST_MAC, B));
    flushes.length = 0;
    q1.inject(frame(B, A), frame(B, A), frame(B, A));
    expect(flushes).toEqual(['q2']);
  });

  it('close() removes and closes every port', () => {
    let closed = 0;
    const l = new ChannelLink();
    l.close = () => void closed++;
    sw.addPort(l);
    sw.close();
    expect(sw.portCount).toBe(0);
    expect(closed).toBe(1);
  });
});
