/**
 * Kernel module helpers for the test guest: the default image builder's (src/image/kmod.ts),
 * with resolveModules returning just the load order as this harness always used it.
 */
import { resolveModules as resolve } from '../../../src/image/kmod.js';

export { modName, modinfo, readModule } from '../../../src/image/kmod.js';

/** Dependencies first; built-in modules skipped (see src/image/kmod.ts). */
export function resolveModules(modDir: string, wanted: string[]): { name: string; data: Buffer }[] {
  return resolve(modDir, wanted).modules;
}
