/**
 * What test/e2e/usb-host-device.test.ts needs to run tender's libusb backend against real
 * (QEMU-emulated) USB hardware inside a guest:
 *  - the xHCI host controller modules, which the default image does not carry (a machine has
 *    no USB controller of its own): taken from the same Debian kernel package (apt-get
 *    download, unpacked on the host, never installed), cached per kernel release;
 *  - the serve script (usb-host-serve.ts) compiled with the usb/ library it imports into a
 *    private directory under node_modules/.cache, so the guest runs the host's node on it
 *    (through a read-only 9p share of the host's root) and it finds node_modules/usb.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { resolveModules } from '../../src/image/kmod.js';
import { cacheRoot } from './guest/image.js';

const run = promisify(execFile);
const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** xhci_hcd and xhci_pci (load in this order) for kernel `release`, minus what `have` already loads. */
export async function xhciModules(release: string, have: readonly string[]): Promise<{ name: string; data: Buffer }[]> {
  const dir = path.join(cacheRoot(), 'usb-host-modules', release);
  const index = path.join(dir, 'order');
  if (!fs.existsSync(index)) {
    fs.mkdirSync(path.dirname(dir), { recursive: true });
    const tmp = fs.mkdtempSync(path.join(path.dirname(dir), '.dl-'));
    try {
      await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', `linux-image-${release}`], { cwd: tmp, timeout: 600_000 });
      const deb = fs.readdirSync(tmp).find((f) => f.endsWith('.deb'));
      if (!deb) throw new Error(`apt-get download linux-image-${release} produced no package`);
      const x = path.join(tmp, 'x');
      fs.mkdirSync(x);
      await run('dpkg-deb', ['-x', path.join(tmp, deb), x], { timeout: 300_000 });
      let modRoot = path.join(x, 'lib/modules', release);
      if (!fs.existsSync(modRoot)) modRoot = path.join(x, 'usr/lib/modules', release);
      const mods = resolveModules(modRoot, ['xhci_pci']).modules;
      const stage = path.join(tmp, 'stage');
      fs.mkdirSync(stage);
      for (const m of mods) fs.writeFileSync(path.join(stage, `${m.name}.ko`), m.data);
      fs.writeFileSync(path.join(stage, 'order'), mods.map((m) => m.name).join('\n') + '\n');
      fs.rmSync(dir, { recursive: true, force: true });
      fs.renameSync(stage, dir);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  }
  const names = fs.readFileSync(index, 'utf8').split('\n').filter(Boolean);
  return names.filter((n) => !have.includes(n)).map((name) => ({ name, data: fs.readFileSync(path.join(dir, `${name}.ko`)) }));
}

/**
 * Compile test/helpers/usb-host-serve.ts (and the usb/ files it imports) into a fresh
 * directory inside the repository's node_modules/.cache; returns the script's path and a
 * cleanup. Only usb/ is compiled, so other work in progress in the tree cannot break it.
 */
export async function compileServeScript(): Promise<{ script: string; cleanup: () => void }> {
  const out = path.join(REPO, 'node_modules', '.cache', `tender-usb-host-e2e-${process.pid}`);
  fs.rmSync(out, { recursive: true, force: true });
  const tsc = path.join(REPO, 'node_modules', '.bin', 'tsc');
  // prettier-ignore
  await run(tsc, [
    '--outDir', out, '--rootDir', REPO, '--module', 'nodenext', '--moduleResolution', 'nodenext',
    '--target', 'es2022', '--strict', '--skipLibCheck', '--types', 'node',
    path.join(REPO, 'test/helpers/usb-host-serve.ts'),
  ], { cwd: REPO, timeout: 180_000 });
  fs.writeFileSync(path.join(out, 'package.json'), '{"type":"module"}\n');
  return { script: path.join(out, 'test/helpers/usb-host-serve.js'), cleanup: () => fs.rmSync(out, { recursive: true, force: true }) };
}
