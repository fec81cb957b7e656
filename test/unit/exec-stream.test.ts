/**
 * The daemon side of the exec protocol (src/api/exec-stream.ts) against a stand-in agent
 * session: frames come out in order, EXIT last; a failure after the 101 is an ERROR frame.
 */
import { PassThrough, Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { F, FrameReader, serveExec } from '../../src/api/exec-stream.js';
import type { DaemonAgentSession } from '../../src/daemon/agent-session.js';

/** A duplex whose writes are collected as frames; `end()` settles `done`. */
function clientSide() {
  const frames: { type: number; payload: string }[] = [];
  let finished!: () => void;
  const done = new Promise<void>((r) => (finished = r));
  const reader = new FrameReader((type, p) => frames.push({ type, payload: p.toString() }));
  const sock = new Duplex({
    read() {},
    write(chunk, _enc, cb) {
      reader.push(chunk);
      cb();
    },
    final(cb) {
      finished();
      cb();
    },
  });
  return { sock, frames, done };
}

const req = { argv: ['true'], tty: false, rows: 0, cols: 0, env: {}, cwd: undefined } as never;

describe('serveExec', () => {
  it('forwards output, then EXIT', async () => {
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    const agent = {
      exec: () => ({ stdout, stderr, stdin: new PassThrough(), exit: Promise.resolve({ code: 3, signal: null }), resize() {}, signal() {} }),
    } as unknown as DaemonAgentSession;
    const c = clientSide();
    serveExec(c.sock, agent, req);
    stdout.end('out');
    stderr.end('err');
    await c.done;
    expect(c.frames.map((f) => f.type).sort()).toEqual([F.STDOUT, F.STDERR, F.EXIT].sort());
    expect(c.frames.at(-1)).toEqual({ type: F.EXIT, payload: JSON.stringify({ code: 3, signal: null }) });
  });

  it('answers a command that cannot start with an ERROR frame, not an HTTP response', async () => {
    const agent = {
      exec: () => {
        throw Object.assign(new Error('the agent went away'), { code: 'AGENT_GONE' });
      },
    } as unknown as DaemonAgentSession;
    const c = clientSide();
    serveExec(c.sock, agent, req);
    await c.done;
    expect(c.frames).toEqual([{ type: F.ERROR, payload: JSON.stringify({ code: 'AGENT_GONE', message: 'the agent went away' }) }]);
  });
});
