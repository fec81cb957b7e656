/**
 * QEMU command lines for each kind of machine, as whole arrays: any change to what tender
 * asks of QEMU shows up here. The e2e test (machine-boot) proves QEMU 7.2 accepts them.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import type { MachineSpec } from '../../src/vmm/driver.js';
import { QemuDriver } from '../../src/vmm/qemu.js';
import { diskFormat, kernelCmdline, qemuEscape } from '../../src/vmm/qemu-args.js';
import { hostTscKhz, tscArgs } from '../../src/vmm/tsc.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-qargs-t-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function spec(over: Partial<MachineSpec> = {}): MachineSpec {
  return {
    name: 'dev',
    dir: '/s/m/dev',
    cpus: 2,
    memoryMiB: 512,
    kernel: '/s/images/default/vmlinux',
    initrd: '/s/images/default/initramfs.cpio.gz',
    cmdline: ['quiet', 'tender.hostname=dev'],
    accel: 'tcg',
    net: { kind: 'dgram', mac: '52:54:00:aa:bb:cc', localPath: '/s/m/dev/net.qemu', remotePath: '/s/m/dev/net.tender' },
    agent: { kind: 'virtio-serial', path: '/s/m/dev/agent.sock' },
    serialLog: '/s/m/dev/serial.log',
    controlSocket: '/s/m/dev/qmp.sock',
    ...over,
  };
}

// The host's vhost-vsock is assumed present for the exact command lines below; the
// vhost-user variant has its own test.
const driver = new QemuDriver({ tscKhz: 2_500_000, hostVhostVsock: true });

const COMMON = (accel: 'tcg' | 'kvm', cpus = '2', mem = '512M') => [
  '-name', 'dev',
  '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=off',
  '-accel', accel,
  '-cpu', accel === 'kvm' ? 'host' : 'max',
  '-smp', cpus,
  '-m', mem,
  '-nodefaults',
  '-no-user-config',
  '-display', 'none',
  '-no-reboot',
  '-chardev', 'file,id=serial0,path=/s/m/dev/serial.log,append=on',
  '-serial', 'chardev:serial0',
  '-qmp', 'unix:/s/m/dev/qmp.sock,server=on,wait=off',
  '-pidfile', '/s/m/dev/qemu.pid',
  '-kernel', '/s/images/default/vmlinux',
];

describe('QEMU command line', () => {
  test('default image, dgram network, virtio-serial agent, TCG', () => {
    const { cmd, args } = driver.commandLine(spec(), 'tcg');
    expect(cmd).toBe('qemu-system-x86_64');
    expect(args).toEqual([
      ...COMMON('tcg'),
      '-initrd', '/s/images/default/initramfs.cpio.gz',
      '-append', 'console=ttyS0 panic=-1 tsc_early_khz=2500000 tsc=reliable quiet tender.hostname=dev',
      '-netdev', 'dgram,id=n0,local.type=unix,local.path=/s/m/dev/net.qemu,remote.type=unix,remote.path=/s/m/dev/net.tender',
      '-device', 'virtio-net-device,netdev=n0,mac=52:54:00:aa:bb:cc',
      '-device', 'virtio-serial-device,id=vser0',
      '-chardev', 'socket,id=agent,path=/s/m/dev/agent.sock,server=on,wait=off',
      '-device', 'virtserialport,bus=vser0.0,chardev=agent,name=org.tender.agent.0',
    ]);
  });

  test('stream network, vsock agent, raw disk as root, KVM', () => {
    const disk = path.join(tmp, 'root.img');
    fs.writeFileSync(disk, Buffer.alloc(4096));
    const { args } = driver.commandLine(
      spec({
        net: { kind: 'stream', mac: '52:54:00:00:00:01', path: '/s/net.sock' },
        agent: { kind: 'vsock', cid: 3, port: 1024, path: '/s/m/dev/vsock.sock' },
        disk,
        cpus: 1,
        memoryMiB: 1024,
        cmdline: [],
      }),
      'kvm',
    );
    expect(args).toEqual([
      ...COMMON('kvm', '1', '1024M'),
      '-initrd', '/s/images/default/initramfs.cpio.gz',
      '-append', 'console=ttyS0 panic=-1 tsc_early_khz=2500000 tsc=reliable tender.agent=vsock:1024 root=/dev/vda rw',
      '-netdev', 'stream,id=n0,server=off,addr.type=unix,addr.path=/s/net.sock',
      '-device', 'virtio-net-device,netdev=n0,mac=52:54:00:00:00:01',
      '-device', 'vhost-vsock-device,id=vsock0,guest-cid=3',
      '-drive', `if=none,id=d0,file=${disk},format=raw,cache=writeback,discard=unmap`,
      '-device', 'virtio-blk-device,drive=d0',
    ]);
  });

  test('vsock without the host\'s vhost-vsock: tender\'s vhost-user backend, guest RAM shared', () => {
    const { args } = new QemuDriver({ tscKhz: 2_500_000, hostVhostVsock: false }).commandLine(
      spec({ agent: { kind: 'vsock', cid: 3, port: 1024, path: '/s/m/dev/vsock' }, memoryMiB: 256, dir: '/s/m/dev' }),
      'tcg',
    );
    expect(args).not.toContain('vhost-vsock-device,id=vsock0,guest-cid=3');
    expect(args[args.indexOf('-M') + 1]).toMatch(/,memory-backend=tender-vsock-mem$/);
    expect(args.slice(-6)).toEqual([
      '-object', 'memory-backend-memfd,id=tender-vsock-mem,size=256M,share=on',
      '-chardev', 'socket,id=tender-vsock,path=/s/m/dev/vhost-user-vsock.sock',
      '-device', 'vhost-user-vsock-device,chardev=tender-vsock',
    ]);
  });

  test("a user's kernel with no initrd, no network, no agent, a qcow2 disk with its own root=", () => {
    const disk = path.join(tmp, 'disk.img');
    const hdr = Buffer.alloc(512);
    hdr.write('QFI\xfb', 0, 'latin1'); // qcow2 magic (docs/interop/qcow2.txt)
    fs.writeFileSync(disk, hdr);
    const { args } = new QemuDriver({ tscKhz: null, qemu: '/opt/qemu/bin/qemu-system-x86_64' }).commandLine(
      spec({ initrd: undefined, net: { kind: 'none' }, agent: { kind: 'none' }, disk, cmdline: ['root=/dev/vda1', 'ro'] }),
      'tcg',
    );
    expect(args).toEqual([
      ...COMMON('tcg'),
      '-append', 'console=ttyS0 panic=-1 tender.agent=none root=/dev/vda1 ro',
      '-drive', `if=none,id=d0,file=${disk},format=qcow2,cache=writeback,discard=unmap`,
      '-device', 'virtio-blk-device,drive=d0',
    ]);
  });

  test('commas in paths are doubled (QEMU option syntax)', () => {
    expect(qemuEscape('/a,b/c,,d')).toBe('/a,,b/c,,,,d');
    const { args } = driver.commandLine(spec({ serialLog: '/s/odd,name/serial.log', net: { kind: 'none' }, agent: { kind: 'none' } }), 'tcg');
    expect(args).toContain('file,id=serial0,path=/s/odd,,name/serial.log,append=on');
  });

  test('refuses what QEMU on Linux cannot do', () => {
    expect(() => driver.commandLine(spec(), 'hvf')).toThrow(/kvm or tcg/);
    expect(() => driver.commandLine(spec({ cpus: 0 }), 'tcg')).toThrow(/cpus/);
    expect(() => driver.commandLine(spec({ memoryMiB: 16 }), 'tcg')).toThrow(/memory/);
  });

  test('kernel command line: driver words first, spec words last; no duplicate root=', () => {
    expect(kernelCmdline(spec({ cmdline: ['a', 'b'] }), { tscKhz: null })).toBe('console=ttyS0 panic=-1 a b');
    expect(kernelCmdline(spec({ disk: '/x.img', cmdline: ['rw'] }), { tscKhz: null })).toBe('console=ttyS0 panic=-1 root=/dev/vda rw');
  });

  test('disk format: by magic, by extension, raw when unreadable', () => {
    expect(diskFormat(path.join(tmp, 'missing.img'))).toBe('raw');
    expect(diskFormat('/nowhere/x.qcow2')).toBe('qcow2');
  });

  test('TSC rate from /proc/cpuinfo text', () => {
    expect(hostTscKhz('processor\t: 0\ncpu MHz\t\t: 2596.146\n')).toBe(2596146);
    expect(hostTscKhz('no rate here')).toBeNull();
    expect(tscArgs(null)).toEqual([]);
    expect(tscArgs(1000)).toEqual(['tsc_early_khz=1000', 'tsc=reliable']);
  });
});
