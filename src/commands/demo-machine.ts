/**
 * `tender demo`: tender's main job on the built-in default. Boots a machine from the default
 * image on the userspace network and shows what a user gets: a lease, exec, DNS, NAT to a
 * server on the host's loopback, and a forwarded port into the machine. Runs its own daemon in
 * this process on a throwaway state directory (the default image is cached in $TENDER_HOME),
 * and removes everything it made. Everything stays on this machine.
 */
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon } from '../daemon/daemon.js';
import { defaultDeps } from '../daemon/deps.js';
import { paths, tenderHome } from '../daemon/paths.js';
import { buildDefaultImage } from '../image/default-image.js';
import { createLogger } from '../log.js';
import type { ExecHandle } from '../agent/client.js';
import type { AgentSession } from '../daemon/machines.js';

async function run(agent: AgentSession, argv: string[]): Promise<{ code: number | null; out: string }> {
  const h: ExecHandle = agent.exec(argv, {});
  let out = '';
  h.stdout.on('data', (d: Buffer) => (out += d));
  h.stderr.on('data', (d: Buffer) => (out += d));
  h.stdin.end();
  const st = await h.exit;
  return { code: st.code, out: out.trim() };
}

export async function runMachineDemo(): Promise<void> {
  const say = (s: string) => process.stdout.write(s + '\n');
  const step = async (title: string, f: () => Promise<string>) => {
    try {
      const r = await f();
      say(`  ok    ${title}${r ? `\n        ${r.split('\n').join('\n        ')}` : ''}`);
      return true;
    } catch (err) {
      say(`  FAIL  ${title}: ${(err as Error).message}`);
      process.exitCode = 1;
      return false;
    }
  };
  // The steps say what matters (the accelerator chosen is shown); the log keeps to errors.
  const log = createLogger(process.env.TENDER_LOG ?? 'error');
  const home = mkdtempSync(join(tmpdir(), 'tender-demo-home-'));
  const server = http.createServer((_req, res) => res.end('hello from a server on the host\'s 127.0.0.1\n'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const hostPort = (server.address() as net.AddressInfo).port;
  let daemon: Awaited<ReturnType<typeof startDaemon>> | null = null;
  try {
    say('tender demo: a micro-VM on tender\'s userspace network\n');
    if (!(await step('default image (Debian kernel + busybox + tender agent; built once, then cached)', async () => {
      const t = Date.now();
      const img = await buildDefaultImage({ home: tenderHome() });
      cpSync(img.dir, join(home, 'images', 'default'), { recursive: true });
      return `kernel ${img.version}, ${img.modules.length} modules (${((Date.now() - t) / 1000).toFixed(1)} s)`;
    }))) return;
    daemon = await startDaemon({ home, log, deps: defaultDeps(paths(tenderHome())) });
    const d = daemon;
    let info = d.machines.create({ name: 'demo', memoryMiB: 256, forwards: ['0:80'] });
    if (!(await step('boot machine "demo" and wait for its agent and a DHCP lease', async () => {
      const t = Date.now();
      info = await d.machines.start('demo');
      return `${info.state} at ${info.ip} in ${((Date.now() - t) / 1000).toFixed(1)} s (accelerator: ${info.accel})`;
    }))) return;
    const agent = await d.machines.agentOf('demo');
    await step('exec: uname -sr', async () => (await run(agent, ['uname', '-sr'])).out);
    await step('DNS inside the machine: host.tender.internal', async () => {
      // The guest writes resolv.conf just after its lease: give it a moment.
      for (let i = 0; ; i++) {
        const r = await run(agent, ['nslookup', 'host.tender.internal']);
        const m = /Address:\s*(192\.168\.127\.254)/.exec(r.out);
        if (m) return `→ ${m[1]}`;
        if (i === 20) throw new Error(r.out);
        await new Promise((res) => setTimeout(res, 150));
      }
    });
    await step(`NAT: the machine fetches http://host.tender.internal:${hostPort}/ (a server on the host's loopback)`, async () => {
      const r = await run(agent, ['wget', '-qO-', `http://host.tender.internal:${hostPort}/`]);
      if (r.code !== 0) throw new Error(r.out);
      return `→ ${r.out}`;
    });
    await step('port forward: a web server in the machine, reached from the host', async () => {
      await run(agent, ['sh', '-c', 'mkdir -p /www && echo "served from inside the machine" > /www/index.html && busybox httpd -p 80 -h /www']);
      const f = d.machines.inspect('demo').forwards[0]!;
      const body = await new Promise<string>((resolve, reject) =>
        http.get(`http://127.0.0.1:${f.hostPort}/`, (res) => {
          let s = '';
          res.on('data', (c) => (s += c));
          res.on('end', () => resolve(s.trim()));
        }).on('error', reject),
      );
      return `curl http://127.0.0.1:${f.hostPort}/ → ${body}`;
    });
    await step('stop and remove the machine', async () => {
      const s = await d.machines.stop('demo');
      await d.machines.remove('demo');
      return `${s.state} (${d.machines.names().length === 0 ? 'removed' : 'still listed'})`;
    });
    say(`\nTry it yourself: tender machine create dev --start && tender machine shell dev`);
  } finally {
    if (daemon) {
      for (const n of daemon.machines.names()) await daemon.machines.remove(n, { force: true }).catch(() => {});
      await daemon.stop();
    }
    server.close();
    rmSync(home, { recursive: true, force: true });
  }
}
