/*
 * tender guest agent wire protocol, version 1. The reference is docs/agent-protocol.md;
 * src/agent/protocol.ts mirrors every number here (a unit test compares the two files).
 *
 * Frame: u32 length | u8 type | u32 stream | payload, all integers big-endian. `length`
 * counts type + stream + payload (so it is at least 5) and is at most 5 + MAX_PAYLOAD.
 */
#ifndef TENDER_AGENT_PROTOCOL_H
#define TENDER_AGENT_PROTOCOL_H

#define PROTO_VERSION 1
#define HDR_LEN 9                 /* u32 length + u8 type + u32 stream */
#define MAX_PAYLOAD (1u << 20)    /* 1 MiB: a bigger length is a protocol error */

enum msg_type {
	M_HELLO = 0x01,     /* A->H: u16 version, str agent, str kernel, str hostname, str boot_id;
	                       stream = the HOST_HELLO nonce it answers, 0 when unsolicited */
	M_HOST_HELLO = 0x04, /* H->A: u16 version; stream = the host's nonce (non-zero) */
	M_PING = 0x02,      /* H->A: opaque payload, echoed in PONG on the same stream id */
	M_PONG = 0x03,      /* A->H */
	M_EXEC = 0x10,      /* H->A s>0: u8 flags, u16 rows, u16 cols, u32 window, str cwd,
	                       u32 argc, str argv[argc], u32 envc, str env[envc] ("K=V") */
	M_STARTED = 0x11,   /* A->H: u32 pid, u32 stdin window */
	M_STDIN = 0x12,     /* H->A: bytes (within the stdin window) */
	M_STDIN_EOF = 0x13, /* H->A: empty */
	M_STDOUT = 0x14,    /* A->H: bytes (within the stdout window) */
	M_STDERR = 0x15,    /* A->H: bytes (within the stderr window) */
	M_WINDOW = 0x16,    /* both: u8 channel, u32 increment */
	M_RESIZE = 0x17,    /* H->A: u16 rows, u16 cols */
	M_SIGNAL = 0x18,    /* H->A: u32 signal number (Linux numbering) */
	M_EXIT = 0x19,      /* A->H: i32 code (-1 when killed), u32 signal (0 when exited) */
	M_LISTENERS = 0x20, /* A->H s0: u32 count, count x (u8 proto, u8 family, u16 port, addr[4|16]) */
	M_POWEROFF = 0x30,  /* H->A: empty */
	M_REBOOT = 0x31,    /* H->A: empty */
	M_USB_ATTACH = 0x40,   /* H->A s>0: u16 port, u8 speed (0: the device's), str host, str busid */
	M_USB_ATTACHED = 0x41, /* A->H: u32 vhci port, u32 devid (busnum << 16 | devnum), u32 speed */
	M_USB_DETACH = 0x42,   /* H->A: u32 vhci port */
	M_USB_DETACHED = 0x43, /* A->H: empty */
	M_ERROR = 0x7f,     /* A->H: u32 code, i32 errno, str message */
};

enum window_channel { CH_STDIN = 0, CH_STDOUT = 1, CH_STDERR = 2 };

#define EXEC_FLAG_TTY 0x01

enum error_code {
	E_UNKNOWN_TYPE = 1,     /* message type the agent does not know */
	E_BAD_PAYLOAD = 2,      /* payload too short, trailing bytes, bad counts, NUL in a string */
	E_EXEC_FAILED = 3,      /* chdir/exec/fork/pipe/openpty failed: errno says why */
	E_STREAM_EXISTS = 4,    /* EXEC on a stream id that is still running */
	E_TOO_MANY_STREAMS = 5, /* more than MAX_STREAMS concurrent execs */
	E_POWER_FAILED = 6,     /* reboot(2) failed: errno */
	E_POWER_DISABLED = 7,   /* the agent runs with --no-power (tests on a host) */
	E_USB_FAILED = 8,       /* connect, timeout, vhci-hcd missing, sysfs attach/detach: errno */
	E_USB_IMPORT_REFUSED = 9, /* the server refused the import or did not speak USB/IP */
	E_USB_NO_PORT = 10,     /* no free vhci port of the device's speed */
};

/* str = u32 length + bytes (no NUL terminator, no embedded NUL) */

#define PROTO_IPPROTO_TCP 6
#define PROTO_IPPROTO_UDP 17

#endif
