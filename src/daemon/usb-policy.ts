/**
 * Auto-attach rules (`tender usb policy`): a device matching a rule's VID:PID or busid goes to
 * the rule's machine whenever both are there. Rules apply when they are made, when the machine's
 * agent (re)connects and when a matching device is plugged in, including the same device
 * re-enumerated with a new devnum after a reset or a firmware flash. They never take a device
 * that is attached already.
 */
import { TenderError } from '../errors.js';
import type { Logger } from '../log.js';
import type { Dev, UsbDevices } from './usb-devices.js';
import { parseMatch, type UsbPolicy } from './usb-state.js';
import type { UsbStore } from './usb-store.js';

export interface UsbPolicyInfo extends UsbPolicy {
  /** Busids of the plugged-in devices the rule matches now. */
  devices: string[];
}

function matches(p: UsbPolicy, d: Dev): boolean {
  return p.kind === 'vidpid' ? p.match === d.vidpid : p.match === d.busid;
}

export class UsbPolicies {
  constructor(
    private readonly o: {
      store: UsbStore;
      devices: UsbDevices;
      log: Logger;
      /** Whether the machine is running or starting (a rule waits for its machine otherwise). */
      machineUp: (machine: string) => boolean;
      /** Attach the device to the machine (usb-attach.ts). */
      give: (machine: string, d: Dev) => Promise<void>;
    },
  ) {}

  /** The first rule matching `d`, or undefined. */
  policyFor(d: Dev): UsbPolicy | undefined {
    return this.o.store.state.policies.find((p) => matches(p, d));
  }

  list(): UsbPolicyInfo[] {
    const devs = this.o.devices.all();
    return this.o.store.state.policies.map((p) => ({ ...p, devices: devs.filter((d) => matches(p, d)).map((d) => d.busid) }));
  }

  /** The rule to keep for (machine, match): an existing identical one, or a new one not yet saved. */
  plan(machine: string, m: { kind: 'vidpid' | 'busid'; match: string }): UsbPolicy {
    const policies = this.o.store.state.policies;
    const same = policies.find((p) => p.kind === m.kind && p.match === m.match);
    if (same && same.machine === machine) return same;
    if (same) throw new TenderError('USB_POLICY_EXISTS', `rule ${same.id} already gives ${m.match} to "${same.machine}" (tender usb policy rm ${same.id})`);
    let n = 1;
    while (policies.some((p) => p.id === `p${n}`)) n++;
    return { id: `p${n}`, machine, kind: m.kind, match: m.match, createdAt: new Date().toISOString() };
  }

  /** `usb policy add` for an existing machine: record the rule, and attach the matching devices that are free now. */
  async add(machine: string, matchText: string): Promise<UsbPolicyInfo> {
    const p = this.plan(machine, parseMatch(matchText));
    if (!this.o.store.state.policies.includes(p)) {
      this.o.store.state.policies.push(p);
      this.o.store.save();
    }
    await this.apply({ policy: p });
    return this.list().find((x) => x.id === p.id)!;
  }

  remove(id: string): void {
    const p = this.o.store.state.policies.find((x) => x.id === id);
    if (!p) throw new TenderError('USB_POLICY_NOT_FOUND', `no auto-attach rule "${id}" (tender usb policy ls)`);
    // Devices it attached stay attached: removing a rule stops future attaches only.
    this.o.store.state.policies = this.o.store.state.policies.filter((x) => x !== p);
    this.o.store.save();
  }

  /**
   * Attach free devices that a rule gives to a running (or starting) machine. Rules are tried
   * in the order they were made; a device goes to the first rule's machine that is up.
   */
  async apply(f: { machine?: string; busid?: string; policy?: UsbPolicy }): Promise<void> {
    for (const d of this.o.devices.all()) {
      if (f.busid !== undefined && d.busid !== f.busid) continue;
      if (this.o.store.attachmentOf(d.id)) continue;
      const p = this.o.store.state.policies.find(
        (x) => matches(x, d) && (f.policy === undefined || x === f.policy) && (f.machine === undefined || x.machine === f.machine) && this.o.machineUp(x.machine),
      );
      if (!p) continue;
      try {
        await this.o.give(p.machine, d);
        this.o.log.info({ machine: p.machine, device: d.id, policy: p.id }, 'USB device attached by rule');
      } catch (err) {
        this.o.log.warn({ machine: p.machine, device: d.id, policy: p.id, err: (err as Error).message }, 'auto-attach failed');
      }
    }
  }
}
