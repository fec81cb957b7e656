/**
 * The vfkit driver. vfkit needs macOS (Apple's Virtualization framework), so it never runs
 * here: the command lines are compared as whole arrays with vfkit's documented syntax
 * (crc-org/vfkit doc/usage.md), the REST calls go to a fake HTTP server on a unix socket,
 * and the process handling runs against a stand-in `vfkit` (a Node script serving the same
 * REST routes) — all of it mocked because the real thing cannot run on Linux.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import type { MachineSpec } from '../../src/vmm/driver.js';
import { VfkitDriver } from '../../src/vmm/vfkit.js';
import { VfkitRest, VfkitRestError, restfulUri } from '../../src/vmm/vfkit-rest.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-vfkit-t-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function spec(over: Partial<MachineSpec> = {}): MachineSpec {
  return {
    name: 'dev',
    dir: '/Users/u/.tender/m/dev',
    cpus: 2,
    memoryMiB: 2048,
    kernel: '/Users/u/.tender/images/default/Image',
    initrd: '/Users/u/.tender/images/default/initramfs.cpio.gz',
    cmdline: ['quiet', 'tender.hostname=dev'],
    accel: 'auto',
    net: { kind: 'dgram', mac: '52:54:00:aa:bb:cc', localPath: '/Users/u/.tender/m/dev/net.vm', remotePath: '/Users/u/.tender/m/dev/net.sock' },
    agent: { kind: 'vsock', via: 'vmm', cid: 3, port: 1024, path: '/Users/u/.tender/m/dev/vsock', hostPorts: [1024, 3240] },
    serialLog: '/Users/u/.tender/m/dev/serial.log',
    controlSocket: '/Users/u/.tender/m/dev/vfkit.sock',
    ...over,
  };
}

const driver = new VfkitDriver();

describe('vfkit command line', () => {
  test('default image: unixgram network, vsock agent, serial log, REST on a unix socket', async () => {
    expect(await driver.resolveAccel(spec())).toEqual({ accel: 'hvf' });
    // vfkit's vsock is its own: no host module, no backend process.
    expect(driver.vsock()).toEqual({ via: 'vmm' });
    const { cmd, args } = driver.commandLine(spec(), 'hvf');
    expect(cmd).toBe('vfkit');
    expect(args).toEqual([
      '--cpus', '2',
      '--memory', '2048',
      '--bootloader',
      'linux,kernel=/Users/u/.tender/images/default/Image,initrd=/Users/u/.tender/images/default/initramfs.cpio.gz,cmdline="console=hvc0 tender.agent=vsock:1024 quiet tender.hostname=dev"',
      '--device', 'virtio-net,unixSocketPath=/Users/u/.tender/m/dev/net.sock,mac=52:54:00:aa:bb:cc',
      // One entry per port the host serves (agent, USB/IP), at <base>_<port> as Firecracker's.
      '--device', 'virtio-vsock,port=1024,socketURL=/Users/u/.tender/m/dev/vsock_1024,listen',
      '--device', 'virtio-vsock,port=3240,socketURL=/Users/u/.tender/m/dev/vsock_3240,listen',
      '--device', 'virtio-serial,logFilePath=/Users/u/.tender/m/dev/serial.log',
      '--restful-uri', 'unix:///Users/u/.tender/m/dev/vfkit.sock',
    ]);
  });

  test('no network, no agent, a raw disk as root, no initrd', () => {
    const disk = path.join(tmp, 'root.img');
    fs.writeFileSync(disk, Buffer.alloc(1024));
    const { args } = driver.commandLine(spec({ net: { kind: 'none' }, agent: { kind: 'none' }, disk, initrd: undefined, cmdline: [] }), 'hvf');
    expect(args).toEqual([
      '--cpus', '2',
      '--memory', '2048',
      '--bootloader', 'linux,kernel=/Users/u/.tender/images/default/Image,cmdline="console=hvc0 tender.agent=none root=/dev/vda rw"',
      '--device', 'virtio-serial,logFilePath=/Users/u/.tender/m/dev/serial.log',
      '--device', `virtio-blk,path=${disk}`,
      '--restful-uri', 'unix:///Users/u/.tender/m/dev/vfkit.sock',
    ]);
  });

  test('refuses what vfkit cannot do', () => {
    expect(() => driver.commandLine(spec(), 'kvm')).toThrow(/hvf/);
    expect(() => driver.commandLine(spec({ net: { kind: 'stream', mac: '52:54:00:00:00:01', path: '/s' } }), 'hvf')).toThrow(/no stream/);
    expect(() => driver.commandLine(spec({ agent: { kind: 'virtio-serial', path: '/a' } }), 'hvf')).toThrow(/vsock/);
    expect(() => driver.commandLine(spec({ cmdline: ['say="hi"'] }), 'hvf')).toThrow(/double quote/);
    expect(() => driver.commandLine(spec({ serialLog: '/a,b/serial.log' }), 'hvf')).toThrow(/comma/);
    const qcow = path.join(tmp, 'x.qcow2');
    expect(() => driver.commandLine(spec({ disk: qcow }), 'hvf')).toThrow(/raw disk images only/);
  });

  test('restful-uri: the path goes in the URI path, with no host', () => {
    expect(restfulUri('/a/b.sock')).toBe('unix:///a/b.sock');
    expect(restfulUri('rel.sock')).toBe('unix:///rel.sock');
  });
});

/** A fake vfkit REST endpoint (vfkit's pkg/rest routes) on a unix socket. */
async function fakeRest(onPost: (state: string) => [number, string]): Promise<{ path: string; server: http.Server; posts: string[] }> {
  const p = path.join(tmp, `rest-${Math.random().toString(36).slice(2)}.sock`);
  const posts: string[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      if (req.method === 'GET' && req.url === '/vm/state') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ state: 'VirtualMachineStateRunning', canStart: false, canPause: true, canResume: false, canStop: true, canHardStop: true }));
      } else if (req.method === 'POST' && req.url === '/vm/state') {
        expect(req.headers['content-type']).toBe('application/json');
        const state = (JSON.parse(body) as { state: string }).state;
        posts.push(state);
        const [status, out] = onPost(state);
        res.statusCode = status;
        res.end(out);
      } else {
        res.statusCode = 404;
        res.end('404 page not found');
      }
    });
  });
  await new Promise<void>((r) => server.listen(p, r));
  return { path: p, server, posts };
}

describe('vfkit REST client (fake server: vfkit needs macOS)', () => {
  test('reads the state and requests Stop / HardStop', async () => {
    const srv = await fakeRest(() => [202, '']);
    const rest = new VfkitRest(srv.path);
    expect((await rest.getState()).state).toBe('VirtualMachineStateRunning');
    await rest.setState('Stop');
    await rest.setState('HardStop');
    expect(srv.posts).toEqual(['Stop', 'HardStop']);
    srv.server.close();
  });

  test("vfkit's error answer becomes a VfkitRestError with its message", async () => {
    const srv = await fakeRest(() => [500, '{"error":"failed action Stop: \\"operation not permitted\\""}']);
    const err = await new VfkitRest(srv.path).setState('Stop').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VfkitRestError);
    expect((err as VfkitRestError).status).toBe(500);
    expect((err as Error).message).toBe('vfkit POST /vm/state: failed action Stop: "operation not permitted"');
    srv.server.close();
  });

  test('no server: rejects', async () => {
    await expect(new VfkitRest(path.join(tmp, 'none.sock'), 500).getState()).rejects.toThrow(/ENOENT/);
  });
});

/**
 * A stand-in vfkit: serves /vm/state on the --restful-uri socket; "Stop" makes it exit 0 a
 * moment later (a guest that powers off), "HardStop" at once; with FAKE_VFKIT_IGNORE_STOP it
 * ignores "Stop" (a guest that does not react), with FAKE_VFKIT_FAIL it exits 1 at start.
 */
function fakeVfkit(): string {
  const p = path.join(tmp, 'vfkit');
  fs.writeFileSync(
    p,
    `#!${process.execPath}
const http = require('node:http');
const argv = process.argv.slice(2);
if (process.env.FAKE_VFKIT_FAIL) { console.error('Error: bootloader: kernel not found'); process.exit(1); }
const uri = argv[argv.indexOf('--restful-uri') + 1];
const sock = uri.slice('unix://'.length);
const srv = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => (body += c));
  req.on('end', () => {
    if (req.method === 'GET') return res.end(JSON.stringify({ state: 'VirtualMachineStateRunning' }));
    const state = JSON.parse(body).state;
    res.statusCode = 202;
    res.end();
    if (state === 'HardStop') setTimeout(() => process.exit(0), 10);
    if (state === 'Stop' && !process.env.FAKE_VFKIT_IGNORE_STOP) setTimeout(() => process.exit(0), 100);
  });
});
setTimeout(() => srv.listen(sock), 200);
`,
    { mode: 0o755 },
  );
  return p;
}

describe('vfkit process handling (stand-in vfkit: the real one needs macOS)', () => {
  const bin = fakeVfkit();
  const machine = (name: string): MachineSpec => {
    const dir = path.join(tmp, name);
    return spec({ dir, serialLog: path.join(dir, 'serial.log'), controlSocket: path.join(dir, 'vfkit.sock'), agent: { kind: 'vsock', via: 'vmm', cid: 3, port: 1024, path: path.join(dir, 'vsock') } });
  };

  test('start waits for REST; shutdown asks Stop and the VM powers off', async () => {
    const d = new VfkitDriver({ vfkit: bin, startTimeoutMs: 10_000 });
    const vm = await d.start(machine('a'));
    expect(vm.pid).toBeGreaterThan(0);
    expect(await vm.shutdown(5000)).toEqual({ code: 0, signal: null, reason: 'powered off' });
  });

  test('a guest that ignores Stop is hard-stopped after the timeout', async () => {
    process.env.FAKE_VFKIT_IGNORE_STOP = '1';
    try {
      const vm = await new VfkitDriver({ vfkit: bin }).start(machine('b'));
      const info = await vm.shutdown(300);
      expect(info.reason).toBe('stopped by force');
    } finally {
      delete process.env.FAKE_VFKIT_IGNORE_STOP;
    }
  });

  test('killed from outside: noticed, with the signal; adopt() watches by pid', async () => {
    const m = machine('c');
    const d = new VfkitDriver({ vfkit: bin, pollMs: 50 });
    const vm = await d.start(m);
    const adopted = await d.adopt(m, vm.pid);
    expect(adopted).not.toBeNull();
    process.kill(vm.pid, 'SIGKILL');
    expect(await vm.exited).toEqual({ code: null, signal: 'SIGKILL', reason: 'killed by SIGKILL' });
    expect((await adopted!.exited).reason).toMatch(/earlier tender daemon/);
    expect(await d.adopt(m, vm.pid)).toBeNull();
  });

  test('vfkit failing at start: the error carries its last line', async () => {
    process.env.FAKE_VFKIT_FAIL = '1';
    try {
      await expect(new VfkitDriver({ vfkit: bin }).start(machine('d'))).rejects.toThrow(/status 1: Error: bootloader: kernel not found/);
    } finally {
      delete process.env.FAKE_VFKIT_FAIL;
    }
  });
});
