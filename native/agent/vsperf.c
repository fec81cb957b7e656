/*
 * tender-vsperf: the guest side of bench/vsock.ts. One connection to the host, over AF_VSOCK
 * or TCP, doing one workload; the host peer keeps the time (a TCG guest's clock is not one to
 * trust with microseconds), so this program only moves bytes.
 *
 *   tender-vsperf vsock:PORT|IPV4:PORT up BYTES    write BYTES, shut down writing, wait for EOF
 *   tender-vsperf vsock:PORT|IPV4:PORT down BYTES  read BYTES, answer one byte
 *   tender-vsperf vsock:PORT|IPV4:PORT rr COUNT    COUNT times: write 1 byte, read 1 byte
 *
 * vsock goes to CID 2 (the host). Exit status 0 on success, 1 with a message otherwise.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int die(const char *what)
{
	fprintf(stderr, "tender-vsperf: %s: %s\n", what, strerror(errno));
	return 1;
}

static int dial(const char *target)
{
	const char *colon = strrchr(target, ':');
	if (!colon)
		return errno = EINVAL, -1;
	unsigned long port = strtoul(colon + 1, NULL, 10);
	if (strncmp(target, "vsock:", 6) == 0) {
		struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = (unsigned)port };
		int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
			return -1;
		return fd;
	}
	char host[64];
	size_t hl = (size_t)(colon - target);
	if (hl >= sizeof host)
		return errno = EINVAL, -1;
	memcpy(host, target, hl);
	host[hl] = 0;
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		return errno = EINVAL, -1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		return -1;
	/* A round trip of one byte must not wait for Nagle. */
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static char buf[256 * 1024];

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: tender-vsperf vsock:PORT|IPV4:PORT up BYTES | down BYTES | rr COUNT\n");
		return 2;
	}
	int fd = dial(argv[1]);
	if (fd < 0)
		return die("connect");
	if (strcmp(argv[2], "up") == 0 && argc == 4) {
		unsigned long long left = strtoull(argv[3], NULL, 10);
		while (left) {
			size_t n = left < sizeof buf ? (size_t)left : sizeof buf;
			if (write_all(fd, buf, n) < 0)
				return die("write");
			left -= n;
		}
		shutdown(fd, SHUT_WR);
		while (read(fd, buf, sizeof buf) > 0)
			;
		return 0;
	}
	if (strcmp(argv[2], "down") == 0 && argc == 4) {
		/* Counted, not to EOF: the answer must not depend on a half-closed connection. */
		unsigned long long left = strtoull(argv[3], NULL, 10);
		while (left) {
			ssize_t r = read(fd, buf, left < sizeof buf ? (size_t)left : sizeof buf);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return die("read");
			left -= (unsigned long long)r;
		}
		return write_all(fd, "k", 1) < 0 ? die("write") : 0;
	}
	if (strcmp(argv[2], "rr") == 0 && argc == 4) {
		unsigned long count = strtoul(argv[3], NULL, 10);
		char c = 'x';
		for (unsigned long i = 0; i < count; i++) {
			if (write_all(fd, &c, 1) < 0)
				return die("write");
			ssize_t r;
			while ((r = read(fd, &c, 1)) < 0 && errno == EINTR)
				;
			if (r != 1)
				return die("read");
		}
		return 0;
	}
	fprintf(stderr, "tender-vsperf: unknown workload %s\n", argv[2]);
	return 2;
}
