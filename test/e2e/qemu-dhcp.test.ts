/**
 * The test guest's DHCP path and the stream transport under real traffic, with the Linux
 * kernel as the far end: QEMU's virtio-net <-> StreamLink <-> TapLink <-> a TAP in a network
 * namespace where dnsmasq serves DHCP and busybox httpd serves a file. No tender stack in
 * between: the two links are spliced frame for frame.
 *
 * Checks that `tender.ip=dhcp` in the guest (udhcpc + /etc/udhcpc.script) applies address,
 * router, DNS, domain and MTU, and that a few MiB cross StreamLink intact (TCP over it,
 * so loss or reordering in the link would show as a wrong checksum or a stall).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Counters } from '../../netstack/counters.js';
import type { Link } from '../../netstack/link/link.js';
import { StreamLink } from '../../netstack/link/stream.js';
import { TapLink } from '../../netstack/link/tap.js';
import { guestAvailability } from '../helpers/guest/image.js';
import { type GuestResult, startGuest } from '../helpers/guest/qemu.js';
import { addNetns, delNetns, hasCommand, isRoot, nsName, run } from '../helpers/netns.js';

const guest = await guestAvailability();
const why = !guest.ok ? guest.reason : !isRoot ? 'needs root (network namespaces)' : !(await hasCommand('dnsmasq')) ? 'dnsmasq missing' : null;
if (why) console.warn(`qemu-dhcp: skipped: ${why}`);

const FILE_BYTES = 3 * 1024 * 1024;

/** Frames one way are sent the other way, as a wire would. Frames are borrowed: send copies. */
function splice(a: Link, b: Link): void {
  a.attach({ frame: (f) => b.send(f), batchEnd: () => b.flush?.() });
  b.attach({ frame: (f) => a.send(f), batchEnd: () => a.flush?.() });
}

describe.skipIf(why !== null)(`QEMU guest DHCP and bulk TCP over the stream transport${why ? ` (skipped: ${why})` : ''}`, () => {
  const ns = nsName('qdhcp');
  const counters = new Counters();
  let dir: string;
  let tap: TapLink | undefined;
  let stream: StreamLink | undefined;
  const procs: ChildProcess[] = [];
  let res: GuestResult;
  let fileSha: string;

  beforeAll(async () => {
    if (!guest.ok) return;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-qdhcp-t-'));
    await addNetns(ns);
    tap = TapLink.open({ ifname: 'tq0', netns: { name: ns }, mtu: 1500, offload: false, counters });
    await run('ip', ['-n', ns, 'addr', 'add', '192.168.150.1/24', 'dev', 'tq0']);
    const www = path.join(dir, 'www');
    fs.mkdirSync(www);
    const data = randomBytes(FILE_BYTES);
    fileSha = createHash('sha256').update(data).digest('hex');
    fs.writeFileSync(path.join(www, 'f'), data);
    const dnsmasq = spawn('ip', [
      'netns', 'exec', ns, 'dnsmasq', '--no-daemon', '--conf-file=/dev/null', '--port=0',
      '--interface=tq0', '--bind-interfaces', `--dhcp-leasefile=${path.join(dir, 'leases')}`,
      '--dhcp-range=192.168.150.10,192.168.150.20,255.255.255.0,1h',
      '--dhcp-option=option:router,192.168.150.1', '--dhcp-option=option:dns-server,192.168.150.1',
      '--dhcp-option=option:domain-name,qemu.test', '--dhcp-option=option:mtu,1400',
    ], { stdio: 'ignore' });
    const httpd = spawn('ip', ['netns', 'exec', ns, 'busybox', 'httpd', '-f', '-p', '192.168.150.1:8080', '-h', www], { stdio: 'ignore' });
    procs.push(dnsmasq, httpd);

    const sock = path.join(dir, 'q.sock');
    const l = await StreamLink.listen({ path: sock }, { name: 'qemu', mtu: 1500, counters });
    const script = [
      'tender-result "addr=$(ip -4 -o addr show dev eth0 | awk \'{print $4}\')"',
      'tender-result "mtu=$(cat /sys/class/net/eth0/mtu)"',
      'tender-result "route=$(ip route show default)"',
      'tender-result "resolv=$(tr \'\\n\' \' \' < /etc/resolv.conf)"',
      'ping -c 2 -i 0.2 -W 3 192.168.150.1 >/dev/null 2>&1; tender-result ping=$?',
      'tender-result "sha=$(wget -q -O - http://192.168.150.1:8080/f | sha256sum | cut -d" " -f1)"',
    ].join('\n');
    const vm = startGuest({ image: guest.image, ip: 'dhcp', net: { type: 'stream', path: sock }, script, timeoutMs: 90_000 });
    const exited = vm.done.then((r) => {
      throw new Error(`QEMU exited (${r.exitCode ?? r.signal}): ${r.stderr.trim()}`);
    });
    exited.catch(() => {});
    stream = await Promise.race([l.accepted, exited]);
    l.server.close();
    splice(stream, tap);
    res = await vm.done;
    console.log(`guest ready after ${res.readyMs?.toFixed(0)} ms; results ${JSON.stringify(res.results)}`);
  }, 120_000);

  afterAll(async () => {
    for (const p of procs) p.kill();
    stream?.close();
    tap?.close();
    await delNetns(ns);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('udhcpc gets a lease from dnsmasq and the script applies every option', () => {
    expect(res.serial).toContain('TENDER-NET dhcp=ok');
    const lease = res.serial.split('\n').find((l) => l.startsWith('TENDER-LEASE'));
    expect(lease, res.serial).toMatch(/ip=192\.168\.150\.1\d mask=24 router=192\.168\.150\.1 dns=192\.168\.150\.1 domain=qemu\.test/);
    expect(res.results.addr).toMatch(/^192\.168\.150\.1\d\/24$/);
    expect(res.results.mtu).toBe('1400');
    expect(res.results.route).toMatch(/^default via 192\.168\.150\.1 dev eth0/);
    expect(res.results.resolv).toMatch(/domain qemu\.test.*nameserver 192\.168\.150\.1/);
    expect(res.results.ping).toBe('0');
  });

  test('a file downloaded over TCP through StreamLink arrives intact', () => {
    expect(res.results.sha, res.serial).toBe(fileSha);
    expect(stream!.stats.txBytes).toBeGreaterThan(FILE_BYTES);
    expect(Object.keys(counters.snapshot()).filter((k) => k.includes('.drop.'))).toEqual([]);
  });
});
