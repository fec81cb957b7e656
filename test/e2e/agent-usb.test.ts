/**
 * USB_ATTACH / USB_DETACH through the guest agent: the project's default image (Debian kernel,
 * busybox, the usbip modules its /init loads after DHCP) booted under QEMU TCG with user-mode
 * networking, whose 10.0.2.2 reaches the host's loopback where a UsbIpServer serves a virtual
 * disk. The host talks to the agent over the virtio-serial port; the agent does the import
 * handshake itself and hands the socket to vhci-hcd. Checked through exec in the guest: the
 * disk appears with the right size, a write lands in the host image, detach removes it; and
 * the error paths (unknown busid, refused connection, a server that never answers) come back
 * as USB_FAILED without stalling the agent.
 *
 * The freshly built agent replaces the image's /sbin/tender-agent through a second cpio
 * archive appended to the initramfs (the kernel unpacks them in order); the image is not
 * modified.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { AgentClient, AgentError } from '../../src/agent/client.js';
import { AgentErrorCode } from '../../src/agent/protocol.js';
import { cpioNewc } from '../../src/image/cpio.js';
import { FileBackend } from '../../usb/devices/scsi.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import { UsbIpServer } from '../../usb/server.js';
import { collect, ensureAgentBuilt, until } from '../helpers/agent.js';
import { spawnImageWithAgent } from '../helpers/agent-guest.js';
import { defaultImageFor } from '../helpers/cli.js';


const { image: defaultImage, why } = await defaultImageFor('agent-usb', { anyInstalled: true });

const DEVID = (99 << 16) | 1;
const USB_SPEED_HIGH = 3;
const ECONNREFUSED = 111;
const ETIMEDOUT = 110;

describe.skipIf(why !== null)('USB attach and detach through the guest agent', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-agent-usb-'));
  const imgPath = path.join(dir, 'disk.img');
  const sockPath = path.join(dir, 'agent.sock');
  const server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => console.warn(m, o) } });
  const silent = net.createServer(() => {}); // accepts, never answers
  const silentConns: net.Socket[] = [];
  // A server that does not speak USB/IP properly: the reply depends on the busid asked for.
  const liar = net.createServer((c) => {
    let got = Buffer.alloc(0);
    c.on('error', () => {});
    c.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length < 40) return;
      const busid = got.subarray(8, 40).toString().replace(/\0+$/, '');
      const header = Buffer.from([0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0]);
      const record = Buffer.alloc(312);
      record.write('x-y', 256); // a device record for another busid
      if (busid === 'garbage') c.end(Buffer.alloc(8, 0xff));
      else if (busid === 'short') c.end(Buffer.concat([header, record.subarray(0, 100)]));
      else c.end(Buffer.concat([header, record]));
    });
  });
  let backend: FileBackend;
  let original: Buffer;
  let usbPort = 0;
  let proc: ChildProcess | undefined;
  let serial = '';
  let client: AgentClient;
  let vhciPort = -1;

  async function sh(script: string): Promise<{ out: string; code: number | null }> {
    const h = client.exec(['sh', '-c', script]);
    const [out, st] = await Promise.all([collect(h.stdout), h.exit, collect(h.stderr)]);
    return { out: out.toString(), code: st.code };
  }

  async function waitGuest(script: string, what: string, totalMs = 30_000): Promise<string> {
    const end = Date.now() + totalMs;
    for (;;) {
      const r = await sh(script);
      if (r.code === 0) return r.out;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${r.out}\nserial:\n${serial}`);
      await new Promise((res) => setTimeout(res, 200));
    }
  }

  beforeAll(async () => {
    if (why) return;
    const image = defaultImage!;
    original = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < original.length; i += 4) original.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(imgPath, original);
    backend = await FileBackend.open(imgPath, false);
    server.add(new StorageDevice(backend, { busid: '99-1', busnum: 99, devnum: 1 }));
    usbPort = (await server.listen(0, '127.0.0.1')).port;
    silent.on('connection', (s) => silentConns.push(s));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    await new Promise<void>((r) => liar.listen(0, '127.0.0.1', r));

    const agent = fs.readFileSync(ensureAgentBuilt());
    const base = fs.readFileSync(image.initrd);
    const pad = Buffer.alloc((4 - (base.length % 4)) % 4);
    const extra = gzipSync(cpioNewc([{ kind: 'file', path: 'sbin/tender-agent', data: agent, mode: 0o755 }]));
    const initrd = path.join(dir, 'initrd.gz');
    fs.writeFileSync(initrd, Buffer.concat([base, pad, extra]));
    const p = spawnImageWithAgent({ image, initrd, agentSock: sockPath, onOutput: (t) => (serial += t) });
    proc = p;

    const sock = await until(() => fs.existsSync(sockPath), 'the agent chardev socket', 30_000, 50).then(
      () => new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(sockPath, () => resolve(s));
        s.once('error', reject);
      }),
    );
    client = new AgentClient(sock);
    await Promise.race([
      client.ready,
      new Promise((_, rej) => setTimeout(() => rej(new Error(`no HELLO; serial:\n${serial}`)), 90_000)),
    ]);
    // The init loads the usbip modules after DHCP; the agent is up before that.
    await until(() => /TENDER-MODULES loaded/.test(serial), `the usbip modules; serial:\n${serial}`, 90_000, 100);
  }, 180_000);

  afterAll(async () => {
    client?.close();
    proc?.kill('SIGKILL');
    for (const s of silentConns) s.destroy();
    await new Promise((r) => silent.close(r));
    await new Promise((r) => liar.close(r));
    await server.close();
    await backend?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('usbAttach imports the disk and attaches it to a high-speed vhci port', async () => {
    const a = await client.usbAttach({ host: '10.0.2.2', port: usbPort, busid: '99-1' });
    expect(a).toEqual({ port: expect.any(Number), devid: DEVID, speed: USB_SPEED_HIGH });
    vhciPort = a.port;
  });

  test('the port is in use on the high-speed hub, with the speed and devid of the device', async () => {
    // Right after attach the port is VDEV_ST_NOTASSIGNED (2); vhci marks it VDEV_ST_USED (6)
    // and only then prints speed and devid, once the hub driver addressed the device.
    const row = await waitGuest(
      `awk '$1 == "hs" && $2 + 0 == ${vhciPort} && $3 + 0 == 6 { print; ok = 1 } END { exit !ok }' /sys/devices/platform/vhci_hcd.0/status`,
      'the port to be in use',
    );
    const [, , , spd, dev] = row.trim().split(/\s+/);
    expect(Number(spd), row).toBe(USB_SPEED_HIGH);
    expect(parseInt(dev!, 16), row).toBe(DEVID);
  });

  test('the guest sees a disk of the right size', async () => {
    const out = await waitGuest('cat /sys/block/sd*/size', 'the disk to appear');
    expect(out.trim()).toBe(String(original.length / 512));
  });

  test('data written in the guest lands in the host image', async () => {
    const r = await sh("printf 'written through the agent' | dd of=/dev/sda bs=512 seek=10 conv=sync,notrunc,fsync 2>&1; sync");
    expect(r.code, r.out).toBe(0);
    const now = fs.readFileSync(imgPath);
    expect(now.subarray(10 * 512, 10 * 512 + 25).toString()).toBe('written through the agent');
    expect(now.subarray(10 * 512 + 25, 11 * 512).every((b) => b === 0)).toBe(true);
    expect(now.subarray(0, 10 * 512).equals(original.subarray(0, 10 * 512))).toBe(true);
  });

  test('errors: unknown busid, device busy, connection refused', async () => {
    const unknown = await client.usbAttach({ host: '10.0.2.2', port: usbPort, busid: '99-9' }).catch((e: AgentError) => e);
    expect(unknown).toBeInstanceOf(AgentError);
    expect(unknown).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_IMPORT_REFUSED });
    expect((unknown as Error).message).toMatch(/status 4/);

    const busy = await client.usbAttach({ host: '10.0.2.2', port: usbPort, busid: '99-1' }).catch((e: AgentError) => e);
    expect(busy).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_IMPORT_REFUSED });
    expect((busy as Error).message).toMatch(/status 2/);

    // A port nothing listens on: slirp answers the guest's SYN with a RST.
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const closedPort = (closed.address() as net.AddressInfo).port;
    await new Promise((r) => closed.close(r));
    const refused = await client.usbAttach({ host: '10.0.2.2', port: closedPort, busid: '99-1' }).catch((e: AgentError) => e);
    expect(refused).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_FAILED, errno: ECONNREFUSED });

    const bad = await client.usbAttach({ host: 'not-an-address', port: usbPort, busid: '99-1' }).catch((e: AgentError) => e);
    expect(bad).toMatchObject({ code: 'AGENT_REJECTED', agentCode: AgentErrorCode.BAD_PAYLOAD });
  });

  test('bad replies: not OP_REP_IMPORT, cut short, another busid: refused, the agent unharmed', async () => {
    const port = (liar.address() as net.AddressInfo).port;
    const attempt = (busid: string) => client.usbAttach({ host: '10.0.2.2', port, busid }).catch((e: AgentError) => e);
    expect(await attempt('garbage')).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_IMPORT_REFUSED, message: expect.stringMatching(/not an OP_REP_IMPORT/) });
    expect(await attempt('short')).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_IMPORT_REFUSED, message: expect.stringMatching(/closed the connection/) });
    expect(await attempt('other')).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_IMPORT_REFUSED, message: expect.stringMatching(/another busid/) });
    expect(await client.ping()).toBeGreaterThan(0);
    // Nothing was attached: every high-speed port is still free.
    const status = (await sh('cat /sys/devices/platform/vhci_hcd.0/status')).out;
    const used = status.split('\n').filter((l) => /^hs\s/.test(l) && Number(l.trim().split(/\s+/)[2]) !== 4);
    expect(used.length, status).toBe(1); // only the disk attached above
  });

  test('a server that never answers: the import times out, the agent keeps serving meanwhile', async () => {
    const silentPort = (silent.address() as net.AddressInfo).port;
    const order: string[] = [];
    const attach = client.usbAttach({ host: '10.0.2.2', port: silentPort, busid: '99-1' }).then(
      () => order.push('attached'),
      (e: AgentError) => {
        order.push('attach-failed');
        return e;
      },
    );
    await until(() => silentConns.length > 0, 'the guest to connect to the silent server', 20_000, 20);
    // The handshake is pending in the agent; exec and ping still get answers.
    const r = await sh('echo alive');
    expect(r.out).toBe('alive\n');
    await client.ping();
    order.push('served');
    const e = await attach;
    expect(order).toEqual(['served', 'attach-failed']);
    expect(e).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_FAILED, errno: ETIMEDOUT });
  }, 40_000);

  test('usbDetach removes the disk', async () => {
    expect(vhciPort).toBeGreaterThanOrEqual(0);
    await client.usbDetach(vhciPort);
    await waitGuest('! ls /sys/block/sd* >/dev/null 2>&1', 'the disk to go away');
    // The port is free again (VDEV_ST_NULL) once vhci's event thread has cleaned up.
    await waitGuest(`awk '$1 == "hs" && $2 + 0 == ${vhciPort} && $3 + 0 == 4 { ok = 1 } END { exit !ok }' /sys/devices/platform/vhci_hcd.0/status`, 'the port to be free');
    // Detaching a port that holds nothing: the kernel says EINVAL, the agent reports it.
    const e = await client.usbDetach(vhciPort).catch((x: AgentError) => x);
    expect(e).toMatchObject({ code: 'USB_FAILED', agentCode: AgentErrorCode.USB_FAILED, errno: 22 });
  });

  test('attach again after detach, on a free port', async () => {
    // The server sees the detach as a hang-up and frees the device for the next import.
    const a = await waitForAttach();
    expect(a.devid).toBe(DEVID);
    const out = await waitGuest('cat /sys/block/sd*/size', 'the disk to reappear');
    expect(out.trim()).toBe(String(original.length / 512));
    await client.usbDetach(a.port);
  });

  async function waitForAttach() {
    const end = Date.now() + 20_000;
    for (;;) {
      try {
        return await client.usbAttach({ host: '10.0.2.2', port: usbPort, busid: '99-1' });
      } catch (e) {
        // The server may not have noticed the previous connection's end yet (device busy).
        if (Date.now() > end || !(e instanceof AgentError) || e.agentCode !== AgentErrorCode.USB_IMPORT_REFUSED) throw e;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  }
});
