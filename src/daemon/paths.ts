/**
 * Where tender keeps its state: `$TENDER_HOME`, by default
 * `${XDG_DATA_HOME:-~/.local/share}/tender`. One directory per machine holds its config
 * (written atomically), serial log and sockets.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';

export function tenderHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TENDER_HOME) return env.TENDER_HOME;
  const data = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(data, 'tender');
}

export interface Paths {
  home: string;
  /** The daemon's API socket. */
  socket: string;
  /** The daemon's log when started in the background by the CLI. */
  log: string;
  pidFile: string;
  machines: string;
  images: string;
  /** Daemon-wide settings and the network's forwards. */
  config: string;
}

export function paths(home = tenderHome()): Paths {
  return {
    home,
    socket: join(home, 'tender.sock'),
    log: join(home, 'daemon.log'),
    pidFile: join(home, 'daemon.pid'),
    machines: join(home, 'machines'),
    images: join(home, 'images'),
    config: join(home, 'config.json'),
  };
}

export function machineDir(p: Paths, name: string): string {
  return join(p.machines, name);
}
