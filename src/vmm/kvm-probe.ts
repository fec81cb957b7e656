/**
 * `--accel auto`: use KVM only if it can actually boot this kernel. A /dev/kvm that opens is
 * not enough: on some cloud machines it is a paravirtual (nested) KVM on which QEMU asserts
 * at the first vCPU run ("failed to set MSR 0x10a", kvm_buf_set_msrs) or hangs forever with
 * no output. So the probe boots the machine's own kernel and initrd under KVM with nothing
 * attached, for a few seconds, and looks on the serial console for a sign of userspace:
 * tender's /init prints TENDER-BOOT first thing (and with tender.probe=1 powers off right
 * away); another initrd's start shows as the kernel's "Run /init as init process". Anything
 * else (assert, exit, silence until the hard timeout, after which QEMU is killed) means TCG.
 *
 * The decision is separate from running QEMU (ProbeRunner is injectable) so every outcome is
 * unit-tested; the result is cached by the caller under accelCacheKey (kernel + QEMU version).
 */
import { spawn, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import type { MachineSpec } from './driver.js';
import { lastLine } from './exit-reason.js';
import { tscArgs } from './tsc.js';

export const BOOT_MARKER = /TENDER-BOOT|Run \S+ as init process/;
export const DEFAULT_PROBE_TIMEOUT_MS = 10_000;

export interface ProbeRun {
  /** stdout and stderr together (serial console on stdout). */
  output: string;
  code: number | null;
  signal: string | null;
  timedOut: boolean;
  /** Set when the marker was seen (the runner may stop QEMU early then). */
  markerSeen: boolean;
  spawnError?: string;
}

/** Runs QEMU with `args`, stops it when BOOT_MARKER shows or after `timeoutMs` (SIGKILL). */
export type ProbeRunner = (cmd: string, args: string[], timeoutMs: number) => Promise<ProbeRun>;

export type KvmAccess = 'ok' | 'missing' | 'no-access';

export interface AccelDecision {
  accel: 'kvm' | 'tcg';
  warning?: string;
}

export function kvmAccess(dev = '/dev/kvm'): KvmAccess {
  try {
    fs.accessSync(dev, fs.constants.R_OK | fs.constants.W_OK);
    return 'ok';
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : 'no-access';
  }
}

/** A bare machine: the spec's kernel and initrd, one vCPU, serial on stdout, no devices. */
export function probeArgs(spec: Pick<MachineSpec, 'kernel' | 'initrd' | 'cmdline'>, tscKhz: number | null): string[] {
  // No 'quiet': a foreign initrd shows its start only through the kernel's own messages.
  const words = ['console=ttyS0', 'panic=-1', ...tscArgs(tscKhz), 'tender.probe=1', ...spec.cmdline.filter((w) => w !== 'quiet')];
  const args = [
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
    '-kernel', spec.kernel,
  ];
  if (spec.initrd) args.push('-initrd', spec.initrd);
  args.push('-append', words.join(' '));
  return args;
}

/** What the probe's outcome means. */
export function decideAccel(access: KvmAccess, run: ProbeRun | null, timeoutMs = DEFAULT_PROBE_TIMEOUT_MS): AccelDecision {
  if (access === 'missing') return { accel: 'tcg', warning: 'no /dev/kvm on this host: using TCG (slow)' };
  if (access === 'no-access') return { accel: 'tcg', warning: '/dev/kvm is not readable and writable by this user (add it to the kvm group): using TCG (slow)' };
  if (run && (run.markerSeen || BOOT_MARKER.test(run.output))) return { accel: 'kvm' };
  let why: string;
  if (!run) why = 'the probe did not run';
  else if (run.spawnError) why = `cannot run QEMU: ${run.spawnError}`;
  else if (run.timedOut) why = `no sign of the guest within ${Math.round(timeoutMs / 1000)} s`;
  else if (run.signal) why = `QEMU died of ${run.signal}${lastLine(run.output) ? `: ${lastLine(run.output)}` : ''}`;
  else why = `QEMU exited with status ${run.code}${lastLine(run.output) ? `: ${lastLine(run.output)}` : ''}`;
  return { accel: 'tcg', warning: `/dev/kvm exists but could not boot a guest (${why}): using TCG (slow)` };
}

/** The real runner: spawn, collect output, kill on marker or timeout. */
export const spawnProbeRunner: ProbeRunner = (cmd, args, timeoutMs) =>
  new Promise((resolve) => {
    const res: ProbeRun = { output: '', code: null, signal: null, timedOut: false, markerSeen: false };
    let proc;
    try {
      proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      resolve({ ...res, spawnError: (e as Error).message });
      return;
    }
    const kill = () => {
      try {
        proc.kill('SIGKILL');
      } catch {
        // already gone
      }
    };
    const timer = setTimeout(() => {
      res.timedOut = true;
      kill();
    }, timeoutMs);
    const onData = (b: Buffer) => {
      if (res.output.length < 1 << 20) res.output += b.toString('utf8');
      if (!res.markerSeen && BOOT_MARKER.test(res.output)) {
        res.markerSeen = true;
        kill(); // proven; no need to wait for the poweroff
      }
    };
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', onData);
    proc.on('error', (e) => (res.spawnError = e.message));
    proc.on('close', (code, signal) => {
      clearTimeout(timer);
      res.code = code;
      res.signal = signal;
      resolve(res);
    });
  });

export interface KvmProbeOptions {
  qemu?: string;
  timeoutMs?: number;
  tscKhz?: number | null;
  access?: () => KvmAccess;
  runner?: ProbeRunner;
}

export async function probeKvm(spec: Pick<MachineSpec, 'kernel' | 'initrd' | 'cmdline'>, o: KvmProbeOptions = {}): Promise<AccelDecision> {
  const timeoutMs = o.timeoutMs ?? DEFAULT_PROBE_TIMEOUT_MS;
  const access = (o.access ?? kvmAccess)();
  if (access !== 'ok') return decideAccel(access, null, timeoutMs);
  const run = await (o.runner ?? spawnProbeRunner)(o.qemu ?? 'qemu-system-x86_64', probeArgs(spec, o.tscKhz ?? null), timeoutMs);
  return decideAccel(access, run, timeoutMs);
}

const execFileP = promisify(execFile);
const fileHashes = new Map<string, { stamp: string; hash: string }>();

async function hashFile(file: string): Promise<string> {
  const st = await fs.promises.stat(file);
  const stamp = `${st.size}:${st.mtimeMs}:${st.ino}`;
  const hit = fileHashes.get(file);
  if (hit && hit.stamp === stamp) return hit.hash;
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file)) h.update(chunk as Buffer);
  const hash = h.digest('hex');
  fileHashes.set(file, { stamp, hash });
  return hash;
}

/** What the probe's answer depends on: the kernel, the initrd, the QEMU build, the host kernel. */
export async function accelCacheKey(spec: Pick<MachineSpec, 'kernel' | 'initrd'>, qemu = 'qemu-system-x86_64'): Promise<string> {
  let version = 'unknown';
  try {
    version = (await execFileP(qemu, ['--version'])).stdout.split('\n')[0]!.trim();
  } catch {
    // no QEMU: the probe itself will say so
  }
  let host = '';
  try {
    host = fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
  } catch {
    // not Linux
  }
  const h = createHash('sha256').update(version).update('\0').update(host).update('\0');
  h.update(await hashFile(spec.kernel));
  if (spec.initrd) h.update('\0').update(await hashFile(spec.initrd));
  return h.digest('hex').slice(0, 32);
}
