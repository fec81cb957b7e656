/**
 * Boot the test guest under QEMU 7.2 (microvm, TCG: /dev/kvm on these machines is a
 * paravirtual KVM that cannot boot a stock kernel), with its serial console on stdout, one
 * virtio-net device on the transport under test, a hard timeout, and cleanup of every QEMU
 * this process started even if a test throws or the worker exits.
 *
 * The guest's /init prints `TENDER-<WORD> ...` lines; `TENDER-RESULT key=value` lines (from
 * the test script, via `tender-result key=value`) are collected into `results`.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { tscArgs } from '../../../src/vmm/tsc.js';
import { type GuestImage, initrdWithScript } from './image.js';

export type GuestNet =
  | { type: 'none' }
  /** QEMU connects to our listener at `path` (server=off) or listens there itself (server=on). */
  | { type: 'stream'; path: string; server?: boolean }
  | { type: 'stream-tcp'; host: string; port: number; server?: boolean }
  /** One frame per datagram; QEMU binds `local`, sends to `remote` (our socket). */
  | { type: 'dgram'; local: string; remote: string };

export interface GuestOptions {
  image: GuestImage;
  /** Shell script run as /tender/test.sh after the network is configured. */
  script?: string;
  /** 'dhcp', or 'ADDR/PREFIX[,gw=GW]'. Omitted: eth0 stays down. */
  ip?: string;
  mtu?: number;
  net?: GuestNet;
  mac?: string;
  memoryMiB?: number;
  /** Hard limit on the whole run; QEMU is killed after it. Default 90 s. */
  timeoutMs?: number;
  /** Every serial line as it arrives (without \r). */
  onLine?: (line: string) => void;
  extraAppend?: string;
  /** Appended to QEMU's command line (more NICs, devices). */
  extraArgs?: string[];
}

export interface GuestResult {
  serial: string;
  results: Record<string, string>;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  /** Wall-clock ms from spawn to /init's first line, and to TENDER-READY (network configured). */
  bootMs: number | null;
  readyMs: number | null;
  /** Guest uptime (s) at /init's start and at TENDER-READY, from /proc/uptime. */
  guestBootUptime: number | null;
  guestReadyUptime: number | null;
  /** The test script's exit status (TENDER-EXIT). */
  scriptStatus: number | null;
  stderr: string;
}

export interface Guest {
  readonly proc: ChildProcess;
  readonly args: string[];
  /** Resolves when QEMU exits (never rejects). */
  readonly done: Promise<GuestResult>;
  /** Resolves with the first serial line matching `re` (rejects when QEMU exits first). */
  waitForLine(re: RegExp): Promise<string>;
  kill(): void;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const p of live) p.kill('SIGKILL');
  });
}

// tsc_early_khz / tsc=reliable: why, in src/vmm/tsc.ts (the QEMU driver passes them too).
export { hostTscKhz, tscArgs } from '../../../src/vmm/tsc.js';

export function qemuArgs(o: GuestOptions, initrd: string): string[] {
  const append = ['console=ttyS0', 'quiet', 'panic=-1', ...tscArgs()];
  if (o.ip) append.push(`tender.ip=${o.ip}`);
  if (o.mtu) append.push(`tender.mtu=${o.mtu}`);
  if (o.extraAppend) append.push(o.extraAppend);
  const args = [
    // isa-serial for the console; rtc so the guest clock is sane; no option ROMs (nothing to boot from).
    '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on',
    '-accel', 'tcg',
    '-cpu', 'max',
    '-m', String(o.memoryMiB ?? 256),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-monitor', 'none',
    '-serial', 'stdio',
    '-no-reboot',
    '-kernel', o.image.kernel,
    '-initrd', initrd,
    '-append', append.join(' '),
  ];
  const net = o.net ?? { type: 'none' };
  const mac = o.mac ?? '52:54:00:12:34:56';
  switch (net.type) {
    case 'none':
      break;
    case 'stream':
      args.push('-netdev', `stream,id=n0,server=${net.server ? 'on' : 'off'},addr.type=unix,addr.path=${net.path}`);
      break;
    case 'stream-tcp':
      args.push('-netdev', `stream,id=n0,server=${net.server ? 'on' : 'off'},addr.type=inet,addr.host=${net.host},addr.port=${net.port}`);
      break;
    case 'dgram':
      args.push('-netdev', `dgram,id=n0,local.type=unix,local.path=${net.local},remote.type=unix,remote.path=${net.remote}`);
      break;
  }
  if (net.type !== 'none') args.push('-device', `virtio-net-device,netdev=n0,mac=${mac}`);
  if (o.extraArgs) args.push(...o.extraArgs);
  return args;
}

export function startGuest(o: GuestOptions): Guest {
  installExitHook();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-guest-'));
  const initrd = initrdWithScript(o.image, path.join(tmp, 'initrd.gz'), o.script);
  const args = qemuArgs(o, initrd);
  const t0 = performance.now();
  const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(proc);

  const res: GuestResult = {
    serial: '',
    results: {},
    exitCode: null,
    signal: null,
    timedOut: false,
    bootMs: null,
    readyMs: null,
    guestBootUptime: null,
    guestReadyUptime: null,
    scriptStatus: null,
    stderr: '',
  };
  const waiters: { re: RegExp; resolve: (l: string) => void; reject: (e: Error) => void }[] = [];
  const lines: string[] = [];
  let partial = '';
  const onLine = (line: string) => {
    lines.push(line);
    o.onLine?.(line);
    let m: RegExpExecArray | null;
    if ((m = /^TENDER-RESULT ([^=\s]+)=(.*)$/.exec(line))) res.results[m[1]!] = m[2]!;
    else if ((m = /^TENDER-BOOT uptime=([\d.]+)/.exec(line))) {
      res.bootMs = performance.now() - t0;
      res.guestBootUptime = Number(m[1]);
    } else if ((m = /^TENDER-READY uptime=([\d.]+)/.exec(line))) {
      res.readyMs = performance.now() - t0;
      res.guestReadyUptime = Number(m[1]);
    } else if ((m = /^TENDER-EXIT status=(\d+)/.exec(line))) res.scriptStatus = Number(m[1]);
    for (let i = waiters.length - 1; i >= 0; i--) {
      if (waiters[i]!.re.test(line)) {
        waiters[i]!.resolve(line);
        waiters.splice(i, 1);
      }
    }
  };
  proc.stdout!.setEncoding('utf8');
  proc.stdout!.on('data', (s: string) => {
    res.serial += s;
    partial += s;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      onLine(partial.slice(0, nl).replace(/\r/g, ''));
      partial = partial.slice(nl + 1);
    }
  });
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (s: string) => (res.stderr += s));

  const timer = setTimeout(() => {
    res.timedOut = true;
    proc.kill('SIGKILL');
  }, o.timeoutMs ?? 90_000);

  const done = new Promise<GuestResult>((resolve) => {
    proc.on('close', (code, signal) => {
      clearTimeout(timer);
      live.delete(proc);
      if (partial) onLine(partial.replace(/\r/g, ''));
      res.exitCode = code;
      res.signal = signal;
      fs.rmSync(tmp, { recursive: true, force: true });
      const why = res.timedOut ? 'timed out' : `exited (${code ?? signal})`;
      for (const w of waiters.splice(0)) w.reject(new Error(`QEMU ${why} before a line matching ${w.re}; stderr: ${res.stderr.trim()}`));
      resolve(res);
    });
    proc.on('error', (e) => {
      res.stderr += `spawn error: ${e.message}\n`;
    });
  });

  return {
    proc,
    args,
    done,
    waitForLine(re: RegExp): Promise<string> {
      const seen = lines.find((l) => re.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      if (proc.exitCode !== null || proc.signalCode !== null) return Promise.reject(new Error('QEMU already exited'));
      return new Promise((resolve, reject) => waiters.push({ re, resolve, reject }));
    },
    kill(): void {
      proc.kill('SIGKILL');
    },
  };
}

/** Boot, run the script, and wait for QEMU to exit. */
export function runGuest(o: GuestOptions): Promise<GuestResult> {
  return startGuest(o).done;
}
