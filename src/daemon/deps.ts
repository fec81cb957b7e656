/**
 * The daemon's real collaborators on this host: the QEMU driver (vfkit on macOS), the default
 * image, the guest agent over virtio-serial, and host TAPs for bridged networking. Tests swap
 * them for stand-ins through `startDaemon`'s `deps`.
 */
import { join } from 'node:path';
import { DEFAULT_IMAGE_CMDLINE, ImageUnavailableError, buildDefaultImage } from '../image/default-image.js';
import { TenderError } from '../errors.js';
import { QemuDriver } from '../vmm/qemu.js';
import { VfkitDriver } from '../vmm/vfkit.js';
import type { AccelDecision } from '../vmm/kvm-probe.js';
import { readJson, writeFileAtomic } from './atomic.js';
import { connectAgentSession, listenAgentSession } from './agent-session.js';
import { openBridgeTap } from './bridge.js';
import { type DaemonDeps, openHostUsb } from './daemon.js';
import type { ImageProvider } from './machines.js';
import type { Paths } from './paths.js';

export function imageProvider(p: Paths): ImageProvider {
  return {
    async resolve(cfg, onProgress) {
      if (cfg.kernel) return { kernel: cfg.kernel, initrd: cfg.initrd, disk: cfg.disk };
      if (cfg.image && cfg.image !== 'default') {
        return { kernel: join(cfg.image, 'vmlinuz'), initrd: join(cfg.image, 'initrd'), disk: cfg.disk };
      }
      try {
        const img = await buildDefaultImage({ home: p.home, onProgress: (s) => onProgress?.(`image: ${s.message ?? s.step}`) });
        return { kernel: img.kernel, initrd: img.initrd, disk: cfg.disk, cmdline: img.cmdline ?? DEFAULT_IMAGE_CMDLINE };
      } catch (err) {
        if (err instanceof ImageUnavailableError) throw new TenderError('IMAGE_UNAVAILABLE', err.message, { cause: err });
        throw err;
      }
    },
  };
}

/** KVM probe results survive daemon restarts: probing costs a boot attempt. */
function accelCache(p: Paths) {
  const file = join(p.home, 'accel-cache.json');
  return {
    get: (key: string) => readJson<Record<string, AccelDecision>>(file)?.[key],
    set: (key: string, value: AccelDecision) => {
      const all = readJson<Record<string, AccelDecision>>(file) ?? {};
      all[key] = value;
      writeFileAtomic(file, JSON.stringify(all, null, 2) + '\n');
    },
  };
}

export function defaultDeps(p: Paths): DaemonDeps {
  const driver = process.platform === 'darwin' ? new VfkitDriver() : new QemuDriver({ accelCache: accelCache(p) });
  return {
    driver,
    images: imageProvider(p),
    connectAgent: connectAgentSession,
    listenAgent: listenAgentSession,
    openBridgeTap,
    hostUsb: openHostUsb,
  };
}
