/**
 * The vfkit driver (macOS, Apple Virtualization framework; crc-org/vfkit doc/usage.md).
 * It cannot run on Linux: its command lines and REST calls are unit-tested against a fake
 * server, and the process handling mirrors the QEMU driver's.
 *
 * How a machine maps onto vfkit:
 * - `--bootloader linux,kernel=K,initrd=I,cmdline="..."`: the kernel must be uncompressed
 *   (an arm64 Image on Apple silicon); the console is the virtio-serial device, hvc0.
 * - net `dgram` → `--device virtio-net,unixSocketPath=<remotePath>,mac=M`: vfkit binds a socket
 *   of its own next to tender's and sends "VFKT" first (DatagramLink.listen handles both);
 *   `localPath` is vfkit's business and not passed. vfkit has no stream transport.
 * - agent `vsock` → `--device virtio-vsock,port=P,socketURL=PATH_P,listen` for each port the
 *   host serves (the agent's 1024, USB/IP's 3240): the guest connects out to CID 2 port P, and
 *   vfkit connects to tender's unix listener at PATH_P for each such connection (a plain byte
 *   stream, no handshake) — the hybrid-vsock layout of Firecracker and of tender's vhost-user
 *   backend, so the daemon serves all of them the same way. vfkit has no virtio-serial port for
 *   programs, so agent `virtio-serial` is refused.
 * - serial log → `--device virtio-serial,logFilePath=LOG`; control → `--restful-uri unix://SOCK`.
 * - disk → `--device virtio-blk,path=F` (raw only: the framework has no qcow2).
 * Stop: REST `Stop` (a power-button press the guest handles), then `HardStop`, then SIGKILL.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Accel, ExitInfo, MachineSpec, VmmDriver, VmmInstance } from './driver.js';
import { lastLine } from './exit-reason.js';
import { diskFormat } from './qemu-args.js';
import { fileSize, isOurProcess, killAfter, pollUntilGone, readTail } from './process.js';
import { VfkitRest, restfulUri } from './vfkit-rest.js';
import type { VsockChoice } from './vsock-channel.js';

export class VfkitSpecError extends Error {
  readonly code = 'BAD_ARGUMENT' as const;
}

export class VfkitStartError extends Error {
  readonly code = 'VMM_START_FAILED' as const;
}

export function vfkitCmdline(spec: MachineSpec): string {
  const words = ['console=hvc0'];
  const has = (p: string) => spec.cmdline.some((w) => w === p || w.startsWith(`${p}=`));
  if (spec.agent.kind === 'vsock') words.push(`tender.agent=vsock:${spec.agent.port}`);
  if (spec.agent.kind === 'none') words.push('tender.agent=none');
  if (spec.disk && !has('root')) {
    words.push('root=/dev/vda');
    if (!has('ro') && !has('rw')) words.push('rw');
  }
  const all = [...words, ...spec.cmdline];
  // The value is quoted for vfkit's option parser; a quote inside cannot be expressed.
  if (all.some((w) => w.includes('"'))) throw new VfkitSpecError('a kernel command-line word for vfkit cannot contain a double quote');
  return all.join(' ');
}

/** vfkit's option values are comma-separated key=value lists. */
function noComma(what: string, v: string): string {
  if (v.includes(',')) throw new VfkitSpecError(`${what} cannot contain a comma for vfkit: ${v}`);
  return v;
}

export function vfkitArgs(spec: MachineSpec, accel: Exclude<Accel, 'auto'>): string[] {
  if (accel !== 'hvf') throw new VfkitSpecError(`vfkit runs on the Virtualization framework (accel hvf), not ${accel}`);
  if (!Number.isInteger(spec.cpus) || spec.cpus < 1) throw new VfkitSpecError(`cpus must be a positive integer, not ${spec.cpus}`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 64) throw new VfkitSpecError(`memory must be at least 64 MiB, not ${spec.memoryMiB}`);
  let boot = `linux,kernel=${noComma('kernel path', spec.kernel)}`;
  if (spec.initrd) boot += `,initrd=${noComma('initrd path', spec.initrd)}`;
  boot += `,cmdline="${vfkitCmdline(spec)}"`;
  const args = ['--cpus', String(spec.cpus), '--memory', String(spec.memoryMiB), '--bootloader', boot];

  const net = spec.net;
  if (net.kind === 'stream') throw new VfkitSpecError('vfkit has no stream network transport: use dgram (unixSocketPath)');
  if (net.kind === 'dgram') args.push('--device', `virtio-net,unixSocketPath=${noComma('socket path', net.remotePath)},mac=${net.mac}`);

  const agent = spec.agent;
  if (agent.kind === 'virtio-serial') throw new VfkitSpecError('vfkit has no virtio-serial port for the agent: use a vsock agent channel');
  if (agent.kind === 'vsock') {
    // One entry per port the host serves (the agent's, USB/IP's), each at <path>_<port>: the
    // same hybrid-vsock layout as Firecracker's and tender's vhost-user backend.
    for (const port of agent.hostPorts ?? [agent.port]) {
      args.push('--device', `virtio-vsock,port=${port},socketURL=${noComma('socket path', `${agent.path}_${port}`)},listen`);
    }
  }

  args.push('--device', `virtio-serial,logFilePath=${noComma('log path', spec.serialLog)}`);
  if (spec.disk) {
    if (diskFormat(spec.disk) !== 'raw') throw new VfkitSpecError(`vfkit takes raw disk images only; convert ${spec.disk} with qemu-img convert -O raw`);
    args.push('--device', `virtio-blk,path=${noComma('disk path', spec.disk)}`);
  }
  args.push('--restful-uri', restfulUri(spec.controlSocket));
  return args;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface VfkitDriverOptions {
  /** Default `vfkit` on PATH. */
  vfkit?: string;
  startTimeoutMs?: number;
  pollMs?: number;
}

function vfkitLogFile(spec: MachineSpec): string {
  return path.join(spec.dir, 'vfkit.log');
}

interface Facts {
  code: number | null;
  signal: string | null;
  adopted?: boolean;
}

class VfkitInstance implements VmmInstance {
  readonly exited: Promise<ExitInfo>;
  private resolveFacts!: (f: Facts) => void;
  private done = false;
  private forced = false;

  constructor(
    readonly pid: number,
    private readonly spec: MachineSpec,
    private readonly rest: VfkitRest,
    logFrom: number,
  ) {
    this.exited = new Promise<Facts>((r) => (this.resolveFacts = r)).then((f) => {
      this.done = true;
      const tail = readTail(vfkitLogFile(spec), logFrom);
      let reason: string;
      if (f.signal) reason = this.forced ? `stopped by force (${f.signal})` : `killed by ${f.signal}`;
      else if (f.code !== null && f.code !== 0) reason = `vfkit exited with status ${f.code}${lastLine(tail) ? `: ${lastLine(tail)}` : ''}`;
      else if (this.forced) reason = 'stopped by force';
      else if (f.adopted) reason = 'vfkit exited (started by an earlier tender daemon: exit status unknown)';
      else reason = 'powered off';
      return { code: f.code, signal: f.signal, reason };
    });
  }

  ended(f: Facts): void {
    this.resolveFacts(f);
  }

  async shutdown(timeoutMs: number): Promise<ExitInfo> {
    if (this.done) return this.exited;
    try {
      await this.rest.setState('Stop');
    } catch {
      // the guest may not accept a stop request: the timeout decides
    }
    const timedOut = await Promise.race([this.exited.then(() => false), sleep(timeoutMs).then(() => true)]);
    return timedOut ? this.kill() : this.exited;
  }

  async kill(): Promise<ExitInfo> {
    if (this.done) return this.exited;
    this.forced = true;
    let asked = false;
    try {
      await this.rest.setState('HardStop');
      asked = true;
    } catch {
      // REST gone or refused: signal instead
    }
    return killAfter(this.pid, this.exited, asked ? 2000 : 0);
  }
}

export class VfkitDriver implements VmmDriver {
  readonly name = 'vfkit';
  private readonly vfkit: string;

  constructor(private readonly o: VfkitDriverOptions = {}) {
    this.vfkit = o.vfkit ?? 'vfkit';
  }

  commandLine(spec: MachineSpec, accel: Exclude<Accel, 'auto'>): { cmd: string; args: string[] } {
    return { cmd: this.vfkit, args: vfkitArgs(spec, accel) };
  }

  /** vfkit always has vsock of its own (VZVirtioSocketDevice), with per-port unix sockets. */
  vsock(): VsockChoice {
    return { via: 'vmm' };
  }

  /** The Virtualization framework is the only accelerator vfkit has; there is nothing to probe. */
  async resolveAccel(_spec: MachineSpec): Promise<{ accel: Exclude<Accel, 'auto'>; warning?: string }> {
    return { accel: 'hvf' };
  }

  async start(spec: MachineSpec): Promise<VmmInstance> {
    const { cmd, args } = this.commandLine(spec, spec.accel === 'auto' ? 'hvf' : spec.accel);
    fs.mkdirSync(spec.dir, { recursive: true });
    try {
      fs.unlinkSync(spec.controlSocket);
    } catch {
      // not there
    }
    const log = vfkitLogFile(spec);
    const fd = fs.openSync(log, 'a');
    let child;
    let logFrom: number;
    try {
      fs.writeSync(fd, `--- ${new Date().toISOString()} ${cmd} ${args.join(' ')}\n`);
      logFrom = fs.fstatSync(fd).size;
      child = spawn(cmd, args, { stdio: ['ignore', fd, fd], detached: true });
    } finally {
      fs.closeSync(fd);
    }
    child.unref();
    const spawnErr = await new Promise<Error | null>((resolve) => {
      child.once('spawn', () => resolve(null));
      child.once('error', (e) => resolve(e));
    });
    if (spawnErr || child.pid === undefined) throw new VfkitStartError(`cannot run ${cmd}: ${spawnErr?.message ?? 'no pid'}`);
    const rest = new VfkitRest(spec.controlSocket, 2000);
    const inst = new VfkitInstance(child.pid, spec, rest, logFrom);
    let gone = false;
    child.once('exit', (code, signal) => {
      gone = true;
      inst.ended({ code, signal });
    });
    // Up when the REST socket answers (vfkit serves it once the VM is configured).
    const deadline = Date.now() + (this.o.startTimeoutMs ?? 30_000);
    for (;;) {
      if (gone) throw new VfkitStartError(`vfkit did not start: ${(await inst.exited).reason}`);
      try {
        await rest.getState();
        return inst;
      } catch {
        if (Date.now() > deadline) {
          await inst.kill();
          throw new VfkitStartError(`vfkit did not answer on ${spec.controlSocket} within ${this.o.startTimeoutMs ?? 30_000} ms`);
        }
        await sleep(100);
      }
    }
  }

  async adopt(spec: MachineSpec, pid: number): Promise<VmmInstance | null> {
    if (!Number.isInteger(pid) || pid <= 0 || !isOurProcess(pid, spec.controlSocket)) return null;
    const inst = new VfkitInstance(pid, spec, new VfkitRest(spec.controlSocket, 2000), fileSize(vfkitLogFile(spec)));
    const poll = pollUntilGone(pid, spec.controlSocket, this.o.pollMs ?? 500);
    void poll.done.then(() => inst.ended({ code: null, signal: null, adopted: true }));
    void inst.exited.then(() => poll.stop());
    return inst;
  }
}
