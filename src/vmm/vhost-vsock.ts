/**
 * The supervisor of tender-vhost-vsock (native/vhost-vsock): the vhost-user virtio-vsock device
 * that gives QEMU machines AF_VSOCK without /dev/vhost-vsock, with Firecracker's hybrid vsock
 * on the host side (`<uds>` takes `CONNECT <port>\n` → `OK <hostport>\n`; a guest connecting
 * to port P reaches the listener at `<uds>_P`). See docs/vsock.md.
 *
 * The helper is a separate process (rings and sockets on its own poll() loop, nothing on
 * Node's event loop). It serves one QEMU connection and exits 0 when QEMU hangs up (the
 * machine powered off or QEMU died); with `restart` (the default) a fresh helper listens
 * again, so the next boot of the machine finds its socket. Start it before QEMU: QEMU's
 * `-chardev socket` (client) fails at once when nobody listens.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import net from 'node:net';
import * as path from 'node:path';
import { packageRoot } from '../../native/index.js';

/** Where `make -C native/vhost-vsock` puts the helper ($TENDER_VHOST_VSOCK_BINARY overrides). */
export function defaultVhostVsockPath(): string {
  return process.env.TENDER_VHOST_VSOCK_BINARY || path.join(packageRoot(), 'build', 'vhost-vsock', 'tender-vhost-vsock');
}

/** The helper if it was built and is executable, else null. */
export function findVhostVsock(binary = defaultVhostVsockPath()): string | null {
  try {
    fs.accessSync(binary, fs.constants.X_OK);
    return binary;
  } catch {
    return null;
  }
}

/** `VHOST_VSOCK_FAILED`: the helper is missing, could not listen, or died before READY. */
export class VhostVsockError extends Error {
  readonly code = 'VHOST_VSOCK_FAILED' as const;
}

export interface VhostVsockOptions {
  /** The vhost-user socket QEMU connects to (`-chardev socket,path=...`). */
  socket: string;
  /** Hybrid vsock base path: host-initiated `<uds>`, guest-initiated `<uds>_<port>`. */
  uds: string;
  /** The guest's CID (GET_CONFIG's guest_cid), >= 3. */
  cid: number;
  binary?: string;
  /** Start a fresh helper after QEMU hangs up (default true). */
  restart?: boolean;
  /** Pass -v: every vhost-user request and connection on stderr. */
  verbose?: boolean;
  /** The helper's stderr, line by line (default: dropped). */
  onLog?: (line: string) => void;
  /** How long to wait for READY (default 5 s). */
  readyTimeoutMs?: number;
}

export interface VhostVsockExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * QEMU arguments for a machine using the helper, given the driver's qemuArgs() array:
 * guest RAM becomes a shared memfd (vhost-user maps it: `memory-backend-memfd,share=on`,
 * wired with microvm's `memory-backend=` property, QEMU >= 6.0), the kernel's vhost-vsock
 * device (if any) is replaced by `vhost-user-vsock-device` on a chardev to `socket`.
 */
export function withVhostUserVsock(args: readonly string[], o: { socket: string; memoryMiB: number }): string[] {
  const out: string[] = [];
  let machine = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const v = args[i + 1];
    if ((a === '-M' || a === '-machine') && v !== undefined) {
      out.push(a, `${v},memory-backend=tender-vsock-mem`);
      machine = true;
      i++;
    } else if (a === '-device' && v !== undefined && /^vhost-vsock-device(,|$)/.test(v)) {
      i++; // replaced below
    } else {
      out.push(a);
    }
  }
  if (!machine) out.push('-M', 'microvm,memory-backend=tender-vsock-mem');
  out.push(
    '-object', `memory-backend-memfd,id=tender-vsock-mem,size=${o.memoryMiB}M,share=on`,
    '-chardev', `socket,id=tender-vsock,path=${o.socket.replace(/,/g, ',,')}`,
    '-device', 'vhost-user-vsock-device,chardev=tender-vsock',
  );
  return out;
}

/**
 * The helper's named drop counters (docs/vsock.md): every packet, descriptor chain or host
 * request it dropped or refused, by reason. `STATS name=N ...` is the helper's line format.
 */
export type VhostVsockStats = Record<string, number>;

export function parseVhostVsockStats(line: string): VhostVsockStats | null {
  const words = line.trim().split(/\s+/);
  if (words[0] !== 'STATS') return null;
  const out: VhostVsockStats = {};
  for (const w of words.slice(1)) {
    const m = /^([a-z_]+)=(\d+)$/.exec(w);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

/** The counters from `<uds>.stats` (rewritten by the helper at most once a second), or null. */
export function readVhostVsockStatsFile(uds: string): VhostVsockStats | null {
  try {
    return parseVhostVsockStats(fs.readFileSync(`${uds}.stats`, 'utf8'));
  } catch {
    return null;
  }
}

/** The live counters: `STATS\n` on the helper's host socket (`uds`). */
export function queryVhostVsockStats(uds: string, timeoutMs = 2000): Promise<VhostVsockStats> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(uds);
    let text = '';
    const timer = setTimeout(() => sock.destroy(new VhostVsockError(`no STATS answer on ${uds} within ${timeoutMs} ms`)), timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write('STATS\n'));
    sock.on('data', (d: string) => (text += d));
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    sock.on('end', () => {
      clearTimeout(timer);
      const st = parseVhostVsockStats(text);
      if (st) resolve(st);
      else reject(new VhostVsockError(`not a STATS line from ${uds}: ${JSON.stringify(text.slice(0, 80))}`));
    });
  });
}

export class VhostVsock {
  private child: ChildProcess | null = null;
  private stopping = false;
  private restartsDone = 0;
  private readonly exitWaiters: ((e: VhostVsockExit) => void)[] = [];
  private lastExit: VhostVsockExit | null = null;

  private constructor(
    private readonly o: VhostVsockOptions,
    private readonly binary: string,
  ) {}

  /** Spawns the helper and resolves once both sockets listen. */
  static async start(o: VhostVsockOptions): Promise<VhostVsock> {
    const binary = findVhostVsock(o.binary);
    if (!binary) throw new VhostVsockError(`tender-vhost-vsock not built (${o.binary ?? defaultVhostVsockPath()}): run make -C native/vhost-vsock`);
    if (!Number.isInteger(o.cid) || o.cid < 3 || o.cid > 0xffffffff) throw new VhostVsockError(`guest CID must be an integer in 3..2^32-1, not ${o.cid}`);
    const v = new VhostVsock(o, binary);
    await v.spawn();
    return v;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** How many times a helper was started again after QEMU hung up. */
  get restarts(): number {
    return this.restartsDone;
  }

  /** Resolves when the helper is gone for good (stop(), a failure, or restart: false). */
  exited(): Promise<VhostVsockExit> {
    if (this.lastExit && !this.child) return Promise.resolve(this.lastExit);
    return new Promise((r) => this.exitWaiters.push(r));
  }

  /** SIGTERM (the helper unlinks its sockets), SIGKILL after 2 s. */
  async stop(): Promise<void> {
    this.stopping = true;
    const c = this.child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const gone = new Promise<void>((r) => c.once('exit', () => r()));
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 2000);
    await gone;
    clearTimeout(t);
  }

  private spawn(): Promise<void> {
    const o = this.o;
    const argv = ['--socket', o.socket, '--uds', o.uds, '--cid', String(o.cid)];
    if (o.verbose) argv.push('-v');
    const child = spawn(this.binary, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    let err = '';
    let stderrRest = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (s: string) => {
      err = (err + s).slice(-4096);
      const lines = (stderrRest + s).split('\n');
      stderrRest = lines.pop()!;
      for (const l of lines) o.onLog?.(l);
    });
    return new Promise<void>((resolve, reject) => {
      let ready = false;
      let out = '';
      const timer = setTimeout(() => {
        if (ready) return;
        child.kill('SIGKILL');
        reject(new VhostVsockError(`tender-vhost-vsock not ready after ${o.readyTimeoutMs ?? 5000} ms: ${err.trim()}`));
      }, o.readyTimeoutMs ?? 5000);
      child.stdout!.setEncoding('utf8');
      child.stdout!.on('data', (s: string) => {
        out += s;
        if (!ready && /^READY$/m.test(out)) {
          ready = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('error', (e) => {
        clearTimeout(timer);
        if (!ready) reject(new VhostVsockError(`tender-vhost-vsock: ${e.message}`));
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        if (this.child === child) this.child = null;
        const e = { code, signal };
        if (!ready) {
          reject(new VhostVsockError(`tender-vhost-vsock exited (${code ?? signal}) before READY: ${err.trim()}`));
          return this.finish(e);
        }
        // Exit 0 without being asked: QEMU hung up. Listen again for the next boot.
        if (code === 0 && !this.stopping && (o.restart ?? true)) {
          this.restartsDone++;
          this.spawn().catch(() => this.finish(e));
          return;
        }
        this.finish(e);
      });
    });
  }

  private finish(e: VhostVsockExit): void {
    this.lastExit = e;
    for (const w of this.exitWaiters.splice(0)) w(e);
  }
}
