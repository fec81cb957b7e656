/*
 * The guest's listening sockets, from /proc/net/{tcp,tcp6,udp,udp6} (format:
 * Documentation/networking/proc_net_tcp.rst). TCP sockets in state 0A (LISTEN) and UDP
 * sockets in state 07 (TCP_CLOSE: bound but not connected; a connected UDP socket is a
 * client) with a local port. Addresses are printed as the kernel's in-memory 32-bit words in
 * host byte order, so storing each parsed word back as a native uint32 gives the bytes in
 * network order on any architecture.
 */
#include "agent.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LISTENERS 8192

struct listener {
	uint8_t proto, family;
	uint16_t port;
	uint8_t addr[16];
};

static struct listener cur[MAX_LISTENERS], last[MAX_LISTENERS];
static int ncur, nlast = -1;

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* Parse exactly `digits` hex digits at *p; -1 when they are not there. */
static int64_t hexn(const char **p, int digits)
{
	uint32_t v = 0;
	for (int i = 0; i < digits; i++) {
		int d = hexval((*p)[i]);
		if (d < 0)
			return -1;
		v = v << 4 | (uint32_t)d;
	}
	*p += digits;
	return v;
}

static void scan_file(const char *path, uint8_t proto, uint8_t family, int want_state)
{
	FILE *f = fopen(path, "re");
	if (!f)
		return; /* no IPv6 in this kernel, or no /proc: nothing listens there */
	char line[512];
	int words = family == 4 ? 1 : 4;
	if (!fgets(line, sizeof line, f)) { /* header */
		fclose(f);
		return;
	}
	while (fgets(line, sizeof line, f) && ncur < MAX_LISTENERS) {
		/* "  sl  local_address rem_address   st ..." -> "   0: 0100007F:0277 00000000:0000 0A" */
		const char *p = strchr(line, ':');
		if (!p)
			continue;
		p++;
		while (*p == ' ')
			p++;
		struct listener l;
		memset(&l, 0, sizeof l);
		int ok = 1;
		for (int w = 0; w < words && ok; w++) {
			int64_t v = hexn(&p, 8);
			if (v < 0) {
				ok = 0;
				break;
			}
			uint32_t word = (uint32_t)v;
			memcpy(l.addr + 4 * w, &word, 4);
		}
		if (!ok || *p++ != ':')
			continue;
		int64_t port = hexn(&p, 4);
		if (port <= 0 || *p != ' ')
			continue;
		while (*p == ' ')
			p++;
		while (*p && *p != ' ') /* remote address */
			p++;
		while (*p == ' ')
			p++;
		int64_t st = hexn(&p, 2);
		if (st != want_state)
			continue;
		l.proto = proto;
		l.family = family;
		l.port = (uint16_t)port;
		cur[ncur++] = l;
	}
	fclose(f);
}

static int cmp(const void *a, const void *b)
{
	return memcmp(a, b, sizeof(struct listener));
}

void listeners_scan(int force)
{
	ncur = 0;
	scan_file("/proc/net/tcp", PROTO_IPPROTO_TCP, 4, 0x0A);
	scan_file("/proc/net/tcp6", PROTO_IPPROTO_TCP, 6, 0x0A);
	scan_file("/proc/net/udp", PROTO_IPPROTO_UDP, 4, 0x07);
	scan_file("/proc/net/udp6", PROTO_IPPROTO_UDP, 6, 0x07);
	/* Several sockets on one address and port (SO_REUSEPORT) are one listener. */
	qsort(cur, (size_t)ncur, sizeof cur[0], cmp);
	int n = 0;
	for (int i = 0; i < ncur; i++)
		if (n == 0 || cmp(&cur[n - 1], &cur[i]) != 0)
			cur[n++] = cur[i];
	ncur = n;
	if (!force && ncur == nlast && memcmp(cur, last, (size_t)ncur * sizeof cur[0]) == 0)
		return;
	memcpy(last, cur, (size_t)ncur * sizeof cur[0]);
	nlast = ncur;
	uint8_t *p = frame_begin(M_LISTENERS, 0, 4 + (size_t)ncur * 20);
	size_t off = 4;
	put_u32(p, (uint32_t)ncur);
	for (int i = 0; i < ncur; i++) {
		p[off] = cur[i].proto;
		p[off + 1] = cur[i].family;
		put_u16(p + off + 2, cur[i].port);
		size_t alen = cur[i].family == 4 ? 4 : 16;
		memcpy(p + off + 4, cur[i].addr, alen);
		off += 4 + alen;
	}
	frame_end(off);
}
