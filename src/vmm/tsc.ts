/**
 * microvm has no HPET and no ACPI PM timer, so the kernel calibrates the TSC against the PIT
 * alone, over a short real-time window. Under TCG on a loaded host the vCPU is too slow for
 * that window: "tsc: Unable to calibrate against PIT", the TSC is marked unstable, and boot
 * stalls before /init (about half the boots on a busy 2-core machine). TCG's guest TSC is the
 * host's TSC (cpu_get_host_ticks), so tell the kernel its rate and skip the calibration;
 * tsc=reliable keeps the clocksource watchdog from distrusting it. Under KVM the guest uses
 * kvm-clock and these words are harmless.
 */
import * as fs from 'node:fs';

let cached: number | null | undefined;

/** The host TSC rate in kHz, from /proc/cpuinfo (approximate where the CPU scales frequency). */
export function hostTscKhz(cpuinfo?: string): number | null {
  if (cpuinfo === undefined && cached !== undefined) return cached;
  let khz: number | null = null;
  try {
    const text = cpuinfo ?? fs.readFileSync('/proc/cpuinfo', 'utf8');
    const m = /^cpu MHz\s*:\s*([\d.]+)/m.exec(text);
    if (m) khz = Math.round(Number(m[1]) * 1000) || null;
  } catch {
    // not Linux: let the kernel calibrate
  }
  if (cpuinfo === undefined) cached = khz;
  return khz;
}

export function tscArgs(khz: number | null = hostTscKhz()): string[] {
  return khz ? [`tsc_early_khz=${khz}`, 'tsc=reliable'] : [];
}
