/**
 * The QEMU driver (Linux): microvm machines started as detached processes (they outlive the
 * daemon, which re-adopts them), controlled over QMP, watched until they end.
 *
 * Stopping: `shutdown()` sends QMP `system_powerdown`, which microvm (acpi=on) delivers as an
 * ACPI power-button press through its GED device; the default image's /init powers off on it.
 * A guest that ignores the button (another initrd, a hung kernel) is stopped by force when the
 * timeout passes. The daemon may instead ask the guest agent for POWEROFF (cleaner: the agent
 * syncs first) and use shutdown() as the fallback. Forced stop (`kill()`): QMP `quit`, which
 * lets QEMU flush a disk image's caches, then SIGKILL if QEMU does not go within 2 s.
 *
 * Exit reasons: QMP's SHUTDOWN event says who asked (guest poweroff, reboot, quit, signal),
 * the exit status and signal say how, the tails of the serial log and of QEMU's stderr
 * (<dir>/qemu.log) say what went wrong.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Accel, ExitInfo, MachineSpec, VmmDriver, VmmInstance } from './driver.js';
import { type ExitFacts, exitInfo, lastLine } from './exit-reason.js';
import { type AccelDecision, type KvmProbeOptions, accelCacheKey, probeKvm } from './kvm-probe.js';
import { pidFile, qemuArgs } from './qemu-args.js';
import { fileSize, isOurProcess, killAfter, pollUntilGone, readTail } from './process.js';
import { QmpClient, type QmpEvent } from './qmp.js';
import { hostTscKhz } from './tsc.js';
import { findVhostVsock, withVhostUserVsock } from './vhost-vsock.js';
import { type VsockChoice, chooseVsock, hostVhostVsockUsable } from './vsock-channel.js';

export function vhostUserSocket(spec: MachineSpec): string {
  return path.join(spec.dir, 'vhost-user-vsock.sock');
}

/**
 * Start tender's vhost-user vsock backend for this machine, detached like QEMU itself so both
 * survive a daemon restart; it exits when QEMU hangs up. Host-side sockets are
 * Firecracker-style: the guest's connections to port P arrive at `<agent.path>_P`.
 */
async function startVhostUserBackend(spec: MachineSpec): Promise<void> {
  if (spec.agent.kind !== 'vsock') return;
  const bin = findVhostVsock();
  if (!bin) throw new VmmStartError('vsock needs /dev/vhost-vsock or tender-vhost-vsock (npm ci builds it into build/vhost-vsock)');
  const sock = vhostUserSocket(spec);
  unlinkQuietly(sock);
  const fd = fs.openSync(path.join(spec.dir, 'vhost-vsock.log'), 'a');
  try {
    const child = spawn(bin, ['--socket', sock, '--uds', spec.agent.path, '--cid', String(spec.agent.cid)], { stdio: ['ignore', fd, fd], detached: true });
    child.unref();
  } finally {
    fs.closeSync(fd);
  }
  const deadline = Date.now() + 5000;
  while (!isSocket(sock)) {
    if (Date.now() > deadline) throw new VmmStartError(`the vhost-user vsock backend did not start (see ${path.join(spec.dir, 'vhost-vsock.log')})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Where the caller keeps probe results between runs (the daemon persists them). */
export interface AccelCache {
  get(key: string): AccelDecision | undefined | Promise<AccelDecision | undefined>;
  set(key: string, value: AccelDecision): void | Promise<void>;
}

export interface QemuDriverOptions {
  /** Default qemu-system-x86_64. */
  qemu?: string;
  /** Default: the host's, from /proc/cpuinfo. */
  tscKhz?: number | null;
  accelCache?: AccelCache;
  probe?: Omit<KvmProbeOptions, 'qemu' | 'tscKhz'>;
  /** How long start() waits for QMP to answer (QEMU loads the kernel before it does). */
  startTimeoutMs?: number;
  /** Poll interval for adopted processes. */
  pollMs?: number;
  /**
   * How long adopt() waits for QMP's greeting. QEMU serves one QMP client at a time, so while
   * another holds it (only in tests: a dead daemon's connection is closed) adopt() goes on
   * without QMP after this.
   */
  adoptQmpTimeoutMs?: number;
  /** Whether the host's /dev/vhost-vsock is usable; default: checked. false → tender's vhost-user backend. */
  hostVhostVsock?: boolean;
}

/** `VMM_START_FAILED`: QEMU exited or never answered on QMP. */
export class VmmStartError extends Error {
  readonly code = 'VMM_START_FAILED' as const;
}

/** QEMU's stderr (and start markers) for each run of this machine. */
export function qemuLogFile(spec: MachineSpec): string {
  return path.join(spec.dir, 'qemu.log');
}

function unlinkQuietly(p: string): void {
  try {
    fs.unlinkSync(p);
  } catch {
    // not there
  }
}

function isSocket(p: string): boolean {
  try {
    return fs.statSync(p).isSocket();
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Connect to QMP, retrying while QEMU has not created its socket yet. */
async function connectQmp(sock: string, deadline: number, gone: () => boolean): Promise<QmpClient> {
  let last: unknown;
  while (Date.now() < deadline && !gone()) {
    try {
      return await QmpClient.connect(sock, Math.max(1000, deadline - Date.now()));
    } catch (e) {
      last = e;
      await sleep(50);
    }
  }
  throw last instanceof Error ? last : new Error(`no QMP on ${sock}`);
}

class QemuInstance implements VmmInstance {
  readonly exited: Promise<ExitInfo>;
  private qmp: QmpClient | null = null;
  private shutdownCause: string | null = null;
  private forced = false;
  private done = false;
  private resolveExit!: (f: Omit<ExitFacts, 'shutdownCause' | 'forced' | 'stderrTail' | 'serialTail'>) => void;

  constructor(
    readonly pid: number,
    private readonly spec: MachineSpec,
    private readonly logFrom: { serial: number; stderr: number },
  ) {
    const facts = new Promise<Omit<ExitFacts, 'shutdownCause' | 'forced' | 'stderrTail' | 'serialTail'>>((r) => (this.resolveExit = r));
    this.exited = facts.then((f) => {
      this.done = true;
      this.qmp?.close();
      return exitInfo({
        ...f,
        shutdownCause: this.shutdownCause,
        forced: this.forced,
        stderrTail: readTail(qemuLogFile(this.spec), this.logFrom.stderr),
        serialTail: readTail(this.spec.serialLog, this.logFrom.serial, 16384),
      });
    });
  }

  /** The process ended (from the child's 'exit', or the poller for adopted ones). */
  ended(f: Omit<ExitFacts, 'shutdownCause' | 'forced' | 'stderrTail' | 'serialTail'>): void {
    this.resolveExit(f);
  }

  attachQmp(qmp: QmpClient): void {
    this.qmp = qmp;
    qmp.on('event', (e: QmpEvent) => {
      if (e.event === 'SHUTDOWN' && typeof e.data?.reason === 'string') this.shutdownCause = e.data.reason;
    });
  }

  get qmpClient(): QmpClient | null {
    return this.qmp?.isOpen ? this.qmp : null;
  }

  async shutdown(timeoutMs: number): Promise<ExitInfo> {
    if (this.done) return this.exited;
    const qmp = this.qmpClient;
    if (qmp) {
      try {
        await qmp.execute('system_powerdown');
      } catch {
        // QEMU is going anyway, or QMP is wedged: the timeout decides
      }
    }
    const timedOut = await Promise.race([this.exited.then(() => false), sleep(timeoutMs).then(() => true)]);
    return timedOut ? this.kill() : this.exited;
  }

  async kill(): Promise<ExitInfo> {
    if (this.done) return this.exited;
    this.forced = true;
    const qmp = this.qmpClient;
    if (qmp) qmp.execute('quit').catch(() => {});
    return killAfter(this.pid, this.exited, qmp ? 2000 : 0);
  }
}

export class QemuDriver implements VmmDriver {
  readonly name = 'qemu';
  private readonly qemu: string;
  private readonly tscKhz: number | null;
  private readonly memo = new Map<string, AccelDecision>();

  constructor(private readonly o: QemuDriverOptions = {}) {
    this.qemu = o.qemu ?? 'qemu-system-x86_64';
    this.tscKhz = o.tscKhz !== undefined ? o.tscKhz : hostTscKhz();
  }

  commandLine(spec: MachineSpec, accel: Exclude<Accel, 'auto'>): { cmd: string; args: string[] } {
    const args = qemuArgs(spec, accel, { tscKhz: this.tscKhz });
    // vsock without the host's vhost-vsock: tender's vhost-user backend serves the device.
    if (this.usesVhostUser(spec)) {
      return { cmd: this.qemu, args: withVhostUserVsock(args, { socket: vhostUserSocket(spec), memoryMiB: spec.memoryMiB }) };
    }
    return { cmd: this.qemu, args };
  }

  /** The host's vhost-vsock, else tender's vhost-user backend, else none. */
  vsock(): VsockChoice {
    return chooseVsock(this.o.hostVhostVsock !== undefined ? { host: this.o.hostVhostVsock } : {});
  }

  /** vsock without the host's vhost-vsock (or asked for explicitly): tender's vhost-user backend. */
  private usesVhostUser(spec: MachineSpec): boolean {
    if (spec.agent.kind !== 'vsock') return false;
    if (spec.agent.via) return spec.agent.via === 'vhost-user';
    return !(this.o.hostVhostVsock ?? hostVhostVsockUsable());
  }

  async resolveAccel(spec: MachineSpec): Promise<{ accel: Exclude<Accel, 'auto'>; warning?: string }> {
    if (spec.accel !== 'auto') return { accel: spec.accel };
    const key = await accelCacheKey(spec, this.qemu);
    const known = this.memo.get(key) ?? (await this.o.accelCache?.get(key));
    if (known) return known;
    const d = await probeKvm(spec, { ...this.o.probe, qemu: this.qemu, tscKhz: this.tscKhz });
    this.memo.set(key, d);
    await this.o.accelCache?.set(key, d);
    return d;
  }

  async start(spec: MachineSpec): Promise<VmmInstance> {
    const accel = spec.accel === 'auto' ? (await this.resolveAccel(spec)).accel : spec.accel;
    const { cmd, args } = this.commandLine(spec, accel);
    // QEMU 7.2's stream client connects once, asynchronously, and on failure runs on with a
    // dead NIC and no error: the listener must be there first (a test connection would be
    // taken for QEMU's by the listener, so only look at the file).
    if (spec.net.kind === 'stream' && !isSocket(spec.net.path)) {
      throw new VmmStartError(`no network listener at ${spec.net.path}: tender's stream socket must exist before QEMU starts`);
    }
    fs.mkdirSync(spec.dir, { recursive: true });
    // Leftovers of an earlier run: QEMU would reuse none of them, and a stale control
    // socket would make us talk to nobody.
    unlinkQuietly(spec.controlSocket);
    unlinkQuietly(pidFile(spec));
    if (spec.agent.kind === 'virtio-serial') unlinkQuietly(spec.agent.path);
    if (this.usesVhostUser(spec)) await startVhostUserBackend(spec);

    const log = qemuLogFile(spec);
    const logFrom = { serial: fileSize(spec.serialLog), stderr: 0 };
    const fd = fs.openSync(log, 'a');
    let child;
    try {
      fs.writeSync(fd, `--- ${new Date().toISOString()} ${cmd} ${args.map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ')}\n`);
      logFrom.stderr = fs.fstatSync(fd).size;
      // Detached: its own session, so a Ctrl-C to the daemon's terminal does not reach it and
      // it survives the daemon (which re-adopts it). stderr to a file, not a pipe, for the same reason.
      child = spawn(cmd, args, { stdio: ['ignore', 'ignore', fd], detached: true });
    } finally {
      fs.closeSync(fd);
    }
    child.unref();
    const spawned = await new Promise<Error | null>((resolve) => {
      child.once('spawn', () => resolve(null));
      child.once('error', (e) => resolve(e));
    });
    if (spawned || child.pid === undefined) throw new VmmStartError(`cannot run ${cmd}: ${spawned?.message ?? 'no pid'}`);

    const inst = new QemuInstance(child.pid, spec, logFrom);
    let exitedEarly = false;
    child.once('exit', (code, signal) => {
      exitedEarly = true;
      inst.ended({ code, signal });
    });
    try {
      const qmp = await Promise.race([
        connectQmp(spec.controlSocket, Date.now() + (this.o.startTimeoutMs ?? 30_000), () => exitedEarly),
        inst.exited.then((e) => {
          throw new VmmStartError(`QEMU did not start: ${e.reason}`);
        }),
      ]);
      inst.attachQmp(qmp);
    } catch (e) {
      if (!exitedEarly) {
        await inst.kill();
        const why = lastLine(readTail(log, logFrom.stderr));
        throw new VmmStartError(`QEMU did not answer on QMP (${(e as Error).message})${why ? `: ${why}` : ''}`);
      }
      throw e instanceof VmmStartError ? e : new VmmStartError(`QEMU did not start: ${(await inst.exited).reason}`);
    }
    return inst;
  }

  async adopt(spec: MachineSpec, pid: number): Promise<VmmInstance | null> {
    if (!Number.isInteger(pid) || pid <= 0 || !isOurProcess(pid, spec.controlSocket)) return null;
    const inst = new QemuInstance(pid, spec, { serial: fileSize(spec.serialLog), stderr: fileSize(qemuLogFile(spec)) });
    const poll = pollUntilGone(pid, spec.controlSocket, this.o.pollMs ?? 500);
    void poll.done.then(() => inst.ended({ code: null, signal: null, adopted: true }));
    try {
      const qmp = await QmpClient.connect(spec.controlSocket, this.o.adoptQmpTimeoutMs ?? 3000);
      inst.attachQmp(qmp);
      // QMP closing is how QEMU's exit usually shows first: look at once instead of next tick.
      void qmp.closed.then(() => setTimeout(() => poll.checkNow(), 20));
    } catch {
      // QMP busy or wedged: still watched by pid; kill() falls back to SIGKILL
    }
    void inst.exited.then(() => poll.stop());
    return inst;
  }
}
