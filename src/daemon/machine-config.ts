/**
 * A machine's configuration (machine.json, written atomically) and its runtime record
 * (state.json). The configuration is what the user asked for; `set` changes it and the change
 * applies at the next start. The runtime record lets a restarted daemon re-adopt a running
 * VMM (pid) and republish its address.
 */
import { Type, type Static } from '@sinclair/typebox';
import { randomBytes } from 'node:crypto';
import { TenderError } from '../errors.js';

export const MachineName = Type.String({ pattern: '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$', description: 'a DNS label: a-z, 0-9 and -, 1 to 63 characters' });

export const NetMode = Type.Union([
  Type.Object({ mode: Type.Literal('nat') }),
  Type.Object({ mode: Type.Literal('bridged'), bridge: Type.String({ minLength: 1, maxLength: 15 }) }),
]);
export type NetMode = Static<typeof NetMode>;

export const MachineConfigT = Type.Object({
  version: Type.Literal(1),
  name: MachineName,
  createdAt: Type.String(),
  cpus: Type.Integer({ minimum: 1, maximum: 64 }),
  memoryMiB: Type.Integer({ minimum: 64, maximum: 1024 * 1024 }),
  /** 'default' or a directory holding vmlinuz + initrd. */
  image: Type.Optional(Type.String()),
  kernel: Type.Optional(Type.String()),
  initrd: Type.Optional(Type.String()),
  disk: Type.Optional(Type.String()),
  net: NetMode,
  mac: Type.String(),
  forwards: Type.Array(Type.String()),
  autoForward: Type.Boolean(),
  accel: Type.Union([Type.Literal('auto'), Type.Literal('kvm'), Type.Literal('tcg')]),
  /** The guest agent's channel; absent means the default (vsock where the host offers it, else virtio-serial). */
  agent: Type.Optional(Type.Union([Type.Literal('serial'), Type.Literal('vsock')])),
});
export type MachineConfig = Static<typeof MachineConfigT>;

export type MachineState = 'stopped' | 'starting' | 'running' | 'stopping' | 'crashed';

export interface MachineRuntime {
  state: MachineState;
  pid?: number;
  startedAt?: string;
  /** The address the machine got (DHCP), republished after a daemon restart. */
  ip?: string;
  accel?: string;
  /** Why the VMM last ended, with when. */
  lastExit?: { reason: string; at: string };
  /**
   * Which channel the agent runs on: "virtio-serial", "vsock-host" (the host's vhost-vsock),
   * "vsock-vhost-user" (tender's backend); "vsock" from daemons before vsock was the default.
   */
  agentChannel?: string;
  /** Why this run's agent is not on vsock although vsock was wanted (shown by inspect). */
  agentWarning?: string;
}

const NAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

export function validateName(name: string): string {
  if (!NAME_RE.test(name)) {
    throw new TenderError('BAD_MACHINE_NAME', `bad machine name "${name}": use a-z, 0-9 and -, 1 to 63 characters, not starting or ending with -`);
  }
  return name;
}

export function parseNet(s: string): NetMode {
  if (s === 'nat') return { mode: 'nat' };
  const m = /^bridged:([^\s/:]{1,15})$/.exec(s);
  if (m) return { mode: 'bridged', bridge: m[1]! };
  throw new TenderError('BAD_ARGUMENT', `bad --net "${s}": nat or bridged:BRIDGE`);
}

export function formatNet(n: NetMode): string {
  return n.mode === 'nat' ? 'nat' : `bridged:${n.bridge}`;
}

/** A stable, locally administered MAC for a new machine. */
export function newMac(): string {
  const b = randomBytes(6);
  b[0] = (b[0]! & 0xfc) | 0x02;
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join(':');
}

/** `tender machine set NAME key=value`: the keys users may change, applied at the next start. */
export function applySetting(cfg: MachineConfig, kv: string): MachineConfig {
  const eq = kv.indexOf('=');
  if (eq <= 0) throw new TenderError('BAD_ARGUMENT', `expected key=value, got "${kv}"`);
  const key = kv.slice(0, eq);
  const value = kv.slice(eq + 1);
  const next = { ...cfg };
  const int = (min: number, max: number) => {
    const n = Number(value);
    if (!/^\d+$/.test(value) || n < min || n > max) throw new TenderError('BAD_ARGUMENT', `${key} must be an integer from ${min} to ${max}`);
    return n;
  };
  switch (key) {
    case 'cpus':
      next.cpus = int(1, 64);
      break;
    case 'memory':
      next.memoryMiB = int(64, 1024 * 1024);
      break;
    case 'accel':
      if (value !== 'auto' && value !== 'kvm' && value !== 'tcg') throw new TenderError('BAD_ARGUMENT', 'accel must be auto, kvm or tcg');
      next.accel = value;
      break;
    case 'net':
      next.net = parseNet(value);
      break;
    case 'auto-forward':
      if (value !== 'on' && value !== 'off') throw new TenderError('BAD_ARGUMENT', 'auto-forward must be on or off');
      next.autoForward = value === 'on';
      break;
    case 'agent':
      if (value !== 'serial' && value !== 'vsock' && value !== 'default') throw new TenderError('BAD_ARGUMENT', 'agent must be serial, vsock or default');
      if (value === 'default') delete next.agent;
      else next.agent = value;
      break;
    default:
      throw new TenderError('BAD_ARGUMENT', `unknown setting "${key}": cpus, memory, accel, net, auto-forward, agent`);
  }
  return next;
}
