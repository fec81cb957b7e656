/**
 * QEMU's command line for a MachineSpec: a `microvm` machine (QEMU 7.2), kernel + initrd
 * booted directly, every device on virtio-mmio. Pure: same spec, same array (the unit tests
 * compare whole arrays), nothing read from the host but a disk image's first bytes.
 *
 * microvm choices, checked against QEMU 7.2's `-M microvm,help`:
 * - x-option-roms=off: nothing to boot from a ROM; isa-serial=on: the console (ttyS0);
 *   rtc=on: a sane wall clock at boot; pcie=off: virtio-mmio only.
 * - acpi=on: the GED device carries the power button, so QMP `system_powerdown` reaches the
 *   guest (the default image's /init powers off on it) and `poweroff -f` powers off rather
 *   than hangs. It also describes the virtio-mmio devices in the DSDT, so the kernel command
 *   line needs no virtio_mmio.device= words.
 * - -no-reboot: a guest reboot (or a panic, with panic=-1) ends QEMU, and tender decides what
 *   happens next.
 * - At most eight virtio-mmio transports exist on microvm (VIRTIO_NUM_TRANSPORTS in
 *   hw/i386/microvm.c); a spec that needs more is refused here rather than by QEMU at boot.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Accel, MachineSpec } from './driver.js';
import { tscArgs } from './tsc.js';

export const MICROVM_MAX_VIRTIO = 8;
export const AGENT_PORT_NAME = 'org.tender.agent.0';

export interface QemuArgsOptions {
  /** Host TSC rate for tsc_early_khz (null: let the guest calibrate). */
  tscKhz: number | null;
}

export class QemuSpecError extends Error {
  readonly code = 'BAD_ARGUMENT' as const;
}

/** qcow2 by its magic "QFI\xfb"; raw otherwise (or when unreadable: QEMU will say why). */
export function diskFormat(file: string): 'raw' | 'qcow2' {
  if (/\.qcow2$/i.test(file)) return 'qcow2';
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const b = Buffer.alloc(4);
      fs.readSync(fd, b, 0, 4, 0);
      if (b.readUInt32BE(0) === 0x514649fb) return 'qcow2';
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    // missing or unreadable: raw, and QEMU's error names the file
  }
  return 'raw';
}

/** QEMU option values are comma-separated; a comma inside a value is written twice. */
export function qemuEscape(v: string): string {
  return v.replace(/,/g, ',,');
}

export function pidFile(spec: MachineSpec): string {
  return path.join(spec.dir, 'qemu.pid');
}

/** The kernel command line: the driver's own words first, then the spec's. */
export function kernelCmdline(spec: MachineSpec, o: QemuArgsOptions): string {
  // panic=-1: reboot at once on a panic, which -no-reboot turns into QEMU exiting.
  const words = ['console=ttyS0', 'panic=-1', ...tscArgs(o.tscKhz)];
  const has = (prefix: string) => spec.cmdline.some((w) => w === prefix || w.startsWith(`${prefix}=`));
  switch (spec.agent.kind) {
    case 'vsock':
      words.push(`tender.agent=vsock:${spec.agent.port}`);
      break;
    case 'none':
      words.push('tender.agent=none');
      break;
    case 'virtio-serial':
      break; // the default image's default
  }
  if (spec.disk && !has('root')) {
    words.push('root=/dev/vda');
    if (!has('ro') && !has('rw')) words.push('rw');
  }
  return [...words, ...spec.cmdline].join(' ');
}

export function qemuArgs(spec: MachineSpec, accel: Exclude<Accel, 'auto'>, o: QemuArgsOptions): string[] {
  if (accel !== 'kvm' && accel !== 'tcg') throw new QemuSpecError(`QEMU on this host supports accel kvm or tcg, not ${accel}`);
  if (!Number.isInteger(spec.cpus) || spec.cpus < 1) throw new QemuSpecError(`cpus must be a positive integer, not ${spec.cpus}`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw new QemuSpecError(`memory must be at least 64 MiB, not ${spec.memoryMiB}`);
  const args: string[] = [
    '-name', qemuEscape(spec.name),
    '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=off',
    '-accel', accel,
    // TCG: every feature it emulates; KVM: the host CPU as is.
    '-cpu', accel === 'kvm' ? 'host' : 'max',
    '-smp', String(spec.cpus),
    '-m', `${spec.memoryMiB}M`,
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-no-reboot',
    // append=on: the log keeps earlier boots, as `tender machine logs` expects.
    '-chardev', `file,id=serial0,path=${qemuEscape(spec.serialLog)},append=on`,
    '-serial', 'chardev:serial0',
    '-qmp', `unix:${qemuEscape(spec.controlSocket)},server=on,wait=off`,
    '-pidfile', pidFile(spec),
    '-kernel', spec.kernel,
  ];
  if (spec.initrd) args.push('-initrd', spec.initrd);
  args.push('-append', kernelCmdline(spec, o));

  let virtio = 0;
  const net = spec.net;
  switch (net.kind) {
    case 'dgram':
      // QEMU binds localPath and sends to remotePath, tender's socket (DatagramLink.connect(remotePath, localPath)).
      args.push('-netdev', `dgram,id=n0,local.type=unix,local.path=${qemuEscape(net.localPath)},remote.type=unix,remote.path=${qemuEscape(net.remotePath)}`);
      break;
    case 'stream':
      // QEMU 7.2 cannot reconnect: tender's listener must exist before QEMU starts.
      args.push('-netdev', `stream,id=n0,server=off,addr.type=unix,addr.path=${qemuEscape(net.path)}`);
      break;
    case 'none':
      break;
  }
  if (net.kind !== 'none') {
    args.push('-device', `virtio-net-device,netdev=n0,mac=${net.mac}`);
    virtio++;
  }

  const agent = spec.agent;
  switch (agent.kind) {
    case 'virtio-serial':
      // QEMU serves the socket and tender connects, so a restarted daemon can connect again.
      args.push(
        '-device', 'virtio-serial-device,id=vser0',
        '-chardev', `socket,id=agent,path=${qemuEscape(agent.path)},server=on,wait=off`,
        '-device', `virtserialport,bus=vser0.0,chardev=agent,name=${AGENT_PORT_NAME}`,
      );
      virtio++;
      break;
    case 'vsock':
      // The kernel's vhost-vsock (/dev/vhost-vsock): the host reaches the guest over AF_VSOCK
      // at agent.cid; QEMU has no hybrid (unix socket) vsock, so agent.path is not used.
      args.push('-device', `vhost-vsock-device,id=vsock0,guest-cid=${agent.cid}`);
      virtio++;
      break;
    case 'none':
      break;
  }

  if (spec.disk) {
    args.push('-drive', `if=none,id=d0,file=${qemuEscape(spec.disk)},format=${diskFormat(spec.disk)},cache=writeback,discard=unmap`);
    args.push('-device', 'virtio-blk-device,drive=d0');
    virtio++;
  }
  if (virtio > MICROVM_MAX_VIRTIO) {
    throw new QemuSpecError(`microvm has ${MICROVM_MAX_VIRTIO} virtio-mmio slots; this machine needs ${virtio}`);
  }
  return args;
}
