/**
 * The VMM driver interface: everything tender needs from a hypervisor, small enough that
 * Firecracker or cloud-hypervisor can be added beside QEMU and vfkit without touching the
 * daemon. A driver turns a MachineSpec into a process and controls that process; networking,
 * the agent channel and state live outside it.
 */

import type { VsockChoice, VsockVia } from './vsock-channel.js';

export type Accel = 'auto' | 'kvm' | 'tcg' | 'hvf';

/** How the machine's NIC reaches tender's network. */
export type NetAttachment =
  /**
   * One frame per datagram on unix sockets (QEMU -netdev dgram, vfkit unixSocketPath).
   * Seen from the VMM: it binds `localPath` and sends to `remotePath`, which tender binds
   * (`DatagramLink.connect(remotePath, localPath)`); vfkit's unixSocketPath is `remotePath`.
   * Survives a daemon restart: there is no connection to lose.
   */
  | { kind: 'dgram'; mac: string; localPath: string; remotePath: string }
  /** QEMU -netdev stream, QEMU as the client of tender's listener (4-byte length framing). */
  | { kind: 'stream'; mac: string; path: string }
  | { kind: 'none' };

/** How the guest agent reaches the host. */
export type AgentChannel =
  /** A virtio-serial port named org.tender.agent.0; the VMM serves `path` (a unix socket) and tender connects, so tender can reconnect after a restart. */
  | { kind: 'virtio-serial'; path: string }
  /**
   * vsock; the agent connects to host port `port`. QEMU: `via` 'host' is vhost-vsock-device
   * with guest-cid `cid` (the host's /dev/vhost-vsock; the host side is AF_VSOCK); 'vhost-user'
   * is tender's backend, whose host side is Firecracker-style unix sockets at `<path>_<port>`
   * (docs/vsock.md); unset: the driver checks /dev/vhost-vsock itself. vfkit ('vmm'): each port
   * of `hostPorts` (default: `port`) is its own device entry whose unix socket is `<path>_<P>`.
   * `hostPorts`: every port on which the host takes the guest's connections (the agent's,
   * USB/IP's), for VMMs that must be told each one.
   */
  | { kind: 'vsock'; cid: number; port: number; path: string; via?: VsockVia; hostPorts?: number[] }
  | { kind: 'none' };

export interface MachineSpec {
  name: string;
  /** The machine's state directory: sockets, serial log, pid file. */
  dir: string;
  cpus: number;
  memoryMiB: number;
  kernel: string;
  initrd?: string;
  /** A raw or qcow2 disk image used as the root device (virtio-blk). */
  disk?: string;
  /** Extra kernel command-line words (the driver adds console and timing options it needs). */
  cmdline: string[];
  accel: Accel;
  net: NetAttachment;
  agent: AgentChannel;
  /** The serial console is appended here. */
  serialLog: string;
  /** The VMM's control socket (QMP for QEMU, REST for vfkit). */
  controlSocket: string;
}

export interface ExitInfo {
  code: number | null;
  signal: string | null;
  /** One line for `tender machine inspect`: "powered off", "killed by SIGKILL", "QEMU exited with status 1: <last stderr line>". */
  reason: string;
}

export interface VmmInstance {
  readonly pid: number;
  /** Resolves when the process is gone, whoever ended it. */
  readonly exited: Promise<ExitInfo>;
  /** Ask the guest to power off (ACPI / QMP system_powerdown); after `timeoutMs` kill it. */
  shutdown(timeoutMs: number): Promise<ExitInfo>;
  /** Kill at once (SIGKILL, or the VMM's own "quit"). */
  kill(): Promise<ExitInfo>;
}

export interface VmmDriver {
  readonly name: string;
  /** The command line, for start() and for tests and `inspect` (no side effects). */
  commandLine(spec: MachineSpec, accel: Exclude<Accel, 'auto'>): { cmd: string; args: string[] };
  /** Resolve `auto` to what works on this host (may probe by booting; cached by the caller). */
  resolveAccel(spec: MachineSpec): Promise<{ accel: Exclude<Accel, 'auto'>; warning?: string }>;
  start(spec: MachineSpec): Promise<VmmInstance>;
  /** Re-attach to a VMM started by an earlier daemon (pid from the state file), or null if it is gone. */
  adopt(spec: MachineSpec, pid: number): Promise<VmmInstance | null>;
  /** Which vsock this VMM offers on this host, checked at each start (vsock-channel.ts). */
  vsock?(): VsockChoice;
}
