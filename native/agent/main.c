/*
 * tender-agent: the guest side of tender's agent protocol (docs/agent-protocol.md).
 *
 * One byte stream to the host (a virtio-serial port, AF_VSOCK, or for tests a unix socket
 * or an inherited fd), one single-threaded poll() loop, no dependencies beyond libc.
 *
 * Connection states:
 *   DOWN     no transport; try again at retry_at (back-off 100 ms doubling to 2 s)
 *   WAITING  virtio-serial port open but no host on the other end: the driver reports
 *            POLLHUP (and read() returns 0) while QEMU's chardev has no client, and poll()
 *            cannot wait for that to change, so look again every WAIT_MS
 *   UP       HELLO sent; serving
 * Every way out of UP (EOF, error, hang-up, a host that broke the protocol) kills the
 * processes it started (their stdio went with the host) and starts over with a new HELLO:
 * the agent never exits because the host went away.
 *
 * Memory stays bounded whatever the host or a child does: host input goes into one fixed
 * buffer of one maximum frame; child output is read only within the host's window and while
 * the outgoing queue is below OUT_SOFT; host input is not read while that queue is above
 * OUT_HARD (a host that sends PINGs without reading PONGs stalls itself, not us).
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.tender.agent.0"
#define OUT_SOFT (256 * 1024)
#define OUT_HARD (2 * 1024 * 1024)
#define WAIT_MS 200
#define BACKOFF_MIN 100
#define BACKOFF_MAX 2000
#define SCAN_MS 1000

enum transport { T_PORT, T_VSOCK, T_UNIX, T_FD };
enum state { S_DOWN, S_WAITING, S_UP };

int verbose;
static enum transport transport = T_PORT;
static const char *port_path;   /* --port; NULL = discover */
static const char *unix_path;   /* --unix */
static unsigned vsock_port, vsock_cid = 2;
static int given_fd = -1;       /* --fd */
static int no_power;

static enum state state = S_DOWN;
static int tfd = -1;
static int64_t retry_at, backoff = BACKOFF_MIN, next_scan;
static int heard_from_host;     /* a valid frame arrived in this session: reset the back-off */
static int sigpipe_fds[2];

static uint8_t inbuf[HDR_LEN + MAX_PAYLOAD + 65536];
static size_t inlen;

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void logmsg(const char *fmt, ...)
{
	char buf[600];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(2, "tender-agent: %s\n", buf);
}

static void on_sigchld(int sig)
{
	(void)sig;
	int saved = errno;
	ssize_t unused = write(sigpipe_fds[1], "c", 1);
	(void)unused;
	errno = saved;
}

/*
 * A minimal init may mount devtmpfs but not devpts; without it openpty() fails and no tty
 * exec works. Mount it the way distributions do (gid 5 = tty) when it is missing.
 */
static void ensure_devpts(void)
{
	if (access("/dev/pts/ptmx", F_OK) == 0 || access("/dev/ptmx", F_OK) != 0)
		return;
	mkdir("/dev/pts", 0755);
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666") < 0 && verbose)
		logmsg("mount devpts: %s", strerror(errno));
}

/* ---- transports ---- */

/* The port's device node: udev/mdev's symlink, else the vportNpM whose sysfs name matches. */
static int find_port(char *out, size_t n)
{
	if (access("/dev/virtio-ports/" PORT_NAME, F_OK) == 0) {
		snprintf(out, n, "/dev/virtio-ports/" PORT_NAME);
		return 0;
	}
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while (found < 0 && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[300], name[128] = "";
		snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
		FILE *f = fopen(p, "re");
		if (!f)
			continue;
		if (!fgets(name, sizeof name, f))
			name[0] = 0;
		fclose(f);
		name[strcspn(name, "\n")] = 0;
		if (strcmp(name, PORT_NAME) != 0)
			continue;
		snprintf(out, n, "/dev/%s", e->d_name);
		found = 0;
		if (access(out, F_OK) == 0)
			break;
		/* No devtmpfs, no mdev: make the node from sysfs's "major:minor". */
		unsigned maj, min;
		snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/dev", e->d_name);
		f = fopen(p, "re");
		if (f && fscanf(f, "%u:%u", &maj, &min) == 2)
			mknod(out, S_IFCHR | 0600, makedev(maj, min));
		if (f)
			fclose(f);
	}
	closedir(d);
	return found;
}

static int open_transport(void)
{
	int fd = -1;
	switch (transport) {
	case T_PORT: {
		char path[300];
		if (port_path)
			snprintf(path, sizeof path, "%s", port_path);
		else if (find_port(path, sizeof path) < 0) {
			errno = ENOENT;
			return -1;
		}
		fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
		return fd;
	}
	case T_VSOCK: {
		struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = vsock_cid, .svm_port = vsock_port };
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
			goto fail;
		break;
	}
	case T_UNIX: {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		snprintf(sa.sun_path, sizeof sa.sun_path, "%s", unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
			goto fail;
		break;
	}
	case T_FD:
		fd = given_fd;
		fcntl(fd, F_SETFD, FD_CLOEXEC);
		break;
	}
	if (fd >= 0)
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return fd;
fail: {
	int saved = errno;
	close(fd);
	errno = saved;
	return -1;
}
}

static void put_str(uint8_t *p, size_t *off, const char *s)
{
	size_t n = strlen(s);
	put_u32(p + *off, (uint32_t)n);
	memcpy(p + *off + 4, s, n);
	*off += 4 + n;
}

static void say_hello(uint32_t nonce)
{
	struct utsname u;
	char boot_id[64] = "";
	if (uname(&u) < 0)
		memset(&u, 0, sizeof u);
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
	if (f) {
		if (!fgets(boot_id, sizeof boot_id, f))
			boot_id[0] = 0;
		fclose(f);
	}
	boot_id[strcspn(boot_id, "\n")] = 0;
	uint8_t *p = frame_begin(M_HELLO, nonce, 2 + 16 + sizeof AGENT_VERSION + sizeof u.release +
						    sizeof u.nodename + sizeof boot_id);
	size_t off = 2;
	put_u16(p, PROTO_VERSION);
	put_str(p, &off, AGENT_VERSION);
	put_str(p, &off, u.release);
	put_str(p, &off, u.nodename);
	put_str(p, &off, boot_id);
	frame_end(off);
}

static void go_up(void)
{
	state = S_UP;
	inlen = 0;
	heard_from_host = 0;
	say_hello(0);
	listeners_scan(1);
	next_scan = now_ms() + SCAN_MS;
	if (verbose)
		logmsg("connected");
}

static void go_down(void)
{
	if (tfd >= 0 && transport != T_FD)
		close(tfd);
	tfd = -1;
	state = S_DOWN;
	if (heard_from_host)
		backoff = BACKOFF_MIN;
	retry_at = now_ms() + backoff;
	backoff = backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : backoff * 2;
}

/* The host went away (EOF, error, hang-up): nothing queued can reach it any more. */
static void host_gone(const char *why)
{
	logmsg("host gone (%s): %d processes killed", why, exec_count());
	exec_reset();
	usb_reset();
	/* Nobody will read the rest of a half-written frame; a new host starts at a boundary. */
	outq_reset(0);
	if (transport == T_FD) {
		logmsg("--fd transport closed: exiting");
		exit(0);
	}
	if (transport == T_PORT && tfd >= 0) {
		state = S_WAITING;
		retry_at = now_ms() + WAIT_MS;
		return;
	}
	go_down();
}

/*
 * The host broke the protocol. Its stream cannot be resynchronised, so start over: for a
 * socket, a new connection; for a virtio-serial port, which QEMU keeps connected to the same
 * host socket, reopen the port (the driver drops what it buffered) after finishing any
 * half-written frame, so the host's decoder sees our new HELLO on a frame boundary.
 */
static void protocol_error(const char *why)
{
	logmsg("protocol error: %s; starting over", why);
	exec_reset();
	usb_reset();
	outq_reset(1);
	int64_t give_up = now_ms() + 1000;
	while (outq_len() > 0 && now_ms() < give_up) {
		struct pollfd p = { tfd, POLLOUT, 0 };
		if (poll(&p, 1, 100) > 0 && (outq_flush(tfd) < 0 || (p.revents & (POLLERR | POLLHUP))))
			break;
	}
	outq_reset(0); /* could not finish it: the transport is going anyway */
	if (transport == T_FD) {
		go_up();
		return;
	}
	heard_from_host = 0;
	go_down();
}

/* ---- host messages ---- */

static void power(uint8_t type, uint32_t stream)
{
	if (no_power) {
		send_error(stream, E_POWER_DISABLED, 0, "power control disabled (--no-power)");
		return;
	}
	logmsg("%s requested by the host", type == M_POWEROFF ? "poweroff" : "reboot");
	sync();
	reboot(type == M_POWEROFF ? RB_POWER_OFF : RB_AUTOBOOT);
	send_error(stream, E_POWER_FAILED, errno, "reboot: %s", strerror(errno));
}

/*
 * A host announcing itself. With a virtio-serial port the agent cannot always tell that the
 * host went away and came back (a quick reconnect shows no hang-up), so the host says so:
 * a new nonce means a new host, whose predecessor's processes are killed and whose first
 * frames follow a HELLO carrying its nonce. The same nonce again is that host retrying:
 * answer without killing what it started since.
 */
static uint32_t host_nonce;

static void host_hello(uint32_t nonce)
{
	if (nonce != host_nonce) {
		if (exec_count())
			logmsg("new host: %d processes killed", exec_count());
		exec_reset();
		usb_reset();
		outq_reset(1);
		host_nonce = nonce;
	}
	say_hello(nonce);
	listeners_scan(1);
}

/* Returns -1 on a protocol error. */
static int dispatch(uint8_t type, uint32_t stream, const uint8_t *p, size_t len)
{
	switch (type) {
	case M_PING:
		frame_send(M_PONG, stream, p, len);
		return 0;
	case M_HOST_HELLO:
		host_hello(stream);
		return 0;
	case M_EXEC:
		exec_start(stream, p, len);
		return 0;
	case M_STDIN:
	case M_STDIN_EOF:
	case M_WINDOW:
	case M_RESIZE:
	case M_SIGNAL:
		return exec_message(type, stream, p, len);
	case M_POWEROFF:
	case M_REBOOT:
		power(type, stream);
		return 0;
	case M_USB_ATTACH:
		usb_attach_start(stream, p, len);
		return 0;
	case M_USB_DETACH:
		usb_detach(stream, p, len);
		return 0;
	default:
		send_error(stream, E_UNKNOWN_TYPE, 0, "unknown message type 0x%02x", type);
		return 0;
	}
}

/* Decode every whole frame in inbuf. -1 on a protocol error. */
static int consume(void)
{
	size_t off = 0;
	while (inlen - off >= 4) {
		uint32_t len = be32(inbuf + off);
		if (len < 5 || len > 5 + MAX_PAYLOAD) {
			char why[64];
			snprintf(why, sizeof why, "frame length %u", len);
			protocol_error(why);
			return -1;
		}
		if (inlen - off < 4 + (size_t)len)
			break;
		const uint8_t *f = inbuf + off;
		heard_from_host = 1;
		if (dispatch(f[4], be32(f + 5), f + HDR_LEN, len - 5) < 0) {
			protocol_error("stdin beyond the granted window");
			return -1;
		}
		off += 4 + (size_t)len;
	}
	memmove(inbuf, inbuf + off, inlen - off);
	inlen -= off;
	return 0;
}

static void read_host(void)
{
	for (int rounds = 0; rounds < 16 && outq_len() < OUT_HARD; rounds++) {
		ssize_t n = read(tfd, inbuf + inlen, sizeof inbuf - inlen);
		if (n > 0) {
			inlen += (size_t)n;
			if (consume() < 0)
				return;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		host_gone(n == 0 ? "EOF" : strerror(errno));
		return;
	}
}

static void reap(int64_t now)
{
	char drain[64];
	while (read(sigpipe_fds[0], drain, sizeof drain) > 0)
		;
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		exec_reaped(pid, status, now);
}

/* ---- main loop ---- */

static int64_t min_deadline(int64_t a, int64_t b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

static void loop(void)
{
	static struct pollfd pfd[2 + 3 * 64 + 16];
	for (;;) {
		int64_t now = now_ms();
		if (state == S_DOWN && now >= retry_at) {
			tfd = open_transport();
			if (tfd < 0) {
				if (verbose || backoff == BACKOFF_MIN)
					logmsg("cannot open the transport: %s (retrying)", strerror(errno));
				go_down();
			} else if (transport == T_PORT) {
				state = S_WAITING;
				retry_at = now; /* look right away */
			} else {
				go_up();
			}
		}
		if (state == S_WAITING && now >= retry_at) {
			struct pollfd p = { tfd, POLLIN | POLLOUT, 0 };
			int r = poll(&p, 1, 0);
			if (r >= 0 && (p.revents & (POLLERR | POLLNVAL)))
				go_down(); /* the port itself failed (unplugged?): reopen it */
			else if (r >= 0 && !(p.revents & POLLHUP))
				go_up();
			else
				retry_at = now + WAIT_MS;
		}

		int n = 0;
		pfd[n++] = (struct pollfd){ sigpipe_fds[0], POLLIN, 0 };
		pfd[n++] = (struct pollfd){ -1, 0, 0 };
		if (state == S_UP) {
			pfd[1].fd = tfd;
			pfd[1].events = (outq_len() < OUT_HARD ? POLLIN : 0) | (outq_len() ? POLLOUT : 0);
		}
		int nexec = exec_pollfds(pfd + n, (int)(sizeof pfd / sizeof pfd[0]) - n,
					 state == S_UP && outq_len() < OUT_SOFT);
		/* Imports run only while a host is there to hear the answer (usb_reset on the way down). */
		int64_t deadline = min_deadline(exec_timers(now), usb_timers(now)); /* expire first, then poll the rest */
		int nusb = usb_pollfds(pfd + n + nexec, (int)(sizeof pfd / sizeof pfd[0]) - n - nexec);
		if (state == S_UP)
			deadline = min_deadline(deadline, next_scan);
		else
			deadline = min_deadline(deadline, retry_at);
		int timeout = deadline < 0 ? -1 : deadline <= now ? 0 : (int)(deadline - now);
		int r = poll(pfd, (nfds_t)(n + nexec + nusb), timeout);
		if (r < 0 && errno != EINTR) {
			logmsg("poll: %s", strerror(errno));
			sleep(1);
			continue;
		}
		now = now_ms();
		if (r > 0 && pfd[0].revents)
			reap(now);
		if (r > 0 && state == S_UP && pfd[1].revents) {
			short ev = pfd[1].revents;
			if (ev & POLLOUT && outq_flush(tfd) < 0)
				host_gone(strerror(errno));
			else if (ev & POLLIN)
				read_host();
			else if (ev & (POLLHUP | POLLERR | POLLNVAL))
				host_gone(ev & POLLHUP ? "hang-up" : "error");
		}
		if (r > 0 && nexec > 0)
			exec_handle(pfd + n, nexec, now);
		if (r > 0 && nusb > 0)
			usb_handle(pfd + n + nexec, nusb);
		exec_timers(now);
		usb_timers(now);
		if (state == S_UP && now >= next_scan) {
			listeners_scan(0);
			next_scan = now + SCAN_MS;
		}
		if (state == S_UP && outq_len() > 0 && outq_flush(tfd) < 0)
			host_gone(strerror(errno));
		if (state != S_UP)
			outq_reset(0);
	}
}

static void usage(void)
{
	dprintf(2,
		"usage: tender-agent [--port PATH | --vsock PORT [--vsock-cid CID] | --unix PATH | --fd N]\n"
		"                    [--no-power] [-v] [--version]\n"
		"  --port PATH   virtio-serial port (default: the port named " PORT_NAME ")\n"
		"  --vsock PORT  AF_VSOCK to the host (CID 2, or --vsock-cid) on PORT\n"
		"  --unix PATH   connect to a unix stream socket (tests, debugging)\n"
		"  --fd N        use inherited descriptor N; exit when it closes (tests, debugging)\n"
		"  --no-power    answer POWEROFF/REBOOT with an error (tests on a host)\n");
	exit(2);
}

static unsigned number(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);
	if (!*s || *end || v > 0xffffffffUL)
		usage();
	return (unsigned)v;
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--port") && v) {
			transport = T_PORT;
			port_path = v;
			i++;
		} else if (!strcmp(a, "--vsock") && v) {
			transport = T_VSOCK;
			vsock_port = number(v);
			i++;
		} else if (!strcmp(a, "--vsock-cid") && v) {
			vsock_cid = number(v);
			i++;
		} else if (!strcmp(a, "--unix") && v) {
			transport = T_UNIX;
			unix_path = v;
			i++;
		} else if (!strcmp(a, "--fd") && v) {
			transport = T_FD;
			given_fd = (int)number(v);
			i++;
		} else if (!strcmp(a, "--no-power")) {
			no_power = 1;
		} else if (!strcmp(a, "-v")) {
			verbose = 1;
		} else if (!strcmp(a, "--version")) {
			dprintf(1, "tender-agent %s (protocol %d)\n", AGENT_VERSION, PROTO_VERSION);
			return 0;
		} else {
			usage();
		}
	}
	if (pipe2(sigpipe_fds, O_NONBLOCK | O_CLOEXEC) < 0) {
		logmsg("pipe2: %s", strerror(errno));
		return 1;
	}
	struct sigaction sa = { .sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN); /* a vanished host is an EPIPE to handle, not a death */
	signal(SIGHUP, SIG_IGN);  /* init may start us on a console that goes away */
	chdir("/");
	ensure_devpts();
	loop();
}
