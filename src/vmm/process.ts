/**
 * Processes tender did not start (a VMM from an earlier daemon) cannot be wait()ed for: the
 * kernel tells only the parent. So they are watched by polling: alive while kill(pid, 0)
 * succeeds and /proc/<pid>/cmdline still names this machine (a recycled pid is another
 * program, and the machine is gone).
 */
import * as fs from 'node:fs';

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: it exists but belongs to someone else.
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The process's argv, or null if gone (or not Linux). */
export function procCmdline(pid: number): string[] | null {
  try {
    const raw = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return raw.split('\0').filter((s, i, a) => i < a.length - 1 || s !== '');
  } catch {
    return null;
  }
}

/**
 * Is `pid` still the VMM of this machine? `marker` is an argument only this machine's VMM has
 * (its control socket path). Zombies have an empty cmdline: not ours any more.
 */
export function isOurProcess(pid: number, marker: string): boolean {
  if (!pidAlive(pid)) return false;
  if (!fs.existsSync('/proc/self/cmdline')) return true; // no procfs: trust the pid
  const argv = procCmdline(pid);
  return argv !== null && argv.some((a) => a.includes(marker));
}

/** Resolves once `pid` no longer is our process, checking every `intervalMs`. */
export function pollUntilGone(pid: number, marker: string, intervalMs = 500): { done: Promise<void>; checkNow(): void; stop(): void } {
  let timer: NodeJS.Timeout | undefined;
  let resolve!: () => void;
  const done = new Promise<void>((r) => (resolve = r));
  let stopped = false;
  const check = () => {
    if (stopped) return;
    if (!isOurProcess(pid, marker)) {
      stopped = true;
      clearInterval(timer);
      resolve();
    }
  };
  timer = setInterval(check, intervalMs);
  return {
    done,
    checkNow: check,
    stop() {
      stopped = true;
      clearInterval(timer);
    },
  };
}

export function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/** Up to `max` bytes of `file` from `from` (its size when this run started) to its end. */
export function readTail(file: string, from: number, max = 8192): string {
  try {
    const size = fs.statSync(file).size;
    const start = Math.max(from, size - max);
    if (size <= start) return '';
    const fd = fs.openSync(file, 'r');
    try {
      const b = Buffer.alloc(size - start);
      fs.readSync(fd, b, 0, b.length, start);
      return b.toString('utf8');
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return '';
  }
}

/**
 * The end of every forced stop: give the VMM `graceMs` to go after it was asked (QMP quit,
 * vfkit HardStop), then SIGKILL. Resolves with its exit.
 */
export async function killAfter<T>(pid: number, exited: Promise<T>, graceMs: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const gone = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), graceMs)))]);
  clearTimeout(timer);
  if (!gone) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  return exited;
}
