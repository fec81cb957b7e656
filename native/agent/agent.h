/* Shared declarations of the tender guest agent (see main.c for the overall design). */
#ifndef TENDER_AGENT_H
#define TENDER_AGENT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include "protocol.h"

/*
 * <linux/vm_sockets.h>'s address, restated: musl-gcc does not see the kernel's headers, and
 * this layout is kernel ABI (include/uapi/linux/vm_sockets.h).
 */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct sockaddr_vm {
	sa_family_t svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short) -
			       2 * sizeof(unsigned int)];
};

#define AGENT_VERSION "0.1.0"

/* ---- wire.c: payload cursors and the outgoing queue ------------------------------------ */

/* A bounds-checked reader over one payload: any short read sets `bad` and yields zeros. */
struct rd {
	const uint8_t *p;
	size_t left;
	int bad;
};
uint8_t rd_u8(struct rd *r);
uint16_t rd_u16(struct rd *r);
uint32_t rd_u32(struct rd *r);
/* A string as pointer + length; NULL (and bad) when short or when it holds a NUL byte. */
const char *rd_str(struct rd *r, uint32_t *len);

uint32_t be32(const uint8_t *p);
void put_u16(uint8_t *p, uint16_t v);
void put_u32(uint8_t *p, uint32_t v);

/*
 * Frames for the host wait here until the transport takes them. Frames are appended whole;
 * the writer tracks frame boundaries so a session reset never leaves half a frame on a
 * transport that survives it (the host's decoder would lose sync).
 */
size_t outq_len(void);
/* Room for a frame with up to `payload_max` bytes; returns where the payload goes. */
uint8_t *frame_begin(uint8_t type, uint32_t stream, size_t payload_max);
void frame_end(size_t payload_len);
void frame_send(uint8_t type, uint32_t stream, const void *payload, size_t len);
void send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* Write what the fd takes. -1 on a transport error (not EAGAIN). */
int outq_flush(int fd);
/* Bytes left of the frame at the head (0 when the head is on a boundary). */
int outq_mid_frame(void);
/* Drop every queued frame; with keep_partial, keep the rest of a half-written one. */
void outq_reset(int keep_partial);

/* ---- exec.c: processes started by EXEC ------------------------------------------------- */

struct pollfd;
void exec_start(uint32_t stream, const uint8_t *payload, size_t len);
/* Returns -1 when the host broke the protocol (stdin beyond its window). */
int exec_message(uint8_t type, uint32_t stream, const uint8_t *payload, size_t len);
/* Fill pollfds for every stream; `room` = may we read child output (queue not too full). */
int exec_pollfds(struct pollfd *pfd, int max, int room);
void exec_handle(struct pollfd *pfd, int n, int64_t now);
void exec_reaped(pid_t pid, int status, int64_t now);
/* Earliest drain deadline (ms, monotonic) or -1. Runs expired ones when `now` is given. */
int64_t exec_timers(int64_t now);
/* Host gone: kill every process group, free everything. */
void exec_reset(void);
int exec_count(void);

/* ---- listeners.c: /proc/net scanning --------------------------------------------------- */

/* Scan now; send LISTENERS when the set differs from the last one sent (or force). */
void listeners_scan(int force);

/* ---- usb.c: USB/IP import and vhci-hcd attach ---------------------------------------- */

void usb_attach_start(uint32_t stream, const uint8_t *payload, size_t len);
void usb_detach(uint32_t stream, const uint8_t *payload, size_t len);
int usb_pollfds(struct pollfd *pfd, int max);
void usb_handle(struct pollfd *pfd, int n);
/* Earliest import deadline or -1; fails expired imports (ETIMEDOUT) when now >= 0. */
int64_t usb_timers(int64_t now);
/* Host gone: abandon imports in progress (attached devices stay attached). */
void usb_reset(void);

/* ---- main.c ---------------------------------------------------------------------------- */

int64_t now_ms(void);
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern int verbose;

#endif
