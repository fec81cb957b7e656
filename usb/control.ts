/**
 * Standard control requests on endpoint 0 (USB 2.0 §9.4), answered from the device's
 * descriptors or translated into device hooks, never forwarded raw. The kernel's stub does the
 * same for the requests that change host-side state (stub_rx.c tweak_special_requests:
 * SET_CONFIGURATION → usb_set_configuration, SET_INTERFACE → usb_set_interface,
 * CLEAR_FEATURE(ENDPOINT_HALT) → usb_clear_halt, port reset → usb_reset_device).
 * Returns undefined for class/vendor requests, which go to the device's submit().
 */
import { Errno } from './protocol.js';
import { stringDescriptor, type UrbResult, type UsbDevice } from './device.js';

const GET_STATUS = 0;
const CLEAR_FEATURE = 1;
const SET_FEATURE = 3;
const SET_ADDRESS = 5;
const GET_DESCRIPTOR = 6;
const GET_CONFIGURATION = 8;
const SET_CONFIGURATION = 9;
const GET_INTERFACE = 10;
const SET_INTERFACE = 11;

const DT_DEVICE = 1;
const DT_CONFIG = 2;
const DT_STRING = 3;
const DT_DEVICE_QUALIFIER = 6;
const DT_BOS = 15;

const ENDPOINT_HALT = 0;

export interface ControlState {
  configuration: number;
}

const stall = (): UrbResult => ({ status: Errno.EPIPE, data: new Uint8Array(0), actualLength: 0 });
const ok = (): UrbResult => ({ status: 0, actualLength: 0 });
const inData = (b: Uint8Array, wLength: number): UrbResult => ({ status: 0, data: b.subarray(0, Math.min(b.length, wLength)) });

export async function handleStandardRequest(dev: UsbDevice, setup: Uint8Array, state: ControlState): Promise<UrbResult | undefined> {
  const bmRequestType = setup[0]!;
  if ((bmRequestType & 0x60) !== 0) return undefined; // class or vendor
  const bRequest = setup[1]!;
  const wValue = setup[2]! | (setup[3]! << 8);
  const wIndex = setup[4]! | (setup[5]! << 8);
  const wLength = setup[6]! | (setup[7]! << 8);
  const recipient = bmRequestType & 0x1f;
  const d = dev.descriptors;
  switch (bRequest) {
    case GET_DESCRIPTOR: {
      const type = wValue >> 8;
      const index = wValue & 0xff;
      if (type === DT_DEVICE) return inData(d.device, wLength);
      if (type === DT_CONFIG) {
        const c = d.configurations[index];
        return c ? inData(c, wLength) : stall();
      }
      if (type === DT_STRING) {
        const s = stringDescriptor(d.strings.get(index), index);
        return s ? inData(s, wLength) : stall();
      }
      if (type === DT_DEVICE_QUALIFIER) {
        // USB 2.0 §9.6.2: only for high-speed capable devices; a full-speed-only device stalls.
        if (((d.device[3]! << 8) | d.device[2]!) < 0x0200) return stall();
        const q = Uint8Array.of(10, 6, d.device[2]!, d.device[3]!, d.device[4]!, d.device[5]!, d.device[6]!, d.device[7]!, d.device[17]!, 0);
        return inData(q, wLength);
      }
      if (type === DT_BOS && d.bos) return inData(d.bos, wLength);
      return stall(); // other-speed config, BOS (bcdUSB 2.00 devices have none), ...
    }
    case GET_STATUS: {
      let v = 0;
      if (recipient === 0) {
        const cfg = d.configurations[0];
        if (cfg && (cfg[7]! & 0x40)) v |= 1; // self-powered
      } else if (recipient === 2) {
        v = dev.isHalted(wIndex & 0x8f) ? 1 : 0;
      }
      return inData(Uint8Array.of(v, 0), wLength);
    }
    case CLEAR_FEATURE:
      if (recipient === 2 && wValue === ENDPOINT_HALT) await dev.clearHalt(wIndex & 0x8f);
      return ok();
    case SET_FEATURE:
      return ok(); // remote wakeup / test mode: nothing to do for a remote device
    case SET_ADDRESS:
      return ok(); // vhci-hcd handles addressing itself; never reaches a real server
    case GET_CONFIGURATION:
      return inData(Uint8Array.of(state.configuration), wLength);
    case SET_CONFIGURATION: {
      const value = wValue & 0xff;
      const known = value === 0 || d.configurations.some((c) => c[5] === value);
      if (!known) return stall();
      await dev.setConfiguration(value);
      state.configuration = value;
      return ok();
    }
    case GET_INTERFACE:
      return inData(Uint8Array.of(0), wLength);
    case SET_INTERFACE:
      await dev.setInterface(wIndex & 0xff, wValue & 0xff);
      return ok();
    default:
      return stall();
  }
}
