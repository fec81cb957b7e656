/**
 * The `--accel auto` decision, with QEMU replaced by a scripted runner: each outcome a real
 * host produces (a working KVM, the paravirtual KVM of these machines that asserts or hangs,
 * no /dev/kvm, no permission) maps to the right accelerator and warning. The assert text is
 * what QEMU 7.2 printed on this machine's /dev/kvm.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, test } from 'vitest';
import { QemuDriver } from '../../src/vmm/qemu.js';
import { type ProbeRun, type ProbeRunner, decideAccel, probeArgs, probeKvm } from '../../src/vmm/kvm-probe.js';

const base: ProbeRun = { output: '', code: null, signal: null, timedOut: false, markerSeen: false };
const spec = { kernel: '/k/vmlinux', initrd: '/k/initrd.gz', cmdline: ['quiet', 'tender.hostname=dev'] };

function scripted(run: Partial<ProbeRun>): { runner: ProbeRunner; calls: { cmd: string; args: string[]; timeoutMs: number }[] } {
  const calls: { cmd: string; args: string[]; timeoutMs: number }[] = [];
  return {
    calls,
    runner: async (cmd, args, timeoutMs) => {
      calls.push({ cmd, args, timeoutMs });
      return { ...base, ...run };
    },
  };
}

describe('KVM boot probe', () => {
  test('the probe boots the bare kernel under KVM with tender.probe=1 and without quiet', () => {
    expect(probeArgs(spec, 2_000_000)).toEqual([
      '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=off',
      '-accel', 'kvm',
      '-cpu', 'host',
      '-smp', '1',
      '-m', '256M',
      '-nodefaults',
      '-no-user-config',
      '-display', 'none',
      '-no-reboot',
      '-serial', 'stdio',
      '-kernel', '/k/vmlinux',
      '-initrd', '/k/initrd.gz',
      '-append', 'console=ttyS0 panic=-1 tsc_early_khz=2000000 tsc=reliable tender.probe=1 tender.hostname=dev',
    ]);
  });

  test("tender's /init marker on the console: KVM", async () => {
    const s = scripted({ output: '[    0.1] Linux version 6.1\nTENDER-BOOT uptime=0.31\n', signal: 'SIGKILL', markerSeen: true });
    expect(await probeKvm(spec, { access: () => 'ok', runner: s.runner, qemu: 'q', timeoutMs: 7000 })).toEqual({ accel: 'kvm' });
    expect(s.calls).toHaveLength(1);
    expect(s.calls[0]!.cmd).toBe('q');
    expect(s.calls[0]!.timeoutMs).toBe(7000);
  });

  test("another initrd's start, as the kernel reports it: KVM", () => {
    expect(decideAccel('ok', { ...base, output: '[    0.52] Run /init as init process\n', code: 0 })).toEqual({ accel: 'kvm' });
  });

  test('QEMU asserts on a paravirtual KVM: TCG, with the reason', async () => {
    const s = scripted({
      output:
        'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n' +
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n",
      signal: 'SIGABRT',
    });
    const d = await probeKvm(spec, { access: () => 'ok', runner: s.runner });
    expect(d.accel).toBe('tcg');
    expect(d.warning).toBe(
      "/dev/kvm exists but could not boot a guest (QEMU died of SIGABRT: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.): using TCG (slow)",
    );
  });

  test('QEMU hangs silently until the hard timeout: TCG', () => {
    const d = decideAccel('ok', { ...base, timedOut: true, signal: 'SIGKILL' }, 10_000);
    expect(d).toEqual({ accel: 'tcg', warning: '/dev/kvm exists but could not boot a guest (no sign of the guest within 10 s): using TCG (slow)' });
  });

  test('QEMU exits with an error status: TCG, with its last line', () => {
    const d = decideAccel('ok', { ...base, code: 1, output: 'qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: Permission denied\n' });
    expect(d.warning).toMatch(/status 1: -accel kvm: Could not access KVM kernel module: Permission denied\): using TCG/);
  });

  test('QEMU missing: TCG', () => {
    expect(decideAccel('ok', { ...base, spawnError: 'spawn q ENOENT' }).warning).toMatch(/cannot run QEMU: spawn q ENOENT/);
  });

  test('no /dev/kvm, or no permission: TCG without running anything', async () => {
    const s = scripted({});
    expect(await probeKvm(spec, { access: () => 'missing', runner: s.runner })).toEqual({ accel: 'tcg', warning: 'no /dev/kvm on this host: using TCG (slow)' });
    expect((await probeKvm(spec, { access: () => 'no-access', runner: s.runner })).warning).toMatch(/kvm group/);
    expect(s.calls).toHaveLength(0);
  });
});

describe('QemuDriver.resolveAccel', () => {
  test('probes once per kernel and QEMU; the caller-supplied cache answers next time', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-accel-t-'));
    try {
      const kernel = path.join(dir, 'vmlinux');
      fs.writeFileSync(kernel, 'kernel bytes');
      const m = { name: 'dev', dir, cpus: 1, memoryMiB: 256, kernel, cmdline: [], accel: 'auto' as const, net: { kind: 'none' as const }, agent: { kind: 'none' as const }, serialLog: path.join(dir, 's'), controlSocket: path.join(dir, 'q') };
      const s = scripted({ output: 'TENDER-BOOT uptime=0.2\n', markerSeen: true, signal: 'SIGKILL' });
      const stored = new Map<string, unknown>();
      const cache = { get: (k: string) => stored.get(k) as never, set: (k: string, v: unknown) => void stored.set(k, v) };
      const d1 = new QemuDriver({ qemu: path.join(dir, 'no-qemu'), tscKhz: null, accelCache: cache, probe: { access: () => 'ok', runner: s.runner } });
      expect(await d1.resolveAccel(m)).toEqual({ accel: 'kvm' });
      expect(await d1.resolveAccel(m)).toEqual({ accel: 'kvm' });
      expect(s.calls).toHaveLength(1);
      expect([...stored.values()]).toEqual([{ accel: 'kvm' }]);
      const d2 = new QemuDriver({ qemu: path.join(dir, 'no-qemu'), tscKhz: null, accelCache: cache, probe: { access: () => 'ok', runner: s.runner } });
      expect(await d2.resolveAccel(m)).toEqual({ accel: 'kvm' });
      expect(s.calls).toHaveLength(1);
      // Another kernel is another question.
      fs.writeFileSync(kernel, 'another kernel');
      await d2.resolveAccel(m);
      expect(s.calls).toHaveLength(2);
      // An explicit accelerator is never probed.
      expect(await d2.resolveAccel({ ...m, accel: 'tcg' })).toEqual({ accel: 'tcg' });
      expect(s.calls).toHaveLength(2);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
