/**
 * Run the built guest agent (build/agent/tender-agent) on the host as a child process, for
 * end-to-end tests without a VM: the test listens on a unix socket, the agent connects with
 * `--unix PATH` (a stand-in for the virtio-serial port, with the same reconnect behaviour),
 * and each accepted connection gets an AgentClient.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AgentClient } from '../../src/agent/client.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** TENDER_AGENT_BIN runs another build (an ASan one, a cross-built one under qemu-user). */
export const AGENT_BIN = process.env.TENDER_AGENT_BIN || path.join(ROOT, 'build/agent/tender-agent');

/** Build the agent when the binary is missing or older than its sources. */
export function ensureAgentBuilt(): string {
  execFileSync('make', ['-s', '-C', path.join(ROOT, 'native/agent')], { stdio: ['ignore', 'ignore', 'inherit'] });
  return AGENT_BIN;
}

export interface HostedAgent {
  proc: ChildProcess;
  socketPath: string;
  /** Resolves with the next connection the agent makes. */
  nextConnection(): Promise<net.Socket>;
  /** Connection + client, waiting for HELLO. */
  nextClient(): Promise<AgentClient>;
  stderr(): string;
  /** VmRSS of the agent process, KiB. */
  rssKiB(): number;
  stop(): Promise<void>;
}

export async function hostAgent(opts: { wrap?: string[]; extraArgs?: string[] } = {}): Promise<HostedAgent> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-agent-'));
  const socketPath = path.join(dir, 'agent.sock');
  const queue: net.Socket[] = [];
  const waiters: ((s: net.Socket) => void)[] = [];
  const server = net.createServer((s) => {
    const w = waiters.shift();
    if (w) w(s);
    else queue.push(s);
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  const verbose = process.env.TENDER_AGENT_VERBOSE ? ['-v'] : [];
  const cmd = [...(opts.wrap ?? []), AGENT_BIN, '--unix', socketPath, '--no-power', ...verbose, ...(opts.extraArgs ?? [])];
  const proc = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  const nextConnection = () =>
    new Promise<net.Socket>((resolve, reject) => {
      const q = queue.shift();
      if (q) return resolve(q);
      const t = setTimeout(() => reject(new Error(`agent did not connect; stderr: ${err}`)), 15_000);
      waiters.push((s) => {
        clearTimeout(t);
        resolve(s);
      });
    });
  return {
    proc,
    socketPath,
    nextConnection,
    async nextClient() {
      const c = new AgentClient(await nextConnection());
      await c.ready;
      return c;
    },
    stderr: () => err,
    rssKiB() {
      // With a wrapper (ip netns exec) the agent is the wrapper's exec'd self: same pid.
      const m = /^VmRSS:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${proc.pid}/status`, 'utf8'));
      return m ? Number(m[1]) : NaN;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGKILL');
        await new Promise((r) => proc.once('exit', r));
      }
      for (const s of queue) s.destroy();
      await new Promise((r) => server.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Everything a Readable produces, as one Buffer. */
export async function collect(r: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(Buffer.from(c as Buffer));
  return Buffer.concat(parts);
}

/** Poll `cond` every `everyMs` until it holds (bounded by `totalMs`). */
export async function until<T>(cond: () => T | undefined | false | null, what: string, totalMs = 10_000, everyMs = 20): Promise<T> {
  const end = Date.now() + totalMs;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
