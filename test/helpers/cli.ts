/**
 * Driving tender as a user does, for end-to-end tests: the compiled CLI (dist/src/cli.js) in a
 * throwaway TENDER_HOME, a daemon it talks to, and the default image those machines boot.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { type DefaultImage, ImageUnavailableError, buildDefaultImage, readDefaultImage } from '../../src/image/default-image.js';
import { hasCommand, isRoot, run, waitFor } from './netns.js';

export const ROOT = new URL('../..', import.meta.url).pathname;
export const CLI = join(ROOT, 'dist/src/cli.js');
/** Where tests build the default image once (it is keyed on its inputs, so reuse is safe). */
export const IMAGE_HOME = process.env.TENDER_TEST_IMAGE_HOME || '/var/tmp/tender-test-image';

/**
 * Why tests that boot the default image cannot run here (null: they can). `extra` adds checks
 * of a test's own. With TENDER_TEST_REQUIRE_GUEST=1 (CI) a reason is an error, not a skip.
 */
export async function guestSkipReason(extra: () => string | null | Promise<string | null> = () => null): Promise<string | null> {
  let why: string | null = null;
  if (!isRoot) why = 'needs root';
  else if (!(await hasCommand('qemu-system-x86_64'))) why = 'qemu-system-x86_64 missing';
  else if (!existsSync(join(ROOT, 'build/agent/tender-agent'))) why = 'the guest agent is not built (npm ci builds it)';
  else why = await extra();
  if (why && process.env.TENDER_TEST_REQUIRE_GUEST === '1') throw new Error(`TENDER_TEST_REQUIRE_GUEST=1 but: ${why}`);
  return why;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** `tender ARGS...` with this environment; killed after `timeout` ms (code -1 then). */
export function tenderCli(env: NodeJS.ProcessEnv) {
  const tender = (args: string[], timeout = 180_000, stdin?: Uint8Array) =>
    new Promise<CliResult>((resolve) => {
      const p = spawn(process.execPath, [CLI, ...args], { env, stdio: [stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
      if (stdin) p.stdin!.end(stdin);
      let stdout = '';
      let stderr = '';
      p.stdout!.on('data', (d) => (stdout += d));
      p.stderr!.on('data', (d) => (stderr += d));
      const t = setTimeout(() => p.kill(), timeout);
      p.on('close', (code) => {
        clearTimeout(t);
        resolve({ code: code ?? -1, stdout, stderr });
      });
    });
  /** stdout of a command that must succeed; otherwise an error with its exit code and stderr. */
  const ok = async (args: string[], timeout?: number, stdin?: Uint8Array) => {
    const r = await tender(args, timeout, stdin);
    if (r.code !== 0) throw new Error(`tender ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
    return r.stdout;
  };
  return { tender, ok };
}

/** `tender daemon` in the foreground of a child process, started and stopped by the test. */
export function cliDaemon(env: NodeJS.ProcessEnv & { TENDER_HOME: string }) {
  let proc: ChildProcess | null = null;
  return {
    get proc() {
      return proc;
    },
    async start() {
      proc = spawn(process.execPath, [CLI, 'daemon', '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
      await waitFor(() => existsSync(join(env.TENDER_HOME, 'tender.sock')), 15_000);
    },
    async stop() {
      const d = proc;
      proc = null;
      if (!d) return;
      const closed = new Promise((r) => d.on('close', r));
      d.kill('SIGTERM');
      await closed;
    },
  };
}

/** Compile the CLI if needed and give `home` the default image (built once in IMAGE_HOME). */
export async function prepareHome(home: string): Promise<void> {
  if (!existsSync(CLI)) await run('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT });
  const img = await buildDefaultImage({ home: IMAGE_HOME });
  await run('mkdir', ['-p', join(home, 'images')]);
  await run('cp', ['-a', img.dir, join(home, 'images', 'default')]);
}

/**
 * The default image, for tests that boot it themselves (without the daemon), or why they
 * cannot: a skip, printed with `test`'s name; an error under TENDER_TEST_REQUIRE_GUEST=1 (CI).
 * `anyInstalled`: an image already built will do even if its inputs changed since (tests whose
 * guest code rides in their own archive).
 */
export async function defaultImageFor(
  test: string,
  o: { extra?: () => string | null | Promise<string | null>; anyInstalled?: boolean } = {},
): Promise<{ image: DefaultImage; why: null } | { image: null; why: string }> {
  let why: string | null = null;
  let image: DefaultImage | null = null;
  if (!(await hasCommand('qemu-system-x86_64'))) why = 'qemu-system-x86_64 missing (apt-get install qemu-system-x86)';
  else why = (await o.extra?.()) ?? null;
  if (!why) {
    try {
      image = (o.anyInstalled ? readDefaultImage(IMAGE_HOME) : null) ?? (await buildDefaultImage({ home: IMAGE_HOME }));
    } catch (e) {
      if (!(e instanceof ImageUnavailableError)) throw e;
      why = e.message;
    }
  }
  if (why && process.env.TENDER_TEST_REQUIRE_GUEST === '1') throw new Error(`TENDER_TEST_REQUIRE_GUEST=1 but ${test} cannot run: ${why}`);
  if (why) console.warn(`${test}: skipped: ${why}`);
  return why ? { image: null, why } : { image: image!, why: null };
}
