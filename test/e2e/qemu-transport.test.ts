/**
 * Frame transports against a real QEMU 7.2 virtio-net, with nothing of tender but the link
 * under test: the guest (Debian kernel + busybox, TCG) configures each NIC statically and
 * runs arping and ping towards a peer address; on our side a hand-built responder answers
 * ARP and ICMP echo (test/helpers/guest/responder.ts). The guest reports what it got back.
 *
 * One QEMU boot serves the whole file (boot is seconds under TCG): one NIC per transport,
 * told apart in the guest by MAC address.
 *   NIC A: -netdev stream, unix socket, QEMU is the client  -> StreamLink.listen
 *   NIC B: -netdev stream, TCP, QEMU is the server          -> StreamLink.connect
 *   NIC C: -netdev dgram, unix datagram sockets             -> DatagramLink.connect
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Counters } from '../../netstack/counters.js';
import type { Link } from '../../netstack/link/link.js';
import { DatagramLink } from '../../netstack/link/datagram.js';
import { StreamLink } from '../../netstack/link/stream.js';
import { guestAvailability } from '../helpers/guest/image.js';
import { type Guest, type GuestResult, startGuest } from '../helpers/guest/qemu.js';
import { arpIcmpResponder } from '../helpers/guest/responder.js';

const guest = await guestAvailability();
if (!guest.ok) console.warn(`qemu-transport: skipped: ${guest.reason}`);

const A = { mac: '52:54:00:00:00:0a', guest: '192.168.127.2/24', peer: '192.168.127.1', peerMac: '02:00:00:00:00:01', mtu: 9000 };
const B = { mac: '52:54:00:00:00:0b', guest: '192.168.128.2/24', peer: '192.168.128.1', peerMac: '02:00:00:00:00:02', mtu: 1500 };
const C = { mac: '52:54:00:00:00:0c', guest: '192.168.129.2/24', peer: '192.168.129.1', peerMac: '02:00:00:00:00:03', mtu: 1500 };

/** The guest side: configure each NIC found by MAC, then arping and ping its peer. */
function guestScript(nics: { tag: string; mac: string; guest: string; peer: string; mtu: number; bigPing: boolean }[]): string {
  const lines = [
    'ifname() { for d in /sys/class/net/*; do [ "$(cat $d/address)" = "$1" ] && { echo ${d##*/}; return 0; }; done; return 1; }',
    'waitif() { i=0; while ! ifname $1 >/dev/null; do i=$((i+1)); [ $i -gt 100 ] && return 1; usleep 50000; done; ifname $1; }',
  ];
  for (const n of nics) {
    lines.push(
      `n=$(waitif ${n.mac}) || tender-result ${n.tag}.if=missing`,
      `ip link set $n mtu ${n.mtu} && ip link set $n up && ip addr add ${n.guest} dev $n`,
    );
  }
  // The NICs are checked in parallel (arping waits a second between probes).
  for (const n of nics) {
    const t = n.tag;
    lines.push(
      '(',
      `n=$(ifname ${n.mac})`,
      `arping -c 2 -w 5 -I $n ${n.peer} > /tmp/arping.${t} 2>&1; tender-result ${t}.arping=$?`,
      `tender-result "${t}.arping_out=$(grep -i received /tmp/arping.${t})"`,
      `ping -c 3 -i 0.2 -W 3 ${n.peer} > /tmp/ping.${t} 2>&1; tender-result ${t}.ping=$?`,
      `tender-result "${t}.ping_out=$(grep transmitted /tmp/ping.${t})"`,
    );
    if (n.bigPing) {
      // 8000 bytes of payload: larger than any guarantee about where socket reads split
      // the stream, so frames may straddle chunks on our side.
      lines.push(`ping -c 3 -i 0.2 -W 3 -s 8000 ${n.peer} > /tmp/bigping.${t} 2>&1; tender-result ${t}.bigping=$?`);
    }
    lines.push(') &');
  }
  lines.push('wait');
  return lines.join('\n') + '\n';
}

function freeTcpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** QEMU opens its server socket at startup; retry until it accepts (bounded). */
async function connectWithRetry(host: string, port: number, opts: ConstructorParameters<typeof StreamLink>[1]): Promise<StreamLink> {
  let last: unknown;
  for (let i = 0; i < 200; i++) {
    try {
      return await StreamLink.connect({ host, port }, opts);
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw last;
}

function serve(link: Link, ip: string, mac: string) {
  const r = arpIcmpResponder(ip, mac);
  link.attach({
    frame: (f) => {
      const reply = r.handle(f);
      if (reply) link.send(reply);
    },
  });
  return r.stats;
}

const title = guest.ok ? 'QEMU 7.2 transports' : `QEMU 7.2 transports (skipped: ${guest.reason})`;

describe.skipIf(!guest.ok)(title, () => {
  const counters = new Counters();
  let dir: string;
  const servers: net.Server[] = [];
  const links: Link[] = [];
  let vm: Guest;
  let res: GuestResult;
  let statsA: ReturnType<typeof serve>;
  let statsB: ReturnType<typeof serve>;
  let statsC: ReturnType<typeof serve>;
  let linkA: StreamLink;
  let linkB: StreamLink;
  let linkC: DatagramLink;

  beforeAll(async () => {
    if (!guest.ok) return;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-qemu-t-'));
    const sockA = path.join(dir, 'a.sock');
    // QEMU 7.2 cannot reconnect: our listener must exist before QEMU starts.
    const la = await StreamLink.listen({ path: sockA }, { name: 'qemu-a', mtu: A.mtu, counters });
    servers.push(la.server);
    const portB = await freeTcpPort();
    // QEMU binds local.path (qemuC) at startup and sends to remote.path (oursC): ours must
    // exist first; QEMU's does not yet, so the link learns it from QEMU's first datagram.
    const qemuC = path.join(dir, 'c-qemu.sock');
    const oursC = path.join(dir, 'c-ours.sock');
    linkC = DatagramLink.connect(oursC, qemuC, { name: 'qemu-c', mtu: C.mtu, counters });
    links.push(linkC);
    statsC = serve(linkC, C.peer, C.peerMac);

    const nics = [
      { tag: 'a', ...A, bigPing: true },
      { tag: 'b', ...B, bigPing: false },
      { tag: 'c', ...C, bigPing: false },
    ];
    vm = startGuest({
      image: guest.image,
      script: guestScript(nics),
      timeoutMs: 60_000,
      net: { type: 'stream', path: sockA },
      mac: A.mac,
      extraArgs: [
        '-netdev', `stream,id=n1,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=${portB}`,
        '-device', `virtio-net-device,netdev=n1,mac=${B.mac}`,
        '-netdev', `dgram,id=n2,local.type=unix,local.path=${qemuC},remote.type=unix,remote.path=${oursC}`,
        '-device', `virtio-net-device,netdev=n2,mac=${C.mac}`,
      ],
    });
    // A QEMU that fails to start must fail the test now, not leave us waiting to connect.
    const exited = vm.done.then((r) => {
      throw new Error(`QEMU exited (${r.exitCode ?? r.signal}): ${r.stderr.trim()}`);
    });
    exited.catch(() => {});
    linkA = await Promise.race([la.accepted, exited]);
    links.push(linkA);
    statsA = serve(linkA, A.peer, A.peerMac);
    linkB = await connectWithRetry('127.0.0.1', portB, { name: 'qemu-b', mtu: B.mtu, counters });
    links.push(linkB);
    statsB = serve(linkB, B.peer, B.peerMac);
    res = await vm.done;
    console.log(
      `guest: /init after ${res.bootMs?.toFixed(0)} ms wall (${res.guestBootUptime} s guest uptime), ` +
        `ready after ${res.readyMs?.toFixed(0)} ms; results ${JSON.stringify(res.results)}`,
    );
  }, 90_000);

  afterAll(() => {
    vm?.kill();
    for (const l of links) l.close();
    for (const s of servers) s.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the guest booted, ran the script and powered off', () => {
    expect(res.timedOut, `serial: ${res.serial}\nstderr: ${res.stderr}\nargs: ${vm.args.join(' ')}`).toBe(false);
    expect(res.scriptStatus, res.serial).toBe(0);
    expect(res.serial).toContain('TENDER-DONE');
  });

  test('stream over unix, QEMU as client: ARP and ICMP echo both ways, jumbo frames', async () => {
    expect(res.results['a.arping'], res.serial).toBe('0');
    expect(res.results['a.ping'], res.serial).toBe('0');
    expect(res.results['a.ping_out']).toMatch(/3 packets transmitted, 3 packets received/);
    expect(res.results['a.bigping'], res.serial).toBe('0');
    expect(statsA.arpRequests).toBeGreaterThanOrEqual(2);
    expect(statsA.echoRequests).toBeGreaterThanOrEqual(6);
    expect(statsA.maxFrame).toBe(14 + 20 + 8 + 8000);
    expect(linkA.stats.rxFrames).toBe(statsA.frames);
    expect(linkA.stats.txDrops).toBe(0);
    // QEMU exited: our end sees the close (maybe a moment after the process exit event).
    for (let i = 0; i < 200 && linkA.downReason === null; i++) await new Promise((r) => setTimeout(r, 10));
    expect(linkA.downReason).toBe('peer closed');
  });

  test('stream over TCP, QEMU as server: ARP and ICMP echo both ways', () => {
    expect(res.results['b.arping'], res.serial).toBe('0');
    expect(res.results['b.ping'], res.serial).toBe('0');
    expect(res.results['b.ping_out']).toMatch(/3 packets transmitted, 3 packets received/);
    expect(statsB.echoRequests).toBeGreaterThanOrEqual(3);
    expect(linkB.stats.txDrops).toBe(0);
  });

  test('dgram over unix datagram sockets: ARP and ICMP echo both ways', () => {
    expect(res.results['c.arping'], res.serial).toBe('0');
    expect(res.results['c.ping'], res.serial).toBe('0');
    expect(res.results['c.ping_out']).toMatch(/3 packets transmitted, 3 packets received/);
    expect(statsC.echoRequests).toBeGreaterThanOrEqual(3);
    expect(linkC.peer).toBe(path.join(dir, 'c-qemu.sock'));
    expect(linkC.stats.txDrops).toBe(0);
  });

  test('no framing errors or drops were counted', () => {
    const snap = counters.snapshot();
    expect(Object.keys(snap).filter((k) => k.includes('.drop.'))).toEqual([]);
    // QEMU's dgram socket did not exist yet at connect(): the peer came from its first datagram.
    expect(snap['dgram.peer_learned']).toBe(1);
  });
});
