/**
 * The agent protocol codec: frames captured from the real agent (build/agent/tender-agent,
 * run on the host in a network namespace, its unix-socket transport read by a script),
 * round trips, and property tests for the incremental decoder.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import {
  AgentErrorCode,
  Channel,
  EXEC_FLAG_TTY,
  type Frame,
  FrameDecoder,
  HEADER_LENGTH,
  MAX_PAYLOAD,
  MsgType,
  PROTOCOL_VERSION,
  PayloadError,
  decodeError,
  decodeExit,
  decodeHello,
  decodeListeners,
  decodeStarted,
  decodeUsbAttachPayload,
  decodeUsbAttached,
  decodeUsbDetachPayload,
  decodeWindow,
  encodeExecPayload,
  encodeFrame,
  encodeResizePayload,
  encodeSignalPayload,
  encodeUsbAttachPayload,
  encodeUsbAttachedPayload,
  encodeUsbDetachPayload,
  encodeWindowPayload,
  formatAddress,
  signalName,
  signalNumber,
} from '../../src/agent/protocol.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

function decodeAll(bytes: Uint8Array, cuts: number[] = []): Frame[] {
  const d = new FrameDecoder();
  const out: Frame[] = [];
  let at = 0;
  for (const c of [...cuts, bytes.length]) {
    d.push(bytes.subarray(at, c), (f) => out.push({ ...f, payload: Uint8Array.from(f.payload) }));
    at = c;
  }
  return out;
}

// Captured from the agent (v0.1.0, protocol 1) on kernel 6.18.44, hostname "vm".
const CAPTURED = {
  // HELLO: length 0x51 | type 01 | stream 0 | version 1 | "0.1.0" | "6.18.44-fc-v669" | "vm" | boot id
  hello: hex(`00000051 01 00000000 0001
    00000005 302e312e30
    0000000f 362e31382e34342d66632d76363639
    00000002 766d
    00000024 32613764623831642d613734362d343161322d613764352d363636643031303366326338`),
  // LISTENERS in a namespace where python3 listened on 127.0.0.1:8080/tcp and bound [::]:53/udp:
  // count 2 | tcp(6) v4 port 8080 127.0.0.1 | udp(17) v6 port 53 ::
  listeners: hex(`00000025 20 00000000 00000002
    06 04 1f90 7f000001
    11 06 0035 00000000000000000000000000000000`),
  // The host's EXEC of `echo hi` on stream 7 with a 64 KiB window (what the TS encoder must produce)
  exec: hex(`00000028 10 00000007 00 0000 0000 00010000 00000000
    00000002 00000004 6563686f 00000002 6869 00000000`),
  // The agent's answers: STARTED pid 27744 stdin window 64 KiB; STDOUT "hi\\n"; EXIT 0
  started: hex('0000000d 11 00000007 00006c60 00010000'),
  stdout: hex('00000008 14 00000007 68690a'),
  exit: hex('0000000d 19 00000007 00000000 00000000'),
  // ERROR EXEC_FAILED errno 2 for /nonexistent on stream 8
  execError: hex(`0000003d 7f 00000008 00000003 00000002 0000002c
    65786563202f6e6f6e6578697374656e743a204e6f20737563682066696c65206f72206469726563746f7279`),
  // ERROR POWER_DISABLED after POWEROFF on stream 9 (agent run with --no-power)
  powerError: hex(`00000034 7f 00000009 00000007 00000000 00000023
    706f77657220636f6e74726f6c2064697361626c656420282d2d6e6f2d706f77657229`),
};

describe('captured frames', () => {
  test('HELLO', () => {
    const [f] = decodeAll(CAPTURED.hello);
    expect(f!.type).toBe(MsgType.HELLO);
    expect(f!.stream).toBe(0);
    expect(decodeHello(f!.payload)).toEqual({
      protocolVersion: 1,
      agentVersion: '0.1.0',
      kernelRelease: '6.18.44-fc-v669',
      hostname: 'vm',
      bootId: '2a7db81d-a746-41a2-a7d5-666d0103f2c8',
    });
  });

  test('LISTENERS', () => {
    const [f] = decodeAll(CAPTURED.listeners);
    expect(decodeListeners(f!.payload)).toEqual([
      { proto: 'tcp', family: 4, address: '127.0.0.1', port: 8080 },
      { proto: 'udp', family: 6, address: '::', port: 53 },
    ]);
  });

  test('EXEC is encoded byte for byte as the capture', () => {
    const payload = encodeExecPayload({ argv: ['echo', 'hi'], window: 65536 });
    expect(encodeFrame(MsgType.EXEC, 7, payload).equals(CAPTURED.exec)).toBe(true);
  });

  test('STARTED, STDOUT, EXIT, ERROR in one stream', () => {
    const all = Buffer.concat([CAPTURED.started, CAPTURED.stdout, CAPTURED.exit, CAPTURED.execError, CAPTURED.powerError]);
    const fs_ = decodeAll(all);
    expect(fs_.map((f) => [f.type, f.stream])).toEqual([
      [MsgType.STARTED, 7],
      [MsgType.STDOUT, 7],
      [MsgType.EXIT, 7],
      [MsgType.ERROR, 8],
      [MsgType.ERROR, 9],
    ]);
    expect(decodeStarted(fs_[0]!.payload)).toEqual({ pid: 27744, stdinWindow: 65536 });
    expect(Buffer.from(fs_[1]!.payload).toString()).toBe('hi\n');
    expect(decodeExit(fs_[2]!.payload)).toEqual({ code: 0, signal: 0 });
    expect(decodeError(fs_[3]!.payload)).toEqual({
      code: AgentErrorCode.EXEC_FAILED,
      errno: 2,
      message: 'exec /nonexistent: No such file or directory',
    });
    expect(decodeError(fs_[4]!.payload).code).toBe(AgentErrorCode.POWER_DISABLED);
  });
});

describe('encoders', () => {
  test('EXEC with tty, env, cwd', () => {
    const p = encodeExecPayload({ argv: ['sh'], env: { TERM: 'xterm', A: 'b=c' }, cwd: '/root', tty: true, rows: 24, cols: 80, window: 1 });
    expect(p[0]).toBe(EXEC_FLAG_TTY);
    expect(p.readUInt16BE(1)).toBe(24);
    expect(p.readUInt16BE(3)).toBe(80);
    expect(p.readUInt32BE(5)).toBe(1);
    expect(p.includes(Buffer.from('A=b=c'))).toBe(true);
    expect(() => encodeExecPayload({ argv: [], window: 1 })).toThrow(RangeError);
    expect(() => encodeExecPayload({ argv: ['a\0b'], window: 1 })).toThrow(RangeError);
    expect(() => encodeExecPayload({ argv: ['x'], env: ['=x'], window: 1 })).toThrow(RangeError);
    expect(() => encodeExecPayload({ argv: ['x'], rows: 70000, window: 1 })).toThrow(RangeError);
    expect(() => encodeExecPayload({ argv: ['x'.repeat(MAX_PAYLOAD)], window: 1 })).toThrow(RangeError);
  });

  test('small messages', () => {
    expect(encodeWindowPayload(Channel.STDERR, 0x01020304)).toEqual(hex('02 01020304'));
    expect(decodeWindow(encodeWindowPayload(Channel.STDIN, 7))).toEqual({ channel: 0, increment: 7 });
    expect(encodeResizePayload(50, 132)).toEqual(hex('0032 0084'));
    expect(encodeSignalPayload(15)).toEqual(hex('0000000f'));
    expect(encodeFrame(MsgType.PING, 1)).toEqual(hex('00000005 02 00000001'));
    expect(() => encodeFrame(MsgType.STDIN, 1, new Uint8Array(MAX_PAYLOAD + 1))).toThrow(RangeError);
  });

  test('signals use Linux numbers', () => {
    expect(signalNumber('SIGTERM')).toBe(15);
    expect(signalNumber('kill')).toBe(9);
    expect(signalNumber('SIGUSR1')).toBe(10); // 30 on macOS: the table is the guest's, not the host's
    expect(signalName(1)).toBe('SIGHUP');
    expect(signalName(40)).toBe('SIGRT6');
    expect(() => signalNumber('SIGNOPE')).toThrow(RangeError);
    expect(() => signalNumber(0)).toThrow(RangeError);
  });

  test('IPv6 text per RFC 5952', () => {
    const v6 = (s: string) => formatAddress(hex(s));
    expect(v6('00000000000000000000000000000001')).toBe('::1');
    expect(v6('20010db8000000000001000000000001')).toBe('2001:db8::1:0:0:1');
    expect(v6('20010db8000100000001000100010001')).toBe('2001:db8:1:0:1:1:1:1'); // one zero group stays
    expect(v6('fe800000000000000000000000000000')).toBe('fe80::');
    expect(v6('00000000000000000000ffff7f000001')).toBe('::ffff:7f00:1');
  });
});

describe('FrameDecoder', () => {
  const frameArb = fc.record({
    type: fc.integer({ min: 0, max: 255 }),
    stream: fc.nat({ max: 0xffffffff }),
    payload: fc.uint8Array({ maxLength: 200 }),
  });

  test('frames split at every offset decode the same', () => {
    fc.assert(
      fc.property(fc.array(frameArb, { minLength: 1, maxLength: 5 }), (frames) => {
        const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.type, f.stream, f.payload)));
        const whole = decodeAll(bytes);
        expect(whole).toEqual(frames.map((f) => ({ type: f.type, stream: f.stream, payload: Uint8Array.from(f.payload) })));
        for (let cut = 0; cut <= bytes.length; cut++) expect(decodeAll(bytes, [cut])).toEqual(whole);
      }),
      { numRuns: 100 },
    );
  });

  test('any chunking decodes the same', () => {
    fc.assert(
      fc.property(
        fc.array(frameArb, { minLength: 1, maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        (frames, rawCuts) => {
          const bytes = Buffer.concat(frames.map((f) => encodeFrame(f.type, f.stream, f.payload)));
          const cuts = [...new Set(rawCuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
          expect(decodeAll(bytes, cuts)).toEqual(decodeAll(bytes));
        },
      ),
    );
  });

  test('arbitrary bytes never throw; a bad length stops the decoder for good', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 10 }), (chunks) => {
        const d = new FrameDecoder(1000);
        for (const c of chunks) {
          const ok = d.push(c, () => {});
          if (!ok) {
            expect(d.error).toMatch(/frame length/);
            expect(d.push(new Uint8Array([0, 0, 0, 5, 1, 0, 0, 0, 0]), () => expect.fail('frame after error'))).toBe(false);
          }
        }
      }),
    );
  });

  test('oversize and undersize lengths are protocol errors', () => {
    for (const len of [0, 4, 5 + MAX_PAYLOAD + 1, 0xffffffff]) {
      const d = new FrameDecoder();
      const b = Buffer.alloc(HEADER_LENGTH);
      b.writeUInt32BE(len, 0);
      expect(d.push(b, () => {})).toBe(false);
      expect(d.error).toMatch(/frame length/);
    }
    // The largest frame is fine, even a byte at a time through its header.
    const d = new FrameDecoder();
    const big = encodeFrame(MsgType.STDOUT, 3, new Uint8Array(MAX_PAYLOAD));
    const got: Frame[] = [];
    for (let i = 0; i < 16; i++) d.push(big.subarray(i, i + 1), (f) => got.push(f));
    d.push(big.subarray(16), (f) => got.push(f));
    expect(got.length).toBe(1);
    expect(got[0]!.payload.length).toBe(MAX_PAYLOAD);
    expect(d.pending).toBe(0);
  });

  test('payload decoders throw only PayloadError on arbitrary input', () => {
    const decoders = [decodeHello, decodeStarted, decodeExit, decodeWindow, decodeError, decodeListeners, decodeUsbAttached, decodeUsbAttachPayload, decodeUsbDetachPayload];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 80 }), (p) => {
        for (const dec of decoders) {
          try {
            dec(p);
          } catch (e) {
            expect(e).toBeInstanceOf(PayloadError);
          }
        }
      }),
      { numRuns: 2000 },
    );
    // A count that claims more entries than bytes is refused before looping.
    expect(() => decodeListeners(hex('7fffffff'))).toThrow(PayloadError);
  });
});

describe('USB messages', () => {
  test('USB_ATTACH layout: u16 port | u8 speed | str host | str busid', () => {
    const p = encodeUsbAttachPayload({ host: '192.168.127.1', port: 3240, busid: '1-2.3' });
    expect(p).toEqual(hex('0ca8 00 0000000d 3139322e3136382e3132372e31 00000005 312d322e33'));
    expect(encodeFrame(MsgType.USB_ATTACH, 5, p).subarray(0, 9)).toEqual(hex(`${(5 + p.length).toString(16).padStart(8, '0')} 40 00000005`));
    expect(encodeUsbAttachedPayload({ port: 8, devid: 0x630001, speed: 3 })).toEqual(hex('00000008 00630001 00000003'));
    expect(encodeUsbDetachPayload(8)).toEqual(hex('00000008'));
  });

  test('encoder limits', () => {
    const ok = { host: '10.0.2.2', port: 3240, busid: '99-1' };
    expect(() => encodeUsbAttachPayload({ ...ok, port: 0 })).toThrow(RangeError);
    expect(() => encodeUsbAttachPayload({ ...ok, port: 65536 })).toThrow(RangeError);
    expect(() => encodeUsbAttachPayload({ ...ok, speed: 256 })).toThrow(RangeError);
    expect(() => encodeUsbAttachPayload({ ...ok, busid: '' })).toThrow(RangeError);
    // The kernel's busid field is 32 bytes with its NUL.
    expect(() => encodeUsbAttachPayload({ ...ok, busid: 'x'.repeat(32) })).toThrow(RangeError);
    expect(encodeUsbAttachPayload({ ...ok, busid: 'x'.repeat(31) }).length).toBe(2 + 1 + 4 + 8 + 4 + 31);
    expect(() => encodeUsbAttachPayload({ ...ok, host: 'a\0b' })).toThrow(RangeError);
    expect(() => encodeUsbAttachPayload({ ...ok, host: '' })).toThrow(RangeError);
    expect(() => encodeUsbDetachPayload(-1)).toThrow(RangeError);
    expect(() => decodeUsbAttached(hex('00000008 00630001 00000003 00'))).toThrow(PayloadError);
    expect(() => decodeUsbDetachPayload(hex('000000'))).toThrow(PayloadError);
  });

  test('round trips (property)', () => {
    const text = (min: number, max: number) =>
      fc.string({ unit: 'grapheme-ascii', minLength: min, maxLength: max }).filter((s) => !s.includes('\0') && s.length >= min);
    fc.assert(
      fc.property(
        fc.record({ host: text(1, 63), port: fc.integer({ min: 1, max: 65535 }), busid: text(1, 31), speed: fc.integer({ min: 0, max: 255 }) }),
        (req) => {
          expect(decodeUsbAttachPayload(encodeUsbAttachPayload(req))).toEqual(req);
        },
      ),
    );
    fc.assert(
      fc.property(fc.record({ port: fc.nat(), devid: fc.nat(), speed: fc.nat() }).map((r) => ({ port: r.port >>> 0, devid: r.devid >>> 0, speed: r.speed >>> 0 })), (a) => {
        expect(decodeUsbAttached(encodeUsbAttachedPayload(a))).toEqual(a);
      }),
    );
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (n) => {
        expect(decodeUsbDetachPayload(encodeUsbDetachPayload(n))).toBe(n);
      }),
    );
  });
});

describe('the C header and this module agree', () => {
  const header = fs.readFileSync(
    path.join(path.dirname(fileURLToPath(import.meta.url)), '../../native/agent/protocol.h'),
    'utf8',
  );
  const defines = (re: RegExp) => Object.fromEntries([...header.matchAll(re)].map((m) => [m[1]!, Number(m[2])]));

  test('message types', () => {
    expect(defines(/\bM_([A-Z_]+) = (0x[0-9a-f]+)/g)).toEqual(MsgType);
  });
  test('error codes', () => {
    expect(defines(/\bE_([A-Z_]+) = (\d+)/g)).toEqual(AgentErrorCode);
  });
  test('constants', () => {
    expect(Number(/#define PROTO_VERSION (\d+)/.exec(header)![1])).toBe(PROTOCOL_VERSION);
    expect(Number(/#define HDR_LEN (\d+)/.exec(header)![1])).toBe(HEADER_LENGTH);
    expect(1 << Number(/#define MAX_PAYLOAD \(1u << (\d+)\)/.exec(header)![1])).toBe(MAX_PAYLOAD);
    expect(defines(/\bCH_([A-Z]+) = (\d+)/g)).toEqual(Channel);
  });
});
