/**
 * The virtual CDC ACM serial device in a real guest: the project's default image booted under
 * QEMU TCG (as test/e2e/agent-usb.test.ts does), a UsbIpServer on the host's loopback serving
 * a SerialDevice bridged to a unix socket, imported through the guest agent's usbAttach. The
 * guest kernel's stock cdc_acm driver binds it as /dev/ttyACM0, and bytes cross both ways:
 * the guest's `echo` arrives on the host socket, the host's writes arrive at a guest `head -c`;
 * a larger transfer each way checks order and backpressure (md5 on both sides).
 *
 * The default image does not carry cdc-acm.ko (src/image/default-image.ts LATER_MODULES has no
 * `cdc_acm`), so this test takes it from the same Debian kernel package (apt-get download,
 * unpacked on the host, cached under <test cache>/agent-modules/<release>/) and puts it with
 * the fresh agent in a second cpio archive appended to the initramfs; the guest insmods it.
 * Its only dependency, usbcore, is in the image (vhci_hcd needs it).
 */
import { type ChildProcess, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { cpioNewc } from '../../src/image/cpio.js';
import { type DefaultImage, ImageUnavailableError, buildDefaultImage, readDefaultImage } from '../../src/image/default-image.js';
import { SerialDevice, listenSerialSocket, type SerialListener } from '../../usb/devices/serial.js';
import { UsbIpServer } from '../../usb/server.js';
import { collect, ensureAgentBuilt, until } from '../helpers/agent.js';
import { cacheRoot } from '../helpers/guest/image.js';
import { readModule } from '../helpers/guest/kmod.js';
import { spawnImageWithAgent } from '../helpers/agent-guest.js';
import { hasCommand } from '../helpers/netns.js';

const run = promisify(execFile);
const HOME = process.env.TENDER_TEST_IMAGE_HOME || '/var/tmp/tender-test-image';

async function availability(): Promise<{ image: DefaultImage } | { why: string }> {
  if (!(await hasCommand('qemu-system-x86_64'))) return { why: 'qemu-system-x86_64 missing' };
  const have = readDefaultImage(HOME);
  if (have) return { image: have };
  try {
    return { image: await buildDefaultImage({ home: HOME }) };
  } catch (e) {
    if (e instanceof ImageUnavailableError) return { why: e.message };
    throw e;
  }
}

/** cdc-acm.ko of the image's kernel, from its Debian package (cached). */
async function cdcAcmModule(image: DefaultImage): Promise<Buffer> {
  const { package: pkg, release } = image.manifest.kernel;
  const dir = path.join(cacheRoot(), 'agent-modules', release);
  const cached = path.join(dir, 'cdc-acm.ko');
  if (fs.existsSync(cached)) return fs.readFileSync(cached);
  fs.mkdirSync(dir, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(path.dirname(dir), '.dl-'));
  try {
    await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', pkg], { cwd: tmp, timeout: 600_000 });
    const deb = fs.readdirSync(tmp).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} produced no package`);
    const x = path.join(tmp, 'x');
    fs.mkdirSync(x);
    await run('dpkg-deb', ['-x', path.join(tmp, deb), x], { timeout: 300_000 });
    const found = [`lib/modules/${release}`, `usr/lib/modules/${release}`]
      .flatMap((m) => ['', '.xz', '.zst', '.gz'].map((z) => path.join(x, m, 'kernel/drivers/usb/class', `cdc-acm.ko${z}`)))
      .find((p) => fs.existsSync(p));
    if (!found) throw new Error(`no cdc-acm module in ${pkg}`);
    const data = readModule(found);
    fs.writeFileSync(cached + '.tmp', data);
    fs.renameSync(cached + '.tmp', cached);
    return data;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

const avail = await availability();
const why = 'why' in avail ? avail.why : null;
if (why) console.warn(`usb-serial: skipped: ${why}`);

const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('hex');

describe.skipIf(why !== null)('CDC ACM serial device in a guest', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-usb-serial-'));
  const agentSock = path.join(dir, 'agent.sock');
  const ttySock = path.join(dir, 'tty.sock');
  const server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => console.warn(m, o) } });
  const device = new SerialDevice({ busid: '99-1', busnum: 99, devnum: 1 });
  let listener: SerialListener;
  let usbPort = 0;
  let proc: ChildProcess | undefined;
  let serial = '';
  let client: AgentClient;
  let host: net.Socket;
  let received = Buffer.alloc(0);

  async function sh(script: string): Promise<{ out: string; err: string; code: number | null }> {
    const h = client.exec(['sh', '-c', script]);
    const [out, st, err] = await Promise.all([collect(h.stdout), h.exit, collect(h.stderr)]);
    return { out: out.toString(), err: err.toString(), code: st.code };
  }

  async function waitGuest(script: string, what: string, totalMs = 30_000): Promise<string> {
    const end = Date.now() + totalMs;
    for (;;) {
      const r = await sh(script);
      if (r.code === 0) return r.out;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${r.out}${r.err}\nserial:\n${serial}`);
      await new Promise((res) => setTimeout(res, 200));
    }
  }

  beforeAll(async () => {
    if (why) return;
    const image = (avail as { image: DefaultImage }).image;
    server.add(device);
    usbPort = (await server.listen(0, '127.0.0.1')).port;
    listener = await listenSerialSocket(device, ttySock);

    const agent = fs.readFileSync(ensureAgentBuilt());
    const acm = await cdcAcmModule(image);
    const base = fs.readFileSync(image.initrd);
    const pad = Buffer.alloc((4 - (base.length % 4)) % 4);
    const extra = gzipSync(
      cpioNewc([
        { kind: 'file', path: 'sbin/tender-agent', data: agent, mode: 0o755 },
        { kind: 'dir', path: 'tender' },
        { kind: 'file', path: 'tender/cdc-acm.ko', data: acm, mode: 0o644 },
      ]),
    );
    const initrd = path.join(dir, 'initrd.gz');
    fs.writeFileSync(initrd, Buffer.concat([base, pad, extra]));
    const p = spawnImageWithAgent({ image, initrd, agentSock, onOutput: (t) => (serial += t) });
    proc = p;

    await until(() => fs.existsSync(agentSock), 'the agent chardev socket', 30_000, 50);
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(agentSock, () => resolve(s));
      s.once('error', reject);
    });
    client = new AgentClient(sock);
    await Promise.race([client.ready, new Promise((_, rej) => setTimeout(() => rej(new Error(`no HELLO; serial:\n${serial}`)), 90_000))]);
    // usbcore comes with the usbip modules the init loads after DHCP.
    await until(() => /TENDER-MODULES loaded/.test(serial), `the usbip modules; serial:\n${serial}`, 90_000, 100);
    // The default image loads cdc_acm itself now; an image built before that gets the module here.
    const ins = await sh('grep -q "^cdc_acm " /proc/modules || insmod /tender/cdc-acm.ko');
    expect(ins.code, ins.out + ins.err).toBe(0);

    host = net.connect(ttySock);
    host.on('data', (b: Buffer) => (received = Buffer.concat([received, b])));
    await new Promise((r) => host.once('connect', r));
    await until(() => device.connected, 'the host client to be bridged', 5_000, 10);
  }, 180_000);

  afterAll(async () => {
    host?.destroy();
    client?.close();
    proc?.kill('SIGKILL');
    await listener?.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('cdc_acm binds the device: /dev/ttyACM0 appears', async () => {
    const a = await client.usbAttach({ host: '10.0.2.2', port: usbPort, busid: '99-1' });
    expect(a.devid).toBe((99 << 16) | 1);
    await waitGuest('test -c /dev/ttyACM0', '/dev/ttyACM0');
    const drv = await sh('basename $(readlink /sys/class/tty/ttyACM0/device/driver)');
    expect(drv.out.trim()).toBe('cdc_acm');
  }, 60_000);

  test('stty sets the line coding on the device', async () => {
    const r = await sh('stty -F /dev/ttyACM0 115200 raw -echo');
    expect(r.code, r.err).toBe(0);
    expect(device.lineCoding).toMatchObject({ rate: 115200, dataBits: 8, parity: 0, stopBits: 0 });
  });

  test('guest → host: echo hello > /dev/ttyACM0 arrives on the socket', async () => {
    received = Buffer.alloc(0);
    const r = await sh('echo hello > /dev/ttyACM0');
    expect(r.code, r.err).toBe(0);
    await until(() => received.length >= 6, `"hello" on the host socket (got ${JSON.stringify(received.toString())})`, 20_000, 20);
    expect(received.toString()).toBe('hello\n');
  });

  test('host → guest: socket writes arrive at head -c in the guest', async () => {
    const reader = sh('head -c 11 /dev/ttyACM0');
    // The bytes wait in the device until the guest's cdc_acm has read URBs in flight.
    host.write('hello guest');
    const r = await reader;
    expect(r.code, r.err).toBe(0);
    expect(r.out).toBe('hello guest');
  }, 30_000);

  test('200 KB each way, in order (md5 on both sides)', async () => {
    const n = 200_000;
    const data = Buffer.alloc(n);
    for (let i = 0; i < n; i++) data[i] = (i * 131 + (i >> 8)) & 0xff;
    const reader = sh(`head -c ${n} /dev/ttyACM0 | md5sum`);
    host.write(data);
    const r = await reader;
    expect(r.out.split(' ')[0]).toBe(md5(data));

    received = Buffer.alloc(0);
    const w = await sh(`head -c ${n} /dev/urandom > /tmp/x && cat /tmp/x > /dev/ttyACM0 && md5sum /tmp/x`);
    expect(w.code, w.err).toBe(0);
    await until(() => received.length >= n, `${n} bytes on the host socket (got ${received.length})`, 30_000, 20);
    expect(received.length).toBe(n);
    expect(md5(received)).toBe(w.out.split(' ')[0]);
  }, 90_000);
});
