/**
 * One line saying why a VMM process ended, for `tender machine inspect` and the event stream.
 * QEMU's own SHUTDOWN event (when tender had QMP open) says who asked; the exit status and
 * signal say how it ended; the tails of the serial log and of QEMU's stderr say what went
 * wrong. Pure, so every case has a unit test.
 */
import type { ExitInfo } from './driver.js';

export interface ExitFacts {
  code: number | null;
  signal: string | null;
  /** `data.reason` of QEMU's last SHUTDOWN event (qapi/run-state.json ShutdownCause). */
  shutdownCause?: string | null;
  /** tender itself forced the stop (kill(), or shutdown() past its timeout). */
  forced?: boolean;
  /** The end of QEMU's stderr from this run. */
  stderrTail?: string;
  /** The end of the serial console from this run. */
  serialTail?: string;
  /** The process was started by an earlier daemon: no exit status to read. */
  adopted?: boolean;
}

/** The last non-empty line, without the "qemu-system-x86_64: " prefix. */
export function lastLine(text: string | undefined): string | null {
  if (!text) return null;
  const lines = text.split('\n').map((l) => l.replace(/\r/g, '').trim()).filter(Boolean);
  const l = lines[lines.length - 1];
  return l ? l.replace(/^qemu-system-[\w-]+: /, '') : null;
}

/** "Kernel panic - not syncing: <why>" from the serial log, if the guest panicked. */
export function kernelPanic(serial: string | undefined): string | null {
  const m = serial ? /Kernel panic - not syncing: ([^\r\n]*)/.exec(serial) : null;
  return m ? m[1]!.trim() : null;
}

export function exitReason(f: ExitFacts): string {
  const panic = kernelPanic(f.serialTail);
  if (panic !== null) return `kernel panic: ${panic}`;
  switch (f.shutdownCause) {
    case 'guest-shutdown':
      return 'powered off';
    case 'guest-reset':
      // -no-reboot turns a reboot into an exit; tender restarts the machine if asked to.
      return 'rebooted by the guest';
    case 'guest-panic':
      return 'guest panicked';
    case 'host-qmp-quit':
      return f.forced ? 'stopped by force' : 'stopped through QMP quit';
    case 'host-qmp-system-reset':
      return 'reset through QMP';
    case 'host-signal':
      return 'QEMU stopped by a signal';
    default:
      break;
  }
  if (f.signal) return f.forced ? `stopped by force (${f.signal})` : `killed by ${f.signal}`;
  if (f.code !== null && f.code !== 0) {
    const why = lastLine(f.stderrTail);
    return `QEMU exited with status ${f.code}${why ? `: ${why}` : ''}`;
  }
  if (f.adopted) return 'QEMU exited (started by an earlier tender daemon: exit status unknown)';
  return f.forced ? 'stopped by force' : 'QEMU exited';
}

export function exitInfo(f: ExitFacts): ExitInfo {
  return { code: f.code, signal: f.signal, reason: exitReason(f) };
}

/** For a machine whose VMM was already gone when a new daemon looked (adopt() found nothing). */
export const EXITED_UNWATCHED: ExitInfo = { code: null, signal: null, reason: 'exited while tender was not watching' };
