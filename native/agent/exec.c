/*
 * Processes started by EXEC, one per stream id. Each child runs in its own session (setsid)
 * so SIGNAL reaches its whole process group and a PTY can become its controlling terminal.
 *
 * Flow control: the agent reads a child's stdout/stderr only while the host's window for
 * that channel is open (EXEC gives the first window, WINDOW messages add to it), and only
 * while the outgoing queue is short; a fast writer then blocks on its full pipe inside the
 * guest instead of growing memory here or on the host. Host-to-child bytes are bounded the
 * same way in the other direction: STARTED grants STDIN_BUF bytes, and the agent grants
 * more (WINDOW channel 0) as the child consumes them.
 *
 * EXIT is sent once the child was reaped and its output reached EOF, so the host has every
 * byte before it sees the status. A background grandchild that keeps the pipes open would
 * hold EXIT back forever, so after the reap an output that stays silent for DRAIN_MS while
 * its window is open is closed.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define MAX_STREAMS 64
#define STDIN_BUF (64 * 1024)
#define READ_CHUNK (64 * 1024)
#define DRAIN_MS 100
#define MAX_ARGS 65536
#define WINDOW_MAX 0x7fffffffu

extern char **environ;

struct stream {
	uint32_t id;
	pid_t pid;
	int tty;
	int in_fd, out_fd, err_fd; /* -1 when closed; with a tty, in_fd is a dup of the master */
	uint8_t *inbuf;
	size_t in_off, in_len;
	uint32_t in_grant;         /* consumed stdin bytes not yet granted back */
	int in_eof;                /* STDIN_EOF received: close once the buffer is written */
	int in_dead;               /* the child closed its stdin: discard */
	uint32_t win[3];           /* indexed by channel; [CH_STDIN] unused */
	int exited, status;
	int64_t drain_at;          /* after the reap: close silent outputs at this time */
	int tty_eio;               /* the PTY master read EIO: every slave fd is closed */
	int gone;                  /* dropped; freed when the next poll set is built */
	struct stream *next_gone;
};

static struct stream *streams[MAX_STREAMS];
static int nstreams;
/*
 * The streams of the current poll set, in pollfd order. A stream dropped between building
 * the set and handling its events (reaped, host gone) stays allocated, marked gone, until
 * the next set is built, so the handler never follows a freed pointer.
 */
static struct stream *polled[MAX_STREAMS];
static int npolled;
static struct stream *graveyard;

int exec_count(void)
{
	return nstreams;
}

static struct stream *find(uint32_t id)
{
	for (int i = 0; i < nstreams; i++)
		if (streams[i]->id == id)
			return streams[i];
	return NULL;
}

static void closefd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void drop(struct stream *s)
{
	closefd(&s->in_fd);
	closefd(&s->out_fd);
	closefd(&s->err_fd);
	free(s->inbuf);
	s->inbuf = NULL;
	for (int i = 0; i < nstreams; i++) {
		if (streams[i] == s) {
			streams[i] = streams[--nstreams];
			break;
		}
	}
	s->gone = 1;
	s->next_gone = graveyard;
	graveyard = s;
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* What the child reports through the close-on-exec pipe when it cannot exec. */
struct child_failure {
	int stage; /* 0 chdir, 1 exec */
	int err;
};

static void child(int tty, int slave, int in[2], int out[2], int err[2], int report,
		  char *cwd, char **argv, char **envp)
{
	/* The agent ignores SIGPIPE and SIGHUP; ignored dispositions survive exec. */
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigset_t all;
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	setsid();
	if (tty) {
		ioctl(slave, TIOCSCTTY, 0);
		dup2(slave, 0);
		dup2(slave, 1);
		dup2(slave, 2);
		if (slave > 2)
			close(slave);
	} else {
		dup2(in[0], 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
	}
	/* Everything else the agent holds is O_CLOEXEC. */
	if (!getenv("PATH"))
		setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
	if (!getenv("HOME"))
		setenv("HOME", "/root", 1);
	for (char **e = envp; *e; e++)
		putenv(*e);
	struct child_failure f = { 0, 0 };
	if (cwd[0] && chdir(cwd) < 0) {
		f.err = errno;
	} else {
		execvp(argv[0], argv);
		f.stage = 1;
		f.err = errno;
	}
	ssize_t unused = write(report, &f, sizeof f);
	(void)unused;
	_exit(127);
}

/* Copy `n` strings from the payload into NUL-terminated heap strings. */
static char **read_strings(struct rd *r, uint32_t n)
{
	if (r->bad || n > MAX_ARGS || n > r->left / 4) {
		r->bad = 1;
		return NULL;
	}
	char **v = calloc(n + 1, sizeof *v);
	if (!v)
		return NULL;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t len;
		const char *s = rd_str(r, &len);
		if (!s || !(v[i] = strndup(s, len))) {
			r->bad = 1;
			break;
		}
	}
	return v;
}

static void free_strings(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

void exec_start(uint32_t id, const uint8_t *payload, size_t len)
{
	struct rd r = { payload, len, 0 };
	uint8_t flags = rd_u8(&r);
	uint16_t rows = rd_u16(&r), cols = rd_u16(&r);
	uint32_t window = rd_u32(&r);
	uint32_t cwdlen = 0;
	const char *cwdp = rd_str(&r, &cwdlen);
	char **argv = read_strings(&r, rd_u32(&r));
	char **envp = r.bad ? NULL : read_strings(&r, rd_u32(&r));
	char *cwd = cwdp ? strndup(cwdp, cwdlen) : NULL;
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 }, rep[2] = { -1, -1 };
	int master = -1, slave = -1;
	struct stream *s = NULL;

	if (r.bad || r.left != 0 || !argv || !envp || !argv[0] || !cwd || id == 0) {
		send_error(id, E_BAD_PAYLOAD, 0, "malformed EXEC");
		goto out;
	}
	for (char **e = envp; *e; e++) {
		if (!strchr(*e, '=') || **e == '=') {
			send_error(id, E_BAD_PAYLOAD, 0, "environment entry without NAME=: %.64s", *e);
			goto out;
		}
	}
	if (find(id)) {
		send_error(id, E_STREAM_EXISTS, 0, "stream %u is running", id);
		goto out;
	}
	if (nstreams >= MAX_STREAMS) {
		send_error(id, E_TOO_MANY_STREAMS, 0, "at most %d processes at once", MAX_STREAMS);
		goto out;
	}
	int tty = flags & EXEC_FLAG_TTY;
	const char *what = "pipe2";
	if (tty) {
		struct winsize ws = { .ws_row = rows, .ws_col = cols };
		what = "openpty";
		if (openpty(&master, &slave, NULL, NULL, rows && cols ? &ws : NULL) < 0)
			goto sysfail;
		fcntl(master, F_SETFD, FD_CLOEXEC);
		fcntl(slave, F_SETFD, FD_CLOEXEC);
	} else if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
		goto sysfail;
	}
	what = "pipe2";
	if (pipe2(rep, O_CLOEXEC) < 0)
		goto sysfail;
	s = calloc(1, sizeof *s);
	what = "malloc";
	if (!s || !(s->inbuf = malloc(STDIN_BUF)))
		goto sysfail;
	what = "fork";
	pid_t pid = fork();
	if (pid < 0)
		goto sysfail;
	if (pid == 0)
		child(tty, slave, in, out, err, rep[1], cwd, argv, envp);
	closefd(&rep[1]);
	struct child_failure f;
	ssize_t n;
	do
		n = read(rep[0], &f, sizeof f);
	while (n < 0 && errno == EINTR);
	if (n == (ssize_t)sizeof f) {
		/* The child is on its way out: reap it here, it never becomes a stream. */
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		send_error(id, E_EXEC_FAILED, f.err, "%s %s: %s", f.stage ? "exec" : "chdir",
			   f.stage ? argv[0] : cwd, strerror(f.err));
		goto out;
	}
	s->id = id;
	s->pid = pid;
	s->tty = tty;
	s->win[CH_STDOUT] = s->win[CH_STDERR] = window > WINDOW_MAX ? WINDOW_MAX : window;
	s->drain_at = -1;
	if (tty) {
		s->out_fd = master;
		s->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		s->err_fd = -1;
		master = -1;
		set_nonblock(s->out_fd);
		if (s->in_fd >= 0)
			set_nonblock(s->in_fd); /* same open file: already non-blocking */
	} else {
		s->in_fd = in[1];
		s->out_fd = out[0];
		s->err_fd = err[0];
		in[1] = out[0] = err[0] = -1;
		set_nonblock(s->in_fd);
		set_nonblock(s->out_fd);
		set_nonblock(s->err_fd);
	}
	streams[nstreams++] = s;
	uint8_t started[8];
	put_u32(started, (uint32_t)pid);
	put_u32(started + 4, STDIN_BUF);
	frame_send(M_STARTED, id, started, sizeof started);
	if (verbose)
		logmsg("stream %u: pid %d %s%s", id, pid, argv[0], tty ? " (tty)" : "");
	s = NULL;
	goto out;

sysfail:
	send_error(id, E_EXEC_FAILED, errno, "%s: %s", what, strerror(errno));
out:
	if (s) {
		free(s->inbuf);
		free(s);
	}
	closefd(&in[0]);
	closefd(&in[1]);
	closefd(&out[0]);
	closefd(&out[1]);
	closefd(&err[0]);
	closefd(&err[1]);
	closefd(&rep[0]);
	closefd(&rep[1]);
	closefd(&master);
	closefd(&slave);
	free_strings(argv);
	free_strings(envp);
	free(cwd);
}

static void grant_stdin(struct stream *s, uint32_t n)
{
	s->in_grant += n;
	/* Coalesce grants, but never sit on the last ones (the host may be waiting on them). */
	if (s->in_grant >= STDIN_BUF / 4 || s->in_len == 0) {
		uint8_t p[5] = { CH_STDIN };
		put_u32(p + 1, s->in_grant);
		frame_send(M_WINDOW, s->id, p, sizeof p);
		s->in_grant = 0;
	}
}

static void stdin_close(struct stream *s)
{
	if (s->in_fd < 0)
		return;
	if (s->tty && !s->in_dead) {
		/* A PTY has no half-close: send the EOF character (VEOF, ^D in canonical mode). */
		char eof = 4;
		ssize_t unused = write(s->in_fd, &eof, 1);
		(void)unused;
	}
	closefd(&s->in_fd);
}

static void stdin_dead(struct stream *s)
{
	uint32_t dropped = (uint32_t)s->in_len;
	s->in_dead = 1;
	s->in_len = s->in_off = 0;
	closefd(&s->in_fd);
	grant_stdin(s, dropped);
}

static void stdin_write(struct stream *s)
{
	while (s->in_len > 0 && s->in_fd >= 0) {
		ssize_t n = write(s->in_fd, s->inbuf + s->in_off, s->in_len);
		if (n > 0) {
			s->in_off += (size_t)n;
			s->in_len -= (size_t)n;
			if (s->in_len == 0)
				s->in_off = 0;
			grant_stdin(s, (uint32_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		stdin_dead(s); /* EPIPE: the child closed its stdin */
		return;
	}
	if (s->in_len == 0 && s->in_eof)
		stdin_close(s);
}

int exec_message(uint8_t type, uint32_t id, const uint8_t *payload, size_t len)
{
	struct stream *s = find(id);
	struct rd r = { payload, len, 0 };
	/*
	 * Messages for a stream that already sent EXIT are normal races (the host typed while
	 * the process exited): ignore them. Window accounting for stdin is the exception: the
	 * host may never have more in flight than was granted, whatever the stream's state.
	 */
	if (!s)
		return 0;
	switch (type) {
	case M_STDIN:
		if (len > STDIN_BUF - s->in_len - s->in_off) {
			if (s->in_off && len <= STDIN_BUF - s->in_len) {
				memmove(s->inbuf, s->inbuf + s->in_off, s->in_len);
				s->in_off = 0;
			} else {
				logmsg("stream %u: host sent stdin beyond its window", id);
				return -1;
			}
		}
		if (s->in_dead || s->in_fd < 0 || s->in_eof) {
			grant_stdin(s, (uint32_t)len); /* discarded, but the credit comes back */
			return 0;
		}
		memcpy(s->inbuf + s->in_off + s->in_len, payload, len);
		s->in_len += len;
		stdin_write(s);
		return 0;
	case M_STDIN_EOF:
		s->in_eof = 1;
		if (s->in_len == 0)
			stdin_close(s);
		return 0;
	case M_WINDOW: {
		uint8_t ch = rd_u8(&r);
		uint32_t inc = rd_u32(&r);
		if (r.bad || r.left || (ch != CH_STDOUT && ch != CH_STDERR)) {
			send_error(id, E_BAD_PAYLOAD, 0, "malformed WINDOW");
			return 0;
		}
		s->win[ch] = inc > WINDOW_MAX - s->win[ch] ? WINDOW_MAX : s->win[ch] + inc;
		return 0;
	}
	case M_RESIZE: {
		struct winsize ws = { 0 };
		ws.ws_row = rd_u16(&r);
		ws.ws_col = rd_u16(&r);
		if (r.bad || r.left) {
			send_error(id, E_BAD_PAYLOAD, 0, "malformed RESIZE");
			return 0;
		}
		/* TIOCSWINSZ on the master also sends SIGWINCH to the foreground group. */
		if (s->tty && s->out_fd >= 0)
			ioctl(s->out_fd, TIOCSWINSZ, &ws);
		return 0;
	}
	case M_SIGNAL: {
		uint32_t sig = rd_u32(&r);
		if (r.bad || r.left || sig == 0 || sig >= NSIG) {
			send_error(id, E_BAD_PAYLOAD, 0, "bad signal number %u", sig);
			return 0;
		}
		if (!s->exited && kill(-s->pid, (int)sig) < 0)
			kill(s->pid, (int)sig); /* it left its process group (setpgid) */
		return 0;
	}
	}
	return 0;
}

int exec_pollfds(struct pollfd *pfd, int max, int room)
{
	while (graveyard) {
		struct stream *s = graveyard;
		graveyard = s->next_gone;
		free(s);
	}
	int n = 0;
	npolled = 0;
	for (int i = 0; i < nstreams && n + 3 <= max; i++) {
		struct stream *s = streams[i];
		polled[npolled++] = s;
		pfd[n++] = (struct pollfd){ s->in_len > 0 ? s->in_fd : -1, POLLOUT, 0 };
		pfd[n++] = (struct pollfd){ room && s->win[CH_STDOUT] && !s->tty_eio ? s->out_fd : -1, POLLIN, 0 };
		pfd[n++] = (struct pollfd){ room && s->win[CH_STDERR] ? s->err_fd : -1, POLLIN, 0 };
	}
	return n;
}

/* Read what one output has, straight into a frame. */
static void pump(struct stream *s, int ch, int64_t now)
{
	int *fd = ch == CH_STDOUT ? &s->out_fd : &s->err_fd;
	size_t want = s->win[ch] < READ_CHUNK ? s->win[ch] : READ_CHUNK;
	uint8_t *p = frame_begin(ch == CH_STDOUT ? M_STDOUT : M_STDERR, s->id, want);
	ssize_t n;
	do
		n = read(*fd, p, want);
	while (n < 0 && errno == EINTR);
	if (n > 0) {
		frame_end((size_t)n);
		s->win[ch] -= (uint32_t)n;
		if (s->exited)
			s->drain_at = now + DRAIN_MS;
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return;
	/* EOF, or EIO from a PTY master whose slave side is closed everywhere. */
	if (verbose)
		logmsg("stream %u: %s %s (exited %d)", s->id, ch == CH_STDOUT ? "stdout" : "stderr",
		       n == 0 ? "EOF" : strerror(errno), s->exited);
	if (s->tty && !s->exited) {
		/*
		 * The child is closing its last slave fd, so it is exiting: but closing the master
		 * now hangs the terminal up and SIGHUPs the session, which can still land on the
		 * exiting process (seen: cat killed by SIGHUP after its EOF). Close at the reap.
		 */
		s->tty_eio = 1;
		return;
	}
	if (s->tty)
		closefd(&s->in_fd);
	closefd(fd);
}

static void maybe_finish(struct stream *s)
{
	if (!s->exited || s->out_fd >= 0 || s->err_fd >= 0)
		return;
	uint8_t p[8];
	int code = WIFEXITED(s->status) ? WEXITSTATUS(s->status) : -1;
	int sig = WIFSIGNALED(s->status) ? WTERMSIG(s->status) : 0;
	put_u32(p, (uint32_t)code);
	put_u32(p + 4, (uint32_t)sig);
	frame_send(M_EXIT, s->id, p, sizeof p);
	if (verbose)
		logmsg("stream %u: exit code %d signal %d", s->id, code, sig);
	drop(s);
}

void exec_handle(struct pollfd *pfd, int n, int64_t now)
{
	/* pfd holds three entries per stream of polled[]; a stream may have gone since. */
	for (int i = 0; i < npolled && 3 * i < n; i++) {
		struct stream *s = polled[i];
		struct pollfd *p = pfd + 3 * i;
		if (s->gone)
			continue;
		/* An fd closed since the poll (and maybe reused) is not the one that was ready. */
		if (p[0].revents && p[0].fd == s->in_fd) {
			if (p[0].revents & POLLOUT)
				stdin_write(s);
			else
				stdin_dead(s);
		}
		if (p[1].revents && p[1].fd == s->out_fd)
			pump(s, CH_STDOUT, now);
		if (p[2].revents && p[2].fd == s->err_fd)
			pump(s, CH_STDERR, now);
		maybe_finish(s);
	}
}

void exec_reaped(pid_t pid, int status, int64_t now)
{
	for (int i = 0; i < nstreams; i++) {
		struct stream *s = streams[i];
		if (s->pid == pid && !s->exited) {
			s->exited = 1;
			s->status = status;
			s->drain_at = now + DRAIN_MS;
			if (s->tty_eio) {
				closefd(&s->in_fd);
				closefd(&s->out_fd);
			}
			maybe_finish(s);
			return;
		}
	}
}

int64_t exec_timers(int64_t now)
{
	int64_t next = -1;
	for (int i = 0; i < nstreams; i++) {
		struct stream *s = streams[i];
		if (!s->exited)
			continue;
		/* The deadline only runs while the host lets us read: a closed window is not silence. */
		if ((s->out_fd >= 0 && !s->win[CH_STDOUT]) || (s->err_fd >= 0 && !s->win[CH_STDERR])) {
			s->drain_at = now + DRAIN_MS;
			continue;
		}
		if (now >= s->drain_at) {
			if (s->tty)
				closefd(&s->in_fd);
			closefd(&s->out_fd);
			closefd(&s->err_fd);
			maybe_finish(s);
			i--; /* maybe_finish moved another stream into slot i */
			continue;
		}
		if (next < 0 || s->drain_at < next)
			next = s->drain_at;
	}
	return next;
}

void exec_reset(void)
{
	while (nstreams > 0) {
		struct stream *s = streams[0];
		if (!s->exited) {
			kill(-s->pid, SIGKILL);
			kill(s->pid, SIGKILL);
		}
		drop(s); /* the SIGCHLD handler reaps it later */
	}
}
