/**
 * AgentClient against a scripted agent over an in-memory duplex pair: session start behind
 * stale bytes (what a virtio-serial port can hold from the previous host), a restarted
 * agent, flow-control credit, and the error codes.
 */
import { Duplex } from 'node:stream';
import { describe, expect, test } from 'vitest';
import { AgentClient, type AgentError } from '../../src/agent/client.js';
import {
  AgentErrorCode,
  Channel,
  type Frame,
  FrameDecoder,
  MsgType,
  decodeUsbAttachPayload,
  decodeUsbDetachPayload,
  decodeWindow,
  encodeFrame,
  encodeUsbAttachedPayload,
} from '../../src/agent/protocol.js';

/** Two connected Duplexes: what one writes, the other reads. */
function pair(): [Duplex, Duplex] {
  let a!: Duplex;
  let b!: Duplex;
  const mk = (peer: () => Duplex) =>
    new Duplex({
      read() {},
      write(chunk, _enc, cb) {
        peer().push(chunk);
        cb();
      },
      final(cb) {
        peer().push(null);
        cb();
      },
    });
  a = mk(() => b);
  b = mk(() => a);
  return [a, b];
}

function helloPayload(bootId = 'b'): Buffer {
  const s = (x: string) => {
    const b = Buffer.alloc(4 + Buffer.byteLength(x));
    b.writeUInt32BE(Buffer.byteLength(x), 0);
    b.write(x, 4);
    return b;
  };
  return Buffer.concat([Buffer.from([0, 1]), s('0.1.0'), s('6.1.0'), s('guest'), s(bootId)]);
}

/** The agent side: frames the client sent, and a way to answer. */
function fakeAgent(io: Duplex) {
  const frames: Frame[] = [];
  const waiters: ((f: Frame) => void)[] = [];
  const dec = new FrameDecoder();
  io.on('data', (c: Buffer) =>
    dec.push(c, (f) => {
      const copy = { ...f, payload: Buffer.from(f.payload) };
      frames.push(copy);
      for (const w of waiters.splice(0)) w(copy);
    }),
  );
  const next = async (type: number): Promise<Frame> => {
    for (;;) {
      const f = frames.find((x) => x.type === type);
      if (f) {
        frames.splice(frames.indexOf(f), 1);
        return f;
      }
      await new Promise<Frame>((r) => waiters.push(r));
    }
  };
  return { frames, next, send: (type: number, stream: number, p?: Uint8Array) => io.write(encodeFrame(type, stream, p)) };
}

describe('AgentClient', () => {
  test('the session starts at the HELLO with our nonce; stale bytes before it are skipped', async () => {
    const [host, guest] = pair();
    const agent = fakeAgent(guest);
    const client = new AgentClient(host);
    const hh = await agent.next(MsgType.HOST_HELLO);
    expect(hh.stream).not.toBe(0);
    // The tail of a frame for the previous host, an old EXIT, an unsolicited HELLO...
    guest.write(Buffer.from([0x41, 0x42, 0x43, 0xff, 0xff]));
    agent.send(MsgType.EXIT, 9, Buffer.alloc(8));
    agent.send(MsgType.HELLO, 0, helloPayload('old'));
    // ...then the answer, split inside its header.
    const hello = encodeFrame(MsgType.HELLO, hh.stream, helloPayload('new'));
    guest.write(hello.subarray(0, 6));
    guest.write(hello.subarray(6));
    expect((await client.ready).bootId).toBe('new');
    // A retried HOST_HELLO's answer is the same session: nothing fails.
    const h = client.exec(['true']);
    agent.send(MsgType.HELLO, hh.stream, helloPayload('new'));
    const exec = await agent.next(MsgType.EXEC);
    agent.send(MsgType.STARTED, exec.stream, Buffer.from([0, 0, 0, 42, 0, 1, 0, 0]));
    agent.send(MsgType.EXIT, exec.stream, Buffer.from([0, 0, 0, 5, 0, 0, 0, 0]));
    expect(await h.exit).toEqual({ code: 5, signal: null });
    expect(h.pid).toBe(42);
    client.close();
  });

  test('a HELLO without our nonce after the start: the agent restarted, pending work fails', async () => {
    const [host, guest] = pair();
    const agent = fakeAgent(guest);
    const client = new AgentClient(host);
    const hh = await agent.next(MsgType.HOST_HELLO);
    agent.send(MsgType.HELLO, hh.stream, helloPayload());
    await client.ready;
    const hellos: unknown[] = [];
    client.on('hello', (x) => hellos.push(x));
    const h = client.exec(['sleep', '1']);
    const ping = client.ping();
    agent.send(MsgType.HELLO, 0, helloPayload('restarted'));
    await expect(h.exit).rejects.toMatchObject({ code: 'AGENT_GONE' });
    await expect(ping).rejects.toMatchObject({ code: 'AGENT_GONE' });
    expect(hellos).toHaveLength(1);
    client.close();
  });

  test('stdout credit goes back as the consumer reads; stdin waits for credit', async () => {
    const [host, guest] = pair();
    const agent = fakeAgent(guest);
    const client = new AgentClient(host, { window: 1000 });
    const hh = await agent.next(MsgType.HOST_HELLO);
    agent.send(MsgType.HELLO, hh.stream, helloPayload());
    await client.ready;
    const h = client.exec(['cat']);
    const exec = await agent.next(MsgType.EXEC);
    expect(Buffer.from(exec.payload).readUInt32BE(5)).toBe(1000); // the window
    agent.send(MsgType.STARTED, exec.stream, Buffer.from([0, 0, 0, 7, 0, 0, 0, 10])); // 10 bytes of stdin credit
    h.stdin.write(Buffer.alloc(25, 0x61));
    const s1 = await agent.next(MsgType.STDIN);
    expect(s1.payload.length).toBe(10);
    for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
    expect(agent.frames.some((f) => f.type === MsgType.STDIN)).toBe(false); // no credit left
    const credit = Buffer.from([Channel.STDIN, 0, 0, 0, 100]);
    agent.send(MsgType.WINDOW, exec.stream, credit);
    expect((await agent.next(MsgType.STDIN)).payload.length).toBe(15);
    // 600 bytes of output: past a quarter window, so credit comes back once read.
    agent.send(MsgType.STDOUT, exec.stream, Buffer.alloc(600, 0x62));
    h.stdout.resume();
    const w = decodeWindow((await agent.next(MsgType.WINDOW)).payload);
    expect(w).toEqual({ channel: Channel.STDOUT, increment: 600 });
    h.stdin.end();
    await agent.next(MsgType.STDIN_EOF);
    client.close();
    await expect(h.exit).rejects.toMatchObject({ code: 'AGENT_CLOSED' });
  });

  test('errors: EXEC_FAILED with errno, AGENT_REJECTED, AGENT_PROTOCOL, AGENT_GONE', async () => {
    const [host, guest] = pair();
    const agent = fakeAgent(guest);
    const client = new AgentClient(host);
    const closed = new Promise<AgentError>((r) => client.once('close', r));
    const hh = await agent.next(MsgType.HOST_HELLO);
    agent.send(MsgType.HELLO, hh.stream, helloPayload());
    await client.ready;
    const err = (code: number, errno: number, msg: string) => {
      const b = Buffer.alloc(12 + msg.length);
      b.writeUInt32BE(code, 0);
      b.writeInt32BE(errno, 4);
      b.writeUInt32BE(msg.length, 8);
      b.write(msg, 12);
      return b;
    };
    const h = client.exec(['nope']);
    const exec = await agent.next(MsgType.EXEC);
    agent.send(MsgType.ERROR, exec.stream, err(AgentErrorCode.EXEC_FAILED, 2, 'exec nope: No such file or directory'));
    await expect(h.started).rejects.toMatchObject({ code: 'EXEC_FAILED', errno: 2 });
    const off = client.poweroff();
    const po = await agent.next(MsgType.POWEROFF);
    agent.send(MsgType.ERROR, po.stream, err(AgentErrorCode.POWER_DISABLED, 0, 'disabled'));
    await expect(off).rejects.toMatchObject({ code: 'AGENT_REJECTED', agentCode: AgentErrorCode.POWER_DISABLED });
    const unrelated = new Promise<AgentError>((r) => client.once('agent-error', r));
    agent.send(MsgType.ERROR, 0, err(AgentErrorCode.UNKNOWN_TYPE, 0, 'unknown message type 0x55'));
    expect((await unrelated).agentCode).toBe(AgentErrorCode.UNKNOWN_TYPE);
    // A malformed LISTENERS is not the protocol: the client gives up on the stream.
    const pending = client.exec(['sleep', '1']);
    agent.send(MsgType.LISTENERS, 0, Buffer.from([0, 0, 0, 1, 99]));
    expect((await closed).code).toBe('AGENT_PROTOCOL');
    await expect(pending.exit).rejects.toMatchObject({ code: 'AGENT_PROTOCOL' });
    await expect(client.ping()).rejects.toMatchObject({ code: 'AGENT_PROTOCOL' });
  });

  test('the stream ending before HELLO rejects ready with AGENT_GONE; poweroff resolves on close', async () => {
    const [host, guest] = pair();
    const client = new AgentClient(host);
    guest.end();
    await expect(client.ready).rejects.toMatchObject({ code: 'AGENT_GONE' });

    const [host2, guest2] = pair();
    const agent = fakeAgent(guest2);
    const c2 = new AgentClient(host2);
    const hh = await agent.next(MsgType.HOST_HELLO);
    agent.send(MsgType.HELLO, hh.stream, helloPayload());
    await c2.ready;
    const off = c2.poweroff();
    await agent.next(MsgType.POWEROFF);
    guest2.end(); // the machine went down
    await expect(off).resolves.toBeUndefined();
  });

  test('usbAttach / usbDetach: requests, answers, USB errors, a reply for nothing pending, a timeout', async () => {
    const [host, guest] = pair();
    const agent = fakeAgent(guest);
    const client = new AgentClient(host);
    const hh = await agent.next(MsgType.HOST_HELLO);
    agent.send(MsgType.HELLO, hh.stream, helloPayload());
    await client.ready;

    const att = client.usbAttach({ host: '192.168.127.1', port: 3240, busid: '1-2' });
    const req = await agent.next(MsgType.USB_ATTACH);
    expect(decodeUsbAttachPayload(req.payload)).toEqual({ host: '192.168.127.1', port: 3240, busid: '1-2', speed: 0 });
    // A stray answer on another stream resolves nothing.
    agent.send(MsgType.USB_ATTACHED, req.stream + 1000, encodeUsbAttachedPayload({ port: 9, devid: 9, speed: 9 }));
    agent.send(MsgType.USB_ATTACHED, req.stream, encodeUsbAttachedPayload({ port: 8, devid: (1 << 16) | 2, speed: 5 }));
    expect(await att).toEqual({ port: 8, devid: 0x10002, speed: 5 });

    const det = client.usbDetach(8);
    const d = await agent.next(MsgType.USB_DETACH);
    expect(decodeUsbDetachPayload(d.payload)).toBe(8);
    agent.send(MsgType.USB_DETACHED, d.stream);
    await expect(det).resolves.toBeUndefined();

    const err = (code: number, errno: number, msg: string) => {
      const b = Buffer.alloc(12 + msg.length);
      b.writeUInt32BE(code, 0);
      b.writeInt32BE(errno, 4);
      b.writeUInt32BE(msg.length, 8);
      b.write(msg, 12);
      return b;
    };
    for (const [code, errno] of [[AgentErrorCode.USB_FAILED, 111], [AgentErrorCode.USB_IMPORT_REFUSED, 0], [AgentErrorCode.USB_NO_PORT, 0]] as const) {
      const a = client.usbAttach({ host: '10.0.2.2', port: 1, busid: '99-1', speed: 3 });
      const r = await agent.next(MsgType.USB_ATTACH);
      expect(decodeUsbAttachPayload(r.payload).speed).toBe(3);
      agent.send(MsgType.ERROR, r.stream, err(code, errno, 'no'));
      await expect(a).rejects.toMatchObject({ code: 'USB_FAILED', agentCode: code, errno: errno || undefined });
    }
    const bad = client.usbAttach({ host: '10.0.2.2', port: 1, busid: 'x'.repeat(32) });
    await expect(bad).rejects.toMatchObject({ code: 'USB_FAILED' });
    await expect(client.usbDetach(-1)).rejects.toMatchObject({ code: 'USB_FAILED' });

    const slow = client.usbDetach(3, 20);
    await agent.next(MsgType.USB_DETACH);
    await expect(slow).rejects.toMatchObject({ code: 'AGENT_TIMEOUT' });

    // A malformed USB_ATTACHED is not the protocol.
    const closed = new Promise<AgentError>((r) => client.once('close', r));
    const last = client.usbAttach({ host: '10.0.2.2', port: 1, busid: '99-1' });
    const lr = await agent.next(MsgType.USB_ATTACH);
    agent.send(MsgType.USB_ATTACHED, lr.stream, Buffer.from([0, 0, 0, 1]));
    expect((await closed).code).toBe('AGENT_PROTOCOL');
    await expect(last).rejects.toMatchObject({ code: 'AGENT_PROTOCOL' });
  });
});
