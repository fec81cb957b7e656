/**
 * tender-vhost-vsock's own checks and its vhost-user control plane, without QEMU:
 * - `--selftest`: the split-ring walk (chains, WRITE/NEXT order, loops, out-of-memory
 *   buffers, 16-bit index wrap, used ring, NO_INTERRUPT) and the 44-byte header codec against
 *   hand-built descriptor tables (native/vhost-vsock/selftest.c);
 * - the messages that carry no file descriptors, sent the way QEMU's hw/virtio/vhost-user.c
 *   frames them (u32 request | u32 flags | u32 size | payload, little-endian);
 * - the supervisor: READY, restart after QEMU hangs up, stop();
 * - withVhostUserVsock() on the QEMU driver's own arguments.
 * Skips (saying why) when the helper is not built (make -C native/vhost-vsock).
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import type { MachineSpec } from '../../src/vmm/driver.js';
import { qemuArgs } from '../../src/vmm/qemu-args.js';
import { VhostVsock, VhostVsockError, findVhostVsock, withVhostUserVsock } from '../../src/vmm/vhost-vsock.js';

const binary = findVhostVsock();
if (!binary) console.warn('vhost-vsock unit: skipped: tender-vhost-vsock not built (make -C native/vhost-vsock)');

describe('withVhostUserVsock', () => {
  const spec: MachineSpec = {
    name: 'm',
    dir: '/tmp/m',
    cpus: 1,
    memoryMiB: 512,
    kernel: '/k',
    initrd: '/i',
    cmdline: [],
    accel: 'tcg',
    net: { kind: 'none' },
    agent: { kind: 'vsock', cid: 7, port: 1024, path: '/tmp/m/vsock.sock' },
    serialLog: '/tmp/m/serial.log',
    controlSocket: '/tmp/m/qmp.sock',
  };

  test('shares guest RAM and swaps the kernel vhost-vsock device for the vhost-user one', () => {
    const base = qemuArgs(spec, 'tcg', { tscKhz: null });
    expect(base).toContain('vhost-vsock-device,id=vsock0,guest-cid=7');
    const args = withVhostUserVsock(base, { socket: '/tmp/m/a,b.sock', memoryMiB: 512 });
    expect(args.join(' ')).not.toContain('vhost-vsock-device,');
    expect(args[args.indexOf('-M') + 1]).toBe('microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=off,memory-backend=tender-vsock-mem');
    expect(args.slice(-6)).toEqual([
      '-object', 'memory-backend-memfd,id=tender-vsock-mem,size=512M,share=on',
      '-chardev', 'socket,id=tender-vsock,path=/tmp/m/a,,b.sock',
      '-device', 'vhost-user-vsock-device,chardev=tender-vsock',
    ]);
    expect(args.length).toBe(base.length - 2 + 6);
  });
});

describe.skipIf(!binary)(`tender-vhost-vsock${binary ? '' : ' (skipped: not built)'}`, () => {
  test('--selftest: ring walk and header codec', async () => {
    const { stdout } = await promisify(execFile)(binary!, ['--selftest']).catch((e: { stdout: string }) => ({ stdout: e.stdout }));
    const lines = stdout.trim().split('\n');
    const plan = lines.pop();
    expect(plan).toMatch(/^1\.\.\d+$/);
    expect(lines.length).toBe(Number(plan!.slice(3)));
    expect(lines.filter((l) => !l.startsWith('ok '))).toEqual([]);
  });

  describe('vhost-user control plane', () => {
    let dir: string;
    let helper: VhostVsock;
    const log: string[] = [];

    beforeEach(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-vvsock-u-'));
      helper = await VhostVsock.start({ socket: path.join(dir, 'vu.sock'), uds: path.join(dir, 'v.sock'), cid: 42, verbose: true, onLog: (l) => log.push(l) });
    });
    afterEach(async () => {
      await helper.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A QEMU stand-in: sends requests, reads replies. */
    async function connect() {
      const s = net.createConnection(path.join(dir, 'vu.sock'));
      await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
      let buf = Buffer.alloc(0);
      const waiters: (() => void)[] = [];
      s.on('data', (b) => {
        buf = Buffer.concat([buf, b]);
        for (const w of waiters.splice(0)) w();
      });
      const send = (request: number, payload: Buffer = Buffer.alloc(0), flags = 1) => {
        const h = Buffer.alloc(12);
        h.writeUInt32LE(request, 0);
        h.writeUInt32LE(flags, 4);
        h.writeUInt32LE(payload.length, 8);
        s.write(Buffer.concat([h, payload]));
      };
      const reply = async (): Promise<{ request: number; flags: number; payload: Buffer }> => {
        for (;;) {
          if (buf.length >= 12 && buf.length >= 12 + buf.readUInt32LE(8)) {
            const size = buf.readUInt32LE(8);
            const r = { request: buf.readUInt32LE(0), flags: buf.readUInt32LE(4), payload: buf.subarray(12, 12 + size) };
            buf = buf.subarray(12 + size);
            return r;
          }
          await new Promise<void>((r) => waiters.push(r));
        }
      };
      const u64 = (v: bigint) => {
        const b = Buffer.alloc(8);
        b.writeBigUInt64LE(v);
        return b;
      };
      return { s, send, reply, u64 };
    }

    test('features, protocol features, REPLY_ACK, GET_CONFIG (guest_cid), vring base', async () => {
      const q = await connect();
      q.send(1); // GET_FEATURES
      let r = await q.reply();
      expect(r.request).toBe(1);
      expect(r.flags).toBe(0x5); // version 1 | reply
      const features = r.payload.readBigUInt64LE(0);
      expect(features & (1n << 32n)).toBe(1n << 32n); // VIRTIO_F_VERSION_1
      expect(features & (1n << 30n)).toBe(1n << 30n); // VHOST_USER_F_PROTOCOL_FEATURES
      q.send(15); // GET_PROTOCOL_FEATURES
      r = await q.reply();
      const pf = r.payload.readBigUInt64LE(0);
      expect(pf & (1n << 9n)).toBe(1n << 9n); // CONFIG
      expect(pf & (1n << 3n)).toBe(1n << 3n); // REPLY_ACK
      q.send(2, q.u64(features)); // SET_FEATURES
      q.send(16, q.u64((1n << 9n) | (1n << 3n))); // SET_PROTOCOL_FEATURES
      q.send(3, Buffer.alloc(0), 0x1 | 0x8); // SET_OWNER, need_reply
      r = await q.reply();
      expect(r.request).toBe(3);
      expect(r.payload.readBigUInt64LE(0)).toBe(0n);
      // GET_CONFIG: offset 0, size 8, flags 0, 8 bytes of room (struct virtio_vsock_config).
      const cfg = Buffer.alloc(20);
      cfg.writeUInt32LE(8, 4);
      q.send(24, cfg);
      r = await q.reply();
      expect(r.request).toBe(24);
      expect(r.payload.length).toBe(20);
      expect(r.payload.readBigUInt64LE(12)).toBe(42n);
      // SET_VRING_BASE then GET_VRING_BASE on ring 1 (tx): the base comes back.
      const st = Buffer.alloc(8);
      st.writeUInt32LE(1, 0);
      st.writeUInt32LE(65530, 4);
      q.send(10, st);
      q.send(11, st);
      r = await q.reply();
      expect(r.request).toBe(11);
      expect([r.payload.readUInt32LE(0), r.payload.readUInt32LE(4)]).toEqual([1, 65530]);
      q.s.destroy();
    });

    test('QEMU hanging up ends the helper; the supervisor starts a fresh one', async () => {
      const pid = helper.pid;
      const q = await connect();
      q.s.destroy();
      for (let i = 0; i < 200 && !(helper.restarts === 1 && helper.pid && helper.pid !== pid); i++) await new Promise((r) => setTimeout(r, 25));
      expect(helper.restarts).toBe(1);
      expect(helper.pid).not.toBe(pid);
      const again = await connect();
      again.send(1);
      expect((await again.reply()).request).toBe(1);
      again.s.destroy();
    });

    test('a request bigger than any vhost-user message: the helper drops QEMU and exits', async () => {
      const q = await connect();
      const h = Buffer.alloc(12);
      h.writeUInt32LE(5, 0);
      h.writeUInt32LE(1, 4);
      h.writeUInt32LE(1 << 20, 8);
      q.s.write(h);
      await new Promise<void>((r) => q.s.once('close', () => r()));
      for (let i = 0; i < 200 && helper.restarts === 0; i++) await new Promise((r) => setTimeout(r, 25));
      expect(log.some((l) => /too big/.test(l))).toBe(true);
    });
  });

  test('a CID below 3 is refused before spawning', async () => {
    await expect(VhostVsock.start({ socket: '/tmp/x', uds: '/tmp/y', cid: 2 })).rejects.toBeInstanceOf(VhostVsockError);
  });
});
