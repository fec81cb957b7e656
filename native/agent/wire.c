/* Payload cursors and the queue of frames waiting for the transport. */
#include "agent.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

void put_u16(uint8_t *p, uint16_t v)
{
	p[0] = v >> 8;
	p[1] = v;
}

void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

static const uint8_t *rd_take(struct rd *r, size_t n)
{
	if (r->bad || r->left < n) {
		r->bad = 1;
		return NULL;
	}
	const uint8_t *p = r->p;
	r->p += n;
	r->left -= n;
	return p;
}

uint8_t rd_u8(struct rd *r)
{
	const uint8_t *p = rd_take(r, 1);
	return p ? p[0] : 0;
}

uint16_t rd_u16(struct rd *r)
{
	const uint8_t *p = rd_take(r, 2);
	return p ? (uint16_t)(p[0] << 8 | p[1]) : 0;
}

uint32_t rd_u32(struct rd *r)
{
	const uint8_t *p = rd_take(r, 4);
	return p ? be32(p) : 0;
}

const char *rd_str(struct rd *r, uint32_t *len)
{
	uint32_t n = rd_u32(r);
	const uint8_t *p = rd_take(r, n);
	if (!p || memchr(p, 0, n)) {
		r->bad = 1;
		return NULL;
	}
	*len = n;
	return (const char *)p;
}

/* ---- outgoing queue ---- */

static uint8_t *q;
static size_t qcap, qhead, qtail;
static size_t frame_left; /* bytes of the frame at qhead still to write; 0 = on a boundary */
static size_t open_frame; /* offset of the frame being built */

size_t outq_len(void)
{
	return qtail - qhead;
}

static void reserve(size_t n)
{
	if (qcap - qtail >= n)
		return;
	if (qhead > 0) { /* compact first: the queue is usually almost empty */
		memmove(q, q + qhead, qtail - qhead);
		qtail -= qhead;
		qhead = 0;
		if (qcap - qtail >= n)
			return;
	}
	size_t cap = qcap ? qcap : 65536;
	while (cap - qtail < n)
		cap *= 2;
	uint8_t *nq = realloc(q, cap);
	if (!nq) {
		/* Nothing sane to do without memory; the init system restarts us. */
		logmsg("out of memory (queue %zu bytes)", cap);
		_exit(70);
	}
	q = nq;
	qcap = cap;
}

uint8_t *frame_begin(uint8_t type, uint32_t stream, size_t payload_max)
{
	reserve(HDR_LEN + payload_max);
	open_frame = qtail;
	q[qtail + 4] = type;
	put_u32(q + qtail + 5, stream);
	return q + qtail + HDR_LEN;
}

void frame_end(size_t payload_len)
{
	put_u32(q + open_frame, (uint32_t)(5 + payload_len));
	qtail = open_frame + HDR_LEN + payload_len;
}

void frame_send(uint8_t type, uint32_t stream, const void *payload, size_t len)
{
	uint8_t *p = frame_begin(type, stream, len);
	if (len)
		memcpy(p, payload, len);
	frame_end(len);
}

void send_error(uint32_t stream, uint32_t code, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	uint8_t *p = frame_begin(M_ERROR, stream, 12 + (size_t)n);
	put_u32(p, code);
	put_u32(p + 4, (uint32_t)err);
	put_u32(p + 8, (uint32_t)n);
	memcpy(p + 12, msg, (size_t)n);
	frame_end(12 + (size_t)n);
	if (verbose)
		logmsg("error to host (stream %u, code %u, errno %d): %s", stream, code, err, msg);
}

/* Account `n` written bytes against frame boundaries. */
static void advance(size_t n)
{
	while (n > 0) {
		if (frame_left == 0)
			frame_left = 4 + be32(q + qhead);
		size_t take = n < frame_left ? n : frame_left;
		frame_left -= take;
		qhead += take;
		n -= take;
	}
	if (qhead == qtail)
		qhead = qtail = 0;
}

int outq_flush(int fd)
{
	while (qtail > qhead) {
		ssize_t n = write(fd, q + qhead, qtail - qhead);
		if (n > 0) {
			advance((size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		return -1;
	}
	return 0;
}

int outq_mid_frame(void)
{
	return frame_left > 0;
}

void outq_reset(int keep_partial)
{
	if (!keep_partial)
		frame_left = 0;
	qtail = qhead + frame_left;
	if (qhead == qtail)
		qhead = qtail = 0;
	/* Give back a queue a chatty session grew. */
	if (qtail == 0 && qcap > (1u << 22)) {
		free(q);
		q = NULL;
		qcap = 0;
	}
}
