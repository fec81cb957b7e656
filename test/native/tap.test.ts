/**
 * TAP creation and TapLink against the Linux kernel in a namespace this test creates.
 * Frames are built by hand below; the kernel is the peer (ARP, ICMP echo, UDP burst).
 */
import { execFileSync, spawn } from 'node:child_process';
import { closeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTap, isNativeError, type NativeError } from '../../native/index.js';
import { TapLink } from '../../netstack/link/tap.js';
import { checksum } from '../../netstack/wire/checksum.js';
import { addNetns, delNetns, isRoot, nsExec, nsName, run, waitFor } from '../helpers/netns.js';

const NS = nsName('tap');

interface IpLink {
  ifname: string;
  mtu: number;
  address: string;
  flags: string[];
  ifindex: number;
  stats64?: { rx: { packets: number } };
}

async function linkShow(ns: string, ifname: string): Promise<IpLink | null> {
  try {
    const out = await nsExec(ns, ['ip', '-s', '-j', 'link', 'show', ifname]);
    return (JSON.parse(out) as IpLink[])[0] ?? null;
  } catch {
    return null;
  }
}

function thrown(f: () => unknown): NativeError {
  try {
    f();
  } catch (e) {
    if (isNativeError(e)) return e;
    throw e;
  }
  throw new Error('did not throw');
}

// --- hand-built frames ------------------------------------------------------------------

const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s.replace(/[\s:]/g, ''), 'hex'));
const ipBytes = (s: string): number[] => s.split('.').map(Number);

const GUEST_MAC = '02:00:00:00:00:02'; // the TAP's own address (the kernel's side)
const OUR_MAC = '02:00:00:00:00:01'; // the stack's side
const GUEST_IP = '10.213.0.2';
const OUR_IP = '10.213.0.1';

function arpReply(): Uint8Array {
  const f = new Uint8Array(42);
  f.set(hex(GUEST_MAC), 0);
  f.set(hex(OUR_MAC), 6);
  f.set([0x08, 0x06], 12); // EtherType ARP
  f.set([0, 1, 0x08, 0x00, 6, 4, 0, 2], 14); // Ethernet/IPv4, hlen 6, plen 4, op 2 (reply)
  f.set(hex(OUR_MAC), 22);
  f.set(ipBytes(OUR_IP), 28);
  f.set(hex(GUEST_MAC), 32);
  f.set(ipBytes(GUEST_IP), 38);
  return f;
}

/** ICMP echo (type 8 request / 0 reply) from us to the guest, or a reply mirroring `req`. */
function icmpEcho(type: 0 | 8, id: number, seq: number, payload: Uint8Array): Uint8Array {
  const ipLen = 20 + 8 + payload.length;
  const f = new Uint8Array(14 + ipLen);
  f.set(hex(GUEST_MAC), 0);
  f.set(hex(OUR_MAC), 6);
  f.set([0x08, 0x00], 12);
  const ip = 14;
  f.set([0x45, 0, ipLen >> 8, ipLen & 255, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0], ip); // DF, TTL 64, ICMP
  f.set(ipBytes(OUR_IP), ip + 12);
  f.set(ipBytes(GUEST_IP), ip + 16);
  const c = checksum(f, ip, 20);
  f[ip + 10] = c >> 8;
  f[ip + 11] = c & 255;
  const icmp = ip + 20;
  f.set([type, 0, 0, 0, id >> 8, id & 255, seq >> 8, seq & 255], icmp);
  f.set(payload, icmp + 8);
  const ic = checksum(f, icmp, 8 + payload.length);
  f[icmp + 2] = ic >> 8;
  f[icmp + 3] = ic & 255;
  return f;
}

const etherType = (f: Uint8Array): number => (f[12]! << 8) | f[13]!;
const isArpRequestFor = (f: Uint8Array, ip: string): boolean =>
  etherType(f) === 0x0806 && f[21] === 1 && Buffer.from(f.subarray(38, 42)).equals(Buffer.from(ipBytes(ip)));
const isIcmp = (f: Uint8Array, type: number): boolean => etherType(f) === 0x0800 && f[23] === 1 && f[34] === type;

/** Collects copies of received frames (they are borrowed) and counts batches. */
class Collector {
  frames: Uint8Array[] = [];
  batches = 0;
  downReason: string | null = null;
  frame(f: Uint8Array): void {
    this.frames.push(f.slice());
  }
  batchEnd(): void {
    this.batches++;
  }
  down(r: string): void {
    this.downReason = r;
  }
  find(p: (f: Uint8Array) => boolean): Uint8Array | undefined {
    return this.frames.find(p);
  }
}

describe.skipIf(!isRoot)('native TAP', () => {
  beforeAll(async () => {
    await addNetns(NS);
    // Keep IPv6 autoconfiguration chatter (RS, MLD) out of the frame counts below.
    await nsExec(NS, ['sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
  });
  afterAll(async () => {
    await delNetns(NS);
  });

  it('creates a TAP inside a namespace by name with the given name, MTU and MAC, up', async () => {
    const dev = createTap({ name: 'tt0', mtu: 1400, mac: '02:11:22:33:44:55', netns: { name: NS } });
    try {
      expect(dev.name).toBe('tt0');
      expect(dev.fd).toBeGreaterThan(2);
      const l = await linkShow(NS, 'tt0');
      expect(l).not.toBeNull();
      expect(l!.mtu).toBe(1400);
      expect(l!.address).toBe('02:11:22:33:44:55');
      expect(l!.flags).toContain('UP');
      expect(l!.ifindex).toBe(dev.ifindex);
      // Not in our own namespace.
      await expect(run('ip', ['link', 'show', 'tt0'])).rejects.toThrow();
    } finally {
      closeSync(dev.fd);
    }
    // The device lives as long as its fd (no TUNSETPERSIST).
    await waitFor(async () => (await linkShow(NS, 'tt0')) === null, 5000);
  });

  it('finds the namespace by path and by pid, and honours up: false and a Uint8Array MAC', async () => {
    const byPath = createTap({ name: 'tt1', netns: { path: `/var/run/netns/${NS}` }, up: false, mac: new Uint8Array([2, 0, 0, 0, 0, 9]) });
    try {
      const l = await linkShow(NS, 'tt1');
      expect(l!.flags).not.toContain('UP');
      expect(l!.address).toBe('02:00:00:00:00:09');
      expect(l!.mtu).toBe(1500);
    } finally {
      closeSync(byPath.fd);
    }
    const sleeper = spawn('ip', ['netns', 'exec', NS, 'sleep', '30'], { stdio: 'ignore' });
    try {
      // `ip netns exec` execs sleep in place: same pid, already inside the namespace once it runs.
      await waitFor(async () => (await run('readlink', [`/proc/${sleeper.pid}/exe`])).stdout.includes('sleep'), 5000, 20);
      const byPid = createTap({ name: 'tt2', netns: { pid: sleeper.pid! } });
      try {
        expect(await linkShow(NS, 'tt2')).not.toBeNull();
      } finally {
        closeSync(byPid.fd);
      }
    } finally {
      sleeper.kill();
    }
  });

  it('reports a missing namespace as ENOENT and bad arguments as EINVAL before any syscall', () => {
    const e = thrown(() => createTap({ name: 'tt3', netns: { name: 'tender-t-does-not-exist' } }));
    expect(e.code).toBe('ENOENT');
    expect(e.errno).toBe(-2);
    expect(e.syscall).toBe('open');
    expect(e.path).toBe('/var/run/netns/tender-t-does-not-exist');

    expect(thrown(() => createTap({ name: 'waytoolongname16' })).code).toBe('EINVAL');
    expect(thrown(() => createTap({ name: 'a/b' })).message).toMatch(/invalid interface name/);
    expect(thrown(() => createTap({ name: 'ok', mtu: 65536 })).code).toBe('EINVAL');
    expect(thrown(() => createTap({ name: 'ok', mac: '01:00:5e:00:00:01' })).code).toBe('EINVAL');
    expect(thrown(() => createTap({ name: 'ok', netns: { name: '../etc' } })).code).toBe('EINVAL');
    expect(thrown(() => createTap({ name: 'ok', netns: { pid: -1 } })).code).toBe('EINVAL');
    // Names taken: by another kind of device (EINVAL), by a TAP someone holds open (EBUSY).
    const lo = thrown(() => createTap({ name: 'lo', netns: { name: NS } }));
    expect([lo.code, lo.syscall]).toEqual(['EINVAL', 'ioctl(TUNSETIFF)']);
    const held = createTap({ name: 'tt5', netns: { name: NS } });
    try {
      const busy = thrown(() => createTap({ name: 'tt5', netns: { name: NS } }));
      expect([busy.code, busy.syscall]).toEqual(['EBUSY', 'ioctl(TUNSETIFF)']);
    } finally {
      closeSync(held.fd);
    }
    // A file that is not a network namespace: the kernel's setns says EINVAL.
    const notNs = thrown(() => createTap({ name: 'tt4', netns: { path: '/proc/self/ns/uts' } }));
    expect(notNs.code).toBe('EINVAL');
    expect(notNs.syscall).toBe('setns');
  });

  describe('TapLink with the kernel as the peer', () => {
    let link: TapLink;
    const rx = new Collector();

    beforeAll(async () => {
      link = TapLink.open({ ifname: 'tl0', netns: { name: NS }, mtu: 1500, mac: GUEST_MAC });
      link.attach(rx);
      await nsExec(NS, ['ip', 'addr', 'add', `${GUEST_IP}/24`, 'dev', 'tl0']);
    });
    afterAll(() => link.close());

    it('receives the kernel ARP request and ICMP echo, and the kernel accepts our replies', async () => {
      expect(link.name).toBe('tl0');
      expect(link.ifindex).toBeGreaterThan(0);
      // The kernel pings our address: first an ARP request for it.
      // busybox ping: busybox is installed for the e2e tests anyway (iputils-ping may not be).
    const ping = run('ip', ['netns', 'exec', NS, 'busybox', 'ping', '-c1', '-W5', OUR_IP], { timeout: 10_000 });
      const arp = (await waitFor(() => rx.find((f) => isArpRequestFor(f, OUR_IP))))!;
      expect(Buffer.from(arp.subarray(6, 12)).equals(Buffer.from(hex(GUEST_MAC)))).toBe(true);
      link.send(arpReply());
      // With our MAC learned, the echo request comes.
      const req = (await waitFor(() => rx.find((f) => isIcmp(f, 8))))!;
      expect(Buffer.from(req.subarray(0, 6)).equals(Buffer.from(hex(OUR_MAC)))).toBe(true);
      // Answer it by hand: same id, sequence and payload.
      const id = (req[38]! << 8) | req[39]!;
      const seq = (req[40]! << 8) | req[41]!;
      link.send(icmpEcho(0, id, seq, req.subarray(42)));
      // ping exits 0 only if the kernel accepted our echo reply.
      const out = await ping;
      expect(out.stdout).toMatch(/1 packets received/);
    });

    it('writes an echo request into the TAP and the kernel answers it', async () => {
      const payload = new TextEncoder().encode('tender tap echo');
      link.send(icmpEcho(8, 0x4242, 7, payload));
      const rep = (await waitFor(() => rx.find((f) => isIcmp(f, 0) && f[38] === 0x42 && f[39] === 0x42)))!;
      expect(Buffer.from(rep.subarray(42)).toString()).toBe('tender tap echo');
      expect(link.stats.txFrames).toBeGreaterThanOrEqual(3);
      expect(link.stats.rxFrames).toBe(rx.frames.length);
    });

    it('drops oversize frames, and frames past the queue bound, and counts them', () => {
      const big = new Uint8Array(1500 + 18 + 1);
      link.send(big);
      expect(link.counters.get('tap.drop.oversize')).toBe(1);
      link.send(new Uint8Array(10));
      expect(link.counters.get('tap.drop.short')).toBe(1);
      expect(link.stats.txDrops).toBe(2);
    });
  });

  it('delivers a burst in few wake-ups: one JS callback carries many frames', async () => {
    const link = TapLink.open({ ifname: 'tl1', netns: { name: NS }, mtu: 1500, mac: '02:00:00:00:01:02' });
    try {
      await nsExec(NS, ['ip', 'addr', 'add', '10.214.0.2/24', 'dev', 'tl1']);
      await nsExec(NS, ['ip', 'neigh', 'replace', '10.214.0.1', 'lladdr', OUR_MAC, 'dev', 'tl1']);
      // Not attached yet, so nothing is read: the kernel queues the burst on the TAP
      // (txqueuelen 1000), and the first wake-up after attach finds it all there.
      const N = 300;
      await nsExec(NS, [
        '/usr/bin/python3',
        '-c',
        `import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(${N}): s.sendto(b'x'*100, ('10.214.0.1', 9))`,
      ]);
      const rx = new Collector();
      link.attach(rx);
      const isBurst = (f: Uint8Array): boolean => etherType(f) === 0x0800 && f[23] === 17 && f[36] === 0 && f[37] === 9;
      await waitFor(() => rx.frames.filter(isBurst).length === N);
      // Sanity check that batching exists (not a timing check): 64 frames per wake-up at most,
      // so about N / 64 callbacks, certainly fewer than frames.
      expect(rx.batches).toBeLessThan(rx.frames.length);
      expect(rx.batches).toBeGreaterThanOrEqual(Math.ceil(N / 64));
    } finally {
      link.close();
    }
  });

  // FrameIO reads one frame per wake-up while wake-ups bring lone small frames (a request/
  // response pattern: it saves the empty read after each); a burst must still arrive whole
  // and bring batching back within a few wake-ups (every 8th wake-up drains).
  it('after lone frames, still delivers a burst whole and goes back to batching', async () => {
    const link = TapLink.open({ ifname: 'tl4', netns: { name: NS }, mtu: 1500, mac: '02:00:00:00:04:02' });
    try {
      await nsExec(NS, ['ip', 'addr', 'add', '10.215.0.2/24', 'dev', 'tl4']);
      await nsExec(NS, ['ip', 'neigh', 'replace', '10.215.0.1', 'lladdr', OUR_MAC, 'dev', 'tl4']);
      const rx = new Collector();
      link.attach(rx);
      const toPort = (port: number) => (f: Uint8Array): boolean =>
        etherType(f) === 0x0800 && f[23] === 17 && f[36] === port >> 8 && f[37] === (port & 255);
      const send = (port: number, n: number) =>
        `import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(${n}): s.sendto(b'x', ('10.215.0.1', ${port}))`;
      // Lone frames: one datagram at a time, each received before the next is sent.
      for (let i = 1; i <= 12; i++) {
        await nsExec(NS, ['/usr/bin/python3', '-c', send(9, 1)]);
        await waitFor(() => rx.frames.filter(toPort(9)).length === i);
      }
      // The burst is queued on the TAP while this thread blocks (nothing can be read
      // meanwhile), so the next wake-ups find it all there.
      const N = 300;
      const before = rx.batches;
      execFileSync('ip', ['netns', 'exec', NS, '/usr/bin/python3', '-c', send(10, N)]);
      await waitFor(() => rx.frames.filter(toPort(10)).length === N);
      expect(rx.batches - before).toBeLessThanOrEqual(8 + Math.ceil(N / 64) + 2);
    } finally {
      link.close();
    }
  });

  it('drops frames written while the interface is down, and goes down when it is deleted', async () => {
    const link = TapLink.open({ ifname: 'tl3', netns: { name: NS } });
    const rx = new Collector();
    link.attach(rx);
    try {
      await nsExec(NS, ['ip', 'link', 'set', 'tl3', 'down']);
      // The kernel refuses writes to a TAP that is not up (EIO): drop and count, no throw.
      link.send(icmpEcho(8, 1, 1, new Uint8Array(8)));
      await waitFor(() => link.counters.get('tap.drop.tx_eio') === 1);
      expect(link.queued).toBe(0);
      await nsExec(NS, ['ip', 'link', 'del', 'tl3']);
      await waitFor(() => rx.downReason !== null);
      expect(rx.downReason).toMatch(/^tl3: EBADFD/);
      expect(link.counters.get('tap.rx_error.ebadfd')).toBe(1);
    } finally {
      link.close();
    }
  });

  it('sends many frames per flush, and bounds the queue', async () => {
    const link = TapLink.open({ ifname: 'tl2', netns: { name: NS }, mtu: 1500, txQueueFrames: 16 });
    try {
      link.attach(new Collector());
      const before = (await linkShow(NS, 'tl2'))!.stats64!.rx.packets;
      // 40 frames in one tick: 16 fit the queue, the rest are dropped and counted.
      const f = icmpEcho(8, 1, 1, new Uint8Array(32));
      for (let i = 0; i < 40; i++) link.send(f);
      expect(link.queued).toBe(16);
      expect(link.counters.get('tap.drop.queue_full')).toBe(24);
      await waitFor(() => link.queued === 0);
      expect(link.stats.txFrames).toBe(16);
      await waitFor(async () => (await linkShow(NS, 'tl2'))!.stats64!.rx.packets - before >= 16);
    } finally {
      link.close();
    }
    // close() is idempotent and sending afterwards drops.
    link.close();
    link.send(new Uint8Array(60));
    expect(link.counters.get('tap.drop.closed')).toBe(1);
  });
});
