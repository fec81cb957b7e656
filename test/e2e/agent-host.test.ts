/**
 * The guest agent end to end, run on the host itself (it is an ordinary Linux program): the
 * built static binary connects to the test over a unix socket standing in for the
 * virtio-serial port, and the real AgentClient talks to it. Listener reporting runs the
 * agent inside a network namespace created here, so its /proc/net is that namespace's.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { AgentClient, AgentError } from '../../src/agent/client.js';
import { AgentErrorCode, MsgType, encodeFrame, type Listener } from '../../src/agent/protocol.js';
import { collect, ensureAgentBuilt, type HostedAgent, hostAgent, until } from '../helpers/agent.js';

beforeAll(() => {
  ensureAgentBuilt();
});

describe('agent on the host', () => {
  let agent: HostedAgent;
  let client: AgentClient;

  beforeAll(async () => {
    agent = await hostAgent();
    client = await agent.nextClient();
  });
  afterAll(async () => {
    client?.close();
    await agent?.stop();
  });

  test('HELLO describes the machine', () => {
    expect(client.hello).toEqual({
      protocolVersion: 1,
      agentVersion: '0.1.0',
      kernelRelease: os.release(),
      hostname: os.hostname(),
      bootId: fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(),
    });
  });

  test('ping', async () => {
    expect(await client.ping()).toBeGreaterThanOrEqual(0);
  });

  test('echo hi: stdout and exit 0', async () => {
    const h = client.exec(['echo', 'hi']);
    const [out, err, st] = await Promise.all([collect(h.stdout), collect(h.stderr), h.exit]);
    expect(out.toString()).toBe('hi\n');
    expect(err.length).toBe(0);
    expect(st).toEqual({ code: 0, signal: null });
    expect((await h.started).pid).toBeGreaterThan(1);
  });

  test('exit status, stderr, env and cwd', async () => {
    const h1 = client.exec(['sh', '-c', 'exit 3']);
    expect(await h1.exit).toEqual({ code: 3, signal: null });
    const h2 = client.exec(['sh', '-c', 'echo "$FOO"; pwd; echo oops >&2'], { env: { FOO: 'bar baz' }, cwd: '/tmp' });
    const [out, err, st] = await Promise.all([collect(h2.stdout), collect(h2.stderr), h2.exit]);
    expect(out.toString()).toBe('bar baz\n/tmp\n');
    expect(err.toString()).toBe('oops\n');
    expect(st.code).toBe(0);
  });

  test('a command that does not exist, a missing cwd: EXEC_FAILED with errno', async () => {
    const h = client.exec(['/nonexistent/command']);
    const e = await h.exit.catch((x: unknown) => x);
    expect(e).toBeInstanceOf(AgentError);
    expect((e as AgentError).code).toBe('EXEC_FAILED');
    expect((e as AgentError).errno).toBe(2); // ENOENT
    await expect(h.started).rejects.toMatchObject({ code: 'EXEC_FAILED' });
    const h2 = client.exec(['true'], { cwd: '/nonexistent-dir' });
    await expect(h2.exit).rejects.toMatchObject({ code: 'EXEC_FAILED', errno: 2, message: expect.stringMatching(/^chdir/) });
    // A request the client can tell is bad never reaches the agent.
    await expect(client.exec([]).exit).rejects.toMatchObject({ code: 'EXEC_FAILED' });
  });

  test('stdin round trip through cat (4 MiB, more than the stdin window)', async () => {
    const data = randomBytes(4 << 20);
    const h = client.exec(['cat']);
    h.stdin.end(data);
    const [out, st] = await Promise.all([collect(h.stdout), h.exit]);
    expect(st.code).toBe(0);
    expect(out.equals(data)).toBe(true);
  });

  test('a tty: /dev/pts, stty size, resize', async () => {
    const h = client.exec(['sh', '-c', 'tty; stty size; read x; stty size'], { tty: true, rows: 33, cols: 101 });
    let out = '';
    h.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    await until(() => /33 101/.test(out), 'first stty size');
    expect(out).toMatch(/^\/dev\/pts\/\d+\r\n33 101\r\n/);
    h.resize(40, 120);
    h.stdin.write('go\n');
    const st = await h.exit;
    expect(st.code).toBe(0);
    expect(out).toMatch(/go\r\n40 120\r\n$/);
    expect((await collect(h.stderr)).length).toBe(0);
  });

  test('a tty with stdin EOF ends cat', async () => {
    const h = client.exec(['cat'], { tty: true });
    h.stdin.end('line\n');
    const [out, st] = await Promise.all([collect(h.stdout), h.exit]);
    expect(st).toEqual({ code: 0, signal: null });
    expect(out.toString()).toContain('line\r\n');
  });

  test('a signal kills sleep', async () => {
    const h = client.exec(['sleep', '1000']);
    await h.started;
    h.signal('SIGTERM');
    expect(await h.exit).toEqual({ code: null, signal: 'SIGTERM' });
    const h2 = client.exec(['sh', '-c', 'sleep 1000; echo never']);
    await h2.started;
    h2.signal(9); // the whole process group, not only sh
    expect(await h2.exit).toEqual({ code: null, signal: 'SIGKILL' });
  });

  test('several execs at once, each with its own output', async () => {
    const hs = Array.from({ length: 12 }, (_, i) => client.exec(['sh', '-c', `read x; echo "$x-${i}"; exit ${i}`]));
    // Answer them in reverse order: none waits for another.
    for (const [i, h] of [...hs.entries()].reverse()) h.stdin.end(`n${i}\n`);
    const res = await Promise.all(hs.map(async (h) => [(await collect(h.stdout)).toString(), (await h.exit).code]));
    expect(res).toEqual(hs.map((_, i) => [`n${i}-${i}\n`, i]));
  });

  test('50 MiB of stdout through flow control: intact, bounded, agent memory flat', async () => {
    const cmd = 'seq 1 6700000'; // 52.6 MB of text: order and loss both show in the hash
    const expected = createHash('sha256').update(execFileSync('sh', ['-c', cmd], { maxBuffer: 1 << 27 })).digest('hex');
    const rss0 = agent.rssKiB();
    const h = client.exec(['sh', '-c', cmd]);
    // Not reading: the agent may send no more than one window (256 KiB) beyond what was acked.
    h.stdout.pause();
    await until(() => h.stdout.readableLength >= 256 * 1024, 'the first window');
    await new Promise((r) => setTimeout(r, 300));
    expect(h.stdout.readableLength).toBeLessThanOrEqual(256 * 1024 + 64 * 1024);
    const hash = createHash('sha256');
    let total = 0;
    h.stdout.on('data', (c: Buffer) => {
      hash.update(c);
      total += c.length;
    });
    h.stdout.resume();
    const st = await h.exit;
    await new Promise((r) => setImmediate(r));
    expect(st.code).toBe(0);
    expect(total).toBeGreaterThan(50 << 20);
    expect(hash.digest('hex')).toBe(expected);
    expect(agent.rssKiB() - rss0).toBeLessThan(1024);
  });

  test('a background child holding stdout open does not hold EXIT back', async () => {
    const h = client.exec(['sh', '-c', 'sleep 1000 & echo "$!"; echo done']);
    const [out, st] = await Promise.all([collect(h.stdout), h.exit]);
    expect(st).toEqual({ code: 0, signal: null });
    const [bg, done] = out.toString().split('\n');
    expect(done).toBe('done');
    process.kill(Number(bg), 'SIGKILL');
  });

  test('at most 64 processes at once: the 65th is refused, the others run on', async () => {
    const hs = Array.from({ length: 64 }, () => client.exec(['sleep', '1000']));
    await Promise.all(hs.map((h) => h.started));
    const extra = client.exec(['true']);
    await expect(extra.exit).rejects.toMatchObject({ code: 'AGENT_REJECTED', agentCode: AgentErrorCode.TOO_MANY_STREAMS });
    for (const h of hs) h.signal('SIGKILL');
    const sts = await Promise.all(hs.map((h) => h.exit));
    expect(sts.every((st) => st.signal === 'SIGKILL')).toBe(true);
    expect((await client.exec(['true']).exit).code).toBe(0);
  });

  test('POWEROFF under --no-power is refused with a code', async () => {
    await expect(client.poweroff()).rejects.toMatchObject({ code: 'AGENT_REJECTED', agentCode: AgentErrorCode.POWER_DISABLED });
  });

  test('malformed requests get ERRORs; the session and the agent survive', async () => {
    const errors: AgentError[] = [];
    client.on('agent-error', (e: AgentError) => errors.push(e));
    const sock = (client as unknown as { io: NodeJS.WritableStream }).io;
    sock.write(encodeFrame(0x55, 0));
    await until(() => errors.some((e) => e.agentCode === AgentErrorCode.UNKNOWN_TYPE), 'UNKNOWN_TYPE');
    // Random payloads for every host message type, on stream ids nothing uses.
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(MsgType.EXEC, MsgType.STDIN_EOF, MsgType.WINDOW, MsgType.RESIZE, MsgType.SIGNAL, MsgType.PING),
        fc.uint8Array({ maxLength: 300 }),
        async (type, payload) => {
          sock.write(encodeFrame(type, 0x70000000 + (payload.length % 1000), payload));
        },
      ),
      { numRuns: 300 },
    );
    expect(await client.ping()).toBeGreaterThanOrEqual(0);
    const h = client.exec(['echo', 'still here']);
    expect((await collect(h.stdout)).toString()).toBe('still here\n');
    expect(agent.proc.exitCode).toBeNull();
  });
});

describe('agent reconnects', () => {
  let agent: HostedAgent;
  beforeAll(async () => {
    agent = await hostAgent();
  });
  afterAll(async () => {
    await agent?.stop();
  });

  test('host disconnect: running execs fail with AGENT_GONE, the agent says HELLO again', async () => {
    const c1 = await agent.nextClient();
    const h = c1.exec(['sleep', '1000']);
    const { pid } = await h.started;
    c1.close();
    await expect(h.exit).rejects.toMatchObject({ code: 'AGENT_CLOSED' });
    const c2 = await agent.nextClient();
    expect(c2.hello?.bootId).toBe(c1.hello?.bootId);
    // The agent killed what the old host started.
    await until(() => !fs.existsSync(`/proc/${pid}`) || /^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8')), 'sleep killed');
    const h2 = c2.exec(['echo', 'again']);
    expect((await collect(h2.stdout)).toString()).toBe('again\n');
    c2.close();
  });

  test('garbage from the host: the agent drops the connection, reconnects, never crashes', async () => {
    for (const garbage of [
      Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3]), // length beyond the maximum
      Buffer.from([0, 0, 0, 2, 9, 9]), // length below the header
      randomBytes(4096),
    ]) {
      const s = await agent.nextConnection();
      const closed = new Promise((r) => s.on('close', r));
      s.on('error', () => {});
      s.resume(); // read HELLO, or the agent's close never shows as 'end'
      s.write(garbage);
      // Random bytes might parse as a frame whose length is still missing: end our side too.
      if (garbage.length > 100) setTimeout(() => s.end(), 200);
      await closed;
      expect(agent.proc.exitCode).toBeNull();
    }
    const c = await agent.nextClient();
    expect(await c.ping()).toBeGreaterThanOrEqual(0);
    c.close();
  });

  test('stdin beyond the granted window is a protocol error', async () => {
    const c = await agent.nextClient();
    const h = c.exec(['sleep', '1000']);
    await h.started;
    const sock = (c as unknown as { io: NodeJS.WritableStream }).io;
    // 64 KiB granted; sleep never reads, so past the pipe's 64 KiB and the agent's 64 KiB
    // buffer the agent must see the host overrun its window.
    for (let i = 0; i < 200; i++) sock.write(encodeFrame(MsgType.STDIN, h.id, Buffer.alloc(1024)));
    await expect(h.exit).rejects.toMatchObject({ code: 'AGENT_GONE' });
    const c2 = await agent.nextClient();
    expect(await c2.ping()).toBeGreaterThanOrEqual(0);
    c2.close();
  });
});

describe('LISTENERS in a network namespace', () => {
  const ns = `tender-t-agent-${process.pid}`;
  let agent: HostedAgent;
  let client: AgentClient;

  beforeAll(async () => {
    execFileSync('ip', ['netns', 'add', ns]);
    execFileSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    agent = await hostAgent({ wrap: ['ip', 'netns', 'exec', ns] });
    client = await agent.nextClient();
  });
  afterAll(async () => {
    client?.close();
    await agent?.stop();
    execFileSync('ip', ['netns', 'del', ns]);
  });

  const has = (set: readonly Listener[], l: Listener) => set.some((x) => x.proto === l.proto && x.address === l.address && x.port === l.port);

  test('a new TCP listener and UDP sockets appear, and disappear with their process', async () => {
    // The namespace is new: nothing listens yet.
    await until(() => client.listenerSet.length === 0 || null, 'empty set');
    const py = [
      'import socket, time',
      's = socket.socket(); s.bind(("0.0.0.0", 4567)); s.listen()',
      't = socket.socket(socket.AF_INET6); t.bind(("::1", 4568)); t.listen()',
      'u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 5353))',
      'v = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); v.bind(("::", 5354))',
      'c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.connect(("127.0.0.1", 9))', // a client: not a listener
      'print("ok", flush=True); time.sleep(1000)',
    ].join('\n');
    const h = client.exec(['python3', '-c', py]);
    const want: Listener[] = [
      { proto: 'tcp', family: 4, address: '0.0.0.0', port: 4567 },
      { proto: 'tcp', family: 6, address: '::1', port: 4568 },
      { proto: 'udp', family: 4, address: '127.0.0.1', port: 5353 },
      { proto: 'udp', family: 6, address: '::', port: 5354 },
    ];
    const seen = await new Promise<readonly Listener[]>((resolve) => {
      const check = (set: readonly Listener[]) => want.every((w) => has(set, w)) && (client.off('listeners', check), resolve(set));
      client.on('listeners', check);
      check(client.listenerSet);
    });
    expect([...seen].sort((a, b) => a.port - b.port)).toEqual(want);
    h.signal('SIGKILL');
    await h.exit;
    await until(() => client.listenerSet.length === 0, 'listeners gone', 10_000);
  });
});
