/**
 * The Linux kernel's own USB/IP client (vhci-hcd) importing tender's virtual disk: the
 * project's default image (Debian kernel, busybox, usbip_core/vhci_hcd/usb_storage/sd_mod
 * modules) booted under QEMU TCG with user-mode networking, whose 10.0.2.2 reaches the host's
 * loopback where the server listens.
 *
 * In the guest, no usbip tool: busybox `nc 10.0.2.2 PORT -e attach.sh` runs a script with the
 * connected socket as stdin/stdout; it writes OP_REQ_IMPORT, reads OP_REP_IMPORT, and hands
 * the socket (fd 0) to the kernel with `echo "port sockfd devid speed" >
 * /sys/devices/platform/vhci_hcd.0/attach` — exactly what the guest agent will do. Then the
 * guest reads the whole disk (compared byte for byte, by md5, with the host image), writes a
 * block (checked in the host image) and detaches.
 *
 * Our own /init is appended as a second cpio archive (the kernel unpacks concatenated
 * archives in order, so it replaces the image's /init); the image itself is not modified.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cpioNewc } from '../../src/image/cpio.js';
import { FileBackend } from '../../usb/devices/scsi.js';
import { StorageDevice } from '../../usb/devices/storage.js';
import { UsbIpServer } from '../../usb/server.js';
import { defaultImageFor } from '../helpers/cli.js';
import { qemuArgs } from '../helpers/guest/qemu.js';


const { image: defaultImage, why } = await defaultImageFor('usb-guest');

const DEVID1 = (99 << 16) | 1;
const DEVID2 = (99 << 16) | 2;

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/tender-modules.boot /etc/tender-modules.later); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || grep -q "^$m " /proc/modules || echo "USB-T insmod-failed=$m"
done
PORT=$(sed -n 's/.*tender.usbport=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
echo "USB-T vhci=$(ls -d /sys/devices/platform/vhci_hcd.0 2>/dev/null)"
BUSID=99-1 DEVID=${DEVID1} VPORT=0 nc 10.0.2.2 "$PORT" -e /tender/attach.sh
i=0; while [ ! -e /sys/block/sda ] && [ $i -lt 400 ]; do usleep 50000; i=$((i+1)); done
BUSID=99-2 DEVID=${DEVID2} VPORT=1 nc 10.0.2.2 "$PORT" -e /tender/attach.sh
i=0; while [ ! -e /sys/block/sdb ] && [ $i -lt 400 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T ro-size=$(cat /sys/block/sdb/size 2>/dev/null)"
echo "USB-T ro-ro=$(cat /sys/block/sdb/ro 2>/dev/null)"
echo "USB-T ro-md5=$(dd if=/dev/sdb bs=4096 2>/dev/null | md5sum | cut -d' ' -f1)"
printf 'must not land' | dd of=/dev/sdb bs=512 seek=3 conv=sync,notrunc,fsync 2>/dev/null && echo "USB-T ro-write=accepted" || echo "USB-T ro-write=refused"
# Unplug on the host in the middle of reads: the host removes 99-2 when it sees this line.
( while :; do dd if=/dev/sdb of=/dev/null bs=65536 iflag=direct 2>/dev/null; done ) &
READER=$!
usleep 300000
echo "USB-T reading=1"
i=0; while [ -e /sys/block/sdb ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
kill $READER 2>/dev/null
echo "USB-T unplugged=$([ -e /sys/block/sdb ] && echo no || echo yes)"
echo "USB-T size=$(cat /sys/block/sda/size 2>/dev/null)"
echo "USB-T ro=$(cat /sys/block/sda/ro 2>/dev/null)"
echo "USB-T md5=$(dd if=/dev/sda bs=4096 2>/dev/null | md5sum | cut -d' ' -f1)"
printf 'written by the guest' | dd of=/dev/sda bs=512 seek=10 conv=sync,notrunc,fsync 2>/dev/null && echo "USB-T wrote=ok"
sync
echo 0 > /sys/devices/platform/vhci_hcd.0/detach
echo 1 > /sys/devices/platform/vhci_hcd.0/detach
i=0; while [ -e /sys/block/sda ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T detached=$([ -e /sys/block/sda ] && echo no || echo yes)"
dmesg | grep -i -E "usb|vhci|sd[a-z]|scsi" | tail -40 | sed 's/^/USB-K /'
echo "USB-T done"
poweroff -f
`;

// stdin/stdout are the TCP connection to the server (busybox nc -e); logs go to the console.
const ATTACH = `#!/bin/sh
printf '\\001\\021\\200\\003\\000\\000\\000\\000'
printf '%s' "$BUSID"
dd if=/dev/zero bs=$((32 - \${#BUSID})) count=1 2>/dev/null
dd bs=320 count=1 iflag=fullblock of=/tmp/rep 2>/dev/null
echo "USB-T import-status-$BUSID=$(od -An -tx1 -j4 -N4 /tmp/rep | tr -d ' \\n')" > /dev/console
echo "$VPORT 0 $DEVID 3" > /sys/devices/platform/vhci_hcd.0/attach && echo "USB-T attach-$BUSID=ok" > /dev/console
`;

describe.skipIf(why !== null)('vhci-hcd in a guest imports the virtual disk', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-usb-guest-'));
  const imgPath = path.join(dir, 'disk.img');
  const server = new UsbIpServer({ log: { debug() {}, warn: (o, m) => console.warn(m, o) } });
  let backend: FileBackend;
  let roBackend: FileBackend;
  const roPath = path.join(dir, 'ro.img');
  let serial = '';
  let removed = false;
  let original: Buffer;
  const lines = () => Object.fromEntries([...serial.matchAll(/^USB-T ([\w-]+)=(.*?)\r?$/gm)].map((m) => [m[1], m[2]]));

  beforeAll(async () => {
    if (why) return;
    const image = defaultImage!;
    original = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < original.length; i += 4) original.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(imgPath, original);
    backend = await FileBackend.open(imgPath, false);
    server.add(new StorageDevice(backend, { busid: '99-1', busnum: 99, devnum: 1 }));
    fs.writeFileSync(roPath, original.subarray(0, 512 * 1024));
    roBackend = await FileBackend.open(roPath, true);
    server.add(new StorageDevice(roBackend, { busid: '99-2', busnum: 99, devnum: 2 }));
    const { port } = await server.listen(0, '127.0.0.1');

    const base = fs.readFileSync(image.initrd);
    const pad = Buffer.alloc((4 - (base.length % 4)) % 4);
    const extra = gzipSync(
      cpioNewc([
        { kind: 'file', path: 'init', data: Buffer.from(INIT), mode: 0o755 },
        { kind: 'dir', path: 'tender' },
        { kind: 'file', path: 'tender/attach.sh', data: Buffer.from(ATTACH), mode: 0o755 },
      ]),
    );
    const initrd = path.join(dir, 'initrd.gz');
    fs.writeFileSync(initrd, Buffer.concat([base, pad, extra]));
    const args = qemuArgs(
      {
        image: { dir: image.dir, kernel: image.kernel, initrd: image.initrd, kernelVersion: '', modules: [] },
        memoryMiB: 384,
        extraAppend: `tender.usbport=${port}`,
        extraArgs: ['-netdev', 'user,id=u0', '-device', 'virtio-net-device,netdev=u0'],
      },
      initrd,
    );
    const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    proc.stdout!.setEncoding('utf8').on('data', (s: string) => {
      serial += s;
      if (!removed && /^USB-T reading=1/m.test(serial)) {
        removed = true;
        server.remove('99-2'); // the device goes away mid-transfer
      }
    });
    proc.stderr!.setEncoding('utf8').on('data', (s: string) => (serial += s));
    const timer = setTimeout(() => proc.kill('SIGKILL'), 150_000);
    await new Promise((r) => proc.once('exit', r));
    clearTimeout(timer);
  }, 180_000);

  afterAll(async () => {
    await server.close();
    await backend?.close();
    await roBackend?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('import handshake and attach', () => {
    if (process.env.USB_GUEST_DEBUG) console.log(serial);
    const l = lines();
    expect(l, serial).toMatchObject({ 'import-status-99-1': '00000000', 'attach-99-1': 'ok', 'import-status-99-2': '00000000', 'attach-99-2': 'ok' });
  });

  test('the guest sees a disk of the right size, writable', () => {
    expect(lines(), serial).toMatchObject({ size: String(original.length / 512), ro: '0' });
  });

  test('data read in the guest matches the host image byte for byte', () => {
    expect(lines().md5, serial).toBe(createHash('md5').update(original).digest('hex'));
  });

  test('data written in the guest lands in the image', () => {
    expect(lines().wrote, serial).toBe('ok');
    const now = fs.readFileSync(imgPath);
    expect(now.subarray(10 * 512, 10 * 512 + 20).toString()).toBe('written by the guest');
    expect(now.subarray(10 * 512 + 20, 11 * 512).every((b) => b === 0)).toBe(true);
    expect(now.subarray(0, 10 * 512).equals(original.subarray(0, 10 * 512))).toBe(true);
  });

  test('a read-only image: the guest sees it write-protected and a write never reaches the file', () => {
    const l = lines();
    expect(l, serial).toMatchObject({ 'ro-size': '1024', 'ro-ro': '1', 'ro-write': 'refused' });
    expect(l['ro-md5']).toBe(createHash('md5').update(original.subarray(0, 512 * 1024)).digest('hex'));
    expect(fs.readFileSync(roPath).equals(original.subarray(0, 512 * 1024))).toBe(true);
  });

  test('removing a device mid-transfer: the guest drops it, the other disk and the server carry on', async () => {
    expect(removed).toBe(true);
    expect(lines().unplugged, serial).toBe('yes');
    // The sda results above were produced after the unplug; the server still lists 99-1.
    expect(server.list().map((d) => d.busid)).toEqual(['99-1']);
  });

  test('detach removes the disk', () => {
    expect(lines().detached, serial).toBe('yes');
  });
});
