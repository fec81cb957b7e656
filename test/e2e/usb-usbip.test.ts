/**
 * The Debian `usbip` tool (the kernel's own userspace client, tools/usb/usbip; `apt-get install
 * usbip`) against `tender usb serve` on loopback:
 *  - `usbip list -r` lists the virtual disk with its busid, VID:PID, path and the
 *    mass-storage interface (08/06/50);
 *  - `usbip attach` performs the import handshake against the server (the tool then fails here
 *    because this host has no vhci-hcd module: that failure is expected and checked), and the
 *    device is free again once the tool hung up.
 * The command is run from the build (dist/) through registerUsbCommands, as the CLI wires it.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const built = join(root, 'dist/src/commands/usb.js');
const hasUsbip = await run('usbip', ['version']).then(() => true, () => false);
if (!hasUsbip) console.warn('usb-usbip: skipped: usbip missing (apt-get install usbip)');

const ENTRY = `
import { Command } from 'commander';
import { registerUsbCommands } from ${JSON.stringify(built)};
const p = new Command().name('tender').exitOverride();
registerUsbCommands(p);
await p.parseAsync(process.argv.slice(1), { from: 'user' });
`;

describe.skipIf(!hasUsbip)('usbip tool against tender usb serve', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tender-usbip-'));
  let proc: ChildProcess;
  let out = '';
  let err = '';
  let port = 0;

  beforeAll(async () => {
    const sources = [join(root, 'src/commands/usb.ts'), ...readdirSync(join(root, 'usb'), { recursive: true }).map((f) => join(root, 'usb', String(f))).filter((f) => f.endsWith('.ts'))];
    const newest = Math.max(...sources.map((f) => statSync(f).mtimeMs));
    if (!existsSync(built) || statSync(built).mtimeMs < newest) {
      await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root }).catch(() => undefined); // others' type errors do not stop emit
    }
    const img = join(dir, 'disk.img');
    writeFileSync(img, Buffer.alloc(4 * 1024 * 1024, 0x5a));
    proc = spawn(process.execPath, ['--input-type=module', '-e', ENTRY, 'usb', 'serve', '--listen', '127.0.0.1:0', '--storage', `${img}:ro`, '--log-level', 'debug'], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    proc.stdout!.on('data', (c) => (out += c));
    proc.stderr!.on('data', (c) => (err += c));
    for (let i = 0; i < 400 && !/listening /.test(out); i++) await new Promise((r) => setTimeout(r, 25));
    const m = /listening 127\.0\.0\.1:(\d+)/.exec(out);
    if (!m) throw new Error(`server did not start: ${out} ${err}`);
    port = Number(m[1]);
  }, 180_000);

  afterAll(async () => {
    if (proc && proc.exitCode === null) {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('prints the served device', () => {
    expect(out).toMatch(/device 99-1 storage .*disk\.img \(read-only\) 4194304 bytes/);
  });

  it('usbip list -r shows the virtual disk, VID:PID and the mass-storage interface', async () => {
    const { stdout } = await run('usbip', ['--tcp-port', String(port), 'list', '-r', '127.0.0.1']);
    expect(stdout).toMatch(/99-1: .*\(0525:a4a5\)/);
    expect(stdout).toMatch(/: \/sys\/devices\/virtual\/tender\/usb99\/99-1/);
    expect(stdout).toMatch(/\(Defined at Interface level\) \(00\/00\/00\)/);
    expect(stdout).toMatch(/0 - Mass Storage \/ SCSI \/ Bulk-Only \(08\/06\/50\)/);
  });

  it('usbip attach completes the import handshake, then fails only for lack of vhci-hcd', async () => {
    const r = await run('usbip', ['--tcp-port', String(port), 'attach', '-r', '127.0.0.1', '-b', '99-1']).then(
      () => ({ stderr: '', ok: true }),
      (e: { stderr: string }) => ({ stderr: e.stderr, ok: false }),
    );
    const vhci = existsSync('/sys/devices/platform/vhci_hcd.0');
    if (!vhci) expect(r.stderr).toMatch(/vhci/);
    // The server saw an import and then the hang-up (logged at debug), and the disk is free again:
    for (let i = 0; i < 200 && !/USB\/IP connection closed/.test(err); i++) await new Promise((r) => setTimeout(r, 10));
    expect(err).toMatch(/"busid":"99-1","kind":"hangup"/);
  });

  it('an unknown busid is refused', async () => {
    const r = await run('usbip', ['--tcp-port', String(port), 'attach', '-r', '127.0.0.1', '-b', '1-1']).then(
      () => ({ stderr: '' }),
      (e: { stderr: string }) => ({ stderr: e.stderr }),
    );
    expect(r.stderr).toMatch(/error/);
  });

  it('SIGTERM stops the server cleanly', async () => {
    const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    proc.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(err).toMatch(/stopping/);
  });
});
