/**
 * The one-line reason a machine stopped, from QMP's SHUTDOWN cause, the exit status or
 * signal, and the tails of QEMU's stderr and the serial console.
 */
import { describe, expect, test } from 'vitest';
import { exitReason, kernelPanic, lastLine } from '../../src/vmm/exit-reason.js';

describe('exit reasons', () => {
  test('guest power-off, reboot and panic', () => {
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'guest-shutdown' })).toBe('powered off');
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'guest-reset' })).toBe('rebooted by the guest');
    // Kernel panic with panic=-1: the kernel reboots, which -no-reboot turns into an exit.
    const serial = '[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n[    2.1] Rebooting in -1 seconds..\r\n';
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'guest-reset', serialTail: serial })).toBe(
      'kernel panic: VFS: Unable to mount root fs on unknown-block(0,0)',
    );
  });

  test('stopped by tender, or killed from outside', () => {
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'host-qmp-quit', forced: true })).toBe('stopped by force');
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'host-qmp-quit' })).toBe('stopped through QMP quit');
    expect(exitReason({ code: null, signal: 'SIGKILL' })).toBe('killed by SIGKILL');
    expect(exitReason({ code: null, signal: 'SIGKILL', forced: true })).toBe('stopped by force (SIGKILL)');
    expect(exitReason({ code: 0, signal: null, shutdownCause: 'host-signal' })).toBe('QEMU stopped by a signal');
  });

  test('QEMU failing: its last stderr line, without the program prefix', () => {
    const stderr = "qemu-system-x86_64: -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/x: Failed to connect to '/x': No such file or directory\n";
    expect(exitReason({ code: 1, signal: null, stderrTail: stderr })).toBe(
      "QEMU exited with status 1: -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/x: Failed to connect to '/x': No such file or directory",
    );
    expect(exitReason({ code: 1, signal: null })).toBe('QEMU exited with status 1');
  });

  test('adopted processes have no exit status', () => {
    expect(exitReason({ code: null, signal: null, adopted: true })).toMatch(/earlier tender daemon/);
    expect(exitReason({ code: null, signal: null, adopted: true, shutdownCause: 'guest-shutdown' })).toBe('powered off');
  });

  test('helpers', () => {
    expect(lastLine('a\n\n  b  \r\n\n')).toBe('b');
    expect(lastLine('')).toBeNull();
    expect(kernelPanic('nothing')).toBeNull();
  });
});
