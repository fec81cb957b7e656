/**
 * The daemon's event stream: machine state changes, forwards added and removed, USB events.
 * `GET /v1/events` streams them as newline-delimited JSON.
 */
import { EventEmitter } from 'node:events';

export type TenderEvent =
  | { type: 'machine.state'; machine: string; state: string; reason?: string }
  | { type: 'machine.created' | 'machine.removed'; machine: string }
  | { type: 'machine.address'; machine: string; ip: string }
  | { type: 'forward.added' | 'forward.removed'; machine: string; spec: string; auto: boolean }
  | { type: 'usb.attached' | 'usb.detached' | 'usb.unplugged'; machine: string; device: string };

export class EventBus extends EventEmitter<{ event: [TenderEvent & { time: string }] }> {
  publish(e: TenderEvent): void {
    this.emit('event', { ...e, time: new Date().toISOString() });
  }
}
