/**
 * Boot the test guest (test/helpers/guest: Debian kernel + busybox initramfs) with the guest
 * agent in it, connected to the host over a virtio-serial port named org.tender.agent.0 on
 * QEMU's microvm (virtio-mmio: virtio-serial-device), the way tender's QEMU driver wires it.
 *
 * The base image loads only the network modules, so virtio_console.ko is taken from the same
 * Debian kernel package (apt-get download, unpacked on the host, never installed) and cached
 * under <test cache>/agent-modules/<kernel version>/. It and the agent binary ride in the
 * per-boot archive that initrdWithScript appends.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { type GuestImage, cacheRoot, initrdWithScript } from './guest/image.js';
import { readModule } from './guest/kmod.js';
import { qemuArgs } from './guest/qemu.js';
import { ensureAgentBuilt } from './agent.js';

const run = promisify(execFile);

/** virtio_console.ko for the image's kernel (its only dependencies, virtio and virtio_ring, are in the base image). */
export async function virtioConsoleModule(image: GuestImage): Promise<Buffer> {
  const dir = path.join(cacheRoot(), 'agent-modules', image.kernelVersion);
  const cached = path.join(dir, 'virtio_console.ko');
  if (fs.existsSync(cached)) return fs.readFileSync(cached);
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  const tmp = fs.mkdtempSync(path.join(path.dirname(dir), '.dl-'));
  try {
    await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', `linux-image-${image.kernelVersion}`], { cwd: tmp, timeout: 600_000 });
    const deb = fs.readdirSync(tmp).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download linux-image-${image.kernelVersion} produced no package`);
    const x = path.join(tmp, 'x');
    fs.mkdirSync(x);
    await run('dpkg-deb', ['-x', path.join(tmp, deb), x], { timeout: 300_000 });
    let found: string | undefined;
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (/^virtio_console\.ko(\.(xz|zst|gz))?$/.test(e.name)) found = p;
      }
    };
    walk(x);
    if (!found) throw new Error(`no virtio_console module in linux-image-${image.kernelVersion}`);
    const data = readModule(found);
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(cached + '.tmp', data);
    fs.renameSync(cached + '.tmp', cached);
    return data;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

export interface AgentGuest {
  proc: ChildProcess;
  /** QEMU's chardev socket (QEMU is the server; connect to reach the agent). */
  socketPath: string;
  t0: number;
  serial(): string;
  waitForLine(re: RegExp, timeoutMs?: number): Promise<string>;
  /** Connect to the chardev socket (retrying until QEMU created it). */
  connect(): Promise<net.Socket>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): void;
}

export async function bootAgentGuest(image: GuestImage, opts: { timeoutMs?: number } = {}): Promise<AgentGuest> {
  const agent = fs.readFileSync(ensureAgentBuilt());
  const mod = await virtioConsoleModule(image);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-agent-guest-'));
  const socketPath = path.join(tmp, 'agent.sock');
  const script = [
    'insmod /tender/virtio_console.ko || echo "TENDER-ERROR insmod virtio_console"',
    'echo "TENDER-AGENT-START uptime=$(cut -d" " -f1 /proc/uptime)"',
    '/tender/tender-agent -v &',
    // Stay up until the host powers the guest off through the agent.
    'while :; do sleep 1; done',
  ].join('\n');
  const initrd = initrdWithScript(image, path.join(tmp, 'initrd.gz'), script, {
    'tender/tender-agent': agent,
    'tender/virtio_console.ko': mod,
  });
  const args = qemuArgs(
    {
      image,
      extraArgs: [
        '-device', 'virtio-serial-device',
        '-chardev', `socket,id=agent,path=${socketPath},server=on,wait=off`,
        '-device', 'virtserialport,chardev=agent,name=org.tender.agent.0',
      ],
    },
    initrd,
  );
  const t0 = performance.now();
  const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let serial = '';
  const waiters: { re: RegExp; resolve: (l: string) => void }[] = [];
  proc.stdout!.setEncoding('utf8').on('data', (s: string) => {
    serial += s;
    for (const w of [...waiters]) {
      const m = serial.split(/\r?\n/).find((l) => w.re.test(l));
      if (m !== undefined) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  proc.stderr!.setEncoding('utf8').on('data', (s: string) => (serial += s));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    proc.on('exit', (code, signal) => {
      clearTimeout(timer);
      fs.rmSync(tmp, { recursive: true, force: true });
      r({ code, signal });
    }),
  );
  const timer = setTimeout(() => proc.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
  const kill = () => proc.kill('SIGKILL');
  process.once('exit', kill);
  return {
    proc,
    socketPath,
    t0,
    serial: () => serial,
    exited,
    kill,
    waitForLine(re, timeoutMs = 60_000) {
      const seen = serial.split(/\r?\n/).find((l) => re.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no serial line matching ${re}; serial:\n${serial}`)), timeoutMs);
        waiters.push({ re, resolve: (l) => (clearTimeout(t), resolve(l)) });
      });
    },
    async connect() {
      const end = Date.now() + 30_000;
      for (;;) {
        try {
          return await new Promise<net.Socket>((resolve, reject) => {
            const s = net.connect(socketPath, () => resolve(s));
            s.once('error', reject);
          });
        } catch (e) {
          if (Date.now() > end || proc.exitCode !== null) throw e;
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    },
  };
}

/**
 * Boot the default machine image (with an extra initrd archive appended by the caller) under
 * TCG with QEMU's user networking (the host is 10.0.2.2) and the agent's virtio-serial port
 * served at `agentSock`. The console and QEMU's messages go to `onOutput`; QEMU is killed
 * after `killAfterMs` whatever happens.
 */
export function spawnImageWithAgent(o: {
  image: { dir: string; kernel: string; initrd: string };
  initrd: string;
  agentSock: string;
  onOutput: (s: string) => void;
  killAfterMs?: number;
}): ChildProcess {
  const args = qemuArgs(
    {
      image: { dir: o.image.dir, kernel: o.image.kernel, initrd: o.image.initrd, kernelVersion: '', modules: [] },
      memoryMiB: 384,
      extraAppend: 'tender.console=0',
      extraArgs: [
        '-netdev', 'user,id=u0',
        '-device', 'virtio-net-device,netdev=u0',
        '-device', 'virtio-serial-device',
        '-chardev', `socket,id=agent,path=${o.agentSock},server=on,wait=off`,
        '-device', 'virtserialport,chardev=agent,name=org.tender.agent.0',
      ],
    },
    o.initrd,
  );
  const p = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  p.stdout!.setEncoding('utf8').on('data', o.onOutput);
  p.stderr!.setEncoding('utf8').on('data', o.onOutput);
  const killTimer = setTimeout(() => p.kill('SIGKILL'), o.killAfterMs ?? 170_000);
  p.once('exit', () => clearTimeout(killTimer));
  return p;
}
