/*
 * USB_ATTACH / USB_DETACH: the guest side of USB/IP, what `usbip attach` does, without the tool.
 *
 * USB_ATTACH connects to the host's USB/IP server, over TCP (the gateway address inside the
 * machine's network) or AF_VSOCK (host "vsock:CID", normally CID 2: the host; vhci-hcd takes
 * any SOCK_STREAM socket, it only sends and receives on it), sends OP_REQ_IMPORT for the busid, reads OP_REP_IMPORT (the 8-byte common
 * header, then the 312-byte device record only when the status is 0: the kernel's usbipd and
 * tender's server both stop after the header on a refusal), and hands the connected socket to
 * vhci-hcd by writing "port sockfd devid speed" to its sysfs `attach` file. The kernel takes its
 * own reference to the socket (sockfd_lookup in attach_store), so we close ours afterwards.
 * Formats: Documentation/usb/usbip_protocol.rst; big-endian throughout.
 *
 * The handshake runs inside the agent's poll() loop as a small state machine (connect, send,
 * receive), never blocking: a server that accepts and says nothing cannot stall exec output or
 * the host's frames. Each import has a deadline (IMPORT_MS) after which it fails with ETIMEDOUT.
 *
 * Port choice follows usbip's get_free_port(): vhci's `status` lists every port as
 * "hub port sta spd dev sockfd local_busid"; SuperSpeed devices (speed >= USB_SPEED_SUPER)
 * need a port of the "ss" hub, everything else one of the "hs" hub; a port is free when its
 * state is VDEV_ST_NULL (4). The port number written to `attach` is the one in `status`.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define VHCI "/sys/devices/platform/vhci_hcd.0"
#define MAX_IMPORTS 16
#define IMPORT_MS 10000
#define MODPROBE_MS 5000

/* usbip_common.h / usbip_protocol.rst */
#define USBIP_VERSION 0x0111
#define OP_REQ_IMPORT 0x8003
#define OP_REP_IMPORT 0x0003
#define OP_COMMON_LEN 8
#define BUSID_LEN 32 /* SYSFS_BUS_ID_SIZE, NUL included */
#define DEVICE_RECORD_LEN 312
/* Offsets in the device record: path[256], busid[32], busnum, devnum, speed (u32 each). */
#define REC_BUSID 256
#define REC_BUSNUM 288
#define REC_DEVNUM 292
#define REC_SPEED 296
#define USB_SPEED_SUPER 5
#define VDEV_ST_NULL 4

enum stage { ST_FREE, ST_CONNECTING, ST_SENDING, ST_RECEIVING };

struct import {
	enum stage stage;
	unsigned gen;
	uint32_t stream;
	int fd;
	int64_t deadline;
	uint32_t speed_override;
	char busid[BUSID_LEN];
	uint8_t req[OP_COMMON_LEN + BUSID_LEN];
	size_t sent;
	uint8_t rep[OP_COMMON_LEN + DEVICE_RECORD_LEN];
	size_t got;
};

static struct import imports[MAX_IMPORTS];
/*
 * Which import each pollfd of the last usb_pollfds() belongs to, and that import's generation:
 * between poll() and usb_handle() the host's frames may end an import and start another on
 * the same descriptor number, which must not take the old one's events.
 */
static struct { int idx; unsigned gen; } polled[MAX_IMPORTS];
static unsigned generation;

static void finish(struct import *im)
{
	if (im->fd >= 0)
		close(im->fd);
	im->fd = -1;
	im->stage = ST_FREE;
}

static void fail(struct import *im, uint32_t code, int err, const char *what)
{
	send_error(im->stream, code, err, "usb attach %s: %s%s%s", im->busid, what, err ? ": " : "",
		   err ? strerror(err) : "");
	finish(im);
}

/* Write a whole string to a sysfs attribute: 0, or -1 with errno (the store's error). */
static int sysfs_write(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = strlen(s);
	ssize_t w = write(fd, s, n);
	int saved = errno;
	close(fd);
	if (w == (ssize_t)n)
		return 0;
	errno = w < 0 ? saved : EIO;
	return -1;
}

/*
 * vhci-hcd loaded? The image's init loads the usbip modules after DHCP; a machine that did not
 * gets one `modprobe vhci-hcd` (bounded: killed after MODPROBE_MS).
 */
static int ensure_vhci(void)
{
	if (access(VHCI "/attach", W_OK) == 0)
		return 0;
	pid_t pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
		}
		execlp("modprobe", "modprobe", "vhci-hcd", (char *)NULL);
		_exit(127);
	}
	if (pid > 0) {
		int64_t give_up = now_ms() + MODPROBE_MS;
		int status;
		while (waitpid(pid, &status, WNOHANG) == 0) {
			if (now_ms() > give_up) {
				kill(pid, SIGKILL);
				waitpid(pid, &status, 0);
				break;
			}
			usleep(10000);
		}
	}
	if (access(VHCI "/attach", W_OK) == 0)
		return 0;
	errno = ENOENT;
	return -1;
}

/*
 * Free ports of the hub matching `speed`, in `status` order. Returns how many (at most max),
 * or -1 with errno when the file cannot be read.
 */
static int free_ports(uint32_t speed, unsigned *out, int max)
{
	FILE *f = fopen(VHCI "/status", "re");
	if (!f)
		return -1;
	const char *want = speed >= USB_SPEED_SUPER ? "ss" : "hs";
	char line[256];
	int n = 0;
	while (n < max && fgets(line, sizeof line, f)) {
		char hub[8];
		unsigned port, sta;
		/* The header line ("hub port sta ...") does not parse as numbers and is skipped. */
		if (sscanf(line, "%7s %u %u", hub, &port, &sta) != 3)
			continue;
		if (strcmp(hub, want) == 0 && sta == VDEV_ST_NULL)
			out[n++] = port;
	}
	fclose(f);
	return n;
}

/* The import handshake is done: pick a port, hand the socket to the kernel, answer. */
static void attach(struct import *im)
{
	const uint8_t *rec = im->rep + OP_COMMON_LEN;
	if (memcmp(rec + REC_BUSID, im->busid, strnlen(im->busid, BUSID_LEN)) != 0 ||
	    rec[REC_BUSID + strnlen(im->busid, BUSID_LEN)] != 0) {
		fail(im, E_USB_IMPORT_REFUSED, EPROTO, "the server answered for another busid");
		return;
	}
	uint32_t busnum = be32(rec + REC_BUSNUM), devnum = be32(rec + REC_DEVNUM);
	uint32_t speed = im->speed_override ? im->speed_override : be32(rec + REC_SPEED);
	uint32_t devid = busnum << 16 | (devnum & 0xffff);
	/* The kernel reads the socket from its own thread; O_NONBLOCK is our business, not its. */
	fcntl(im->fd, F_SETFL, fcntl(im->fd, F_GETFL) & ~O_NONBLOCK);
	unsigned ports[256];
	int n = free_ports(speed, ports, 256);
	if (n < 0) {
		fail(im, E_USB_FAILED, errno, "cannot read " VHCI "/status");
		return;
	}
	if (n == 0) {
		fail(im, E_USB_NO_PORT, 0, speed >= USB_SPEED_SUPER ? "no free SuperSpeed port on vhci_hcd.0"
								     : "no free high-speed port on vhci_hcd.0");
		return;
	}
	/* A port can be taken between reading status and writing attach (usbip from a shell): EBUSY, try the next. */
	int err = 0;
	for (int i = 0; i < n; i++) {
		char cmd[64];
		snprintf(cmd, sizeof cmd, "%u %d %u %u", ports[i], im->fd, devid, speed);
		if (sysfs_write(VHCI "/attach", cmd) == 0) {
			uint8_t p[12];
			put_u32(p, ports[i]);
			put_u32(p + 4, devid);
			put_u32(p + 8, speed);
			frame_send(M_USB_ATTACHED, im->stream, p, sizeof p);
			if (verbose)
				logmsg("usb %s attached: port %u devid 0x%08x speed %u", im->busid, ports[i], devid, speed);
			finish(im); /* the kernel holds its own reference to the socket */
			return;
		}
		err = errno;
		if (err != EBUSY)
			break;
	}
	fail(im, E_USB_FAILED, err, "write " VHCI "/attach");
}

void usb_attach_start(uint32_t stream, const uint8_t *payload, size_t len)
{
	struct rd r = { payload, len, 0 };
	uint16_t port = rd_u16(&r);
	uint32_t speed = rd_u8(&r);
	uint32_t hlen = 0, blen = 0;
	const char *host = rd_str(&r, &hlen);
	const char *busid = rd_str(&r, &blen);
	if (r.bad || r.left || !host || !busid || port == 0 || hlen == 0 || hlen > 63 || blen == 0 ||
	    blen >= BUSID_LEN || stream == 0) {
		send_error(stream, E_BAD_PAYLOAD, 0, "bad USB_ATTACH payload");
		return;
	}
	char hbuf[64];
	memcpy(hbuf, host, hlen);
	hbuf[hlen] = 0;
	struct sockaddr_storage ss;
	socklen_t sslen;
	memset(&ss, 0, sizeof ss);
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	struct sockaddr_vm *sv = (struct sockaddr_vm *)&ss;
	unsigned long cid;
	char *end;
	if (strncmp(hbuf, "vsock:", 6) == 0 && hbuf[6] >= '0' && hbuf[6] <= '9' &&
	    (cid = strtoul(hbuf + 6, &end, 10), *end == 0) && cid <= 0xffffffffUL) {
		sv->svm_family = AF_VSOCK;
		sv->svm_cid = (unsigned int)cid;
		sv->svm_port = port;
		sslen = sizeof *sv;
	} else if (inet_pton(AF_INET, hbuf, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		sslen = sizeof *s4;
	} else if (inet_pton(AF_INET6, hbuf, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		sslen = sizeof *s6;
	} else {
		send_error(stream, E_BAD_PAYLOAD, 0, "USB_ATTACH host %s is not an IP address or vsock:CID", hbuf);
		return;
	}
	struct import *im = NULL;
	for (int i = 0; i < MAX_IMPORTS; i++) {
		if (imports[i].stage != ST_FREE && imports[i].stream == stream) {
			send_error(stream, E_STREAM_EXISTS, 0, "USB_ATTACH on stream %u already running", stream);
			return;
		}
		if (!im && imports[i].stage == ST_FREE)
			im = &imports[i];
	}
	if (!im) {
		send_error(stream, E_TOO_MANY_STREAMS, 0, "more than %d USB imports at once", MAX_IMPORTS);
		return;
	}
	memset(im, 0, sizeof *im);
	im->gen = ++generation;
	im->fd = -1;
	im->stream = stream;
	im->speed_override = speed;
	memcpy(im->busid, busid, blen);
	im->deadline = now_ms() + IMPORT_MS;
	put_u16(im->req, USBIP_VERSION);
	put_u16(im->req + 2, OP_REQ_IMPORT);
	memcpy(im->req + OP_COMMON_LEN, busid, blen); /* status 0 and the NUL padding from memset */
	im->stage = ST_CONNECTING;
	if (ensure_vhci() < 0) {
		fail(im, E_USB_FAILED, ENOENT, "vhci-hcd is not loaded (" VHCI " missing, modprobe vhci-hcd failed)");
		return;
	}
	im->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (im->fd < 0) {
		fail(im, E_USB_FAILED, errno, "socket");
		return;
	}
	/*
	 * usbip sets these on the TCP socket it hands over: URBs are latency-bound, and a dead peer
	 * is noticed. vsock has neither Nagle nor keepalives (the transport resets a dead peer).
	 */
	if (ss.ss_family != AF_VSOCK) {
		int one = 1;
		setsockopt(im->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		setsockopt(im->fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
	}
	if (connect(im->fd, (struct sockaddr *)&ss, sslen) == 0)
		im->stage = ST_SENDING;
	else if (errno != EINPROGRESS) {
		char what[100];
		snprintf(what, sizeof what, "connect %s:%u", hbuf, port);
		fail(im, E_USB_FAILED, errno, what);
		return;
	}
	if (verbose)
		logmsg("usb %s: importing from %s:%u", im->busid, hbuf, port);
}

void usb_detach(uint32_t stream, const uint8_t *payload, size_t len)
{
	struct rd r = { payload, len, 0 };
	uint32_t port = rd_u32(&r);
	if (r.bad || r.left) {
		send_error(stream, E_BAD_PAYLOAD, 0, "bad USB_DETACH payload");
		return;
	}
	char cmd[16];
	snprintf(cmd, sizeof cmd, "%u", port);
	if (sysfs_write(VHCI "/detach", cmd) < 0) {
		int err = errno;
		send_error(stream, E_USB_FAILED, err, "usb detach port %u: write " VHCI "/detach: %s", port, strerror(err));
		return;
	}
	if (verbose)
		logmsg("usb port %u detached", port);
	frame_send(M_USB_DETACHED, stream, NULL, 0);
}

int usb_pollfds(struct pollfd *pfd, int max)
{
	int n = 0;
	for (int i = 0; i < MAX_IMPORTS && n < max; i++) {
		struct import *im = &imports[i];
		if (im->stage == ST_FREE)
			continue;
		pfd[n].fd = im->fd;
		pfd[n].events = im->stage == ST_RECEIVING ? POLLIN : POLLOUT;
		pfd[n].revents = 0;
		polled[n].idx = i;
		polled[n].gen = im->gen;
		n++;
	}
	return n;
}

static void step(struct import *im)
{
	if (im->stage == ST_CONNECTING) {
		int err = 0;
		socklen_t l = sizeof err;
		if (getsockopt(im->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
			err = errno;
		if (err) {
			fail(im, E_USB_FAILED, err, "connect");
			return;
		}
		im->stage = ST_SENDING;
	}
	if (im->stage == ST_SENDING) {
		ssize_t w = send(im->fd, im->req + im->sent, sizeof im->req - im->sent, MSG_NOSIGNAL);
		if (w < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (w < 0) {
			fail(im, E_USB_FAILED, errno, "send OP_REQ_IMPORT");
			return;
		}
		im->sent += (size_t)w;
		if (im->sent < sizeof im->req)
			return;
		im->stage = ST_RECEIVING;
		return; /* poll for POLLIN next */
	}
	/* ST_RECEIVING: the header first; the record only follows a status of 0. */
	size_t want = im->got < OP_COMMON_LEN ? OP_COMMON_LEN : sizeof im->rep;
	ssize_t r = recv(im->fd, im->rep + im->got, want - im->got, 0);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r < 0) {
		fail(im, E_USB_FAILED, errno, "receive OP_REP_IMPORT");
		return;
	}
	if (r == 0) {
		fail(im, E_USB_IMPORT_REFUSED, ECONNRESET, "the server closed the connection during the import");
		return;
	}
	im->got += (size_t)r;
	if (im->got == OP_COMMON_LEN) {
		uint16_t version = (uint16_t)(im->rep[0] << 8 | im->rep[1]);
		uint16_t code = (uint16_t)(im->rep[2] << 8 | im->rep[3]);
		uint32_t status = be32(im->rep + 4);
		if (version != USBIP_VERSION || code != OP_REP_IMPORT) {
			char what[80];
			snprintf(what, sizeof what, "not an OP_REP_IMPORT (version 0x%04x, code 0x%04x)", version, code);
			fail(im, E_USB_IMPORT_REFUSED, EPROTO, what);
			return;
		}
		if (status != 0) {
			char what[100];
			/* ST_NA 1 (not available), ST_DEV_BUSY 2, ST_DEV_ERR 3, ST_NODEV 4, ST_ERROR 5 */
			static const char *names[] = { "ok", "not available", "device busy", "device error",
						       "no such device", "error" };
			snprintf(what, sizeof what, "the server refused the import: status %u (%s)", status,
				 status < 6 ? names[status] : "unknown");
			fail(im, E_USB_IMPORT_REFUSED, 0, what);
			return;
		}
	}
	if (im->got == sizeof im->rep)
		attach(im);
}

void usb_handle(struct pollfd *pfd, int n)
{
	for (int k = 0; k < n && k < MAX_IMPORTS; k++) {
		struct import *im = &imports[polled[k].idx];
		if (pfd[k].revents && im->stage != ST_FREE && im->gen == polled[k].gen)
			step(im);
	}
}

int64_t usb_timers(int64_t now)
{
	int64_t next = -1;
	for (int i = 0; i < MAX_IMPORTS; i++) {
		struct import *im = &imports[i];
		if (im->stage == ST_FREE)
			continue;
		if (now >= 0 && now >= im->deadline) {
			fail(im, E_USB_FAILED, ETIMEDOUT,
			     im->stage == ST_CONNECTING ? "connect" : "no OP_REP_IMPORT from the server");
			continue;
		}
		if (next < 0 || im->deadline < next)
			next = im->deadline;
	}
	return next;
}

void usb_reset(void)
{
	for (int i = 0; i < MAX_IMPORTS; i++)
		if (imports[i].stage != ST_FREE)
			finish(&imports[i]);
}
