/**
 * The default image booted by the QEMU driver under TCG, wired to a real tender Network over
 * `-netdev dgram`: the guest's /init brings eth0 up with udhcpc, which must get its lease from
 * tender's DHCP server with the hostname from the kernel command line; the guest agent (when
 * it was built) says HELLO on the virtio-serial socket; QMP system_powerdown reaches /init
 * through the ACPI power button and the machine powers off. Then two cheap QEMU runs (killed
 * or failing before the guest matters): a SIGKILL from outside is noticed by the instance
 * that started it and by one that adopted it, and a QEMU that cannot start says why.
 *
 * One guest boot for the file. The image is built once per machine under
 * $TENDER_TEST_IMAGE_HOME (default /var/tmp/tender-test-image) and reused.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { DatagramLink } from '../../netstack/link/datagram.js';
import { Network } from '../../netstack/network.js';
import type { MachineSpec, VmmInstance } from '../../src/vmm/driver.js';
import { QemuDriver, VmmStartError } from '../../src/vmm/qemu.js';
import { defaultImageFor } from '../helpers/cli.js';

const MAC = '52:54:00:7e:57:01';
const HOSTNAME = 'boot-t';

const { image: defaultImage, why } = await defaultImageFor('machine-boot');

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, f: () => T | undefined | null, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = f();
    if (v !== undefined && v !== null) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** The agent's first frame: u32 length | u8 type | u32 stream | payload (native/agent/protocol.h). */
function parseHello(b: Buffer): { version: number; agent: string; kernel: string; hostname: string } | null {
  if (b.length < 9) return null;
  const len = b.readUInt32BE(0);
  if (b.length < 4 + len) return null;
  if (b[4] !== 0x01 || b.readUInt32BE(5) !== 0) throw new Error(`first frame is type ${b[4]} on stream ${b.readUInt32BE(5)}, not HELLO`);
  let o = 9;
  const version = b.readUInt16BE(o);
  o += 2;
  const str = () => {
    const n = b.readUInt32BE(o);
    const s = b.toString('utf8', o + 4, o + 4 + n);
    o += 4 + n;
    return s;
  };
  return { version, agent: str(), kernel: str(), hostname: str() };
}

describe.skipIf(why !== null)(`default image on QEMU (TCG)${why ? ` (skipped: ${why})` : ''}`, () => {
  const image = defaultImage!;
  const driver = new QemuDriver();
  let dir: string;
  let network: Network;
  let link: DatagramLink;
  let spec: MachineSpec;
  let vm: VmmInstance;
  let startMs = 0;
  let leaseMs = 0;
  const extra: VmmInstance[] = [];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-boot-t-'));
    network = new Network();
    const qemuSock = path.join(dir, 'net.qemu');
    const tenderSock = path.join(dir, 'net.tender');
    spec = {
      name: HOSTNAME,
      dir,
      cpus: 1,
      memoryMiB: 256,
      kernel: image.kernel,
      initrd: image.initrd,
      cmdline: [...image.cmdline, `tender.hostname=${HOSTNAME}`],
      accel: 'tcg',
      net: { kind: 'dgram', mac: MAC, localPath: qemuSock, remotePath: tenderSock },
      agent: { kind: 'virtio-serial', path: path.join(dir, 'agent.sock') },
      serialLog: path.join(dir, 'serial.log'),
      controlSocket: path.join(dir, 'qmp.sock'),
    };
    // tender binds remotePath and sends to QEMU's localPath (learned from QEMU's first datagram if not bound yet).
    link = DatagramLink.connect(tenderSock, qemuSock, { name: 'boot-t' });
    network.addLink(link);
    const t0 = performance.now();
    vm = await driver.start(spec);
    startMs = performance.now() - t0;
    await until('a DHCP lease for the guest', () => network.dhcp.leases().find((l) => l.mac === MAC), 90_000);
    leaseMs = performance.now() - t0;
    // The server binds the lease when it sends the ACK; the guest logs it a moment later.
    await until('the lease in the serial log', () => (/^TENDER-LEASE /m.test(fs.readFileSync(spec.serialLog, 'utf8')) ? true : null), 30_000);
    console.log(`machine-boot: QMP up after ${startMs.toFixed(0)} ms, lease after ${leaseMs.toFixed(0)} ms (TCG, ${os.cpus().length} cores, load ${os.loadavg()[0]!.toFixed(1)})`);
  }, 120_000);

  afterAll(async () => {
    for (const v of [vm, ...extra]) if (v) await v.kill();
    link?.close();
    network?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the guest gets its lease from tender, with the hostname from the command line', () => {
    const lease = network.dhcp.leases().find((l) => l.mac === MAC)!;
    expect(lease.hostname).toBe(HOSTNAME);
    expect(lease.ip).toMatch(/^\d+\.\d+\.\d+\.\d+$/);
    const serial = fs.readFileSync(spec.serialLog, 'utf8');
    expect(serial).toMatch(/^TENDER-BOOT uptime=/m);
    expect(serial).toContain(`TENDER-LEASE ip=${lease.ip} `);
    expect(serial).not.toMatch(/TENDER-ERROR/);
  });

  test('the modules loaded after DHCP (USB/IP, storage, 9p, ext4) all load', async () => {
    const log = () => fs.readFileSync(spec.serialLog, 'utf8');
    await until('TENDER-MODULES', () => (/TENDER-MODULES loaded/.test(log()) ? true : null), 20_000).catch((e: Error) => {
      throw new Error(`${e.message}; serial log:\n${log()}`);
    });
    expect(log()).not.toMatch(/TENDER-ERROR/);
  }, 90_000);

  test.skipIf(!image.agent)('the agent says HELLO on the virtio-serial socket', async () => {
    const sock = net.createConnection(path.join(dir, 'agent.sock'));
    let buf = Buffer.alloc(0);
    sock.on('data', (b) => (buf = Buffer.concat([buf, b])));
    sock.on('error', () => {});
    try {
      const hello = await until('HELLO from the agent', () => parseHello(buf), 30_000);
      expect(hello.version).toBe(1);
      expect(hello.hostname).toBe(HOSTNAME);
      expect(hello.kernel).toBe(image.manifest.kernel.release);
    } finally {
      sock.destroy();
    }
  });

  test('adopting the running QEMU finds it; a stale or foreign pid is refused', async () => {
    const again = await new QemuDriver({ adoptQmpTimeoutMs: 300 }).adopt(spec, vm.pid);
    expect(again).not.toBeNull();
    extra.push(again!);
    expect(await driver.adopt(spec, process.pid)).toBeNull(); // alive, but not this machine's QEMU
    expect(await driver.adopt(spec, 0x3ffffff)).toBeNull();
  });

  test('shutdown() powers the guest off through the ACPI power button', async () => {
    const info = await vm.shutdown(60_000);
    expect(info).toEqual({ code: 0, signal: null, reason: 'powered off' });
    expect(await vm.exited).toBe(info);
    expect(fs.readFileSync(spec.serialLog, 'utf8')).toContain('TENDER-DOWN poweroff');
    expect((await extra[0]!.exited).reason).toMatch(/exit|powered off/);
  }, 90_000);

  test('QEMU killed from outside: noticed by its starter and by an adopter', async () => {
    const s2: MachineSpec = { ...spec, name: 'kill-t', net: { kind: 'none' }, agent: { kind: 'none' }, controlSocket: path.join(dir, 'qmp2.sock'), serialLog: path.join(dir, 'serial2.log') };
    const v = await driver.start(s2);
    extra.push(v);
    const adopted = await new QemuDriver({ pollMs: 50, adoptQmpTimeoutMs: 300 }).adopt(s2, v.pid);
    expect(adopted).not.toBeNull();
    extra.push(adopted!);
    process.kill(v.pid, 'SIGKILL');
    expect(await v.exited).toEqual({ code: null, signal: 'SIGKILL', reason: 'killed by SIGKILL' });
    expect((await adopted!.exited).reason).toBe('QEMU exited (started by an earlier tender daemon: exit status unknown)');
  }, 60_000);

  test('kill() stops a running QEMU at once', async () => {
    const s3: MachineSpec = { ...spec, name: 'quit-t', net: { kind: 'none' }, agent: { kind: 'none' }, controlSocket: path.join(dir, 'qmp3.sock'), serialLog: path.join(dir, 'serial3.log') };
    const v = await driver.start(s3);
    extra.push(v);
    expect(await v.kill()).toEqual({ code: 0, signal: null, reason: 'stopped by force' });
  }, 60_000);

  test('a QEMU that cannot start: VmmStartError with its own message', async () => {
    const s4: MachineSpec = { ...spec, name: 'fail-t', kernel: path.join(dir, 'no-such-kernel'), net: { kind: 'none' }, agent: { kind: 'none' }, controlSocket: path.join(dir, 'qmp4.sock') };
    // A QEMU that starts after all is detached: track it so afterAll kills it.
    const track = (v: VmmInstance) => (extra.push(v), v);
    const err = await driver.start(s4).then(track, (e: unknown) => e);
    expect(err).toBeInstanceOf(VmmStartError);
    expect((err as Error).message).toMatch(/QEMU did not start: QEMU exited with status 1: .*no-such-kernel/);
    // A stream listener that is not there is refused before QEMU runs (QEMU 7.2 would run on with a dead NIC).
    const s5: MachineSpec = { ...s4, kernel: spec.kernel, net: { kind: 'stream', mac: MAC, path: path.join(dir, 'nobody-listens.sock') } };
    await expect(driver.start(s5).then(track)).rejects.toThrow(/no network listener at .*nobody-listens\.sock/);
  }, 60_000);

  test('--accel auto resolves to something that boots, with a warning when it is TCG', async () => {
    const r = await new QemuDriver({ probe: { timeoutMs: 15_000 } }).resolveAccel({ ...spec, accel: 'auto' });
    if (r.accel === 'tcg') expect(r.warning).toMatch(/TCG \(slow\)$/);
    else expect(r).toEqual({ accel: 'kvm' });
    console.log(`machine-boot: accel auto -> ${r.accel}${r.warning ? ` (${r.warning})` : ''}`);
  }, 30_000);
});
