/**
 * Errors at tender's boundaries (CLI, API, native calls) carry a stable code. Every code is
 * in this one table with its HTTP status and CLI exit code; docs/errors.md documents each,
 * and a test checks the two agree.
 */

export const ERRORS = {
  BAD_ARGUMENT: { status: 400, exit: 2, summary: 'A command-line argument or request field is invalid.' },
  BAD_SUBNET: { status: 400, exit: 2, summary: 'The subnet is not an IPv4 CIDR with a prefix from 1 to 30.' },
  BAD_MTU: { status: 400, exit: 2, summary: 'The MTU is outside 576..65520.' },
  BAD_MAC: { status: 400, exit: 2, summary: 'The MAC address is not six hex octets, or is a group (multicast) address.' },
  BAD_IFNAME: { status: 400, exit: 2, summary: 'The interface name is empty, longer than 15 bytes, or has / or whitespace.' },
  BAD_UPSTREAM: { status: 400, exit: 2, summary: 'A --dns-upstream is not ADDR, ADDR:PORT or [IPv6]:PORT.' },
  BAD_REQUEST: { status: 400, exit: 2, summary: 'The API request is malformed: bad JSON, a field of the wrong type, a missing field.' },
  BAD_FORWARD_SPEC: { status: 400, exit: 2, summary: 'A port forward is not [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp] (see docs/netns.md).' },
  BAD_DNS_RECORD: { status: 400, exit: 2, summary: 'A DNS record has an invalid name or address.' },
  PAYLOAD_TOO_LARGE: { status: 413, exit: 2, summary: 'The API request body is larger than 64 KiB.' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, exit: 2, summary: 'The API request body is not application/json.' },
  NOT_FOUND: { status: 404, exit: 3, summary: 'No such API route.' },
  FORWARD_NOT_FOUND: { status: 404, exit: 3, summary: 'No port forward matches the protocol, host address and port.' },
  FORWARD_EXISTS: { status: 409, exit: 5, summary: 'A port forward on that protocol, host address and port already exists.' },
  ADDRESS_IN_USE: { status: 409, exit: 5, summary: 'The host address and port of a forward are already bound by another program.' },
  ADDRESS_NOT_AVAILABLE: { status: 400, exit: 2, summary: 'The host address of a forward is not an address of this host.' },
  BAD_MACHINE_NAME: { status: 400, exit: 2, summary: 'A machine name is not a DNS label (a-z, 0-9 and -, 1 to 63 characters).' },
  MACHINE_NOT_FOUND: { status: 404, exit: 3, summary: 'No machine has that name.' },
  MACHINE_EXISTS: { status: 409, exit: 5, summary: 'A machine with that name already exists.' },
  MACHINE_STATE: { status: 409, exit: 5, summary: 'The machine is not in a state that allows this (e.g. rm of a running machine without --force).' },
  IMAGE_UNAVAILABLE: { status: 400, exit: 6, summary: 'The default image cannot be built here (no apt/dpkg): give --kernel and --initrd, or --disk.' },
  FILE_NOT_FOUND: { status: 400, exit: 3, summary: 'A file given (kernel, initrd, disk or storage image) does not exist.' },
  VMM_FAILED: { status: 500, exit: 6, summary: 'The VMM (QEMU, vfkit) failed to start or exited; the message has its last words.' },
  AGENT_UNAVAILABLE: { status: 409, exit: 6, summary: 'The guest agent is not connected (machine stopped, still booting, or the image has no agent).' },
  EXEC_FAILED: { status: 400, exit: 127, summary: 'The command could not be started in the machine (not found, not executable, bad working directory).' },
  AGENT_GONE: { status: 503, exit: 6, summary: 'The connection to the guest agent ended (the machine stopped or rebooted) while the operation ran.' },
  USB_DEVICE_NOT_FOUND: { status: 404, exit: 3, summary: 'No USB device with that id, busid or name (or it is not attached to that machine).' },
  USB_DEVICE_BUSY: { status: 409, exit: 5, summary: 'The USB device is attached to another machine: one machine per device at a time.' },
  USB_OPEN_FAILED: { status: 409, exit: 6, summary: 'The host USB device could not be opened for export (unplugged meanwhile, or its kernel driver would not let go); the message has libusb\'s reason.' },
  USB_UNAVAILABLE: { status: 503, exit: 7, summary: 'Host USB devices are unavailable here: libusb (the usb package\'s native part) could not be loaded.' },
  USB_POLICY_NOT_FOUND: { status: 404, exit: 3, summary: 'No auto-attach rule has that id (tender usb policy ls).' },
  USB_POLICY_EXISTS: { status: 409, exit: 5, summary: 'An auto-attach rule for that VID:PID or busid already gives it to another machine.' },
  USB_ATTACH_FAILED: { status: 500, exit: 6, summary: 'The guest could not import the USB device (the message has the guest\'s reason).' },
  DAEMON_UNAVAILABLE: { status: 503, exit: 7, summary: 'The tender daemon is not running and could not be started; see its log.' },
  NETNS_NOT_FOUND: { status: 404, exit: 3, summary: 'The network namespace (name, path or PID) does not exist.' },
  PERMISSION_DENIED: { status: 403, exit: 4, summary: 'The operation needs privileges tender does not have (usually root or CAP_NET_ADMIN + CAP_SYS_ADMIN).' },
  IFNAME_IN_USE: { status: 409, exit: 5, summary: 'An interface with that name already exists in the namespace.' },
  TAP_FAILED: { status: 500, exit: 6, summary: 'Creating or configuring the TAP device failed for another reason (the message names the system call and errno).' },
  CONFIGURE_FAILED: { status: 500, exit: 6, summary: '--configure could not set the address, route or resolv.conf inside the namespace.' },
  PCAP_FAILED: { status: 500, exit: 6, summary: 'The capture file cannot be opened for writing.' },
  NATIVE_UNAVAILABLE: { status: 500, exit: 7, summary: 'The native addon is not built (run npm ci, which builds it with node-gyp).' },
  INTERNAL: { status: 500, exit: 1, summary: 'A bug: please report it with the log.' },
} as const;

export type ErrorCode = keyof typeof ERRORS;

export class TenderError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly exitCode: number;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TenderError';
    this.code = code;
    this.status = ERRORS[code].status;
    this.exitCode = ERRORS[code].exit;
  }
}

/** Map a system error from a native call or child process to a coded error. */
export function fromSystemError(err: unknown, context: string, fallback: ErrorCode = 'TAP_FAILED'): TenderError {
  if (err instanceof TenderError) return err;
  const e = err as NodeJS.ErrnoException & { path?: string };
  const sys = e?.code ? ` (${e.syscall ? e.syscall + ': ' : ''}${e.code})` : '';
  const msg = `${context}: ${e?.message ?? String(err)}${sys}`;
  switch (e?.code) {
    case 'EPERM':
    case 'EACCES':
      return new TenderError('PERMISSION_DENIED', `${context}: permission denied${sys}; run as root`, { cause: err });
    case 'ENOENT':
      // A missing /dev/net/tun is not a missing namespace.
      if (e.path === '/dev/net/tun') return new TenderError('TAP_FAILED', `${context}: /dev/net/tun does not exist (load the tun module)`, { cause: err });
      return new TenderError(fallback === 'TAP_FAILED' ? 'NETNS_NOT_FOUND' : fallback, msg, { cause: err });
    case 'EBUSY':
    case 'EEXIST':
      return new TenderError('IFNAME_IN_USE', msg, { cause: err });
    case 'EINVAL':
      // TUNSETIFF refuses a name held by another kind of device with EINVAL.
      if (e.syscall?.includes('TUNSETIFF')) return new TenderError('IFNAME_IN_USE', `${context}: the name is taken by another device${sys}`, { cause: err });
      return new TenderError(fallback, msg, { cause: err });
    default:
      return new TenderError(fallback, msg, { cause: err });
  }
}
