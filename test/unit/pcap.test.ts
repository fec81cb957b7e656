/**
 * PcapWriter and CaptureLink, read back by tshark (the real reader users will point at the file).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { Counters } from '../../netstack/counters.js';
import { ChannelLink } from '../../netstack/link/memory.js';
import { CaptureLink, PcapWriter, capture } from '../../netstack/link/pcap.js';

// Captured with tcpdump on the host end of a veth whose other end sat in a network
// namespace (10.77.0.2) that ran `ping -c 1 10.77.0.1` and `dig @10.77.0.1 example.com A`
// (no DNS server listening, hence the port unreachable).
const REAL = {
  // ARP who-has 10.77.0.1 tell 10.77.0.2
  arpRequest: 'ffffffffffff267eb9a3038808060001080006040001267eb9a303880a4d00020000000000000a4d0001',
  // ARP 10.77.0.1 is-at 12:16:30:c7:96:5b
  arpReply: '267eb9a30388121630c7965b08060001080006040002121630c7965b0a4d0001267eb9a303880a4d0002',
  // ICMP echo request 10.77.0.2 > 10.77.0.1, id 19040 seq 1, 56 bytes of data
  echoRequest:
    '121630c7965b267eb9a303880800450000546b4a40004001bac20a4d00020a4d000108008b204a6000012f410c6b0000000026ff010000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637',
  // ICMP echo reply
  echoReply:
    '267eb9a30388121630c7965b0800450000542f8c0000400136810a4d00010a4d0002000093204a6000012f410c6b0000000026ff010000000000101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637',
  // UDP 10.77.0.2.48455 > 10.77.0.1.53: A? example.com. with EDNS
  dnsQuery:
    '121630c7965b267eb9a30388080045000050380d000040112df40a4d00020a4d0001bd470035003c14ea230e01200001000000000001076578616d706c6503636f6d000001000100002904d000000000000c000a0008f17b76433d586588',
  // ICMP port unreachable quoting the query
  portUnreachable:
    '267eb9a30388121630c7965b080045c0006c2f8f0000400135a60a4d00010a4d0002030328060000000045000050380d000040112df40a4d00020a4d0001bd470035003c14ea230e01200001000000000001076578616d706c6503636f6d000001000100002904d000000000000c000a0008f17b76433d586588',
};
const frames = Object.values(REAL).map((h) => Uint8Array.from(Buffer.from(h, 'hex')));
const protocols = [
  'eth:ethertype:arp',
  'eth:ethertype:arp',
  'eth:ethertype:ip:icmp:data',
  'eth:ethertype:ip:icmp:data',
  'eth:ethertype:ip:udp:dns',
  'eth:ethertype:ip:icmp:ip:udp:dns',
];

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-pcap-t-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

interface TsharkPacket {
  _source: { layers: Record<string, Record<string, unknown>> };
}

/** tshark's view of a file: per packet the frame layer fields (strings) and status. */
function tshark(file: string): { status: number | null; stderr: string; frames: Record<string, unknown>[]; raw: string[] } {
  const r = spawnSync('tshark', ['-r', file, '-T', 'json', '-x'], { encoding: 'utf8', maxBuffer: 1 << 26 });
  const pkts = r.stdout.trim() ? (JSON.parse(r.stdout) as TsharkPacket[]) : [];
  return {
    status: r.status,
    stderr: r.stderr,
    frames: pkts.map((p) => p._source.layers.frame!),
    raw: pkts.map((p) => (p._source.layers.frame_raw as unknown as string[])[0]!),
  };
}

const T0 = Date.UTC(2024, 0, 2, 3, 4, 5) + 0.123456; // ms, with sub-µs digits

describe('PcapWriter', () => {
  test.each([
    ['microsecond', false],
    ['nanosecond', true],
  ])('%s file: tshark reads every frame with its length, protocols and timestamp', async (_, nanosecond) => {
    const file = path.join(dir, `real-${nanosecond ? 'ns' : 'us'}.pcap`);
    let t = T0;
    const w = await PcapWriter.open(file, { nanosecond, now: () => (t += 1.5) });
    for (const f of frames) w.write(f);
    await w.close();
    expect(w.stats).toEqual({ records: frames.length, bytes: frames.reduce((a, f) => a + f.length, 0), drops: 0 });

    const head = fs.readFileSync(file).subarray(0, 24);
    expect(head.readUInt32LE(0)).toBe(nanosecond ? 0xa1b23c4d : 0xa1b2c3d4);
    expect([head.readUInt16LE(4), head.readUInt16LE(6)]).toEqual([2, 4]);
    expect(head.readUInt32LE(16)).toBe(262144);
    expect(head.readUInt32LE(20)).toBe(1);

    const r = tshark(file);
    expect(r.status, r.stderr).toBe(0);
    expect(r.frames.map((f) => f['frame.protocols'])).toEqual(protocols);
    expect(r.frames.map((f) => Number(f['frame.len']))).toEqual(frames.map((f) => f.length));
    expect(r.frames.map((f) => Number(f['frame.cap_len']))).toEqual(frames.map((f) => f.length));
    // First record at T0 + 1.5 ms: 2024-01-02 03:04:05.001623456. A double holding epoch
    // milliseconds resolves ~0.25 µs, so nanosecond files are exact only to that.
    const epoch = String(r.frames[0]!['frame.time_epoch']);
    expect(epoch).toMatch(nanosecond ? /^1704164645\.0016235\d\d$/ : /^1704164645\.001623(000)?$/);
    expect(r.raw).toEqual(Object.values(REAL));
  });

  test('a record cut short at the end of the file leaves every earlier record readable', async () => {
    const file = path.join(dir, 'cut.pcap');
    const w = await PcapWriter.open(file);
    for (const f of frames) w.write(f);
    await w.close();
    const full = fs.statSync(file).size;
    // As if the process died in the middle of writing the last record (header, then bytes).
    for (const cut of [5, frames[5]!.length, frames[5]!.length + 10]) {
      fs.truncateSync(file, full - cut);
      const r = tshark(file);
      expect(r.frames.map((f) => f['frame.protocols'])).toEqual(protocols.slice(0, 5));
      expect(r.stderr).toMatch(/cut short|truncated/i);
    }
  });

  test('frames longer than the snaplen are truncated, keeping their original length', async () => {
    const file = path.join(dir, 'snap.pcap');
    const w = await PcapWriter.open(file, { snaplen: 60 });
    w.write(frames[2]!);
    await w.close();
    const r = tshark(file);
    expect(Number(r.frames[0]!['frame.len'])).toBe(98);
    expect(Number(r.frames[0]!['frame.cap_len'])).toBe(60);
  });

  test('when the disk cannot keep up, whole records are dropped and counted, the file stays valid', async () => {
    const file = path.join(dir, 'backlog.pcap');
    const counters = new Counters();
    const w = await PcapWriter.open(file, { maxBuffered: 1000, counters });
    // All in one tick: nothing can be written before the buffer bound is hit.
    for (let i = 0; i < 50; i++) w.write(frames[i % frames.length]!);
    expect(w.stats.drops).toBeGreaterThan(0);
    expect(w.stats.records + w.stats.drops).toBe(50);
    expect(counters.get('pcap.drop.backlog')).toBe(w.stats.drops);
    await w.flush();
    // Once flushed, there is room again.
    w.write(frames[0]!);
    await w.close();
    const r = tshark(file);
    expect(r.status, r.stderr).toBe(0);
    expect(r.frames.length).toBe(w.stats.records);
  });

  test('frames written after close are dropped; close is idempotent', async () => {
    const file = path.join(dir, 'closed.pcap');
    const w = await PcapWriter.open(file);
    w.write(frames[0]!);
    const c1 = w.close();
    w.write(frames[1]!);
    await Promise.all([c1, w.close()]);
    expect(w.stats).toMatchObject({ records: 1, drops: 1 });
    expect(tshark(file).frames.length).toBe(1);
  });

  test('a failing disk is an error on the writer, not an exception in the stack', async () => {
    const counters = new Counters();
    const w = await PcapWriter.open('/dev/full', { counters });
    w.write(frames[0]!);
    await w.flush();
    expect(w.error?.message).toMatch(/ENOSPC/);
    w.write(frames[1]!);
    await w.close();
    expect(counters.get('pcap.drop.io_error')).toBe(2);
    expect(w.stats.records).toBe(0);
  });

  test('many chunks: records across chunk boundaries stay in order', async () => {
    const file = path.join(dir, 'many.pcap');
    const w = await PcapWriter.open(file, { maxBuffered: 64 << 20 });
    const big = new Uint8Array(9000);
    big.set(frames[2]!);
    for (let i = 0; i < 100; i++) {
      big[60] = i; // inside the ICMP data
      w.write(big);
      if (i % 17 === 0) await new Promise((r) => setImmediate(r)); // let writes interleave
    }
    await w.close();
    const buf = fs.readFileSync(file);
    let o = 24;
    for (let i = 0; i < 100; i++) {
      expect(buf.readUInt32LE(o + 8)).toBe(9000);
      expect(buf[o + 16 + 60]).toBe(i);
      o += 16 + 9000;
    }
    expect(o).toBe(buf.length);
  });
});

describe('CaptureLink', () => {
  test('records both directions in order and passes frames through untouched', async () => {
    const file = path.join(dir, 'link.pcap');
    let t = T0;
    const w = await PcapWriter.open(file, { now: () => (t += 1) });
    const dev = new ChannelLink('dev0', 1500);
    const link = capture(dev, w);
    expect(link).toBeInstanceOf(CaptureLink);
    expect(link.name).toBe('dev0');
    expect(link.mtu).toBe(1500);
    const got: Uint8Array[] = [];
    let batches = 0;
    let down = '';
    link.attach({ frame: (f) => got.push(f.slice()), batchEnd: () => batches++, down: (r) => (down = r) });

    dev.inject(frames[0]!); // from the device: ARP request
    link.send(frames[1]!); // to the device: ARP reply
    dev.inject(frames[2]!, frames[4]!);
    link.send(frames[3]!);
    expect(got).toEqual([frames[0], frames[2], frames[4]]);
    expect(batches).toBe(2);
    expect(dev.take()).toEqual([frames[1], frames[3]]);
    expect(link.stats).toBe(dev.stats);
    link.close();
    expect(down).toBe('closed');
    await w.close();

    const r = tshark(file);
    expect(r.frames.map((f) => f['frame.protocols'])).toEqual([protocols[0], protocols[1], protocols[2], protocols[4], protocols[3]]);
  });
});
