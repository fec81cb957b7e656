/**
 * tender's real-device backend (usb/host, libusb through `usb` v2) against real USB hardware:
 * this host has none, so a guest gets some. QEMU's microvm with PCIe, an xHCI controller and a
 * USB mass-storage device on a small image whose bytes the test knows; the guest kernel
 * drives it (xhci_hcd, usb-storage: /dev/sda).
 *
 * Inside that guest, tender serves the device as it would on a host: the host's root is shared
 * read-only over 9p, the guest chroots into it and runs the host's node on the serve script
 * (test/helpers/usb-host-serve.ts: openLibusbSource, open(busid), UsbIpServer on
 * 127.0.0.1:3240). Then the kernel's own client imports it in the same guest (Debian's
 * `usbip attach`, vhci-hcd), so every URB goes guest kernel → vhci → TCP → tender → libusb →
 * usbfs → xhci → QEMU's device, and back.
 *
 * Checked: the server lists it with the device's ids and speed; the kernel driver is detached
 * while it is served and reattached after; the imported disk reads back the image byte for byte
 * and a write through it lands in the image; unplugging the device (QMP device_del) in the
 * middle of reads fails the URBs, removes it from the server (the imported disk goes away) and
 * the server process lives on.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { cpioNewc } from '../../src/image/cpio.js';
import { QmpClient } from '../../src/vmm/qmp.js';
import { defaultImageFor } from '../helpers/cli.js';
import { qemuArgs } from '../helpers/guest/qemu.js';
import { compileServeScript, xhciModules } from '../helpers/usb-host-guest.js';


const { image: defaultImage, why } = await defaultImageFor('usb-host-device', { extra: () => (fs.existsSync('/usr/sbin/usbip') ? null : 'usbip (Debian package usbip) missing') });

// The guest's /init. The host's root is at $H; everything tender runs comes from there.
// USB-T lines are results; USB-S lines come from the serve script.
const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/tender-modules.boot /etc/tender-modules.later /tender/modules); do
  f=/lib/modules/$m.ko; [ -e /tender/$m.ko ] && f=/tender/$m.ko
  insmod "$f" 2>/dev/null || grep -q "^$m " /proc/modules || echo "USB-T insmod-failed=$m"
done
ip link set lo up
SERVE_JS=$(sed -n 's/.*tender.serve=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
i=0; while [ ! -e /sys/block/sda ] && [ $i -lt 400 ]; do usleep 50000; i=$((i+1)); done
BUSID=
for d in /sys/bus/usb/devices/*-*; do [ "$(cat $d/idVendor 2>/dev/null)" = 46f4 ] && BUSID=$(basename $d); done
U=/sys/bus/usb/devices/$BUSID
drv() { [ -e $U:1.0/driver ] && basename $(readlink $U:1.0/driver) || echo none; }
echo "USB-T busid=$BUSID"
echo "USB-T sysfs-speed=$(cat $U/speed)"
echo "USB-T driver-before=$(drv)"
echo "USB-T local-md5=$(dd if=/dev/sda bs=65536 2>/dev/null | md5sum | cut -d' ' -f1)"

H=/mnt/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro host $H || echo "USB-T 9p=failed"
for d in proc sys dev; do mount --rbind /$d $H/$d; done
# Writable scratch in the chroot is /run only: a tmpfs over /tmp would hide a checkout that
# lives under /tmp (CI clones there), and with it the script to run.
mount -t tmpfs tmpfs $H/run
serve() {
  rm -f $H/run/ready
  chroot $H /usr/bin/node "$SERVE_JS" "$BUSID" 3240 /run/ready &
  SERVE=$!
  i=0; while [ ! -e $H/run/ready ] && [ $i -lt 1200 ] && kill -0 $SERVE 2>/dev/null; do usleep 100000; i=$((i+1)); done
}
vdisk() {
  DISK=; i=0
  while [ -z "$DISK" ] && [ $i -lt 400 ]; do
    for b in /sys/block/sd*; do readlink -f $b | grep -q vhci_hcd && DISK=$(basename $b); done
    [ -n "$DISK" ] || usleep 50000; i=$((i+1))
  done
}
localdisk() {
  LDISK=; i=0
  while [ -z "$LDISK" ] && [ $i -lt 400 ]; do
    for b in /sys/block/sd*; do readlink -f $b | grep -q "/$BUSID/" && LDISK=$(basename $b); done
    [ -n "$LDISK" ] || usleep 50000; i=$((i+1))
  done
}

serve
echo "USB-T driver-served=$(drv)"
chroot $H /usr/sbin/usbip list -r 127.0.0.1 2>&1 | sed 's/^/USB-L /'
chroot $H /usr/sbin/usbip attach -r 127.0.0.1 -b $BUSID && echo "USB-T attach=ok"
vdisk
echo "USB-T imported=$DISK"
echo "USB-T size=$(cat /sys/block/$DISK/size 2>/dev/null)"
echo "USB-T md5=$(dd if=/dev/$DISK bs=65536 2>/dev/null | md5sum | cut -d' ' -f1)"
printf 'written through tender' | dd of=/dev/$DISK bs=512 seek=10 conv=sync,notrunc,fsync 2>/dev/null && echo "USB-T wrote=ok"
VPORT=$(chroot $H /usr/sbin/usbip port 2>/dev/null | sed -n 's/^Port \\([0-9]*\\):.*/\\1/p' | head -1)
chroot $H /usr/sbin/usbip detach -p "$VPORT" >/dev/null && echo "USB-T detach=ok"
i=0; while [ -e /sys/block/$DISK ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T detached=$([ -e /sys/block/$DISK ] && echo no || echo yes)"
kill -TERM $SERVE; wait $SERVE; echo "USB-T serve-exit=$?"
i=0; while [ "$(drv)" = none ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T driver-after=$(drv)"
localdisk
echo "USB-T local-md5-after=$(dd if=/dev/$LDISK bs=65536 2>/dev/null | md5sum | cut -d' ' -f1)"

# Unplug while the imported disk is being read: the host deletes the device on "reading=1".
serve
chroot $H /usr/sbin/usbip attach -r 127.0.0.1 -b $BUSID && echo "USB-T attach2=ok"
vdisk
echo "USB-T imported2=$DISK"
( while :; do dd if=/dev/$DISK of=/dev/null bs=65536 iflag=direct 2>/dev/null || break; done ) &
READER=$!
usleep 500000
echo "USB-T reading=1"
i=0; while [ -e $U ] && [ $i -lt 600 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T unplugged=$([ -e $U ] && echo no || echo yes)"
i=0; while [ -e /sys/block/$DISK ] && [ $i -lt 600 ]; do usleep 50000; i=$((i+1)); done
echo "USB-T imported-gone=$([ -e /sys/block/$DISK ] && echo no || echo yes)"
kill $READER 2>/dev/null
echo "USB-T serve-alive=$(kill -0 $SERVE 2>/dev/null && echo yes || echo no)"
chroot $H /usr/sbin/usbip list -r 127.0.0.1 >/dev/null 2>&1 && echo "USB-T list-after-unplug=ok"
kill -TERM $SERVE; wait $SERVE; echo "USB-T serve-exit2=$?"
dmesg | grep -iE "usb|vhci|sd[a-z]|scsi" | tail -40 | sed 's/^/USB-K /'
echo "USB-T done"
poweroff -f
`;

describe.skipIf(why !== null)('a real USB device served by tender from inside a guest, imported by vhci-hcd', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-usb-host-'));
  const imgPath = path.join(dir, 'stick.img');
  let original: Buffer;
  let serial = '';
  let unplugged = false;
  let cleanup = () => {};
  const lines = () => Object.fromEntries([...serial.matchAll(/^USB-T ([\w-]+)=(.*?)\r?$/gm)].map((m) => [m[1], m[2]]));
  const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
  const written = () => {
    const b = Buffer.from(original);
    b.fill(0, 10 * 512, 11 * 512);
    b.write('written through tender', 10 * 512, 'latin1');
    return b;
  };

  beforeAll(async () => {
    if (why) return;
    const image = defaultImage!;
    original = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < original.length; i += 4) original.writeUInt32LE((i * 2654435761 + 12345) >>> 0, i);
    fs.writeFileSync(imgPath, original);

    const [mods, serve] = await Promise.all([xhciModules(image.manifest.kernel.release, image.modules), compileServeScript()]);
    cleanup = serve.cleanup;
    const base = fs.readFileSync(image.initrd);
    const pad = Buffer.alloc((4 - (base.length % 4)) % 4);
    const extra = gzipSync(
      cpioNewc([
        { kind: 'file', path: 'init', data: Buffer.from(INIT), mode: 0o755 },
        { kind: 'dir', path: 'tender' },
        { kind: 'file', path: 'tender/modules', data: Buffer.from(mods.map((m) => m.name).join('\n') + '\n') },
        ...mods.map((m) => ({ kind: 'file' as const, path: `tender/${m.name}.ko`, data: m.data })),
      ]),
    );
    const initrd = path.join(dir, 'initrd.gz');
    fs.writeFileSync(initrd, Buffer.concat([base, pad, extra]));
    const qmpPath = path.join(dir, 'qmp.sock');
    const args = qemuArgs(
      {
        image: { dir: image.dir, kernel: image.kernel, initrd: image.initrd, kernelVersion: '', modules: [] },
        memoryMiB: 1024,
        extraAppend: `tender.serve=${serve.script}`,
        // prettier-ignore
        extraArgs: [
          '-device', 'qemu-xhci,id=xhci',
          '-drive', `if=none,id=stick,format=raw,file=${imgPath}`,
          '-device', 'usb-storage,bus=xhci.0,drive=stick,id=stickdev',
          '-fsdev', 'local,id=hostfs,path=/,security_model=none,readonly=on,multidevs=remap',
          '-device', 'virtio-9p-device,fsdev=hostfs,mount_tag=host',
          '-qmp', `unix:${qmpPath},server=on,wait=off`,
        ],
      },
      initrd,
    );
    // PCIe on microvm (GPEX over ACPI): where qemu-xhci lives.
    const m = args.indexOf('-M');
    args[m + 1] = `${args[m + 1]},pcie=on`;
    const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const kill = () => proc.kill('SIGKILL');
    process.once('exit', kill);
    proc.stdout!.setEncoding('utf8').on('data', (s: string) => {
      serial += s;
      if (!unplugged && /^USB-T reading=1/m.test(serial)) {
        unplugged = true;
        void (async () => {
          const q = await QmpClient.connect(qmpPath);
          await q.execute('device_del', { id: 'stickdev' });
          q.close();
        })().catch((e) => (serial += `\nQMP failed: ${String(e)}\n`));
      }
    });
    proc.stderr!.setEncoding('utf8').on('data', (s: string) => (serial += s));
    const timer = setTimeout(kill, 280_000);
    await new Promise((r) => proc.once('exit', r));
    clearTimeout(timer);
    process.off('exit', kill);
    if (process.env.USB_HOST_DEBUG) console.log(serial);
  }, 320_000);

  afterAll(() => {
    cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the guest drives the emulated device itself first (xhci, usb-storage)', () => {
    const l = lines();
    expect(l.busid, serial).toMatch(/^\d+-\d+(\.\d+)*$/);
    expect(l['driver-before'], serial).toBe('usb-storage');
    expect(l['local-md5'], serial).toBe(md5(original));
  });

  test('the source lists it with ids, strings and the speed sysfs reports', () => {
    const l = lines();
    const listed = /^USB-S list (.*)$/m.exec(serial);
    expect(listed, serial).not.toBeNull();
    const devs = JSON.parse(listed![1]!) as { busid: string; vendorId: number; productId: number; speed: number; product: string | null }[];
    const d = devs.find((x) => x.busid === l.busid);
    expect(d, serial).toMatchObject({ vendorId: 0x46f4, productId: 0x0001, product: 'QEMU USB HARDDRIVE' });
    // sysfs speed (Mb/s) to enum usb_device_speed: 480 → 3, 5000 → 5.
    expect(d!.speed).toBe(({ '480': 3, '5000': 5 } as Record<string, number>)[l['sysfs-speed']!]);
    // Debian's usbip lists what the server exports.
    expect(serial).toMatch(new RegExp(`USB-L\\s+${l.busid}: .*\\(46f4:0001\\)`));
  });

  test('the kernel driver is detached while served and reattached after', () => {
    const l = lines();
    expect(l['driver-served'], serial).not.toBe('usb-storage');
    expect(l['serve-exit'], serial).toBe('0');
    expect(l['driver-after'], serial).toBe('usb-storage');
  });

  test('vhci-hcd imports it: a disk of the right size whose bytes are the image', () => {
    const l = lines();
    expect(l, serial).toMatchObject({ attach: 'ok', size: String(original.length / 512) });
    expect(l.imported).toMatch(/^sd[a-z]+$/);
    expect(l.md5, serial).toBe(md5(original));
    // The device is SuperSpeed on QEMU's xHCI: its BOS set is served (the kernel asks for it).
    if (l['sysfs-speed'] === '5000') expect(serial).not.toMatch(/unable to get BOS descriptor/);
  });

  test('a write through the import lands on the device (seen again by the guest driver, and in the image)', () => {
    const l = lines();
    expect(l, serial).toMatchObject({ wrote: 'ok', detach: 'ok', detached: 'yes' });
    expect(l['local-md5-after'], serial).toBe(md5(written()));
  });

  test('unplugged mid-transfer: URBs fail, the device leaves the server, the server lives on', () => {
    const l = lines();
    expect(unplugged).toBe(true);
    expect(l, serial).toMatchObject({ attach2: 'ok', unplugged: 'yes', 'imported-gone': 'yes', 'serve-alive': 'yes', 'list-after-unplug': 'ok', 'serve-exit2': '0' });
    // libusb reports the unplug of an open device itself (its usbfs descriptor errors), as a
    // hotplug detach or as transfers ending in NO_DEVICE, whichever it sees first: either way
    // the source emits 'remove' once and the serve script takes it out of the server.
    expect(serial).toMatch(new RegExp(`USB-S removed ${l.busid}\\b`));
    expect(serial.match(/USB-S removed /g)).toHaveLength(1);
    expect(serial).not.toMatch(/USB-S unhandled/);
    expect(fs.readFileSync(imgPath).equals(written())).toBe(true);
  });
});
