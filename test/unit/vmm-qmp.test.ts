/**
 * The QMP client against a scripted server on a unix socket. The server's lines are what
 * QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18) sent on this machine: the greeting, the answers,
 * and the POWERDOWN/SHUTDOWN events of a `system_powerdown` that the guest honoured.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { QmpClient, QmpError, type QmpEvent } from '../../src/vmm/qmp.js';

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n';
const POWERDOWN = '{"timestamp": {"seconds": 1795966748, "microseconds": 594747}, "event": "POWERDOWN"}\r\n';
const SHUTDOWN = '{"timestamp": {"seconds": 1795966748, "microseconds": 663106}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}\r\n';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-qmp-t-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
let n = 0;

type Handler = (msg: { execute: string; id?: string; arguments?: unknown }, sock: net.Socket) => void;

/** A QMP server that greets (or not), then hands each parsed command to `handle`. */
async function fakeQmp(handle: Handler, greeting: string | null = GREETING): Promise<{ path: string; server: net.Server; received: string[] }> {
  const p = path.join(tmp, `q${n++}.sock`);
  const received: string[] = [];
  const server = net.createServer((sock) => {
    if (greeting !== null) sock.write(greeting);
    let buf = '';
    sock.on('data', (b) => {
      buf += b.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        received.push(line);
        handle(JSON.parse(line), sock);
      }
    });
    sock.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(p, r));
  return { path: p, server, received };
}

const answer = (sock: net.Socket, id: string | undefined, ret: unknown) => sock.write(`${JSON.stringify({ return: ret, id })}\r\n`);

describe('QMP client', () => {
  test('negotiates capabilities, runs commands, delivers events in order', async () => {
    const srv = await fakeQmp((m, sock) => {
      if (m.execute === 'qmp_capabilities') answer(sock, m.id, {});
      else if (m.execute === 'query-status') answer(sock, m.id, { status: 'running', singlestep: false, running: true });
      else if (m.execute === 'system_powerdown') {
        // QEMU sends the event before the answer here; the client must cope with either order.
        sock.write(POWERDOWN);
        answer(sock, m.id, {});
        sock.write(SHUTDOWN);
      }
    });
    const c = await QmpClient.connect(srv.path);
    expect((c.greeting.version as { qemu: { major: number } }).qemu.major).toBe(7);
    expect(JSON.parse(srv.received[0]!)).toMatchObject({ execute: 'qmp_capabilities' });
    expect(await c.execute('query-status')).toEqual({ status: 'running', singlestep: false, running: true });
    const events: QmpEvent[] = [];
    c.on('event', (e) => events.push(e));
    const shutdown = c.waitEvent('SHUTDOWN');
    await c.execute('system_powerdown');
    expect((await shutdown)?.data).toEqual({ guest: true, reason: 'guest-shutdown' });
    expect(events.map((e) => e.event)).toEqual(['POWERDOWN', 'SHUTDOWN']);
    c.close();
    await c.closed;
    srv.server.close();
  });

  test('answers are matched by id, whatever order they come in', async () => {
    const held: { id?: string; sock: net.Socket; execute: string }[] = [];
    const srv = await fakeQmp((m, sock) => {
      if (m.execute === 'qmp_capabilities') return answer(sock, m.id, {});
      held.push({ id: m.id, sock, execute: m.execute });
      if (held.length === 2) {
        // Answer the second first, plus one for an id nobody sent (ignored).
        answer(sock, 'nobody', 'x');
        answer(sock, held[1]!.id, held[1]!.execute);
        answer(sock, held[0]!.id, held[0]!.execute);
      }
    });
    const c = await QmpClient.connect(srv.path);
    const [a, b] = await Promise.all([c.execute('query-a'), c.execute('query-b')]);
    expect([a, b]).toEqual(['query-a', 'query-b']);
    c.close();
    srv.server.close();
  });

  test('a QMP error rejects with its class and description', async () => {
    const srv = await fakeQmp((m, sock) => {
      if (m.execute === 'qmp_capabilities') return answer(sock, m.id, {});
      sock.write(`{"id": "${m.id}", "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}\r\n`);
    });
    const c = await QmpClient.connect(srv.path);
    const err = await c.execute('nosuch').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).errorClass).toBe('CommandNotFound');
    expect((err as QmpError).message).toBe('The command nosuch has not been found');
    c.close();
    srv.server.close();
  });

  test('QEMU going away rejects pending commands and resolves closed; waitEvent gives null', async () => {
    const srv = await fakeQmp((m, sock) => {
      if (m.execute === 'qmp_capabilities') return answer(sock, m.id, {});
      if (m.execute === 'quit') {
        answer(sock, m.id, {});
        sock.end();
      } else sock.destroy(); // dies mid-command
    });
    const c = await QmpClient.connect(srv.path);
    const ev = c.waitEvent('SHUTDOWN');
    await expect(c.execute('query-status')).rejects.toThrow(/closed/);
    await c.closed;
    expect(await ev).toBeNull();
    expect(c.isOpen).toBe(false);
    await expect(c.execute('quit')).rejects.toThrow(/closed/);
    srv.server.close();
  });

  test('no greeting, or not QMP: connect fails within its timeout', async () => {
    const silent = await fakeQmp(() => {}, null);
    await expect(QmpClient.connect(silent.path, 200)).rejects.toThrow(/no greeting within 200 ms/);
    const http = await fakeQmp(() => {}, 'HTTP/1.1 400 Bad Request\r\n');
    await expect(QmpClient.connect(http.path, 1000)).rejects.toThrow(/bad greeting/);
    await expect(QmpClient.connect(path.join(tmp, 'nobody.sock'), 1000)).rejects.toThrow(/ENOENT/);
    silent.server.close();
    http.server.close();
  });
});
