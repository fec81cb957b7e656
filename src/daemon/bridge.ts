/**
 * Bridged networking: a host TAP enslaved to a Linux bridge, so the machine sits on that LAN
 * like a bridged VM (its address comes from the LAN's DHCP server, and the LAN reaches it).
 *
 * The TAP is opened without offloads: the kernel then hands us plain, MTU-sized frames with
 * complete checksums, which is what the machine's NIC expects.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';
import type { Link } from '../../netstack/link/link.js';
import { TapLink } from '../../netstack/link/tap.js';
import { TenderError, fromSystemError } from '../errors.js';

const run = promisify(execFile);

/** A stable interface name per machine (IFNAMSIZ allows 15 bytes; machine names are longer). */
export function bridgeTapName(machine: string): string {
  return `tnd${createHash('sha256').update(machine).digest('hex').slice(0, 8)}`;
}

export async function openBridgeTap(machine: string, bridge: string): Promise<Link> {
  if (!existsSync(`/sys/class/net/${bridge}/bridge`)) {
    throw new TenderError('BAD_ARGUMENT', `"${bridge}" is not a Linux bridge on this host (ip link add ${bridge} type bridge)`);
  }
  const ifname = bridgeTapName(machine);
  let tap: TapLink;
  try {
    tap = TapLink.open({ ifname, offload: false, up: false });
  } catch (err) {
    throw fromSystemError(err, `cannot create TAP ${ifname} for bridge ${bridge}`);
  }
  try {
    await run('ip', ['link', 'set', ifname, 'master', bridge]);
    await run('ip', ['link', 'set', ifname, 'up']);
  } catch (err) {
    tap.close();
    throw new TenderError('TAP_FAILED', `cannot attach ${ifname} to bridge ${bridge}: ${((err as { stderr?: string }).stderr ?? String(err)).trim()}`);
  }
  return tap;
}
