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
  const e = err as NodeJS.ErrnoException;
  const sys = e?.code ? ` (${e.syscall ? e.syscall + ': ' : ''}${e.code})` : '';
  const msg = `${context}: ${e?.message ?? String(err)}${sys}`;
  switch (e?.code) {
    case 'EPERM':
    case 'EACCES':
      return new TenderError('PERMISSION_DENIED', `${context}: permission denied${sys}; run as root`, { cause: err });
    case 'ENOENT':
      return new TenderError(fallback === 'TAP_FAILED' ? 'NETNS_NOT_FOUND' : fallback, msg, { cause: err });
    case 'EBUSY':
    case 'EEXIST':
      return new TenderError('IFNAME_IN_USE', msg, { cause: err });
    default:
      return new TenderError(fallback, msg, { cause: err });
  }
}
